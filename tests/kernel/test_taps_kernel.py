"""Tap provisioning against the real kernel, in throwaway namespaces, read back with iproute2."""

from __future__ import annotations

import errno
import fcntl
import grp
import os
import pwd
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Sequence

import pytest

from tests.support import kernel
from tests.support.kernel import (
    IFF_MULTI_QUEUE,
    IFF_NO_PI,
    IFF_PERSIST,
    IFF_TAP,
    IFF_VNET_HDR,
    Opener,
    link,
    links,
    qemu_can_open,
    run,
    sysfs,
    tun_flags,
)
from vhostorch import taps
from vhostorch.errors import InUse, Mismatch, NotManaged, OperationFailed, RollbackFailed
from vhostorch.kernel import netns
from vhostorch.kernel.rtnl import Link, Rtnl, set_link_request
from vhostorch.taps import TapSpec

pytestmark = pytest.mark.kernel

QEMU_USER = "libvirt-qemu"  # made by libvirt-daemon-system, which setup installs
QEMU_GROUP = "kvm"


def test_single_queue_tap_has_the_flags_qemu_asks_for(ns: str) -> None:
    [result] = taps.ensure([TapSpec("vt0", netns=ns)])
    assert result.action == "created"
    flags = tun_flags(ns, "vt0")
    assert flags & (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_PERSIST) == (
        IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_PERSIST
    )
    assert not flags & IFF_MULTI_QUEUE
    assert qemu_can_open(ns, "vt0", 1) == "ok"
    # The mismatch the issue warns about is real: multi-queue open of a single-queue tap fails.
    assert qemu_can_open(ns, "vt0", 2) == f"errno {errno.EINVAL}"


def test_multi_queue_tap_opens_once_per_queue_for_the_qemu_user(ns: str) -> None:
    spec = TapSpec("vt1", queues=4, owner=QEMU_USER, group=QEMU_GROUP, netns=ns)
    taps.ensure([spec])
    flags = tun_flags(ns, "vt1")
    assert flags & IFF_MULTI_QUEUE and flags & IFF_VNET_HDR and flags & IFF_NO_PI
    assert int(sysfs(ns, "vt1", "owner")) == pwd.getpwnam(QEMU_USER).pw_uid
    assert int(sysfs(ns, "vt1", "group")) == grp.getgrnam(QEMU_GROUP).gr_gid
    info = link(ns, "vt1")["linkinfo"]["info_data"]
    assert info["multi_queue"] is True and info["user"] == QEMU_USER
    with Opener(ns, "vt1", 4) as qemu:
        assert qemu.ok
        [state] = taps.show("vt1", netns=ns)
        assert state.attached_queues == 4 and state.carrier is True
    assert qemu_can_open(ns, "vt1", 1) == f"errno {errno.EINVAL}"


def test_no_vnet_hdr(ns: str) -> None:
    taps.ensure([TapSpec("vt2", vnet_hdr=False, netns=ns)])
    assert not tun_flags(ns, "vt2") & IFF_VNET_HDR
    assert qemu_can_open(ns, "vt2", 1, vnet_hdr=False) == "ok"


def test_mtu_mac_bridge_and_state(ns: str) -> None:
    run("ip", "-n", ns, "link", "add", "br0", "type", "bridge")
    spec = TapSpec("vt3", mtu=9000, mac="52:54:00:AB:CD:EF", bridge="br0", netns=ns)
    taps.ensure([spec])
    got = link(ns, "vt3")
    assert got["mtu"] == 9000
    assert got["address"] == "52:54:00:ab:cd:ef"
    assert got["master"] == "br0"
    assert "UP" in got["flags"]
    [state] = taps.show("vt3", netns=ns)
    assert (state.bridge, state.mtu, state.managed, state.queue_mode) == (
        "br0",
        9000,
        True,
        "single",
    )


def test_ensure_is_idempotent_and_changes_in_place(ns: str) -> None:
    run("ip", "-n", ns, "link", "add", "br0", "type", "bridge")
    run("ip", "-n", ns, "link", "add", "br1", "type", "bridge")
    spec = TapSpec("vt4", queues=2, mtu=1500, bridge="br0", netns=ns)
    taps.ensure([spec])
    index = link(ns, "vt4")["ifindex"]
    assert [r.action for r in taps.ensure([spec])] == ["unchanged"]
    run("ip", "-n", ns, "link", "set", "vt4", "down")
    [again] = taps.ensure([TapSpec("vt4", queues=2, mtu=4000, bridge="br1", netns=ns)])
    assert again.action == "changed"
    assert set(again.changes) == {"mtu 1500 -> 4000", "bridge br0 -> br1", "up"}
    got = link(ns, "vt4")
    assert (got["ifindex"], got["mtu"], got["master"]) == (index, 4000, "br1")
    assert "UP" in got["flags"]


def test_vnet_hdr_and_owner_change_in_place_only_while_closed(ns: str) -> None:
    taps.ensure([TapSpec("vt5", netns=ns)])
    index = link(ns, "vt5")["ifindex"]
    [r] = taps.ensure([TapSpec("vt5", vnet_hdr=False, owner=QEMU_USER, netns=ns)])
    assert r.action == "changed" and "vnet_hdr on -> off" in r.changes
    assert link(ns, "vt5")["ifindex"] == index
    assert not tun_flags(ns, "vt5") & IFF_VNET_HDR
    assert int(sysfs(ns, "vt5", "owner")) == pwd.getpwnam(QEMU_USER).pw_uid
    with Opener(ns, "vt5", 1, vnet_hdr=False) as qemu:
        assert qemu.ok
        with pytest.raises(InUse, match=r"vt5: vnet_hdr off -> on.*held open.*pid \d+"):
            taps.ensure([TapSpec("vt5", netns=ns)])


def test_queue_mode_change_needs_recreate_and_never_of_an_open_tap(ns: str) -> None:
    taps.ensure([TapSpec("vt6", netns=ns)])
    index = link(ns, "vt6")["ifindex"]
    with pytest.raises(Mismatch, match="queue mode single -> multi"):
        taps.ensure([TapSpec("vt6", queues=4, netns=ns)])
    assert link(ns, "vt6")["ifindex"] == index
    with Opener(ns, "vt6", 1) as qemu:
        assert qemu.ok
        with pytest.raises(InUse):
            taps.ensure([TapSpec("vt6", queues=4, netns=ns)], recreate=True)
        assert link(ns, "vt6")["ifindex"] == index
    [r] = taps.ensure([TapSpec("vt6", queues=4, netns=ns)], recreate=True)
    assert r.action == "recreated"
    assert tun_flags(ns, "vt6") & IFF_MULTI_QUEUE
    assert qemu_can_open(ns, "vt6", 4) == "ok"


def test_foreign_devices_are_never_deleted_or_recreated(ns: str) -> None:
    run("ip", "-n", ns, "tuntap", "add", "dev", "own0", "mode", "tap")
    run("ip", "-n", ns, "link", "add", "veth0", "type", "veth", "peer", "name", "veth1")
    with pytest.raises(NotManaged, match="not created by vhostorch"):
        taps.delete(["own0"], netns=ns)
    with pytest.raises(NotManaged):
        taps.ensure([TapSpec("own0", queues=2, netns=ns)], recreate=True)
    with pytest.raises(Mismatch, match="veth0 exists and is a veth device"):
        taps.ensure([TapSpec("veth0", netns=ns)])
    with pytest.raises(NotManaged, match="not a tap"):
        taps.delete(["veth0"], netns=ns)
    assert {"own0", "veth0", "veth1"} <= set(links(ns))
    # Changing a foreign tap in place is allowed, and does not make it ours.
    assert taps.ensure([TapSpec("own0", mtu=1400, netns=ns)])[0].action == "changed"
    assert taps.show("own0", netns=ns)[0].managed is False
    assert [r.action for r in taps.delete(["own0"], netns=ns, force=True)] == ["deleted"]


def test_delete_refuses_an_open_tap_and_is_idempotent(ns: str) -> None:
    taps.ensure([TapSpec("vt7", queues=2, netns=ns)])
    with Opener(ns, "vt7", 2) as qemu:
        assert qemu.ok
        with pytest.raises(InUse, match="held open"):
            taps.delete(["vt7"], netns=ns)
    assert [r.action for r in taps.delete(["vt7"], netns=ns)] == ["deleted"]
    assert "vt7" not in links(ns)
    assert [r.action for r in taps.delete(["vt7"], netns=ns)] == ["absent"]


def test_bridge_is_created_only_when_asked_and_removed_only_if_ours(ns: str) -> None:
    with pytest.raises(OperationFailed, match="bridge 'brx' does not exist"):
        taps.ensure([TapSpec("vt8", bridge="brx", netns=ns)])
    assert "vt8" not in links(ns) and "brx" not in links(ns)
    taps.ensure([TapSpec(f"vt{i}", bridge="brx", create_bridge=True, netns=ns) for i in (8, 9)])
    assert link(ns, "brx")["linkinfo"]["info_kind"] == "bridge"
    taps.delete(["vt8"], netns=ns, bridges=["brx"])
    assert "brx" in links(ns)  # vt9 is still a port
    taps.delete(["vt9"], netns=ns, bridges=["brx"])
    assert "brx" not in links(ns)
    run("ip", "-n", ns, "link", "add", "brmine", "type", "bridge")
    taps.ensure([TapSpec("vt8", bridge="brmine", netns=ns)])
    taps.delete(["vt8"], netns=ns, bridges=["brmine"])
    assert "brmine" in links(ns)


def test_one_vm_is_all_or_nothing_when_the_third_bridge_is_missing(ns: str) -> None:
    run("ip", "-n", ns, "link", "add", "br0", "type", "bridge")
    specs = [TapSpec(f"vm{i}", bridge="br0" if i != 2 else "gone0", netns=ns) for i in range(4)]
    before = set(links(ns))
    with pytest.raises(OperationFailed, match="tap vm2: bridge 'gone0' does not exist"):
        taps.ensure(specs)
    assert set(links(ns)) == before


def _state(ns: str) -> dict[str, tuple[object, ...]]:
    """What a rollback must restore, read with iproute2."""
    out = {}
    for name, got in links(ns).items():
        info = got.get("linkinfo", {})
        data = info.get("info_data", {})
        # A bridge without a set address takes its ports' lowest MAC and drops
        # to zero when the last leaves: the kernel's doing, not ours to restore.
        mac = None if info.get("info_kind") == "bridge" else got["address"]
        out[name] = (
            got["ifindex"],
            got["mtu"],
            got.get("master"),
            "UP" in got["flags"],
            mac,
            data.get("multi_queue"),
            data.get("vnet_hdr"),
        )
    return out


def test_failure_mid_apply_rolls_back_on_the_real_kernel(ns: str) -> None:
    """The bridge disappears between plan and apply (another admin): a real ENODEV at tap 3."""
    run("ip", "-n", ns, "link", "add", "br0", "type", "bridge")
    run("ip", "-n", ns, "link", "add", "br1", "type", "bridge")
    taps.ensure([TapSpec("vm0", mtu=1500, netns=ns)])
    before = _state(ns)
    specs = [
        TapSpec("vm0", mtu=9000, bridge="br0", netns=ns),
        TapSpec("vm1", bridge="br0", netns=ns),
        TapSpec("vm2", bridge="br1", netns=ns),
        TapSpec("vm3", bridge="br0", netns=ns),
    ]
    with netns.entered(ns), Rtnl() as rtnl:
        host = taps.KernelHost(rtnl)
        plan = taps.plan_ensure(
            specs, host.snapshot(), {s.name: taps.Ids(None, None) for s in specs}
        )
        run("ip", "-n", ns, "link", "del", "br1")
        with pytest.raises(OperationFailed, match=r"set vm2 .*bridge=br1"):
            taps.apply(plan.changes, host)
    del before["br1"]
    assert _state(ns) == before


class FailingHost:
    """Real kernel steps, with a failure injected before step ``at``.

    A fake failure: no real kernel error can be made to happen at an arbitrary step.
    """

    def __init__(self, real: taps.KernelHost, at: int) -> None:
        self.real, self.at, self.count = real, at, 0

    def snapshot(self, probe: Collection[str] = ()) -> dict[str, Link]:
        return self.real.snapshot(probe)

    def do(self, steps: Sequence[taps.Step]) -> list[OperationFailed | None]:
        # Like the kernel with a batch: every step is attempted, the injected one fails.
        outcomes: list[OperationFailed | None] = []
        for step in steps:
            self.count += 1
            if self.count == self.at:
                outcomes.append(OperationFailed(f"injected failure at {step}"))
            else:
                outcomes += self.real.do([step])
        return outcomes


def test_failure_at_any_step_leaves_the_namespace_as_it_was(ns: str) -> None:
    run("ip", "-n", ns, "link", "add", "br0", "type", "bridge")
    taps.ensure([TapSpec("old0", mtu=1500, netns=ns)])
    taps.ensure([TapSpec("old1", queues=1, netns=ns)])
    run("ip", "-n", ns, "link", "set", "old0", "down")
    specs = [
        TapSpec("old0", mtu=9000, bridge="br0", netns=ns),
        TapSpec("old1", queues=2, vnet_hdr=False, bridge="brn", create_bridge=True, netns=ns),
        TapSpec("new0", queues=4, mac="52:54:00:00:00:01", bridge="br0", netns=ns),
    ]
    ids = {s.name: taps.Ids(None, None) for s in specs}
    before = _state(ns)
    with netns.entered(ns), Rtnl() as rtnl:
        steps = len(
            taps.plan_ensure(specs, taps.KernelHost(rtnl).snapshot(), ids, recreate=True).changes
        )
    assert steps >= 6
    for at in range(1, steps + 1):
        with netns.entered(ns), Rtnl() as rtnl:
            host = FailingHost(taps.KernelHost(rtnl), at)
            plan = taps.plan_ensure(specs, host.snapshot(), ids, recreate=True)
            with pytest.raises(OperationFailed, match="injected"):
                taps.apply(plan.changes, host)
        after = _state(ns)
        # A recreated tap comes back with a new ifindex; everything else is as before.
        assert {k: v[1:] for k, v in after.items()} == {k: v[1:] for k, v in before.items()}, at


def test_missing_namespace(ns: str) -> None:
    with pytest.raises(OperationFailed, match="namespace 'no-such-ns-x' does not exist"):
        taps.ensure([TapSpec("vt0", netns="no-such-ns-x")])


def test_valid_names_of_every_shape_are_accepted_by_the_kernel(ns: str) -> None:
    names = ["a", "x" * 15, "tap-1.2_3", "é" * 7, "t+=@!"]
    taps.ensure([TapSpec(n, netns=ns) for n in names])
    assert set(names) <= set(links(ns))


def test_no_leak_over_many_create_delete_cycles(ns: str) -> None:
    fds_before = len(kernel.os.listdir("/proc/self/fd"))
    run("ip", "-n", ns, "link", "add", "br0", "type", "bridge")
    for i in range(100):
        taps.ensure([TapSpec(f"lk{i % 3}", queues=1 + i % 2, bridge="br0", netns=ns)])
        taps.delete([f"lk{i % 3}"], netns=ns)
    assert set(links(ns)) == {"lo", "br0"}
    assert len(kernel.os.listdir("/proc/self/fd")) == fds_before


def test_open_queues_attaches_every_queue_as_qemu_would(ns: str) -> None:
    import os

    from vhostorch.kernel import tun

    taps.ensure([TapSpec("mq0", queues=4, netns=ns), TapSpec("sq0", netns=ns)])
    with netns.entered(ns):
        fds = tun.open_queues("mq0", 4)
        try:
            info = kernel.link(ns, "mq0")["linkinfo"]["info_data"]
            assert info["multi_queue"] is True and info["numqueues"] == 4
            # The same tap opened single-queue fails as QEMU sees it, and leaks nothing.
            with pytest.raises(OSError) as err:
                tun.open_queues("mq0", 1)
            assert err.value.errno == errno.EINVAL
            # A single-queue tap held once cannot be opened again (QEMU: busy).
            held = tun.open_queues("sq0", 1)
            with pytest.raises(OSError) as busy:
                tun.open_queues("sq0", 1)
            assert busy.value.errno == errno.EBUSY
            for fd in held:
                os.close(fd)
        finally:
            for fd in fds:
                os.close(fd)
    assert kernel.link(ns, "mq0")["linkinfo"]["info_data"]["numqueues"] == 0


# --- batched create and delete, read back by three decoders (kernel.seen) ---------------


def _mixed(ns: str, count: int) -> list[TapSpec]:
    """Taps of every shape vhostorch makes: queue modes, MTU, MAC, bridge, up or down."""
    return [
        TapSpec(
            f"mx{i}",
            queues=1 + i % 3,
            vnet_hdr=i % 4 != 1,
            mtu=1400 + i,
            mac=f"52:54:00:00:{i >> 8:02x}:{i & 0xFF:02x}",
            bridge="br0" if i % 2 else None,
            up=i % 5 != 0,
            netns=ns,
        )
        for i in range(count)
    ]


def test_batched_create_is_what_the_specs_say_by_every_reader(ns: str) -> None:
    """150 taps: their link changes go in batches of rtnl.BATCH requests, more than two."""
    from vhostorch.kernel import rtnl

    run("ip", "-n", ns, "link", "add", "br0", "type", "bridge")
    specs = _mixed(ns, 150)
    assert len(specs) > 2 * rtnl.BATCH
    assert {r.action for r in taps.ensure(specs)} == {"created"}
    got = kernel.seen(ns)
    for spec in specs:
        s = got[spec.name]
        assert (s.kind, s.mtu, s.mac, s.master, s.up, s.group) == (
            "tun", spec.mtu, spec.mac, spec.bridge, spec.up, 0
        ), spec.name  # fmt: skip
        assert (s.multi_queue, s.vnet_hdr) == (spec.multi_queue, spec.vnet_hdr), spec.name
        assert s.queues == (0 if spec.multi_queue else None)
    with Opener(ns, "mx2", 3):  # queue counts read back while QEMU's stand-in holds them
        assert kernel.seen(ns)["mx2"].queues == 3


def test_batch_answers_each_request_and_goes_on_after_a_refused_one(ns: str) -> None:
    from vhostorch.kernel.rtnl import set_link_request

    taps.ensure([TapSpec(f"ba{i}", netns=ns) for i in range(3)])
    with netns.entered(ns), Rtnl() as rtnl:
        answers = rtnl.batch(
            [
                set_link_request("ba0", mtu=1300),
                set_link_request("ba1", mtu=10),  # below ETH_MIN_MTU: EINVAL
                set_link_request("nosuch", mtu=1300),
                set_link_request("ba2", mtu=1301),
            ]
        )
    assert [a.errno if a else None for a in answers] == [None, errno.EINVAL, errno.ENODEV, None]
    got = kernel.seen(ns)
    assert (got["ba0"].mtu, got["ba1"].mtu, got["ba2"].mtu) == (1300, 1500, 1301)


def _seen(ns: str) -> dict[str, kernel.Seen]:
    """kernel.seen, without a bridge's MTU and MAC: the kernel derives them from its ports."""
    return {
        name: s._replace(mtu=0, mac="") if s.kind == "bridge" else s
        for name, s in kernel.seen(ns).items()
    }


def _foreign(ns: str) -> None:
    """Devices vhostorch must never delete: a veth pair, a bridge, a tap of someone else's."""
    run("ip", "-n", ns, "link", "add", "fv0", "type", "veth", "peer", "name", "fv1")
    run("ip", "-n", ns, "link", "add", "br0", "type", "bridge")
    run("ip", "-n", ns, "tuntap", "add", "dev", "ftap", "mode", "tap")


def test_batched_delete_takes_its_taps_and_nothing_else(ns: str) -> None:
    _foreign(ns)
    specs = _mixed(ns, 12)
    taps.ensure(specs)
    run("ip", "-n", ns, "link", "set", "mx3", "group", "77")  # a group of its own is no bar
    before = _seen(ns)
    doomed = [s.name for s in specs[:8]]
    results = taps.delete([*doomed, "gone0"], netns=ns)
    assert [(r.name, r.action) for r in results] == [(n, "deleted") for n in doomed] + [
        ("gone0", "absent")
    ]
    assert all(isinstance(r, taps.DeleteResult) and r.batched for r in results)
    after = _seen(ns)
    assert after == {k: v for k, v in before.items() if k not in doomed}


def test_a_device_already_in_the_chosen_group_is_never_deleted(ns: str) -> None:
    _foreign(ns)
    taps.ensure(_mixed(ns, 4))
    run("ip", "-n", ns, "link", "set", "fv0", "group", "4242")  # its peer fv1 stays in 0
    before = _seen(ns)
    with pytest.raises(NotManaged, match="veth fv0 is in link group 4242"):
        taps.delete([f"mx{i}" for i in range(4)], netns=ns, group=4242)
    assert _seen(ns) == before  # every tap back in group 0, fv0 and fv1 alive


class Meddler:
    """The real kernel, and another admin acting at a chosen moment of a batched delete:
    ``before_check`` just before the re-check reads the namespace, ``before_delete`` just
    before the group delete (the window that remains). Each is given the chosen group."""

    def __init__(
        self,
        before_check: Callable[[int], object] | None = None,
        before_delete: Callable[[int], object] | None = None,
    ) -> None:
        self.real: taps.KernelHost | None = None
        self.snapshots = 0
        self.group = 0
        self.before_check = before_check
        self.before_delete = before_delete

    def snapshot(self, probe: Collection[str] = ()) -> dict[str, Link]:
        assert self.real is not None
        self.snapshots += 1
        if self.snapshots == 2 and self.before_check is not None:
            self.before_check(self.group)
        return self.real.snapshot(probe)

    def do(self, steps: Sequence[taps.Step]) -> list[OperationFailed | None]:
        assert self.real is not None
        for step in steps:
            if isinstance(step, taps.SetGroup) and not self.group:
                self.group = step.group
            if isinstance(step, taps.DeleteGroup) and self.before_delete is not None:
                self.before_delete(step.group)
        return self.real.do(steps)


def _delete_meddled(ns: str, names: list[str], meddler: Meddler) -> list[taps.TapResult]:
    with netns.entered(ns), Rtnl() as rtnl:
        meddler.real = taps.KernelHost(rtnl)
        return taps.delete_on(meddler, names)


def test_a_device_put_in_the_group_before_the_last_check_is_never_deleted(ns: str) -> None:
    _foreign(ns)
    taps.ensure(_mixed(ns, 4))
    run("ip", "-n", ns, "link", "set", "mx1", "group", "9")  # restored to 9, not to 0
    before = _seen(ns)

    def intrude(group: int) -> None:
        kernel.set_group(ns, "fv0", group)

    meddler = Meddler(before_check=intrude)
    with pytest.raises(NotManaged, match="veth fv0 is in link group"):
        _delete_meddled(ns, [f"mx{i}" for i in range(4)], meddler)
    after = _seen(ns)
    assert after["fv0"].group == meddler.group
    after["fv0"] = after["fv0"]._replace(group=0)
    assert after == before


def test_a_held_tap_refuses_the_whole_batch_before_or_after_the_moves(ns: str) -> None:
    _foreign(ns)
    taps.ensure(_mixed(ns, 5))
    names = [f"mx{i}" for i in range(5)]
    before = _seen(ns)
    with Opener(ns, "mx2", 3) as qemu:
        assert qemu.ok
        with pytest.raises(InUse, match=r"mx2.*held open"):
            taps.delete(names, netns=ns)
        held = _seen(ns)
    assert held["mx2"].queues == 3
    assert _seen(ns) == before
    opened: list[Opener] = []
    meddler = Meddler(before_check=lambda _: opened.append(Opener(ns, "mx4", 2)))
    try:
        with pytest.raises(InUse, match=r"mx4.*held open"):
            _delete_meddled(ns, names, meddler)
        assert opened[0].ok
    finally:
        for opener in opened:
            opener.close()
    assert _seen(ns) == before


def test_a_refused_group_delete_falls_back_to_one_delete_per_tap(ns: str) -> None:
    """A real refusal: lo lands in the group after the last check (the window), and lo
    cannot be deleted, so rtnl_group_dellink refuses the whole group (EOPNOTSUPP)."""
    _foreign(ns)
    taps.ensure(_mixed(ns, 4))
    before = _seen(ns)

    def lo_joins(group: int) -> None:
        kernel.set_group(ns, "lo", group)

    results = _delete_meddled(ns, [f"mx{i}" for i in range(4)], Meddler(before_delete=lo_joins))
    assert [r.action for r in results] == ["deleted"] * 4
    assert not any(r.batched for r in results if isinstance(r, taps.DeleteResult))
    assert all("group delete refused (Operation not supported" in r.changes[0] for r in results)
    after = _seen(ns)
    assert after["lo"].group != 0  # the intruder keeps the group it was given; nothing else
    after["lo"] = after["lo"]._replace(group=0)
    assert after == {k: v for k, v in before.items() if not k.startswith("mx")}


def test_cli_json_says_whether_the_delete_was_batched(ns: str) -> None:
    taps.ensure([TapSpec(f"cj{i}", netns=ns) for i in range(3)])
    import json

    many = kernel.vhostorch("tap", "delete", "cj0", "cj1", "--netns", ns, "--json", check=True)
    assert [t["batched"] for t in json.loads(many.stdout)["taps"]] == [True, True]
    one = kernel.vhostorch("tap", "delete", "cj2", "--netns", ns, "--json", check=True)
    assert [t["batched"] for t in json.loads(one.stdout)["taps"]] == [False]


def test_a_failed_move_restores_every_group(ns: str) -> None:
    """A failure at any move (injected) puts back the groups of the taps moved before it."""
    _foreign(ns)
    taps.ensure(_mixed(ns, 4))
    for i in range(4):
        run("ip", "-n", ns, "link", "set", f"mx{i}", "group", str(10 + i))
    before = _seen(ns)
    names = [f"mx{i}" for i in range(4)]
    for at in range(1, 5):
        with netns.entered(ns), Rtnl() as rtnl:
            host = FailingHost(taps.KernelHost(rtnl), at)
            with pytest.raises(OperationFailed, match="injected"):
                taps.delete_on(host, names)
        assert _seen(ns) == before, at


def test_a_multi_queue_tap_with_every_queue_detached_is_held(ns: str) -> None:
    """QEMU detaches the queues its guest does not use: numqueues 0, numdisabled 1 is a
    running VM's tap, and neither a batch nor a single delete may take it."""
    taps.ensure([TapSpec("m1", queues=2, netns=ns), TapSpec("t2", netns=ns)])
    with Opener(ns, "m1", 1, multi_queue=True, detach=True) as qemu:
        assert qemu.ok
        data = link(ns, "m1")["linkinfo"]["info_data"]
        assert (data["numqueues"], data["numdisabled"]) == (0, 1)
        for names in (["m1", "t2"], ["m1"]):
            got = kernel.vhostorch("tap", "delete", "--netns", ns, *names)
            assert got.returncode == 1, got
            assert (
                "m1" in got.stderr and "held open (0 queue(s) attached, 1 detached)" in got.stderr
            )
            assert {"m1", "t2"} <= set(links(ns))
        with pytest.raises(InUse, match="1 detached"):
            taps.ensure([TapSpec("m1", netns=ns)], recreate=True)  # a recreate deletes too
    assert [r.action for r in taps.delete(["m1", "t2"], netns=ns)] == ["deleted", "deleted"]


def _carrier(ns: str, name: str) -> bool:
    """IFLA_CARRIER as pyroute2 reads it (IFF_RUNNING follows it only after linkwatch)."""
    from pyroute2 import NetNS

    with NetNS(ns) as ipr:
        [msg] = ipr.get_links(ipr.link_lookup(ifname=name)[0])
    return bool(msg.get_attr("IFLA_CARRIER"))


def test_a_single_queue_tap_held_with_carrier_switched_off_is_never_deleted(ns: str) -> None:
    """Root can switch carrier off on a held single-queue tap; tun is asked instead."""
    taps.ensure([TapSpec(n, netns=ns) for n in ("s1", "t2", "t3")])
    with Opener(ns, "s1", 1) as qemu:
        assert qemu.ok
        run("ip", "-n", ns, "link", "set", "s1", "carrier", "off")
        assert not _carrier(ns, "s1")
        for names in (["s1", "t2"], ["s1"]):
            got = kernel.vhostorch("tap", "delete", "--netns", ns, *names)
            assert got.returncode == 1, got
            assert "tap s1" in got.stderr and "held open" in got.stderr
            assert {"s1", "t2"} <= set(links(ns))
            assert not _carrier(ns, "s1")  # as the admin left it
        with pytest.raises(InUse, match="tap s1"):
            taps.ensure([TapSpec("s1", queues=2, netns=ns)], recreate=True)
        # Unheld taps, carrier off as every unheld tap has it, are deleted as before.
        assert [r.action for r in taps.delete(["t2", "t3"], netns=ns)] == ["deleted"] * 2
    assert [r.action for r in taps.delete(["s1"], netns=ns)] == ["deleted"]


def test_a_tap_of_the_same_name_held_in_another_namespace_is_no_bar(ns: str) -> None:
    taps.ensure([TapSpec(n, netns=ns) for n in ("s1", "t2")])
    with kernel.namespace() as other:
        taps.ensure([TapSpec("s1", netns=other)])
        with Opener(other, "s1", 1) as qemu:
            assert qemu.ok
            run("ip", "-n", other, "link", "set", "s1", "carrier", "off")
            assert [r.action for r in taps.delete(["s1", "t2"], netns=ns)] == ["deleted"] * 2
            with pytest.raises(InUse):
                taps.delete(["s1"], netns=other)


def test_a_failed_restore_keeps_the_failure_that_asked_for_it(ns: str) -> None:
    _foreign(ns)
    taps.ensure(_mixed(ns, 4))

    def delete_mx1(group: int) -> None:
        run("ip", "-n", ns, "link", "del", "mx1")

    with pytest.raises(RollbackFailed) as e:
        _delete_meddled(ns, [f"mx{i}" for i in range(4)], Meddler(before_check=delete_mx1))
    err = e.value
    assert "tap mx1 changed while it was being deleted" in str(err), err
    assert "restoring the link groups of the taps failed too" in str(err), err
    assert isinstance(err, RollbackFailed) and isinstance(err.cause, OperationFailed)
    assert "changed while it was being deleted" in str(err.cause)
    seen = _seen(ns)
    assert "mx1" not in seen and all(seen[f"mx{i}"].group == 0 for i in (0, 2, 3))


def _netns_stem(ns: str) -> str:
    """The per-namespace lock file's path without its suffix (taps.teardown.NamespaceLock)."""
    ino = os.stat(f"/run/netns/{ns}").st_ino
    return f"/run/vhostorch/taps/netns-{ino}"


def test_deletes_in_one_namespace_take_turns(ns: str) -> None:
    """A delete waits while another holds the namespace's lock (flock, as a second
    `vhostorch tap delete` would), then runs."""
    taps.ensure([TapSpec(n, netns=ns) for n in ("a1", "a2", "a3")])
    os.makedirs("/run/vhostorch/taps", mode=0o700, exist_ok=True)
    path = _netns_stem(ns) + ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        exe = os.path.join(os.path.dirname(sys.executable), "vhostorch")
        proc = subprocess.Popen(
            [exe, "tap", "delete", "--netns", ns, "a1", "a2"], stderr=subprocess.PIPE, text=True
        )
        try:
            time.sleep(1.0)
            assert proc.poll() is None and {"a1", "a2"} <= set(links(ns))
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 0, stderr
    finally:
        os.close(fd)
    assert set(links(ns)) == {"lo", "a3"}
    assert not os.path.exists(path)  # a delete that found no journal leaves no lock file


def test_overlapping_concurrent_deletes_both_succeed_and_strand_nothing(ns: str) -> None:
    exe = os.path.join(os.path.dirname(sys.executable), "vhostorch")
    for _ in range(15):
        taps.ensure([TapSpec(n, netns=ns) for n in ("a1", "a2", "a3")])
        procs = [
            subprocess.Popen(
                [exe, "tap", "delete", "--netns", ns, *names], stderr=subprocess.PIPE, text=True
            )
            for names in (["a1", "a2"], ["a2", "a3"])
        ]
        errors = [p.communicate(timeout=30)[1] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], errors
        assert set(links(ns)) == {"lo"}


def _groups(ns: str, names: Sequence[str]) -> dict[str, int]:
    with netns.entered(ns), Rtnl() as rtnl:
        got = rtnl.links()
    return {n: got[n].group for n in names if n in got}


def _stop_mid_batch(ns: str, names: list[str], own: int) -> subprocess.Popen[str] | None:
    """Start `vhostorch tap delete` of ``names`` (all in group ``own``) and SIGSTOP it
    once the kernel shows one of them moved to another group and some not yet deleted:
    the process is then stopped inside its batch. None if it finished first."""
    exe = os.path.join(os.path.dirname(sys.executable), "vhostorch")
    proc = subprocess.Popen(
        [exe, "tap", "delete", "--netns", ns, *names], stderr=subprocess.PIPE, text=True
    )
    while proc.poll() is None:
        groups = _groups(ns, names)
        if groups and any(g != own for g in groups.values()):
            os.kill(proc.pid, signal.SIGSTOP)
            groups = _groups(ns, names)
            if groups and any(g != own for g in groups.values()):
                return proc
            os.kill(proc.pid, signal.SIGCONT)
    proc.communicate()
    return None


def _many(ns: str, count: int, own: int) -> list[str]:
    names = [f"sg{i}" for i in range(count)]
    taps.ensure([TapSpec(n, netns=ns) for n in names])
    with netns.entered(ns), Rtnl() as rtnl:
        rtnl.batch([set_link_request(n, group=own) for n in names])
    return names


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_stopping_signal_mid_batch_strands_no_tap(ns: str, sig: int) -> None:
    """A real signal to a real `vhostorch tap delete` stopped inside its batch (taps moved
    into its group, not deleted yet): the batch ends first (deleted, or back in group 7),
    then the command stops, exit 130. Never a tap left in the chosen group."""
    for _ in range(10):
        names = _many(ns, 1500, 7)
        proc = _stop_mid_batch(ns, names, 7)
        if proc is not None:
            break
    else:
        pytest.fail("the delete never was caught inside its batch")
    os.kill(proc.pid, sig)
    os.kill(proc.pid, signal.SIGCONT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, (proc.returncode, stderr)
    assert "interrupted" in stderr
    left = _groups(ns, names)
    assert all(g == 7 for g in left.values()), set(left.values())
    assert not left or len(left) == len(names)  # all or none


def test_sigkill_mid_batch_leaves_taps_the_next_delete_puts_back(ns: str) -> None:
    """SIGKILL cannot be held: the taps stay in the chosen group, undeleted. The next
    delete in the namespace puts them back in their own group first (the journal), and
    deleting them then works."""
    taps.ensure([TapSpec("other", netns=ns)])
    for _ in range(10):
        names = _many(ns, 1500, 7)
        proc = _stop_mid_batch(ns, names, 7)
        if proc is not None:
            break
    else:
        pytest.fail("the delete never was caught inside its batch")
    proc.kill()  # SIGKILL, our own child by its pid
    proc.communicate(timeout=60)
    stranded = _groups(ns, names)
    assert stranded and any(g != 7 for g in stranded.values())  # what SIGKILL leaves
    assert os.path.exists(_netns_stem(ns) + ".moved")
    kernel.vhostorch("tap", "delete", "--netns", ns, "other", check=True)
    assert set(_groups(ns, names).values()) == {7}  # every one back in its own group
    assert not os.path.exists(_netns_stem(ns) + ".moved")
    got = kernel.vhostorch("tap", "delete", "--netns", ns, *names, "--json", check=True)
    assert "true" in got.stdout  # batched
    assert set(links(ns)) == {"lo"}


def test_tap_create_under_sigterm_makes_all_or_nothing(ns: str) -> None:
    """`tap create` of four taps and their bridge, SIGTERM as soon as the kernel says the first
    link is made: it left the bridge and one tap (exit -15, not a word)."""
    names = [f"vtsig{i}" for i in range(4)]
    exe = os.path.join(os.path.dirname(sys.executable), "vhostorch")
    for _ in range(5):
        watch = subprocess.Popen(
            ["ip", "-n", ns, "-o", "monitor", "link"], stdout=subprocess.PIPE, text=True
        )
        time.sleep(0.2)  # listening before the first link is made
        create = subprocess.Popen(
            [exe, "tap", "create", *names, "--netns", ns, "--queues", "4",
             "--bridge", "brsig", "--create-bridge"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        assert watch.stdout is not None
        watch.stdout.readline()  # the first link (the bridge) is made
        create.send_signal(signal.SIGTERM)  # our own child, by its pid
        create.wait()
        watch.kill()  # our own child, by its pid
        watch.wait()
        made = {link.name for link in taps.show(netns=ns)} & set(names)
        bridge = subprocess.run(["ip", "-n", ns, "link", "show", "brsig"], capture_output=True)
        assert made in (set(), set(names)), made
        assert (bridge.returncode == 0) == bool(made), "a bridge left without its taps"
        subprocess.run([exe, "tap", "delete", *names, "--netns", ns], capture_output=True)
        subprocess.run(["ip", "-n", ns, "link", "del", "brsig"], capture_output=True)
