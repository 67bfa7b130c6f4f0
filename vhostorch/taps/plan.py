"""Tap plans: the steps, their undo steps and the results, computed without touching the host.

`plan_ensure` turns specs and a snapshot of the links into
steps, each with the steps that undo it; they refuse (raise) before anything is
touched whenever the snapshot already shows that the work cannot succeed.
Everything here is pure: `taps.apply` reads the snapshot and runs the steps.

Ownership is recorded on the device itself: vhostorch sets the interface alias
to MANAGED_ALIAS on what it creates, and only deletes (or recreates) devices
carrying it, so a cleanup never removes a tap or bridge someone else made. A tap
made for one VM start or one hook call carries ``MANAGED_ALIAS:TAG`` instead
(`mark`), TAG drawn for that start and recorded before the tap is made: what a
killed start left is then recognised as that start's own device, never by its name
alone. The alias is set before the tap is made persistent (kernel.tun.create_tap),
so no kill leaves a tap of ours without it.
"""

from __future__ import annotations

import os

from vhostorch.errors import InUse, Mismatch, NotManaged, OperationFailed
from vhostorch.kernel.tun import TapFlags
from vhostorch.record import TYPE_CHECKING, Record
from vhostorch.taps.spec import check_batch

if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Literal

    from vhostorch.kernel.rtnl import Link
    from vhostorch.taps.spec import TapSpec

    Action = Literal[
        "created", "changed", "recreated", "unchanged", "deleted", "absent", "replaced"
    ]

MANAGED_ALIAS = "vhostorch"
TAG_SEPARATOR = ":"  # MANAGED_ALIAS:TAG marks the taps of one start (`mark`)
NO_MASTER = ""  # SetLink.master value that detaches the link from its bridge


class CreateTap(Record):
    """Make tap ``name``; ``alias`` is set on it before it is made persistent, so a kill at
    any moment leaves no tap of that name without it."""

    name: str
    flags: TapFlags
    owner: int | None
    group: int | None
    alias: str | None = None

    def __str__(self) -> str:
        return f"create tap {self.name}"


class RetuneTap(CreateTap):
    """Re-attach to an existing tap to change vnet_hdr, owner or group."""

    def __str__(self) -> str:
        return f"re-tune tap {self.name}"


class SetLink(Record):
    """A change of link attributes; None leaves one alone, NO_MASTER detaches."""

    name: str
    up: bool | None = None
    mtu: int | None = None
    mac: str | None = None
    master: str | None = None
    alias: str | None = None

    def __str__(self) -> str:
        parts = [f"{k}={v}" for k, v in self.fields() if k != "name" and v is not None]
        return f"set {self.name} " + " ".join(p.replace("master=", "bridge=") for p in parts)


class CreateBridge(Record):
    name: str

    def __str__(self) -> str:
        return f"create bridge {self.name}"


class DeleteLink(CreateBridge):
    def __str__(self) -> str:
        return f"delete {self.name}"


class SetGroup(Record):
    """Move the link numbered ``index`` (called ``name`` when it was read) to link ``group``."""

    name: str
    index: int
    group: int

    def __str__(self) -> str:
        return f"set {self.name} group={self.group}"


class DeleteGroup(Record):
    """Delete every device of link ``group``: ``taps`` are the ones moved there to die."""

    group: int
    taps: tuple[str, ...]

    def __str__(self) -> str:
        return f"delete link group {self.group} ({len(self.taps)} taps)"


Step = CreateTap | SetLink | CreateBridge | SetGroup | DeleteGroup
# Steps the host may send together: independent link changes, one netlink request each.
BATCHABLE = (SetLink, SetGroup)


class Change(Record):
    """A step and the steps that undo it."""

    step: Step
    undo: tuple[Step, ...] = ()


class TapResult(Record):
    """What happened to one tap: created, changed, recreated, unchanged, deleted or absent;
    or replaced: the device of that name is not the one vhostorch made, and was left alone."""

    name: str
    action: Action
    changes: tuple[str, ...] = ()


class DeleteResult(TapResult):
    """What `delete` did to one tap; ``batched`` says how the call deleted its taps.

    True: every tap of the call went in one group delete (one RTM_DELLINK by
    IFLA_GROUP, one RCU grace period). False: one RTM_DELLINK per tap, because
    there was at most one tap to delete, or the kernel refused the group delete
    (then ``changes`` says so).
    """

    batched: bool = False


class Plan(Record):
    changes: tuple[Change, ...]
    results: tuple[TapResult, ...]


class Ids(Record):
    """Owner and group of a tap as numeric ids, resolved from the spec's names."""

    owner: int | None
    group: int | None


def device_kind(link: Link) -> str:
    """What a link is, in words for a message: tap, tun, bridge, ..."""
    if link.tun is not None:
        return "tap" if link.tun.tap else "tun"
    return link.kind or "network"


def is_tap(link: Link) -> bool:
    return link.tun is not None and link.tun.tap


def new_tag() -> str:
    """A tag for `mark`: 64 random bits, drawn once per start and recorded before its first
    tap is made."""
    return os.urandom(8).hex()


def mark(tag: str) -> str:
    """The alias of the taps made by the start (or hook call) whose tag is ``tag``."""
    return f"{MANAGED_ALIAS}{TAG_SEPARATOR}{tag}"


def managed(link: Link) -> bool:
    """Whether vhostorch made ``link``: its alias is MANAGED_ALIAS, or a start's `mark`."""
    alias = link.alias or ""
    return alias == MANAGED_ALIAS or alias.startswith(MANAGED_ALIAS + TAG_SEPARATOR)


def _onoff(value: bool) -> str:
    return "on" if value else "off"


def queue_mode(multi: bool) -> str:
    """A tap's queue mode, as `show` reports it."""
    return "multi" if multi else "single"


def held(link: Link) -> bool:
    """Whether a process holds tap ``link`` open: a queue attached, or one detached
    (TUNSETQUEUE IFF_DETACH_QUEUE: QEMU detaches the queues its guest does not use, so a
    running VM's multi-queue tap may show none attached and some disabled)."""
    return link.tun is not None and bool(link.tun.attached_queues or link.tun.disabled_queues)


def holding(link: Link) -> str:
    """How ``link`` is held, for a message: its queues attached (and detached, if any)."""
    assert link.tun is not None
    text = f"{link.tun.attached_queues} queue(s) attached"
    if link.tun.disabled_queues:
        text += f", {link.tun.disabled_queues} detached"
    return text


def in_use(link: Link, what: str) -> InUse:
    return InUse(
        f"tap {link.name}: {what}, and it is held open ({holding(link)}), "
        "so it cannot be changed now",
        link.name,
    )


def _new_tap(spec: TapSpec, ids: Ids, alias: str) -> list[Change]:
    flags = TapFlags(spec.multi_queue, spec.vnet_hdr)
    set_all = SetLink(
        spec.name, up=True if spec.up else None, mtu=spec.mtu, mac=spec.mac, master=spec.bridge
    )
    create = CreateTap(spec.name, flags, ids.owner, ids.group, alias)
    return [Change(create, (DeleteLink(spec.name),)), Change(set_all)]


def _restore(link: Link, names: dict[int, str]) -> tuple[Step, ...]:
    """Steps that bring back a tap as ``link`` shows it, after it was deleted."""
    assert link.tun is not None
    flags = TapFlags(link.tun.multi_queue, link.tun.vnet_hdr)
    master = names.get(link.master) if link.master else None
    return (
        CreateTap(link.name, flags, link.tun.owner, link.tun.group, link.alias),
        SetLink(link.name, up=link.up, mtu=link.mtu, mac=link.mac, master=master),
    )


def _plan_tap(
    spec: TapSpec,
    ids: Ids,
    link: Link,
    names: dict[int, str],
    recreate: bool,
    alias: str,
) -> tuple[list[Change], TapResult]:
    """Changes that make the existing ``link`` match ``spec``."""
    if not is_tap(link):
        raise Mismatch(f"{spec.name} exists and is a {device_kind(link)} device, not a tap")
    assert link.tun is not None
    t = link.tun
    fixed: list[str] = []  # what only a recreate can change
    if t.multi_queue != spec.multi_queue:
        fixed.append(f"queue mode {queue_mode(t.multi_queue)} -> {queue_mode(spec.multi_queue)}")
    tunable: list[str] = []  # what a re-attach can change while nobody holds the tap
    if t.vnet_hdr != spec.vnet_hdr:
        tunable.append(f"vnet_hdr {_onoff(t.vnet_hdr)} -> {_onoff(spec.vnet_hdr)}")
    if t.pi:
        tunable.append("packet info on -> off")
    if ids.owner is not None and t.owner != ids.owner:
        tunable.append(f"owner {t.owner} -> {ids.owner}")
    if ids.group is not None and t.group != ids.group:
        tunable.append(f"group {t.group} -> {ids.group}")
    if (fixed or tunable) and held(link):
        raise in_use(link, ", ".join(fixed + tunable))

    if fixed:
        if not recreate:
            raise Mismatch(
                f"tap {spec.name}: {', '.join(fixed)} needs the tap to be recreated "
                "(ask for a recreate, or delete it first)"
            )
        if not managed(link):
            raise NotManaged(
                f"tap {spec.name}: {', '.join(fixed)} needs a recreate, "
                "and vhostorch did not create this tap, so it will not delete it"
            )
        recreated = [
            Change(DeleteLink(spec.name), _restore(link, names)),
            *_new_tap(spec, ids, alias),
        ]
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

    def differ(key: str, old: object, new: object) -> None:
        if new is not None and old != new:
            want[key], was[key] = new, old
            described.append(f"{key} {old} -> {new}")

    differ("mtu", link.mtu, spec.mtu)
    differ("mac", link.mac, spec.mac)
    if spec.bridge is not None:
        current = names.get(link.master) if link.master else None
        if current != spec.bridge:
            want["master"], was["master"] = spec.bridge, current or NO_MASTER
            described.append(f"bridge {current or 'none'} -> {spec.bridge}")
    if link.up != spec.up:
        want["up"], was["up"] = spec.up, link.up
        described.append("up" if spec.up else "down")
    if want:
        unset = SetLink(spec.name)
        changes.append(Change(unset.replace(**want), (unset.replace(**was),)))
    action: Action = "changed" if changes else "unchanged"
    return changes, TapResult(spec.name, action, tuple(tunable + described))


def plan_ensure(
    specs: Sequence[TapSpec],
    snapshot: dict[str, Link],
    ids: dict[str, Ids],
    *,
    recreate: bool = False,
    exist_ok: bool = True,
    alias: str = MANAGED_ALIAS,
) -> Plan:
    """Pure: the changes that make every spec true, or the reason they cannot be made.
    A tap made (or recreated) gets ``alias`` (a start's `mark`, or MANAGED_ALIAS)."""
    check_batch(specs)
    names = {link.index: name for name, link in snapshot.items()}
    changes: list[Change] = []
    results: list[TapResult] = []
    new_bridges: set[str] = set()
    for spec in specs:
        if spec.bridge is not None:
            bridge = snapshot.get(spec.bridge)
            if bridge is not None and bridge.kind != "bridge":
                kind = device_kind(bridge)
                raise Mismatch(f"tap {spec.name}: {spec.bridge} is a {kind} device, not a bridge")
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
            changes += _new_tap(spec, ids[spec.name], alias)
            results.append(TapResult(spec.name, "created"))
            continue
        if not exist_ok:
            raise OperationFailed(
                f"tap {spec.name}: a {device_kind(link)} device of that name exists"
            )
        more, result = _plan_tap(spec, ids[spec.name], link, names, recreate, alias)
        changes += more
        results.append(result)
    # Link changes last, after every tap and bridge exists: they then run as one
    # batch of netlink requests (taps.apply), not one round trip per tap.
    ordered = [c for c in changes if not isinstance(c.step, SetLink)]
    ordered += [c for c in changes if isinstance(c.step, SetLink)]
    return Plan(tuple(ordered), tuple(results))


def refuse_foreign(specs: Sequence[TapSpec], snapshot: dict[str, Link]) -> None:
    """Raise NotManaged if a device named by ``specs`` exists and vhostorch did not create it."""
    for spec in specs:
        link = snapshot.get(spec.name)
        if link is not None and not managed(link):
            raise NotManaged(
                f"{device_kind(link)} {spec.name} exists and vhostorch did not create it; "
                "not taking it over"
            )


def refuse_existing(plan: Plan, snapshot: dict[str, Link]) -> None:
    """Raise unless ``plan`` only creates taps or takes existing ones as they are, unheld."""
    for result in plan.results:
        if result.action not in ("created", "unchanged"):
            raise Mismatch(
                f"tap {result.name} exists and differs from the spec "
                f"({', '.join(result.changes)}); a VM start does not change taps it did not "
                "create (vhostorch tap create does)"
            )
        link = snapshot.get(result.name)
        if link is not None and held(link):
            raise InUse(
                f"tap {link.name} is held open ({holding(link)}) and a VM must not share it",
                link.name,
            )
