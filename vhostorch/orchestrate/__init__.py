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

from vhostorch import backends, claims, signals, taps
from vhostorch.backends import process
from vhostorch.check import wiring
from vhostorch.errors import InvalidSpec, OperationFailed, RollbackFailed, VhostorchError
from vhostorch.kernel import procfs
from vhostorch.libvirt.connection import SYSTEM_URI
from vhostorch.orchestrate.decision import Host, decide
from vhostorch.orchestrate.settle import WAIT_DRIVER, Outcome, check, wait_for_vhost
from vhostorch.record import TYPE_CHECKING, Record
from vhostorch.vm import state as vmstate
from vhostorch.vm.spec import accel_of
from vhostorch.vm.state import RUNNING, STARTING, NicState, VmState

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from vhostorch.vm.spec import NicSpec, VmSpec

UNPLUG_TIMEOUT = 30.0


class _Undo:
    """Undo steps, run last-first when a later step fails."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, Callable[[], object]]] = []

    def push(self, what: str, step: Callable[[], object]) -> None:
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
                left.append(f"{what} ({err})")
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
    """``state`` with the work directory and QMP socket vhostorch gives VM ``name`` under
    ``root``, never the ones the file names: a forged state file must not make root remove
    or talk to anything else. Raises OperationFailed when they differ or lead elsewhere."""
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
    qmp = None if state.qmp is None else process.files(workdir)[0]
    return state.replace(name=name, workdir=workdir, qmp=qmp)


class Removed(Record):
    """What `down` did: the VM's last state, the taps it deleted, and those it left alone
    because the device of that name is no longer the one vhostorch made (``replaced``)."""

    state: VmState
    deleted: tuple[str, ...]
    replaced: tuple[str, ...]


def _releaser(tap: str, holder: str) -> Callable[[], None]:
    return lambda: claims.release(tap, holder)


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
    """Undo what a start that died (SIGKILL, power cut) made, as its state file lists it."""
    if not state.pid and state.launched_after is not None:
        found = process.find(state.workdir, state.launched_after)
        if found is not None:
            state = state.replace(pid=found[0], start_time=found[1])
    if state.pid or state.vm_id:
        backends.of(state).stop(state)
    process.remove_workdir(state.workdir)
    deleted, replaced = _delete_made(state, _made(state))
    _release_all(state)
    vmstate.remove(state.name, root)
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
            backends.of(state).detach(state, state.plugging, UNPLUG_TIMEOUT)
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
    vmstate.save(state, root)
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


def _make_taps(nics: Sequence[NicSpec], undo: _Undo, state: VmState) -> set[str]:
    """Make the taps of ``nics`` with ``state``'s mark; those it lists as ``making``
    (absent, claimed by this command) are undone even when the making is interrupted."""
    making = state.making
    if making:
        undo.push(f"taps {', '.join(sorted(making))}", lambda: _delete_made(state, making))
    results = taps.ensure([n.tap for n in nics], keep_existing=True, alias=_alias(state))
    return {r.name for r in results if r.action == "created"}


def up(
    spec: VmSpec,
    backend: str = "qmp",
    *,
    uri: str = SYSTEM_URI,
    wait: float = WAIT_DRIVER,
    root: str = vmstate.STATE_DIR,
    host: Host | None = None,
    user: str | None = None,
    warn: Callable[[str], object] | None = None,
) -> Outcome:
    """Make the taps, start the VM, wait for its guest driver to start vhost, check it.

    All or nothing: a failure or an interrupting signal at any step undoes the steps
    before it. ``user`` is who QEMU runs as where the backend decides it (None: libvirt's
    QEMU user; "root" keeps root); ``warn`` is told when QEMU is to run as root.
    Raises InvalidSpec, OperationFailed (RollbackFailed when undoing failed too,
    errors.Claimed when another VM or domain holds a tap), errors.Interrupted.
    """
    runner = backends.get(backend)
    with signals.RollBack(), vmstate.Lock(spec.name, root):
        old = vmstate.load(spec.name, root)
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
        decided = decide(spec.nics, spec.accel, backend, host or Host.probe())
        if runner.runs_as(user) == process.ROOT and warn is not None:
            warn("QEMU runs as root: no unprivileged QEMU user here (--user names one)")
        undo = _Undo()
        holder = claims.up_holder(spec.name)
        try:
            workdir = _workdir(spec.name, root)
            names = tuple(n.tap.name for n in spec.nics)
            state = VmState(
                spec.name, backend, 0, spec.accel, None, None, workdir, (), status=STARTING,
                launched_after=process.boot_ticks() - 1, claimed=names, tag=taps.new_tag(),
            )  # fmt: skip
            vmstate.save(state, root)
            undo.push("state file", lambda: vmstate.remove(spec.name, root))
            for tap in names:
                claims.claim(tap, holder)
                undo.push(f"claim on tap {tap}", _releaser(tap, holder))
            pairs = [(nic, on) for nic, on, _ in decided]
            # Begun before the taps exist, so that starting QEMU can overlap making them.
            # A signal inside begin (in Popen, say) would leave a QEMU nothing undoes.
            with signals.Held():
                start = runner.begin(spec, workdir, uri, user)
                undo.push(start.what, start.abort)
            launched = start.process()
            if launched is not None:
                state = state.replace(pid=launched[0], start_time=launched[1])
            state = state.replace(vm_id=start.vm_id)
            vmstate.save(state, root)
            state = state.replace(making=tuple(t for t in names if not _exists(t)))
            vmstate.save(state, root)
            created = _make_taps(spec.nics, undo, state)
            _arm_trace()
            started = start.run(pairs)
            bare = state.replace(
                pid=started.pid, qmp=started.qmp, uri=started.uri, start_time=started.start_time
            )
            # The VM now holds the taps: it must stop before they can go.
            undo.push(start.what, lambda: runner.stop(bare))
            ids = runner.nic_ids(bare, [nic.tap.name for nic, _ in pairs])
            nics = tuple(
                _nic_state(nic, on, why, nic_ids, created)
                for (nic, on, why), nic_ids in zip(decided, ids, strict=True)
            )
            state = bare.replace(nics=nics, status=RUNNING, making=(), launched_after=None)
            vmstate.save(state, root)
            outcome = wait_for_vhost(state, wait)
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


def _running(name: str, root: str) -> VmState:
    state = vmstate.load(name, root)
    if state is None:
        raise OperationFailed(f"vhostorch has not started a VM named {name!r}")
    return state


def down(name: str, *, root: str = vmstate.STATE_DIR) -> Removed:
    """Stop VM ``name`` and remove what vhostorch created for it: the VM, its taps, its
    claims, its state. A VM whose QEMU is already gone is cleaned up too, and so is a start
    or hot-plug that died. Only the VM's own work directory under ``root`` is removed, only
    its own QEMU (pid and start time) is signalled, and only the taps made for it (its
    mark): a device that took one's name since is left alone (``Removed.replaced``), and
    the VM's state and claims go all the same. Raises OperationFailed.
    """
    with signals.RollBack(), vmstate.Lock(name, root):
        state = _safe(_running(name, root), name, root)
        if state.status == STARTING:
            return _recover(state, root)
        backends.of(state).stop(state)
        deleted, replaced = _delete_made(state, _made(state))
        _release_all(state)
        vmstate.remove(name, root)
    return Removed(state, tuple(deleted), tuple(replaced))


def nic_add(
    name: str,
    nic: NicSpec,
    *,
    wait: float = WAIT_DRIVER,
    root: str = vmstate.STATE_DIR,
    host: Host | None = None,
) -> Outcome:
    """Hot-plug ``nic`` into running VM ``name`` (its tap made here), then check.

    All or nothing, as ``up``: a failure or an interrupting signal undoes the claim, the
    tap and the plug. What it will claim, make and plug is recorded first, so that one
    killed outright is undone by the next ``nic`` command or ``down``. Raises
    InvalidSpec, OperationFailed (RollbackFailed when undoing failed too: what is left
    stays recorded), errors.Interrupted.
    """
    with signals.RollBack(), vmstate.Lock(name, root):
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
            vmstate.save(state, root)
            undo.push("state file", lambda: vmstate.save(before, root))
            if claims.claim(tap, holder):
                undo.push(f"claim on tap {tap}", _releaser(tap, holder))
            created = _make_taps([nic], undo, state)
            _arm_trace()
            # Plugged with its undo known, or not plugged: a signal inside attach could
            # leave QEMU a netdev or device its rollback does not know of.
            with signals.Held():
                runner.attach(state, nic, on)
                plugged = state
                undo.push(
                    f"NIC on tap {tap}",
                    lambda: runner.detach(plugged, plugging, UNPLUG_TIMEOUT),
                )
            [ids] = runner.nic_ids(state, [tap])
            added = _nic_state(nic, on, why, ids, created)
            state = state.with_nics((*state.nics, added)).replace(making=(), plugging=None)
            vmstate.save(state, root)
            undo.push("state file", lambda: vmstate.save(plugged, root))  # on record again
            return wait_for_vhost(state, wait)
        except BaseException as err:
            # Undone last-first, stopping at the first step that cannot be undone (a NIC the
            # guest does not release keeps its tap and claim): the record then stays, and
            # the next nic command or down finishes the job.
            _fail(err, undo, stop=True)
            raise


def nic_del(
    name: str, tap: str, *, timeout: float = UNPLUG_TIMEOUT, root: str = vmstate.STATE_DIR
) -> VmState:
    """Unplug the NIC on ``tap`` from VM ``name`` and delete the tap if vhostorch made it.

    Interrupted while the guest is releasing the NIC, it stops with the NIC still
    recorded (it may be gone from the guest already): run again, it finishes. Once the
    NIC is unplugged, the record, the tap and the claim go together (the stopping
    signals wait meanwhile). Raises InvalidSpec, OperationFailed, errors.Interrupted.
    """
    with signals.RollBack(), vmstate.Lock(name, root):
        state = _safe(_running(name, root), name, root)
        cut_short = state.plugging is not None and state.plugging.tap == tap
        state = _finish_hotplug(state, root)
        nic = state.nic(tap)
        if nic is None and cut_short:
            return state  # a nic add of it killed outright: now undone, as asked
        if nic is None:
            raise InvalidSpec(f"VM {name} has no NIC on tap {tap}")
        backends.of(state).detach(state, nic, timeout)
        with signals.Held():
            # Recorded before it is done: a kill in between leaves the tap to be deleted
            # and the claim to be given back on record (_finish_hotplug, down).
            state = state.with_nics(tuple(n for n in state.nics if n.tap != tap)).replace(
                making=(tap,) if nic.tap_created else ()
            )
            vmstate.save(state, root)
            state = _finish_hotplug(state, root)
        return state


__all__ = [
    "WAIT_DRIVER", "Host", "Outcome", "Removed", "check", "decide", "down", "nic_add", "nic_del",
    "up",
]  # fmt: skip
