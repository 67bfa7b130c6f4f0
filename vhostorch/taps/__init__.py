"""Tap provisioning: read the namespace, plan the changes (pure), apply them all or none.

`plan_ensure` and `plan_delete` turn specs and a snapshot of the links into
steps, each with the steps that undo it; they refuse (raise) before anything is
touched whenever the snapshot already shows that the work cannot succeed.
`apply` runs the steps and, when one fails, runs the undo steps of those done.

Ownership is recorded on the device itself: vhostorch sets the interface alias
to MANAGED_ALIAS on what it creates, and only deletes (or recreates) devices
carrying it, so a cleanup never removes a tap or bridge someone else made.
"""

from __future__ import annotations

import errno
import grp
import pwd

from vhostorch.errors import (
    InUse,
    InvalidSpec,
    KernelError,
    Mismatch,
    NotManaged,
    OperationFailed,
    RollbackFailed,
)
from vhostorch.kernel import netns, tun
from vhostorch.kernel.rtnl import Link, NetlinkError, Rtnl
from vhostorch.kernel.tun import TapFlags
from vhostorch.model import TapSpec, check_batch, check_ifname
from vhostorch.record import TYPE_CHECKING, Record

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Protocol, TypeVar

    T = TypeVar("T")

    class Host(Protocol):
        """Where plans are read from and applied: the kernel, or a test's wrapper around it."""

        def snapshot(self) -> dict[str, Link]: ...

        def do(self, step: Step) -> None: ...


MANAGED_ALIAS = "vhostorch"
NO_MASTER = ""  # SetLink.master value that detaches the link from its bridge


class CreateTap(Record):
    __slots__ = ("name", "flags", "owner", "group")
    name: str
    flags: TapFlags
    owner: int | None
    group: int | None

    def __init__(self, name: str, flags: TapFlags, owner: int | None, group: int | None) -> None:
        self._init(name=name, flags=flags, owner=owner, group=group)

    def __str__(self) -> str:
        return f"create tap {self.name}"


class RetuneTap(CreateTap):
    """Re-attach to an existing tap to change vnet_hdr, owner or group."""

    __slots__ = ()

    def __str__(self) -> str:
        return f"re-tune tap {self.name}"


class SetLink(Record):
    """A change of link attributes; None leaves one alone, NO_MASTER detaches."""

    __slots__ = ("name", "up", "mtu", "mac", "master", "alias")
    name: str
    up: bool | None
    mtu: int | None
    mac: str | None
    master: str | None
    alias: str | None

    def __init__(
        self,
        name: str,
        up: bool | None = None,
        mtu: int | None = None,
        mac: str | None = None,
        master: str | None = None,
        alias: str | None = None,
    ) -> None:
        self._init(name=name, up=up, mtu=mtu, mac=mac, master=master, alias=alias)

    def __str__(self) -> str:
        parts = [f"{k}={v}" for k, v in self.fields() if k != "name" and v is not None]
        return f"set {self.name} " + " ".join(p.replace("master=", "bridge=") for p in parts)


class CreateBridge(Record):
    __slots__ = ("name",)
    name: str

    def __init__(self, name: str) -> None:
        self._init(name=name)

    def __str__(self) -> str:
        return f"create bridge {self.name}"


class DeleteLink(CreateBridge):
    __slots__ = ()

    def __str__(self) -> str:
        return f"delete {self.name}"


Step = CreateTap | SetLink | CreateBridge


class Change(Record):
    """A step and the steps that undo it."""

    __slots__ = ("step", "undo")
    step: Step
    undo: tuple[Step, ...]

    def __init__(self, step: Step, undo: tuple[Step, ...] = ()) -> None:
        self._init(step=step, undo=undo)


class TapResult(Record):
    """What happened to one tap: created, changed, recreated, unchanged, deleted or absent."""

    __slots__ = ("name", "action", "changes")
    name: str
    action: str
    changes: tuple[str, ...]

    def __init__(self, name: str, action: str, changes: tuple[str, ...] = ()) -> None:
        self._init(name=name, action=action, changes=changes)


class Plan(Record):
    __slots__ = ("changes", "results")
    changes: tuple[Change, ...]
    results: tuple[TapResult, ...]

    def __init__(self, changes: tuple[Change, ...], results: tuple[TapResult, ...]) -> None:
        self._init(changes=changes, results=results)


class Ids(Record):
    """Owner and group of a tap as numeric ids, resolved from the spec's names."""

    __slots__ = ("owner", "group")
    owner: int | None
    group: int | None

    def __init__(self, owner: int | None, group: int | None) -> None:
        self._init(owner=owner, group=group)


class TapState(Record):
    """A tap as the kernel reports it, for `show`."""

    __slots__ = (
        "name",
        "netns",
        "ifindex",
        "queue_mode",
        "vnet_hdr",
        "no_pi",
        "persist",
        "owner",
        "group",
        "mtu",
        "mac",
        "bridge",
        "up",
        "carrier",
        "attached_queues",
        "managed",
    )
    name: str
    netns: str | None
    ifindex: int
    queue_mode: str
    vnet_hdr: bool
    no_pi: bool
    persist: bool
    owner: int | None
    group: int | None
    mtu: int
    mac: str | None
    bridge: str | None
    up: bool
    carrier: bool | None
    attached_queues: int
    managed: bool

    def __init__(self, **fields: object) -> None:
        self._init(**fields)


def _describe(err: OSError) -> str:
    text = str(err) if isinstance(err, NetlinkError) else err.strerror or str(err)
    if err.errno == errno.EPERM:
        text += " (needs root or CAP_NET_ADMIN)"
    return text


class KernelHost:
    """Applies steps with rtnetlink and tun ioctls in the namespace ``rtnl`` was opened in."""

    def __init__(self, rtnl: Rtnl) -> None:
        self._rtnl = rtnl
        self._index: dict[str, int] = {}

    def snapshot(self) -> dict[str, Link]:
        links = self._rtnl.links()
        self._index = {name: link.index for name, link in links.items()}
        return links

    def _ifindex(self, name: str) -> int:
        if name not in self._index:
            link = self._rtnl.link(name)
            if link is None:
                raise KernelError(f"bridge {name!r} does not exist", errno.ENODEV)
            self._index[name] = link.index
        return self._index[name]

    def do(self, step: Step) -> None:
        try:
            # Subclasses before their bases: a RetuneTap is a CreateTap too.
            if isinstance(step, RetuneTap):
                tun.retune_tap(step.name, step.flags, step.owner, step.group)
            elif isinstance(step, CreateTap):
                tun.create_tap(step.name, step.flags, step.owner, step.group)
            elif isinstance(step, SetLink):
                index = None
                if step.master is not None:
                    index = 0 if step.master == NO_MASTER else self._ifindex(step.master)
                self._rtnl.set_link(
                    step.name,
                    up=step.up,
                    mtu=step.mtu,
                    mac=step.mac,
                    master=index,
                    alias=step.alias,
                )
            elif isinstance(step, DeleteLink):
                self._rtnl.delete(step.name)
                self._index.pop(step.name, None)
            else:
                self._rtnl.add_link(step.name, "bridge")
                self._rtnl.set_link(step.name, alias=MANAGED_ALIAS)
        except OSError as err:
            raise KernelError(f"{step}: {_describe(err)}", err.errno or 0) from err


def resolve_ids(spec: TapSpec) -> Ids:
    """Look up owner and group names; an unknown name is invalid input."""

    def lookup(value: str | int | None, what: str, find: Callable[[str], int]) -> int | None:
        if value is None or isinstance(value, int):
            return value
        try:
            return find(value)
        except KeyError:
            raise InvalidSpec(f"tap {spec.name}: {what} {value!r} does not exist") from None

    return Ids(
        lookup(spec.owner, "user", lambda n: pwd.getpwnam(n).pw_uid),
        lookup(spec.group, "group", lambda n: grp.getgrnam(n).gr_gid),
    )


def _kind(link: Link) -> str:
    if link.tun is not None:
        return "tap" if link.tun.tap else "tun"
    return link.kind or "network"


def _is_tap(link: Link) -> bool:
    return link.tun is not None and link.tun.tap


def _onoff(value: bool) -> str:
    return "on" if value else "off"


def _mode(multi: bool) -> str:
    return "multi" if multi else "single"


def _in_use(link: Link, what: str) -> InUse:
    assert link.tun is not None
    return InUse(
        f"tap {link.name}: {what}, and it is held open "
        f"({link.tun.attached_queues} queue(s) attached), so it cannot be changed now",
        link.name,
    )


def _new_tap(spec: TapSpec, ids: Ids) -> list[Change]:
    flags = TapFlags(spec.multi_queue, spec.vnet_hdr)
    set_all = SetLink(
        spec.name,
        up=True if spec.up else None,
        mtu=spec.mtu,
        mac=spec.mac,
        master=spec.bridge,
        alias=MANAGED_ALIAS,
    )
    return [
        Change(CreateTap(spec.name, flags, ids.owner, ids.group), (DeleteLink(spec.name),)),
        Change(set_all),
    ]


def _restore(link: Link, names: dict[int, str]) -> tuple[Step, ...]:
    """Steps that bring back a tap as ``link`` shows it, after it was deleted."""
    assert link.tun is not None
    flags = TapFlags(link.tun.multi_queue, link.tun.vnet_hdr)
    master = names.get(link.master) if link.master else None
    return (
        CreateTap(link.name, flags, link.tun.owner, link.tun.group),
        SetLink(link.name, up=link.up, mtu=link.mtu, mac=link.mac, master=master, alias=link.alias),
    )


def _plan_tap(
    spec: TapSpec,
    ids: Ids,
    link: Link,
    snapshot: dict[str, Link],
    names: dict[int, str],
    recreate: bool,
) -> tuple[list[Change], TapResult]:
    """Changes that make the existing ``link`` match ``spec``."""
    if not _is_tap(link):
        raise Mismatch(f"{spec.name} exists and is a {_kind(link)} device, not a tap")
    assert link.tun is not None
    t = link.tun
    fixed: list[str] = []  # what only a recreate can change
    if t.multi_queue != spec.multi_queue:
        fixed.append(f"queue mode {_mode(t.multi_queue)} -> {_mode(spec.multi_queue)}")
    tunable: list[str] = []  # what a re-attach can change while nobody holds the tap
    if t.vnet_hdr != spec.vnet_hdr:
        tunable.append(f"vnet_hdr {_onoff(t.vnet_hdr)} -> {_onoff(spec.vnet_hdr)}")
    if t.pi:
        tunable.append("packet info on -> off")
    if ids.owner is not None and t.owner != ids.owner:
        tunable.append(f"owner {t.owner} -> {ids.owner}")
    if ids.group is not None and t.group != ids.group:
        tunable.append(f"group {t.group} -> {ids.group}")
    if (fixed or tunable) and t.attached_queues:
        raise _in_use(link, ", ".join(fixed + tunable))

    if fixed:
        if not recreate:
            raise Mismatch(
                f"tap {spec.name}: {', '.join(fixed)} needs the tap to be recreated "
                "(ask for a recreate, or delete it first)"
            )
        if link.alias != MANAGED_ALIAS:
            raise NotManaged(
                f"tap {spec.name}: {', '.join(fixed)} needs a recreate, "
                "and vhostorch did not create this tap, so it will not delete it"
            )
        recreated = [Change(DeleteLink(spec.name), _restore(link, names)), *_new_tap(spec, ids)]
        return recreated, TapResult(spec.name, "recreated", tuple(fixed + tunable))

    changes: list[Change] = []
    if tunable:
        new = TapFlags(t.multi_queue, spec.vnet_hdr)
        old = TapFlags(t.multi_queue, t.vnet_hdr)
        # (uid_t)-1 cannot be set back through TUNSETOWNER, so an owner added
        # to a tap that had none stays if a later step is rolled back.
        changes.append(
            Change(
                RetuneTap(spec.name, new, ids.owner, ids.group),
                (RetuneTap(spec.name, old, t.owner, t.group),),
            )
        )
    want: dict[str, object] = {}
    was: dict[str, object] = {}
    described: list[str] = []

    def differ(key: str, old: object, new: object, label: str, shown_old: object = None) -> None:
        if new is not None and old != new:
            want[key], was[key] = new, old
            before = old if shown_old is None else shown_old
            described.append(f"{label} {before} -> {new}")

    differ("mtu", link.mtu, spec.mtu, "mtu")
    differ("mac", link.mac, spec.mac, "mac")
    if spec.bridge is not None:
        current = names.get(link.master) if link.master else None
        if current != spec.bridge:
            want["master"], was["master"] = spec.bridge, current or NO_MASTER
            described.append(f"bridge {current or 'none'} -> {spec.bridge}")
    if link.up != spec.up:
        want["up"], was["up"] = spec.up, link.up
        described.append("up" if spec.up else "down")
    if want:
        changes.append(
            Change(SetLink(spec.name, **want), (SetLink(spec.name, **was),))  # type: ignore[arg-type]
        )
    action = "changed" if changes else "unchanged"
    return changes, TapResult(spec.name, action, tuple(tunable + described))


def plan_ensure(
    specs: Sequence[TapSpec],
    snapshot: dict[str, Link],
    ids: dict[str, Ids],
    *,
    recreate: bool = False,
    exist_ok: bool = True,
) -> Plan:
    """Pure: the changes that make every spec true, or the reason they cannot be made."""
    check_batch(specs)
    names = {link.index: name for name, link in snapshot.items()}
    changes: list[Change] = []
    results: list[TapResult] = []
    new_bridges: set[str] = set()
    for spec in specs:
        if spec.bridge is not None:
            bridge = snapshot.get(spec.bridge)
            if bridge is not None and bridge.kind != "bridge":
                raise Mismatch(
                    f"tap {spec.name}: {spec.bridge} is a {_kind(bridge)} device, not a bridge"
                )
            if bridge is None and spec.bridge not in new_bridges:
                if not spec.create_bridge:
                    raise OperationFailed(
                        f"tap {spec.name}: bridge {spec.bridge!r} does not exist "
                        "(ask for it to be created, or create it first)"
                    )
                new_bridges.add(spec.bridge)
                changes.append(Change(CreateBridge(spec.bridge), (DeleteLink(spec.bridge),)))
        link = snapshot.get(spec.name)
        if link is None:
            changes += _new_tap(spec, ids[spec.name])
            results.append(TapResult(spec.name, "created"))
            continue
        if not exist_ok:
            raise OperationFailed(f"tap {spec.name}: a {_kind(link)} device of that name exists")
        more, result = _plan_tap(spec, ids[spec.name], link, snapshot, names, recreate)
        changes += more
        results.append(result)
    return Plan(tuple(changes), tuple(results))


def plan_delete(
    names: Sequence[str],
    snapshot: dict[str, Link],
    *,
    bridges: Sequence[str] = (),
    force: bool = False,
) -> Plan:
    """Pure: delete the taps vhostorch made (any tap with ``force``), and then each of
    ``bridges`` that vhostorch made and that has no port left."""
    changes: list[Change] = []
    results: list[TapResult] = []
    gone: set[str] = set()
    for name in names:
        link = snapshot.get(name)
        if link is None:
            results.append(TapResult(name, "absent"))
            continue
        if not _is_tap(link):
            raise NotManaged(f"{name} is a {_kind(link)} device, not a tap; not deleting it")
        if link.alias != MANAGED_ALIAS and not force:
            raise NotManaged(f"tap {name} was not created by vhostorch; not deleting it")
        assert link.tun is not None
        if link.tun.attached_queues:
            raise _in_use(link, "deleting it was asked for")
        changes.append(Change(DeleteLink(name)))
        results.append(TapResult(name, "deleted"))
        gone.add(name)
    for bridge_name in dict.fromkeys(bridges):
        bridge = snapshot.get(bridge_name)
        if bridge is None or bridge.kind != "bridge" or bridge.alias != MANAGED_ALIAS:
            continue
        ports = [n for n, link in snapshot.items() if link.master == bridge.index and n not in gone]
        if not ports:
            changes.append(Change(DeleteLink(bridge_name)))
    return Plan(tuple(changes), tuple(results))


def apply(changes: Sequence[Change], host: Host) -> None:
    """Run every step; if one fails (or we are interrupted), undo the ones done, newest first."""
    done: list[Change] = []
    try:
        for change in changes:
            host.do(change.step)
            done.append(change)
    except BaseException as err:
        leftovers: list[str] = []
        for change in reversed(done):
            for undo in change.undo:
                try:
                    host.do(undo)
                except OperationFailed as undo_err:
                    leftovers.append(str(undo_err))
        if leftovers and isinstance(err, OperationFailed):
            raise RollbackFailed(
                f"{err}; undoing the steps before it failed too: {'; '.join(leftovers)}",
                err,
                leftovers,
            ) from err
        raise


def _in_namespace(name: str | None, work: Callable[[KernelHost], T]) -> T:
    try:
        with netns.entered(name), Rtnl() as rtnl:
            return work(KernelHost(rtnl))
    except InUse as err:
        who = ", ".join(f"pid {pid} ({comm})" for pid, comm in tun.holders(err.name))
        raise InUse(f"{err}; held by {who}" if who else str(err), err.name) from None
    except OSError as err:
        raise KernelError(f"netlink: {_describe(err)}", err.errno or 0) from err


def ensure(
    specs: Sequence[TapSpec],
    *,
    recreate: bool = False,
    keep_existing: bool = False,
    adopt_foreign: bool = True,
    dry_run: bool = False,
) -> list[TapResult]:
    """Make the taps of one VM match ``specs``, all or nothing.

    With ``keep_existing`` (what starting a VM uses) an existing tap is taken only
    as it is: one that differs from its spec, or that a process holds open, is
    refused rather than changed, so nothing that existed before is modified.
    Without ``adopt_foreign`` (the libvirt hook), an existing tap that vhostorch
    did not create is refused too. ``dry_run`` plans and refuses as usual and
    changes nothing (Ansible's check mode).

    Raises InvalidSpec for bad input, OperationFailed (and its subclasses) when the
    host refuses; after an OperationFailed the host is as it was before the call,
    unless RollbackFailed says what is left.
    """
    namespace = check_batch(specs)
    ids = {spec.name: resolve_ids(spec) for spec in specs}

    def work(host: KernelHost) -> list[TapResult]:
        snapshot = host.snapshot()
        if not adopt_foreign:
            for spec in specs:
                link = snapshot.get(spec.name)
                if link is not None and link.alias != MANAGED_ALIAS:
                    raise NotManaged(
                        f"{_kind(link)} {spec.name} exists and vhostorch did not create it; "
                        "not taking it over"
                    )
        plan = plan_ensure(specs, snapshot, ids, recreate=recreate)
        if keep_existing:
            _refuse_existing(plan, snapshot)
        if not dry_run:
            apply(plan.changes, host)
        return list(plan.results)

    return _in_namespace(namespace, work)


def _refuse_existing(plan: Plan, snapshot: dict[str, Link]) -> None:
    for result in plan.results:
        if result.action not in ("created", "unchanged"):
            raise Mismatch(
                f"tap {result.name} exists and differs from the spec "
                f"({', '.join(result.changes)}); a VM start does not change taps it did not "
                "create (vhostorch tap create does)"
            )
        link = snapshot.get(result.name)
        if link is not None and link.tun is not None and link.tun.attached_queues:
            raise InUse(
                f"tap {link.name} is held open ({link.tun.attached_queues} queue(s) attached) "
                "and a VM must not share it",
                link.name,
            )


def create(specs: Sequence[TapSpec]) -> list[TapResult]:
    """Create new taps, all or nothing; fails without touching anything if a name is taken."""
    namespace = check_batch(specs)
    ids = {spec.name: resolve_ids(spec) for spec in specs}

    def work(host: KernelHost) -> list[TapResult]:
        plan = plan_ensure(specs, host.snapshot(), ids, exist_ok=False)
        apply(plan.changes, host)
        return list(plan.results)

    return _in_namespace(namespace, work)


def delete(
    names: Sequence[str],
    *,
    netns: str | None = None,
    bridges: Sequence[str] = (),
    force: bool = False,
    dry_run: bool = False,
) -> list[TapResult]:
    """Delete taps vhostorch created (and listed bridges it created once empty).

    Every refusal (not a tap, not ours, held open) happens before anything is deleted;
    ``dry_run`` stops there.
    """
    for name in [*names, *bridges]:
        check_ifname(name)

    def work(host: KernelHost) -> list[TapResult]:
        plan = plan_delete(names, host.snapshot(), bridges=bridges, force=force)
        if not dry_run:
            apply(plan.changes, host)
        return list(plan.results)

    return _in_namespace(netns, work)


def _state(link: Link, names: dict[int, str], namespace: str | None) -> TapState:
    assert link.tun is not None
    return TapState(
        name=link.name,
        netns=namespace,
        ifindex=link.index,
        queue_mode=_mode(link.tun.multi_queue),
        vnet_hdr=link.tun.vnet_hdr,
        no_pi=not link.tun.pi,
        persist=link.tun.persist,
        owner=link.tun.owner,
        group=link.tun.group,
        mtu=link.mtu,
        mac=link.mac,
        bridge=names.get(link.master) if link.master else None,
        up=link.up,
        carrier=link.carrier,
        attached_queues=link.tun.attached_queues,
        managed=link.alias == MANAGED_ALIAS,
    )


def show(name: str | None = None, *, netns: str | None = None) -> list[TapState]:
    """The tap called ``name``, or every tap in the namespace when ``name`` is None."""
    if name is not None:
        check_ifname(name, "tap name")

    def work(host: KernelHost) -> list[TapState]:
        links = host.snapshot()
        names = {link.index: n for n, link in links.items()}
        if name is None:
            return [_state(link, names, netns) for link in links.values() if _is_tap(link)]
        link = links.get(name)
        if link is None:
            raise OperationFailed(f"tap {name} does not exist")
        if not _is_tap(link):
            raise OperationFailed(f"{name} is a {_kind(link)} device, not a tap")
        return [_state(link, names, netns)]

    return _in_namespace(netns, work)


__all__ = [
    "MANAGED_ALIAS",
    "Change",
    "Host",
    "KernelHost",
    "Plan",
    "TapResult",
    "TapState",
    "apply",
    "create",
    "delete",
    "ensure",
    "plan_delete",
    "plan_ensure",
    "show",
]
