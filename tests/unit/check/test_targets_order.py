"""check --all reads the monitors of the VMs vhostorch started first (issue 19, D3): the
monitors of all QEMUs share one budget (check.targets.MonitorTime), and QEMUs any user
starts must not spend it before root's own VMs are read. The reports keep pid order."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from vhostorch.check import observe, targets
from vhostorch.kernel import procfs


def test_vhostorchs_own_vms_are_observed_first_and_reported_in_pid_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    observed: list[int] = []

    def look(pid: int, **_: Any) -> Any:
        observed.append(pid)
        return SimpleNamespace(pid=pid, process=SimpleNamespace(pid=pid))  # report-like too

    monkeypatch.setattr(procfs, "qemu_pids", lambda: [10, 20, 30, 40])
    monkeypatch.setattr(procfs, "vhost_kthreads", lambda: {})
    monkeypatch.setattr(targets, "_plans", lambda: {30: SimpleNamespace(pid=30)})
    monkeypatch.setattr(observe, "observe", look)
    monkeypatch.setattr(targets, "_verified", lambda found, live: found)
    reports = targets.reports(targets.Target(every=True))
    assert observed == [30, 10, 20, 40]
    assert [r.process.pid for r in reports] == [10, 20, 30, 40]  # type: ignore[attr-defined]


def test_the_monitors_budget_is_shared_and_says_when_it_is_spent() -> None:
    budget = targets.MonitorTime(7.0)
    assert budget.read_within() == 5.0  # one read's own bound
    budget.spent = 5.5
    assert budget.read_within() == 1.5
    budget.spent, budget.asked = 6.95, 2
    with pytest.raises(targets.monitor.MonitorError) as err:
        budget.read_within()
    assert str(err.value) == (
        "QMP not asked: check --all's 7 s for reading all QEMUs' monitors are spent "
        "(2 asked before this one)"
    )


def test_a_qemu_holding_more_fds_than_a_read_takes_is_reported_unknown_not_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """procfs.TooManyFds (a process over procfs.MAX_FDS; tests/kernel/test_check_all_deadline.py
    raises it for real) is said in that QEMU's report; a QEMU that exited meanwhile
    (CannotInspect) is passed over, as before."""

    def look(pid: int, **_: Any) -> Any:
        if pid == 20:
            raise procfs.TooManyFds("process 20 holds 70000 fds, more than the 65536 ...")
        if pid == 30:
            raise procfs.CannotInspect("no process 30")
        return SimpleNamespace(pid=pid, process=SimpleNamespace(pid=pid))

    monkeypatch.setattr(procfs, "qemu_pids", lambda: [10, 20, 30])
    monkeypatch.setattr(procfs, "vhost_kthreads", lambda: {})
    monkeypatch.setattr(targets, "_plans", lambda: {})
    monkeypatch.setattr(observe, "observe", look)
    monkeypatch.setattr(targets, "_verified", lambda found, live: found)
    reports = targets.reports(targets.Target(every=True))
    assert [r.pid for r in reports] == [10, 20]  # type: ignore[attr-defined]
    [check] = reports[1].checks
    assert (check.id, check.status) == ("vm.inspect", "unknown")
    assert check.message == "unknown: process 20 holds 70000 fds, more than the 65536 ..."
