"""Start, hot-plug and stop VMs from a VmSpec through either backend; each start ends in a check.

An operation is a list of steps, each undone when a later one fails, or when the
command is interrupted (SIGINT, SIGTERM, SIGHUP): decide (nothing touched yet) →
state file ("starting") → tap claims → VM → taps → state file ("running"). Each
step is written to the state file before it is taken, so a start that could not
undo itself (SIGKILL, power cut) is undone by ``down`` or the next ``up``, exactly:
its claims, the taps it was making, its QEMU (pid and start time, or its pid file).
``down`` and ``nic del`` remove only what vhostorch created: the VM it started and
the taps it made, and only the work directory under the state directory.

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
from vhostorch.record import TYPE_CHECKING
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


def _releaser(tap: str, holder: str) -> Callable[[], None]:
    return lambda: claims.release(tap, holder)


def _exists(tap: str) -> bool:
    return os.path.exists(f"/sys/class/net/{tap}")


def _recover(state: VmState, root: str) -> None:
    """Undo what a start that died (SIGKILL, power cut) made, as its state file lists it."""
    if not state.pid and state.launched_after is not None:
        found = process.find(state.workdir, state.launched_after)
        if found is not None:
            state = state.replace(pid=found[0], start_time=found[1])
    if state.pid or state.vm_id:
        backends.of(state).stop(state)
    process.remove_workdir(state.workdir)
    _delete_made([*state.making, *(n.tap for n in state.nics if n.tap_created)])
    holder = claims.up_holder(state.name)
    for tap in state.claimed:
        claims.release(tap, holder)
    vmstate.remove(state.name, root)


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


def _delete_made(names: Sequence[str]) -> None:
    """Delete those of ``names`` that exist: taps this command claimed when they did not
    exist, so its own even if killed half-made (before their vhostorch alias is set)."""
    gone = sorted(t for t in names if _exists(t))
    if gone:
        taps.delete(gone, force=True)


def _make_taps(nics: Sequence[NicSpec], undo: _Undo, making: Sequence[str]) -> set[str]:
    """Make the taps of ``nics``; ``making`` (those absent, claimed by this command) are
    undone even when the making itself is interrupted."""
    if making:
        undo.push(f"taps {', '.join(sorted(making))}", lambda: _delete_made(making))
    results = taps.ensure([n.tap for n in nics], keep_existing=True)
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
                launched_after=process.boot_ticks() - 1, claimed=names,
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
            created = _make_taps(spec.nics, undo, state.making)
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


def down(name: str, *, root: str = vmstate.STATE_DIR) -> VmState:
    """Stop VM ``name`` and remove what vhostorch created for it: the VM, its taps, its
    claims, its state. A VM whose QEMU is already gone is cleaned up too, and so is a start
    that died (state "starting"). Only the VM's own work directory under ``root`` is
    removed, and only its own QEMU (pid and start time) is signalled. Raises OperationFailed.
    """
    with signals.RollBack(), vmstate.Lock(name, root):
        state = _safe(_running(name, root), name, root)
        if state.status == STARTING:
            _recover(state, root)
            return state
        backends.of(state).stop(state)
        created = [n.tap for n in state.nics if n.tap_created]
        if created:
            taps.delete(created)
        holder = claims.up_holder(name)
        for tap in {*state.claimed, *(n.tap for n in state.nics)}:
            claims.release(tap, holder)
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
        state = _safe(_running(name, root), name, root)
        if not procfs.alive(state.pid):
            raise OperationFailed(f"VM {name} is not running (its QEMU, pid {state.pid}, is gone)")
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
        try:
            tap = nic.tap.name
            if claims.claim(tap, holder):
                undo.push(f"claim on tap {tap}", _releaser(tap, holder))
            created = _make_taps([nic], undo, [] if _exists(tap) else [tap])
            _arm_trace()
            runner.attach(state, nic, on)
            [ids] = runner.nic_ids(state, [nic.tap.name])
            added = _nic_state(nic, on, why, ids, created)
            state = state.with_nics((*state.nics, added)).replace(
                claimed=(*state.claimed, nic.tap.name)
            )
            vmstate.save(state, root)
        except BaseException as err:
            _fail(err, undo)
            raise
        return wait_for_vhost(state, wait)


def nic_del(
    name: str, tap: str, *, timeout: float = UNPLUG_TIMEOUT, root: str = vmstate.STATE_DIR
) -> VmState:
    """Unplug the NIC on ``tap`` from VM ``name`` and delete the tap if vhostorch made it."""
    with vmstate.Lock(name, root):
        state = _safe(_running(name, root), name, root)
        nic = state.nic(tap)
        if nic is None:
            raise InvalidSpec(f"VM {name} has no NIC on tap {tap}")
        backends.of(state).detach(state, nic, timeout)
        state = state.with_nics(tuple(n for n in state.nics if n.tap != tap)).replace(
            claimed=tuple(t for t in state.claimed if t != tap)
        )
        vmstate.save(state, root)
        if nic.tap_created:
            taps.delete([tap])
        claims.release(tap, claims.up_holder(name))
        return state


__all__ = ["WAIT_DRIVER", "Host", "Outcome", "check", "decide", "down", "nic_add", "nic_del", "up"]
