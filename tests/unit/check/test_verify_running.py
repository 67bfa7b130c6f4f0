"""check.running from recorded observations: nic.vhost.started, nic.vhost.memtable and
nic.features, from QEMU's monitor and, without it, from the wiring trace."""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

import pytest

from tests.support import observations
from tests.support.observations import says
from vhostorch.check import running
from vhostorch.check.report import PASS, UNKNOWN, WARN, Check

# Each scenario: (check, recording, what of it is seen, status, message; "..." stands for any
# text).
MONITOR, TRACE, BLIND = {}, {"monitor": False}, {"monitor": False, "trace": False}
SCENARIOS = [
    pytest.param(running.started, "healthy-4q", MONITOR, PASS, "...", id="started-monitor"),
    pytest.param(running.started, "healthy-4q", TRACE, PASS, "...", id="started-trace"),
    pytest.param(running.started, "no-guest-driver", MONITOR, WARN,
                 "the guest driver has not started the device yet...", id="started-idle-monitor"),
    pytest.param(running.started, "no-guest-driver", TRACE, WARN, "not started (yet)...",
                 id="started-idle-trace"),
    pytest.param(running.started, "healthy-1q", BLIND, UNKNOWN,
                 f"unknown: {running.NO_MONITOR}", id="started-blind"),
    pytest.param(running.memtable, "healthy-1q", MONITOR, PASS,
                 "vhost holds ... guest memory region(s)", id="memtable-monitor"),
    pytest.param(running.memtable, "healthy-4q", TRACE, PASS, "...", id="memtable-trace"),
    pytest.param(running.memtable, "no-guest-driver", MONITOR, UNKNOWN,
                 "unknown: vhost is not started, so QEMU reports no vhost device",
                 id="memtable-idle"),
    pytest.param(running.features, "healthy-1q", MONITOR, PASS, "...", id="features-monitor"),
    pytest.param(running.features, "healthy-4q", TRACE, PASS, "...", id="features-trace"),
    pytest.param(running.features, "no-guest-driver", MONITOR, UNKNOWN,
                 "unknown: vhost is not started", id="features-idle"),
]  # fmt: skip
IDS = {running.started: "nic.vhost.started", running.memtable: "nic.vhost.memtable",
       running.features: "nic.features"}  # fmt: skip


@pytest.mark.parametrize(("check_of", "name", "seen", "status", "message"), SCENARIOS)
def test_verdict(
    check_of: Callable[..., Check], name: str, seen: dict[str, Any], status: str,
    message: str, tmp_path: pathlib.Path,
) -> None:  # fmt: skip
    obs = observations.observed(name, tmp_path, **seen)
    check = check_of(obs, observations.nic_named(obs, "net0"))
    assert (check.id, check.status) == (IDS[check_of], status)
    assert says(check.message, message), check.message


def test_started_from_the_monitor_is_vhost_started_and_driver_ok(tmp_path: pathlib.Path) -> None:
    obs = observations.observed("healthy-4q", tmp_path)
    check = running.started(obs, observations.nic_named(obs, "net0"))
    assert check.evidence["vhost_started"] is True
    statuses = check.evidence["status"]
    assert isinstance(statuses, list) and "VIRTIO_CONFIG_S_DRIVER_OK" in statuses


def test_started_from_the_trace_joins_each_vring_to_its_tap_fd(tmp_path: pathlib.Path) -> None:
    traced = observations.observed("healthy-4q", tmp_path, monitor=False)
    nic = observations.nic_named(traced, "net0")
    check = running.started(traced, nic)
    assert check.evidence["source"] == "wiring trace"
    # Each vring of each vhost fd was joined to that queue pair's tap fd.
    assert check.evidence["backends"] == {
        v.num: [t.num, t.num] for v, t in zip(nic.vhost_fds, nic.tap_fds, strict=True)
    }


def test_memtable_from_the_monitor_counts_the_memory_sections(tmp_path: pathlib.Path) -> None:
    obs = observations.observed("healthy-1q", tmp_path)
    check = running.memtable(obs, observations.nic_named(obs, "net0"))
    sections = check.evidence["n-mem-sections"]
    assert isinstance(sections, int) and sections > 0
    assert check.message == f"vhost holds {sections} guest memory region(s)"


def test_memtable_from_the_trace_has_regions_per_vhost_fd(tmp_path: pathlib.Path) -> None:
    traced = observations.observed("healthy-4q", tmp_path, monitor=False)
    nic = observations.nic_named(traced, "net0")
    check = running.memtable(traced, nic)
    regions = check.evidence["regions"]
    assert isinstance(regions, dict) and set(regions) == {fd.num for fd in nic.vhost_fds}
    assert all(n and n > 0 for n in regions.values())


def test_features_from_the_monitor_include_the_header_layout(tmp_path: pathlib.Path) -> None:
    obs = observations.observed("healthy-1q", tmp_path)
    check = running.features(obs, observations.nic_named(obs, "net0"))
    acked = check.evidence["acked"]
    assert isinstance(acked, list) and set(running.HEADER_LAYOUT_FEATURES) <= set(acked)


def test_features_from_the_trace_are_one_set_for_every_queue_pair(tmp_path: pathlib.Path) -> None:
    traced = observations.observed("healthy-4q", tmp_path, monitor=False)
    check = running.features(traced, observations.nic_named(traced, "net0"))
    assert check.evidence["source"] == "wiring trace"
    # Every queue pair's vhost device was set to the same features, the header layout's among them.
    told = check.evidence["features"]
    assert isinstance(told, dict) and len(set(told.values())) == 1 and len(told) == 4
    names = check.evidence["names"]
    assert isinstance(names, list) and set(running.HEADER_LAYOUT_FEATURES) <= set(names)
