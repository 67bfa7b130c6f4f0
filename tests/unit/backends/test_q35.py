"""q35 machines: PCIe root ports for hot-plug, sized from the spec, on both backends' output.

The lifecycle on q35 (up, nic add, nic del, down) is proved in the test host by
tests/testhost/test_up.py; here the spec's rule and what each backend asks QEMU or libvirt for.
"""

from __future__ import annotations

import os
import pathlib

import pytest

from vhostorch.backends import process
from vhostorch.errors import InvalidSpec
from vhostorch.kernel import procfs
from vhostorch.kernel.procfs import Fd, identify, wants_fdinfo
from vhostorch.libvirt import domxml
from vhostorch.vm import spec


def _spec(machine: str, **more: object) -> spec.VmSpec:
    data = {"name": "vm", "machine": machine, "boot": {"kernel": "/k"}, "nic": [{}, {}], **more}
    return spec.from_mapping(data)


def test_q35_gets_one_root_port_per_nic_and_four_spare_by_default() -> None:
    loaded = _spec("q35")
    assert loaded.spare_ports == spec.DEFAULT_SPARE_PORTS == 4 and loaded.root_ports == 6
    assert _spec("pc-q35-7.2", spare_ports=0).root_ports == 2
    assert _spec("pc").root_ports == 0 and _spec("pc").spare_ports == 0


@pytest.mark.parametrize("value, message", [
    (-1, "spare_ports -1 is out of range 0..32"),
    ("2", "spare_ports must be an integer"),
])  # fmt: skip
def test_bad_spare_ports_are_refused(value: object, message: str) -> None:
    with pytest.raises(InvalidSpec, match=message):
        _spec("q35", spare_ports=value)


def test_spare_ports_on_pc_are_refused() -> None:
    with pytest.raises(InvalidSpec, match="spare_ports is for q35 machines"):
        _spec("pc", spare_ports=2)


def test_the_qmp_backend_puts_the_root_ports_on_the_command_line() -> None:
    argv = process.argv(_spec("q35", spare_ports=1), "/w", 7)
    ports = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    assert ports == [f"pcie-root-port,id=vho.port{i},chassis={i + 1}" for i in range(3)]
    assert "-device" not in process.argv(_spec("pc"), "/w", 7)


def test_the_libvirt_backend_asks_for_root_ports_in_the_domain() -> None:
    spec = _spec("q35", spare_ports=3)
    xml = domxml.render(spec, [(n, True) for n in spec.nics], "/w/console.log")
    assert xml.count('<controller type="pci" model="pcie-root-port" />') == 2 + 3
    assert '<controller type="usb" model="none" />' in xml
    # libvirt refuses root ports without the root at index 0 (seen: "The PCI controller with
    # index='0' must be model='pcie-root' for this machine type").
    assert xml.index('index="0" model="pcie-root"') < xml.index('"pcie-root-port"')
    pc = _spec("pc")
    assert "pcie-root-port" not in domxml.render(pc, [(n, True) for n in pc.nics], "/c")


def test_a_macvtap_queue_is_known_by_its_device_name(tmp_path: pathlib.Path) -> None:
    # drivers/net/tap.c names the device tap<ifindex>; seen in the test host: QEMU's fd
    # -> /dev/tap12 for macvtap0 (ifindex 12), fdinfo without iff:. Without sysfs (here an
    # empty root) the node's own name says it; with sysfs, /sys/dev/char/MAJ:MIN does
    # (tests/kernel/test_fd_identity.py, on a real macvtap).
    macvtap = os.makedev(240, 3)
    device = identify("/dev/tap12", macvtap, 240, str(tmp_path))
    assert device == "/dev/tap12" and Fd(55, "/dev/tap12", {}, device).macvtap_index == 12
    assert Fd(55, "/dev/tap12", {}, device).tap is None
    assert identify("/dev/tapx", macvtap, 240, str(tmp_path)) is None
    assert identify("/dev/tap12", macvtap, None, str(tmp_path)) is None  # macvtap not loaded
    assert Fd(3, "/dev/net/tun", {"iff": "vnet0"}, procfs.TUN).macvtap_index is None
    # What a path says counts for nothing: a device is its number.
    assert identify("/root/dev/net/tun", os.makedev(10, 200), None) == procfs.TUN
    assert identify("/dev/net/tun", os.makedev(1, 3), None) is None  # /dev/null's number
    assert identify("/dev/net/tun", None, None) is None  # a regular file at that path
    assert Fd(3, "/dev/net/tun", {"iff": "vnet0"}).tap is None
    assert wants_fdinfo("/dev/tap12") and wants_fdinfo(procfs.TUN)
    assert not wants_fdinfo(None)
