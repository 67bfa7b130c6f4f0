"""Tap provisioning on the host: read a namespace, plan (taps.plan), apply all or none.

`apply` runs a plan's steps through a host and, when one fails, runs the undo
steps of those done; runs of independent link changes go to the host together,
which sends them as one batch of netlink requests. `ensure`, `create` and `show`
are the front doors (`delete` is in taps.teardown): each enters the tap's network
namespace (`in_namespace`), opens rtnetlink there and turns any kernel error into a
KernelError.
"""

from __future__ import annotations

import errno
import grp
import pwd

from vhostorch.errors import InUse, InvalidSpec, KernelError, OperationFailed, RollbackFailed
from vhostorch.inputs import check_ifname
from vhostorch.kernel import netns, tun
from vhostorch.kernel.rtnl import NetlinkError, Request, Rtnl, set_link_request
from vhostorch.record import TYPE_CHECKING, Record
from vhostorch.taps.plan import (
    BATCHABLE,
    MANAGED_ALIAS,
    NO_MASTER,
    CreateTap,
    DeleteGroup,
    DeleteLink,
    Ids,
    RetuneTap,
    SetGroup,
    SetLink,
    TapResult,
    device_kind,
    is_tap,
    managed,
    plan_ensure,
    queue_mode,
    refuse_existing,
    refuse_foreign,
)
from vhostorch.taps.spec import check_batch

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Iterator, Sequence
    from typing import Protocol, TypeVar

    from vhostorch.kernel.rtnl import Link
    from vhostorch.taps.plan import Change, Step
    from vhostorch.taps.spec import TapSpec

    T = TypeVar("T")

    class Host(Protocol):
        """Where plans are read from and applied: the kernel, or a test's wrapper around it."""

        def snapshot(self, probe: Collection[str] = ()) -> dict[str, Link]:
            """Every link by name. The taps named in ``probe`` are known held or not exactly
            (a single-queue tap's carrier is only a guess: `KernelHost.snapshot`)."""
            ...

        def do(self, steps: Sequence[Step]) -> list[OperationFailed | None]:
            """Run ``steps``, which do not depend on each other (so may be sent together):
            every one is attempted; the answer is each one's error, or None."""
            ...


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


def _carrier_off_single_queue(link: Link) -> bool:
    return is_tap(link) and link.tun is not None and not link.tun.multi_queue and not link.carrier


def _describe(err: OSError) -> str:
    text = str(err) if isinstance(err, NetlinkError) else err.strerror or str(err)
    if err.errno == errno.EPERM:
        text += " (needs root or CAP_NET_ADMIN)"
    return text


def _kernel_error(step: Step, err: OSError) -> KernelError:
    failed = KernelError(f"{step}: {_describe(err)}", err.errno or 0)
    failed.__cause__ = err  # as `raise ... from err` would, for an error returned, not raised
    return failed


class KernelHost:
    """Applies steps with rtnetlink and tun ioctls in the namespace ``rtnl`` was opened in."""

    def __init__(self, rtnl: Rtnl) -> None:
        self._rtnl = rtnl
        self._index: dict[str, int] = {}

    def snapshot(self, probe: Collection[str] = ()) -> dict[str, Link]:
        """Every link by name; for the single-queue taps named in ``probe`` whose carrier
        is off, whether they are held is asked of tun (`Rtnl.tun_attached`), as carrier
        off is what an unheld tap shows and what root can switch a held one to. Where the
        kernel does not say, a process with a tun fd on that name (/proc/*/fdinfo, any
        namespace) counts as holding it."""
        links = self._rtnl.links()
        self._index = {name: link.index for name, link in links.items()}
        unsure = [
            links[name]
            for name in dict.fromkeys(probe)
            if name in links and _carrier_off_single_queue(links[name])
        ]
        if unsure:
            for link, attached in zip(unsure, self._rtnl.tun_attached(unsure), strict=True):
                if attached is None:
                    attached = bool(tun.holders(link.name))
                if attached:
                    assert link.tun is not None
                    links[link.name] = link.replace(tun=link.tun.replace(attached_queues=1))
        return links

    def _ifindex(self, name: str) -> int:
        if name not in self._index:
            link = self._rtnl.link(name)
            if link is None:
                raise KernelError(f"bridge {name!r} does not exist", errno.ENODEV)
            self._index[name] = link.index
        return self._index[name]

    def do(self, steps: Sequence[Step]) -> list[OperationFailed | None]:
        if len(steps) > 1 and all(isinstance(step, BATCHABLE) for step in steps):
            return self._batch(steps)
        outcomes: list[OperationFailed | None] = []
        for step in steps:
            try:
                self._do(step)
                outcomes.append(None)
            except OperationFailed as err:
                outcomes.append(err)
            except OSError as err:
                outcomes.append(_kernel_error(step, err))
        return outcomes

    def _request(self, step: Step) -> Request:
        if isinstance(step, SetGroup):
            return set_link_request(index=step.index, group=step.group)
        assert isinstance(step, SetLink)
        index = None
        if step.master is not None:
            index = 0 if step.master == NO_MASTER else self._ifindex(step.master)
        return set_link_request(
            step.name, up=step.up, mtu=step.mtu, mac=step.mac, master=index, alias=step.alias
        )

    def _batch(self, steps: Sequence[Step]) -> list[OperationFailed | None]:
        outcomes: list[OperationFailed | None] = [None] * len(steps)
        requests: list[Request] = []
        sent: list[int] = []
        for i, step in enumerate(steps):
            try:
                requests.append(self._request(step))
                sent.append(i)
            except OperationFailed as err:
                outcomes[i] = err
        for i, answer in zip(sent, self._rtnl.batch(requests), strict=True):
            if answer is not None:
                outcomes[i] = _kernel_error(steps[i], answer)
        return outcomes

    def _do(self, step: Step) -> None:
        # Subclasses before their bases: a RetuneTap is a CreateTap too.
        if isinstance(step, RetuneTap):
            tun.retune_tap(step.name, step.flags, step.owner, step.group)
        elif isinstance(step, CreateTap):
            alias = step.alias
            label = None
            if alias is not None:
                label = lambda: self._rtnl.change(set_link_request(step.name, alias=alias))  # noqa: E731
            tun.create_tap(step.name, step.flags, step.owner, step.group, label)
        elif isinstance(step, SetLink | SetGroup):
            request = self._request(step)
            [answer] = self._rtnl.batch([request])
            if answer is not None:
                raise answer
        elif isinstance(step, DeleteLink):
            # By the ifindex the last snapshot showed when it has one: a device that took
            # the name since is not the one that was checked, and is not deleted.
            self._rtnl.delete(step.name, self._index.pop(step.name, 0))
        elif isinstance(step, DeleteGroup):
            self._rtnl.delete_group(step.group)
            for name in step.taps:
                self._index.pop(name, None)
        else:
            self._rtnl.add_link(step.name, "bridge")
            self._rtnl.change(set_link_request(step.name, alias=MANAGED_ALIAS))


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


def _runs(changes: Sequence[Change]) -> Iterator[Sequence[Change]]:
    """The changes in order, consecutive independent link changes grouped into one run."""
    run: list[Change] = []
    for change in changes:
        if isinstance(change.step, BATCHABLE):
            run.append(change)
            continue
        if run:
            yield run
            run = []
        yield (change,)
    if run:
        yield run


def apply(changes: Sequence[Change], host: Host) -> None:
    """Run every step; if one fails (or we are interrupted), undo the ones done, newest first.

    A run of link changes goes to the host in one call, which attempts them all:
    when one fails, the others of its run that succeeded are undone too.
    """
    done: list[Change] = []
    try:
        for run in _runs(changes):
            outcomes = host.do([change.step for change in run])
            done += [change for change, failed in zip(run, outcomes, strict=True) if not failed]
            failures = [failed for failed in outcomes if failed is not None]
            if failures:
                raise failures[0]
    except BaseException as err:
        leftovers: list[str] = []
        for change in reversed(done):
            for undo in change.undo:
                [failed] = host.do([undo])
                if failed is not None:
                    leftovers.append(str(failed))
        if leftovers and isinstance(err, OperationFailed):
            raise RollbackFailed(
                f"{err}; undoing the steps before it failed too: {'; '.join(leftovers)}",
                err,
                leftovers,
            ) from err
        raise


def in_namespace(name: str | None, work: Callable[[KernelHost], T]) -> T:
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
    alias: str = MANAGED_ALIAS,
) -> list[TapResult]:
    """Make the taps of one VM match ``specs``, all or nothing.

    A tap made here gets the interface alias ``alias``: MANAGED_ALIAS, or the `mark` of
    the start making it (so that what a killed start left is known by more than its name).

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
        # With recreate, a tap may be deleted: whether it is held must be exact.
        snapshot = host.snapshot([spec.name for spec in specs] if recreate else ())
        if not adopt_foreign:
            refuse_foreign(specs, snapshot)
        plan = plan_ensure(specs, snapshot, ids, recreate=recreate, alias=alias)
        if keep_existing:
            refuse_existing(plan, snapshot)
        if not dry_run:
            apply(plan.changes, host)
        return list(plan.results)

    return in_namespace(namespace, work)


def create(specs: Sequence[TapSpec]) -> list[TapResult]:
    """Create new taps, all or nothing; fails without touching anything if a name is taken."""
    namespace = check_batch(specs)
    ids = {spec.name: resolve_ids(spec) for spec in specs}

    def work(host: KernelHost) -> list[TapResult]:
        plan = plan_ensure(specs, host.snapshot(), ids, exist_ok=False)
        apply(plan.changes, host)
        return list(plan.results)

    return in_namespace(namespace, work)


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
        managed=managed(link),
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

    return in_namespace(netns, work)
