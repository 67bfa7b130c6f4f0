"""check.fds from recorded observations: nic.tap.fds, nic.vhost.fds, nic.vhost.worker."""

from __future__ import annotations

import pathlib
import re

import pytest

from tests.support import observations
from tests.support.observations import says
from vhostorch.check import fds
from vhostorch.check.report import FAIL, PASS
from vhostorch.kernel import procfs


def test_tap_fds(tmp_path: pathlib.Path) -> None:
    obs = observations.observed("healthy-4q", tmp_path)
    nic = observations.nic_named(obs, "net0")
    check = fds.tap_fds(obs, nic)
    (tap,) = obs.taps
    assert (check.id, check.status) == ("nic.tap.fds", PASS)
    assert check.message == f"4 fd(s) on tap {tap}, queue mode matches"
    held = check.evidence["fds"]
    assert check.evidence["taps"] == [tap] and isinstance(held, list) and len(held) == 4
    assert check.evidence["multi_queue"] is True and check.evidence["vnet_hdr"] is True


def test_tap_fds_of_a_single_queue_tap_fail(tmp_path: pathlib.Path) -> None:
    """The same QEMU, its tap seen as single-queue: the queue modes disagree."""
    rec = observations.load("healthy-4q")
    (tap,) = rec["taps"]
    link = rec["taps"][tap]
    assert link is not None
    tun = link["tun"]
    assert isinstance(tun, dict)
    tun["multi_queue"] = False
    obs = observations.replay(rec, tmp_path)
    check = fds.tap_fds(obs, observations.nic_named(obs, "net0"))
    assert check.status == FAIL
    assert check.message == f"tap {tap} is single-queue but QEMU uses 4 queue(s)"


@pytest.mark.parametrize(
    ("nic", "status", "message"),
    [
        pytest.param("net0", PASS, "1 /dev/vhost-net fd(s) for 1 queue pair(s)", id="vhost-on"),
        pytest.param("net1", FAIL, "0 /dev/vhost-net fd(s) for 1 queue pair(s)", id="vhost-off"),
    ],
)
def test_vhost_fds(nic: str, status: str, message: str, tmp_path: pathlib.Path) -> None:
    obs = observations.observed("second-nic-vhost-off", tmp_path)
    check = fds.vhost_fds(obs, observations.nic_named(obs, nic))
    assert (check.id, check.status, check.message) == ("nic.vhost.fds", status, message)
    held = [fd.num for fd in obs.process.fds_to("/dev/vhost-net")] if status == PASS else []
    assert check.evidence["fds"] == held
    if status == FAIL:
        assert check.evidence == {"expected": 1, "fds": []}


@pytest.mark.parametrize(
    ("flags", "status"),
    [
        pytest.param("flags:\t012000000\n", FAIL, id="o-path"),  # O_PATH | O_CLOEXEC
        pytest.param("", PASS, id="no-flags-line"),
    ],
)
def test_an_o_path_vhost_fd_is_none(flags: str, status: str, tmp_path: pathlib.Path) -> None:
    """A recording's vhost-net fd with O_PATH in its fdinfo flags (what any user's
    open(O_PATH) of /dev/vhost-net shows: tests/kernel/test_fd_identity.py holds one for real)
    is no vhost fd, whatever its device number; without a flags: line it counts as before."""
    rec = observations.load("healthy-1q")
    pid = rec["pid"]
    (vhost,) = [k for k, v in rec["symlinks"].items() if v == "/dev/vhost-net"]
    info = f"{pid}/fdinfo/{vhost.rsplit('/', 1)[1]}"
    rec["files"][info] = re.sub(r"flags:\t\d+\n", flags, rec["files"][info])
    obs = observations.replay(rec, tmp_path)
    check = fds.vhost_fds(obs, observations.nic_named(obs, "net0"))
    assert check.status == status, check
    if status == FAIL:
        num = int(vhost.rsplit("/", 1)[1])
        assert check.evidence["not_vhost_net"] == [num] and check.evidence["fds"] == []
        assert obs.process.fd(num) == procfs.Fd(num, "/dev/vhost-net", {}, None)


@pytest.mark.parametrize(
    ("name", "nic", "status", "message"),
    [
        pytest.param("healthy-4q", "net0", PASS,
                     "4 vhost-... worker(s) (kernel threads) for 4 vhost device(s)", id="4q"),
        pytest.param("second-nic-vhost-off", "net1", FAIL, "no vhost device, so no worker",
                     id="vhost-off"),
    ],
)  # fmt: skip
def test_worker(name: str, nic: str, status: str, message: str, tmp_path: pathlib.Path) -> None:
    obs = observations.observed(name, tmp_path)
    check = fds.worker(obs, observations.nic_named(obs, nic))
    assert (check.id, check.status) == ("nic.vhost.worker", status)
    assert says(check.message, message), check.message


def test_the_workers_of_a_healthy_vm_are_its_kernel_threads(tmp_path: pathlib.Path) -> None:
    obs = observations.observed("healthy-4q", tmp_path)
    check = fds.worker(obs, observations.nic_named(obs, "net0"))
    pid = obs.process.pid
    assert check.message == f"4 vhost-{pid} worker(s) (kernel threads) for 4 vhost device(s)"
    assert check.evidence["model"] == "kthread"
    assert check.evidence["tids"] == list(obs.workers) and len(obs.workers) == 4
