"""A slow or stalled monitor cannot hold a check for long (issue 19, D3).

Any user can run root's QEMU binary with a QMP socket of its own, which check asks. Real
QEMUs, run by nobody via setpriv, are made slow for real: the test's own QMP connection
keeps QEMU's main loop busy with synchronous qemu-io writes on a drive whose every request
takes LATENCY s, and QEMU's dispatcher takes its monitors' requests in turn, so each
question check asks waits about LATENCY, just inside the old 5 s per-question timeout.
Before, one read of such a QEMU took (2 per virtio-net device + 3) questions x LATENCY,
a QEMU listing any number of virtio-net devices was asked about each of them, and check
--all waited 5 s for each stalled QEMU, one after another, past the metrics unit's 50 s.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

from tests.support import kernel
from tests.support.kernel import vhostorch
from tests.support.nobody import paused_qemu, start_qemu
from tests.support.observer import SLOW, Observer, slow_drive
from vhostorch.check import observe, targets
from vhostorch.qemu import monitor

pytestmark = pytest.mark.kernel

LATENCY = 3.0  # each question waits about this long: under the old 5 s per question


class UserQemu:
    """Root's QEMU binary run by nobody (TCG, paused), with ``nics`` virtio-net devices and a
    slow drive; two QMP sockets: the test's (``observer``), and the last, its own."""

    def __init__(self, root: str, nics: int = 0, latency: float = LATENCY) -> None:
        self.sock = os.path.join(root, "qmp.sock")
        theirs = os.path.join(root, "observer.sock")
        devices = []
        for i in range(nics):  # eight functions a slot: more NICs than one bus has slots
            addr = f"addr=0x{3 + i // 8:x}.{i % 8},multifunction=on"
            devices += ["-device", f"virtio-net-pci,id=net{i},{addr}"]
        argv = paused_qemu(
            kernel.unique("vhod3slow-"), *slow_drive(latency), *devices,
            "-qmp", f"unix:{theirs},server=on,wait=off",
            "-qmp", f"unix:{self.sock},server=on,wait=off",
            machine="pc" if nics else "none",
        )  # fmt: skip
        self.proc = start_qemu(
            argv,
            lambda _pid: os.path.exists(self.sock),
            stdout=subprocess.DEVNULL,  # qemu-io's reports
            stderr=subprocess.DEVNULL,  # "nic netN has no peer"
        )
        self.pid = self.proc.pid
        self.observer = Observer(theirs)

    def hold(self, times: int) -> None:
        """Keep QEMU's main loop busy for ``times`` x the drive's latency: synchronous
        qemu-io writes, sent at once and never waited for (QEMU queues them)."""
        command = {"command-line": f'qemu-io {SLOW} "write 0 512"'}
        request = json.dumps({"execute": "human-monitor-command", "arguments": command})
        self.observer.sock.sendall((request.encode() + b"\n") * times)

    def stop(self) -> None:
        self.observer.close()
        self.proc.kill()  # our own child, by its pid
        self.proc.wait()


@pytest.fixture
def nobody_dirs() -> Iterator[list[str]]:
    """Directories of nobody's, one per QEMU (made on demand by ``_dir``)."""
    made: list[str] = []
    yield made
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


def _dir(made: list[str]) -> str:
    root = tempfile.mkdtemp(prefix="vhod3-")  # pytest's tmp_path is root's only
    nobody = pwd.getpwnam("nobody")
    os.chown(root, nobody.pw_uid, nobody.pw_gid)
    made.append(root)
    return root


@pytest.fixture
def qemus(nobody_dirs: list[str]) -> Iterator[list[UserQemu]]:
    started: list[UserQemu] = []
    yield started
    for qemu in started:
        qemu.stop()


def _start(
    qemus: list[UserQemu], dirs: list[str], nics: int = 0, latency: float = LATENCY
) -> UserQemu:
    qemu = UserQemu(_dir(dirs), nics, latency)
    qemus.append(qemu)
    return qemu


def test_one_monitor_read_has_one_deadline(qemus: list[UserQemu], nobody_dirs: list[str]) -> None:
    """Each question answered after about 3 s: the read ends at 5 s in all (was 9 questions,
    about 27 s, and then a monitor view as if nothing were wrong)."""
    qemu = _start(qemus, nobody_dirs, nics=3)
    qemu.hold(40)  # 120 s
    start = time.monotonic()
    observed = observe.observe(qemu.pid, monitor=targets._own_qmp(qemu.pid))
    took = time.monotonic() - start
    assert took < monitor.READ_WITHIN + 1.5, took
    assert observed.monitor is None
    error = observed.monitor_error or ""
    assert "the 5 s all questions of this read share are spent" in error, error
    # Asked explicitly (--qmp), the same deadline.
    start = time.monotonic()
    done = vhostorch("check", "--qmp", qemu.sock, "--json")
    took = time.monotonic() - start
    assert done.returncode in (0, 1) and "internal error" not in done.stderr, done.stderr
    assert took < monitor.READ_WITHIN + 4, took


@pytest.mark.parametrize("nics", [monitor.MAX_NICS, monitor.MAX_NICS + 1])
def test_a_qemu_listing_more_virtio_nets_than_the_cap_is_not_read(
    qemus: list[UserQemu], nobody_dirs: list[str], nics: int
) -> None:
    qemu = _start(qemus, nobody_dirs, nics=nics)
    observed = observe.observe(qemu.pid, monitor=targets._own_qmp(qemu.pid))
    if nics <= monitor.MAX_NICS:
        assert observed.monitor is not None, observed.monitor_error
        assert len(observed.monitor.nics) == nics
        return
    assert observed.monitor is None
    assert observed.monitor_error == (
        f"qmp:{qemu.sock}: QEMU lists {nics} virtio-net devices, more than the "
        f"{monitor.MAX_NICS} vhostorch asks about: not read"
    )


def test_check_all_spends_a_bounded_time_on_monitors(
    qemus: list[UserQemu], nobody_dirs: list[str]
) -> None:
    """Seven stalled QEMUs (their main loop held for a minute): check --all took 5 s for
    each, 35 s, and ten passed the metrics unit's 50 s; now 20 s for all monitors."""
    stalled = [_start(qemus, nobody_dirs, latency=60.0) for _ in range(7)]
    for qemu in stalled:
        qemu.hold(1)
    start = time.monotonic()
    done = vhostorch("check", "--all", "--json")
    took = time.monotonic() - start
    assert done.returncode in (0, 1) and "internal error" not in done.stderr, done.stderr
    pids = {r["target"]["pid"] for r in json.loads(done.stdout)["reports"]}
    assert {q.pid for q in stalled} <= pids  # every one checked, without its monitor
    assert took < targets.MONITORS_WITHIN + 6, took
    # What each is told, with a budget of 7 s: the first read gets its whole 5 s, the next
    # is cut at the 2 s left, the last is not asked; none gets a monitor view.
    budget = targets.MonitorTime(7.0)
    errors = []
    for qemu in stalled[:3]:
        observed = observe.observe(qemu.pid, monitor=targets._own_qmp(qemu.pid, budget=budget))
        assert observed.monitor is None
        errors.append(observed.monitor_error or "")
    assert errors[0] == f"cannot reach QMP at {stalled[0].sock}: no answer within 5 s", errors
    spent = "check --all's 7 s for reading all QEMUs' monitors are spent"
    assert errors[1].endswith(f"(cut short: {spent} (1 asked before this one))"), errors
    assert errors[2] == f"QMP not asked: {spent} (2 asked before this one)", errors
