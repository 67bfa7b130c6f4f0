"""Kick and call wiring, proved from a selective trace of the ioctls that set it up.

The kernel shows no link between a vhost vring's kick/call eventfds and KVM's
ioeventfds/irqfds once they are set. They are set by ioctls QEMU makes when the
guest driver starts the device (DRIVER_OK): VHOST_SET_VRING_KICK/CALL on the
vhost fd, KVM_IOEVENTFD and KVM_IRQFD on the VM fd, VHOST_NET_SET_BACKEND to
join a vring to its tap fd. vhostorch records exactly these, system-wide and
nothing else, with one kprobe on the ioctl syscall entry (tracefs kprobe_events,
Linux >= 5.5 for user-memory fetch arguments, x86_64 pt_regs layout), into a
private tracing instance whose filter keeps only those ioctl numbers. ``arm``
must happen before the QEMU wires its vrings (before the guest driver starts);
``read`` then gives, per QEMU, the final state of each vring.

What it proves: vring i of vhost fd V has kick eventfd K that QEMU also gave KVM
as an ioeventfd (with its notify address), and call eventfd C that QEMU gave KVM
as an irqfd (with its GSI; QEMU's virtio-pci makes irqfds only for MSI-X vectors
with an in-kernel irqchip). What it does not: that an fd number was not closed
and reused between the ioctls (the eventfd is checked to be open as an eventfd
now). Return codes are not recorded (a kretprobe on the syscall would see every
ioctl on the host).
"""

from __future__ import annotations

import errno
import os
import time

# The error raised here, also importable from here (the tree is in vhostorch.errors).
from vhostorch.errors import TraceUnavailable as TraceUnavailable
from vhostorch.record import TYPE_CHECKING, Record

if TYPE_CHECKING:
    from collections.abc import Iterable

TRACEFS = "/sys/kernel/tracing"
GROUP, EVENT = "vhostorch", "ioctl"
INSTANCE = "vhostorch"

# ioctl numbers (include/uapi/linux/vhost.h, kvm.h): _IOW(type, nr, size).
VHOST_SET_OWNER = 0x0000AF01
VHOST_SET_FEATURES = 0x4008AF00
VHOST_SET_MEM_TABLE = 0x4008AF03
VHOST_SET_VRING_KICK = 0x4008AF20
VHOST_SET_VRING_CALL = 0x4008AF21
VHOST_NET_SET_BACKEND = 0x4008AF30
KVM_IRQFD = 0x4020AE76
KVM_IOEVENTFD = 0x4040AE79
TRACED = (VHOST_SET_OWNER, VHOST_SET_FEATURES, VHOST_SET_MEM_TABLE, VHOST_SET_VRING_KICK,
          VHOST_SET_VRING_CALL, VHOST_NET_SET_BACKEND, KVM_IRQFD, KVM_IOEVENTFD)  # fmt: skip
KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2

# __x64_sys_ioctl(const struct pt_regs *regs): the syscall's fd, cmd and arg are
# regs->di, ->si, ->dx (offsets 112, 104, 96); w0..w3 are the first 32 bytes arg
# points to in user memory (vhost_vring_file, kvm_irqfd, kvm_ioeventfd, u64).
# Proved on Debian's 6.1 and 6.12 in the test host. From 6.9 on, x86 dispatches
# syscalls through a switch in x64_sys_call (no indirect call, against BHI) instead
# of the table, but the wrapper is still its own function in fs/ioctl.c, called
# with the same pt_regs, and kprobe-able (listed in available_filter_functions).
PROBE = (
    f"p:{GROUP}/{EVENT} __x64_sys_ioctl fd=+112(%di):s32 cmd=+104(%di):u32 "
    "w0=+u0(+96(%di)):u64 w1=+u8(+96(%di)):u64 w2=+u16(+96(%di)):u64 w3=+u24(+96(%di)):u64"
)


class Event(Record):
    tgid: int
    tid: int
    time: float
    fd: int
    cmd: int
    words: tuple[int, int, int, int]


class Vring(Record):
    """What the trace shows for one vring of one vhost fd."""

    vhost_fd: int
    index: int
    kick: int | None
    call: int | None
    backend: int | None
    ioeventfds: tuple[dict[str, int], ...]
    irqfd: dict[str, int] | None
    # The call eventfd is the first one QEMU gave the vring after VHOST_SET_OWNER: its
    # "masked notifier", where it parks vhost's interrupts while the guest has the
    # queue's MSI-X vector masked (hw/virtio/vhost.c, vhost_virtqueue_init/_mask).
    # False also when the trace did not see the vhost fd's SET_OWNER.
    masked: bool = False


class Wiring(Record):
    """The final state of one QEMU's vhost devices as its traced ioctls left them."""

    events: int
    owners: tuple[int, ...]
    features: dict[int, int]
    mem_regions: dict[int, int]
    vrings: tuple[Vring, ...]

    def vring(self, vhost_fd: int, index: int) -> Vring | None:
        for v in self.vrings:
            if v.vhost_fd == vhost_fd and v.index == index:
                return v
        return None

    def backend_fds(self) -> dict[int, int]:
        """vhost fd → the tap fd its vrings were joined to (the last non-detach)."""
        return {v.vhost_fd: v.backend for v in self.vrings if v.backend is not None}


def _s32(word: int) -> int:
    value = word & 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def decode(events: Iterable[Event]) -> Wiring:
    """Fold one QEMU's events, in order, into the state they leave (a pure function)."""
    owners: list[int] = []
    features: dict[int, int] = {}
    regions: dict[int, int] = {}
    kick: dict[tuple[int, int], int] = {}
    call: dict[tuple[int, int], int] = {}
    backend: dict[tuple[int, int], int] = {}
    # QEMU's first call eventfd for a vring after it took the vhost fd (VHOST_SET_OWNER).
    parked: dict[tuple[int, int], int] = {}
    owned: set[int] = set()
    ioeventfds: dict[int, list[dict[str, int]]] = {}
    irqfds: dict[int, dict[str, int]] = {}
    count = 0
    for e in events:
        count += 1
        w0, w1, w2, w3 = e.words
        if e.cmd == VHOST_SET_OWNER:
            owners.append(e.fd)
            owned.add(e.fd)
            parked = {k: v for k, v in parked.items() if k[0] != e.fd}  # a reused fd number
        elif e.cmd == VHOST_SET_FEATURES:
            features[e.fd] = w0
        elif e.cmd == VHOST_SET_MEM_TABLE:
            regions[e.fd] = w0 & 0xFFFFFFFF
        elif e.cmd in (VHOST_SET_VRING_KICK, VHOST_SET_VRING_CALL, VHOST_NET_SET_BACKEND):
            index, fd = w0 & 0xFFFFFFFF, _s32(w0 >> 32)
            table = {VHOST_SET_VRING_KICK: kick, VHOST_SET_VRING_CALL: call}.get(e.cmd, backend)
            table[(e.fd, index)] = fd
            if e.cmd == VHOST_SET_VRING_CALL and e.fd in owned:
                parked.setdefault((e.fd, index), fd)
        elif e.cmd == KVM_IOEVENTFD:
            # struct kvm_ioeventfd: datamatch u64, addr u64, len u32, fd s32, flags u32.
            fd, flags = _s32(w2 >> 32), w3 & 0xFFFFFFFF
            entry = {
                "addr": w1, "len": w2 & 0xFFFFFFFF,
                "pio": int(bool(flags & KVM_IOEVENTFD_FLAG_PIO)),
                "datamatch": w0 if flags & KVM_IOEVENTFD_FLAG_DATAMATCH else -1,
            }  # fmt: skip
            # One eventfd may serve several notify addresses (legacy port I/O and modern MMIO).
            kept = [x for x in ioeventfds.get(fd, []) if x != entry]
            if not flags & KVM_IOEVENTFD_FLAG_DEASSIGN:
                kept.append(entry)
            ioeventfds[fd] = kept
        elif e.cmd == KVM_IRQFD:
            # struct kvm_irqfd: fd u32, gsi u32, flags u32, resamplefd u32.
            fd, gsi, flags = _s32(w0), w0 >> 32, w1 & 0xFFFFFFFF
            if flags & KVM_IRQFD_FLAG_DEASSIGN:
                irqfds.pop(fd, None)
            else:
                irqfds[fd] = {"gsi": gsi, "flags": flags}
    vrings = []
    for key in sorted(set(kick) | set(call) | set(backend)):
        k, c = kick.get(key), call.get(key)
        vrings.append(
            Vring(
                key[0], key[1], k, c, backend.get(key),
                tuple(ioeventfds.get(k, [])) if k is not None and k >= 0 else (),
                irqfds.get(c) if c is not None and c >= 0 else None,
                c is not None and c >= 0 and parked.get(key) == c,
            )
        )  # fmt: skip
    return Wiring(count, tuple(owners), features, regions, tuple(vrings))


def parse_trace(text: str) -> list[Event]:
    """Lines of the instance's ``trace`` file (record-tgid on) → events, in order."""
    events = []
    for line in text.splitlines():
        if line.startswith("#") or f" {EVENT}: " not in line:
            continue
        head, _, fields = line.partition(f" {EVENT}: ")
        # head: "  <comm>-<tid>  (<tgid>) [cpu] flags  <time>:"
        try:
            before_tgid, _, rest = head.rpartition("(")
            tgid_text, _, rest = rest.partition(")")
            tid = int(before_tgid.strip().rsplit("-", 1)[1])
            tgid = int(tgid_text.strip()) if tgid_text.strip().isdigit() else tid
            time = float(rest.split()[-1].rstrip(":"))
        except (ValueError, IndexError):
            continue
        values: dict[str, int] = {}
        for item in fields.split():
            key, eq, value = item.partition("=")
            if eq:
                try:
                    values[key] = int(value, 0)
                except ValueError:
                    values[key] = 0  # "(fault)": arg did not point at readable memory
        words = (values.get("w0", 0), values.get("w1", 0), values.get("w2", 0), values.get("w3", 0))
        events.append(Event(tgid, tid, time, values.get("fd", -1), values.get("cmd", 0), words))
    return events


def _write(path: str, text: str, append: bool = False) -> None:
    # One write(2), and no seek: Python's "a" mode seeks to the end, which tracefs
    # refuses (EINVAL), and kprobe_events must be appended to, never truncated.
    flags = os.O_WRONLY | (os.O_APPEND if append else os.O_TRUNC)
    fd = os.open(path, flags)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _instance(tracefs: str) -> str:
    return f"{tracefs}/instances/{INSTANCE}"


def armed(tracefs: str = TRACEFS) -> bool:
    try:
        with open(f"{_instance(tracefs)}/events/{GROUP}/{EVENT}/enable") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def arm(tracefs: str = TRACEFS) -> bool:
    """Start recording (idempotent). Returns False when it already was. Raises TraceUnavailable."""
    if armed(tracefs):
        return False
    if not os.path.exists(f"{tracefs}/kprobe_events"):
        raise TraceUnavailable(
            f"no tracefs at {tracefs} (mount -t tracefs tracefs {tracefs}; needs root)"
        )
    try:
        if not os.path.isdir(f"{tracefs}/events/{GROUP}/{EVENT}"):
            _write(f"{tracefs}/kprobe_events", PROBE + "\n", append=True)
        inst = _instance(tracefs)
        if not os.path.isdir(inst):
            os.mkdir(inst)
        _write(f"{inst}/trace_clock", "boot")  # comparable with /proc/PID/stat starttime
        _write(f"{inst}/options/record-tgid", "1")
        _write(f"{inst}/buffer_size_kb", "512")
        wanted = " || ".join(f"cmd == {cmd}" for cmd in TRACED)
        _write(f"{inst}/events/{GROUP}/{EVENT}/filter", wanted)
        _write(f"{inst}/events/{GROUP}/{EVENT}/enable", "1")
    except OSError as err:
        raise TraceUnavailable(f"cannot arm the wiring trace: {err.strerror or err}") from err
    return True


def disarm(tracefs: str = TRACEFS) -> None:
    """Stop recording and remove the instance and the probe (only vhostorch's own)."""
    inst = _instance(tracefs)
    try:
        if os.path.isdir(inst):
            _write(f"{inst}/events/{GROUP}/{EVENT}/enable", "0")
            os.rmdir(inst)
        if os.path.isdir(f"{tracefs}/events/{GROUP}/{EVENT}"):
            _remove_probe(tracefs)
    except OSError as err:
        raise TraceUnavailable(f"cannot disarm the wiring trace: {err.strerror or err}") from err


def _remove_probe(tracefs: str, patience: float = 5.0) -> None:
    # Right after the instance went, the kernel can still refuse the probe's removal
    # (EBUSY) for a moment: seen in the test host under load (7 of 42 arm/disarm cycles
    # while inner guests started; none in 200 quiet ones), and the next arm/disarm went
    # through. A probe still busy after ``patience`` is reported.
    deadline = time.monotonic() + patience
    while True:
        try:
            _write(f"{tracefs}/kprobe_events", f"-:{GROUP}/{EVENT}\n", append=True)
            return
        except OSError as err:
            if err.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def read(pid: int, since: float, tracefs: str = TRACEFS) -> Wiring | None:
    """The wiring recorded for process ``pid`` since ``since`` (seconds of boot time).

    None when the trace is not armed (or cannot be read).
    """
    if not armed(tracefs):
        return None
    try:
        with open(f"{_instance(tracefs)}/trace") as f:
            text = f.read()
    except OSError:
        return None
    return decode(e for e in parse_trace(text) if e.tgid == pid and e.time >= since)
