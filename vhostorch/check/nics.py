"""The tap NICs of an Observation, each with the fds of QEMU that serve it.

A NIC is a virtio-net device on a tap netdev on the command line, or one added
later (by vhostorch over QMP, or through libvirt); its tap and vhost fds are
claimed from the process's fds by number, by tap name; its vhost fds, when not named, by the
tap the kernel holds as each vhost device's backend now (check.live), else by the traced
VHOST_NET_SET_BACKEND, else by order. A tap fd is a /dev/net/tun queue or, for
libvirt's type='direct', a macvtap's /dev/tapN. NICs vhost-net cannot serve are
``check.applicable``'s, not found here.
"""

from __future__ import annotations

from vhostorch.check import applicable
from vhostorch.check.report import Check
from vhostorch.kernel import procfs
from vhostorch.qemu.args import DeviceArg, NetdevArg
from vhostorch.record import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from vhostorch.check.observe import Observation
    from vhostorch.check.report import Cause, Status
    from vhostorch.kernel.rtnl import Link
    from vhostorch.kernel.vhoststate import KernelView
    from vhostorch.libvirt.domxml import Interface
    from vhostorch.qemu.monitor import VirtioNet
    from vhostorch.vm.state import NicState

TAP_TYPES = applicable.TAP_TYPES


class Nic:
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

    def check(
        self,
        id: str,
        status: Status,
        message: str,
        evidence: dict[str, object] | None = None,
        *,
        queue: int | None = None,
        cause: Cause | None = None,
    ) -> Check:
        """A verdict about this NIC (and one of its virtqueues, with ``queue``)."""
        return Check(id, status, message, evidence, nic=self.name, queue=queue, cause=cause)


CMDLINE = "the QEMU command line"
BY_VHOSTORCH = "vhostorch's QMP netdev_add (not on the command line)"
BY_LIBVIRT = "the live domain XML (hot-plugged, not on the command line)"


def find(obs: Observation) -> list[Nic]:
    """Tap NICs on the command line, then those added later: by vhostorch (its state
    file says what it asked) or through libvirt (its live XML says)."""
    nics = []
    interfaces = list(obs.domain.interfaces) if obs.domain else []
    planned = {n.netdev: n for n in obs.plan.nics} if obs.plan else {}
    other_models = applicable.excluded_netdevs(obs)
    for netdev in obs.args.netdevs:
        if netdev.type not in TAP_TYPES or netdev.id in other_models:
            continue
        device = obs.args.device_for(netdev.id)
        iface = next((i for i in interfaces if i.netdev_id == netdev.id), None)
        name = (device.id if device and device.id else None) or netdev.id
        nics.append(Nic(netdev, device, name, CMDLINE, iface, planned.get(netdev.id)))
    seen = {nic.netdev.id for nic in nics}
    for state in planned.values():
        if state.netdev in seen:
            continue
        seen.add(state.netdev)
        iface = next((i for i in interfaces if i.netdev_id == state.netdev), None)
        netdev, device = _declared(
            state.netdev, state.device, state.tap, state.queues, state.vhost_on, state.mac
        )
        origin = BY_LIBVIRT if iface is not None else BY_VHOSTORCH
        nics.append(Nic(netdev, device, state.device, origin, iface, state))
    for iface in interfaces:
        if iface.netdev_id is None or iface.netdev_id in seen:
            continue
        if applicable.interface_reason(iface) is not None:
            continue
        # <driver name='vhost'/> on a type='kvm' domain: libvirt refuses the NIC rather than
        # plug it without vhost. Without a <driver>, whether it got vhost is not declared.
        wants = obs.domain is not None and obs.domain.type == "kvm" and iface.driver == "vhost"
        device_id = iface.alias or iface.netdev_id
        netdev, device = _declared(
            iface.netdev_id, device_id, iface.target, iface.queues, wants, iface.mac
        )
        nics.append(Nic(netdev, device, device_id, BY_LIBVIRT, iface, None))
    # The kernel's present backends first (exact), then the trace's (the past), then fd order.
    backends = obs.wiring.backend_fds() if obs.wiring else {}
    _claim_fds(obs.process, nics, backends, lambda fd: link_of(obs, fd), live_backends(obs.live))
    return nics


def link_of(obs: Observation, fd: procfs.Fd) -> str | None:
    """The name of the link a tap fd is a queue of: a tun fd's ``iff:``, or the macvtap
    of a /dev/tapN fd (the read link of that ifindex: the domain's XML names it)."""
    if fd.tap is not None:
        return fd.tap
    index = fd.macvtap_index
    if index is None:
        return None
    found: Link | None = next(
        (link for link in obs.taps.values() if link is not None and link.index == index), None
    )
    return None if found is None else found.name


def tap_name(obs: Observation, nic: Nic) -> str | None:
    """The tap (or macvtap) a NIC's first fd is on, else the one its netdev names."""
    return link_of(obs, nic.tap_fds[0]) if nic.tap_fds else nic.netdev.ifname


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


BY_KERNEL = "the kernel (live)"
BY_TRACE = "VHOST_NET_SET_BACKEND (traced)"
BY_ORDER = "fd order (QEMU opens each after its tap)"


def live_backends(view: KernelView | None) -> dict[int, int]:
    """vhost fd -> the tap fd the kernel holds as its backend now: the fd of QEMU's whose
    file is every vring's backend socket's file (vhost_net's ``vq.private_data``). A device
    with a vring unjoined (paused, guest driver not up) or joined to two fds says nothing;
    two reads that disagreed say nothing."""
    if view is None or not view.stable:
        return {}
    found = {}
    for device in view.vhost:
        files = {q.backend_file for q in device.queues}
        if len(files) != 1 or None in files:
            continue
        taps = view.fd_of_file(files.pop())
        if len(taps) == 1:  # a file dup'ed to two fds would not say which is the NIC's
            found[device.fd] = taps[0]
    return found


def _claim_fds(
    process: procfs.Process,
    nics: list[Nic],
    backends: dict[int, int],
    link: Callable[[procfs.Fd], str | None],
    live: dict[int, int] | None = None,
) -> None:
    """Give each NIC its tap and vhost fds: those named on the command line; else each vhost
    fd to the NIC of the tap fd its device's backend is, as the kernel holds it now
    (``live``), else as the trace saw it set (``backends``); else by order.

    QEMU opening taps itself (``ifname=``) opens each queue's /dev/vhost-net right
    after its tap, so a vhost fd belongs to the NIC of the nearest tap fd below it: a
    guess, which a fd number reused after a hot-unplug breaks.
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
                fd
                for fd in process.fds
                if fd.num not in claimed
                and (fd.device == procfs.TUN or fd.macvtap_index is not None)
                and link(fd) == nic.netdev.ifname
            ]
            claimed |= {fd.num for fd in nic.tap_fds}
    tap_owner = {fd.num: nic for nic in nics for fd in nic.tap_fds}
    # The kernel (now), else the trace (the past), says exactly which tap each vhost fd
    # serves. In tap fd order: a NIC's vhost fds are listed by queue pair, as its taps are.
    joined = {**backends, **(live or {})}
    by = {fd: BY_KERNEL if fd in (live or {}) else BY_TRACE for fd in joined}
    sources: dict[Nic, list[str]] = {}
    for vhost_fd, tap_fd in sorted(joined.items(), key=lambda item: item[1]):
        fd = process.fd(vhost_fd)
        if vhost_fd not in claimed and tap_fd in tap_owner and fd is not None:
            nic = tap_owner[tap_fd]
            nic.vhost_fds.append(fd)
            sources.setdefault(nic, []).append(by[vhost_fd])
            nic.vhost_assigned_by = " and ".join(dict.fromkeys(sources[nic]))
            claimed.add(vhost_fd)
    owner: Nic | None = None
    for fd in process.fds:
        if fd.num in tap_owner:
            owner = tap_owner[fd.num]
        elif (
            fd.device == procfs.VHOST_NET
            and fd.num not in claimed
            and owner is not None
            and owner.netdev.wants_vhost
            and not owner.netdev.vhostfds
        ):
            owner.vhost_fds.append(fd)
            owner.vhost_assigned_by = BY_ORDER
            claimed.add(fd.num)


def virtio(obs: Observation, nic: Nic) -> VirtioNet | None:
    """The NIC's virtio-net device as QEMU's monitor reports it (None without a monitor)."""
    if obs.monitor is None:
        return None
    return obs.monitor.nic_for(nic.device.id if nic.device else None, nic.netdev.id)
