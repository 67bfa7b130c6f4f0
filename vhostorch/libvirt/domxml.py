"""Domain XML: what a libvirt domain asks for (parse), and a VM spec as a domain (render)."""

from __future__ import annotations

from vhostorch.errors import InvalidSpec
from vhostorch.inputs import parse_number
from vhostorch.record import TYPE_CHECKING, Record

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from typing import Any

    from vhostorch.vm.spec import NicSpec, VmSpec


class Interface(Record):
    """One ``<interface>``: its type, tap, model, ``<driver name= queues=>`` and alias."""

    type: str
    target: str | None
    model: str | None
    driver: str | None
    queues: int
    alias: str | None
    mac: str | None

    @property
    def netdev_id(self) -> str | None:
        """libvirt names the netdev of alias ``net0`` ``hostnet0``."""
        return f"host{self.alias}" if self.alias else None


class Domain(Record):
    name: str
    type: str
    interfaces: tuple[Interface, ...]
    # <cputune>: each <vcpupin vcpu= cpuset=> and <emulatorpin cpuset=> (None: none)
    vcpupin: tuple[tuple[int, frozenset[int]], ...] = ()
    emulatorpin: frozenset[int] | None = None


class _Element:
    """Just enough of ElementTree's Element for reading domain XML, built straight with
    expat: importing xml.etree (and the re module it pulls in) was the largest cost of
    the libvirt hook's start, which libvirt waits for."""

    __slots__ = ("tag", "attrib", "children", "text")

    def __init__(self, tag: str, attrib: dict[str, str]) -> None:
        self.tag, self.attrib = tag, attrib
        self.children: list[_Element] = []
        self.text = ""

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.attrib.get(key, default)

    def findall(self, path: str) -> list[_Element]:
        found = [self]
        for step in _steps(path):
            found = [c for e in found for c in e.children if c.tag == step]
        return found

    def iterfind(self, path: str) -> Iterator[_Element]:
        return iter(self.findall(path))

    def find(self, path: str) -> _Element | None:
        found = self.findall(path)
        return found[0] if found else None

    def findtext(self, path: str) -> str | None:
        element = self.find(path)
        return None if element is None else element.text


def _steps(path: str) -> list[str]:
    """``a/{uri}b`` → [a, {uri}b] (a namespace URI has slashes of its own)."""
    steps, step, depth = [], "", 0
    for ch in path:
        depth += (ch == "{") - (ch == "}")
        if ch == "/" and depth == 0:
            steps.append(step)
            step = ""
        else:
            step += ch
    return [*steps, step]


def root(xml: str) -> _Element:
    """The ``<domain>`` element of a domain's XML (names in ElementTree's {uri}local
    form). Raises InvalidSpec when it is not one.

    Linear in the input: text is joined once per element (expat hands it over a line or a
    character reference at a time, and ``+=`` on each made a 0.8 MB description take
    seconds). A DTD is refused at its first byte: libvirt never writes one, and its
    entities are how a small document expands to gigabytes (billion laughs) or reads a
    file (an external entity).
    """
    from xml.parsers import expat

    parser = expat.ParserCreate(namespace_separator="}")
    parser.buffer_text = True
    stack: list[tuple[_Element, list[str]]] = []
    top: list[_Element] = []

    def name(raw: str) -> str:
        return "{" + raw if "}" in raw else raw

    def start(tag: str, attrs: dict[str, str]) -> None:
        element = _Element(name(tag), {name(k): v for k, v in attrs.items()})
        (stack[-1][0].children if stack else top).append(element)
        stack.append((element, []))

    def end(tag: str) -> None:
        element, chunks = stack.pop()
        element.text = "".join(chunks)

    def text(data: str) -> None:
        if stack:
            stack[-1][1].append(data)

    def doctype(*args: object) -> None:
        raise InvalidSpec("the domain XML has a DTD (<!DOCTYPE>), which libvirt never writes")

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = text
    parser.StartDoctypeDeclHandler = doctype
    parser.EntityDeclHandler = doctype
    try:
        parser.Parse(xml, True)
    except expat.ExpatError as err:
        raise InvalidSpec(f"domain XML does not parse: {err}") from None
    if top[0].tag != "domain":
        raise InvalidSpec(f"not a domain's XML (root element <{top[0].tag}>)")
    return top[0]


def driver_queues(iface: Any) -> int:
    """An ``<interface>``'s ``<driver queues=>``: 1 when absent or not a number.

    Raises InvalidSpec for a number too long to be one (int() of '²' or of 5000 digits
    is a ValueError, and str.isdigit() accepts '²').
    """
    driver = iface.find("driver")
    queues = driver.get("queues", "1") if driver is not None else "1"
    if not (queues.isascii() and queues.isdigit()):
        return 1
    return parse_number(queues, "<driver queues=>")


def parse(xml: str) -> Domain:
    """Read a domain's XML. Raises InvalidSpec when it is not domain XML."""
    return domain(root(xml))


def domain(element: Any) -> Domain:
    """What a parsed ``<domain>`` (root) asks for."""
    interfaces = []
    for iface in element.iterfind("devices/interface"):
        driver = iface.find("driver")
        interfaces.append(
            Interface(
                type=iface.get("type") or "",
                target=_attr(iface, "target", "dev"),
                model=_attr(iface, "model", "type"),
                driver=driver.get("name") if driver is not None else None,
                queues=driver_queues(iface),
                alias=_attr(iface, "alias", "name"),
                mac=_attr(iface, "mac", "address"),
            )
        )
    name = element.findtext("name")
    vcpupin, emulatorpin = _cputune(element)
    return Domain(name or "", element.get("type") or "", tuple(interfaces), vcpupin, emulatorpin)


def _cputune(element: Any) -> tuple[tuple[tuple[int, frozenset[int]], ...], frozenset[int] | None]:
    """``<cputune>``'s vcpupin and emulatorpin CPU sets. libvirt's cpuset syntax also allows
    ``^N`` exclusions; a set this reader cannot take is left out (the threads' own affinity,
    read from /proc, is what the placement check judges)."""
    from vhostorch.kernel.cpus import parse_list

    pins = []
    for pin in element.iterfind("cputune/vcpupin"):
        try:
            pins.append((int(pin.get("vcpu") or ""), parse_list(pin.get("cpuset") or "")))
        except (ValueError, InvalidSpec):
            continue
    emulator = None
    found = element.find("cputune/emulatorpin")
    if found is not None:
        try:
            emulator = parse_list(found.get("cpuset") or "")
        except InvalidSpec:
            emulator = None
    return tuple(sorted(pins, key=lambda p: p[0])), emulator


def _attr(parent: object, child: str, attr: str) -> str | None:
    found = parent.find(child)  # type: ignore[attr-defined]
    return found.get(attr) if found is not None else None


def _sub(parent: Any, tag: str, text: str | None = None, **attrs: str) -> Any:
    import xml.etree.ElementTree as ET

    element = ET.SubElement(parent, tag, attrs)
    if text is not None:
        element.text = text
    return element


def interface(nic: NicSpec, vhost_on: bool) -> Any:
    """``<interface type='ethernet'>`` on the NIC's pre-created tap (libvirt leaves it alone).

    ``<driver name='qemu'/>`` when vhost is not to be used, so that libvirt does
    not try /dev/vhost-net and fall back silently.
    """
    import xml.etree.ElementTree as ET

    iface = ET.Element("interface", type="ethernet")
    _sub(iface, "mac", address=nic.mac)
    _sub(iface, "target", dev=nic.tap.name, managed="no")
    _sub(iface, "model", type="virtio")
    driver: dict[str, str] = {"name": "vhost" if vhost_on else "qemu"}
    if nic.queues > 1:
        driver["queues"] = str(nic.queues)
    if nic.rx_queue_size is not None:
        driver["rx_queue_size"] = str(nic.rx_queue_size)
    if nic.tx_queue_size is not None:
        driver["tx_queue_size"] = str(nic.tx_queue_size)
    _sub(iface, "driver", **driver)
    if nic.tap.mtu is not None:
        _sub(iface, "mtu", size=str(nic.tap.mtu))
    return iface


def interface_xml(nic: NicSpec, vhost_on: bool) -> str:
    import xml.etree.ElementTree as ET

    return ET.tostring(interface(nic, vhost_on), encoding="unicode")


def render(
    spec: VmSpec, nics: Sequence[tuple[NicSpec, bool]], console: str, uuid: str | None = None
) -> str:
    """The domain XML of ``spec`` with ``nics`` ((spec, vhost on)); serial console to a file;
    ``uuid`` the domain's (None: libvirt draws one).

    ``type='kvm'`` for accel kvm (the only type for which libvirt uses vhost),
    ``type='qemu'`` (TCG) otherwise. ACPI is on: PCI hot-plug on 'pc' needs it (and
    q35's root ports use ACPI hot-plug too from QEMU 6.1 on).
    """
    import xml.etree.ElementTree as ET

    domain = ET.Element("domain", type="kvm" if spec.accel == "kvm" else "qemu")
    _sub(domain, "name", spec.name)
    if uuid is not None:
        _sub(domain, "uuid", uuid)
    _sub(domain, "memory", str(spec.memory), unit="MiB")
    _sub(domain, "vcpu", str(spec.cpus))
    os_ = _sub(domain, "os")
    _sub(os_, "type", "hvm", arch="x86_64", machine=spec.machine)
    if spec.kernel is not None:
        _sub(os_, "kernel", spec.kernel)
        if spec.initrd is not None:
            _sub(os_, "initrd", spec.initrd)
        if spec.cmdline is not None:
            _sub(os_, "cmdline", spec.cmdline)
    else:
        _sub(os_, "boot", dev="hd")
    features = _sub(domain, "features")
    _sub(features, "acpi")
    _sub(features, "apic")
    if spec.accel == "kvm":
        _sub(domain, "cpu", mode="host-passthrough")
    devices = _sub(domain, "devices")
    if spec.disk is not None:
        from vhostorch.vm.spec import disk_format

        disk = _sub(devices, "disk", type="file", device="disk")
        _sub(disk, "driver", name="qemu", type=disk_format(spec.disk))
        _sub(disk, "source", file=spec.disk)
        _sub(disk, "target", dev="vda", bus="virtio")
    for nic, vhost_on in nics:
        devices.append(interface(nic, vhost_on))
    if spec.pcie:
        # libvirt adds a pcie-root-port for each PCIe device it places, and no more: these
        # leave spec.spare_ports free for NICs hot-plugged later (no USB controller takes one).
        _sub(devices, "controller", type="usb", model="none")
        # libvirt numbers controllers without an index from 0, and index 0 must be the root.
        _sub(devices, "controller", type="pci", index="0", model="pcie-root")
        pcie_devices = len(nics) + (spec.disk is not None)
        for _ in range(pcie_devices + spec.spare_ports):
            _sub(devices, "controller", type="pci", model="pcie-root-port")
    serial = _sub(devices, "serial", type="file")
    _sub(serial, "source", path=console)
    _sub(serial, "target", port="0")
    _sub(devices, "memballoon", model="none")
    ET.indent(domain)
    return ET.tostring(domain, encoding="unicode")


def interface_ref(mac: str) -> str:
    """Just enough of an ``<interface>`` for libvirt to find it to unplug (by its MAC)."""
    import xml.etree.ElementTree as ET

    iface = ET.Element("interface", type="ethernet")
    _sub(iface, "mac", address=mac)
    return ET.tostring(iface, encoding="unicode")
