"""Verdicts about vhost at work for each NIC: nic.vhost.started, nic.vhost.memtable,
nic.features.

QEMU's monitor says it best (x-query-virtio-status); without one, the wiring
trace says what QEMU set (VHOST_NET_SET_BACKEND, VHOST_SET_MEM_TABLE,
VHOST_SET_FEATURES); without either, the verdict is unknown.
"""

from __future__ import annotations

from vhostorch.check.ids import FEATURES, VHOST_MEMTABLE, VHOST_STARTED
from vhostorch.check.nics import virtio
from vhostorch.check.report import FAIL, PASS, UNKNOWN, WARN
from vhostorch.record import TYPE_CHECKING

if TYPE_CHECKING:
    from vhostorch.check.nics import Nic
    from vhostorch.check.observe import Observation
    from vhostorch.check.report import Check
    from vhostorch.check.wiring import Vring

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


def no_monitor(obs: Observation) -> str:
    if obs.monitor_error:
        return f"unknown: QEMU's monitor could not be read ({obs.monitor_error})"
    return f"unknown: {NO_MONITOR}"


def _traced_vrings(obs: Observation, nic: Nic) -> dict[int, list[Vring | None]] | None:
    """Vrings 0 and 1 of each vhost fd of the NIC, when the trace saw any of them wired."""
    wired = obs.wiring
    fds = [fd.num for fd in nic.vhost_fds]
    if wired is None or not any(wired.vring(fd, 0) for fd in fds):
        return None
    return {fd: [wired.vring(fd, i) for i in (0, 1)] for fd in fds}


def _joined(vrings: dict[int, list[Vring | None]]) -> bool:
    """Every vring was joined to its tap (VHOST_NET_SET_BACKEND with a tap fd)."""
    return all(
        v is not None and v.backend is not None and v.backend >= 0
        for pair in vrings.values()
        for v in pair
    )


def started(obs: Observation, nic: Nic) -> Check:
    """nic.vhost.started: the guest driver is up (DRIVER_OK) and vhost runs the data path."""
    if obs.monitor is None:
        traced = _traced_vrings(obs, nic)
        if traced is None:
            return nic.check(VHOST_STARTED, UNKNOWN, no_monitor(obs))
        evidence: dict[str, object] = {
            "source": "wiring trace",
            "backends": {fd: [v.backend if v else None for v in vr] for fd, vr in traced.items()},
        }
        if _joined(traced):
            message = (
                "every vring was joined to its tap (VHOST_NET_SET_BACKEND): vhost runs the "
                "data path"
            )
            return nic.check(VHOST_STARTED, PASS, message, evidence)
        # vhost starts when the guest driver sets DRIVER_OK and stops at a reset; the trace
        # cannot tell a guest not up yet (or rebooting) from a QEMU that fell back for good.
        message = (
            "not started (yet): not every vring is joined to its tap; vhost starts when the "
            "guest driver is up, and only QEMU's monitor (--monitor) tells 'not yet' from 'never'"
        )
        return nic.check(VHOST_STARTED, WARN, message, evidence)
    device = virtio(obs, nic)
    if device is None:
        message = f"the monitor ({obs.monitor.source}) shows no virtio-net device for {nic.name}"
        return nic.check(VHOST_STARTED, FAIL, message)
    evidence = {
        "source": obs.monitor.source,
        "path": device.path,
        "status": list(device.statuses),
        "vhost_started": device.vhost_started,
        "vm_running": device.vm_running,
    }
    if device.vhost_started:
        message = "the guest driver is up (DRIVER_OK) and vhost is started"
        return nic.check(VHOST_STARTED, PASS, message, evidence)
    if not device.driver_ok:
        message = (
            "the guest driver has not started the device yet (no DRIVER_OK); vhost starts when "
            "it does"
        )
        return nic.check(VHOST_STARTED, WARN, message, evidence)
    if not device.vm_running:
        message = "the VM is paused; vhost runs while it runs"
        return nic.check(VHOST_STARTED, WARN, message, evidence)
    message = (
        "the guest driver is up but vhost is not started: QEMU fell back to its own data path "
        "('unable to start vhost net' in its log)"
    )
    return nic.check(VHOST_STARTED, FAIL, message, evidence)


def memtable(obs: Observation, nic: Nic) -> Check:
    """nic.vhost.memtable: vhost holds a table of guest memory regions."""
    if obs.monitor is None:
        traced = _traced_vrings(obs, nic)
        if traced is None or obs.wiring is None:
            return nic.check(VHOST_MEMTABLE, UNKNOWN, no_monitor(obs))
        regions = {fd: obs.wiring.mem_regions.get(fd) for fd in traced}
        evidence: dict[str, object] = {"source": "wiring trace", "regions": regions}
        if all(n is None for n in regions.values()):
            message = (
                "unknown: the memory table was set before the trace was armed"
                if _joined(traced)
                else "unknown: vhost has not started, and it gets its memory table when it does"
            )
            return nic.check(VHOST_MEMTABLE, UNKNOWN, message, evidence)
        if all(n for n in regions.values()):
            most = max(r or 0 for r in regions.values())
            message = f"each vhost device holds a table of {most} guest memory region(s)"
            return nic.check(VHOST_MEMTABLE, PASS, message, evidence)
        message = "a vhost device of this NIC has no guest memory table"
        return nic.check(VHOST_MEMTABLE, FAIL, message, evidence)
    device = virtio(obs, nic)
    if device is None:
        message = f"the monitor ({obs.monitor.source}) shows no virtio-net device for {nic.name}"
        return nic.check(VHOST_MEMTABLE, UNKNOWN, f"unknown: {message}")
    if not device.vhost_started:
        message = "unknown: vhost is not started, so QEMU reports no vhost device"
        return nic.check(VHOST_MEMTABLE, UNKNOWN, message)
    vhost = device.vhost or {}
    sections = vhost.get("n-mem-sections")
    evidence = {
        "n-mem-sections": sections,
        "nvqs": vhost.get("nvqs"),
        "vq-index": vhost.get("vq-index"),
        "reported_for": "queue pair 0 (QEMU reports one vhost device; it starts all or none)",
    }
    if isinstance(sections, int) and sections > 0:
        message = f"vhost holds {sections} guest memory region(s)"
        return nic.check(VHOST_MEMTABLE, PASS, message, evidence)
    return nic.check(VHOST_MEMTABLE, FAIL, "vhost holds no guest memory table", evidence)


def feature_names(bits: int) -> list[str]:
    return [name for bit, name in FEATURE_BITS if bits >> bit & 1]


def _traced_features(obs: Observation, nic: Nic) -> Check | None:
    """nic.features from VHOST_SET_FEATURES, when the trace saw it on every vhost fd."""
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
        message = "the vhost devices of this NIC were set to different features"
        return nic.check(FEATURES, FAIL, message, evidence)
    bits = values.pop() or 0
    names = feature_names(bits)
    evidence["names"] = names
    if not bits:
        return nic.check(FEATURES, FAIL, "vhost was given no features", evidence)
    message = f"vhost was set to {', '.join(names) or hex(bits)} (VHOST_SET_FEATURES)"
    return nic.check(FEATURES, PASS, message, evidence)


def features(obs: Observation, nic: Nic) -> Check:
    """nic.features: vhost was given features, agreeing with the guest on the header layout."""
    if obs.monitor is None:
        traced = _traced_features(obs, nic)
        if traced is not None:
            return traced
        return nic.check(FEATURES, UNKNOWN, no_monitor(obs))
    device = virtio(obs, nic)
    if device is None:
        return nic.check(FEATURES, UNKNOWN, "unknown: no virtio-net device in the monitor")
    if not device.vhost_started:
        return nic.check(FEATURES, UNKNOWN, "unknown: vhost is not started")
    acked = list(device.acked_features)
    evidence: dict[str, object] = {"acked": acked, "guest": list(device.guest_features)}
    differ = [f for f in HEADER_LAYOUT_FEATURES if (f in device.guest_features) != (f in acked)]
    if not acked:
        return nic.check(FEATURES, FAIL, "vhost was given no features", evidence)
    if differ:
        message = (
            f"the guest and vhost disagree on {', '.join(differ)}, which set the header layout"
        )
        return nic.check(FEATURES, FAIL, message, evidence)
    message = (
        f"vhost runs with {len(acked)} feature(s), agreeing with the guest on "
        f"{' and '.join(HEADER_LAYOUT_FEATURES)}"
    )
    return nic.check(FEATURES, PASS, message, evidence)
