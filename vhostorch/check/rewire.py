"""``check --rewire``: prove VMs that were already running, by pausing and resuming them
under the armed wiring trace, then checking them.

The kick/call wiring ioctls are made when vhost starts, so a VM whose guest driver
started before ``trace arm`` leaves nothing to read (nic.kick, nic.call unknown). QEMU
stops vhost when the VM stops and starts it again when it continues, re-issuing them.
QEMU facts relied on (QEMU 7.2, as Debian 12 ships it; the same code today):

- hw/virtio/virtio.c ``virtio_vmstate_change`` runs on every run-state change and calls
  the device's ``set_status``; hw/net/virtio-net.c ``virtio_net_started`` is true only
  with DRIVER_OK, the link up and ``vdev->vm_running``, so ``virtio_net_vhost_status``
  calls ``vhost_net_stop`` on ``stop`` and ``vhost_net_start`` on ``cont``;
- hw/net/vhost_net.c ``vhost_net_stop`` releases the guest notifiers
  (``set_guest_notifiers(false)``: virtio-pci's KVM_IRQFD deassign) and each queue pair's
  ``vhost_net_stop_one`` detaches the tap (VHOST_NET_SET_BACKEND fd -1), stops the device
  and disables the host notifiers (KVM_IOEVENTFD deassign); ``vhost_net_start`` does the
  reverse: ``vhost_dev_enable_notifiers`` (KVM_IOEVENTFD, on new eventfds),
  ``vhost_dev_start`` (VHOST_SET_FEATURES, VHOST_SET_MEM_TABLE, and per vring
  ``vhost_virtqueue_start``: VHOST_SET_VRING_KICK), VHOST_NET_SET_BACKEND, then
  ``set_guest_notifiers(true)`` (KVM_IRQFD per MSI-X vector, and VHOST_SET_VRING_CALL
  through ``vhost_virtqueue_mask``);
- both run inside the ``stop``/``cont`` command (``vm_stop``/``vm_start`` notify the
  run-state handlers before the reply), so once ``cont`` returned the trace holds them.

The test host proves it end to end (tests/testhost/test_rewire_testhost.py: unknown before, pass
after, the guest still pinging).

A VM is paused only when it runs (not paused, not migrating: refused, left as it is).
While it is paused, SIGINT, SIGTERM and SIGHUP are held, so the resume always happens
before they take effect. QEMU answers ``stop`` only once its block devices are drained and
flushed, so on slow storage a pause lasts seconds: the resume is then queued behind the
``stop``, tried again on new connections, and confirmed with ``query-status``, for
monitor.RESUME_WITHIN seconds. A VM still not seen running then (storage stalled for good),
or that libvirt or QEMU refuses to resume, is a ``vm.rewire`` failure that says how to
resume it, and a warning line said before the held signals act; SIGKILL can leave it
paused too (``virsh resume`` or QMP ``cont`` then).
"""

from __future__ import annotations

import os

from vhostorch import signals
from vhostorch.check import ids, observe, targets, wiring
from vhostorch.check.report import FAIL, LEFT_PAUSED, NOT_PAUSED, PASS, WARN, Check
from vhostorch.errors import (
    DomainUnavailable,
    InvalidSpec,
    LeftPaused,
    LibvirtFailed,
    MonitorError,
    OperationFailed,
    VhostorchError,
)
from vhostorch.kernel import procfs
from vhostorch.libvirt import connection
from vhostorch.qemu import args, monitor
from vhostorch.record import TYPE_CHECKING, Record

if TYPE_CHECKING:
    from collections.abc import Callable

    from vhostorch.check.report import Report

    Pause = Callable[[Callable[[], None] | None], monitor.Paused]


class Plan(Record):
    """How one QEMU is paused and resumed, or why it is not."""

    pid: int
    what: str
    pause: Pause | None
    why_not: str | None = None


def held(
    pause: Pause,
    while_paused: Callable[[], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> monitor.Paused:
    """Run ``pause`` with SIGINT, SIGTERM and SIGHUP held; they act once it returned, after
    ``warn`` was told of a VM left paused (LeftPaused), so a signal cannot hide that."""
    with signals.Held():
        try:
            return pause(while_paused)
        except LeftPaused as err:
            if warn is not None:
                warn(str(err))
            raise


def _libvirt_names(pid_dir: str = observe.PID_DIR) -> dict[int, str]:
    """QEMU pid → libvirt domain name, from libvirt's pid files (the hook's way, no libvirtd)."""
    names = {}
    try:
        entries = os.listdir(pid_dir)
    except OSError:
        return {}
    for entry in entries:
        if not entry.endswith(".pid"):
            continue
        try:
            with open(os.path.join(pid_dir, entry)) as f:
                names[int(f.read().strip())] = entry.removesuffix(".pid")
        except (OSError, ValueError):
            continue
    return names


def _by_libvirt(pid: int, name: str, uri: str) -> Plan:
    def pause(while_paused: Callable[[], None] | None) -> monitor.Paused:
        return connection.pause_resume(name, uri, while_paused)

    return Plan(pid, f"domain {name}", pause)


def _by_qmp(pid: int, path: str | None) -> Plan:
    what = f"QEMU {pid}"
    if path is None:
        return Plan(pid, what, None, "it has no QMP socket (-qmp) to pause it through")
    try:
        trusted = targets.trusted_qmp(pid, path)
    except monitor.MonitorError as err:
        return Plan(pid, what, None, str(err))

    def pause(while_paused: Callable[[], None] | None) -> monitor.Paused:
        return monitor.pause_resume(trusted, pid, while_paused)

    return Plan(pid, what, pause)


def _own(pid: int, libvirt: dict[int, str]) -> Plan:
    """A QEMU found by pid: through libvirt when it is a domain (libvirt holds its monitor
    and must see the pause), else through its own QMP socket when that is trusted."""
    halted = procfs.stopped(pid)
    if halted is not None:
        # A stopped QEMU lets its monitor's connection queue and never answers: asking it to
        # pause would wait out the whole timeout (5 s each in check --all) and do nothing.
        what = f"domain {libvirt[pid]}" if pid in libvirt else f"QEMU {pid}"
        return Plan(pid, what, None, f"it is {halted}, so its monitor cannot answer")
    if pid in libvirt:
        return _by_libvirt(pid, libvirt[pid], connection.SYSTEM_URI)
    try:
        with open(f"{procfs.PROC}/{pid}/cmdline") as f:
            path = args.parse(f.read().split("\0")).qmp
    except OSError as err:
        raise procfs.CannotInspect(f"cannot read process {pid}: {err.strerror}") from err
    return _by_qmp(pid, path)


def plans(
    *, pid: int | None, domain: str | None, qmp: str | None, every: bool, uri: str | None
) -> list[Plan]:
    """How each QEMU of the target is paused. Raises CannotInspect, DomainUnavailable."""
    if domain is not None:
        return [_by_libvirt(observe.domain_pid(domain), domain, uri or connection.SYSTEM_URI)]
    if qmp is not None:
        try:
            qemu = monitor.peer_pid(qmp)
        except monitor.MonitorError as err:
            raise procfs.CannotInspect(str(err)) from err
        return [_by_qmp(qemu, qmp)]
    libvirt = _libvirt_names()
    if pid is not None:
        if not procfs.alive(pid):
            raise procfs.CannotInspect(f"no process {pid}")
        return [_own(pid, libvirt)]
    found = []
    for qemu in procfs.qemu_pids():
        try:
            found.append(_own(qemu, libvirt))
        except procfs.CannotInspect:
            continue  # it exited while we looked
    return found


def rewire(plan: Plan, refuse: bool, warn: Callable[[str], None] | None = None) -> Check:
    """Pause and resume one QEMU (signals held); its vm.rewire verdict.

    With ``refuse``, a QEMU that cannot be paused or is not running raises
    OperationFailed (nothing done), and one whose pause failed with the guest running
    (MonitorError, LibvirtFailed, DomainUnavailable) raises that; otherwise these are
    warnings. A guest left paused (LeftPaused) is a failure that says how to resume it, and
    ``warn`` gets that in one line (``"QEMU PID left paused: ..."``) before any held signal
    acts.
    """
    if plan.pause is None:
        message = f"not paused: {plan.why_not}"
        if refuse:
            raise OperationFailed(f"check --rewire: {plan.what} cannot be paused: {plan.why_not}")
        return Check(ids.VM_REWIRE, WARN, message, {"paused": False}, cause=NOT_PAUSED)

    def said(line: str) -> None:
        if warn is not None:
            warn(f"{plan.what} {line}")

    try:
        paused = held(plan.pause, None, said)
    except LeftPaused as err:
        left = {"paused": True, "resumed": False, "resume": err.resume}
        return Check(ids.VM_REWIRE, FAIL, str(err), left, cause=LEFT_PAUSED)
    except (MonitorError, LibvirtFailed, DomainUnavailable) as err:
        if refuse:
            raise
        return Check(
            ids.VM_REWIRE, WARN, f"not rewired: {err}", {"paused": False}, cause=NOT_PAUSED
        )
    evidence: dict[str, object] = {"via": paused.via, "state": paused.state}
    if paused.ms is None:
        if refuse:
            raise OperationFailed(
                f"check --rewire: {plan.what} is {paused.state}, not running: left as it is "
                "(only a running VM is paused and resumed)"
            )
        message = f"not paused: it is {paused.state}, not running (left as it is)"
        return Check(ids.VM_REWIRE, WARN, message, {**evidence, "paused": False}, cause=NOT_PAUSED)
    evidence.update(paused=True, pause_ms=round(paused.ms, 1))
    message = (
        f"paused {paused.ms:.1f} ms and resumed ({paused.via}): QEMU stopped and restarted "
        "vhost, re-issuing its kick/call wiring under the armed trace"
    )
    if paused.trouble is not None:  # resumed all the same, but the guest waited
        evidence["trouble"] = paused.trouble
        return Check(ids.VM_REWIRE, WARN, f"{message}; {paused.trouble}", evidence)
    return Check(ids.VM_REWIRE, PASS, message, evidence)


def reports(target: targets.Target, warn: Callable[[str], None] | None = None) -> list[Report]:
    """Arm the trace, pause and resume the target's QEMUs, then check them (targets.reports),
    each report with its vm.rewire check first.

    One target (--pid, --qmp, --domain) that cannot be paused, is not running, or whose
    pause failed is refused (OperationFailed, exit 1; the trace is left as it was). With
    ``every``, such QEMUs are checked without a pause and warn, and the others are still
    paused. A VM left paused fails its vm.rewire, and ``warn`` is told at once (see
    ``rewire``). Raises what targets.reports raises, TraceUnavailable, MonitorError,
    LibvirtFailed, DomainUnavailable.
    """
    target.check_one()
    if (target.uri or target.ask_monitor) and target.domain is None:
        raise InvalidSpec("check: --connect and --monitor go with --domain")
    every = target.every
    chosen = plans(
        pid=target.pid, domain=target.domain, qmp=target.qmp, every=every, uri=target.uri
    )
    armed_here = wiring.arm()
    verdicts: dict[int, Check] = {}
    try:
        for plan in chosen:
            verdicts[plan.pid] = rewire(plan, refuse=not every, warn=warn)
    except VhostorchError:
        if armed_here and all(v.cause == NOT_PAUSED for v in verdicts.values()):
            wiring.disarm()  # nothing was paused: leave the trace as it was
        raise
    found = targets.reports(target)
    done = []
    for report in found:
        verdict = None if report.pid is None else verdicts.get(report.pid)
        if verdict is not None:
            verdict = verdict.replace(evidence={**verdict.evidence, "armed_now": armed_here})
            report = report.replace(checks=(verdict, *report.checks))
        done.append(report)
    return done
