"""Tap provisioning on the host: read a namespace, plan (taps.plan), apply all or none.

`apply` runs a plan's steps through a host and, when one fails, runs the undo
steps of those done. `ensure`, `create`, `delete` and `show` are the front
doors: each enters the tap's network namespace, opens rtnetlink there and turns
any kernel error into a KernelError.
"""

from __future__ import annotations

import errno
import grp
import pwd

from vhostorch.errors import InUse, InvalidSpec, KernelError, OperationFailed, RollbackFailed
from vhostorch.kernel import netns, tun
from vhostorch.kernel.rtnl import NetlinkError, Rtnl
from vhostorch.model import check_batch, check_ifname
from vhostorch.record import TYPE_CHECKING, Record
from vhostorch.taps.plan import (
    MANAGED_ALIAS,
    NO_MASTER,
    CreateTap,
    DeleteLink,
    Ids,
    RetuneTap,
    SetLink,
    TapResult,
    device_kind,
    is_tap,
    plan_delete,
    plan_ensure,
    queue_mode,
    refuse_existing,
    refuse_foreign,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Protocol, TypeVar

    from vhostorch.kernel.rtnl import Link
    from vhostorch.model import TapSpec
    from vhostorch.taps.plan import Change, Step

    T = TypeVar("T")

    class Host(Protocol):
        """Where plans are read from and applied: the kernel, or a test's wrapper around it."""

        def snapshot(self) -> dict[str, Link]: ...

        def do(self, step: Step) -> None: ...


class TapState(Record):
    """A tap as the kernel reports it, for `show`."""

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

    def __init__(
        self,
        *,
        name: str,
        netns: str | None,
        ifindex: int,
        queue_mode: str,
        vnet_hdr: bool,
        no_pi: bool,
        persist: bool,
        owner: int | None,
        group: int | None,
        mtu: int,
        mac: str | None,
        bridge: str | None,
        up: bool,
        carrier: bool | None,
        attached_queues: int,
        managed: bool,
    ) -> None:
        self._init(
            name=name,
            netns=netns,
            ifindex=ifindex,
            queue_mode=queue_mode,
            vnet_hdr=vnet_hdr,
            no_pi=no_pi,
            persist=persist,
            owner=owner,
            group=group,
            mtu=mtu,
            mac=mac,
            bridge=bridge,
            up=up,
            carrier=carrier,
            attached_queues=attached_queues,
            managed=managed,
        )


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
            refuse_foreign(specs, snapshot)
        plan = plan_ensure(specs, snapshot, ids, recreate=recreate)
        if keep_existing:
            refuse_existing(plan, snapshot)
        if not dry_run:
            apply(plan.changes, host)
        return list(plan.results)

    return _in_namespace(namespace, work)


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
        queue_mode=queue_mode(link.tun.multi_queue),
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
            return [_state(link, names, netns) for link in links.values() if is_tap(link)]
        link = links.get(name)
        if link is None:
            raise OperationFailed(f"tap {name} does not exist")
        if not is_tap(link):
            raise OperationFailed(f"{name} is a {device_kind(link)} device, not a tap")
        return [_state(link, names, netns)]

    return _in_namespace(netns, work)
