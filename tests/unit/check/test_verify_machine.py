"""check.machine from recorded observations: host.vhost-net and vm.kvm."""

from __future__ import annotations

import pathlib

from tests.support import observations
from vhostorch.check import machine
from vhostorch.check.report import FAIL, PASS


def test_host_vhost_net(tmp_path: pathlib.Path) -> None:
    rec = observations.load("healthy-1q")
    check = machine.host_vhost_net(observations.replay(rec, tmp_path / "a"))
    assert (check.id, check.status) == ("host.vhost-net", PASS)
    rec["vhost_net"] = False  # the same QEMU seen from a host without the device
    check = machine.host_vhost_net(observations.replay(rec, tmp_path / "b"))
    assert check.status == FAIL
    assert check.message == "/dev/vhost-net is missing on this host (vhostorch doctor says why)"


def test_vm_kvm(tmp_path: pathlib.Path) -> None:
    obs = observations.observed("healthy-1q", tmp_path)
    check = machine.vm_kvm(obs)
    assert (check.id, check.status) == ("vm.kvm", PASS)
    assert check.evidence["accel"] == ["kvm"]
    assert check.evidence["kvm_vm_fds"] == [
        fd.num for fd in obs.process.fds_to("anon_inode:kvm-vm")
    ]
    assert check.evidence["kvm_vm_fds"] != []
