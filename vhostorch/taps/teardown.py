"""Deleting taps: what may be deleted (pure), and deleting many in one request by link group.

`plan_delete` turns names and a snapshot of the links into delete steps, refusing before
anything is touched (not a tap, not vhostorch's, held open). Two taps or more are deleted
by link group: `plan_group_moves` moves them into one group no other device carries,
`check_group` checks the group again on a fresh snapshot, and the kernel deletes the whole
group in one request (one RCU grace period for all). `delete_on` runs that through a host
(taps.apply), and `delete` is the front door.

Deletes in one namespace take turns (`NamespaceLock`, an flock per network namespace under
LOCK_DIR): two batches whose taps overlap would otherwise each see the other's moves as a
change, and one's restore could put a tap back into the other's group, where nothing
deletes it. A batch runs with the stopping signals held (signals.Held), from the record of
the taps' groups to their delete or restore, so SIGTERM, SIGHUP or SIGINT act after it and
never leave taps in the chosen group. Only SIGKILL (or a crash) can: the record (the
journal, beside the lock) stays, and the next delete in that namespace puts every tap
still in that group back in its own group before anything else; taps left in the chosen
group are never deleted by anyone but a delete that names them.
"""

from __future__ import annotations

import os

from vhostorch import files, lockfile, rundir, signals
from vhostorch.errors import (
    InvalidSpec,
    NotManaged,
    OperationFailed,
    RollbackFailed,
    VhostorchError,
)
from vhostorch.inputs import check_ifname
from vhostorch.record import TYPE_CHECKING
from vhostorch.taps.apply import KernelHost, apply, in_namespace
from vhostorch.taps.plan import (
    Change,
    DeleteGroup,
    DeleteLink,
    DeleteResult,
    Plan,
    SetGroup,
    TapResult,
    device_kind,
    held,
    in_use,
    is_tap,
    managed,
)

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from vhostorch.kernel.rtnl import Link
    from vhostorch.taps.apply import Host

LOCK_DIR = rundir.TAP_LOCKS
NO_MARKS: Mapping[str, str] = {}  # never changed: the default of ``marks``


def _made(link: Link, marks: Mapping[str, str]) -> bool:
    """Whether ``link`` is the tap its ``marks`` entry names (its alias is that start's)."""
    return is_tap(link) and link.alias == marks[link.name]


def _refuse_delete(link: Link, force: bool, marks: Mapping[str, str] = NO_MARKS) -> None:
    """Raise unless ``link`` is a tap vhostorch may delete now (``force``: any unheld tap;
    one named in ``marks``: only the device that carries its mark)."""
    if link.name in marks and not _made(link, marks):
        raise NotManaged(
            f"{device_kind(link)} {link.name} is not the tap vhostorch made under that name "
            "(replaced); not deleting it"
        )
    if not is_tap(link):
        raise NotManaged(f"{link.name} is a {device_kind(link)} device, not a tap; not deleting it")
    if not managed(link) and not force:
        raise NotManaged(f"tap {link.name} was not created by vhostorch; not deleting it")
    if held(link):
        raise in_use(link, "deleting it was asked for")


def plan_delete(
    names: Sequence[str],
    snapshot: dict[str, Link],
    *,
    bridges: Sequence[str] = (),
    force: bool = False,
    marks: Mapping[str, str] = NO_MARKS,
) -> Plan:
    """Pure: delete the taps vhostorch made (any tap with ``force``), and then each of
    ``bridges`` that vhostorch made and that has no port left.

    ``marks`` gives, for taps a start made, the alias it made them with (`taps.mark`): only
    the device of that name carrying it is deleted; another device of that name (someone
    else's, made after ours was deleted) is left alone, its result "replaced"."""
    changes: list[Change] = []
    results: list[TapResult] = []
    gone: set[str] = set()
    for name in dict.fromkeys(names):
        link = snapshot.get(name)
        if link is None:
            results.append(DeleteResult(name, "absent"))
            continue
        if name in marks and not _made(link, marks):
            results.append(DeleteResult(name, "replaced"))
            continue
        _refuse_delete(link, force, marks)
        changes.append(Change(DeleteLink(name)))
        results.append(DeleteResult(name, "deleted"))
        gone.add(name)
    for bridge_name in dict.fromkeys(bridges):
        bridge = snapshot.get(bridge_name)
        if bridge is None or bridge.kind != "bridge" or not managed(bridge):
            continue
        ports = [n for n, link in snapshot.items() if link.master == bridge.index and n not in gone]
        if not ports:
            changes.append(Change(DeleteLink(bridge_name)))
    return Plan(tuple(changes), tuple(results))


def plan_group_moves(names: Sequence[str], snapshot: dict[str, Link], group: int) -> Plan:
    """Pure: move the taps ``names`` (as ``snapshot`` shows them) into link ``group``;
    each move's undo puts the tap back in the group it was in."""
    changes = []
    for name in names:
        link = snapshot[name]
        changes.append(
            Change(
                SetGroup(name, link.index, group),
                (SetGroup(name, link.index, link.group),),
            )
        )
    return Plan(tuple(changes), ())


def check_group(
    group: int,
    moved: Sequence[SetGroup],
    snapshot: dict[str, Link],
    force: bool,
    marks: Mapping[str, str] = NO_MARKS,
) -> None:
    """Pure: raise unless link ``group`` holds exactly the taps ``moved`` put there, each
    still one that may be deleted (not held, ours unless ``force``, marked as ``marks``
    says).

    Run on a snapshot read after the moves: whatever a group delete would take
    with it (a device someone else put in the group, a tap opened meanwhile)
    refuses the whole batch here.
    """
    by_index = {link.index: link for link in snapshot.values()}
    wanted = {move.index: move for move in moved}
    for link in snapshot.values():
        if link.group == group and link.index not in wanted:
            raise NotManaged(
                f"{device_kind(link)} {link.name} is in link group {group}, which vhostorch "
                "chose to delete its taps by; not deleting anything"
            )
    for move in moved:
        now = by_index.get(move.index)
        if now is None or now.name != move.name or now.group != group:
            raise OperationFailed(
                f"tap {move.name} changed while it was being deleted (it was renamed, deleted "
                f"or moved out of link group {group}); not deleting anything"
            )
        _refuse_delete(now, force, marks)


def random_group(taken: set[int]) -> int:
    """A link group id no device in ``taken`` carries: 31 random bits, never 0.

    The kernel keeps the group in an int and iproute2 prints and parses it as
    one (`ip link set ... group 3000000000` is refused), so ids stay below 2**31.
    """
    while True:
        group = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
        if group and group not in taken:
            return group


def _delete_by_group(
    host: Host,
    doomed: Sequence[str],
    snapshot: dict[str, Link],
    group: int,
    force: bool,
    journal: str | None,
    marks: Mapping[str, str],
) -> str | None:
    """Delete the taps ``doomed`` in one request by link group; all or none.

    Returns None when they are deleted, or the kernel's reason when it refused
    the group delete (nothing deleted, the taps back in their groups: the caller
    deletes them one by one). Raises when a check refuses, after restoring the groups.

    The window: the last check (a dump read after the moves) and the delete are
    two requests, and between them another process holding CAP_NET_ADMIN in the
    namespace could put a device into the group or open one of the taps. The
    kernel deletes whatever the group holds then. The group is 31 random bits
    chosen among those no device carried, used for the few milliseconds
    between the moves and the delete and never again, so a device lands in it
    only if someone reads it from a dump and moves a device into it within
    that time (no tool picks a group by itself: `ip` uses the numbers it is
    given, 0 by default), and a guess at random hits one in 2**31. The same
    window, between the check and the delete, exists for a tap being opened
    with one delete per tap, as it did before batching.

    The stopping signals wait (signals.Held) from the journal's writing to the
    delete or the restore. ``journal`` (None: none kept) records the group and
    each tap's own group first, for the next delete to restore after a SIGKILL
    (`recover`); it is removed once the taps are deleted or back.
    """
    moves = plan_group_moves(doomed, snapshot, group).changes
    with signals.Held():
        if journal is not None:
            _write_journal(journal, group, moves)
        apply(moves, host)
        try:
            moved = [change.step for change in moves if isinstance(change.step, SetGroup)]
            check_group(group, moved, host.snapshot(doomed), force, marks)
            [refused] = host.do([DeleteGroup(group, tuple(doomed))])
            if refused is None:
                _forget(journal)
                return None
        except BaseException as err:
            _restore_groups(moves, host, err)
            _forget(journal)
            raise
        _restore_groups(moves, host, refused)
        _forget(journal)
    return str(refused)


def _restore_groups(moves: Sequence[Change], host: Host, why: BaseException) -> None:
    """Put the moved taps back in their groups; ``why`` is the failure that asks for it,
    kept in the message (and as the cause) when the restore fails too."""
    outcomes = host.do([undo for change in moves for undo in change.undo])
    leftovers = [str(failed) for failed in outcomes if failed is not None]
    if leftovers:
        cause = why if isinstance(why, VhostorchError) else OperationFailed(str(why) or repr(why))
        raise RollbackFailed(
            f"{why}; restoring the link groups of the taps failed too: " + "; ".join(leftovers),
            cause,
            leftovers,
        ) from why


def _write_journal(path: str, group: int, moves: Sequence[Change]) -> None:
    """Record ``group`` and, per tap, its index, own group and name (one line each)."""
    lines = [str(group)]
    for change in moves:
        for undo in change.undo:
            assert isinstance(undo, SetGroup)
            lines.append(f"{undo.index} {undo.group} {undo.name}")
    files.replace(path, ("\n".join(lines) + "\n").encode(), 0o600)


def _forget(journal: str | None) -> None:
    if journal is not None:
        files.remove(journal)


def recover(host: Host, journal: str) -> list[str]:
    """After a batch cut short by SIGKILL: put every tap ``journal`` names that is still in
    its group back in its own group, and remove the journal. Returns the names put back.
    A tap renamed, deleted or moved since is left as it is."""
    try:
        with open(journal) as recorded:
            lines = recorded.read().split("\n")
    except FileNotFoundError:
        return []
    try:
        group = int(lines[0])
        own = {}
        for line in lines[1:]:
            if line:
                index, was, _name = line.split(" ", 2)
                own[int(index)] = int(was)
    except ValueError:
        files.remove(journal)  # cut short while written: no tap had moved yet
        return []
    back = [
        SetGroup(link.name, link.index, own[link.index])
        for link in host.snapshot().values()
        if link.index in own and link.group == group
    ]
    outcomes = host.do(back) if back else []
    files.remove(journal)
    return [step.name for step, failed in zip(back, outcomes, strict=True) if failed is None]


def delete_on(
    host: Host,
    names: Sequence[str],
    *,
    bridges: Sequence[str] = (),
    force: bool = False,
    dry_run: bool = False,
    group: int | None = None,
    journal: str | None = None,
    marks: Mapping[str, str] = NO_MARKS,
) -> list[TapResult]:
    """`delete`'s work through ``host`` (in the namespace it was opened in); ``journal``:
    where a batch records the taps' groups while they are moved (`_delete_by_group`)."""
    snapshot = host.snapshot(names)
    plan = plan_delete(names, snapshot, bridges=bridges, force=force, marks=marks)
    results = list(plan.results)
    if dry_run:
        return results
    doomed = [r.name for r in results if r.action == "deleted"]
    rest: Sequence[Change] = plan.changes
    fallback = None
    if len(doomed) > 1:
        taken = {link.group for link in snapshot.values()}
        chosen = group if group is not None else random_group(taken)
        fallback = _delete_by_group(host, doomed, snapshot, chosen, force, journal, marks)
        if fallback is None:  # what is left: the bridges
            gone = {DeleteLink(name) for name in doomed}
            rest = [c for c in plan.changes if c.step not in gone]
    apply(rest, host)
    batched = len(doomed) > 1 and fallback is None
    note = () if fallback is None else (f"one delete per tap: group delete refused ({fallback})",)
    return [
        DeleteResult(r.name, r.action, note if r.action == "deleted" else (), batched)
        for r in results
    ]


def delete(
    names: Sequence[str],
    *,
    netns: str | None = None,
    bridges: Sequence[str] = (),
    force: bool = False,
    dry_run: bool = False,
    group: int | None = None,
    lock_dir: str = LOCK_DIR,
    marks: Mapping[str, str] = NO_MARKS,
) -> list[TapResult]:
    """Delete taps vhostorch created (and listed bridges it created once empty).

    ``marks``: for taps one start made, name → the alias it made them with (`taps.mark`):
    of those, only the very device made then is deleted, and a device that took the name
    since is left alone (result "replaced"), whoever made it.

    Every refusal (not a tap, not ours, held open) happens before anything is deleted;
    ``dry_run`` stops there. Two taps or more are deleted in one batch: moved into
    link ``group`` (by default a random one no device carries), checked again, and
    deleted with one RTM_DELLINK for the group (one RCU grace period for all, where
    one delete per tap waits for one each). A device of another kind, or anyone
    else's, found in the group refuses the batch and the taps go back to their
    groups. If the kernel refuses the group delete, the taps are deleted one by one;
    each result's ``batched`` says which happened.

    A held tap (a queue attached or detached; for a single-queue tap, asked of tun, not
    read from its carrier) is never deleted. Deletes in one namespace take turns
    (`NamespaceLock` in ``lock_dir``), and the stopping signals wait while a batch runs.

    Raises InvalidSpec for a bad name or group 0, NotManaged or InUse for a tap it
    must not delete, OperationFailed (KernelError) when the kernel refuses.
    """
    for name in [*names, *bridges]:
        check_ifname(name)
    if group is not None and not 0 < group <= 0xFFFFFFFF:
        raise InvalidSpec(f"link group {group}: a batch needs a group from 1 to 4294967295")

    def work(host: KernelHost) -> list[TapResult]:
        if dry_run:
            return delete_on(host, names, bridges=bridges, force=force, dry_run=True, marks=marks)
        with NamespaceLock(lock_dir) as lock:
            recover(host, lock.journal)
            return delete_on(
                host, names, bridges=bridges, force=force, group=group, journal=lock.journal,
                marks=marks,
            )  # fmt: skip

    return in_namespace(netns, work)


class NamespaceLock(lockfile.Lock):
    """The turn of the calling thread's network namespace to delete taps: an flock on
    ``lock_dir``/netns-INODE.lock (the namespace's inode: the same for every name and
    path it has). ``journal`` is the record a batch keeps beside it; the lock file goes
    once it is released with no journal left."""

    def __init__(self, lock_dir: str = LOCK_DIR) -> None:
        stem = os.path.join(lock_dir, f"netns-{os.stat('/proc/thread-self/ns/net').st_ino}")
        self.journal = stem + ".moved"
        rundir.ensure(lock_dir, rundir.TAP_LOCKS_MODE, rundir.RUN_MODE)
        super().__init__(stem + ".lock", self.journal)

    def __enter__(self) -> NamespaceLock:
        super().__enter__()
        return self
