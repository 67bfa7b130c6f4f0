"""check.running from recorded observations: nic.vhost.started, nic.vhost.memtable and
nic.features, from QEMU's monitor and, without it, from the wiring trace."""

from __future__ import annotations

import pathlib

from tests.support import observations
from vhostorch.check import running
from vhostorch.check.report import PASS, UNKNOWN, WARN


def test_started(tmp_path: pathlib.Path) -> None:
    obs = observations.observed("healthy-4q", tmp_path / "a")
    check = running.started(obs, observations.nic_named(obs, "net0"))
    assert (check.id, check.status) == ("nic.vhost.started", PASS)
    assert check.evidence["vhost_started"] is True
    statuses = check.evidence["status"]
    assert isinstance(statuses, list) and "VIRTIO_CONFIG_S_DRIVER_OK" in statuses
    traced = observations.observed("healthy-4q", tmp_path / "b", monitor=False)
    nic = observations.nic_named(traced, "net0")
    check = running.started(traced, nic)
    assert check.status == PASS and check.evidence["source"] == "wiring trace"
    # Each vring of each vhost fd was joined to that queue pair's tap fd.
    assert check.evidence["backends"] == {
        v.num: [t.num, t.num] for v, t in zip(nic.vhost_fds, nic.tap_fds, strict=True)
    }
    idle = observations.observed("no-guest-driver", tmp_path / "c")
    check = running.started(idle, observations.nic_named(idle, "net0"))
    assert check.status == WARN
    assert check.message.startswith("the guest driver has not started the device yet")
    idle = observations.observed("no-guest-driver", tmp_path / "d", monitor=False)
    check = running.started(idle, observations.nic_named(idle, "net0"))
    assert check.status == WARN and check.message.startswith("not started (yet)")
    blind = observations.observed("healthy-1q", tmp_path / "e", monitor=False, trace=False)
    check = running.started(blind, observations.nic_named(blind, "net0"))
    assert (check.status, check.message) == (UNKNOWN, f"unknown: {running.NO_MONITOR}")


def test_memtable(tmp_path: pathlib.Path) -> None:
    obs = observations.observed("healthy-1q", tmp_path / "a")
    check = running.memtable(obs, observations.nic_named(obs, "net0"))
    assert (check.id, check.status) == ("nic.vhost.memtable", PASS)
    sections = check.evidence["n-mem-sections"]
    assert isinstance(sections, int) and sections > 0
    assert check.message == f"vhost holds {sections} guest memory region(s)"
    traced = observations.observed("healthy-4q", tmp_path / "b", monitor=False)
    nic = observations.nic_named(traced, "net0")
    check = running.memtable(traced, nic)
    assert check.status == PASS
    regions = check.evidence["regions"]
    assert isinstance(regions, dict) and set(regions) == {fd.num for fd in nic.vhost_fds}
    assert all(n and n > 0 for n in regions.values())
    idle = observations.observed("no-guest-driver", tmp_path / "c")
    check = running.memtable(idle, observations.nic_named(idle, "net0"))
    assert check.status == UNKNOWN
    assert check.message == "unknown: vhost is not started, so QEMU reports no vhost device"


def test_features(tmp_path: pathlib.Path) -> None:
    obs = observations.observed("healthy-1q", tmp_path / "a")
    check = running.features(obs, observations.nic_named(obs, "net0"))
    assert (check.id, check.status) == ("nic.features", PASS)
    acked = check.evidence["acked"]
    assert isinstance(acked, list) and set(running.HEADER_LAYOUT_FEATURES) <= set(acked)
    traced = observations.observed("healthy-4q", tmp_path / "b", monitor=False)
    nic = observations.nic_named(traced, "net0")
    check = running.features(traced, nic)
    assert check.status == PASS and check.evidence["source"] == "wiring trace"
    # Every queue pair's vhost device was set to the same features, the header layout's among them.
    told = check.evidence["features"]
    assert isinstance(told, dict) and len(set(told.values())) == 1 and len(told) == 4
    names = check.evidence["names"]
    assert isinstance(names, list) and set(running.HEADER_LAYOUT_FEATURES) <= set(names)
    idle = observations.observed("no-guest-driver", tmp_path / "c")
    check = running.features(idle, observations.nic_named(idle, "net0"))
    assert (check.status, check.message) == (UNKNOWN, "unknown: vhost is not started")
