"""Verdicts about what QEMU holds for each NIC: nic.tap.fds, nic.vhost.fds, nic.vhost.worker.

The evidence is in /proc (the fds, the tap each tun fd is attached to, the vhost
workers) and in the taps as rtnetlink describes them.
"""

from __future__ import annotations

from vhostorch.check import nics
from vhostorch.check.ids import TAP_FDS, VHOST_FDS, VHOST_WORKER
from vhostorch.check.report import FAIL, PASS, UNKNOWN, WARN, Check
from vhostorch.kernel import procfs
from vhostorch.record import TYPE_CHECKING

if TYPE_CHECKING:
    from vhostorch.check.nics import Nic
    from vhostorch.check.observe import Observation
    from vhostorch.kernel.rtnl import Link


def tap_fds(obs: Observation, nic: Nic) -> Check:
    """nic.tap.fds: one tap fd per queue pair, all on the NIC's tap, its queue mode matching.

    A macvtap (libvirt's type='direct') is served by /dev/tapN fds, one per queue; it
    has no single-queue mode to mismatch (see ``_macvtap``).
    """
    pairs = nic.netdev.queue_pairs
    links = [nics.link_of(obs, fd) for fd in nic.tap_fds]
    taps = sorted({name or _unnamed(fd) for name, fd in zip(links, nic.tap_fds, strict=True)})
    evidence: dict[str, object] = {
        "expected": pairs,
        "fds": [fd.num for fd in nic.tap_fds],
        "taps": taps,
    }
    # A tap deleted under QEMU leaves its fds open on no device (fdinfo's iff: is empty):
    # they name no tap, so those QEMU opened by name (ifname=) are not even found as the NIC's.
    orphans = [fd.num for fd in nic.tap_fds or obs.process.fds if fd.tap == ""]
    if orphans and (nic.tap_fds or nic.netdev.ifname):
        evidence["orphans"] = orphans
        name = f" {nic.netdev.ifname}" if nic.netdev.ifname else ""
        message = (
            f"QEMU holds /dev/net/tun fd(s) {orphans} on no device: the tap{name} was deleted "
            "under the running VM"
        )
        return nic.check(TAP_FDS, FAIL, message, evidence)
    if len(nic.tap_fds) != pairs:
        message = f"{len(nic.tap_fds)} tap fd(s) open for {pairs} queue pair(s)"
        return nic.check(TAP_FDS, FAIL, message, evidence)
    if len(taps) != 1 or None in links:
        if len(taps) == 1 and nic.tap_fds[0].macvtap_index is not None:
            unknown = _macvtap_unread(obs, nic, taps[0])
            if unknown is not None:
                return nic.check(TAP_FDS, UNKNOWN, unknown, evidence)
        return nic.check(TAP_FDS, FAIL, f"the tap fds are not on one tap: {taps}", evidence)
    tap = taps[0]
    if nic.iface is not None and nic.iface.target and nic.iface.target != tap:
        message = f"the fds are on tap {tap}, the domain names {nic.iface.target}"
        return nic.check(TAP_FDS, FAIL, message, evidence)
    if obs.taps_seen:
        message = f"{pairs} fd(s) on tap {tap}; its queue mode is unknown: {obs.taps_seen}"
        return nic.check(TAP_FDS, UNKNOWN, message, evidence)
    link = obs.taps.get(tap)
    if link is not None and link.kind == MACVTAP:
        return _macvtap(nic, link, pairs, evidence)
    if link is None or link.tun is None:
        message = f"tap {tap} held by QEMU was not found over netlink"
        return nic.check(TAP_FDS, FAIL, message, evidence)
    tun = link.tun
    evidence.update(
        multi_queue=tun.multi_queue,
        vnet_hdr=tun.vnet_hdr,
        attached_queues=tun.attached_queues,
        mtu=link.mtu,
        master=link.master,
        carrier=link.carrier,
        up=link.up,
    )
    if tun.multi_queue != (pairs > 1):
        mode = "multi-queue" if tun.multi_queue else "single-queue"
        message = f"tap {tap} is {mode} but QEMU uses {pairs} queue(s)"
        return nic.check(TAP_FDS, FAIL, message, evidence)
    if not tun.vnet_hdr:
        message = f"tap {tap} has no vnet_hdr: no offloads, and vhost copies headers"
        return nic.check(TAP_FDS, WARN, message, evidence)
    message = f"{pairs} fd(s) on tap {tap}, queue mode matches"
    return nic.check(TAP_FDS, PASS, message, evidence)


MACVTAP = "macvtap"


def _unnamed(fd: procfs.Fd) -> str:
    index = fd.macvtap_index
    return "?" if index is None else f"macvtap ifindex {index}"


def _macvtap_unread(obs: Observation, nic: Nic, shown: str) -> str | None:
    """Why the macvtap of /dev/tapN fds cannot be told (None: it was looked for, and is
    not there). A /dev/tapN fd names its link by ifindex only (no ``iff:``), so the link
    is found among those read by name: the domain's ``<target dev=>`` (libvirt's
    type='direct'). ``check --pid`` has no domain XML, so no name to read it by."""
    if obs.taps_seen:
        return f"the fds are queues of {shown}; links could not be read: {obs.taps_seen}"
    named = nic.iface.target if nic.iface is not None else None
    if named is None or named not in obs.taps:
        return (
            f"the fds are queues of {shown}, a macvtap no name was known for "
            "(libvirt's domain XML names it: check --domain)"
        )
    return None


def _macvtap(nic: Nic, link: Link, pairs: int, evidence: dict[str, object]) -> Check:
    """A macvtap's queues: each open of its /dev/tapN is one more queue.

    drivers/net/tap.c accepts IFF_MULTI_QUEUE in TUNSETIFF only to keep it in the
    queue's flags (TAP_IFFEATURES = IFF_VNET_HDR | IFF_MULTI_QUEUE): every open of the
    device adds a queue (up to MAX_TAP_QUEUES, 256), whatever the flag, so there is no
    queue mode to mismatch. Its vnet_hdr is a per-queue flag netlink does not report.
    """
    evidence.update(kind=MACVTAP, multi_queue="always (one queue per open of /dev/tapN)")
    evidence.update(mtu=link.mtu, carrier=link.carrier, up=link.up)
    tap = link.name
    message = f"{pairs} fd(s) on macvtap {tap} (a queue per fd; macvtap is always multi-queue)"
    return nic.check(TAP_FDS, PASS, message, evidence)


def vhost_fds(obs: Observation, nic: Nic) -> Check:
    """nic.vhost.fds: one /dev/vhost-net fd per queue pair."""
    pairs = nic.netdev.queue_pairs
    wrong = [fd.num for fd in nic.vhost_fds if fd.device != procfs.VHOST_NET]
    good = [fd.num for fd in nic.vhost_fds if fd.device == procfs.VHOST_NET]
    evidence: dict[str, object] = {"expected": pairs, "fds": good}
    if good:
        evidence["assigned_by"] = nic.vhost_assigned_by
    if wrong:
        evidence["not_vhost_net"] = wrong
    if len(good) == pairs and not wrong:
        message = f"{pairs} /dev/vhost-net fd(s) for {pairs} queue pair(s)"
        return nic.check(VHOST_FDS, PASS, message, evidence)
    if not obs.vhost_net and not good:
        evidence["host_vhost_net"] = False
    message = f"{len(good)} /dev/vhost-net fd(s) for {pairs} queue pair(s)"
    if not obs.vhost_net:
        message += "; this host has no /dev/vhost-net"
    return nic.check(VHOST_FDS, FAIL, message, evidence)


def worker(obs: Observation, nic: Nic) -> Check:
    """nic.vhost.worker: as many vhost-<pid> workers as QEMU holds vhost devices."""
    total = len(obs.process.fds_to(procfs.VHOST_NET))
    evidence: dict[str, object] = {
        "model": obs.worker_model,
        "tids": list(obs.workers),
        "vhost_fds_in_process": total,
    }
    if not nic.vhost_fds:
        return nic.check(VHOST_WORKER, FAIL, "no vhost device, so no worker", evidence)
    kernel = _kernel_models(obs, nic)
    if kernel:
        evidence["kernel_models"] = kernel
    workers = f"{len(obs.workers)} vhost-{obs.process.pid} worker(s)"
    if len(obs.workers) >= total:
        # Linux < 6.4: kernel threads; >= 6.4: vhost_task threads of QEMU (procfs.vhost_workers),
        # or kernel threads again where vhost's fork-owner mode is off (vhoststate.worker_model).
        where = "kernel threads" if obs.worker_model == "kthread" else "threads of QEMU"
        message = f"{workers} ({where}) for {total} vhost device(s)"
        if kernel:
            models = ", ".join(KERNEL_MODELS.get(m, m) for m in sorted(set(kernel.values())))
            message += f"; the kernel keeps this NIC's as {models} (live)"
        return nic.check(VHOST_WORKER, PASS, message, evidence)
    message = f"{workers} for {total} vhost device(s): VHOST_SET_OWNER did not start them all"
    return nic.check(VHOST_WORKER, FAIL, message, evidence)


# vhoststate.worker_model's names, as a message says them.
KERNEL_MODELS = {
    "kthread": "kernel threads (vhost_dev.worker)",
    "vhost_task": "vhost_tasks (worker->vtsk)",
    "kthread_task": "kernel threads of the fork-owner mode (worker->kthread_task)",
}


def _kernel_models(obs: Observation, nic: Nic) -> dict[int, str]:
    """How the kernel keeps the worker of each of the NIC's vhost devices (check.live), by
    vhost fd; {} where it was not read."""
    if obs.live is None:
        return {}
    by_fd = {d.fd: d.worker_model for d in obs.live.vhost}
    return {fd.num: by_fd[fd.num] for fd in nic.vhost_fds if fd.num in by_fd}
