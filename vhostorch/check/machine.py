"""Verdicts about the host and the VM as a whole: host.vhost-net and vm.kvm."""

from __future__ import annotations

from vhostorch.check.ids import HOST_VHOST_NET, VM_KVM
from vhostorch.check.report import FAIL, PASS, WARN, Check
from vhostorch.kernel import procfs
from vhostorch.record import TYPE_CHECKING

if TYPE_CHECKING:
    from vhostorch.check.observe import Observation


def vhost_optional(obs: Observation) -> bool:
    """A VM vhostorch started from a spec that lets every NIC run without vhost (preferred,
    off): what the spec allowed gets warnings, not failures."""
    plan = obs.plan
    return plan is not None and all(n.vhost != "required" for n in plan.nics)


def host_vhost_net(obs: Observation) -> Check:
    dev: dict[str, object] = {"path": "/dev/vhost-net"}
    if obs.vhost_net:
        return Check(HOST_VHOST_NET, PASS, "/dev/vhost-net is present", dev)
    if vhost_optional(obs):
        message = "/dev/vhost-net is missing on this host; no NIC of this VM requires vhost"
        return Check(HOST_VHOST_NET, WARN, message, dev)
    message = "/dev/vhost-net is missing on this host (vhostorch doctor says why)"
    return Check(HOST_VHOST_NET, FAIL, message, dev)


def vm_kvm(obs: Observation) -> Check:
    kvm_fds = [fd.num for fd in obs.process.fds_to(procfs.KVM_VM)]
    accel = list(obs.args.accel) or ["tcg (default)"]
    if kvm_fds:
        return Check(VM_KVM, PASS, "QEMU runs a KVM VM", {"kvm_vm_fds": kvm_fds, "accel": accel})
    if obs.plan is not None and obs.plan.accel == "tcg" and vhost_optional(obs):
        message = 'QEMU runs TCG (emulated CPUs), as the spec asks (accel = "tcg")'
        return Check(VM_KVM, WARN, message, {"accel": accel})
    message = (
        "QEMU runs without KVM (no anon_inode:kvm-vm fd): emulated CPUs, and libvirt does "
        "not use vhost for such domains"
    )
    return Check(VM_KVM, FAIL, message, {"accel": accel})
