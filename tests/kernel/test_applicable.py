"""NICs vhost-net cannot serve are listed as not applicable, with the reason, and not judged.

On this machine (no /dev/vhost-net, TCG): a real QEMU with user-mode networking on an
e1000, a passt-style stream netdev, an rtl8139 on a tap, and one virtio-net NIC on a tap: `check`
lists the first three as not applicable and judges only the virtio tap NIC. hostdev (an
SR-IOV VF through VFIO) and vDPA cannot be made here (no such device): they are judged
on a constructed domain XML and command line, said so below. vhost-user is real: QEMU 7.2
blocks at start until a backend answers the vhost-user handshake, and tests/support/vhost_user.py
answers it (no virtqueue is served, the guest is never started).
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import time

from tests.support import guests, vhost_user
from tests.support.kernel import vhostorch
from tests.support.observations import observed
from vhostorch.check import applicable, verify
from vhostorch.check.report import NotApplicable
from vhostorch.cli.output import report_text
from vhostorch.libvirt import domxml
from vhostorch.qemu import args


def test_a_real_qemu_mixing_nics_judges_only_its_virtio_tap_nic(tmp_path: pathlib.Path) -> None:
    stream = str(tmp_path / "passt.sock")
    with guests.tap(1) as virtio_tap, guests.tap(1) as rtl_tap:
        argv = [
            "qemu-system-x86_64", "-accel", "tcg", "-M", "pc", "-display", "none", "-nodefaults",
            "-S", "-m", "64", "-name", "guest=vho-mixed",
            "-object", "memory-backend-memfd,id=mem,size=64M,share=on", "-numa", "node,memdev=mem",
            "-netdev", "user,id=u0", "-device", "e1000,netdev=u0,id=nu",
            "-netdev", f"stream,id=st0,server=on,addr.type=unix,addr.path={stream}",
            "-device", "virtio-net-pci,netdev=st0,id=nst",
            "-netdev", f"tap,id=rt0,ifname={rtl_tap},script=no,downscript=no",
            "-device", "rtl8139,netdev=rt0,id=nrtl",
            "-netdev", f"tap,id=t0,ifname={virtio_tap},script=no,downscript=no,vhost=off",
            "-device", "virtio-net-pci,netdev=t0,id=net0",
        ]  # fmt: skip
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 20
            while sorted(guests.fd_targets(proc.pid).values()).count("/dev/net/tun") < 2:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                assert time.monotonic() < deadline
                time.sleep(0.1)
            done = vhostorch("check", "--pid", str(proc.pid), "--json")
            report = json.loads(done.stdout)
            skipped = {n["name"]: n for n in report["nics"] if n.get("applicable") is False}
            assert {name: n["kind"] for name, n in skipped.items()} == {
                "nu": "user", "nst": "stream", "nrtl": "rtl8139",
            }  # fmt: skip
            assert "virtio-net" in skipped["nrtl"]["reason"]
            judged = [n["name"] for n in report["nics"] if "applicable" not in n]
            assert judged == ["net0"]
            assert {c["nic"] for c in report["checks"]} <= {None, "net0"}
            text = vhostorch("check", "--pid", str(proc.pid)).stdout
            assert "NIC nrtl: not applicable: NIC model rtl8139" in text, text
        finally:
            proc.kill()
            proc.wait()


def test_a_real_qemu_with_a_vhost_user_nic_judges_only_its_tap_nic(
    tmp_path: pathlib.Path,
) -> None:
    # vhost-user needs the guest's memory shared with the backend (memfd, share=on).
    sock = str(tmp_path / "vu.sock")
    with vhost_user.backend(sock) as backend, guests.tap(1) as virtio_tap:
        argv = [
            "qemu-system-x86_64", "-accel", "tcg", "-M", "pc", "-display", "none", "-nodefaults",
            "-S", "-m", "64", "-name", "guest=vho-vu",
            "-object", "memory-backend-memfd,id=mem,size=64M,share=on", "-numa", "node,memdev=mem",
            "-chardev", f"socket,id=c0,path={sock}", "-netdev", "vhost-user,id=vu0,chardev=c0",
            "-device", "virtio-net-pci,netdev=vu0,id=nvu",
            "-netdev", f"tap,id=t0,ifname={virtio_tap},script=no,downscript=no,vhost=off",
            "-device", "virtio-net-pci,netdev=t0,id=net0",
        ]  # fmt: skip
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            # Netdevs are made in order: the tap's fd shows the vhost-user one was made first.
            deadline = time.monotonic() + 20
            while "/dev/net/tun" not in guests.fd_targets(proc.pid).values():
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                assert time.monotonic() < deadline, backend.requests
                time.sleep(0.1)
            # The handshake QEMU 7.2 ran before going on: one SET_VRING_CALL per virtqueue.
            assert backend.requests[:6] == [
                "GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES",
                "GET_QUEUE_NUM", "SET_OWNER", "GET_FEATURES",
            ]  # fmt: skip
            assert backend.requests.count("SET_VRING_CALL") == 2 and backend.error is None
            done = vhostorch("check", "--pid", str(proc.pid), "--json")
            report = json.loads(done.stdout)
            (skipped,) = [n for n in report["nics"] if n.get("applicable") is False]
            assert (skipped["name"], skipped["netdev"], skipped["kind"]) == (
                "nvu", "vu0", "vhost-user"
            )  # fmt: skip
            assert "userspace backend" in skipped["reason"]
            assert [n["name"] for n in report["nics"] if "applicable" not in n] == ["net0"]
            nic_checks = {c["nic"] for c in report["checks"]} - {None}
            assert nic_checks == {"net0"}
            # net0 is judged: vhost=off on a host without vhost-net fails its request check.
            (requested,) = [c for c in report["checks"] if c["id"] == "nic.vhost.requested"]
            assert requested["nic"] == "net0" and requested["status"] == "fail"
            text = vhostorch("check", "--pid", str(proc.pid)).stdout
            assert "NIC nvu: not applicable: a vhost-user netdev" in text, text
        finally:
            proc.kill()
            proc.wait()


def test_only_not_applicable_nics_is_no_failure_of_the_nics(tmp_path: pathlib.Path) -> None:
    # A recorded healthy QEMU whose command line is replaced by a constructed one: a vDPA
    # NIC (no vDPA device can be made here), a vhost-user NIC and an e1000 on user-mode
    # networking.
    obs = observed("healthy-1q", tmp_path)
    argv = [
        "qemu-system-x86_64", "-netdev", "vhost-vdpa,vhostdev=/dev/vhost-vdpa-0,id=hostnet0",
        "-device", "virtio-net-pci,netdev=hostnet0,id=net0", "-nic", "user,model=e1000",
        "-chardev", "socket,id=c0,path=/run/vu.sock", "-netdev", "vhost-user,id=vu,chardev=c0",
        "-device", "virtio-net-pci,netdev=vu,id=nvu",
    ]  # fmt: skip
    report = verify.verify(obs.replace(args=args.parse(argv)))
    assert [c.id for c in report.checks] == ["host.vhost-net", "vm.kvm"]
    assert [(n.name, n.kind) for n in report.nics if isinstance(n, NotApplicable)] == [
        ("net0", "vhost-vdpa"), ("nic0", "user"), ("nvu", "vhost-user")
    ]  # fmt: skip
    assert report.ok(strict=True)
    assert "NIC net0: not applicable: a vhost-vdpa netdev" in report_text(report, True)


def test_hostdev_interfaces_are_not_applicable(tmp_path: pathlib.Path) -> None:
    # Constructed: an SR-IOV VF needs a real PCI device for VFIO, which this machine lacks.
    # The domain XML is the shape libvirt writes for <interface type='hostdev'>.
    xml = """<domain type='kvm'><name>vf</name><devices>
      <interface type='hostdev' managed='yes'><mac address='52:54:00:6d:90:02'/>
        <source><address type='pci' domain='0x0000' bus='0x3b' slot='0x02' function='0x1'/>
        </source><alias name='hostdev0'/></interface>
      <interface type='vdpa'><source dev='/dev/vhost-vdpa-0'/><model type='virtio'/>
        <alias name='net1'/></interface>
    </devices></domain>"""
    obs = observed("healthy-1q", tmp_path).replace(domain=domxml.parse(xml))
    found = applicable.find(obs)
    assert [(n.name, n.kind, n.netdev) for n in found] == [
        ("hostdev0", "hostdev", None), ("net1", "vdpa", "hostnet1")
    ]  # fmt: skip
    assert "VFIO" in found[0].reason
    report = verify.verify(obs)
    # The tap NIC of the recording is still judged, and passes as it did live.
    assert {c.nic for c in report.checks} == {None, "net0"}
    assert report.ok(strict=True)


def test_a_tap_netdev_on_an_e1000_is_not_a_vhost_nic() -> None:
    argv = ["qemu", "-netdev", "tap,id=t0,fd=5,vhost=on", "-device", "e1000,netdev=t0,id=e"]
    parsed = args.parse(argv)
    assert parsed.devices == () and [d.driver for d in parsed.other_nics] == ["e1000"]
    assert parsed.other_nic_for("t0") is not None
