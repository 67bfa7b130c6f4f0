"""The QEMUs a check is about (a pid, a libvirt domain, a QMP socket, or all of them),
each observed with what tells most about it, and checked."""

from __future__ import annotations

from vhostorch.check import observe as inspect
from vhostorch.check import verify
from vhostorch.errors import InvalidSpec
from vhostorch.kernel import procfs
from vhostorch.libvirt import connection as virt
from vhostorch.libvirt import domxml
from vhostorch.qemu import args as qemuargs
from vhostorch.qemu import monitor
from vhostorch.record import TYPE_CHECKING
from vhostorch.vm import state as vmstate

if TYPE_CHECKING:
    from collections.abc import Callable

    from vhostorch.check.report import Report


def reports(
    *,
    pid: int | None = None,
    domain: str | None = None,
    qmp: str | None = None,
    every: bool = False,
    uri: str | None = None,
    ask_monitor: bool = False,
) -> list[Report]:
    """Check one target (exactly one of ``pid``, ``domain``, ``qmp``, ``every``).

    Raises InvalidSpec for a bad combination, procfs.CannotInspect (or
    virt.DomainUnavailable) when the target cannot be looked at.
    """
    if sum((pid is not None, domain is not None, every, qmp is not None)) != 1:
        raise InvalidSpec("check: give one of --pid, --domain, --qmp or --all")
    if uri and domain is None:
        raise InvalidSpec("check: --connect goes with --domain")
    if ask_monitor and domain is None:
        raise InvalidSpec("check: --monitor goes with --domain (--pid and --qmp use QMP directly)")
    if domain is not None:
        return [_domain(domain, uri or virt.SYSTEM_URI, ask_monitor)]
    if qmp is not None:
        try:
            qemu = monitor.peer_pid(qmp)
        except monitor.MonitorError as err:
            raise procfs.CannotInspect(str(err)) from err
        observed = inspect.observe(
            qemu, monitor=lambda: monitor.read_qmp(qmp), plan=vmstate.by_pid(qemu)
        )
        return [verify.verify(observed)]
    # A VM vhostorch started is checked against what it set up (NICs added over QMP).
    plans = {state.pid: state for state in vmstate.every()}
    if pid is not None:
        observed = inspect.observe(pid, monitor=_own_qmp(pid), plan=plans.get(pid))
        return [verify.verify(observed)]
    kthreads = procfs.vhost_kthreads()
    found = []
    for qemu in procfs.qemu_pids():
        try:
            observed = inspect.observe(
                qemu, kthreads=kthreads, monitor=_own_qmp(qemu), plan=plans.get(qemu)
            )
        except procfs.CannotInspect:
            continue  # it exited while we looked
        found.append(verify.verify(observed))
    return found


def _domain(name: str, uri: str, ask_monitor: bool) -> Report:
    domain = domxml.parse(virt.domain_xml(name, uri))
    reader = (lambda: virt.read_monitor(name, uri)) if ask_monitor else None
    pid = inspect.domain_pid(name)
    observed = inspect.observe(pid, domain=domain, monitor=reader, plan=vmstate.by_pid(pid))
    return verify.verify(observed)


def _own_qmp(qemu: int) -> Callable[[], monitor.MonitorView] | None:
    """A QEMU started with -qmp unix:PATH is asked over that socket."""
    try:
        with open(f"/proc/{qemu}/cmdline") as f:
            path = qemuargs.parse(f.read().split("\0")).qmp
    except OSError:
        return None
    if not path:
        return None
    return lambda: monitor.read_qmp(path)
