"""Start, hot-plug and stop VMs from a VmSpec through either backend; each start ends in a check.

An operation is a list of steps, each undone when a later one fails:
decide (nothing touched yet) → taps → VM → state file. ``down`` and ``nic del``
remove only what vhostorch created: the VM it started and the taps it made.

Backends: ``qmp`` (vhostorch.backends.qmp: QEMU started here, NICs added over QMP with
fds opened here) and ``libvirt`` (vhostorch.libvirt.connection: a defined domain whose
interfaces are ``type='ethernet'`` on the taps made here).
"""

from __future__ import annotations

import os
import time

from vhostorch import taps
from vhostorch.backends import qmp as qmpvm
from vhostorch.check import doctor, verify, wiring
from vhostorch.check import observe as inspect
from vhostorch.check.report import FAIL, PASS, UNKNOWN, WARN, Check, Report
from vhostorch.errors import InvalidSpec, OperationFailed, RollbackFailed, VhostorchError
from vhostorch.kernel import procfs
from vhostorch.libvirt import connection as virt
from vhostorch.libvirt import domxml
from vhostorch.qemu.monitor import MonitorError, QmpSocket, read_qmp, vhost_started
from vhostorch.record import TYPE_CHECKING, Record
from vhostorch.vm import state as vmstate
from vhostorch.vm.state import NicState, VmState

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from vhostorch.vm.spec import NicSpec, VmSpec

WAIT_DRIVER = 60.0  # seconds for the guest driver to start vhost on every NIC
UNPLUG_TIMEOUT = 30.0
# Between questions to QEMU while its guest boots; each costs the guest CPU time, which
# shows in the nested test host (a quarter-second poll cost its guest 4 s of boot).
POLL = 1.0


class Outcome(Record):
    """A VM vhostorch runs, the check made once its guest driver was up (or the wait ended)."""

    __slots__ = ("state", "report", "waited", "driver_up")
    state: VmState
    report: Report
    waited: float
    driver_up: bool

    def __init__(self, state: VmState, report: Report, waited: float, driver_up: bool) -> None:
        self._init(state=state, report=report, waited=waited, driver_up=driver_up)


class Host(Record):
    """What decides whether vhost can be had: doctor's checks for /dev/vhost-net and KVM."""

    __slots__ = ("vhost", "kvm")
    vhost: tuple[str, str]  # (status, doctor's message)
    kvm: tuple[str, str]

    def __init__(self, vhost: tuple[str, str], kvm: tuple[str, str]) -> None:
        self._init(vhost=vhost, kvm=kvm)

    @classmethod
    def probe(cls, paths: doctor.Paths | None = None) -> Host:
        paths = paths or doctor.Paths()
        checks = doctor.vhost_net_checks(paths)
        worst = next((c for c in checks if c.status != PASS), checks[0])
        kvm = doctor.kvm_check(paths)
        return cls((worst.status, worst.message), (kvm.status, kvm.message))


def decide(
    nics: Sequence[NicSpec], accel: str, backend: str, host: Host, first: int = 0
) -> list[tuple[NicSpec, bool, str | None]]:
    """Pure: for each NIC, whether QEMU gets vhost, and why not; refuses what cannot be had.

    ``required`` needs /dev/vhost-net and, with accel kvm, a usable KVM; under
    libvirt it also needs accel kvm (libvirt uses vhost only for type='kvm'
    domains). QEMU itself uses vhost under TCG too, so the qmp backend allows it.
    ``preferred`` falls back to QEMU's data path, and says why. Raises OperationFailed.
    """
    if accel == "kvm" and host.kvm[0] == FAIL:
        raise OperationFailed(f'accel = "kvm" but KVM is not usable: {host.kvm[1]}')
    decided: list[tuple[NicSpec, bool, str | None]] = []
    for index, nic in enumerate(nics, first):
        why, detail = None, ""
        if host.vhost[0] != PASS:
            why = "this host has no usable /dev/vhost-net"
            detail = f" ({host.vhost[1]})"
        elif backend == "libvirt" and accel != "kvm":
            why = "libvirt uses vhost only for type='kvm' domains, and accel is \"tcg\""
        elif accel == "kvm" and host.kvm[0] != PASS:
            why = f"KVM is not usable ({host.kvm[1]})"
        if nic.vhost == "required" and why is not None:
            raise OperationFailed(
                f'nic[{index}] ({nic.tap.name}): vhost = "required" cannot be had: {why}{detail}; '
                'nothing was started (vhost = "preferred" would start without it)'
            )
        on = nic.vhost != "off" and why is None
        decided.append((nic, on, why if nic.vhost == "preferred" and not on else None))
    return decided


class _Undo:
    """Undo steps, run last-first when a later step fails."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, Callable[[], object]]] = []

    def push(self, what: str, step: Callable[[], object]) -> None:
        self.steps.append((what, step))

    def run(self) -> list[str]:
        """Run every step; return what could not be undone (each step runs even if one fails)."""
        left = []
        for what, step in reversed(self.steps):
            try:
                step()
            except VhostorchError as err:
                left.append(f"{what} ({err})")
        self.steps = []
        return left


def _fail(err: BaseException, undo: _Undo) -> None:
    left = undo.run()
    if left:
        cause = err if isinstance(err, VhostorchError) else OperationFailed(str(err))
        raise RollbackFailed(f"{err}; and undoing failed for: {', '.join(left)}", cause, left)


def _workdir(name: str, root: str) -> str:
    return os.path.join(root, f"{name}.d")


def _arm_trace() -> None:
    """Arm the wiring trace before a guest driver starts, when this host allows it.

    It is host-wide state kept until `vhostorch trace disarm`, so that later
    checks still see how each queue was wired. Without it (no tracefs, not root)
    the check says unknown for kick and call; that is reported, not an error.
    """
    try:
        wiring.arm()
    except (OSError, VhostorchError):
        pass


def _make_taps(nics: Sequence[NicSpec], undo: _Undo) -> set[str]:
    results = taps.ensure([n.tap for n in nics], keep_existing=True)
    created = {r.name for r in results if r.action == "created"}
    if created:
        undo.push(f"taps {', '.join(sorted(created))}", lambda: taps.delete(sorted(created)))
    return created


def _libvirt_ids(name: str, uri: str, taps: Sequence[str]) -> list[tuple[str, str]]:
    """(device alias, netdev id) libvirt gave the interface on each of ``taps``."""
    given = {
        iface.target: (iface.alias, iface.netdev_id)
        for iface in domxml.parse(virt.domain_xml(name, uri)).interfaces
        if iface.target and iface.alias and iface.netdev_id
    }
    missing = [tap for tap in taps if tap not in given]
    if missing:
        raise OperationFailed(f"domain {name} has no interface on tap {missing[0]} after start")
    return [given[tap] for tap in taps]


def up(
    spec: VmSpec,
    backend: str = "qmp",
    *,
    uri: str = virt.SYSTEM_URI,
    wait: float = WAIT_DRIVER,
    root: str = vmstate.STATE_DIR,
    host: Host | None = None,
) -> Outcome:
    """Make the taps, start the VM, wait for its guest driver to start vhost, check it.

    All or nothing: a failure at any step undoes the steps before it. Raises
    InvalidSpec, OperationFailed (RollbackFailed when undoing failed too).
    """
    if backend not in vmstate.BACKENDS:
        choices = ", ".join(vmstate.BACKENDS)
        raise InvalidSpec(f"backend must be one of {choices}, not {backend!r}")
    with vmstate.Lock(spec.name, root):
        old = vmstate.load(spec.name, root)
        if old is not None:
            alive = procfs.alive(old.pid)
            raise OperationFailed(
                f"VM {spec.name} is already up (pid {old.pid}, backend {old.backend})"
                if alive
                else f"VM {spec.name} has a state file from a start whose QEMU is gone; "
                f"vhostorch down {spec.name} cleans it up"
            )
        decided = decide(spec.nics, spec.accel, backend, host or Host.probe())
        undo = _Undo()
        try:
            workdir = _workdir(spec.name, root)
            pairs = [(nic, on) for nic, on, _ in decided]
            if backend == "qmp":
                # QEMU needs no NIC to start: it builds the machine while the taps are made.
                launch = qmpvm.Launch(spec, workdir)
                undo.push("QEMU", launch.abort)
            created = _make_taps(spec.nics, undo)
            _arm_trace()
            if backend == "qmp":
                pid = qmpvm.start(launch, pairs)
                qmp = launch.qmp
                # QEMU now holds the taps: it must stop before they can go.
                undo.push("QEMU", lambda: qmpvm.stop(pid, qmp, workdir))
                names = [qmpvm.ids(nic.tap.name) for nic, _ in pairs]
                state_uri, state_qmp = None, qmp
            else:
                os.makedirs(workdir, mode=0o755, exist_ok=True)
                undo.push("work directory", lambda: _rmtree(workdir))
                xml = domxml.render(spec, pairs, qmpvm.files(workdir)[2])
                virt.define_and_start(spec.name, xml, uri)
                undo.push(f"domain {spec.name}", lambda: virt.destroy_and_undefine(spec.name, uri))
                pid = inspect.domain_pid(spec.name)
                names = _libvirt_ids(spec.name, uri, [nic.tap.name for nic, _ in pairs])
                state_uri, state_qmp = uri, None
            nics = tuple(
                _nic_state(nic, on, why, ids, created)
                for (nic, on, why), ids in zip(decided, names, strict=True)
            )
            state = VmState(
                spec.name, backend, pid, spec.accel, state_qmp, state_uri, workdir, nics
            )
            vmstate.save(state, root)
            undo.push("state file", lambda: vmstate.remove(spec.name, root))
            outcome = _wait_for_vhost(state, wait)
        except BaseException as err:
            _fail(err, undo)
            raise
        return outcome


def _nic_state(
    nic: NicSpec, on: bool, why: str | None, ids: tuple[str, str], created: set[str]
) -> NicState:
    device, netdev = ids
    return NicState(
        nic.tap.name, device, netdev, nic.queues, nic.mac, nic.vhost, on, why,
        nic.tap.name in created,
    )  # fmt: skip


def _rmtree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def check(state: VmState) -> Report:
    """The check of a VM vhostorch started, with what it set up as the expectation.

    The QMP backend's monitor is asked over its socket; a libvirt domain's is not
    (that would mark it tainted): the wiring trace tells when its vhost started.
    """
    if state.backend == "qmp" and state.qmp:
        qmp = state.qmp
        observed = inspect.observe(state.pid, monitor=lambda: read_qmp(qmp), plan=state)
    else:
        domain = domxml.parse(virt.domain_xml(state.name, state.uri or virt.SYSTEM_URI))
        observed = inspect.observe(state.pid, domain=domain, plan=state)
    return verify.verify(observed)


def _settled(report: Report, state: VmState) -> bool:
    """Every vhost NIC's started check has a final answer.

    QEMU's monitor (the qmp backend) says "not yet" (warn) until the guest driver
    is up, so its fail and unknown are final. A libvirt domain is seen through
    the wiring trace, where a vring not yet joined looks the same as one that
    never will be: only a pass ends the wait early (or a trace that is not armed).
    """
    final = (PASS, FAIL, UNKNOWN) if state.backend == "qmp" else (PASS,)
    if state.backend != "qmp" and not wiring.armed():
        final = (PASS, FAIL, UNKNOWN)
    for nic in state.nics:
        if not nic.vhost_on:
            continue
        started = [c for c in report.checks if c.id == "nic.vhost.started" and c.nic == nic.device]
        if started and started[0].status not in final:
            return False
        if any(_masked(c) for c in report.checks if c.nic == nic.device):
            return False  # a vector the guest masks for a moment (an IRQ move) comes back
    return True


def _masked(check: Check) -> bool:
    return check.id == "nic.call" and check.status == WARN and bool(check.evidence.get("masked"))


def _wait_for_vhost(state: VmState, timeout: float) -> Outcome:
    """Wait until every NIC's guest driver has started vhost, or ``timeout`` runs out; check.

    The guest is booting meanwhile, so the wait must cost it little CPU: with QMP,
    one question per NIC every POLL seconds over one connection (in the test host a
    new connection per question cost 125 ms of its CPU, a kept one 9 ms; a question
    that fails or times out is asked again next time, on a new connection), and the
    full check once at the end; a libvirt domain is checked (through the trace) as often.
    """
    begin = time.monotonic()
    waiting = [n.device for n in state.nics if n.vhost_on]
    asking = bool(waiting) and state.backend == "qmp" and state.qmp is not None
    sock: QmpSocket | None = None
    try:
        while True:
            if not procfs.alive(state.pid):
                raise OperationFailed(f"QEMU (pid {state.pid}) exited while its guest was starting")
            waited = time.monotonic() - begin
            if asking and waiting and waited < timeout:
                sock, waiting = _ask_started(state, sock, waiting)
                if waiting:
                    time.sleep(POLL)
                    continue
            if sock is not None:
                sock.close()  # before the check, which asks QEMU itself
                sock = None
            report = _checked(state)
            settled = _settled(report, state)
            if settled or waited >= timeout:
                return Outcome(state, report, waited, settled)
            time.sleep(POLL)
    finally:
        if sock is not None:
            sock.close()


def _ask_started(
    state: VmState, sock: QmpSocket | None, devices: list[str]
) -> tuple[QmpSocket | None, list[str]]:
    """The devices whose vhost has not started yet, and the connection to ask again on."""
    assert state.qmp is not None
    try:
        if sock is None:
            fresh = QmpSocket(state.qmp, qmpvm.QMP_TIMEOUT)
            fresh.open()  # closes itself when it fails
            sock = fresh
        return sock, [d for d in devices if not vhost_started(sock.execute, d)]
    except MonitorError:
        if sock is not None:
            sock.close()
        return None, devices  # asked again next time; the final check reports what it finds


def _checked(state: VmState) -> Report:
    try:
        return check(state)
    except procfs.CannotInspect as err:
        raise OperationFailed(f"QEMU (pid {state.pid}) cannot be checked: {err}") from None


def _running(name: str, root: str) -> VmState:
    state = vmstate.load(name, root)
    if state is None:
        raise OperationFailed(f"vhostorch has not started a VM named {name!r}")
    return state


def down(name: str, *, root: str = vmstate.STATE_DIR) -> VmState:
    """Stop VM ``name`` and remove what vhostorch created for it: the VM, its taps, its state.

    A VM whose QEMU is already gone is cleaned up too. Raises OperationFailed.
    """
    with vmstate.Lock(name, root):
        state = _running(name, root)
        if state.backend == "qmp" and state.qmp:
            qmpvm.stop(state.pid, state.qmp, state.workdir)
        else:
            virt.destroy_and_undefine(name, state.uri or virt.SYSTEM_URI)
            _rmtree(state.workdir)
        created = [n.tap for n in state.nics if n.tap_created]
        if created:
            taps.delete(created)
        vmstate.remove(name, root)
    return state


def nic_add(
    name: str,
    nic: NicSpec,
    *,
    wait: float = WAIT_DRIVER,
    root: str = vmstate.STATE_DIR,
    host: Host | None = None,
) -> Outcome:
    """Hot-plug ``nic`` into running VM ``name`` (its tap made here), then check. All or nothing."""
    with vmstate.Lock(name, root):
        state = _running(name, root)
        if not procfs.alive(state.pid):
            raise OperationFailed(f"VM {name} is not running (its QEMU, pid {state.pid}, is gone)")
        if state.nic(nic.tap.name) is not None:
            raise InvalidSpec(f"VM {name} has a NIC on tap {nic.tap.name} already")
        if any(n.mac == nic.mac for n in state.nics):
            raise InvalidSpec(f"VM {name} has a NIC with MAC {nic.mac} already")
        index = len(state.nics)
        [(_, on, why)] = decide([nic], state.accel, state.backend, host or Host.probe(), index)
        undo = _Undo()
        try:
            created = _make_taps([nic], undo)
            _arm_trace()
            if state.backend == "qmp" and state.qmp:
                qmpvm.attach(state.qmp, nic, on)
                device, netdev = qmpvm.ids(nic.tap.name)
            else:
                uri = state.uri or virt.SYSTEM_URI
                virt.attach(name, domxml.interface_xml(nic, on), uri)
                [(device, netdev)] = _libvirt_ids(name, uri, [nic.tap.name])
            added = _nic_state(nic, on, why, (device, netdev), created)
            state = state.with_nics((*state.nics, added))
            vmstate.save(state, root)
        except BaseException as err:
            _fail(err, undo)
            raise
        return _wait_for_vhost(state, wait)


def nic_del(
    name: str, tap: str, *, timeout: float = UNPLUG_TIMEOUT, root: str = vmstate.STATE_DIR
) -> VmState:
    """Unplug the NIC on ``tap`` from VM ``name`` and delete the tap if vhostorch made it."""
    with vmstate.Lock(name, root):
        state = _running(name, root)
        nic = state.nic(tap)
        if nic is None:
            raise InvalidSpec(f"VM {name} has no NIC on tap {tap}")
        if state.backend == "qmp" and state.qmp:
            qmpvm.detach(state.qmp, tap, timeout)
        else:

            def gone(xml: str) -> bool:
                return all(i.target != tap for i in domxml.parse(xml).interfaces)

            uri = state.uri or virt.SYSTEM_URI
            virt.detach(name, domxml.interface_ref(nic.mac), gone, timeout, uri)
        state = state.with_nics(tuple(n for n in state.nics if n.tap != tap))
        vmstate.save(state, root)
        if nic.tap_created:
            taps.delete([tap])
        return state
