"""check.vrings from recorded observations: nic.kick and nic.call, per virtqueue."""

from __future__ import annotations

import pathlib

import pytest

from tests.support import observations
from tests.support.observations import says
from vhostorch.check import vrings
from vhostorch.check.report import PASS, UNKNOWN, WARN


def test_kick(tmp_path: pathlib.Path) -> None:
    obs = observations.observed("healthy-4q", tmp_path)
    nic = observations.nic_named(obs, "net0")
    kicks = [vrings.kick(obs, nic, queue) for queue in range(8)]
    assert {(c.id, c.status) for c in kicks} == {("nic.kick", PASS)}
    for queue, check in enumerate(kicks):
        assert check.queue == queue
        assert check.evidence["vhost_fd"] == nic.vhost_fds[queue // 2].num
        assert check.evidence["vring"] == queue % 2
        # KVM matches the legacy port-I/O notify against this very queue's index.
        notify = check.evidence["ioeventfds"]
        assert isinstance(notify, list)
        assert [n["datamatch"] for n in notify if n["pio"]] == [queue]
    kicked = [c.evidence["kick"] for c in kicks]
    assert all(isinstance(k, dict) and k["open_as_eventfd"] for k in kicked)
    assert len({k["eventfd_id"] for k in kicked if isinstance(k, dict)}) == 8


# Each scenario: (recording, its trace seen, queue, status, message; "..." stands for any text).
CALL = [
    pytest.param("no-guest-driver", True, 0, WARN,
                 "not wired yet: the guest driver has not started the device (no DRIVER_OK)",
                 id="idle"),
    pytest.param("healthy-1q", False, 1, UNKNOWN, "...the wiring trace is not armed...",
                 id="untraced"),
]  # fmt: skip


def test_call(tmp_path: pathlib.Path) -> None:
    obs = observations.observed("healthy-4q", tmp_path)
    nic = observations.nic_named(obs, "net0")
    calls = [vrings.call(obs, nic, queue) for queue in range(8)]
    assert {(c.id, c.status) for c in calls} == {("nic.call", PASS)}
    irqfds = [c.evidence["irqfd"] for c in calls]
    assert len({i["gsi"] for i in irqfds if isinstance(i, dict)}) == 8
    assert all(c.evidence["masked"] is False for c in calls)


@pytest.mark.parametrize(("name", "trace", "queue", "status", "message"), CALL)
def test_call_not_proved(
    name: str, trace: bool, queue: int, status: str, message: str, tmp_path: pathlib.Path
) -> None:
    obs = observations.observed(name, tmp_path, trace=trace)
    check = vrings.call(obs, observations.nic_named(obs, "net0"), queue)
    assert (check.id, check.status) == ("nic.call", status)
    assert says(check.message, message), check.message


def test_every_virtqueue_gets_kick_then_call(tmp_path: pathlib.Path) -> None:
    obs = observations.observed("healthy-4q", tmp_path)
    checks = vrings.vrings(obs, observations.nic_named(obs, "net0"))
    assert [(c.id, c.queue) for c in checks] == [
        (kind, queue) for queue in range(8) for kind in ("nic.kick", "nic.call")
    ]
