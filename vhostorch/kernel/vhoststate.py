"""What the kernel holds now for QEMU's vhost-net devices and KVM VMs, read from its own objects
by a BPF ``task_file`` iterator: no trace armed before, no pause, nothing left attached.

For each chosen process the iterator visits every open file with a reference held (so nothing
is freed under the program), of its group leader's fd table only (the one /proc/PID/fd shows;
a thread that unshared its table is passed over), and the program writes fixed-size records
(`read` decodes them):

- every file: its ``struct file`` address, ``private_data``, device number and anon inode name
  (a name only for a file of the anon inode filesystem: any other may be called anything),
  and for an eventfd its context's id (fdinfo's ``eventfd-id``, so Python maps contexts back to
  QEMU's fd numbers); for a ``/dev/net/tun`` file (misc 10:200), whose ``private_data`` is
  ``struct tun_file``, whether the queue is on a device (``tun``; one detached with
  TUNSETQUEUE's IFF_DETACH_QUEUE keeps it and has ``detached`` set) or on none (the device
  was deleted under it); the same for a macvtap queue (``/dev/tapN``, of the dynamic major
  ``read`` finds in /proc/devices), whose ``private_data`` is ``struct tap_queue``: its
  ``tap`` (cleared when the macvtap is deleted) and ``enabled`` (off when detached);
- a ``/dev/vhost-net`` file (misc 10:238, known by its inode's device number, so a container's
  mknod'ed node counts and vhost-vsock, 10:241, or vhost-vdpa do not), whose ``private_data``
  is ``struct vhost_net`` (a file without one, such as an O_PATH file on the node, is no
  device: the program reads no virtqueue of it): per virtqueue (RX 0, TX 1) the kick eventfd's
  context and the functions of the waiters on it, vhost's own waiter function (the virtqueue's
  ``poll.wait.func``, ``vhost_poll_wakeup``: which of those waiters is vhost's), the call context
  (``call_ctx.ctx``), the backend socket's file (the tap's), ``acked_features``, the ring
  indices, the worker's tid, and the number of memory regions in ``dev.umem``;
- a ``kvm-vm`` file (``private_data``: ``struct kvm``): its ``ioeventfds`` (address, length,
  datamatch, eventfd context, bus) and ``irqfds.items`` (GSI, eventfd context, the waiters on
  it: KVM's is ``irqfd_wakeup``).

Every offset comes from the running kernel's BTF (vmlinux and the vhost, vhost_net, kvm, tun
modules' split BTF: ``struct _ioeventfd`` and ``struct kvm_kernel_irqfd`` exist only in kvm's,
``struct vhost_task`` only in vmlinux's) through `btf.layout`, cached per boot. The worker is
found however this kernel keeps it: 6.1 ``vhost_dev.worker`` is the kernel thread's
``task_struct``; 6.4 ``vhost_dev.worker->vtsk->task``; 6.5 on, per virtqueue
``vq.worker->vtsk->task`` (and ``kthread_task`` where the kernel offers the fork-owner mode).

Read-only: every read is ``bpf_probe_read_kernel`` (a bad pointer reads as zeros, never a
fault), lists are walked a bounded number of steps (a longer list is reported as truncated,
never cut silently), nothing is written to any eventfd. `read` takes the state twice and says
whether the wiring agreed (`KernelView.stable`); a caller reports ``unknown`` when not.
"""

from __future__ import annotations

import os
import struct

from vhostorch.errors import BpfRefused as BpfRefused
from vhostorch.errors import LiveUnavailable as LiveUnavailable
from vhostorch.kernel import bpf, btf, procfs
from vhostorch.kernel.bpf import (
    ADD,
    DW,
    FP,
    JEQ,
    JNE,
    PROBE_READ_KERNEL,
    PROBE_READ_KERNEL_STR,
    R0,
    R1,
    R2,
    R3,
    R6,
    R7,
    R8,
    R9,
    SEQ_WRITE,
    SUB,
    Program,
    W,
)  # fmt: skip
from vhostorch.record import TYPE_CHECKING, Record

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence
    from typing import Final, Literal, TypeVar

    TunQueue = Literal["attached", "detached", "gone"]

    _T = TypeVar("_T")

LOCKDOWN = "/sys/kernel/security/lockdown"
MODULES = ("vhost", "vhost_net", "kvm", "kvm_amd", "kvm_intel", "tun", "tap")
ITERATOR = "bpf_iter_task_file"
# The kernel's internal dev_t of /dev/vhost-net: MKDEV(MISC_MAJOR 10, VHOST_NET_MINOR 238),
# major << 20 | minor (include/linux/kdev_t.h), as struct inode's i_rdev holds it.
_MINOR_BITS = 20
VHOST_NET_RDEV = 10 << _MINOR_BITS | 238
VHOST_VSOCK_RDEV = 10 << _MINOR_BITS | 241  # VHOST_VSOCK_MINOR: another vhost, not a NIC
TUN_RDEV = 10 << _MINOR_BITS | 200  # TUN_MINOR: /dev/net/tun, a tap queue's file
# A tap queue's state: on its device; detached from it (TUNSETQUEUE's IFF_DETACH_QUEUE: QEMU
# detaches the queues of pairs the guest has not enabled); on none (the tap was deleted).
TUN_ATTACHED: Final = "attached"
TUN_DETACHED: Final = "detached"
TUN_GONE: Final = "gone"
_S_IFMT, _S_IFCHR = 0o170000, 0o020000
VHOST_NET_VQS = 2  # VHOST_NET_VQ_RX, VHOST_NET_VQ_TX
MAX_PIDS = 256  # per program: the pid filter is a chain of comparisons
MAX_WAITERS = 4  # waiters looked at per kick eventfd (vhost's poll is one)
MAX_IRQ_WAITERS = 2  # per irqfd's eventfd (KVM's irqfd_wakeup is one)
# KVM's lists are walked as far as the chosen processes can hold (`Bounds.sized`): every
# irqfd and ioeventfd names an eventfd; KVM refuses a second irqfd on one eventfd
# (kvm_irqfd_assign: -EBUSY), and QEMU's virtio-pci puts a queue's notifier on at most
# IOEVENTFDS_PER_EVENTFD entries (modern MMIO notify, whose length-0 entry KVM keeps on two
# buses, MMIO and fast MMIO; PIO notify; the legacy port with the queue's index as datamatch).
IOEVENTFDS_PER_EVENTFD = 4
BOUNDS_SLACK = 8  # eventfds made between counting them and reading
# Hard caps, past which a longer list is reported as truncated (beyond-reader), never cut
# silently: each entry is unrolled in the program (about 28 instructions an ioeventfd, 57 an
# irqfd), costs verifier time at every check and must stay within a BPF jump's 32,767
# instructions; and one VM's records must fit the iterator's buffer (SEQ_BUFFER: 64 bytes
# an ioeventfd, 48 an irqfd; `fitted` cuts further where a kernel's records are longer).
MAX_IOEVENTFDS = 384
MAX_IRQFDS = 128
_NAME_BYTES = 8  # the anon inode names told apart fit in 8 bytes with their NUL
_EVENTFD_NAME = int.from_bytes(b"[eventf\0", "little")  # "[eventfd]" read as 7 bytes + NUL
_KVM_VM_NAME = int.from_bytes(b"kvm-vm\0\0", "little")
# The anon inode filesystem's magic (include/uapi/linux/magic.h): only there does a name say
# what a file is; a disk image or FIFO QEMU holds may be called "kvm-vm" or "[eventfd]".
ANON_INODE_FS_MAGIC = 0x09041934

# Record kinds, and the record: little-endian u64 slots, slot 0 = kind | fd << 32,
# slot 1 = tgid | index << 32 (the virtqueue or list entry), then the kind's slots. Each
# kind writes only its own slots (its length follows from its kind): a VM's KVM lists go
# out in one visit of its kvm-vm file, and the iterator fails the whole read (E2BIG) when
# one visit writes more than its seq_file buffer holds.
SEQ_BUFFER = 4096 << 3  # kernel/bpf/bpf_iter.c: seq->size = PAGE_SIZE << 3 (x86_64 pages)
FILE, VQ, IOEVENTFD, IRQFD, TRUNCATED = 1, 2, 3, 4, 5

# Slots per kind
F_FILE, F_PRIVATE, F_INODE, F_RDEV, F_MODE, F_DENTRY, F_NAME, F_NAMEP = range(2, 10)
F_EVENTFD_ID, F_EVENTFD_COUNT, F_TUN, F_TUN_DETACHED = 10, 11, 12, 13
(V_KICK_FILE, V_KICK, V_WAITER0) = (2, 3, 4)
V_CALL, V_BACKEND, V_BACKEND_FILE, V_FEATURES, V_AVAIL, V_USED = 8, 9, 10, 11, 12, 13
V_REGIONS, V_UMEM, V_TID, V_KTID, V_POLL = 14, 15, 16, 17, 18
IO_COPY = 2  # struct _ioeventfd's members read, copied whole, from here to IO_NEXT at most
IRQ_GSI, IRQ_EVENTFD, IRQ_WAITER0, IRQ_NEXT = 2, 3, 4, 6  # waiters in 4..5 (MAX_IRQ_WAITERS)
SLOTS = V_POLL + 1  # the largest kind's
IO_NEXT = SLOTS - 1
FILE_SLOTS, IRQ_SLOTS, TRUNCATED_SLOTS = F_TUN_DETACHED + 1, IRQ_WAITER0 + MAX_IRQ_WAITERS, 2
IOEVENTFD_MEMBERS = ("addr", "length", "eventfd", "datamatch", "bus_idx", "wildcard")
# The stack: the record, then scratch slots (fd, tgid, seq_file, list node, waiter node).
_SCRATCH = -6 * 8
_BASE = _SCRATCH - SLOTS * 8
_FD, _TGID, _SEQ, _NODE, _WAITER = (_SCRATCH + 8 * i for i in range(5))


def _paths() -> list[str]:
    vq = [f"vhost_net.vqs[{i}].vq" for i in range(VHOST_NET_VQS)]
    per_vq = ("kick", "call_ctx.ctx", "private_data", "acked_features", "last_avail_idx",
              "last_used_idx", "worker", "poll.wait.func")  # fmt: skip
    return [
        "bpf_iter__task_file.meta", "bpf_iter__task_file.task", "bpf_iter__task_file.fd",
        "bpf_iter__task_file.file", "bpf_iter_meta.seq", "task_struct.tgid", "task_struct.pid",
        "task_struct.files", "task_struct.group_leader",
        "file.private_data", "file.f_inode", "file.f_path.dentry", "inode.i_rdev", "inode.i_sb",
        "super_block.s_magic",
        "inode.i_mode", "dentry.d_name.name", "eventfd_ctx.id", "eventfd_ctx.count",
        "eventfd_ctx.wqh.head", "list_head.next", "wait_queue_entry.func",
        "wait_queue_entry.entry", "socket.file", "vhost_net.dev.umem", "vhost_net.dev.worker",
        "vhost_iotlb.nmaps", "tun_file.tun", "tun_file.detached", "tap_queue.tap",
        "tap_queue.enabled",
        "vhost_worker.vtsk", "vhost_worker.kthread_task", "vhost_task.task",
        *(f"{q}.{member}" for q in vq for member in per_vq),
        "kvm.ioeventfds", "_ioeventfd.list", "_ioeventfd.addr", "_ioeventfd.length",
        "_ioeventfd.eventfd", "_ioeventfd.datamatch", "_ioeventfd.bus_idx",
        "_ioeventfd.wildcard", "kvm.irqfds.items", "kvm_kernel_irqfd.list",
        "kvm_kernel_irqfd.gsi", "kvm_kernel_irqfd.eventfd",
    ]  # fmt: skip


PATHS = tuple(_paths())
# Without these no record can be made at all; the rest are read where this kernel has them.
REQUIRED = (
    "bpf_iter__task_file.meta", "bpf_iter__task_file.task", "bpf_iter__task_file.fd",
    "bpf_iter__task_file.file", "bpf_iter_meta.seq", "task_struct.tgid", "task_struct.pid",
    "file.private_data", "file.f_inode", "file.f_path.dentry", "inode.i_rdev", "inode.i_mode",
    "dentry.d_name.name", "list_head.next",
)  # fmt: skip


class Virtqueue(Record):
    """One vhost-net virtqueue as vhost holds it. Addresses are kernel addresses (compare
    them with each other, never print them as facts about the guest); None: not set, or this
    kernel has no such member."""

    index: int  # 0 RX, 1 TX within its vhost-net device
    kick: int | None  # the kick eventfd's context
    kick_waiters: tuple[int, ...]  # functions waiting on it (vhost's poll: `poll_func`)
    call: int | None  # the call eventfd's context
    backend_file: int | None  # the backend socket's struct file: the tap's
    acked_features: int | None
    last_avail_idx: int | None
    last_used_idx: int | None
    worker_tid: int | None  # where the worker is per virtqueue (Linux >= 6.5)
    # vhost's own waiter function, its poll's wait.func: vhost_poll_init sets it to
    # vhost_poll_wakeup when the device is opened, and vhost_poll_start queues that entry on
    # the kick eventfd. Read as a pointer, it is the value a waiter's func holds (the same
    # stored function pointer, whatever kptr_restrict hides in /proc/kallsyms); None: this
    # kernel's BTF has no such member.
    poll_func: int | None = None


class VhostNet(Record):
    """One open ``/dev/vhost-net`` file of the process."""

    fd: int
    queues: tuple[Virtqueue, ...]
    memory_regions: int | None  # entries in dev.umem; None: no memory table set
    worker_tid: int | None  # the device's worker, where the kernel keeps one per device
    worker_model: str  # "kthread" (< 6.4), "vhost_task", "kthread_task" (fork-owner mode)


class IoEventFd(Record):
    """One entry of KVM's ioeventfd list: a guest write at ``addr`` signals ``eventfd``."""

    addr: int
    length: int
    datamatch: int | None  # None: any value (wildcard)
    eventfd: int
    bus: int | None  # KVM's bus index (0 MMIO, 1 PIO, 2 virtio-ccw, 3 fast MMIO on 6.x)


class IrqFd(Record):
    """One entry of KVM's irqfd list: a signal of ``eventfd`` injects ``gsi``."""

    gsi: int
    eventfd: int
    waiters: tuple[int, ...]  # functions waiting on the eventfd (KVM's: irqfd_wakeup)


class Bounds(Record):
    """How many entries of KVM's ioeventfd and irqfd lists a program walks per ``kvm-vm`` file."""

    ioeventfds: int
    irqfds: int


def bounds(eventfds: int) -> Bounds:
    """The walk that covers whatever a process holding ``eventfds`` open eventfds can have
    registered with KVM (and some slack), up to the hard caps."""
    n = max(eventfds, 0) + BOUNDS_SLACK
    return Bounds(min(n * IOEVENTFDS_PER_EVENTFD, MAX_IOEVENTFDS), min(n, MAX_IRQFDS))


def eventfds(pid: int, proc: str = procfs.PROC) -> int:
    """How many eventfds process ``pid`` holds open now (0 when it is gone)."""
    base = f"{proc}/{pid}/fd"
    try:
        names = os.listdir(base)
    except OSError:
        return 0
    count = 0
    for name in names:
        try:
            count += os.readlink(f"{base}/{name}") == procfs.EVENTFD
        except OSError:
            continue  # closed while we looked
    return count


class Kvm(Record):
    """One open ``kvm-vm`` file of the process; ``complete`` False when a list was longer than
    the program walks (``walked``: its bounds)."""

    fd: int
    ioeventfds: tuple[IoEventFd, ...]
    irqfds: tuple[IrqFd, ...]
    complete: bool
    walked: Bounds | None = None


class OpenFile(Record):
    """One open file: ``private_data`` (for an eventfd, its context), its device number (the
    kernel's dev_t), its anon inode name (first 7 bytes), and for an eventfd its context's
    ``eventfd_id`` and ``eventfd_count`` (fdinfo's; a kick eventfd's count grows with each
    guest kick while vhost owns the queue, as vhost never reads it: a kick counter)."""

    fd: int
    file: int
    private_data: int
    rdev: int
    name: str
    eventfd_id: int | None
    eventfd_count: int | None = None
    # A /dev/net/tun or macvtap file's queue (TUN_ATTACHED, TUN_DETACHED, TUN_GONE); None:
    # neither, or this kernel's BTF has no struct tun_file (tap_queue).
    tun_queue: TunQueue | None = None

    @property
    def kind(self) -> str | None:
        """ "vhost-net", "vhost-vsock", "eventfd", "kvm-vm", or None for anything else (a file
        with no ``private_data`` included: each of those gets its own at open, and an O_PATH
        file, which any user may hold on the device node, has none: no driver opened it)."""
        if not self.private_data:
            return None
        if self.rdev == VHOST_NET_RDEV:
            return "vhost-net"
        if self.rdev == VHOST_VSOCK_RDEV:
            return "vhost-vsock"
        if self.eventfd_id is not None:
            return "eventfd"
        return "kvm-vm" if self.name == "kvm-vm" else None


class KernelView(Record):
    """What the kernel holds for one process; ``stable``: two reads agreed on the wiring."""

    pid: int
    files: tuple[OpenFile, ...]
    vhost: tuple[VhostNet, ...]
    kvm: tuple[Kvm, ...]
    stable: bool

    def eventfd_fds(self, context: int | None) -> list[int]:
        """The process's eventfd fds on ``context`` (QEMU's numbers for it)."""
        if not context:
            return []
        return [f.fd for f in self.files if f.eventfd_id is not None and f.private_data == context]

    def fd_of_file(self, file: int | None) -> list[int]:
        """The process's fds on the struct file at ``file`` (a tap's backend socket's)."""
        return [f.fd for f in self.files if file and f.file == file]

    def wiring(self) -> tuple[object, ...]:
        """What two reads of a healthy VM must agree on: everything but progress, the rings'
        indices and the eventfds' counts (a kick eventfd counts the guest's kicks: one landing
        between the reads of a VM with traffic changes nothing of its wiring)."""
        files = tuple(f.replace(eventfd_count=None) for f in self.files)
        queues = tuple(
            (v.fd, v.memory_regions, v.worker_tid,
             tuple(q.replace(last_avail_idx=None, last_used_idx=None) for q in v.queues))
            for v in self.vhost
        )  # fmt: skip
        return files, queues, self.kvm


def _kernel_at_least(major: int, minor: int) -> bool:
    release = os.uname().release.split("-")[0].split(".")
    try:
        return (int(release[0]), int(release[1])) >= (major, minor)
    except (IndexError, ValueError):
        return False


def available(root: str = btf.BTF_ROOT) -> tuple[bool, str]:
    """Whether live reading can work here, and if not, why (one line)."""
    if os.geteuid() != 0:
        return False, "reading the kernel's state needs root (CAP_BPF and CAP_PERFMON)"
    if not _kernel_at_least(5, 8):
        return False, f"Linux {os.uname().release} has no BPF task_file iterator (needs 5.8)"
    if not os.path.exists(os.path.join(root, btf.VMLINUX)):
        return False, f"no {root}/vmlinux: the kernel lacks CONFIG_DEBUG_INFO_BTF"
    for module in ("vhost_net", "kvm"):
        # A loaded module without its BTF (CONFIG_DEBUG_INFO_BTF_MODULES off, or a module
        # built apart from the kernel) leaves its structures unknown. Only a loadable module
        # has an initstate; a built-in one's types are in vmlinux's BTF.
        if os.path.exists(f"/sys/module/{module}/initstate") and not os.path.exists(
            os.path.join(root, module)
        ):
            return False, f"module {module} has no BTF (CONFIG_DEBUG_INFO_BTF_MODULES)"
    try:
        with open(LOCKDOWN) as f:
            if "[confidentiality]" in f.read():
                return False, "kernel lockdown is confidentiality: BPF may not read the kernel"
    except OSError:
        pass  # no securityfs or no lockdown LSM: nothing locked down
    return True, ""


class _Writer:
    """Emits the program, with the offsets of one layout."""

    def __init__(self, found: btf.Layout) -> None:
        self.p = Program()
        self.fields = found.members
        self._labels = 0

    def has(self, path: str) -> bool:
        return self.fields.get(path) is not None

    def off(self, path: str) -> int:
        field = self.fields[path]
        assert field is not None, path
        return field.offset

    def size(self, path: str) -> int:
        field = self.fields[path]
        assert field is not None, path
        return field.size

    def label(self, what: str) -> str:
        self._labels += 1
        return f"{what}.{self._labels}"

    @staticmethod
    def slot(index: int) -> int:
        return _BASE + index * 8

    def zero(self, used: int = SLOTS) -> None:
        """Zero slots 0..used-1. The first record (FILE) zeroes them all, so the rest of the
        record is initialised stack; a later kind zeroes only the slots it uses, and
        `decode` reads no other."""
        for i in range(used):
            self.p.store_imm(DW, FP, self.slot(i), 0)

    def read(self, slot: int, src: int, offset: int, size: int = 8, string: bool = False) -> None:
        """slot = the ``size`` bytes at src + offset (zeros when that faults)."""
        self.read_at(self.slot(slot), src, offset, size, string)

    def read_at(
        self, where: int, src: int, offset: int, size: int = 8, string: bool = False
    ) -> None:
        """The stack at FP + where = the ``size`` bytes at src + offset."""
        p = self.p
        p.mov_reg(R3, src)
        p.alu(ADD, R3, offset)
        p.mov_reg(R1, FP)
        p.alu(ADD, R1, where)
        p.mov(R2, size)
        p.call(PROBE_READ_KERNEL_STR if string else PROBE_READ_KERNEL)

    def read_path(self, slot: int, src: int, path: str, string: bool = False) -> None:
        if self.has(path):
            self.read(slot, src, self.off(path), self.size(path), string)

    def get(self, reg: int, slot: int) -> None:
        self.p.load(DW, reg, FP, self.slot(slot))

    def header(self, kind: int, index: int = 0) -> None:
        """Slots 0 and 1 from the scratch fd and tgid."""
        p = self.p
        p.load(DW, R1, FP, _FD)
        p.alu(bpf.LSH, R1, 32)
        p.alu(bpf.OR, R1, kind)
        p.store(DW, FP, self.slot(0), R1)
        p.load(DW, R1, FP, _TGID)
        if index:
            p.mov(R2, index)
            p.alu(bpf.LSH, R2, 32)
            p.alu_reg(bpf.OR, R1, R2)
        p.store(DW, FP, self.slot(1), R1)

    def write(self, slots: int = SLOTS) -> None:
        """Write the record's first ``slots`` slots."""
        p = self.p
        p.load(DW, R1, FP, _SEQ)
        p.mov_reg(R2, FP)
        p.alu(ADD, R2, _BASE)
        p.mov(R3, slots * 8)
        p.call(SEQ_WRITE)

    def waiters(self, ctx_slot: int, first: int, count: int = MAX_WAITERS) -> None:
        """Slots first.. = the functions of the first ``count`` waiters on the eventfd
        context in ``ctx_slot``; the list node walked is kept in the scratch _WAITER."""
        if not (self.has("eventfd_ctx.wqh.head") and self.has("wait_queue_entry.func")):
            return
        p, done = self.p, self.label("waiters")
        head = self.off("eventfd_ctx.wqh.head")
        self.get(R9, ctx_slot)
        p.jump(JEQ, R9, 0, done)
        p.mov_reg(R3, R9)
        p.alu(ADD, R3, head + self.off("list_head.next"))
        p.mov_reg(R1, FP)
        p.alu(ADD, R1, _WAITER)
        p.mov(R2, 8)
        p.call(PROBE_READ_KERNEL)
        for i in range(count):
            p.load(DW, R7, FP, _WAITER)
            p.mov_reg(R2, R9)
            p.alu(ADD, R2, head)
            p.jump_reg(JEQ, R7, R2, done)  # back at the head: no more waiters
            p.jump(JEQ, R7, 0, done)
            p.alu(SUB, R7, self.off("wait_queue_entry.entry"))
            self.read(first + i, R7, self.off("wait_queue_entry.func"))
            p.mov_reg(R3, R7)
            p.alu(ADD, R3, self.off("wait_queue_entry.entry") + self.off("list_head.next"))
            p.mov_reg(R1, FP)
            p.alu(ADD, R1, _WAITER)
            p.mov(R2, 8)
            p.call(PROBE_READ_KERNEL)
        p.label(done)

    def chase(self, slot: int, steps: Sequence[tuple[int, int]], skip: str) -> None:
        """slot = follow pointers from R8: each step reads (offset, size) from the previous
        value, stopping at a NULL (left zero)."""
        p = self.p
        p.mov_reg(R9, R8)
        for n, (offset, size) in enumerate(steps):
            self.read(slot, R9, offset, size)
            if n < len(steps) - 1:
                self.get(R9, slot)
                p.store_imm(DW, FP, self.slot(slot), 0)
                p.jump(JEQ, R9, 0, skip)


def worker_model(found: btf.Layout) -> str:
    """How this kernel keeps vhost's worker, from its BTF."""
    f = found.members
    if f.get("vhost_net.vqs[0].vq.worker") is not None:
        return "vhost_task"  # per virtqueue, Linux >= 6.5 (kthread_task too, where present)
    if f.get("vhost_worker.vtsk") is not None:
        return "vhost_task"  # one per device, Linux 6.4
    return "kthread"


def program(
    found: btf.Layout, pids: Sequence[int], walk: Bounds | None = None,
    macvtap_major: int | None = None,
) -> Program:  # fmt: skip
    """The iterator program for processes ``pids`` with this kernel's offsets, walking KVM's
    lists as far as ``walk`` says (the hard caps when None); a char device of
    ``macvtap_major`` is read as a macvtap queue.

    :raises LiveUnavailable: this kernel's BTF lacks what every record needs.
    """
    missing = [path for path in REQUIRED if found.members.get(path) is None]
    if missing:
        raise LiveUnavailable(f"the kernel's BTF has no {', '.join(missing)}")
    w = _Writer(found)
    p = w.p
    p.mov_reg(R6, R1)
    p.load(DW, R7, R6, w.off("bpf_iter__task_file.file"))
    p.jump(JEQ, R7, 0, "out")  # the iterator's last call has no file
    p.load(DW, R8, R6, w.off("bpf_iter__task_file.task"))
    p.jump(JEQ, R8, 0, "out")
    p.load(W, R1, R6, w.off("bpf_iter__task_file.fd"))
    p.store(DW, FP, _FD, R1)
    p.load(DW, R1, R6, w.off("bpf_iter__task_file.meta"))
    p.load(DW, R1, R1, w.off("bpf_iter_meta.seq"))
    p.store(DW, FP, _SEQ, R1)
    p.store_imm(DW, FP, _TGID, 0)
    w.read_at(_TGID, R8, w.off("task_struct.tgid"), 4)
    p.load(DW, R1, FP, _TGID)
    # Older kernels ignore the link's pid filter (< 6.1), and one pass serves many pids.
    for pid in pids:
        p.jump(JEQ, R1, pid, "chosen")
    p.goto("out")
    p.label("chosen")
    if w.has("task_struct.files") and w.has("task_struct.group_leader"):
        # A thread that unshared its fd table (unshare(CLONE_FILES)) is visited with its own
        # table, whose numbers are not the process's: /proc/PID/fd, and so every fd number a
        # check names, is the group leader's table. Records carry the tgid alone, so a
        # thread's table would overwrite the leader's fds in the view; only tasks on the
        # leader's table are read. (Slots F_FILE and F_PRIVATE serve as scratch: FILE zeroes
        # them next.)
        w.read(F_FILE, R8, w.off("task_struct.files"))
        w.read(F_PRIVATE, R8, w.off("task_struct.group_leader"))
        w.get(R9, F_PRIVATE)
        w.read(F_PRIVATE, R9, w.off("task_struct.files"))
        w.get(R1, F_FILE)
        w.get(R2, F_PRIVATE)
        p.jump_reg(JNE, R1, R2, "out")
    # FILE: every file, for the fd <-> file and context mapping.
    w.zero()
    w.header(FILE)
    p.store(DW, FP, w.slot(F_FILE), R7)
    w.read_path(F_PRIVATE, R7, "file.private_data")
    w.read_path(F_INODE, R7, "file.f_inode")
    w.get(R9, F_INODE)
    p.jump(JEQ, R9, 0, "no_inode")
    w.read_path(F_RDEV, R9, "inode.i_rdev")
    w.read_path(F_MODE, R9, "inode.i_mode")
    p.label("no_inode")
    w.read_path(F_DENTRY, R7, "file.f_path.dentry")
    w.get(R9, F_DENTRY)
    p.jump(JEQ, R9, 0, "no_name")
    w.read_path(F_NAMEP, R9, "dentry.d_name.name")
    w.get(R9, F_NAMEP)
    p.jump(JEQ, R9, 0, "no_name")
    w.read(F_NAME, R9, 0, _NAME_BYTES, string=True)
    p.label("no_name")
    if w.has("inode.i_sb") and w.has("super_block.s_magic"):
        # F_NAMEP (not decoded) is scratch from here: the inode's super block, its magic.
        w.get(R9, F_INODE)
        p.jump(JEQ, R9, 0, "not_anon")
        w.read_path(F_NAMEP, R9, "inode.i_sb")
        w.get(R9, F_NAMEP)
        p.store_imm(DW, FP, w.slot(F_NAMEP), 0)
        p.jump(JEQ, R9, 0, "not_anon")
        w.read_path(F_NAMEP, R9, "super_block.s_magic")
        w.get(R1, F_NAMEP)
        p.jump(JEQ, R1, ANON_INODE_FS_MAGIC, "anon")
        p.label("not_anon")
        p.store_imm(DW, FP, w.slot(F_NAME), 0)
        p.label("anon")
    if w.has("eventfd_ctx.id"):
        w.get(R1, F_NAME)
        p.ld_imm64(R2, _EVENTFD_NAME)
        p.jump_reg(JNE, R1, R2, "not_eventfd")
        w.get(R9, F_PRIVATE)
        p.jump(JEQ, R9, 0, "not_eventfd")
        w.read_path(F_EVENTFD_ID, R9, "eventfd_ctx.id")
        w.read_path(F_EVENTFD_COUNT, R9, "eventfd_ctx.count")
        p.label("not_eventfd")
    if w.has("tun_file.tun") and w.has("tun_file.detached"):
        w.get(R1, F_MODE)
        p.alu(bpf.AND, R1, _S_IFMT)
        p.jump(JNE, R1, _S_IFCHR, "not_tun")
        w.get(R1, F_RDEV)
        p.jump(JNE, R1, TUN_RDEV, "not_tun")
        w.get(R9, F_PRIVATE)  # struct tun_file (tun_chr_open)
        p.jump(JEQ, R9, 0, "not_tun")
        w.read_path(F_TUN, R9, "tun_file.tun")
        w.read_path(F_TUN_DETACHED, R9, "tun_file.detached")
        p.label("not_tun")
    if macvtap_major is not None and w.has("tap_queue.tap") and w.has("tap_queue.enabled"):
        w.get(R1, F_MODE)
        p.alu(bpf.AND, R1, _S_IFMT)
        p.jump(JNE, R1, _S_IFCHR, "not_macvtap")
        w.get(R1, F_RDEV)
        p.alu(bpf.RSH, R1, _MINOR_BITS)
        p.jump(JNE, R1, macvtap_major, "not_macvtap")
        w.get(R9, F_PRIVATE)  # struct tap_queue (tap_open)
        p.jump(JEQ, R9, 0, "not_macvtap")
        w.read_path(F_TUN, R9, "tap_queue.tap")
        w.read_path(F_TUN_DETACHED, R9, "tap_queue.enabled")  # a bool: detached = !enabled
        w.get(R1, F_TUN_DETACHED)
        p.alu(bpf.XOR, R1, 1)
        p.store(DW, FP, w.slot(F_TUN_DETACHED), R1)
        p.label("not_macvtap")
    w.write(FILE_SLOTS)
    # Which file is it? Its device, or its anon inode name; FILE's slots are still there.
    w.get(R8, F_PRIVATE)
    p.jump(JEQ, R8, 0, "out")
    w.get(R1, F_NAME)
    p.ld_imm64(R2, _KVM_VM_NAME)
    p.jump_reg(JEQ, R1, R2, "kvm")
    w.get(R1, F_MODE)
    p.alu(bpf.AND, R1, _S_IFMT)
    p.jump(JNE, R1, _S_IFCHR, "out")
    w.get(R1, F_RDEV)
    p.jump(JNE, R1, VHOST_NET_RDEV, "out")
    _vhost(w)
    p.goto("out")
    p.label("kvm")
    _kvm(w, walk or Bounds(MAX_IOEVENTFDS, MAX_IRQFDS))
    p.label("out")
    p.mov(R0, 0)
    p.exit()
    return p


def _vhost(w: _Writer) -> None:
    """VQ records for the struct vhost_net in R8."""
    p = w.p
    model_per_vq = w.has("vhost_net.vqs[0].vq.worker")
    for i in range(VHOST_NET_VQS):
        vq = f"vhost_net.vqs[{i}].vq"
        w.zero()
        w.header(VQ, i)
        w.read_path(V_KICK_FILE, R8, f"{vq}.kick")
        w.get(R9, V_KICK_FILE)
        skip = w.label("no_kick")
        p.jump(JEQ, R9, 0, skip)
        w.read_path(V_KICK, R9, "file.private_data")
        w.waiters(V_KICK, V_WAITER0)
        p.label(skip)
        w.read_path(V_CALL, R8, f"{vq}.call_ctx.ctx")
        w.read_path(V_BACKEND, R8, f"{vq}.private_data")
        if w.has("socket.file"):
            w.get(R9, V_BACKEND)
            skip = w.label("no_backend")
            p.jump(JEQ, R9, 0, skip)
            w.read_path(V_BACKEND_FILE, R9, "socket.file")
            p.label(skip)
        w.read_path(V_POLL, R8, f"{vq}.poll.wait.func")
        w.read_path(V_FEATURES, R8, f"{vq}.acked_features")
        w.read_path(V_AVAIL, R8, f"{vq}.last_avail_idx")
        w.read_path(V_USED, R8, f"{vq}.last_used_idx")
        if w.has("vhost_net.dev.umem") and w.has("vhost_iotlb.nmaps"):
            skip = w.label("no_umem")
            w.chase(V_REGIONS, [(w.off("vhost_net.dev.umem"), 8),
                                (w.off("vhost_iotlb.nmaps"), 4)], skip)  # fmt: skip
            p.store_imm(DW, FP, w.slot(V_UMEM), 1)
            p.label(skip)
        _worker(w, vq if model_per_vq else None)
        w.write()


def _worker(w: _Writer, vq: str | None) -> None:
    """V_TID (and V_KTID) = the worker's tid(s), from the virtqueue's worker or the device's."""
    pid = (w.off("task_struct.pid"), 4)
    if vq is not None:
        start = (w.off(f"{vq}.worker"), 8)
    elif w.has("vhost_net.dev.worker"):
        start = (w.off("vhost_net.dev.worker"), 8)
    else:
        return
    if vq is None and not w.has("vhost_worker.vtsk"):
        skip = w.label("no_worker")
        w.chase(V_TID, [start, pid], skip)  # 6.1: a task_struct
        w.p.label(skip)
        return
    if w.has("vhost_worker.vtsk") and w.has("vhost_task.task"):
        skip = w.label("no_worker")
        w.chase(V_TID, [start, (w.off("vhost_worker.vtsk"), 8),
                        (w.off("vhost_task.task"), 8), pid], skip)  # fmt: skip
        w.p.label(skip)
    if w.has("vhost_worker.kthread_task"):
        skip = w.label("no_kthread")
        w.chase(V_KTID, [start, (w.off("vhost_worker.kthread_task"), 8), pid], skip)
        w.p.label(skip)


def _walk(
    w: _Writer, head_path: str, node_path: str, kind: int, limit: int, fill: Sequence[str],
    next_slot: int, slots: int, waiters: tuple[int, int, int] | None = None,
    copy: tuple[int, int] = (0, 0),
) -> None:  # fmt: skip
    """Records of ``kind`` (``slots`` long) for the first ``limit`` entries of the list at
    R8 + head_path whose entries link through ``node_path``; a TRUNCATED record when there
    are more.

    Each entry's ``fill`` members go to slots 2.., one read each; with ``copy`` (offset,
    size), those bytes of the entry go to slot 2 on in one read instead (decoded in Python by
    the same offsets), which keeps a long list's program short."""
    if not (w.has(head_path) and w.has(node_path)):
        return
    p, done = w.p, w.label("walked")
    head, node = w.off(head_path), w.off(node_path)
    struct_name = node_path.split(".")[0]
    w.read(next_slot, R8, head + w.off("list_head.next"))
    w.get(R1, next_slot)
    p.store(DW, FP, _NODE, R1)
    for index in range(limit):
        p.load(DW, R9, FP, _NODE)
        p.mov_reg(R2, R8)
        p.alu(ADD, R2, head)
        p.jump_reg(JEQ, R9, R2, done)
        p.jump(JEQ, R9, 0, done)
        p.alu(SUB, R9, node)
        if copy[1]:  # the whole record was zeroed by FILE; this kind's slots are all written
            w.header(kind, index)
            w.read(2, R9, copy[0], copy[1])
        else:
            used = next_slot if waiters is None else max(next_slot, waiters[1] + waiters[2])
            w.zero(used + 1)
            w.header(kind, index)
            for slot, member in enumerate(fill, start=2):
                w.read_path(slot, R9, f"{struct_name}.{member}")
        w.read(next_slot, R9, node + w.off("list_head.next"))
        w.get(R1, next_slot)
        p.store(DW, FP, _NODE, R1)
        if waiters is not None:
            w.waiters(*waiters)
        w.write(slots)
    p.load(DW, R9, FP, _NODE)  # exactly ``limit`` entries: the next node is the head
    p.mov_reg(R2, R8)
    p.alu(ADD, R2, head)
    p.jump_reg(JEQ, R9, R2, done)
    w.zero(TRUNCATED_SLOTS)
    w.header(TRUNCATED, kind)
    w.write(TRUNCATED_SLOTS)
    p.label(done)


def _kvm(w: _Writer, walk: Bounds) -> None:
    """IOEVENTFD and IRQFD records for the struct kvm in R8."""
    walk = fitted(w.fields, walk)
    copy = _ioeventfd_copy(w.fields)
    _walk(w, "kvm.ioeventfds", "_ioeventfd.list", IOEVENTFD, walk.ioeventfds, (), IO_NEXT,
          _ioeventfd_slots(copy), copy=copy)  # fmt: skip
    _walk(w, "kvm.irqfds.items", "kvm_kernel_irqfd.list", IRQFD, walk.irqfds,
          ("gsi", "eventfd"), IRQ_NEXT, IRQ_SLOTS,
          (IRQ_EVENTFD, IRQ_WAITER0, MAX_IRQ_WAITERS))  # fmt: skip


def fitted(members: dict[str, btf.Field | None], walk: Bounds) -> Bounds:
    """``walk``, cut where one kvm-vm file's records (its FILE, every entry, two TRUNCATED)
    would not fit the iterator's buffer with this kernel's layout; the irqfds, fewer, first."""
    io_bytes = _ioeventfd_slots(_ioeventfd_copy(members)) * 8
    room = SEQ_BUFFER - (FILE_SLOTS + 2 * TRUNCATED_SLOTS) * 8
    irqfds = min(walk.irqfds, room // (IRQ_SLOTS * 8))
    ioeventfds = min(walk.ioeventfds, (room - irqfds * IRQ_SLOTS * 8) // io_bytes)
    return Bounds(ioeventfds, irqfds)


def _ioeventfd_copy(members: dict[str, btf.Field | None]) -> tuple[int, int]:
    """Where in struct _ioeventfd the members read start, and how many bytes they span.

    :raises LiveUnavailable: more than a record holds (no kernel so far comes close).
    """
    found = [f for m in IOEVENTFD_MEMBERS if (f := members.get(f"_ioeventfd.{m}"))]
    start = min((f.offset for f in found), default=0)
    span = max((f.offset + f.size for f in found), default=0) - start
    if span > (IO_NEXT - IO_COPY) * 8:
        raise LiveUnavailable(f"struct _ioeventfd's members span {span} bytes, more than read")
    return start, span


def _tun_queue(
    mode: int,
    rdev: int,
    private: int,
    tun: int,
    detached: int,
    found: btf.Layout,
    macvtap_major: int | None = None,
) -> TunQueue | None:
    """OpenFile.tun_queue from a FILE record's slots (a tun or, of ``macvtap_major``, a
    macvtap queue; ``tun``: its device, ``detached``: the program's flag)."""
    f = found.members
    if mode & _S_IFMT != _S_IFCHR or not private:
        return None
    if rdev == TUN_RDEV:
        known = f.get("tun_file.tun") and f.get("tun_file.detached")
    elif macvtap_major is not None and rdev >> _MINOR_BITS == macvtap_major:
        known = f.get("tap_queue.tap") and f.get("tap_queue.enabled")
    else:
        return None
    if not known:
        return None
    # A detached queue keeps its tun pointer (__tun_detach without clean); the deletion of
    # the device clears it on every queue, detached ones included (tun_detach_all). So for
    # a macvtap: tap_disable_queue keeps q->tap, tap_del_queues clears it.
    if not tun:
        return TUN_GONE
    return TUN_DETACHED if detached else TUN_ATTACHED


def _ioeventfd_slots(copy: tuple[int, int]) -> int:
    return IO_COPY + -(-copy[1] // 8)


def _member(
    raw: bytes, members: dict[str, btf.Field | None], path: str, start: int = 0
) -> int | None:
    """A member of a struct whose bytes from ``start`` on were copied whole into ``raw``;
    None where this kernel has none."""
    field = members.get(path)
    if field is None:
        return None
    at = field.offset - start
    return int.from_bytes(raw[at : at + field.size], "little")


def _in_order(entries: dict[int, _T]) -> tuple[_T, ...]:
    return tuple(entry for _, entry in sorted(entries.items()))


def _opt(value: int, present: bool) -> int | None:
    return value if present else None


def _records(data: bytes, sizes: dict[int, int]) -> Iterator[tuple[int, ...]]:
    """Each record's slots, padded with zeros to SLOTS.

    :raises LiveUnavailable: the output is not whole records, or a kind is unknown.
    """
    at = 0
    while at < len(data):
        if len(data) - at < 8:
            raise LiveUnavailable(f"BPF iterator wrote {len(data)} bytes, not whole records")
        kind = int.from_bytes(data[at : at + 4], "little")
        if kind not in sizes:
            raise LiveUnavailable(f"BPF iterator wrote a record of unknown kind {kind}")
        n = sizes[kind]
        if at + n * 8 > len(data):
            raise LiveUnavailable(f"BPF iterator wrote {len(data)} bytes, not whole records")
        yield struct.unpack_from(f"<{n}Q", data, at) + (0,) * (SLOTS - n)
        at += n * 8


def decode(
    data: bytes, found: btf.Layout, walk: Bounds | None = None,
    macvtap_major: int | None = None,
) -> dict[int, KernelView]:  # fmt: skip
    """The records an iterator wrote, by process (``stable`` left True); ``walk``: the
    program's bounds, kept in each Kvm; ``macvtap_major``: the program's.

    :raises LiveUnavailable: the output is not whole records.
    """
    f = found.members
    copy = _ioeventfd_copy(f)
    sizes = {FILE: FILE_SLOTS, VQ: SLOTS, IOEVENTFD: _ioeventfd_slots(copy), IRQFD: IRQ_SLOTS,
             TRUNCATED: TRUNCATED_SLOTS}  # fmt: skip
    per_vq = f.get("vhost_net.vqs[0].vq.worker") is not None
    model = worker_model(found)
    files: dict[int, dict[int, OpenFile]] = {}
    vqs: dict[tuple[int, int], dict[int, Virtqueue]] = {}
    devices: dict[tuple[int, int], tuple[int | None, int | None, int, int]] = {}
    # By list position: the iterator may visit a process's files once per thread sharing
    # them (seen on 6.1 with the link's pid filter), so a position seen again is a repeat.
    ios: dict[tuple[int, int], dict[int, IoEventFd]] = {}
    irqs: dict[tuple[int, int], dict[int, IrqFd]] = {}
    truncated: set[tuple[int, int]] = set()
    for s in _records(data, sizes):
        kind, fd = s[0] & 0xFFFFFFFF, s[0] >> 32
        tgid, index = s[1] & 0xFFFFFFFF, s[1] >> 32
        key = (tgid, fd)
        if kind == FILE:
            name = s[F_NAME].to_bytes(8, "little").split(b"\0")[0].decode(errors="replace")
            # An O_PATH file on an eventfd (reopened through /proc/self/fd) has the name and
            # no context: the program read no id for it.
            is_eventfd = (
                name == "[eventf" and bool(s[F_PRIVATE]) and f.get("eventfd_ctx.id") is not None
            )
            files.setdefault(tgid, {})[fd] = OpenFile(
                fd, s[F_FILE], s[F_PRIVATE], s[F_RDEV], name,
                s[F_EVENTFD_ID] & 0xFFFFFFFF if is_eventfd else None,
                s[F_EVENTFD_COUNT] if is_eventfd and f.get("eventfd_ctx.count") else None,
                _tun_queue(s[F_MODE], s[F_RDEV], s[F_PRIVATE], s[F_TUN], s[F_TUN_DETACHED],
                           found, macvtap_major),
            )  # fmt: skip
        elif kind == VQ:
            vq = f"vhost_net.vqs[{index}].vq"
            waiters = tuple(w for w in s[V_WAITER0 : V_WAITER0 + MAX_WAITERS] if w)
            tid = s[V_TID] or s[V_KTID] or None
            vqs.setdefault(key, {})[index] = Virtqueue(
                index, s[V_KICK] or None, waiters, s[V_CALL] or None,
                s[V_BACKEND_FILE] or None,
                _opt(s[V_FEATURES], f.get(f"{vq}.acked_features") is not None),
                _opt(s[V_AVAIL], f.get(f"{vq}.last_avail_idx") is not None),
                _opt(s[V_USED], f.get(f"{vq}.last_used_idx") is not None),
                tid if per_vq else None,
                s[V_POLL] or None,
            )  # fmt: skip
            kthread = bool(s[V_KTID]) and not s[V_TID]
            devices[key] = (
                s[V_REGIONS] if s[V_UMEM] else None,
                None if per_vq else (s[V_TID] or None),
                fd, int(kthread),
            )  # fmt: skip
        elif kind == IOEVENTFD:
            raw = struct.pack(f"<{IO_NEXT - IO_COPY}Q", *s[IO_COPY:IO_NEXT])
            at = copy[0]
            ios.setdefault(key, {})[index] = IoEventFd(
                _member(raw, f, "_ioeventfd.addr", at) or 0,
                _member(raw, f, "_ioeventfd.length", at) or 0,
                None if _member(raw, f, "_ioeventfd.wildcard", at) else
                _member(raw, f, "_ioeventfd.datamatch", at),
                _member(raw, f, "_ioeventfd.eventfd", at) or 0,
                _member(raw, f, "_ioeventfd.bus_idx", at),
            )  # fmt: skip
        elif kind == IRQFD:
            waiters = tuple(w for w in s[IRQ_WAITER0 : IRQ_WAITER0 + MAX_IRQ_WAITERS] if w)
            irqs.setdefault(key, {})[index] = IrqFd(
                s[IRQ_GSI] & 0xFFFFFFFF, s[IRQ_EVENTFD], waiters
            )
        elif kind == TRUNCATED:
            truncated.add(key)
    views: dict[int, KernelView] = {}
    for tgid, by_fd in files.items():
        vhost = tuple(
            VhostNet(fd, tuple(q for _, q in sorted(vqs[(tgid, fd)].items())), regions, tid,
                     "kthread_task" if kthread else model)
            for (t, fd), (regions, tid, _, kthread) in sorted(devices.items()) if t == tgid
        )  # fmt: skip
        kvm = tuple(
            Kvm(fd, _in_order(ios.get((tgid, fd), {})), _in_order(irqs.get((tgid, fd), {})),
                (tgid, fd) not in truncated, walk)
            for fd, file in sorted(by_fd.items()) if file.kind == "kvm-vm"
        )  # fmt: skip
        views[tgid] = KernelView(tgid, tuple(v for _, v in sorted(by_fd.items())), vhost, kvm, True)
    return views


def layout(root: str = btf.BTF_ROOT, cache_dir: str | None = btf.CACHE_DIR) -> btf.Layout:
    """This kernel's offsets for the program (cached per boot).

    :raises LiveUnavailable: no BTF, or the iterator's function is not in it.
    """
    found = btf.layout(PATHS, (ITERATOR,), MODULES, root, cache_dir)
    if found.funcs.get(ITERATOR) is None:
        raise LiveUnavailable(f"the kernel's BTF has no {ITERATOR}: no task_file iterator")
    return found


def read(
    pids: Sequence[int], root: str = btf.BTF_ROOT, cache_dir: str | None = btf.CACHE_DIR,
    held: Mapping[int, int] | None = None,
) -> dict[int, KernelView]:  # fmt: skip
    """What the kernel holds for each of ``pids`` now (a pid with no open file, or gone, is
    left out), read twice; ``stable`` False where the two reads disagreed on the wiring.

    KVM's lists are walked as far as the processes' eventfds allow (`bounds`): ``held``
    gives each pid's count where the caller has just read it, else it is counted here.

    :raises LiveUnavailable: not possible here (`available`'s reasons, or BTF lacking).
    :raises BpfRefused: the kernel refused the program (message: the verifier's verdict).
    """
    ok, why = available(root)
    if not ok:
        raise LiveUnavailable(why)
    found = layout(root, cache_dir)
    func = found.funcs[ITERATOR]
    assert func is not None
    chosen = sorted(set(pids))
    macvtap = procfs.char_major(procfs.MACVTAP_DRIVER)
    views: dict[int, KernelView] = {}
    for start in range(0, len(chosen), MAX_PIDS):
        chunk = chosen[start : start + MAX_PIDS]
        counts = [held[pid] if held and pid in held else eventfds(pid) for pid in chunk]
        walk = fitted(found.members, bounds(max(counts)))
        prog = program(found, chunk, walk, macvtap)
        # One pid: the link's filter (Linux >= 6.1) spares the walk over every task.
        runs = [chunk[0]] * 2 if len(chunk) == 1 else [None, None]
        first, second = (decode(out, found, walk, macvtap) for out in bpf.iterate(prog, func, runs))
        views.update(compared(first, second))
    return views


def compared(first: dict[int, KernelView], second: dict[int, KernelView]) -> dict[int, KernelView]:
    """The first read's views, ``stable`` only where the second read agrees on the wiring."""
    return {
        pid: view.replace(stable=pid in second and second[pid].wiring() == view.wiring())
        for pid, view in first.items()
    }
