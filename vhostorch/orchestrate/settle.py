"""Waiting for a started VM's guest driver to start vhost on every NIC, then its check.

A guest boots while it is waited for, so the wait costs it as little CPU as it can (what
each backend can ask QEMU is behind backends.contract.Asker).
"""

from __future__ import annotations

import time

from vhostorch import backends
from vhostorch.check import verify
from vhostorch.check.ids import CALL, VHOST_STARTED
from vhostorch.check.report import MASKED, Check, Report
from vhostorch.errors import OperationFailed
from vhostorch.kernel import procfs
from vhostorch.record import Record
from vhostorch.vm.state import VmState

WAIT_DRIVER = 60.0  # seconds for the guest driver to start vhost on every NIC
# Between questions to QEMU while its guest boots; each costs the guest CPU time, which
# shows in the nested test host (a quarter-second poll cost its guest 4 s of boot).
POLL = 1.0


class Outcome(Record):
    """A VM vhostorch runs, the check made once its guest driver was up (or the wait ended)."""

    state: VmState
    report: Report
    waited: float
    driver_up: bool


def check(state: VmState) -> Report:
    """The check of a VM vhostorch started, with what it set up as the expectation,
    observed as its backend observes it. Raises procfs.CannotInspect, OperationFailed."""
    return verify.verify(backends.of(state).observe(state))


def _settled(report: Report, state: VmState) -> bool:
    """Every vhost NIC's started check has a final answer (which answers are final is the
    backend's to say: QEMU's monitor says "not yet", the wiring trace cannot)."""
    final = backends.of(state).final_started()
    for nic in state.nics:
        if not nic.vhost_on:
            continue
        started = [c for c in report.checks if c.id == VHOST_STARTED and c.nic == nic.device]
        if started and started[0].status not in final:
            return False
        if any(_masked(c) for c in report.checks if c.nic == nic.device):
            return False  # a vector the guest masks for a moment (an IRQ move) comes back
    return True


def _masked(check: Check) -> bool:
    return check.id == CALL and check.cause == MASKED


def wait_for_vhost(state: VmState, timeout: float) -> Outcome:
    """Wait until every NIC's guest driver has started vhost, or ``timeout`` runs out; check.

    The guest is booting meanwhile, so the wait must cost it little CPU: where the
    backend can ask QEMU itself (QMP), one question per NIC every POLL seconds (in the
    test host a new connection per question cost 125 ms of its CPU, a kept one 9 ms),
    and the full check once at the end; otherwise (libvirt, through the trace) the
    check as often.
    """
    begin = time.monotonic()
    waiting = [n.device for n in state.nics if n.vhost_on]
    asker = backends.of(state).asker(state) if waiting else None
    try:
        while True:
            if not procfs.alive(state.pid):
                raise OperationFailed(f"QEMU (pid {state.pid}) exited while its guest was starting")
            waited = time.monotonic() - begin
            if asker is not None and waiting and waited < timeout:
                waiting = asker.waiting(waiting)
                if waiting:
                    time.sleep(POLL)
                    continue
            if asker is not None:
                asker.close()  # before the check, which asks QEMU itself
            report = _checked(state)
            settled = _settled(report, state)
            if settled or waited >= timeout:
                return Outcome(state, report, waited, settled)
            time.sleep(POLL)
    finally:
        if asker is not None:
            asker.close()


def _checked(state: VmState) -> Report:
    try:
        return check(state)
    except procfs.CannotInspect as err:
        raise OperationFailed(f"QEMU (pid {state.pid}) cannot be checked: {err}") from None
