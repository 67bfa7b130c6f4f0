"""Turn an Observation into checks: a pure function, so recorded observations can test it."""

from __future__ import annotations

from vhostorch import procfs
from vhostorch.checks import FAIL, PASS, UNKNOWN, WARN, Check, Report
from vhostorch.record import TYPE_CHECKING

if TYPE_CHECKING:
    from vhostorch.domxml import Interface
    from vhostorch.inspect import Observation
    from vhostorch.qemuargs import NetdevArg

TAP_TYPES = ("tap", "bridge")  # "bridge" is a tap opened by qemu-bridge-helper
NO_MONITOR = "needs QEMU's monitor (x-query-virtio-status), which this check did not query"
NO_TRACE = (
    "the kick/call wiring is set when the guest driver starts and is not visible "
    "afterwards; no attach-time trace was recorded for this QEMU"
)


class _Nic:
    """One tap netdev with its device and, for libvirt domains, its <interface>."""

    def __init__(self, netdev: NetdevArg, name: str, iface: Interface | None) -> None:
        self.netdev = netdev
        self.name = name
        self.iface = iface
        self.tap_fds: list[procfs.Fd] = []
        self.vhost_fds: list[procfs.Fd] = []
        self.vhost_assigned_by_order = False


def _nics(obs: Observation) -> list[_Nic]:
    nics = []
    interfaces = list(obs.domain.interfaces) if obs.domain else []
    for netdev in obs.args.netdevs:
        if netdev.type not in TAP_TYPES:
            continue
        device = obs.args.device_for(netdev.id)
        iface = next((i for i in interfaces if i.netdev_id == netdev.id), None)
        name = (device.id if device and device.id else None) or netdev.id
        nics.append(_Nic(netdev, name, iface))
    _claim_fds(obs.process, nics)
    return nics


def _claim_fds(process: procfs.Process, nics: list[_Nic]) -> None:
    """Give each NIC its tap and vhost fds: those named on the command line, else by order.

    QEMU opening taps itself (``ifname=``) opens each queue's /dev/vhost-net right
    after its tap, so a vhost fd belongs to the NIC of the nearest tap fd below it.
    """
    claimed: set[int] = set()
    for nic in nics:
        for num in nic.netdev.fds:
            fd = process.fd(num)
            if fd is not None:
                nic.tap_fds.append(fd)
                claimed.add(num)
        for num in nic.netdev.vhostfds:
            fd = process.fd(num)
            if fd is not None:
                nic.vhost_fds.append(fd)
                claimed.add(num)
    for nic in nics:
        if not nic.netdev.fds and nic.netdev.ifname:
            nic.tap_fds = [
                fd for fd in process.fds if fd.tap == nic.netdev.ifname and fd.num not in claimed
            ]
            claimed |= {fd.num for fd in nic.tap_fds}
    owner: _Nic | None = None
    tap_owner = {fd.num: nic for nic in nics for fd in nic.tap_fds}
    for fd in process.fds:
        if fd.num in tap_owner:
            owner = tap_owner[fd.num]
        elif (
            fd.target == procfs.VHOST_NET
            and fd.num not in claimed
            and owner is not None
            and owner.netdev.wants_vhost
            and not owner.netdev.vhostfds
        ):
            owner.vhost_fds.append(fd)
            owner.vhost_assigned_by_order = True
            claimed.add(fd.num)


def _requested(obs: Observation, nic: _Nic) -> Check:
    netdev, iface = nic.netdev, nic.iface
    evidence: dict[str, object] = {"netdev": netdev.id, "vhost": netdev.vhost}
    if netdev.vhostforce:
        evidence["vhostforce"] = True
    if iface is not None:
        evidence["domain_driver"] = iface.driver
        evidence["domain_type"] = obs.domain.type if obs.domain else None
    if netdev.wants_vhost:
        return Check("nic.vhost.requested", PASS, "vhost is requested on the QEMU command line",
                     evidence, nic=nic.name)  # fmt: skip
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
        return Check("nic.vhost.requested", FAIL, message, evidence, nic=nic.name)
    return Check(
        "nic.vhost.requested", FAIL,
        f"vhost is not requested on -netdev {netdev.id} (vhost=on is missing): "
        "the data path runs in QEMU",
        evidence, nic=nic.name,
    )  # fmt: skip


def _tap_fds(obs: Observation, nic: _Nic) -> Check:
    pairs = nic.netdev.queue_pairs
    taps = sorted({fd.tap or "?" for fd in nic.tap_fds})
    evidence: dict[str, object] = {
        "expected": pairs,
        "fds": [fd.num for fd in nic.tap_fds],
        "taps": taps,
    }
    if len(nic.tap_fds) != pairs:
        return Check("nic.tap.fds", FAIL,
                     f"{len(nic.tap_fds)} tap fd(s) open for {pairs} queue pair(s)",
                     evidence, nic=nic.name)  # fmt: skip
    if len(taps) != 1 or taps[0] == "?":
        return Check("nic.tap.fds", FAIL, f"the tap fds are not on one tap: {taps}", evidence,
                     nic=nic.name)  # fmt: skip
    tap = taps[0]
    if nic.iface is not None and nic.iface.target and nic.iface.target != tap:
        return Check("nic.tap.fds", FAIL,
                     f"the fds are on tap {tap}, the domain names {nic.iface.target}",
                     evidence, nic=nic.name)  # fmt: skip
    if obs.taps_seen:
        return Check("nic.tap.fds", UNKNOWN,
                     f"{pairs} fd(s) on tap {tap}; its queue mode is unknown: {obs.taps_seen}",
                     evidence, nic=nic.name)  # fmt: skip
    link = obs.taps.get(tap)
    if link is None or link.tun is None:
        return Check("nic.tap.fds", FAIL, f"tap {tap} held by QEMU was not found over netlink",
                     evidence, nic=nic.name)  # fmt: skip
    evidence.update(
        multi_queue=link.tun.multi_queue, vnet_hdr=link.tun.vnet_hdr,
        attached_queues=link.tun.attached_queues, mtu=link.mtu, master=link.master,
        carrier=link.carrier, up=link.up,
    )  # fmt: skip
    if link.tun.multi_queue != (pairs > 1):
        mode = "multi-queue" if link.tun.multi_queue else "single-queue"
        return Check("nic.tap.fds", FAIL, f"tap {tap} is {mode} but QEMU uses {pairs} queue(s)",
                     evidence, nic=nic.name)  # fmt: skip
    if not link.tun.vnet_hdr:
        return Check("nic.tap.fds", WARN,
                     f"tap {tap} has no vnet_hdr: no offloads, and vhost copies headers",
                     evidence, nic=nic.name)  # fmt: skip
    return Check("nic.tap.fds", PASS, f"{pairs} fd(s) on tap {tap}, queue mode matches",
                 evidence, nic=nic.name)  # fmt: skip


def _vhost_fds(obs: Observation, nic: _Nic) -> Check:
    pairs = nic.netdev.queue_pairs
    wrong = [fd.num for fd in nic.vhost_fds if fd.target != procfs.VHOST_NET]
    good = [fd.num for fd in nic.vhost_fds if fd.target == procfs.VHOST_NET]
    evidence: dict[str, object] = {"expected": pairs, "fds": good}
    if nic.vhost_assigned_by_order:
        evidence["assigned"] = "by fd order (QEMU opened them after each tap)"
    if wrong:
        evidence["not_vhost_net"] = wrong
    if len(good) == pairs and not wrong:
        return Check("nic.vhost.fds", PASS,
                     f"{pairs} /dev/vhost-net fd(s) for {pairs} queue pair(s)",
                     evidence, nic=nic.name)  # fmt: skip
    if not obs.vhost_net and not good:
        evidence["host_vhost_net"] = False
    return Check("nic.vhost.fds", FAIL,
                 f"{len(good)} /dev/vhost-net fd(s) for {pairs} queue pair(s)"
                 + ("" if obs.vhost_net else "; this host has no /dev/vhost-net"),
                 evidence, nic=nic.name)  # fmt: skip


def _worker(obs: Observation, nic: _Nic, total_vhost: int) -> Check:
    evidence: dict[str, object] = {
        "model": obs.worker_model,
        "tids": list(obs.workers),
        "vhost_fds_in_process": total_vhost,
    }
    if not nic.vhost_fds:
        return Check("nic.vhost.worker", FAIL, "no vhost device, so no worker", evidence,
                     nic=nic.name)  # fmt: skip
    where = "kernel threads" if obs.worker_model == "kthread" else "threads of QEMU"
    if len(obs.workers) >= total_vhost:
        return Check("nic.vhost.worker", PASS,
                     f"{len(obs.workers)} vhost-{obs.process.pid} worker(s) ({where}) for "
                     f"{total_vhost} vhost device(s)", evidence, nic=nic.name)  # fmt: skip
    return Check("nic.vhost.worker", FAIL,
                 f"{len(obs.workers)} vhost-{obs.process.pid} worker(s) for {total_vhost} vhost "
                 "device(s): VHOST_SET_OWNER did not start them all", evidence,
                 nic=nic.name)  # fmt: skip


def verify(obs: Observation) -> Report:
    """All checks for one QEMU."""
    checks: list[Check] = []
    pid = obs.process.pid
    dev: dict[str, object] = {"path": "/dev/vhost-net"}
    checks.append(
        Check("host.vhost-net", PASS, "/dev/vhost-net is present", dev)
        if obs.vhost_net
        else Check("host.vhost-net", FAIL,
                   "/dev/vhost-net is missing on this host (vhostorch doctor says why)", dev)
    )  # fmt: skip
    kvm_fds = [fd.num for fd in obs.process.fds_to(procfs.KVM_VM)]
    accel = list(obs.args.accel) or ["tcg (default)"]
    checks.append(
        Check("vm.kvm", PASS, "QEMU runs a KVM VM", {"kvm_vm_fds": kvm_fds, "accel": accel})
        if kvm_fds
        else Check("vm.kvm", FAIL,
                   "QEMU runs without KVM (no anon_inode:kvm-vm fd): emulated CPUs, and "
                   "libvirt does not use vhost for such domains", {"accel": accel})
    )  # fmt: skip
    nics = _nics(obs)
    total_vhost = len(obs.process.fds_to(procfs.VHOST_NET))
    for nic in nics:
        requested = _requested(obs, nic)
        checks += [requested, _tap_fds(obs, nic), _vhost_fds(obs, nic)]
        checks.append(_worker(obs, nic, total_vhost))
        if not nic.vhost_fds:
            continue  # nothing further can be attached
        checks.append(Check("nic.vhost.started", UNKNOWN, f"unknown: {NO_MONITOR}", nic=nic.name))
        checks.append(Check("nic.vhost.memtable", UNKNOWN, f"unknown: {NO_MONITOR}",
                            nic=nic.name))  # fmt: skip
        for queue in range(2 * nic.netdev.queue_pairs):
            checks.append(Check("nic.kick", UNKNOWN, f"unknown: {NO_TRACE}", nic=nic.name,
                                queue=queue))  # fmt: skip
            checks.append(Check("nic.call", UNKNOWN, f"unknown: {NO_TRACE}", nic=nic.name,
                                queue=queue))  # fmt: skip
        checks.append(Check("nic.features", UNKNOWN, f"unknown: {NO_MONITOR}", nic=nic.name))
    if not nics:
        checks.append(Check("nic.vhost.requested", FAIL, "QEMU has no tap NIC, so no vhost"))
    target: dict[str, object] = {"pid": pid, "name": obs.args.name}
    if obs.domain is not None:
        target["domain"] = obs.domain.name
        target["domain_type"] = obs.domain.type
    nic_info: tuple[dict[str, object], ...] = tuple(
        {
            "name": nic.name,
            "netdev": nic.netdev.id,
            "tap": (nic.tap_fds[0].tap if nic.tap_fds else nic.netdev.ifname),
            "queue_pairs": nic.netdev.queue_pairs,
            "vhost_requested": nic.netdev.wants_vhost,
        }
        for nic in nics
    )
    return Report(target, nic_info, tuple(checks))
