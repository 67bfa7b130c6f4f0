"""Verdicts about each virtqueue's notifications: nic.kick and nic.call.

From the wiring trace (check.wiring): virtqueue q is vring q % 2 of the vhost fd
of queue pair q // 2 (rx, then tx). Its kick eventfd must be one QEMU gave KVM as
an ioeventfd for this queue's notify address, its call eventfd one QEMU gave KVM
as an irqfd; otherwise a userspace QEMU thread relays every notification.
"""

from __future__ import annotations

from vhostorch.check import live
from vhostorch.check.ids import CALL, KICK
from vhostorch.check.nics import virtio
from vhostorch.check.report import (
    BEYOND_READER,
    DRIVER_NOT_STARTED,
    FAIL,
    MASKED,
    NO_EVENTFD,
    NO_TRACE,
    NO_VHOST_FD,
    NOT_TRACED,
    NOT_WIRED,
    OTHER_QUEUE,
    PASS,
    RELAYED_INTERRUPT,
    RELAYED_KICK,
    UNKNOWN,
    WARN,
    Check,
)
from vhostorch.kernel import procfs
from vhostorch.record import TYPE_CHECKING

if TYPE_CHECKING:
    from vhostorch.check.nics import Nic
    from vhostorch.check.observe import Observation
    from vhostorch.check.report import Cause, Status
    from vhostorch.check.wiring import Vring

NO_TRACE_NOTE = (
    "the kick/call wiring is set when the guest driver starts and is not visible "
    "afterwards; no attach-time trace was recorded for this QEMU"
)
# (status, message, evidence, cause): one verdict that kick and call share.
Shared = tuple["Status", str, dict[str, object] | None, "Cause"]


def _vring(obs: Observation, nic: Nic, queue: int) -> tuple[Vring | None, dict[str, object]]:
    """The traced vring of virtqueue ``queue``, and the evidence naming it."""
    assert obs.wiring is not None
    pair, index = divmod(queue, 2)
    vhost_fd = nic.vhost_fds[pair].num
    return obs.wiring.vring(vhost_fd, index), {
        "source": "trace",
        "vhost_fd": vhost_fd,
        "vring": index,
    }


def _unwired(obs: Observation, nic: Nic, queue: int) -> Shared | None:
    """The verdict for both kick and call when the vring cannot be judged (None when it can)."""
    pair, index = divmod(queue, 2)
    if obs.wiring is None or not obs.wiring.vrings:
        note = obs.wiring_note or NO_TRACE_NOTE
        if obs.live_note:  # the kernel's present state was tried first
            note += f"; the kernel's live state cannot be read here: {obs.live_note}"
        return UNKNOWN, f"unknown: {note}", None, NO_TRACE
    if pair >= len(nic.vhost_fds):
        return FAIL, f"fail: no vhost fd for queue pair {pair}", None, NO_VHOST_FD
    vring, base = _vring(obs, nic, queue)
    device = virtio(obs, nic)
    # QEMU sets a placeholder call eventfd when it opens vhost; a vring is wired for
    # real only once it has a kick eventfd and is joined to its tap (vhost started).
    running = (
        vring is not None
        and vring.kick is not None
        and vring.backend is not None
        and vring.backend >= 0
    )
    if not running and device is not None and not device.driver_ok:
        return (
            WARN,
            "not wired yet: the guest driver has not started the device (no DRIVER_OK)",
            base,
            DRIVER_NOT_STARTED,
        )
    if vring is not None and not running and device is None:
        message = (
            "not wired: vhost was not started on this vring (the guest driver is not up, or "
            "QEMU fell back; --monitor or a QMP socket tells which)"
        )
        return WARN, message, base, NOT_WIRED
    if vring is None:
        vhost_fd = base["vhost_fd"]
        message = (
            f"unknown: the trace shows no vring {index} on vhost fd {vhost_fd}: it was not "
            "wired since the trace was armed"
        )
        return UNKNOWN, message, base, NOT_TRACED
    return None


def _eventfd(obs: Observation, num: int) -> dict[str, object]:
    """What the eventfd QEMU gave now looks like (it must still be open as an eventfd)."""
    fd = obs.process.fd(num)
    if fd is None or fd.device != procfs.EVENTFD:
        return {"fd": num, "open_as_eventfd": False}
    return {"fd": num, "open_as_eventfd": True, "eventfd_id": fd.info.get("eventfd-id")}


def _judgeable(
    obs: Observation, nic: Nic, queue: int, check_id: str, role: str
) -> Check | tuple[Vring, dict[str, object], int]:
    """The vring of virtqueue ``queue``, its evidence and its ``role`` ("kick" or "call")
    eventfd; or the verdict, when the vring cannot be judged or has no such eventfd."""
    shared = _unwired(obs, nic, queue)
    if shared is not None:
        status, message, evidence, cause = shared
        return nic.check(check_id, status, message, evidence, queue=queue, cause=cause)
    vring, base = _vring(obs, nic, queue)
    assert vring is not None
    fd = vring.kick if role == "kick" else vring.call
    if fd is None or fd < 0:
        message = f"vhost has no {role} eventfd for this vring"
        return nic.check(check_id, FAIL, message, base, queue=queue, cause=NO_EVENTFD)
    return vring, base, fd


def kick(obs: Observation, nic: Nic, queue: int) -> Check:
    """nic.kick: the vring's kick eventfd is KVM's ioeventfd for this queue's notify."""
    found = _judgeable(obs, nic, queue, KICK, "kick")
    if isinstance(found, Check):
        return found
    vring, base, fd = found
    notify = list(vring.ioeventfds)
    evidence = {**base, "kick": _eventfd(obs, fd), "ioeventfds": notify}
    # Legacy port-I/O notify matches the written value against the queue index.
    other = [n["datamatch"] for n in notify if n["datamatch"] not in (-1, queue)]
    where = ", ".join(
        f"{'port' if n['pio'] else 'MMIO'} {n['addr']:#x}"
        + (f"={n['datamatch']}" if n["datamatch"] >= 0 else "")
        for n in notify
    )
    if not notify:
        message = (
            f"kick eventfd {fd} is not a KVM ioeventfd: QEMU relays the guest's "
            "notifications in userspace"
        )
        return nic.check(KICK, FAIL, message, evidence, queue=queue, cause=RELAYED_KICK)
    if other:
        message = (
            f"kick eventfd {fd} is KVM's ioeventfd for queue {other[0]}'s notify "
            f"({where}), not this queue's"
        )
        return nic.check(KICK, FAIL, message, evidence, queue=queue, cause=OTHER_QUEUE)
    message = f"kick eventfd {fd} is KVM's ioeventfd for this queue's notify ({where})"
    return nic.check(KICK, PASS, message, evidence, queue=queue)


def call(obs: Observation, nic: Nic, queue: int) -> Check:
    """nic.call: the vring's call eventfd is a KVM irqfd (MSI-X, in-kernel irqchip)."""
    found = _judgeable(obs, nic, queue, CALL, "call")
    if isinstance(found, Check):
        return found
    vring, base, fd = found
    evidence = {
        **base,
        "call": _eventfd(obs, fd),
        "irqfd": vring.irqfd,
        "masked": vring.masked,
    }
    if vring.irqfd is None and vring.masked:
        message = (
            f"call eventfd {fd} is QEMU's masked notifier: the guest has masked this "
            "queue's MSI-X vector right now (as it does while moving an interrupt), so QEMU "
            "holds vhost's interrupts until it unmasks; check again"
        )
        return nic.check(CALL, WARN, message, evidence, queue=queue, cause=MASKED)
    if vring.irqfd is None:
        message = (
            f"call eventfd {fd} is not a KVM irqfd: QEMU injects the interrupts itself "
            "(no MSI-X, or no in-kernel irqchip)"
        )
        return nic.check(CALL, FAIL, message, evidence, queue=queue, cause=RELAYED_INTERRUPT)
    message = (
        f"call eventfd {fd} is KVM's irqfd for GSI {vring.irqfd['gsi']} (QEMU's "
        "virtio-pci makes irqfds only for MSI-X vectors, with an in-kernel irqchip)"
    )
    return nic.check(CALL, PASS, message, evidence, queue=queue)


def vrings(obs: Observation, nic: Nic) -> list[Check]:
    """nic.kick and nic.call for every virtqueue of the NIC, queue by queue: from the kernel's
    present state where it was read (check.live), else from the wiring trace."""
    checks = []
    for queue in range(2 * nic.netdev.queue_pairs):
        if obs.live is not None and queue // 2 < len(nic.vhost_fds):
            present = (live.kick(obs, nic, queue), live.call(obs, nic, queue))
            for found, from_trace in zip(present, (kick, call), strict=True):
                # Past the reader's bounds the present is not known: the trace, where it saw
                # the vring wired, still knows its past (its evidence says "source": "trace").
                if found.cause == BEYOND_READER:
                    past = from_trace(obs, nic, queue)
                    found = found if past.status == UNKNOWN else past
                checks.append(found)
        else:
            checks += [kick(obs, nic, queue), call(obs, nic, queue)]
    return checks
