"""Turn an Observation into checks: a pure function, so recorded observations can test it."""

from __future__ import annotations

from vhostorch.check.report import FAIL, PASS, UNKNOWN, WARN, Check, Report
from vhostorch.kernel import procfs
from vhostorch.qemu.args import DeviceArg, NetdevArg
from vhostorch.record import TYPE_CHECKING

if TYPE_CHECKING:
    from vhostorch.check.observe import Observation
    from vhostorch.libvirt.domxml import Interface
    from vhostorch.qemu.monitor import VirtioNet
    from vhostorch.vm.state import NicState

TAP_TYPES = ("tap", "bridge")  # "bridge" is a tap opened by qemu-bridge-helper
NO_MONITOR = (
    "needs QEMU's monitor (--qmp, or --monitor for a libvirt domain) or the wiring trace "
    "(vhostorch trace arm, before the guest driver starts)"
)
# The features that fix the virtio-net header layout vhost must use (its length
# depends on both); a guest and vhost that disagree on them corrupt every packet.
HEADER_LAYOUT_FEATURES = ("VIRTIO_F_VERSION_1", "VIRTIO_NET_F_MRG_RXBUF")
# Feature bits vhost-net can be set to (include/uapi/linux/virtio_*.h, vhost.h).
FEATURE_BITS = (
    (15, "VIRTIO_NET_F_MRG_RXBUF"), (24, "VIRTIO_F_NOTIFY_ON_EMPTY"), (26, "VHOST_F_LOG_ALL"),
    (27, "VHOST_NET_F_VIRTIO_NET_HDR"), (28, "VIRTIO_RING_F_INDIRECT_DESC"),
    (29, "VIRTIO_RING_F_EVENT_IDX"), (32, "VIRTIO_F_VERSION_1"), (33, "VIRTIO_F_ACCESS_PLATFORM"),
    (34, "VIRTIO_F_RING_PACKED"), (40, "VIRTIO_F_RING_RESET"),
)  # fmt: skip
NO_TRACE = (
    "the kick/call wiring is set when the guest driver starts and is not visible "
    "afterwards; no attach-time trace was recorded for this QEMU"
)


class _Nic:
    """One tap netdev with its device, where it was declared, and what was asked of it."""

    def __init__(
        self,
        netdev: NetdevArg,
        device: DeviceArg | None,
        name: str,
        origin: str,
        iface: Interface | None,
        state: NicState | None,
    ) -> None:
        self.netdev = netdev
        self.device = device
        self.name = name
        self.origin = origin
        self.iface = iface
        self.state = state
        self.tap_fds: list[procfs.Fd] = []
        self.vhost_fds: list[procfs.Fd] = []
        self.vhost_assigned_by = "the command line"


CMDLINE = "the QEMU command line"
BY_VHOSTORCH = "vhostorch's QMP netdev_add (not on the command line)"
BY_LIBVIRT = "the live domain XML (hot-plugged, not on the command line)"


def _nics(obs: Observation) -> list[_Nic]:
    """Tap NICs on the command line, then those added later: by vhostorch (its state
    file says what it asked) or through libvirt (its live XML says)."""
    nics = []
    interfaces = list(obs.domain.interfaces) if obs.domain else []
    planned = {n.netdev: n for n in obs.plan.nics} if obs.plan else {}
    for netdev in obs.args.netdevs:
        if netdev.type not in TAP_TYPES:
            continue
        device = obs.args.device_for(netdev.id)
        iface = next((i for i in interfaces if i.netdev_id == netdev.id), None)
        name = (device.id if device and device.id else None) or netdev.id
        nics.append(_Nic(netdev, device, name, CMDLINE, iface, planned.get(netdev.id)))
    seen = {nic.netdev.id for nic in nics}
    for state in planned.values():
        if state.netdev in seen:
            continue
        seen.add(state.netdev)
        iface = next((i for i in interfaces if i.netdev_id == state.netdev), None)
        netdev, device = _declared(state.netdev, state.device, state.tap, state.queues,
                                   state.vhost_on, state.mac)  # fmt: skip
        origin = BY_LIBVIRT if iface is not None else BY_VHOSTORCH
        nics.append(_Nic(netdev, device, state.device, origin, iface, state))
    for iface in interfaces:
        if iface.netdev_id is None or iface.netdev_id in seen or iface.type != "ethernet":
            continue
        # <driver name='vhost'/> on a type='kvm' domain: libvirt refuses the NIC rather than
        # plug it without vhost. Without a <driver>, whether it got vhost is not declared.
        wants = obs.domain is not None and obs.domain.type == "kvm" and iface.driver == "vhost"
        netdev, device = _declared(iface.netdev_id, iface.alias or iface.netdev_id,
                                   iface.target, iface.queues, wants, iface.mac)  # fmt: skip
        nics.append(_Nic(netdev, device, iface.alias or iface.netdev_id, BY_LIBVIRT, iface, None))
    _claim_fds(obs.process, nics, obs.wiring.backend_fds() if obs.wiring else {})
    return nics


def _declared(
    netdev: str, device: str, tap: str | None, queues: int, vhost: bool, mac: str | None
) -> tuple[NetdevArg, DeviceArg]:
    """The netdev and device of a NIC added after start (as vhostorch and libvirt add them)."""
    pairs = max(queues, 1)
    return (
        NetdevArg(netdev, "tap", vhost, False, (), (), tap, pairs),
        DeviceArg(
            "virtio-net-pci", device, netdev, pairs > 1, 2 * pairs + 2 if pairs > 1 else None, mac
        ),
    )


def _claim_fds(process: procfs.Process, nics: list[_Nic], backends: dict[int, int]) -> None:
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
    tap_owner = {fd.num: nic for nic in nics for fd in nic.tap_fds}
    # The trace says exactly which tap each vhost fd serves (VHOST_NET_SET_BACKEND).
    traced = sorted(backends.items(), key=lambda item: item[1])
    for vhost_fd, tap_fd in traced:
        fd = process.fd(vhost_fd)
        if vhost_fd not in claimed and tap_fd in tap_owner and fd is not None:
            tap_owner[tap_fd].vhost_fds.append(fd)
            tap_owner[tap_fd].vhost_assigned_by = "VHOST_NET_SET_BACKEND (traced)"
            claimed.add(vhost_fd)
    owner: _Nic | None = None
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
            owner.vhost_assigned_by = "fd order (QEMU opens each after its tap)"
            claimed.add(fd.num)


def _requested(obs: Observation, nic: _Nic) -> Check:
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
        return Check("nic.vhost.requested", PASS, f"vhost is requested by {nic.origin}",
                     evidence, nic=nic.name)  # fmt: skip
    if nic.state is not None and mode == "off":
        return Check("nic.vhost.requested", PASS, "vhost is off for this NIC, as its spec asks",
                     evidence, nic=nic.name)  # fmt: skip
    if nic.state is not None and mode == "preferred":
        why = nic.state.fallback or "vhost was not available"
        return Check("nic.vhost.requested", WARN,
                     f"vhost is preferred but {why}: this NIC runs on QEMU's userspace data "
                     "path, a fallback the spec allows", evidence, nic=nic.name)  # fmt: skip
    if nic.origin == BY_LIBVIRT and iface is not None and iface.driver is None:
        return Check("nic.vhost.requested", UNKNOWN,
                     "unknown: hot-plugged without <driver name='vhost'/>, so libvirt used vhost "
                     "only if it could open /dev/vhost-net (nic.vhost.fds tells)",
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


def _queues(obs: Observation, nic: _Nic) -> Check:
    """The device is sized for as many queue pairs as its tap netdev has."""
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
        return Check("nic.queues", FAIL,
                     f"the device is sized for {wanted} queue pair(s) ({source}) but its tap "
                     f"netdev has {pairs}", evidence, nic=nic.name)  # fmt: skip
    if pairs > 1 and device is not None and not device.mq:
        return Check("nic.queues", FAIL,
                     f"the tap netdev has {pairs} queue pairs but the device lacks mq=on, so "
                     "the guest uses one", evidence, nic=nic.name)  # fmt: skip
    return Check("nic.queues", PASS, f"{pairs} queue pair(s) on the device and on the tap",
                 evidence, nic=nic.name)  # fmt: skip


def _vhost_fds(obs: Observation, nic: _Nic) -> Check:
    pairs = nic.netdev.queue_pairs
    wrong = [fd.num for fd in nic.vhost_fds if fd.target != procfs.VHOST_NET]
    good = [fd.num for fd in nic.vhost_fds if fd.target == procfs.VHOST_NET]
    evidence: dict[str, object] = {"expected": pairs, "fds": good}
    if good:
        evidence["assigned_by"] = nic.vhost_assigned_by
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


def _no_monitor(obs: Observation) -> str:
    if obs.monitor_error:
        return f"unknown: QEMU's monitor could not be read ({obs.monitor_error})"
    return f"unknown: {NO_MONITOR}"


def _monitor_nic(obs: Observation, nic: _Nic) -> VirtioNet | None:
    if obs.monitor is None:
        return None
    return obs.monitor.nic_for(nic.device.id if nic.device else None, nic.netdev.id)


def _monitor_checks(obs: Observation, nic: _Nic, virtio: VirtioNet | None) -> list[Check]:
    if obs.monitor is None:
        traced = _traced_start(obs, nic)
        if traced:
            return traced
        return [
            Check("nic.vhost.started", UNKNOWN, _no_monitor(obs), nic=nic.name),
            Check("nic.vhost.memtable", UNKNOWN, _no_monitor(obs), nic=nic.name),
        ]
    if virtio is None:
        message = f"the monitor ({obs.monitor.source}) shows no virtio-net device for {nic.name}"
        return [
            Check("nic.vhost.started", FAIL, message, nic=nic.name),
            Check("nic.vhost.memtable", UNKNOWN, f"unknown: {message}", nic=nic.name),
        ]
    evidence: dict[str, object] = {
        "source": obs.monitor.source, "path": virtio.path, "status": list(virtio.statuses),
        "vhost_started": virtio.vhost_started, "vm_running": virtio.vm_running,
    }  # fmt: skip
    if virtio.vhost_started:
        started = Check("nic.vhost.started", PASS,
                        "the guest driver is up (DRIVER_OK) and vhost is started", evidence,
                        nic=nic.name)  # fmt: skip
    elif not virtio.driver_ok:
        started = Check("nic.vhost.started", WARN,
                        "the guest driver has not started the device yet (no DRIVER_OK); vhost "
                        "starts when it does", evidence, nic=nic.name)  # fmt: skip
    elif not virtio.vm_running:
        started = Check("nic.vhost.started", WARN, "the VM is paused; vhost runs while it runs",
                        evidence, nic=nic.name)  # fmt: skip
    else:
        started = Check("nic.vhost.started", FAIL,
                        "the guest driver is up but vhost is not started: QEMU fell back to its "
                        "own data path ('unable to start vhost net' in its log)", evidence,
                        nic=nic.name)  # fmt: skip
    vhost = virtio.vhost or {}
    sections = vhost.get("n-mem-sections")
    mem_evidence: dict[str, object] = {
        "n-mem-sections": sections, "nvqs": vhost.get("nvqs"), "vq-index": vhost.get("vq-index"),
        "reported_for": "queue pair 0 (QEMU reports one vhost device; it starts all or none)",
    }  # fmt: skip
    if not virtio.vhost_started:
        memtable = Check("nic.vhost.memtable", UNKNOWN,
                         "unknown: vhost is not started, so QEMU reports no vhost device",
                         nic=nic.name)  # fmt: skip
    elif isinstance(sections, int) and sections > 0:
        memtable = Check("nic.vhost.memtable", PASS,
                         f"vhost holds {sections} guest memory region(s)", mem_evidence,
                         nic=nic.name)  # fmt: skip
    else:
        memtable = Check("nic.vhost.memtable", FAIL, "vhost holds no guest memory table",
                         mem_evidence, nic=nic.name)  # fmt: skip
    return [started, memtable]


def _traced_start(obs: Observation, nic: _Nic) -> list[Check]:
    """started and memtable from the wiring trace, when it saw this NIC's vhost devices."""
    wired = obs.wiring
    fds = [fd.num for fd in nic.vhost_fds]
    if wired is None or not any(wired.vring(fd, 0) for fd in fds):
        return []
    joined = {fd: [wired.vring(fd, i) for i in (0, 1)] for fd in fds}
    evidence: dict[str, object] = {
        "source": "wiring trace",
        "backends": {fd: [v.backend if v else None for v in vr] for fd, vr in joined.items()},
    }  # fmt: skip
    running = all(v is not None and v.backend is not None and v.backend >= 0
                  for vrings in joined.values() for v in vrings)  # fmt: skip
    if running:
        started = Check("nic.vhost.started", PASS,
                        "every vring was joined to its tap (VHOST_NET_SET_BACKEND): vhost runs "
                        "the data path", evidence, nic=nic.name)  # fmt: skip
    else:
        # vhost starts when the guest driver sets DRIVER_OK and stops at a reset; the trace
        # cannot tell a guest not up yet (or rebooting) from a QEMU that fell back for good.
        started = Check("nic.vhost.started", WARN,
                        "not started (yet): not every vring is joined to its tap; vhost starts "
                        "when the guest driver is up, and only QEMU's monitor (--monitor) tells "
                        "'not yet' from 'never'", evidence, nic=nic.name)  # fmt: skip
    regions = {fd: wired.mem_regions.get(fd) for fd in fds}
    mem_evidence: dict[str, object] = {"source": "wiring trace", "regions": regions}
    if not running and all(n is None for n in regions.values()):
        memtable = Check("nic.vhost.memtable", UNKNOWN,
                         "unknown: vhost has not started, and it gets its memory table when it "
                         "does", mem_evidence, nic=nic.name)  # fmt: skip
    elif all(n is None for n in regions.values()):
        memtable = Check("nic.vhost.memtable", UNKNOWN,
                         "unknown: the memory table was set before the trace was armed",
                         mem_evidence, nic=nic.name)  # fmt: skip
    elif all(n for n in regions.values()):
        most = max(r or 0 for r in regions.values())
        memtable = Check("nic.vhost.memtable", PASS,
                         f"each vhost device holds a table of {most} guest memory region(s)",
                         mem_evidence, nic=nic.name)  # fmt: skip
    else:
        memtable = Check("nic.vhost.memtable", FAIL,
                         "a vhost device of this NIC has no guest memory table", mem_evidence,
                         nic=nic.name)  # fmt: skip
    return [started, memtable]


def _feature_names(bits: int) -> list[str]:
    return [name for bit, name in FEATURE_BITS if bits >> bit & 1]


def _traced_features(obs: Observation, nic: _Nic) -> Check | None:
    wired = obs.wiring
    if wired is None:
        return None
    told = {fd.num: wired.features.get(fd.num) for fd in nic.vhost_fds}
    if not told or any(bits is None for bits in told.values()):
        return None
    values = set(told.values())
    evidence: dict[str, object] = {
        "source": "wiring trace",
        "features": {fd: hex(b or 0) for fd, b in told.items()},
    }
    if len(values) != 1:
        return Check("nic.features", FAIL, "the vhost devices of this NIC were set to different "
                     "features", evidence, nic=nic.name)  # fmt: skip
    bits = values.pop() or 0
    names = _feature_names(bits)
    evidence["names"] = names
    if not bits:
        return Check("nic.features", FAIL, "vhost was given no features", evidence, nic=nic.name)
    return Check("nic.features", PASS,
                 f"vhost was set to {', '.join(names) or hex(bits)} (VHOST_SET_FEATURES)",
                 evidence, nic=nic.name)  # fmt: skip


def _features(obs: Observation, nic: _Nic, virtio: VirtioNet | None) -> Check:
    if obs.monitor is None:
        traced = _traced_features(obs, nic)
        if traced is not None:
            return traced
    if virtio is None or obs.monitor is None:
        return Check("nic.features", UNKNOWN, _no_monitor(obs) if obs.monitor is None else
                     "unknown: no virtio-net device in the monitor", nic=nic.name)  # fmt: skip
    if not virtio.vhost_started:
        return Check("nic.features", UNKNOWN, "unknown: vhost is not started", nic=nic.name)
    acked = list(virtio.acked_features)
    evidence: dict[str, object] = {"acked": acked, "guest": list(virtio.guest_features)}
    differ = [f for f in HEADER_LAYOUT_FEATURES
              if (f in virtio.guest_features) != (f in acked)]  # fmt: skip
    if not acked:
        return Check("nic.features", FAIL, "vhost was given no features", evidence, nic=nic.name)
    if differ:
        return Check("nic.features", FAIL,
                     f"the guest and vhost disagree on {', '.join(differ)}, which set the "
                     "header layout", evidence, nic=nic.name)  # fmt: skip
    return Check("nic.features", PASS,
                 f"vhost runs with {len(acked)} feature(s), agreeing with the guest on "
                 f"{' and '.join(HEADER_LAYOUT_FEATURES)}", evidence, nic=nic.name)  # fmt: skip


def _eventfd(obs: Observation, num: int) -> dict[str, object]:
    """What the eventfd QEMU gave now looks like (it must still be open as an eventfd)."""
    fd = obs.process.fd(num)
    if fd is None or fd.target != procfs.EVENTFD:
        return {"fd": num, "open_as_eventfd": False}
    return {"fd": num, "open_as_eventfd": True, "eventfd_id": fd.info.get("eventfd-id")}


def _wiring_checks(obs: Observation, nic: _Nic, queue: int) -> list[Check]:
    """nic.kick and nic.call for virtqueue ``queue`` (2p is queue pair p's rx, 2p+1 its tx)."""
    pair, index = divmod(queue, 2)
    if obs.wiring is None or not obs.wiring.vrings:
        why = f"unknown: {obs.wiring_note or NO_TRACE}"
        return [Check("nic.kick", UNKNOWN, why, nic=nic.name, queue=queue),
                Check("nic.call", UNKNOWN, why, nic=nic.name, queue=queue)]  # fmt: skip
    if pair >= len(nic.vhost_fds):
        why = f"fail: no vhost fd for queue pair {pair}"
        return [Check("nic.kick", FAIL, why, nic=nic.name, queue=queue),
                Check("nic.call", FAIL, why, nic=nic.name, queue=queue)]  # fmt: skip
    vhost_fd = nic.vhost_fds[pair].num
    vring = obs.wiring.vring(vhost_fd, index)
    base: dict[str, object] = {"vhost_fd": vhost_fd, "vring": index}
    virtio = _monitor_nic(obs, nic)
    # QEMU sets a placeholder call eventfd when it opens vhost; a vring is wired for
    # real only once it has a kick eventfd and is joined to its tap (vhost started).
    running = (
        vring is not None
        and vring.kick is not None
        and vring.backend is not None
        and vring.backend >= 0
    )
    if not running and virtio is not None and not virtio.driver_ok:
        why = "not wired yet: the guest driver has not started the device (no DRIVER_OK)"
        return [Check("nic.kick", WARN, why, base, nic=nic.name, queue=queue),
                Check("nic.call", WARN, why, base, nic=nic.name, queue=queue)]  # fmt: skip
    if vring is not None and not running and virtio is None:
        why = ("not wired: vhost was not started on this vring (the guest driver is not up, or "
               "QEMU fell back; --monitor or a QMP socket tells which)")  # fmt: skip
        return [Check("nic.kick", WARN, why, base, nic=nic.name, queue=queue),
                Check("nic.call", WARN, why, base, nic=nic.name, queue=queue)]  # fmt: skip
    if vring is None:
        why = (f"the trace shows no vring {index} on vhost fd {vhost_fd}: it was not wired "
               "since the trace was armed")  # fmt: skip
        return [
            Check("nic.kick", UNKNOWN, f"unknown: {why}", base, nic=nic.name, queue=queue),
            Check("nic.call", UNKNOWN, f"unknown: {why}", base, nic=nic.name, queue=queue),
        ]
    checks = []
    if vring.kick is None or vring.kick < 0:
        checks.append(Check("nic.kick", FAIL, "vhost has no kick eventfd for this vring", base,
                            nic=nic.name, queue=queue))  # fmt: skip
    else:
        notify = list(vring.ioeventfds)
        evidence = {**base, "kick": _eventfd(obs, vring.kick), "ioeventfds": notify}
        # Legacy port-I/O notify matches the written value against the queue index.
        other = [n["datamatch"] for n in notify if n["datamatch"] not in (-1, queue)]
        where = ", ".join(
            f"{'port' if n['pio'] else 'MMIO'} {n['addr']:#x}"
            + (f"={n['datamatch']}" if n["datamatch"] >= 0 else "")
            for n in notify
        )
        if not notify:
            checks.append(Check("nic.kick", FAIL,
                                f"kick eventfd {vring.kick} is not a KVM ioeventfd: QEMU "
                                "relays the guest's notifications in userspace", evidence,
                                nic=nic.name, queue=queue))  # fmt: skip
        elif other:
            checks.append(Check("nic.kick", FAIL,
                                f"kick eventfd {vring.kick} is KVM's ioeventfd for queue "
                                f"{other[0]}'s notify ({where}), not this queue's", evidence,
                                nic=nic.name, queue=queue))  # fmt: skip
        else:
            checks.append(Check("nic.kick", PASS,
                                f"kick eventfd {vring.kick} is KVM's ioeventfd for this queue's "
                                f"notify ({where})", evidence, nic=nic.name,
                                queue=queue))  # fmt: skip
    if vring.call is None or vring.call < 0:
        checks.append(Check("nic.call", FAIL, "vhost has no call eventfd for this vring", base,
                            nic=nic.name, queue=queue))  # fmt: skip
    else:
        evidence = {**base, "call": _eventfd(obs, vring.call), "irqfd": vring.irqfd,
                    "masked": vring.masked}  # fmt: skip
        if vring.irqfd is None and vring.masked:
            checks.append(Check("nic.call", WARN,
                                f"call eventfd {vring.call} is QEMU's masked notifier: the guest "
                                "has masked this queue's MSI-X vector right now (as it does while "
                                "moving an interrupt), so QEMU holds vhost's interrupts until it "
                                "unmasks; check again", evidence, nic=nic.name,
                                queue=queue))  # fmt: skip
        elif vring.irqfd is None:
            checks.append(Check("nic.call", FAIL,
                                f"call eventfd {vring.call} is not a KVM irqfd: QEMU injects "
                                "the interrupts itself (no MSI-X, or no in-kernel irqchip)",
                                evidence, nic=nic.name, queue=queue))  # fmt: skip
        else:
            checks.append(Check("nic.call", PASS,
                                f"call eventfd {vring.call} is KVM's irqfd for GSI "
                                f"{vring.irqfd['gsi']} (QEMU's virtio-pci makes irqfds only for "
                                "MSI-X vectors, with an in-kernel irqchip)", evidence,
                                nic=nic.name, queue=queue))  # fmt: skip
    return checks


def verify(obs: Observation) -> Report:
    """All checks for one QEMU."""
    checks: list[Check] = []
    pid = obs.process.pid
    dev: dict[str, object] = {"path": "/dev/vhost-net"}
    # A VM vhostorch started from a spec that lets every NIC run without vhost (preferred,
    # off) or asks for TCG gets warnings, not failures, for what the spec allowed.
    plan = obs.plan
    vhost_optional = plan is not None and all(n.vhost != "required" for n in plan.nics)
    if obs.vhost_net:
        checks.append(Check("host.vhost-net", PASS, "/dev/vhost-net is present", dev))
    elif vhost_optional:
        checks.append(Check("host.vhost-net", WARN, "/dev/vhost-net is missing on this host; "
                            "no NIC of this VM requires vhost", dev))  # fmt: skip
    else:
        checks.append(Check("host.vhost-net", FAIL,
                            "/dev/vhost-net is missing on this host (vhostorch doctor says why)",
                            dev))  # fmt: skip
    kvm_fds = [fd.num for fd in obs.process.fds_to(procfs.KVM_VM)]
    accel = list(obs.args.accel) or ["tcg (default)"]
    if kvm_fds:
        checks.append(Check("vm.kvm", PASS, "QEMU runs a KVM VM",
                            {"kvm_vm_fds": kvm_fds, "accel": accel}))  # fmt: skip
    elif plan is not None and plan.accel == "tcg" and vhost_optional:
        checks.append(Check("vm.kvm", WARN, "QEMU runs TCG (emulated CPUs), as the spec asks "
                            "(accel = \"tcg\")", {"accel": accel}))  # fmt: skip
    else:
        message = (
            "QEMU runs without KVM (no anon_inode:kvm-vm fd): emulated CPUs, and libvirt does "
            "not use vhost for such domains"
        )
        checks.append(Check("vm.kvm", FAIL, message, {"accel": accel}))
    nics = _nics(obs)
    total_vhost = len(obs.process.fds_to(procfs.VHOST_NET))
    for nic in nics:
        requested = _requested(obs, nic)
        checks += [requested, _queues(obs, nic), _tap_fds(obs, nic)]
        if nic.state is not None and not nic.state.vhost_on and not nic.netdev.wants_vhost:
            continue  # vhost is off or fell back as the spec allows: nothing to attach
        checks.append(_vhost_fds(obs, nic))
        checks.append(_worker(obs, nic, total_vhost))
        if not nic.vhost_fds:
            continue  # nothing further can be attached
        virtio = _monitor_nic(obs, nic)
        checks += _monitor_checks(obs, nic, virtio)
        for queue in range(2 * nic.netdev.queue_pairs):
            checks += _wiring_checks(obs, nic, queue)
        checks.append(_features(obs, nic, virtio))
    if not nics:
        checks.append(Check("nic.vhost.requested", FAIL, "QEMU has no tap NIC, so no vhost"))
    target: dict[str, object] = {"pid": pid, "name": obs.args.name}
    if plan is not None:
        target["vhostorch"] = {"vm": plan.name, "backend": plan.backend}
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
