"""`vhostorch pin` on a real QEMU of this machine, with the real pin records under
/run/vhostorch/pins (each test's own QEMU pid names its record)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import vms
from tests.support.kernel import vhostorch
from tests.support.nobody import AS_NOBODY
from tests.support.observer import qemu
from vhostorch import pins
from vhostorch.check import observe
from vhostorch.errors import OperationFailed
from vhostorch.kernel import procfs
from vhostorch.orchestrate import pinning

VM = "vhorevpin"


def test_a_pin_whose_qemu_has_no_vhost_worker_now_can_be_cleared_and_does_not_fail_reapply() -> (
    None
):
    """A VM pinned while it had a vhost NIC, whose vhost NICs were unplugged since: the
    record must neither fail every `pin --reapply` (the metrics timer's) nor outlive
    `pin --clear`. This machine has no /dev/vhost-net, so no pin can be made here: the record
    the pin left is written as pins.save wrote it (the only stand-in)."""
    with qemu() as (pid, _, _):
        start = procfs.start_time(pid)
        assert start is not None
        pins.save(pins.Pin(pid, start, "0", "vhostorch pin", None))
        try:
            done = vhostorch("pin", "--reapply")
            assert done.returncode == 0, done
            assert f"QEMU {pid}" not in done.stdout + done.stderr, done
            assert pins.load(pid, start) is not None  # kept for a vhost NIC added later

            done = vhostorch("pin", "--pid", str(pid), "--clear")
            assert done.returncode == 0, done
            assert done.stdout.strip() == f"QEMU {pid}: pin forgotten (no NIC uses vhost now)"
            assert pins.load(pid, start) is None

            # Nothing recorded, nothing to unpin: one line, exit 1.
            done = vhostorch("pin", "--pid", str(pid), "--clear")
            assert done.returncode == 1, done
            [line] = done.stderr.splitlines()
            assert "has no vhost-net worker to pin" in line, line
        finally:
            pins.forget(pid)


def test_nic_add_without_vhost_to_a_pinned_vm_with_no_vhost_worker_is_not_undone(
    tmp_path: Path,
) -> None:
    """`nic add` applies the VM's pin to the new NIC's workers; a NIC without vhost has none,
    nor has the VM (this machine has no /dev/vhost-net; the record stands in for the pin `up`
    made while it had a vhost NIC). The add failed ('no vhost-net worker to pin') and its
    undo could not unplug the NIC from a guest without an OS: left attached."""
    spec = vms.spec(str(tmp_path), VM, f"{VM}0", 1)
    code, up, err = vms.run("up", spec, "--wait", "1")
    assert code == 0, err
    pid = up["vm"]["pid"]
    start = procfs.start_time(pid)
    assert start is not None
    try:
        pins.save(pins.Pin(pid, start, "0", "spec", VM))
        done = vhostorch("nic", "add", VM, "--tap", f"{VM}1", "--vhost", "off", "--wait", "1")
        assert done.returncode == 0, done
        assert [n["tap"] for n in vms.state_of(VM)["nics"]] == [f"{VM}0", f"{VM}1"]  # type: ignore[index]
        assert pins.load(pid, start) is not None
    finally:
        pins.forget(pid)
        vhostorch("down", VM)
    assert vms.left(VM, [f"{VM}0", f"{VM}1"]) == []


ZOMBIE = """
import ctypes, os, sys, time
child = os.fork()
if child == 0:
    ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0)  # PR_SET_NAME
    os._exit(0)
print(child, flush=True)
time.sleep(600)  # never reaps it
"""


def test_a_users_zombie_named_vhost_pid_is_not_a_worker_of_that_qemu() -> None:
    """A kernel-thread worker (Linux < 6.4) was told by its name and an empty command line;
    a zombie has an empty one too, and any user names a process `vhost-<QEMU's pid>` before
    it exits. It was taken for the QEMU's worker: placed, judged (a worker count that no
    longer matches the vhost fds, its own CPUs) and, where its workers stand in, pinned by
    root. Here QEMU has no vhost_task of its own (no /dev/vhost-net), as on 6.1."""
    with qemu() as (pid, _, _):
        parent = subprocess.Popen(
            [*AS_NOBODY, sys.executable, "-c", ZOMBIE, f"vhost-{pid}"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert parent.stdout is not None
            zombie = int(parent.stdout.readline())
            while procfs.alive(zombie):
                time.sleep(0.01)  # until it has named itself and exited
            assert Path(f"/proc/{zombie}/comm").read_text().strip() == f"vhost-{pid}"
            assert Path(f"/proc/{zombie}/cmdline").read_bytes() == b""
            obs = observe.observe(pid)
            assert obs.workers == ()
            assert zombie not in (obs.places or {})
        finally:
            parent.kill()
            parent.wait()


def test_a_worker_tid_now_anothers_is_not_pinned(tmp_path: Path) -> None:
    """A worker listed, then gone (its NIC unplugged, its QEMU stopping) before its affinity
    is set: its tid may be any thread's by then, and sched_setaffinity takes a tid. The reuse
    cannot be timed from outside, so the tid handed to apply is another user's process from
    the start (the stand-in); root must neither pin it nor record the pin."""
    with qemu() as (pid, _, _):
        other = subprocess.Popen([*AS_NOBODY, "sleep", "600"])
        try:
            while Path(f"/proc/{other.pid}/comm").read_text().strip() != "sleep":
                time.sleep(0.01)
            before = os.sched_getaffinity(other.pid)
            with pytest.raises(OperationFailed, match=f"worker {other.pid} is gone"):
                pinning.apply(pid, frozenset({0}), "vhostorch pin", tids=[other.pid],
                              pins_dir=str(tmp_path))  # fmt: skip
            assert os.sched_getaffinity(other.pid) == before
            assert os.listdir(tmp_path) == []
        finally:
            other.kill()
            other.wait()
