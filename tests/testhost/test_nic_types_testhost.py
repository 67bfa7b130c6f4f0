"""Every libvirt interface type that carries vhost-net passes `check --strict` when healthy.

In the test host (real vhost-net, KVM, libvirtd): `ethernet` (libvirt's own tap, and
`managed='no'` on a tap vhostorch made), `bridge`, `network` (a libvirt network forwarding
to a bridge, and a NAT network), `direct` (macvtap: libvirt passes /dev/tapN character
devices), each with 1 and 4 queue pairs, with and without an explicit
`<driver name='vhost'/>` (libvirt's default for type='kvm' is vhost when it can open it),
on `pc` and `q35` machines, judged from the wiring trace, again with `--monitor`, and (issue
23) with the trace disarmed and no monitor, from the kernel's live state alone (every check
passing, the 4-queue domains' 48 vrings too). The
same domains carry an e1000 on user-mode networking and an rtl8139 on a tap: both are
listed as not applicable, with the reason, and judged by no check.

Not here: a NAT network with DHCP (libvirt runs dnsmasq for it, and this machine has no
dnsmasq); the NAT network used has no DHCP and no DNS (`<dns enable='no'/>`), which
needs no daemon, only libvirt's iptables rules (iptables-nft, loaded modules).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import guests, kernel
from tests.support.kernel import vhostorch
from vhostorch.lab.run import read_text

pytestmark = pytest.mark.testhost

NIC_CHECKS = {
    "nic.vhost.requested", "nic.queues", "nic.tap.fds", "nic.vhost.fds", "nic.vhost.worker",
    "nic.vhost.started", "nic.vhost.memtable", "nic.kick", "nic.call", "nic.features",
    "nic.vhost.placement",
}  # fmt: skip
TYPES = ("ethernet", "ethernet-unmanaged", "bridge", "network", "network-nat", "direct")


class Net:
    """What the interfaces attach to: a bridge, a dummy link for macvtap, two networks."""

    def __init__(self) -> None:
        self.bridge = kernel.unique("vhb")
        self.lower = kernel.unique("vhd")
        self.network = kernel.unique("vho-n-")
        self.nat = kernel.unique("vho-nat-")


@pytest.fixture(scope="module")
def net(in_testhost: None, libvirtd: str) -> Iterator[Net]:
    import libvirt

    guests.load_modules(guests.NETWORK_MODULES)
    os.makedirs("/var/lib/libvirt/dnsmasq", exist_ok=True)  # libvirt writes its MAC lists there
    n = Net()
    kernel.run("ip", "link", "add", n.bridge, "type", "bridge")
    kernel.run("ip", "link", "set", n.bridge, "up")
    kernel.run("ip", "link", "add", n.lower, "type", "dummy")
    kernel.run("ip", "link", "set", n.lower, "up")
    conn = libvirt.open(libvirtd)
    nets = []
    try:
        nets.append(conn.networkCreateXML(
            f"<network><name>{n.network}</name><forward mode='bridge'/>"
            f"<bridge name='{n.bridge}'/></network>"
        ))  # fmt: skip
        nat_bridge = kernel.unique("vhn")
        nets.append(conn.networkCreateXML(
            f"<network><name>{n.nat}</name><forward mode='nat'/><bridge name='{nat_bridge}'/>"
            "<ip address='192.168.231.1' netmask='255.255.255.0'/><dns enable='no'/></network>"
        ))  # fmt: skip
        yield n
    finally:
        for network in nets:
            network.destroy()
        conn.close()
        kernel.run("ip", "link", "del", n.lower)
        kernel.run("ip", "link", "del", n.bridge)


def interfaces(n: Net, queues: int, driver: bool, unmanaged_tap: str) -> str:
    """One interface of each type, in TYPES order (aliases net0..net5), then two NICs
    vhost-net cannot serve (net6: e1000 on user-mode networking, net7: rtl8139 on a tap)."""
    attrs = f" queues='{queues}'" if queues > 1 else ""
    drv = f"<driver name='vhost'{attrs}/>" if driver else (f"<driver{attrs}/>" if attrs else "")
    tail = f"<model type='virtio'/>{drv}</interface>"
    return "\n".join([
        f"<interface type='ethernet'>{tail}",
        f"<interface type='ethernet'><target dev='{unmanaged_tap}' managed='no'/>{tail}",
        f"<interface type='bridge'><source bridge='{n.bridge}'/>{tail}",
        f"<interface type='network'><source network='{n.network}'/>{tail}",
        f"<interface type='network'><source network='{n.nat}'/>{tail}",
        f"<interface type='direct'><source dev='{n.lower}' mode='bridge'/>{tail}",
        "<interface type='user'><model type='e1000'/></interface>",
        "<interface type='ethernet'><model type='rtl8139'/></interface>",
    ])  # fmt: skip


def check(*args: str) -> tuple[int, dict[str, Any]]:
    done = vhostorch("check", *args, "--json")
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


# Each type with 1 and 4 queue pairs, with and without <driver name='vhost'/>, and on both
# machine types (q35: libvirt adds the PCIe controllers its NICs need), in four domains
# (each costs the session about 15-25 s).
@pytest.mark.parametrize(
    ("queues", "driver", "machine"),
    [(1, True, "pc"), (1, False, "q35"), (4, True, "q35"), (4, False, "pc")],
    ids=["1-driver-vhost-pc", "1-no-driver-q35", "4-driver-vhost-q35", "4-no-driver-pc"],
)
def test_every_vhost_interface_type_passes_strict(
    net: Net, traced: None, libvirtd: str, queues: int, driver: bool, machine: str
) -> None:
    import libvirt

    name = kernel.unique("vho-ty-")
    workdir = tempfile.mkdtemp(prefix="vho-types-")
    console = os.path.join(workdir, "console.log")
    with guests.tap(queues) as unmanaged:
        nics = interfaces(net, queues, driver, unmanaged)
        xml = guests.typed_domain_xml(name, nics, console, machine=machine)
        conn = libvirt.open(libvirtd)
        dom = conn.createXML(xml, 0)
        try:
            deadline = time.monotonic() + 90
            text = ""
            # The guest has virtio_net only: its six virtio NICs come up, e1000 and rtl8139 not.
            while "VHOSTORCH-GUEST: ready" not in text:
                assert time.monotonic() < deadline, text[-2000:]
                time.sleep(0.5)
                text = read_text(console)
            assert text.count("VHOSTORCH-GUEST: nic eth") == len(TYPES), text[-2000:]
            for extra in ((), ("--monitor",)):
                deadline = time.monotonic() + 30
                while True:
                    code, report = check("--domain", name, "--strict", *extra)
                    if code == 0 or time.monotonic() > deadline:
                        break
                    time.sleep(1)
                failed = [c for c in report["checks"] if c["status"] != "pass"]
                assert code == 0 and report["ok"] is True, (extra, json.dumps(failed, indent=1))
                judged = [n for n in report["nics"] if n.get("applicable") is not False]
                assert [n["name"] for n in judged] == [f"net{i}" for i in range(len(TYPES))]
                for nic in judged:
                    ids = {c["id"] for c in report["checks"] if c["nic"] == nic["name"]}
                    assert ids == NIC_CHECKS, (nic, ids)
                    assert nic["queue_pairs"] == queues and nic["vhost_requested"] is True
                # Not applicable: listed with the reason, no check names them.
                skipped = {n["name"]: n for n in report["nics"] if n.get("applicable") is False}
                assert set(skipped) == {"net6", "net7"}, report["nics"]
                assert (
                    skipped["net6"]["kind"] == "user" and "user-mode" in skipped["net6"]["reason"]
                )
                assert skipped["net7"]["kind"] == "rtl8139"
                assert "virtio-net" in skipped["net7"]["reason"]
                assert not {c["nic"] for c in report["checks"]} & set(skipped)
            _passes_from_the_live_state(name, queues)
            live = dom.XMLDesc(0)
            assert f"machine='pc-{'q35' if machine == 'q35' else 'i440fx'}-" in live
            _macvtap_as_it_is(report, live, queues)
            # The plain table shows them too, outside the checks.
            text_out = vhostorch("check", "--domain", name, "--strict").stdout
            assert "NIC net7: not applicable: NIC model rtl8139" in text_out, text_out
        finally:
            dom.destroy()
            conn.close()
            subprocess.run(["rm", "-rf", workdir], check=False)


def _passes_from_the_live_state(name: str, queues: int) -> None:
    """Issue 23: the same running domain with the trace disarmed, no monitor and no pause passes
    --strict from what the kernel holds now (kick, call, started, memtable, features), the
    4-queue domains too: six vhost NICs, 48 vrings, more ioeventfds and irqfds than a fixed
    walk of 128 and 32 covered; the reader walks as far as QEMU's eventfds allow."""
    from vhostorch.check import wiring

    wiring.disarm()
    try:
        code, report = check("--domain", name, "--strict")
    finally:
        wiring.arm()  # the module's other domains are checked from the trace too
    failed = [c for c in report["checks"] if c["status"] != "pass"]
    assert code == 0 and report["ok"] is True and not failed, json.dumps(failed, indent=1)
    live_ids = ("nic.kick", "nic.call", "nic.vhost.started", "nic.vhost.memtable", "nic.features")
    judged = [c for c in report["checks"] if c["id"] in live_ids]
    assert len([c for c in judged if c["id"] == "nic.kick"]) == len(TYPES) * queues * 2
    assert {c["evidence"]["source"] for c in judged} == {"live"}, judged


def _macvtap_as_it_is(report: dict[str, Any], live_xml: str, queues: int) -> None:
    """The direct NIC (net5) as the kernel shows it: QEMU holds /dev/tap<ifindex> fds, one
    per queue, whose fdinfo has no iff: line, and the macvtap has no tun_flags."""
    from vhostorch.libvirt import domxml

    pid = int(report["target"]["pid"])
    (iface,) = [i for i in domxml.parse(live_xml).interfaces if i.alias == "net5"]
    assert iface.target is not None
    with open(f"/sys/class/net/{iface.target}/ifindex") as f:
        ifindex = int(f.read())
    assert not os.path.exists(f"/sys/class/net/{iface.target}/tun_flags")
    (tap_fds,) = [c for c in report["checks"] if c["id"] == "nic.tap.fds" and c["nic"] == "net5"]
    assert tap_fds["evidence"]["kind"] == "macvtap" and tap_fds["evidence"]["taps"] == [
        iface.target
    ]
    fds = tap_fds["evidence"]["fds"]
    assert len(fds) == queues
    for fd in fds:
        assert os.readlink(f"/proc/{pid}/fd/{fd}") == f"/dev/tap{ifindex}"
        with open(f"/proc/{pid}/fdinfo/{fd}") as f:
            assert "iff:" not in f.read()
    (entry,) = [n for n in report["nics"] if n["name"] == "net5"]
    assert entry["tap"] == iface.target
