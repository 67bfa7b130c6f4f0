"""NICs vhost-net cannot serve: found, each with the reason, and kept out of the vhost checks.

vhost-net is the kernel's data path for a virtio-net device on a tap (or a macvtap
``/dev/tapN``). Other NICs move their packets elsewhere, so judging them by its
checks would fail a healthy VM:

- a netdev that is no tap: vhost-user (a userspace backend over a socket), vhost-vdpa
  (a vDPA device), user-mode networking (slirp), passt (``-netdev stream``, libvirt's
  ``<backend type='passt'/>``), socket, dgram, l2tpv3...;
- a NIC model other than virtio-net (e1000, rtl8139...) on any netdev: QEMU emulates
  the device and uses vhost only for virtio;
- a libvirt ``<interface type='hostdev'>`` (VFIO, an SR-IOV VF): no netdev at all,
  the device itself moves the packets; ``type='vdpa'``, ``'vhostuser'``, ``'user'``
  and the socket types likewise.

Each is reported in the report's ``nics`` as ``"applicable": false`` with ``reason``
and gets no check; ``verify`` judges the other NICs only.
"""

from __future__ import annotations

from vhostorch.check.report import NotApplicable
from vhostorch.record import TYPE_CHECKING

if TYPE_CHECKING:
    from vhostorch.check.observe import Observation
    from vhostorch.libvirt.domxml import Interface

# The netdev types vhost-net serves: a tap, or "bridge" (a tap qemu-bridge-helper opened).
TAP_TYPES = ("tap", "bridge")
# libvirt interface types whose QEMU NIC is a tap netdev (type='direct': a macvtap).
TAP_INTERFACES = ("ethernet", "bridge", "network", "direct")

_NETDEV_REASONS = {
    "vhost-user": "a vhost-user netdev: a userspace backend serves the virtqueues over its "
    "socket, not the kernel's vhost-net",
    "vhost-vdpa": "a vhost-vdpa netdev: a vDPA device serves the virtqueues, not vhost-net",
    "user": "user-mode networking (slirp): QEMU's own userspace stack, no tap for vhost-net",
    "stream": "a stream socket netdev (passt, or a socket peer): no tap for vhost-net",
    "dgram": "a datagram socket netdev: no tap for vhost-net",
}
_INTERFACE_REASONS = {
    "hostdev": "<interface type='hostdev'>: a PCI device (an SR-IOV VF) assigned to the guest "
    "through VFIO moves the packets itself, no vhost-net",
    "vdpa": "<interface type='vdpa'>: a vDPA device serves the virtqueues, not vhost-net",
    "vhostuser": "<interface type='vhostuser'>: a userspace backend serves the virtqueues "
    "over its socket, not the kernel's vhost-net",
    "user": "<interface type='user'>: user-mode networking (slirp or passt) in userspace, no "
    "tap for vhost-net",
}


def netdev_reason(kind: str) -> str:
    return _NETDEV_REASONS.get(kind, f"a {kind} netdev: vhost-net serves only taps")


def model_reason(model: str) -> str:
    return (
        f"NIC model {model}: QEMU emulates it in userspace; vhost-net serves only virtio-net "
        "devices"
    )


def interface_reason(iface: Interface) -> str | None:
    """Why vhost-net cannot serve this libvirt interface (None when it can)."""
    if iface.type not in TAP_INTERFACES:
        return _INTERFACE_REASONS.get(
            iface.type, f"<interface type='{iface.type}'>: no tap for vhost-net"
        )
    if iface.model is not None and iface.model != "virtio":
        return model_reason(iface.model)
    return None


def excluded_netdevs(obs: Observation) -> set[str]:
    """Tap netdevs on the command line whose device is another model than virtio-net."""
    return {
        n.id
        for n in obs.args.netdevs
        if n.type in TAP_TYPES
        and obs.args.device_for(n.id) is None
        and obs.args.other_nic_for(n.id) is not None
    }


def find(obs: Observation) -> list[NotApplicable]:
    """The NICs of ``obs`` that vhost-net cannot serve: on the command line, then those
    only the domain's XML shows (hostdev interfaces, and NICs hot-plugged through libvirt)."""
    found: list[NotApplicable] = []
    seen: set[str] = set()
    for netdev in obs.args.netdevs:
        device = obs.args.device_for(netdev.id) or obs.args.other_nic_for(netdev.id)
        name = (device.id if device and device.id else None) or netdev.id
        if netdev.type not in TAP_TYPES:
            found.append(NotApplicable(name, netdev.id, netdev.type, netdev_reason(netdev.type)))
        elif netdev.id in excluded_netdevs(obs) and device is not None:
            found.append(NotApplicable(name, netdev.id, device.driver, model_reason(device.driver)))
        seen.add(netdev.id)
    for iface in obs.domain.interfaces if obs.domain else ():
        if iface.netdev_id in seen:
            continue
        reason = interface_reason(iface)
        if reason is not None:
            kind = iface.type if iface.type not in TAP_INTERFACES else str(iface.model)
            name = iface.alias or iface.target or iface.mac or iface.type
            netdev_id = iface.netdev_id if iface.type != "hostdev" else None
            found.append(NotApplicable(name, netdev_id, kind, reason))
    return found
