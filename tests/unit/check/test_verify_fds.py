"""check.fds from recorded observations: nic.tap.fds, nic.vhost.fds, nic.vhost.worker."""

from __future__ import annotations

import pathlib

from tests.support import observations
from vhostorch.check import fds
from vhostorch.check.report import FAIL, PASS


def test_tap_fds(tmp_path: pathlib.Path) -> None:
    obs = observations.observed("healthy-4q", tmp_path / "a")
    nic = observations.nic_named(obs, "net0")
    check = fds.tap_fds(obs, nic)
    (tap,) = obs.taps
    assert (check.id, check.status) == ("nic.tap.fds", PASS)
    assert check.message == f"4 fd(s) on tap {tap}, queue mode matches"
    held = check.evidence["fds"]
    assert check.evidence["taps"] == [tap] and isinstance(held, list) and len(held) == 4
    assert check.evidence["multi_queue"] is True and check.evidence["vnet_hdr"] is True
    # The same QEMU, its tap seen as single-queue: the queue modes disagree.
    rec = observations.load("healthy-4q")
    link = rec["taps"][tap]
    assert link is not None
    tun = link["tun"]
    assert isinstance(tun, dict)
    tun["multi_queue"] = False
    obs = observations.replay(rec, tmp_path / "b")
    check = fds.tap_fds(obs, observations.nic_named(obs, "net0"))
    assert check.status == FAIL
    assert check.message == f"tap {tap} is single-queue but QEMU uses 4 queue(s)"


def test_vhost_fds(tmp_path: pathlib.Path) -> None:
    obs = observations.observed("second-nic-vhost-off", tmp_path)
    good = fds.vhost_fds(obs, observations.nic_named(obs, "net0"))
    assert (good.id, good.status) == ("nic.vhost.fds", PASS)
    assert good.message == "1 /dev/vhost-net fd(s) for 1 queue pair(s)"
    assert good.evidence["fds"] == [fd.num for fd in obs.process.fds_to("/dev/vhost-net")]
    bad = fds.vhost_fds(obs, observations.nic_named(obs, "net1"))
    assert bad.status == FAIL
    assert bad.message == "0 /dev/vhost-net fd(s) for 1 queue pair(s)"
    assert bad.evidence == {"expected": 1, "fds": []}


def test_worker(tmp_path: pathlib.Path) -> None:
    obs = observations.observed("healthy-4q", tmp_path / "a")
    check = fds.worker(obs, observations.nic_named(obs, "net0"))
    assert (check.id, check.status) == ("nic.vhost.worker", PASS)
    pid = obs.process.pid
    assert check.message == f"4 vhost-{pid} worker(s) (kernel threads) for 4 vhost device(s)"
    assert check.evidence["model"] == "kthread"
    assert check.evidence["tids"] == list(obs.workers) and len(obs.workers) == 4
    off = observations.observed("second-nic-vhost-off", tmp_path / "b")
    check = fds.worker(off, observations.nic_named(off, "net1"))
    assert (check.status, check.message) == (FAIL, "no vhost device, so no worker")
