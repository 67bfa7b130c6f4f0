"""Why a NIC does not use vhost (or not fully): one stable reason code per NIC, with evidence.

A pure function of an Observation, a NIC and the checks ``verify`` made for it.
The codes are stable (scripts, alerts and the metrics' ``reason`` label match on
them); the README's check section says what each means:

  not-requested         vhost was not asked for: vhost=off (or no vhost=on) on -netdev,
                        <driver name='qemu'/>, a type='qemu' (TCG) libvirt domain, or a
                        vhostorch spec with vhost = "off"
  libvirt-open-failed   libvirt could not open /dev/vhost-net and started the NIC without
                        it ('Unable to open vhost-net' in libvirtd's or virtqemud's log)
  vhost-net-missing     vhost was asked for but the host has no /dev/vhost-net (the
                        vhost_net module is not loaded, or not built)
  qemu-fallback         QEMU holds vhost fds but could not start vhost and fell back on
                        its userspace virtio ('unable to start vhost net' in its log, or
                        the monitor: driver up, vhost not started)
  irqchip-off           vhost runs but QEMU relays every interrupt: no in-kernel irqchip
                        (-machine kernel_irqchip=off), so no irqfd. kernel_irqchip=split is
                        not this: MSIs still go through KVM irqfds (no reason)
  no-msix               vhost runs but QEMU relays every interrupt: the device has no
                        MSI-X vectors (vectors=0), or the guest never enabled MSI-X
                        (pci=nomsi): no call eventfd is a KVM irqfd
  unexplained           no vhost fd, and nothing seen says why

A NIC whose vhost is attached and wired has no reason (None).

What the real thing does (QEMU 7.2 on Linux 6.1 and 6.12, QEMU 10.0 on 6.12, in the test
host; versions between were not run):

- qemu-fallback: virtio_net_vhost_status (hw/net/virtio-net.c) prints the words at
  DRIVER_OK when vhost_net_start fails, and the NIC runs in QEMU. ``ioeventfd=off``
  does not make it fail: virtio_bus_grab_ioeventfd (hw/virtio/virtio-bus.c) lets vhost
  take the host notifiers whatever ioeventfd says, and vhost starts. A vhost module
  loaded with max_mem_regions=0 does: QEMU reads 0 as invalid and assumes 64
  (vhost_kernel_memslots_limit), so the device opens, then VHOST_SET_MEM_TABLE fails
  with E2BIG at start ('unable to start vhost net: 7').
- irqchip-off: QEMU 7.2 runs KVM with kernel_irqchip=off (it warns 'Userspace local
  APIC is deprecated for KVM') with its default CPU model, but with ``-cpu host``
  (also ``kvm-poll-control=off``) it aborts before the guest runs: 'failed to set MSR
  0x4b564d06 to 0x0', kvm_buf_set_msrs' assertion. So this reason is seen only with
  a named CPU model. QEMU 10.0 refuses kernel_irqchip=off with KVM ('KVM does not support
  userspace APIC', exit 1) whatever the model: it never gives this reason.
- There is no code for a /dev/vhost-net QEMU may not open: such a QEMU never runs.
  net_init_tap_one (net/tap.c) opens the device itself and, when it cannot, QEMU 7.2
  warns 'tap: open vhost char device failed: Permission denied' and aborts
  (net_client_init1's assertion; with vhostforce=on it exits 1); QEMU 10.0 says the same
  words as an error and exits 1. libvirtd opens it as
  root, which a mode 000 device does not stop, and when it cannot it logs 'Unable to
  open vhost-net' (libvirt-open-failed) or, with <driver name='vhost'/>, refuses the
  domain. ``doctor`` checks the device's access (host.vhost-net.access).
"""

from __future__ import annotations

import itertools

from vhostorch.check.ids import CALL, VHOST_STARTED
from vhostorch.check.nics import BY_LIBVIRT, virtio
from vhostorch.check.report import FAIL, PASS, RELAYED_INTERRUPT, UNKNOWN, Reason
from vhostorch.qemu import args
from vhostorch.record import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Final

    from vhostorch.check.nics import Nic
    from vhostorch.check.observe import Observation
    from vhostorch.check.report import Check, ReasonCode

NOT_REQUESTED: Final = "not-requested"
LIBVIRT_OPEN_FAILED: Final = "libvirt-open-failed"
VHOST_NET_MISSING: Final = "vhost-net-missing"
QEMU_FALLBACK: Final = "qemu-fallback"
IRQCHIP_OFF: Final = "irqchip-off"
NO_MSIX: Final = "no-msix"
UNEXPLAINED: Final = "unexplained"
CODES: Final[tuple[ReasonCode, ...]] = (
    NOT_REQUESTED, LIBVIRT_OPEN_FAILED, VHOST_NET_MISSING, QEMU_FALLBACK,
    IRQCHIP_OFF, NO_MSIX, UNEXPLAINED,
)  # fmt: skip
# What QEMU (hw/net/virtio-net.c) prints when vhost_net_start fails.
FALLBACK_WORDS = ("unable to start vhost net", "falling back on userspace virtio")


def kernel_irqchip(argv: Sequence[str]) -> str | None:
    """The -machine kernel_irqchip (or kernel-irqchip) value on a QEMU command line."""
    value = None
    for opt, arg in itertools.pairwise(argv):
        if opt.lstrip("-") in ("machine", "M"):
            opts = args.split_opts(arg, "type")
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
    return Reason(UNEXPLAINED, "no /dev/vhost-net fd, and nothing seen says why", evidence)


def _not_at_work(obs: Observation, nic: Nic, checks: Sequence[Check]) -> Reason | None:
    """A NIC holding vhost fds: did QEMU fall back, and do its interrupts bypass QEMU?"""
    logs = obs.logs
    fell = [line for line in (logs.qemu_lines if logs else ()) if FALLBACK_WORDS[0] in line]
    started = [c for c in checks if c.id == VHOST_STARTED]
    seen = started[0].status if started else UNKNOWN
    if seen == PASS:
        # vhost runs on this NIC (its monitor or the trace saw it): a fallback line is
        # another NIC's, or an earlier run's in a log that QEMU appends to.
        fell = []
    device = virtio(obs, nic)
    evidence: dict[str, object] = {}
    if fell and logs is not None:
        evidence.update(log=logs.qemu_log, lines=fell)
    if device is not None and device.driver_ok and device.vm_running and not device.vhost_started:
        evidence["monitor"] = {"status": list(device.statuses), "vhost_started": False}
    if fell or "monitor" in evidence or seen == FAIL:
        message = "QEMU could not start vhost and fell back on its userspace virtio"
        if seen == UNKNOWN and "monitor" not in evidence:
            message += (
                " (its log says so; which NIC and which run the line is about is not known "
                "without QEMU's monitor or the wiring trace)"
            )
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
    relayed = [c.queue for c in checks if c.id == CALL and c.cause == RELAYED_INTERRUPT]
    if relayed:
        message = (
            "no call eventfd is a KVM irqfd although the in-kernel irqchip is on: the guest "
            "never enabled MSI-X for the device (pci=nomsi, or a driver without MSI-X), so "
            "QEMU injects every interrupt"
        )
        return Reason(NO_MSIX, message, {"queues": relayed, "kernel_irqchip": irqchip})
    return None
