"""check.nics from recorded observations: each tap NIC and the fds that serve it."""

from __future__ import annotations

import pathlib

import pytest

from tests.support import observations
from vhostorch.check import nics


def test_four_queue_pairs_get_four_tap_fds_and_their_vhost_fds_by_the_trace(
    tmp_path: pathlib.Path,
) -> None:
    obs = observations.observed("healthy-4q", tmp_path)
    (nic,) = nics.find(obs)
    assert (nic.name, nic.netdev.id, nic.netdev.queue_pairs) == ("net0", "n0", 4)
    assert len(nic.tap_fds) == 4 and len({fd.tap for fd in nic.tap_fds}) == 1
    assert [fd.target for fd in nic.vhost_fds] == ["/dev/vhost-net"] * 4
    assert nic.vhost_assigned_by == "VHOST_NET_SET_BACKEND (traced)"
    # Queue pair p's vhost fd was joined to queue pair p's tap fd.
    assert obs.wiring is not None
    backends = obs.wiring.backend_fds()
    assert [backends[v.num] for v in nic.vhost_fds] == [t.num for t in nic.tap_fds]


@pytest.mark.parametrize(
    ("trace", "assigned_by"),
    [
        pytest.param(True, "VHOST_NET_SET_BACKEND (traced)", id="traced"),
        # Without the trace, QEMU's fd order says the same (it opens vhost right after its tap).
        pytest.param(False, "fd order (QEMU opens each after its tap)", id="untraced"),
    ],
)
def test_the_vhost_fd_of_two_nics_goes_to_the_one_that_asked(
    trace: bool, assigned_by: str, tmp_path: pathlib.Path
) -> None:
    obs = observations.observed("second-nic-vhost-off", tmp_path, trace=trace)
    fast, slow = nics.find(obs)
    assert (fast.name, slow.name) == ("net0", "net1")
    vhost = [fd.num for fd in obs.process.fds_to("/dev/vhost-net")]
    assert [fd.num for fd in fast.vhost_fds] == vhost and len(vhost) == 1 and slow.vhost_fds == []
    assert fast.vhost_assigned_by == assigned_by
