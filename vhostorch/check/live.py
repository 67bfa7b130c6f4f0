"""nic.kick and nic.call from what the kernel holds now (kernel.vhoststate), no trace needed.

Virtqueue q of a NIC is queue q % 2 (RX 0, TX 1) of the ``/dev/vhost-net`` file of queue pair
q // 2. Its kick passes when its eventfd context is in KVM's ioeventfd list (a guest write at
the queue's notify address signals it in the kernel) and vhost polls it (a waiter whose
function is vhost's own, ``vhost_poll_wakeup`` as vhost's virtqueues hold it); its call passes
when its context is a KVM irqfd (the GSI is evidence). A vring whose backend (the tap) is
unset is not started now: QEMU unsets it while the VM is paused, and before the guest driver
starts the device; that is judged from the present (warn), never from a past trace; where
QEMU's monitor was read, it says which. A backend that is a tap queue on no device is a tap
deleted under the VM (fail: the wiring is intact, the data path dead). A call that is no irqfd
while other vrings of the same VM are irqfds, or while KVM keeps QEMU's irqfds that no vring
calls (every vector masked), is a masked vector (warn); else QEMU injects the interrupts
itself (fail).
Two reads that disagreed give unknown.

`gather` reads every QEMU at once (one program load, one iterator pass), and only when
some QEMU holds a vhost-net fd.
"""

from __future__ import annotations

import os

from vhostorch.check.ids import CALL, FEATURES, KICK, VHOST_MEMTABLE, VHOST_STARTED
from vhostorch.check.report import (
    BEYOND_READER,
    FAIL,
    MASKED,
    NOT_WIRED,
    PASS,
    RELAYED_INTERRUPT,
    RELAYED_KICK,
    TAP_GONE,
    UNKNOWN,
    UNSTABLE_READ,
    WARN,
    Check,
)
from vhostorch.kernel import procfs
from vhostorch.record import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

    from vhostorch.check.nics import Nic
    from vhostorch.check.observe import Observation
    from vhostorch.kernel.vhoststate import VhostNet, Virtqueue

SOURCE = "live"


def gather(observed: Sequence[Observation]) -> list[Observation]:
    """Each observation with the live state of its QEMU, when it holds a vhost-net fd, every
    QEMU read in one pass; or, when it could not be read, why (``live_note``, one line). No
    QEMU with a vhost-net fd: nothing is loaded (the program's load is most of the cost)."""
    from vhostorch.kernel import vhoststate

    holders = [o.process.pid for o in observed if o.process.fds_to(procfs.VHOST_NET)]
    if not holders:
        return list(observed)
    ok, why = vhoststate.available()
    if not ok:
        return [o.replace(live_note=why) for o in observed]
    try:
        # KVM's lists are walked as far as each QEMU's eventfds allow, counted as observed.
        held = {o.process.pid: len(o.process.fds_to(procfs.EVENTFD)) for o in observed}
        views = vhoststate.read(holders, held=held)
    except (vhoststate.LiveUnavailable, OSError) as err:
        return [o.replace(live_note=str(err) or type(err).__name__) for o in observed]
    return [o.replace(live=views.get(o.process.pid)) for o in observed]


def _queue(obs: Observation, nic: Nic, queue: int) -> tuple[Virtqueue | None, dict[str, object]]:
    """Virtqueue ``queue`` of ``nic`` as vhost holds it now, with the evidence naming it."""
    assert obs.live is not None
    pair, index = divmod(queue, 2)
    base: dict[str, object] = {"source": SOURCE, "vring": index}
    if pair >= len(nic.vhost_fds):
        return None, base
    fd = nic.vhost_fds[pair].num
    base["vhost_fd"] = fd
    for device in obs.live.vhost:
        if device.fd == fd and index < len(device.queues):
            vq = device.queues[index]
            base["ring"] = {"last_avail_idx": vq.last_avail_idx, "last_used_idx": vq.last_used_idx}
            return vq, base
    return None, base


def _counts(obs: Observation, context: int | None) -> dict[str, object]:
    """QEMU's fds on an eventfd context, and its count (a kick's: kicks since vhost started)."""
    assert obs.live is not None
    files = [f for f in obs.live.files if context and f.private_data == context]
    files = [f for f in files if f.eventfd_id is not None]
    return {
        "fds": [f.fd for f in files],
        "eventfd_id": files[0].eventfd_id if files else None,
        "count": files[0].eventfd_count if files else None,
    }


def _unjudgeable(obs: Observation, nic: Nic, queue: int, check_id: str) -> Check | None:
    """The verdict shared by kick and call when the vring cannot be judged now."""
    assert obs.live is not None
    vq, base = _queue(obs, nic, queue)
    if not obs.live.stable:
        message = "unknown: two reads of the kernel's state disagreed (it changed meanwhile)"
        return nic.check(check_id, UNKNOWN, message, base, queue=queue, cause=UNSTABLE_READ)
    if vq is None:
        message = "unknown: the kernel holds no such virtqueue for this NIC's vhost fd"
        return nic.check(check_id, UNKNOWN, message, base, queue=queue, cause=NOT_WIRED)
    if not vq.backend_file:
        message = (
            f"not started now: vhost has no backend (tap) on this vring: {_why_stopped(obs, nic)}"
        )
        return nic.check(check_id, WARN, message, base, queue=queue, cause=NOT_WIRED)
    return None


def _why_stopped(obs: Observation, nic: Nic) -> str:
    """Why QEMU has stopped vhost, as far as is known. The kernel alone cannot tell a paused
    VM from a guest whose driver is not up (both leave every vring without its backend);
    QEMU's monitor, where it was read, can."""
    from vhostorch.check.nics import virtio

    device = virtio(obs, nic)
    if device is not None and not device.vm_running:
        return "the VM is paused (QEMU's monitor says so); QEMU starts vhost again on cont"
    if device is not None and not device.driver_ok:
        return "the guest driver has not started the device (QEMU's monitor: no DRIVER_OK)"
    return (
        "the VM is paused, or the guest driver is not up (QEMU unsets it until the driver "
        "starts the device, and again at a pause, a reset or the driver's removal)"
    )


def _walked(obs: Observation) -> str:
    """The bounds the reader walked KVM's lists to, for a message."""
    assert obs.live is not None
    for k in obs.live.kvm:
        if not k.complete and k.walked:
            w = k.walked
            return (f" ({w.ioeventfds} ioeventfds and {w.irqfds} irqfds: as many as the "
                    "process's eventfds allow, at most the reader's caps)")  # fmt: skip
    return ""


def kick(obs: Observation, nic: Nic, queue: int) -> Check:
    """nic.kick from the kernel: KVM's ioeventfd, polled by vhost."""
    assert obs.live is not None
    found = _unjudgeable(obs, nic, queue, KICK)
    if found is not None:
        return found
    vq, base = _queue(obs, nic, queue)
    assert vq is not None
    notify = [
        {"addr": e.addr, "length": e.length, "datamatch": e.datamatch, "bus": e.bus}
        for kvm in obs.live.kvm
        for e in kvm.ioeventfds
        if vq.kick and e.eventfd == vq.kick
    ]
    # vhost's waiter function as its own virtqueues hold it (vhost_poll_wakeup, from
    # poll.wait.func), not /proc/kallsyms: reading that made the kernel format 100,000+
    # symbols at every check (0.4-0.7 s under the test host's TCG), and kptr_restrict does
    # not hide a pointer BPF reads. Any of the QEMU's virtqueues will do: the function is
    # the module's. None (the BTF has no such member: no kernel met so far): not known, and
    # said so; kallsyms is not read instead.
    poll = {q.poll_func for d in obs.live.vhost for q in d.queues if q.poll_func}
    polled = bool(set(vq.kick_waiters) & poll) if poll else None
    evidence = {**base, "kick": _counts(obs, vq.kick), "ioeventfds": notify, "polled": polled}
    if not notify and not all(k.complete for k in obs.live.kvm):
        message = f"unknown: KVM's ioeventfd list is longer than the reader walks{_walked(obs)}"
        return nic.check(KICK, UNKNOWN, message, evidence, queue=queue, cause=BEYOND_READER)
    if not notify:
        message = (
            "the kick eventfd vhost polls is not a KVM ioeventfd: QEMU relays the guest's "
            "notifications in userspace"
        )
        return nic.check(KICK, FAIL, message, evidence, queue=queue, cause=RELAYED_KICK)
    if polled is False:
        message = "the kick eventfd is KVM's ioeventfd but vhost does not poll it now"
        return nic.check(KICK, FAIL, message, evidence, queue=queue, cause=RELAYED_KICK)
    where = ", ".join(f"{n['addr']:#x}" for n in notify)
    polls = (
        "vhost polls it"
        if polled
        else "whether vhost polls it is not known (the kernel's BTF has no vhost_poll.wait)"
    )
    message = f"the kick eventfd is KVM's ioeventfd ({where}) and {polls} (live)"
    return nic.check(KICK, PASS, message, evidence, queue=queue)


def call(obs: Observation, nic: Nic, queue: int) -> Check:
    """nic.call from the kernel: KVM's irqfd, or masked."""
    assert obs.live is not None
    found = _unjudgeable(obs, nic, queue, CALL)
    if found is not None:
        return found
    vq, base = _queue(obs, nic, queue)
    assert vq is not None
    irqfds = [i for kvm in obs.live.kvm for i in kvm.irqfds]
    mine = [i.gsi for i in irqfds if vq.call and i.eventfd == vq.call]
    # Another vring of this NIC whose call is an irqfd: MSI-X and the irqchip work for its
    # device, so this vring's vector is masked. Only the NIC's own: each virtio device has its
    # own MSI-X table (one NIC may have none, vectors=0, beside another that has).
    own = {q.call for d in _devices(obs, nic).values() if d for q in d.queues if q.call}
    others = any(i.eventfd in own for i in irqfds)
    # QEMU keeps a masked vector's irqfd (virtio-pci's vector mask: vhost signals QEMU's
    # masked notifier meanwhile), so a guest that masked every vector at once (MSI-X's
    # function mask) leaves one irqfd of QEMU's per vring that no vring calls; a QEMU that
    # injects the interrupts itself has none. (Which device a kept irqfd is of, the kernel
    # does not say: another device's, a virtio-blk's with an iothread, could stand in.)
    calls = {q.call for d in obs.live.vhost for q in d.queues if q.call}
    kept = [i for i in irqfds if i.eventfd not in calls and obs.live.eventfd_fds(i.eventfd)]
    unmatched = own - {i.eventfd for i in irqfds}
    evidence = {**base, "call": _counts(obs, vq.call), "irqfd": {"gsi": mine[0]} if mine else None}
    if mine:
        message = f"the call eventfd is KVM's irqfd for GSI {mine[0]} (live)"
        return nic.check(CALL, PASS, message, evidence, queue=queue)
    if not all(k.complete for k in obs.live.kvm):
        message = f"unknown: KVM's irqfd list is longer than the reader walks{_walked(obs)}"
        return nic.check(CALL, UNKNOWN, message, evidence, queue=queue, cause=BEYOND_READER)
    if others or (kept and len(kept) >= len(unmatched)):
        which = "other vrings' are" if others else "KVM keeps QEMU's irqfds of masked vectors"
        message = (
            f"the call eventfd is no KVM irqfd while {which}: QEMU's masked notifier "
            "(the guest has masked this queue's MSI-X vector right now); check again"
        )
        return nic.check(CALL, WARN, message, {**evidence, "masked": True}, queue=queue,
                         cause=MASKED)  # fmt: skip
    message = (
        "the call eventfd is not a KVM irqfd: QEMU injects the interrupts itself "
        "(no MSI-X, or no in-kernel irqchip)"
    )
    return nic.check(CALL, FAIL, message, evidence, queue=queue, cause=RELAYED_INTERRUPT)


def _devices(obs: Observation, nic: Nic) -> dict[int, VhostNet | None]:
    """The NIC's vhost fds as the kernel holds them now (None: not read as vhost-net)."""
    assert obs.live is not None
    by_fd = {d.fd: d for d in obs.live.vhost}
    return {fd.num: by_fd.get(fd.num) for fd in nic.vhost_fds}


def started(obs: Observation, nic: Nic) -> Check:
    """nic.vhost.started from the kernel: every vring of the NIC's vhost devices has a backend,
    it is one of the NIC's own tap fds, and that tap queue is on a device."""
    from vhostorch.kernel.vhoststate import TUN_GONE

    assert obs.live is not None
    devices = _devices(obs, nic)
    taps = {fd.num for fd in nic.tap_fds}
    backends = {
        fd: [obs.live.fd_of_file(q.backend_file) for q in d.queues] if d else None
        for fd, d in devices.items()
    }
    evidence: dict[str, object] = {"source": SOURCE, "backends": backends}
    if not obs.live.stable:
        message = "unknown: two reads of the kernel's state disagreed (it changed meanwhile)"
        return nic.check(VHOST_STARTED, UNKNOWN, message, evidence, cause=UNSTABLE_READ)
    if any(d is None or not d.queues for d in devices.values()):
        message = "unknown: a vhost fd of this NIC was not read as a vhost-net device"
        return nic.check(VHOST_STARTED, UNKNOWN, message, evidence)
    vqs = [q for d in devices.values() if d for q in d.queues]
    if not all(q.backend_file for q in vqs):
        message = f"not started now: a vring has no backend (tap): {_why_stopped(obs, nic)}"
        return nic.check(VHOST_STARTED, WARN, message, evidence, cause=NOT_WIRED)
    joined = {fd for pair in backends.values() if pair for fds in pair for fd in fds}
    if not joined <= taps or any(not fds for pair in backends.values() if pair for fds in pair):
        message = "a vring's backend is not one of this NIC's tap fds"
        return nic.check(VHOST_STARTED, FAIL, message, evidence)
    queues = {f.fd: f.tun_queue for f in obs.live.files if f.fd in joined and f.tun_queue}
    evidence["tap_queues"] = queues
    gone = sorted(fd for fd, state in queues.items() if state == TUN_GONE)
    if gone:
        # ip link del of a tap QEMU holds: the kernel detaches every queue (tun_detach_all),
        # QEMU keeps its fds and vhost its sockets, and nothing tells either: KVM still
        # signals vhost, which has nowhere to send or receive.
        message = (
            f"the tap is gone: vhost's backend, tap fd(s) {gone}, is a tap queue on no device "
            "(the tap was deleted under the running VM): no packet can flow"
        )
        return nic.check(VHOST_STARTED, FAIL, message, evidence, cause=TAP_GONE)
    message = "every vring is joined to this NIC's tap now: vhost runs the data path (live)"
    return nic.check(VHOST_STARTED, PASS, message, evidence)


def memtable(obs: Observation, nic: Nic) -> Check:
    """nic.vhost.memtable from the kernel: each vhost device holds guest memory regions."""
    regions = {fd: d.memory_regions if d else None for fd, d in _devices(obs, nic).items()}
    evidence: dict[str, object] = {"source": SOURCE, "regions": regions}
    if all(n for n in regions.values()):
        most = max(n or 0 for n in regions.values())
        message = f"each vhost device holds a table of {most} guest memory region(s) (live)"
        return nic.check(VHOST_MEMTABLE, PASS, message, evidence)
    if any(n is None for n in regions.values()):
        message = "unknown: vhost holds no memory table now (not set: vhost not started yet)"
        return nic.check(VHOST_MEMTABLE, UNKNOWN, message, evidence)
    return nic.check(VHOST_MEMTABLE, FAIL, "a vhost device holds no guest memory region", evidence)


def features(obs: Observation, nic: Nic) -> Check:
    """nic.features from the kernel: every vring of the NIC was given the same features."""
    from vhostorch.check.running import feature_names

    acked = {
        fd: sorted({q.acked_features for q in d.queues if q.acked_features is not None})
        if d else []
        for fd, d in _devices(obs, nic).items()
    }  # fmt: skip
    values = {bits for each in acked.values() for bits in each}
    evidence: dict[str, object] = {
        "source": SOURCE,
        "features": {fd: [hex(b) for b in each] for fd, each in acked.items()},
    }
    if any(not each for each in acked.values()):
        return nic.check(FEATURES, UNKNOWN, "unknown: the kernel holds no features", evidence)
    if len(values) != 1:
        message = "the vrings of this NIC's vhost devices hold different features"
        return nic.check(FEATURES, FAIL, message, evidence)
    bits = values.pop()
    names = feature_names(bits)
    evidence["names"] = names
    if not bits:
        return nic.check(FEATURES, FAIL, "vhost was given no features", evidence)
    message = f"vhost runs with {', '.join(names) or hex(bits)} (live)"
    return nic.check(FEATURES, PASS, message, evidence)


def host_check() -> Check:
    """doctor's host.live: whether the kernel's present state can be read here (root, Linux
    >= 5.8, BTF for vmlinux and the modules, no lockdown), proved by loading and running the
    reader once over this process; and if not, why (the verifier's first line, when it
    refused the program)."""
    from vhostorch.check.ids import HOST_LIVE
    from vhostorch.kernel import vhoststate

    ok, why = vhoststate.available()
    if ok:
        try:
            vhoststate.read([os.getpid()])
        except (vhoststate.LiveUnavailable, OSError) as err:
            ok, why = False, str(err) or type(err).__name__
    if not ok:
        message = (
            f"the kernel's live state cannot be read here: {why}; nic.kick and nic.call need "
            "the wiring trace (or check --rewire) instead"
        )
        return Check(HOST_LIVE, WARN, message, {"reason": why})
    message = (
        "the kernel's live state can be read (BPF iterator, BTF): nic.kick and nic.call are "
        "proved from it, with no trace and no pause"
    )
    return Check(HOST_LIVE, PASS, message, {"kernel": os.uname().release})
