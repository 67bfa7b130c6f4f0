"""A saved VM's pid alone names no QEMU (issue 19, B3).

Real QEMUs (TCG, paused) run by nobody via setpriv. A VM that died without `down` leaves
its state; a user's QEMU that gets its pid was taken for that VM.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time

import pytest

from tests.support import kernel
from tests.support.kernel import vhostorch
from vhostorch.check import targets
from vhostorch.kernel import procfs
from vhostorch.vm import state

pytestmark = pytest.mark.kernel

QEMU = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


def _nobody_qemu() -> subprocess.Popen[bytes]:
    argv = [
        QEMU, "-accel", "tcg", "-M", "none", "-S", "-display", "none", "-nodefaults",
        "-name", f"guest={kernel.unique('vhob23-')}",
    ]  # fmt: skip
    proc = subprocess.Popen(AS_NOBODY + argv, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not procfs.program(proc.pid).startswith("qemu"):
        assert proc.poll() is None and time.monotonic() < deadline, "QEMU did not start"
        time.sleep(0.05)
    return proc


def test_a_users_qemu_with_a_dead_vms_pid_is_not_that_vm() -> None:
    """A state file naming the pid of nobody's QEMU with another start time (the VM it
    records died without `down`, the pid went to a user's QEMU): that QEMU was reported as
    vhostorch's VM, with its plan, and read first in check --all."""
    proc = _nobody_qemu()
    name = kernel.unique("vhob23-")
    workdir = tempfile.mkdtemp(prefix="vhob23-")
    started = procfs.start_time(proc.pid)
    assert started is not None
    dead = state.VmState(name, "qmp", proc.pid, "tcg", None, None, workdir, (), start_time=1)
    try:
        state.save(dead)
        for argv in (("--pid", str(proc.pid)), ("--all",)):
            done = vhostorch("check", *argv, "--json")
            assert done.returncode in (0, 1) and "internal error" not in done.stderr, done.stderr
            out = json.loads(done.stdout)
            found = [r for r in out.get("reports", [out]) if r["target"]["pid"] == proc.pid]
            assert found and "vhostorch" not in found[0]["target"], found
        assert proc.pid not in targets._plans()
        # The VM's own QEMU (its start time recorded) is still known for it.
        state.save(dead.replace(start_time=started))
        done = vhostorch("check", "--pid", str(proc.pid), "--json")
        target = json.loads(done.stdout)["target"]
        assert target["vhostorch"] == {"vm": name, "backend": "qmp"}, target
    finally:
        state.remove(name)
        shutil.rmtree(workdir, ignore_errors=True)
        proc.kill()  # our own child, by its pid
        proc.wait()
