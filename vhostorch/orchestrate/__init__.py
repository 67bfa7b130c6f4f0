"""Start, hot-plug and stop VMs from a VmSpec through either backend; each start ends in a check.

An operation is a list of steps, each undone when a later one fails, or when the
command is interrupted (SIGINT, SIGTERM, SIGHUP): decide (nothing touched yet) →
state file ("starting") → tap claims → VM → taps → state file ("running"). Each
step is written to the state file before it is taken, so that a start that could not
undo itself (SIGKILL, power cut) is undone by ``down`` or the next ``up``, exactly:
its claims, the taps it was making, its QEMU (pid and start time, or its QMP socket's server).
``nic add`` and ``nic del`` work the same way (what they will claim, make, plug and
delete is recorded first; a signal undoes ``nic add``), and what one killed outright
left is finished by the next ``nic`` command or by ``down``.
``down`` and ``nic del`` remove only what vhostorch created: the VM it started and
the taps it made, and only the work directory under the state directory. A tap is
known as made here by the tag of its VM in its interface alias (taps.mark), never by
its name alone: a device someone made under that name since is left alone, and said.

What differs between backends (``qmp``: QEMU started here, NICs added over QMP with
fds opened here; ``libvirt``: a defined domain whose interfaces are ``type='ethernet'``
on the taps made here) is behind vhostorch.backends.contract.Backend: nothing here
asks which backend it holds. Before a start, ``decision`` says which NICs get vhost;
after it, ``settle`` waits for the guest driver and checks.
"""

from __future__ import annotations

import os

from vhostorch import backends, claims, pins, signals, taps, vm
from vhostorch.check import wiring
from vhostorch.errors import InvalidSpec, OperationFailed, RollbackFailed, VhostorchError
from vhostorch.kernel import procfs
from vhostorch.kernel.cpus import parse_list
from vhostorch.orchestrate import pinning
from vhostorch.orchestrate.decision import Host, decide
from vhostorch.orchestrate.settle import WAIT_DRIVER, Outcome, check, wait_for_vhost
from vhostorch.record import TYPE_CHECKING, Record
from vhostorch.vm.spec import accel_of
from vhostorch.vm.state import RUNNING, STARTING, NicState, VmState

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from vhostorch.backends.contract import Backend, Begun
    from vhostorch.orchestrate.decision import Decided
    from vhostorch.vm.spec import BackendName, NicSpec, VmSpec

    Step = tuple[str | Callable[[], str], Callable[[], object], Callable[[], object] | None]

UNPLUG_TIMEOUT = 30.0


class _Undo:
    """Undo steps, run last-first when a later step fails."""

    def __init__(self) -> None:
        self.steps: list[tuple[str | Callable[[], str], Callable[[], object]]] = []

    def push(self, what: str | Callable[[], str], step: Callable[[], object]) -> None:
        """Add ``step``; ``what`` names it (a callable: named when it fails, as it is then)."""
        self.steps.append((what, step))

    def run(self, stop: bool = False) -> list[str]:
        """Run every step; return what could not be undone. Each step runs even if one
        fails, unless ``stop``: then the first that fails ends the run (the steps before
        it in the list are left to the record)."""
        left = []
        for what, step in reversed(self.steps):
            try:
                step()
            except VhostorchError as err:
                left.append(f"{what if isinstance(what, str) else what()} ({err})")
                if stop:
                    break
        self.steps = []
        return left


def _fail(err: BaseException, undo: _Undo, *, stop: bool = False) -> None:
    left = undo.run(stop)
    if left:
        cause = err if isinstance(err, VhostorchError) else OperationFailed(str(err))
        raise RollbackFailed(f"{err}; and undoing failed for: {', '.join(left)}", cause, left)


def _workdir(name: str, root: str) -> str:
    return os.path.join(root, f"{name}.d")


def _safe(state: VmState, name: str, root: str) -> VmState:
    """``state`` with the work directory vhostorch gives VM ``name`` under ``root``, never
    the one the file names: a forged state file must not make root remove anything else
    (the backend finds its files, QEMU's QMP socket among them, in that directory alone).
    Raises OperationFailed when they differ or lead elsewhere."""
    workdir = _workdir(name, root)
    real = os.path.realpath(workdir)
    if (
        state.workdir != workdir
        or os.path.islink(workdir)
        or os.path.dirname(real) != os.path.realpath(root)
    ):
        raise OperationFailed(
            f"state of VM {name}: work directory {state.workdir!r} is not {workdir} (or leads "
            "elsewhere); refusing to touch it"
        )
    return state.replace(name=name, workdir=workdir)


class Removed(Record):
    """What `down` did: the VM's last state, the taps it deleted, and those it left alone
    because the device of that name is no longer the one vhostorch made (``replaced``)."""

    state: VmState
    deleted: tuple[str, ...]
    replaced: tuple[str, ...]


def _releaser(tap: str, holder: str) -> Callable[[], None]:
    return lambda: claims.release(tap, holder)


def _deleter(state: VmState, making: Sequence[str]) -> Callable[[], object]:
    return lambda: _delete_made(state, making)


def _exists(tap: str) -> bool:
    return os.path.exists(f"/sys/class/net/{tap}")


def _alias(state: VmState) -> str:
    """The alias of the taps made for ``state``'s VM (a file from before tags: the plain
    one, so that only a tap still carrying vhostorch's alias is taken for one of them)."""
    return taps.MANAGED_ALIAS if state.tag is None else taps.mark(state.tag)


def _delete_made(state: VmState, names: Sequence[str]) -> tuple[list[str], list[str]]:
    """Delete those of ``names`` (taps made for ``state``'s VM) that are still the device
    made then: its mark is on them, so they are ours even when a kill cut the making
    short. Returns (deleted, replaced: a device of that name that is not ours, left alone)."""
    present = sorted(t for t in set(names) if _exists(t))
    if not present:
        return [], []
    results = taps.delete(present, marks=dict.fromkeys(present, _alias(state)))
    return (
        [r.name for r in results if r.action == "deleted"],
        [r.name for r in results if r.action == "replaced"],
    )


def _made(state: VmState) -> list[str]:
    """The taps ``state`` says were made (or being made) for its VM."""
    made = [*state.making, *(n.tap for n in state.nics if n.tap_created)]
    if state.plugging is not None and state.plugging.tap_created:
        made.append(state.plugging.tap)
    return made


def _release_all(state: VmState) -> None:
    holder = claims.up_holder(state.name)
    for tap in {*state.claimed, *(n.tap for n in state.nics)}:
        claims.release(tap, holder)


def _recover(state: VmState, root: str) -> Removed:
    """Undo what a start that died (SIGKILL, power cut) made, as its state file lists it
    (its backend finds the VM it was starting from what the state recorded)."""
    backends.of(state).stop(state)
    deleted, replaced = _delete_made(state, _made(state))
    _release_all(state)
    vm.state.remove(state.name, root)
    return Removed(state, tuple(deleted), tuple(replaced))


def _finish_hotplug(state: VmState, root: str) -> VmState:
    """Finish what a ``nic add`` or ``nic del`` killed outright (SIGKILL) left, as the
    state records it: unplug the NIC being added, delete the taps being made or deleted,
    give back the claims no NIC uses. Returns the state as it is then."""
    spare = [t for t in state.claimed if state.nic(t) is None]
    if state.plugging is None and not state.making and not spare:
        return state
    if state.plugging is not None and procfs.alive(state.pid):
        try:
            backends.of(state).unplug(state, state.plugging, UNPLUG_TIMEOUT)
        except OperationFailed as err:
            raise OperationFailed(
                f"VM {state.name}: a nic add of tap {state.plugging.tap} was cut short and its "
                f"NIC cannot be unplugged: {err}; vhostorch down {state.name} removes it"
            ) from err
    _delete_made(state, _made(state.replace(nics=())))
    holder = claims.up_holder(state.name)
    for tap in spare:
        claims.release(tap, holder)
    state = state.replace(
        plugging=None, making=(), claimed=tuple(t for t in state.claimed if t not in spare)
    )
    vm.state.save(state, root)
    return state


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


def _make_taps(nics: Sequence[NicSpec], state: VmState) -> set[str]:
    """Make the taps of ``nics`` with ``state``'s mark; the names of those made."""
    results = taps.ensure([n.tap for n in nics], keep_existing=True, alias=_alias(state))
    return {r.name for r in results if r.action == "created"}


def up(
    spec: VmSpec,
    backend: BackendName = "qmp",
    *,
    uri: str | None = None,
    wait: float = WAIT_DRIVER,
    root: str = vm.state.STATE_DIR,
    host: Host | None = None,
    user: str | None = None,
    warn: Callable[[str], object] | None = None,
) -> Outcome:
    """Make the taps, start the VM, wait for its guest driver to start vhost, check it.

    All or nothing: a failure or an interrupting signal at any step undoes the steps
    before it (_Up lists them). ``uri`` is a libvirt URI (None: the system's), ``user``
    who QEMU runs as where the backend decides it (None: libvirt's QEMU user; "root"
    keeps root); ``warn`` is told when QEMU is to run as root.
    Raises InvalidSpec, OperationFailed (RollbackFailed when undoing failed too,
    errors.Claimed when another VM or domain holds a tap), errors.Interrupted.
    """
    runner = backends.get(backend)
    with signals.RollBack(), vm.state.Lock(spec.name, root):
        old = vm.state.load(spec.name, root)
        if old is not None and old.status == STARTING:
            # We hold the lock, which its `up` held throughout: that `up` is dead.
            _recover(_safe(old, spec.name, root), root)
        elif old is not None:
            alive = procfs.alive(old.pid)
            raise OperationFailed(
                f"VM {spec.name} is already up (pid {old.pid}, backend {old.backend})"
                if alive
                else f"VM {spec.name} has a state file from a start whose QEMU is gone; "
                f"vhostorch down {spec.name} cleans it up"
            )
        if spec.worker_cpus is not None:  # before anything starts, as the spec's other checks
            pinning.online(parse_list(spec.worker_cpus), "worker_cpus")
        decided = decide(spec.nics, spec.accel, backend, host or Host.probe())
        start = _Up(spec, backends.name_of(backend), runner, decided, root)
        _take(start.steps(uri, user, warn, wait))
        assert start.outcome is not None  # the last step's
        return start.outcome


def _take(steps: Sequence[Step], *, stop: bool = False) -> None:
    """Take ``steps`` ((what, do, undo)) in order; on a failure or an interrupting signal,
    undo those begun, last first (``stop``: _Undo.run). A step's undo is registered before
    it is taken, so that one cut short is undone too: each undo copes with a step that did
    part of its work, or none."""
    undo = _Undo()
    try:
        for what, do, undone in steps:
            if undone is not None:
                undo.push(what, undone)
            do()
    except BaseException as err:
        _fail(err, undo, stop=stop)
        raise


class _Up:
    """The steps of ``up``, and what they share. Each is written to the state file before
    it is taken (``making``, the QEMU's pid or the domain's UUID), so that a start killed
    outright is undone by ``down`` or the next ``up`` (_recover)."""

    def __init__(
        self, spec: VmSpec, name: BackendName, runner: Backend, decided: Decided, root: str
    ) -> None:
        self.spec, self.runner, self.decided, self.root = spec, runner, decided, root
        self.names = tuple(n.tap.name for n in spec.nics)
        self.holder = claims.up_holder(spec.name)
        self.recorded = False
        self.claimed: list[str] = []
        self.begun: Begun | None = None
        self.stopping = False
        self.making: tuple[str, ...] = ()
        self.made: set[str] = set()
        self.outcome: Outcome | None = None
        self.state = VmState(
            spec.name, name, 0, spec.accel, None, None, _workdir(spec.name, root), (),
            status=STARTING, launched_after=procfs.boot_ticks() - 1, claimed=self.names,
            tag=taps.new_tag(),
        )  # fmt: skip

    def steps(
        self, uri: str | None, user: str | None, warn: Callable[[str], object] | None, wait: float
    ) -> list[Step]:
        """(what, do, undo) of each step, in order: the VM is begun before its taps are
        made, so that starting QEMU overlaps making them, and stopped before they go."""
        return [
            ("state file", self._record, self._unrecord),
            ("tap claims", self._claim, self._release),
            (self._vm, lambda: self._begin(uri, user, warn), self._stop),
            (self._taps, self._make_taps, lambda: _delete_made(self.state, self.making)),
            (self._vm, self._run, self._stop),  # the VM then holds the taps
            ("state file", self._record_running, None),
            ("vhost worker pin", self._pin, self._unpin),
            ("wait", lambda: self._wait(wait), None),
        ]

    def _pin(self) -> None:
        """The spec's worker_cpus, applied to the vhost-net workers QEMU has now (they start
        with its netdevs) and recorded, so `nic add` and `pin --reapply` apply it again."""
        if self.spec.worker_cpus is None or not any(n.vhost_on for n in self.state.nics):
            return
        wanted = parse_list(self.spec.worker_cpus)
        pinning.apply(self.state.pid, wanted, "spec", self.spec.name, what="worker_cpus")

    def _unpin(self) -> None:
        pins.forget(self.state.pid)

    def _vm(self) -> str:
        return "VM" if self.begun is None else self.begun.what

    def _taps(self) -> str:
        return f"taps {', '.join(sorted(self.making))}"

    def _record(self) -> None:
        vm.state.save(self.state, self.root)
        self.recorded = True

    def _unrecord(self) -> None:
        if self.recorded:  # none made: the run directory may be what failed
            vm.state.remove(self.spec.name, self.root)

    def _claim(self) -> None:
        for tap in self.names:
            claims.claim(tap, self.holder)
            self.claimed.append(tap)

    def _release(self) -> None:
        failed = []
        for tap in reversed(self.claimed):
            try:
                claims.release(tap, self.holder)
            except VhostorchError as err:
                failed.append(f"claim on tap {tap}: {err}")
        if failed:
            raise OperationFailed("; ".join(failed))

    def _begin(
        self, uri: str | None, user: str | None, warn: Callable[[str], object] | None
    ) -> None:
        # Held: a signal inside begin (in Popen, say) would leave a QEMU nothing undoes.
        with signals.Held():
            begun = self.runner.begin(self.spec, self.state.workdir, uri, user)
            self.begun = begun
        self.state = self.state.replace(
            pid=begun.pid, start_time=begun.start_time, vm_id=begun.vm_id, uri=begun.uri
        )
        vm.state.save(self.state, self.root)
        if begun.runs_as == "root" and warn is not None:
            warn("QEMU runs as root: no unprivileged QEMU user here (--user names one)")

    def _stop(self) -> None:
        # Once: the VM is stopped before its taps go, and a stop that failed is said once.
        if self.begun is not None and not self.stopping:
            self.stopping = True
            self.runner.stop(self.state)

    def _make_taps(self) -> None:
        """The taps, made with the VM's mark; those absent (``making``) are recorded first,
        and deleted by the undo even when the making is interrupted."""
        self.making = tuple(t for t in self.names if not _exists(t))
        self.state = self.state.replace(making=self.making)
        vm.state.save(self.state, self.root)
        self.made = _make_taps(self.spec.nics, self.state)
        _arm_trace()

    def _run(self) -> None:
        pairs = [(nic, on) for nic, on, _ in self.decided]
        plugged = self.runner.plug(self.state, pairs)
        nics = tuple(
            _nic_state(nic, on, why, ids, self.made)
            for (nic, on, why), ids in zip(self.decided, plugged.ids, strict=True)
        )
        self.state = self.state.replace(
            pid=plugged.pid, start_time=plugged.start_time, qmp=plugged.qmp, nics=nics
        )

    def _record_running(self) -> None:
        self.state = self.state.replace(status=RUNNING, making=(), launched_after=None)
        vm.state.save(self.state, self.root)

    def _wait(self, wait: float) -> None:
        self.outcome = wait_for_vhost(self.state, wait, self.runner)


def _nic_state(
    nic: NicSpec, on: bool, why: str | None, ids: tuple[str, str], created: set[str]
) -> NicState:
    device, netdev = ids
    return NicState(
        nic.tap.name, device, netdev, nic.queues, nic.mac, nic.vhost, on, why,
        nic.tap.name in created,
    )  # fmt: skip


def _running(name: str, root: str) -> VmState:
    state = vm.state.load(name, root)
    if state is None:
        raise OperationFailed(f"vhostorch has not started a VM named {name!r}")
    return state


def down(name: str, *, root: str = vm.state.STATE_DIR) -> Removed:
    """Stop VM ``name`` and remove what vhostorch created for it: the VM, its taps, its
    claims, its state. A VM whose QEMU is already gone is cleaned up too, and so is a start
    or hot-plug that died. Only the VM's own work directory under ``root`` is removed, only
    its own QEMU (pid and start time) is signalled, and only the taps made for it (its
    mark): a device that took one's name since is left alone (``Removed.replaced``), and
    the VM's state and claims go all the same. Raises OperationFailed.
    """
    with signals.RollBack(), vm.state.Lock(name, root):
        state = _safe(_running(name, root), name, root)
        if state.status == STARTING:
            return _recover(state, root)
        backends.of(state).stop(state)
        pins.forget(state.pid)
        deleted, replaced = _delete_made(state, _made(state))
        _release_all(state)
        vm.state.remove(name, root)
    return Removed(state, tuple(deleted), tuple(replaced))


def nic_add(
    name: str,
    nic: NicSpec,
    *,
    wait: float = WAIT_DRIVER,
    root: str = vm.state.STATE_DIR,
    host: Host | None = None,
) -> Outcome:
    """Hot-plug ``nic`` into running VM ``name`` (its tap made here), then check.

    All or nothing, as ``up``: a failure or an interrupting signal undoes the claim, the
    tap and the plug. What it will claim, make and plug is recorded first, so that one
    killed outright is undone by the next ``nic`` command or ``down``. Raises
    InvalidSpec, OperationFailed (RollbackFailed when undoing failed too: what is left
    stays recorded), errors.Interrupted.
    """
    with signals.RollBack(), vm.state.Lock(name, root):
        state = _safe(_running(name, root), name, root)
        if not procfs.alive(state.pid):
            raise OperationFailed(f"VM {name} is not running (its QEMU, pid {state.pid}, is gone)")
        state = _finish_hotplug(state, root)
        if state.nic(nic.tap.name) is not None:
            raise InvalidSpec(f"VM {name} has a NIC on tap {nic.tap.name} already")
        if any(n.mac == nic.mac for n in state.nics):
            raise InvalidSpec(f"VM {name} has a NIC with MAC {nic.mac} already")
        runner = backends.of(state)
        index = len(state.nics)
        [(_, on, why)] = decide(
            [nic], accel_of(state.accel), state.backend, host or Host.probe(), index
        )
        undo = _Undo()
        holder = claims.up_holder(name)
        tap = nic.tap.name
        before = state
        plugging = _nic_state(nic, on, why, ("", ""), set() if _exists(tap) else {tap})
        state = state.replace(
            claimed=tuple(dict.fromkeys((*state.claimed, tap))),
            making=(tap,) if plugging.tap_created else (),
            plugging=plugging,
        )
        try:
            vm.state.save(state, root)
            undo.push("state file", lambda: vm.state.save(before, root))
            if claims.claim(tap, holder):
                undo.push(f"claim on tap {tap}", _releaser(tap, holder))
            if state.making:
                undo.push(f"taps {tap}", _deleter(state, state.making))
            created = _make_taps([nic], state)
            _arm_trace()
            # Plugged with its undo known, or not plugged: a signal inside plug could
            # leave QEMU a netdev or device its rollback does not know of.
            with signals.Held():
                done = runner.plug(state, [(nic, on)])
                plugged = state
                undo.push(
                    f"NIC on tap {tap}",
                    lambda: runner.unplug(plugged, plugging, UNPLUG_TIMEOUT),
                )
            [ids] = done.ids
            added = _nic_state(nic, on, why, ids, created)
            state = state.with_nics((*state.nics, added)).replace(making=(), plugging=None)
            vm.state.save(state, root)
            undo.push("state file", lambda: vm.state.save(plugged, root))  # on record again
            # The VM's pin (vhostorch pin, the spec's worker_cpus) on the new NIC's workers.
            _, failed = pinning.reapply(only=state.pid)
            if failed:
                raise OperationFailed(failed[0])
            return wait_for_vhost(state, wait, runner)
        except BaseException as err:
            # Undone last-first, stopping at the first step that cannot be undone (a NIC the
            # guest does not release keeps its tap and claim): the record then stays, and
            # the next nic command or down finishes the job.
            _fail(err, undo, stop=True)
            raise


def nic_del(
    name: str, tap: str, *, timeout: float = UNPLUG_TIMEOUT, root: str = vm.state.STATE_DIR
) -> VmState:
    """Unplug the NIC on ``tap`` from VM ``name`` and delete the tap if vhostorch made it.

    Interrupted while the guest is releasing the NIC, it stops with the NIC still
    recorded (it may be gone from the guest already): run again, it finishes. Once the
    NIC is unplugged, the record, the tap and the claim go together (the stopping
    signals wait meanwhile). Raises InvalidSpec, OperationFailed, errors.Interrupted.
    """
    with signals.RollBack(), vm.state.Lock(name, root):
        state = _safe(_running(name, root), name, root)
        cut_short = state.plugging is not None and state.plugging.tap == tap
        state = _finish_hotplug(state, root)
        nic = state.nic(tap)
        if nic is None and cut_short:
            return state  # a nic add of it killed outright: now undone, as asked
        if nic is None:
            raise InvalidSpec(f"VM {name} has no NIC on tap {tap}")
        backends.of(state).unplug(state, nic, timeout)
        with signals.Held():
            # Recorded before it is done: a kill in between leaves the tap to be deleted
            # and the claim to be given back on record (_finish_hotplug, down).
            state = state.with_nics(tuple(n for n in state.nics if n.tap != tap)).replace(
                making=(tap,) if nic.tap_created else ()
            )
            vm.state.save(state, root)
            state = _finish_hotplug(state, root)
        return state


__all__ = [
    "WAIT_DRIVER", "Host", "Outcome", "Removed", "check", "decide", "down", "nic_add", "nic_del",
    "up",
]  # fmt: skip
