"""Tap provisioning against the real kernel, in throwaway namespaces, read back with iproute2."""

from __future__ import annotations

import errno
import grp
import pwd

import pytest

from tests import kernel
from tests.kernel import (
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
from vhostorch.errors import InUse, Mismatch, NotManaged, OperationFailed
from vhostorch.kernel import netns
from vhostorch.kernel.rtnl import Link, Rtnl
from vhostorch.model import TapSpec

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

    def snapshot(self) -> dict[str, Link]:
        return self.real.snapshot()

    def do(self, step: taps.Step) -> None:
        self.count += 1
        if self.count == self.at:
            raise OperationFailed(f"injected failure at {step}")
        self.real.do(step)


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
