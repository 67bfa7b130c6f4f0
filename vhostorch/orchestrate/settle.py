"""Waiting for a started VM's guest driver to start vhost on every NIC, then its check.

A guest boots while it is waited for, so the wait costs it as little CPU as it can (what
each backend can ask QEMU is behind backends.contract.Backend.ask).
"""

from __future__ import annotations

import time

from vhostorch import backends
from vhostorch.check import verify
from vhostorch.check.ids import CALL, VHOST_STARTED
from vhostorch.check.report import MASKED, Check, Report
from vhostorch.errors import OperationFailed
from vhostorch.kernel import procfs
from vhostorch.record import TYPE_CHECKING, Record
from vhostorch.vm.state import VmState

if TYPE_CHECKING:
    from vhostorch.backends.contract import Backend

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


def check(state: VmState, backend: Backend | None = None) -> Report:
    """The check of a VM vhostorch started, with what it set up as the expectation,
    observed as its backend (``backend``, else a new one) observes it. Raises
    procfs.CannotInspect, OperationFailed."""
    return verify.verify((backend or backends.of(state)).observe(state))


def _settled(report: Report, state: VmState, backend: Backend | None = None) -> bool:
    """Every vhost NIC's started check has a final answer (which answers are final is the
    backend's to say: QEMU's monitor says "not yet", the wiring trace cannot)."""
    final = (backend or backends.of(state)).describe().final_started
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


def wait_for_vhost(state: VmState, timeout: float, backend: Backend | None = None) -> Outcome:
    """Wait until every NIC's guest driver has started vhost, or ``timeout`` runs out; check.

    The guest is booting meanwhile, so the wait must cost it little CPU: where the
    backend can ask QEMU itself (QMP), one question per NIC every POLL seconds (in the
    test host a new connection per question cost 125 ms of its CPU, a kept one 9 ms),
    and the full check once at the end; otherwise (libvirt, through the trace) the
    check as often. ``backend`` is the VM's (None: a new one).
    """
    backend = backend or backends.of(state)
    begin = time.monotonic()
    waiting: list[str] | None = [n.device for n in state.nics if n.vhost_on]
    try:
        while True:
            if not procfs.alive(state.pid):
                raise OperationFailed(f"QEMU (pid {state.pid}) exited while its guest was starting")
            waited = time.monotonic() - begin
            if waiting and waited < timeout:
                waiting = backend.ask(state, waiting)  # None: it cannot ask
                if waiting:
                    time.sleep(POLL)
                    continue
            backend.ask(state, ())  # done asking, before the check, which asks QEMU itself
            report = _checked(state, backend)
            settled = _settled(report, state, backend)
            if settled or waited >= timeout:
                return Outcome(state, report, waited, settled)
            time.sleep(POLL)
    finally:
        backend.ask(state, ())


def _checked(state: VmState, backend: Backend) -> Report:
    try:
        return check(state, backend)
    except procfs.CannotInspect as err:
        raise OperationFailed(f"QEMU (pid {state.pid}) cannot be checked: {err}") from None
