"""Start, hot-plug and stop VMs from a VmSpec through either backend; each start ends in a check.

An operation is a list of steps, each undone when a later one fails:
decide (nothing touched yet) → taps → VM → state file. ``down`` and ``nic del``
remove only what vhostorch created: the VM it started and the taps it made.

What differs between backends (``qmp``: QEMU started here, NICs added over QMP with
fds opened here; ``libvirt``: a defined domain whose interfaces are ``type='ethernet'``
on the taps made here) is behind vhostorch.backends.contract.Backend: nothing here
asks which backend it holds.
"""

from __future__ import annotations

import os
import time

from vhostorch import backends, taps
from vhostorch.check import doctor, verify, wiring
from vhostorch.check.report import FAIL, PASS, WARN, Check, Report
from vhostorch.errors import InvalidSpec, OperationFailed, RollbackFailed, VhostorchError
from vhostorch.kernel import procfs
from vhostorch.libvirt.connection import SYSTEM_URI
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

    state: VmState
    report: Report
    waited: float
    driver_up: bool


class Host(Record):
    """What decides whether vhost can be had: doctor's checks for /dev/vhost-net and KVM."""

    vhost: tuple[str, str]  # (status, doctor's message)
    kvm: tuple[str, str]

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

    ``required`` needs /dev/vhost-net, with accel kvm a usable KVM, and what the
    backend needs (libvirt uses vhost only for type='kvm' domains; QEMU itself uses
    vhost under TCG too). ``preferred`` falls back to QEMU's data path, and says why.
    Raises OperationFailed, InvalidSpec (an unknown backend).
    """
    if accel == "kvm" and host.kvm[0] == FAIL:
        raise OperationFailed(f'accel = "kvm" but KVM is not usable: {host.kvm[1]}')
    refused = backends.get(backend).vhost_refused(accel)
    decided: list[tuple[NicSpec, bool, str | None]] = []
    for index, nic in enumerate(nics, first):
        why, detail = None, ""
        if host.vhost[0] != PASS:
            why = "this host has no usable /dev/vhost-net"
            detail = f" ({host.vhost[1]})"
        elif refused is not None:
            why = refused
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


def up(
    spec: VmSpec,
    backend: str = "qmp",
    *,
    uri: str = SYSTEM_URI,
    wait: float = WAIT_DRIVER,
    root: str = vmstate.STATE_DIR,
    host: Host | None = None,
) -> Outcome:
    """Make the taps, start the VM, wait for its guest driver to start vhost, check it.

    All or nothing: a failure at any step undoes the steps before it. Raises
    InvalidSpec, OperationFailed (RollbackFailed when undoing failed too).
    """
    runner = backends.get(backend)
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
            # Begun before the taps exist, so that starting QEMU can overlap making them.
            start = runner.begin(spec, workdir, uri)
            undo.push(start.what, start.abort)
            created = _make_taps(spec.nics, undo)
            _arm_trace()
            started = start.run(pairs)
            bare = VmState(
                spec.name, backend, started.pid, spec.accel, started.qmp, started.uri, workdir, ()
            )
            # The VM now holds the taps: it must stop before they can go.
            undo.push(start.what, lambda: runner.stop(bare))
            names = runner.nic_ids(bare, [nic.tap.name for nic, _ in pairs])
            nics = tuple(
                _nic_state(nic, on, why, ids, created)
                for (nic, on, why), ids in zip(decided, names, strict=True)
            )
            state = bare.with_nics(nics)
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
        backends.of(state).stop(state)
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
        runner = backends.of(state)
        index = len(state.nics)
        [(_, on, why)] = decide([nic], state.accel, state.backend, host or Host.probe(), index)
        undo = _Undo()
        try:
            created = _make_taps([nic], undo)
            _arm_trace()
            runner.attach(state, nic, on)
            [ids] = runner.nic_ids(state, [nic.tap.name])
            added = _nic_state(nic, on, why, ids, created)
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
        backends.of(state).detach(state, nic, timeout)
        state = state.with_nics(tuple(n for n in state.nics if n.tap != tap))
        vmstate.save(state, root)
        if nic.tap_created:
            taps.delete([tap])
        return state
