"""check.request from recorded observations: nic.vhost.requested and nic.queues."""

from __future__ import annotations

import pathlib

from tests.support import observations
from vhostorch.check import request
from vhostorch.check.report import FAIL, PASS


def test_requested(tmp_path: pathlib.Path) -> None:
    obs = observations.observed("second-nic-vhost-off", tmp_path)
    asked = request.requested(obs, observations.nic_named(obs, "net0"))
    assert (asked.id, asked.nic, asked.status) == ("nic.vhost.requested", "net0", PASS)
    assert asked.message == "vhost is requested by the QEMU command line"
    assert asked.evidence == {"netdev": "n0", "vhost": True}
    off = request.requested(obs, observations.nic_named(obs, "net1"))
    assert (off.nic, off.status) == ("net1", FAIL)
    assert off.message == (
        "vhost is not requested on -netdev n1 (vhost=on is missing): the data path runs in QEMU"
    )
    assert off.evidence == {"netdev": "n1", "vhost": False}


def test_queues(tmp_path: pathlib.Path) -> None:
    healthy = observations.observed("healthy-4q", tmp_path / "a")
    sized = request.queues(healthy, observations.nic_named(healthy, "net0"))
    assert (sized.id, sized.status) == ("nic.queues", PASS)
    assert sized.evidence == {"netdev_queue_pairs": 4, "mq": True, "vectors": 10,
                              "device_queue_pairs": 4}  # fmt: skip
    broken = observations.observed("device-4q-tap-2q", tmp_path / "b")
    check = request.queues(broken, observations.nic_named(broken, "net0"))
    assert check.status == FAIL
    assert check.message == (
        "the device is sized for 4 queue pair(s) (vectors=10) but its tap netdev has 2"
    )
    assert check.evidence["device_queue_pairs"] == 4 and check.evidence["netdev_queue_pairs"] == 2
