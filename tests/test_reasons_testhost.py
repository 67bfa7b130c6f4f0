"""Why vhost is not (fully) used, and the OpenMetrics output, in the test host: real
/dev/vhost-net, real KVM, real vhost workers.

Reproduced here: MSI-X not in use (the guest booted with pci=nomsi, or a device
with vectors=0): vhost then runs but every interrupt goes through QEMU. Not
reproduced yet: QEMU falling back (a device with ioeventfd=off still left no
reason) and kernel_irqchip=off (QEMU 7.2 aborted under the nested KVM).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from tests import guests
from tests.kernel import vhostorch
from vhostorch.check import wiring

pytestmark = pytest.mark.testhost


@pytest.fixture(scope="module")
def traced(in_testhost: None) -> Iterator[None]:
    """The wiring trace, armed before any guest of this module starts its driver."""
    was_armed = wiring.armed()
    wiring.arm()
    yield
    if not was_armed:
        wiring.disarm()


def report_of(pid: int) -> dict[str, Any]:
    done = vhostorch("check", "--pid", str(pid), "--json")
    assert done.stdout, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def reason_of(pid: int, nic: str = "net0") -> dict[str, Any] | None:
    reasons = {n["name"]: n["reason"] for n in report_of(pid)["nics"]}
    return reasons[nic]


def test_healthy_vhost_has_no_reason_and_metrics_count_worker_cpu(traced: None) -> None:
    with guests.tap(2) as name, guests.guest(guests.vhost_netdev(name, 2)) as g:
        g.wait_for(r"VHOSTORCH-GUEST: nic eth0 up", timeout=30)
        report = report_of(g.pid)
        (nic,) = report["nics"]
        assert nic["reason"] is None
        # One worker per queue pair, each a vhost-<pid> thread with its CPU time.
        assert [w["queue_pair"] for w in nic["workers"]] == [0, 1]
        assert sorted(w["tid"] for w in nic["workers"]) == guests.vhost_workers(g.pid)
        # Each worker's own CPU time: together less than QEMU's whole (on >= 6.4 a worker is
        # a thread of QEMU, whose /proc/TID/stat would give the thread group's total).
        with open(f"/proc/{g.pid}/stat") as f:
            utime, stime = f.read().rsplit(")", 1)[1].split()[11:13]
        group = (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK")
        assert sum(w["cpu_seconds"] for w in nic["workers"]) < group, (nic["workers"], group)
        done = vhostorch("check", "--all", "--format", "openmetrics")
        families = {f.name: f for f in text_string_to_metric_families(done.stdout)}
        cpu = [
            s
            for s in families["vhostorch_vhost_worker_cpu_seconds"].samples
            if s.labels["pid"] == str(g.pid)
        ]
        assert families["vhostorch_vhost_worker_cpu_seconds"].type == "counter"
        assert sorted(s.labels["queue_pair"] for s in cpu) == ["0", "1"]
        assert all(s.name.endswith("_total") and s.value >= 0 for s in cpu)
        assert not [
            s
            for s in families["vhostorch_nic_vhost_reason"].samples
            if s.labels["pid"] == str(g.pid)
        ]
        mine = [
            s
            for s in families["vhostorch_check_status"].samples
            if s.labels["pid"] == str(g.pid) and s.value == 1
        ]
        assert {s.labels["check"] for s in mine} >= {"nic.vhost.fds", "nic.kick", "nic.call"}
        # Traffic makes the workers work: their counters only grow.
        before = {w["tid"]: w["cpu_seconds"] for w in nic["workers"]}
        time.sleep(1)
        after = {w["tid"]: w["cpu_seconds"] for w in report_of(g.pid)["nics"][0]["workers"]}
        assert all(after[t] >= before[t] for t in before)


@pytest.mark.parametrize(
    ("append", "vectors"), [("pci=nomsi", None), ("", 0)], ids=["guest-nomsi", "vectors-0"]
)
def test_without_msix_every_interrupt_goes_through_qemu(
    traced: None, append: str, vectors: int | None
) -> None:
    with guests.tap(1) as name:
        netdev, device = guests.vhost_netdev(name, 1)[1::2]
        if vectors is not None:
            device += f",vectors={vectors}"
        with guests.guest(["-netdev", netdev, "-device", device], append=append) as g:
            g.wait_for(r"VHOSTORCH-GUEST: nic eth0 up", timeout=30)
            report = report_of(g.pid)
            why = report["nics"][0]["reason"]
            assert why is not None and why["code"] == "no-msix", why
            calls = [c for c in report["checks"] if c["id"] == "nic.call"]
            assert calls and {c["status"] for c in calls} == {"fail"}
            if vectors == 0:
                assert why["evidence"] == {"vectors": 0}
            else:
                assert why["evidence"]["queues"] == [0, 1]
