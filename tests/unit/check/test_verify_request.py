"""check.request from recorded observations: nic.vhost.requested and nic.queues."""

from __future__ import annotations

import pathlib

import pytest

from tests.support import observations
from tests.support.observations import says
from vhostorch.check import request
from vhostorch.check.report import FAIL, PASS


@pytest.mark.parametrize(
    ("nic", "status", "message", "evidence"),
    [
        pytest.param("net0", PASS, "vhost is requested by the QEMU command line",
                     {"netdev": "n0", "vhost": True}, id="vhost-on"),
        pytest.param("net1", FAIL, "vhost is not requested on -netdev n1 (vhost=on is missing): "
                     "the data path runs in QEMU", {"netdev": "n1", "vhost": False},
                     id="vhost-off"),
    ],
)  # fmt: skip
def test_requested(
    nic: str, status: str, message: str, evidence: dict[str, object], tmp_path: pathlib.Path
) -> None:
    obs = observations.observed("second-nic-vhost-off", tmp_path)
    asked = request.requested(obs, observations.nic_named(obs, nic))
    assert (asked.id, asked.nic, asked.status) == ("nic.vhost.requested", nic, status)
    assert asked.message == message
    assert asked.evidence == evidence


@pytest.mark.parametrize(
    ("name", "status", "message", "evidence"),
    [
        pytest.param("healthy-4q", PASS, "...", {"netdev_queue_pairs": 4, "mq": True,
                     "vectors": 10, "device_queue_pairs": 4}, id="sized"),
        pytest.param("device-4q-tap-2q", FAIL, "the device is sized for 4 queue pair(s) "
                     "(vectors=10) but its tap netdev has 2", {"netdev_queue_pairs": 2,
                     "device_queue_pairs": 4}, id="device-4q-tap-2q"),
    ],
)  # fmt: skip
def test_queues(
    name: str, status: str, message: str, evidence: dict[str, object], tmp_path: pathlib.Path
) -> None:
    obs = observations.observed(name, tmp_path)
    check = request.queues(obs, observations.nic_named(obs, "net0"))
    assert (check.id, check.status) == ("nic.queues", status)
    assert says(check.message, message), check.message
    assert {k: check.evidence[k] for k in evidence} == evidence
