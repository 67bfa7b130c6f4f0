"""What a libvirt domain asks vhostorch to manage, declared in its ``<metadata>``.

The libvirt hook reads only this (a hook must never call back into libvirt), next
to the standard interface the tap belongs to::

    <metadata>
      <vhostorch:vm xmlns:vhostorch="http://vhostorch.org/xmlns/libvirt/1" verify="warn">
        <vhostorch:tap dev="vm1-net0" bridge="br0" mtu="9000" owner="libvirt-qemu"/>
      </vhostorch:vm>
    </metadata>
    <devices>
      <interface type='ethernet'>
        <target dev='vm1-net0' managed='no'/>
        <model type='virtio'/>
        <driver name='vhost' queues='4'/>
      </interface>

A declared tap must be the target of an ``ethernet`` interface with
``managed='no'`` (libvirt then opens it and leaves it alone); its queue mode comes
from that interface's ``<driver queues=>``, as libvirt will open it. ``verify``
(on the element or per tap) is ``warn`` (report only) or ``enforce`` (a failed
check stops the domain). ``worker-cpus`` (on the element, a CPU list such as ``2-3``) pins
the domain's vhost-net workers there when it has started (vhostorch pin). Errors are one
line naming the element (InvalidSpec).
"""

from __future__ import annotations

from vhostorch.errors import InvalidSpec
from vhostorch.kernel.cpus import cpu_list
from vhostorch.libvirt import qemuconf
from vhostorch.libvirt.domxml import driver_queues
from vhostorch.libvirt.domxml import root as domain_root
from vhostorch.record import TYPE_CHECKING, Record
from vhostorch.taps.spec import tap_from_mapping

if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

    from vhostorch.taps import TapSpec

NAMESPACE = "http://vhostorch.org/xmlns/libvirt/1"
POLICIES = ("warn", "enforce")
DEFAULT_OWNER = qemuconf.DEFAULT_USERS[0]  # Debian's qemu.conf default user
# The <vhostorch:tap> attributes that spell a tap's attributes (taps.spec.ATTRS); the
# queues are the interface's, as libvirt will open the tap.
_TAP_KEYS = {"name": "dev", "bridge": "bridge", "mtu": "mtu", "owner": "owner", "group": "group"}
_TAP_ATTRS = {*_TAP_KEYS.values(), "verify"}
_VM_ATTRS = {"verify", "worker-cpus"}


class ManagedTap(Record):
    spec: TapSpec
    verify: str


class Declared(Record):
    """The domain's name, its ``<vhostorch:vm verify=>`` policy (None: the domain has no
    vhostorch metadata, so nothing to do) and the taps vhostorch is to manage for it."""

    domain: str
    verify: str | None
    taps: tuple[ManagedTap, ...]
    worker_cpus: str | None = None  # the CPUs its vhost-net workers are pinned to at start

    @property
    def enforce(self) -> bool:
        return self.verify == "enforce" or any(t.verify == "enforce" for t in self.taps)

    def policy(self, tap: str | None) -> str:
        """The policy for the NIC on ``tap`` (the domain's for a NIC it does not declare)."""
        for t in self.taps:
            if t.spec.name == tap:
                return t.verify
        return self.verify or "warn"


def _policy(value: str | None, where: str, default: str) -> str:
    if value is None:
        return default
    if value not in POLICIES:
        raise InvalidSpec(f"{where}: verify must be one of {', '.join(POLICIES)}, not {value!r}")
    return value


def _interfaces(root: Any) -> dict[str, tuple[Any, int]]:
    """Target dev → (its <interface>, queues) for every interface naming a target."""
    found = {}
    for iface in root.iterfind("devices/interface"):
        target = iface.find("target")
        dev = target.get("dev") if target is not None else None
        if dev:
            found[dev] = (iface, max(driver_queues(iface), 1))
    return found


def parse(xml: str, default_owner: str | None = DEFAULT_OWNER) -> Declared:
    """Read the vhostorch metadata of a domain's XML. Raises InvalidSpec."""
    return declared(domain_root(xml), default_owner)


def declared(root: Any, default_owner: str | None = DEFAULT_OWNER) -> Declared:
    """The vhostorch metadata of a parsed ``<domain>`` (domxml.root). Raises InvalidSpec."""
    name = root.findtext("name") or ""
    vms = root.findall(f"metadata/{{{NAMESPACE}}}vm")
    if not vms:
        return Declared(name, None, ())
    if len(vms) > 1:
        raise InvalidSpec("metadata: more than one <vhostorch:vm> element")
    vm = vms[0]
    extra = sorted(set(vm.attrib) - _VM_ATTRS)
    if extra:
        raise InvalidSpec(f"<vhostorch:vm>: unknown attribute {extra[0]!r}")
    policy = _policy(vm.get("verify"), "<vhostorch:vm>", "warn")
    interfaces = _interfaces(root)
    taps = []
    for index, tap in enumerate(vm.findall(f"{{{NAMESPACE}}}tap")):
        dev = tap.get("dev")
        where = f"<vhostorch:tap> #{index + 1}" + (f" ({dev})" if dev else "")
        extra = sorted(set(tap.attrib) - _TAP_ATTRS)
        if extra:
            raise InvalidSpec(f"{where}: unknown attribute {extra[0]!r}")
        if not dev:
            raise InvalidSpec(f"{where}: dev is required")
        if dev not in interfaces:
            raise InvalidSpec(f"{where}: no <interface> has <target dev='{dev}'/>")
        iface, queues = interfaces[dev]
        target = iface.find("target")
        if iface.get("type") != "ethernet" or target.get("managed") != "no":
            raise InvalidSpec(
                f"{where}: its interface must be <interface type='ethernet'> with "
                "<target managed='no'/>, or libvirt would make or remove the tap itself"
            )
        try:
            spec = tap_from_mapping(
                tap.attrib,
                _TAP_KEYS,
                defaults={"queues": queues, "owner": default_owner},
                text=True,
            )
        except InvalidSpec as err:
            raise InvalidSpec(f"{where}: {err}") from None
        taps.append(ManagedTap(spec, _policy(tap.get("verify"), where, policy)))
    names = [t.spec.name for t in taps]
    if len(set(names)) != len(names):
        raise InvalidSpec("metadata: a tap is declared twice")
    pin = vm.get("worker-cpus")
    worker_cpus = None if pin is None else cpu_list(pin, "<vhostorch:vm> worker-cpus")
    return Declared(name, policy, tuple(taps), worker_cpus)


def render(taps: Sequence[ManagedTap], verify: str = "warn") -> str:
    """The ``<vhostorch:vm>`` element declaring ``taps`` (for a domain's ``<metadata>``)."""
    from xml.sax.saxutils import quoteattr

    lines = [f"<vhostorch:vm xmlns:vhostorch={quoteattr(NAMESPACE)} verify={quoteattr(verify)}>"]
    for tap in taps:
        spec = tap.spec
        attrs = {key: getattr(spec, attr) for attr, key in _TAP_KEYS.items()}
        attrs["verify"] = tap.verify
        text = " ".join(f"{k}={quoteattr(str(v))}" for k, v in attrs.items() if v is not None)
        lines.append(f"  <vhostorch:tap {text}/>")
    lines.append("</vhostorch:vm>")
    return "\n".join(lines)
