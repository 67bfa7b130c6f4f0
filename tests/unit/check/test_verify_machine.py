"""check.machine from recorded observations: host.vhost-net and vm.kvm."""

from __future__ import annotations

import pathlib

import pytest

from tests.support import observations
from tests.support.observations import says
from vhostorch.check import machine
from vhostorch.check.report import FAIL, PASS


@pytest.mark.parametrize(
    ("vhost_net", "status", "message"),
    [
        pytest.param(True, PASS, "/dev/vhost-net is present", id="present"),
        pytest.param(False, FAIL,
                     "/dev/vhost-net is missing on this host (vhostorch doctor says why)",
                     id="missing"),
    ],
)  # fmt: skip
def test_host_vhost_net(vhost_net: bool, status: str, message: str, tmp_path: pathlib.Path) -> None:
    rec = observations.load("healthy-1q")
    rec["vhost_net"] = vhost_net  # False: the same QEMU seen from a host without the device
    check = machine.host_vhost_net(observations.replay(rec, tmp_path))
    assert (check.id, check.status) == ("host.vhost-net", status)
    assert says(check.message, message), check.message


def test_vm_kvm(tmp_path: pathlib.Path) -> None:
    obs = observations.observed("healthy-1q", tmp_path)
    check = machine.vm_kvm(obs)
    assert (check.id, check.status) == ("vm.kvm", PASS)
    assert check.evidence["accel"] == ["kvm"]
    assert check.evidence["kvm_vm_fds"] == [
        fd.num for fd in obs.process.fds_to("anon_inode:kvm-vm")
    ]
    assert check.evidence["kvm_vm_fds"] != []
