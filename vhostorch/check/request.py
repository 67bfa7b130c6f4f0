"""Verdicts about what was asked of each NIC: nic.vhost.requested and nic.queues.

What asked is the QEMU command line, vhostorch's spec (its state file), or the
libvirt domain XML; these checks compare that with the netdev and device QEMU got.
"""

from __future__ import annotations

from vhostorch.check.ids import QUEUES, VHOST_REQUESTED
from vhostorch.check.nics import BY_LIBVIRT, CMDLINE
from vhostorch.check.report import FAIL, PASS, UNKNOWN, WARN, Check
from vhostorch.record import TYPE_CHECKING

if TYPE_CHECKING:
    from vhostorch.check.nics import Nic
    from vhostorch.check.observe import Observation


def requested(obs: Observation, nic: Nic) -> Check:
    """nic.vhost.requested: vhost was asked for, and what asked for it reached QEMU."""
    netdev, iface = nic.netdev, nic.iface
    evidence: dict[str, object] = {"netdev": netdev.id, "vhost": netdev.vhost}
    if netdev.vhostforce:
        evidence["vhostforce"] = True
    if iface is not None:
        evidence["domain_driver"] = iface.driver
        evidence["domain_type"] = obs.domain.type if obs.domain else None
    if nic.origin != CMDLINE:
        evidence["declared_by"] = nic.origin
    mode = nic.state.vhost if nic.state else None
    if mode is not None:
        evidence["spec_vhost"] = mode
    if netdev.wants_vhost:
        return nic.check(VHOST_REQUESTED, PASS, f"vhost is requested by {nic.origin}", evidence)
    if nic.state is not None and mode == "off":
        message = "vhost is off for this NIC, as its spec asks"
        return nic.check(VHOST_REQUESTED, PASS, message, evidence)
    if nic.state is not None and mode == "preferred":
        why = nic.state.fallback or "vhost was not available"
        message = (
            f"vhost is preferred but {why}: this NIC runs on QEMU's userspace data path, a "
            "fallback the spec allows"
        )
        return nic.check(VHOST_REQUESTED, WARN, message, evidence)
    if nic.origin == BY_LIBVIRT and iface is not None and iface.driver is None:
        message = (
            "unknown: hot-plugged without <driver name='vhost'/>, so libvirt used vhost only if "
            "it could open /dev/vhost-net (nic.vhost.fds tells)"
        )
        return nic.check(VHOST_REQUESTED, UNKNOWN, message, evidence)
    if iface is not None and obs.domain is not None:
        if iface.driver == "qemu":
            message = "the domain asks for the userspace data path (<driver name='qemu'/>)"
        elif obs.domain.type != "kvm":
            message = (
                f"libvirt uses vhost only for type='kvm' domains; this one is "
                f"type='{obs.domain.type}', so it started the NIC without vhost"
                + (" although <driver name='vhost'/> asks for it" if iface.driver else "")
            )
        else:
            message = (
                "libvirt started the NIC without vhost: it could not open /dev/vhost-net "
                "(libvirtd's log says 'Unable to open vhost-net')"
            )
        return nic.check(VHOST_REQUESTED, FAIL, message, evidence)
    message = (
        f"vhost is not requested on -netdev {netdev.id} (vhost=on is missing): the data path "
        "runs in QEMU"
    )
    return nic.check(VHOST_REQUESTED, FAIL, message, evidence)


def no_tap_nic() -> Check:
    """nic.vhost.requested for a QEMU with no tap NIC at all."""
    return Check(VHOST_REQUESTED, FAIL, "QEMU has no tap NIC, so no vhost")


def queues(obs: Observation, nic: Nic) -> Check:
    """nic.queues: the device is sized for as many queue pairs as its tap netdev has."""
    pairs = nic.netdev.queue_pairs
    device = nic.device
    evidence: dict[str, object] = {"netdev_queue_pairs": pairs}
    wanted, source = None, ""
    if nic.iface is not None:
        wanted, source = nic.iface.queues, f"<driver queues='{nic.iface.queues}'/>"
    elif device is not None and device.mq and device.vectors:
        wanted, source = (device.vectors - 2) // 2, f"vectors={device.vectors}"
    if device is not None:
        evidence.update(mq=device.mq, vectors=device.vectors)
    if wanted is not None:
        evidence["device_queue_pairs"] = wanted
    if wanted is not None and wanted != pairs:
        message = (
            f"the device is sized for {wanted} queue pair(s) ({source}) but its tap netdev has "
            f"{pairs}"
        )
        return nic.check(QUEUES, FAIL, message, evidence)
    if pairs > 1 and device is not None and not device.mq:
        message = (
            f"the tap netdev has {pairs} queue pairs but the device lacks mq=on, so the guest "
            "uses one"
        )
        return nic.check(QUEUES, FAIL, message, evidence)
    message = f"{pairs} queue pair(s) on the device and on the tap"
    return nic.check(QUEUES, PASS, message, evidence)
