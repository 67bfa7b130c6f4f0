"""Why a NIC does not use vhost (or not fully): one stable reason code per NIC, with evidence.

A pure function of an Observation, a NIC and the checks ``verify`` made for it.
The codes are stable (scripts, alerts and the metrics' ``reason`` label match on
them); the README's check section says what each means:

  not-requested         vhost was not asked for: vhost=off (or no vhost=on) on -netdev,
                        <driver name='qemu'/>, a type='qemu' (TCG) libvirt domain, or a
                        vhostorch spec with vhost = "off"
  libvirt-open-failed   libvirt could not open /dev/vhost-net and started the NIC without
                        it ('Unable to open vhost-net' in libvirtd's log)
  vhost-net-missing     vhost was asked for but the host has no /dev/vhost-net (the
                        vhost_net module is not loaded, or not built)
  vhost-net-denied      /dev/vhost-net exists but QEMU's user may not open it read-write
  qemu-fallback         QEMU holds vhost fds but could not start vhost and fell back on
                        its userspace virtio ('unable to start vhost net' in its log, or
                        the monitor: driver up, vhost not started)
  irqchip-off           vhost runs but QEMU relays every interrupt: no in-kernel irqchip
                        (-machine kernel_irqchip=off), so no irqfd
  no-msix               vhost runs but QEMU relays every interrupt: the device has no
                        MSI-X vectors (vectors=0), or the guest never enabled MSI-X
                        (pci=nomsi): no call eventfd is a KVM irqfd
  unexplained           no vhost fd, and nothing seen says why

A NIC whose vhost is attached and wired has no reason (None).
"""

from __future__ import annotations

import itertools

from vhostorch.check.ids import CALL, VHOST_STARTED
from vhostorch.check.nics import BY_LIBVIRT, virtio
from vhostorch.check.report import FAIL
from vhostorch.qemu import args as qemuargs
from vhostorch.record import TYPE_CHECKING, Record

if TYPE_CHECKING:
    from collections.abc import Sequence

    from vhostorch.check.nics import Nic
    from vhostorch.check.observe import Observation
    from vhostorch.check.report import Check

NOT_REQUESTED = "not-requested"
LIBVIRT_OPEN_FAILED = "libvirt-open-failed"
VHOST_NET_MISSING = "vhost-net-missing"
VHOST_NET_DENIED = "vhost-net-denied"
QEMU_FALLBACK = "qemu-fallback"
IRQCHIP_OFF = "irqchip-off"
NO_MSIX = "no-msix"
UNEXPLAINED = "unexplained"
CODES = (
    NOT_REQUESTED, LIBVIRT_OPEN_FAILED, VHOST_NET_MISSING, VHOST_NET_DENIED, QEMU_FALLBACK,
    IRQCHIP_OFF, NO_MSIX, UNEXPLAINED,
)  # fmt: skip
# What QEMU (hw/net/virtio-net.c) prints when vhost_net_start fails.
FALLBACK_WORDS = ("unable to start vhost net", "falling back on userspace virtio")


class Reason(Record):
    code: str
    message: str
    evidence: dict[str, object]

    def to_json(self) -> dict[str, object]:
        return {"code": self.code, "message": self.message, "evidence": self.evidence}


def kernel_irqchip(argv: Sequence[str]) -> str | None:
    """The -machine kernel_irqchip (or kernel-irqchip) value on a QEMU command line."""
    value = None
    for opt, arg in itertools.pairwise(argv):
        if opt.lstrip("-") in ("machine", "M"):
            opts = qemuargs.split_opts(arg, "type")
            for key in ("kernel_irqchip", "kernel-irqchip"):
                if key in opts:
                    value = opts[key]
    return value


def reason(obs: Observation, nic: Nic, checks: Sequence[Check]) -> Reason | None:
    """Why ``nic`` does not use vhost, or not fully; None when nothing says it does not."""
    if not nic.vhost_fds:
        return _missing(obs, nic)
    return _not_at_work(obs, nic, checks)


def _missing(obs: Observation, nic: Nic) -> Reason:
    """A NIC holding no /dev/vhost-net fd."""
    netdev, iface, domain = nic.netdev, nic.iface, obs.domain
    evidence: dict[str, object] = {"netdev": netdev.id, "vhost": netdev.vhost}
    if nic.state is not None and nic.state.vhost == "off":
        evidence["spec_vhost"] = "off"
        return Reason(NOT_REQUESTED, 'the spec asks for no vhost (vhost = "off")', evidence)
    if iface is not None and iface.driver == "qemu":
        evidence["domain_driver"] = "qemu"
        message = "the domain asks for QEMU's userspace data path (<driver name='qemu'/>)"
        return Reason(NOT_REQUESTED, message, evidence)
    if domain is not None and domain.type != "kvm":
        evidence.update(domain_type=domain.type, domain_driver=iface.driver if iface else None)
        message = (
            f"libvirt asks for vhost only in type='kvm' domains; this one is type='{domain.type}'"
        )
        return Reason(NOT_REQUESTED, message, evidence)
    logs, device = obs.logs, obs.device
    if device is not None:
        evidence["device"] = device
    if logs is not None and logs.libvirtd_lines:
        evidence.update(log=logs.libvirtd_log, lines=list(logs.libvirtd_lines))
        message = "libvirt could not open /dev/vhost-net, so it started the NIC without vhost"
        if not obs.vhost_net:
            message += " (this host has no /dev/vhost-net)"
        return Reason(LIBVIRT_OPEN_FAILED, message, evidence)
    asked = (
        netdev.wants_vhost
        or (nic.state is not None and nic.state.vhost != "off")
        or nic.origin == BY_LIBVIRT
        or (iface is not None and domain is not None)
    )
    if not asked:
        accel = list(obs.args.accel)
        if accel:
            evidence["accel"] = accel
        message = f"-netdev {netdev.id} does not ask for vhost " + (
            "(vhost=off)" if netdev.vhost is False else "(no vhost=on)"
        )
        return Reason(NOT_REQUESTED, message, evidence)
    if nic.state is not None and nic.state.fallback:
        evidence["fallback"] = nic.state.fallback
    if not obs.vhost_net:
        return Reason(VHOST_NET_MISSING, "this host has no /dev/vhost-net", evidence)
    if device is not None and device.get("qemu_may_open") is False:
        message = (
            f"/dev/vhost-net (mode {device.get('mode')}, uid {device.get('uid')}, gid "
            f"{device.get('gid')}) may not be opened read-write by QEMU's user "
            f"(uid {device.get('qemu_uid')})"
        )
        return Reason(VHOST_NET_DENIED, message, evidence)
    return Reason(UNEXPLAINED, "no /dev/vhost-net fd, and nothing seen says why", evidence)


def _not_at_work(obs: Observation, nic: Nic, checks: Sequence[Check]) -> Reason | None:
    """A NIC holding vhost fds: did QEMU fall back, and do its interrupts bypass QEMU?"""
    logs = obs.logs
    fell = [line for line in (logs.qemu_lines if logs else ()) if FALLBACK_WORDS[0] in line]
    device = virtio(obs, nic)
    evidence: dict[str, object] = {}
    if fell and logs is not None:
        evidence.update(log=logs.qemu_log, lines=fell)
    if device is not None and device.driver_ok and device.vm_running and not device.vhost_started:
        evidence["monitor"] = {"status": list(device.statuses), "vhost_started": False}
    started = [c for c in checks if c.id == VHOST_STARTED]
    if fell or "monitor" in evidence or (started and started[0].status == FAIL):
        message = "QEMU could not start vhost and fell back on its userspace virtio"
        return Reason(QEMU_FALLBACK, message, evidence)
    irqchip = kernel_irqchip(obs.process.argv)
    if irqchip in ("off", "false", "no"):
        evidence = {"kernel_irqchip": irqchip}
        message = (
            "no in-kernel irqchip (kernel_irqchip=off): QEMU injects every interrupt vhost "
            "signals, no irqfd"
        )
        return Reason(IRQCHIP_OFF, message, evidence)
    if nic.device is not None and nic.device.vectors == 0:
        message = "the device has no MSI-X vectors (vectors=0): QEMU injects every interrupt"
        return Reason(NO_MSIX, message, {"vectors": 0})
    relayed = [
        c.queue
        for c in checks
        if c.id == CALL and c.status == FAIL and "not a KVM irqfd" in c.message
    ]
    if relayed:
        message = (
            "no call eventfd is a KVM irqfd although the in-kernel irqchip is on: the guest "
            "never enabled MSI-X for the device (pci=nomsi, or a driver without MSI-X), so "
            "QEMU injects every interrupt"
        )
        return Reason(NO_MSIX, message, {"queues": relayed, "kernel_irqchip": irqchip})
    return None
