"""What /proc says about a process: command line, fds with their fdinfo, threads, vhost workers.

Every reader takes the /proc root as an argument, so trees recorded on real
systems can drive the tests of what is built on top (a process that vanishes
midway is reported as gone, never as a traceback).
"""

from __future__ import annotations

import os

# The error raised here, also importable from here (the tree is in vhostorch.errors).
from vhostorch.errors import CannotInspect as CannotInspect
from vhostorch.errors import TooManyFds as TooManyFds
from vhostorch.record import TYPE_CHECKING, Record

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

PROC = "/proc"
SYS = "/sys"
VHOST_NET = "/dev/vhost-net"
TUN = "/dev/net/tun"
KVM = "/dev/kvm"
KVM_VM = "anon_inode:kvm-vm"
EVENTFD = "anon_inode:[eventfd]"
ANON_INODE = "anon_inode:"
# A char device fd is known by its device number, never by the path readlink shows: that
# path is the file's name in QEMU's mount namespace, as seen from ours. A QEMU run as
# container runtimes run it (KubeVirt's virt-launcher: its own mount namespace, a private
# /dev of mknod'ed nodes) shows /dev/net/tun as "/root/dev/net/tun" or any other name;
# stat() of /proc/PID/fd/N follows the magic link to the open inode itself, whatever
# namespace it was opened in. tun, vhost-net and kvm are misc devices with fixed minors
# (include/linux/miscdevice.h: TUN_MINOR 200, VHOST_NET_MINOR 238, KVM_MINOR 232).
MISC_MAJOR = 10
_MISC = {200: TUN, 238: VHOST_NET, 232: KVM}
# A macvtap queue: drivers/net/tap.c names each macvtap's character device
# "tap<ifindex>" (device_create(..., "tap%d", dev->ifindex)), and libvirt opens it by
# that name (virNetDevMacVLanTapOpen), once per queue. Its fdinfo has no iff: line
# (tap.c has no show_fdinfo; seen on Linux 6.1: pos, flags, mnt_id, ino only), so the
# link is known by its ifindex alone (tests/fixtures/observations/direct-*.json). Its
# major is dynamic (alloc_chrdev_region, "macvtap" in /proc/devices) and its minor is
# no ifindex: the ifindex is the kernel's name for the device, /sys/dev/char/MAJ:MIN's.
MACVTAP_PREFIX = "/dev/tap"
MACVTAP_DRIVER = "macvtap"


class Fd(Record):
    """One open file of a process: its number, what readlink shows, its fdinfo lines, and
    ``device``: what it is, known by device number (TUN, VHOST_NET, KVM, or
    ``/dev/tap<ifindex>`` for a macvtap queue) or anon inode name (namespace-independent);
    None for anything else, an O_PATH fd on any of them included (`path_only`)."""

    num: int
    target: str
    info: dict[str, str]
    device: str | None = None

    @property
    def tap(self) -> str | None:
        """The tap this /dev/net/tun fd is attached to (fdinfo ``iff:``), if any."""
        return self.info.get("iff") if self.device == TUN else None

    @property
    def macvtap_index(self) -> int | None:
        """The ifindex of the macvtap link this fd is a queue of, if it is one."""
        return tap_index(self.device or "", MACVTAP_PREFIX)


def tap_index(name: str, prefix: str) -> int | None:
    """N of a name ``prefix`` + N (decimal digits only), else None."""
    index = name.removeprefix(prefix)
    if index == name or not (index.isascii() and index.isdigit()):
        return None
    return int(index)


class Thread(Record):
    tid: int
    comm: str


class Process(Record):
    """A snapshot of one process as /proc shows it."""

    pid: int
    comm: str
    argv: tuple[str, ...]
    fds: tuple[Fd, ...]
    threads: tuple[Thread, ...]
    start_ticks: int

    def fds_to(self, device: str) -> list[Fd]:
        """The fds that are ``device`` (TUN, VHOST_NET, KVM, an anon inode name)."""
        return [fd for fd in self.fds if fd.device == device]

    def fd(self, num: int) -> Fd | None:
        for fd in self.fds:
            if fd.num == num:
                return fd
        return None


def read_text(path: str) -> str:
    """A /proc, /sys or cgroup file's text, bytes that are not UTF-8 replaced."""
    with open(path, errors="replace") as f:
        return f.read()


def parse_fdinfo(text: str) -> dict[str, str]:
    """``key: value`` lines; repeated keys (epoll ``tfd:``) keep their first value."""
    info: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key not in info:
            info[key.strip()] = value.strip()
    return info


# fdinfo is read only for the fds whose identity lives there.
_FDINFO_FOR = (TUN, EVENTFD, VHOST_NET, KVM_VM)
# An fd opened with O_PATH holds a name, not an open device: open(2) with O_PATH needs only
# search permission on the directories, never permission on the node, and calls no driver's
# open (fs/open.c do_dentry_open: f_op = empty_fops, no private_data), so it can do no ioctl.
# Any user may hold one on /dev/vhost-net, /dev/net/tun or /dev/kvm (or, through
# /proc/self/fd, on an eventfd or a kvm-vm of its own); its fdinfo ``flags:`` (the file's
# f_flags, in octal) has O_PATH: os.O_PATH is this architecture's value (010000000 on x86
# and arm64), the one the kernel prints here.
O_PATH = os.O_PATH


def path_only(info: dict[str, str]) -> bool:
    """Whether fdinfo ``info`` is an O_PATH fd's (False when it has no ``flags:`` line, as
    recordings may lack it)."""
    flags = info.get("flags", "")
    try:
        return bool(int(flags, 8) & O_PATH)
    except ValueError:
        return False


def wants_fdinfo(device: str | None) -> bool:
    """Whether the fdinfo of an fd that is ``device`` (Fd.device) is read (and recorded)."""
    return device in _FDINFO_FOR or tap_index(device or "", MACVTAP_PREFIX) is not None


# The filesystems a device node is stat()ed on: those whose getattr never waits on another
# process or host. A QEMU (or a look-alike an unprivileged user runs) may hold a file on
# FUSE, whose daemon it controls, or on NFS: stat() of such an fd can block for ever.
# Device nodes live on devtmpfs (the host's /dev) or tmpfs (a container's private /dev).
LOCAL_FS = frozenset({"devtmpfs", "tmpfs", "ramfs", "ext2", "ext3", "ext4", "xfs", "btrfs"})


class CharDevices:
    """The device number of a char device fd of a process (None: not one, an O_PATH fd
    (a node's name held, no device opened: `path_only`), on a filesystem not in LOCAL_FS or
    on a mount neither its namespace nor ours has, or closed meanwhile), read from the file
    itself."""

    def __init__(self, proc: str = PROC) -> None:
        self.proc = proc
        self._own: dict[int, str] | None = None
        self._mounts: dict[int, dict[int, str]] = {}

    def __call__(self, pid: int, fd: str) -> int | None:
        """Raises PermissionError when the fd may not be followed."""
        found = self.file(pid, fd)
        return found[0] if found is not None else None

    def file(self, pid: int, fd: str) -> tuple[int | None, dict[str, str]] | None:
        """fd ``fd``'s device number (None: not a char device) and its fdinfo, both of one
        file; None as for ``__call__``, or when the fd named another file meanwhile.

        The process may swap what fd N is while it is read (dup2 of an O_PATH fd on the
        node, then of a real open of /dev/null, in a loop: a look-alike QEMU's vhost fd
        passed 3 times in 12, the fresh attack's re-attack), so the fdinfo kept is read
        after the stat and must name the inode stat saw (``ino:``, Linux >= 5.14; before
        it, the same mount and flags as the fdinfo read before the stat). Raises
        PermissionError when the fd may not be followed."""
        import stat

        base = f"{self.proc}/{pid}"
        try:
            before = parse_fdinfo(read_text(f"{base}/fdinfo/{fd}"))
            if path_only(before):
                return None
            mnt = before.get("mnt_id", "")
            if self._fs_types(pid).get(int(mnt) if mnt.isdigit() else -1) not in LOCAL_FS:
                return None
            # stat() follows the magic link to the open inode, in whatever mount namespace.
            st = os.stat(f"{base}/fd/{fd}")
            after = parse_fdinfo(read_text(f"{base}/fdinfo/{fd}"))
        except FileNotFoundError:
            return None
        if path_only(after) or after.get("mnt_id") != mnt:
            return None
        if "ino" in after:
            if after["ino"] != str(st.st_ino):
                return None
        elif after.get("flags") != before.get("flags"):
            return None
        return (st.st_rdev if stat.S_ISCHR(st.st_mode) else None), after

    def _fs_types(self, pid: int) -> dict[int, str]:
        """Mount id -> filesystem type, for the mounts of ``pid``'s mount namespace, ours and
        the host's (PID 1's).

        Mount ids are unique across namespaces. A fd another process opened and passed
        (libvirtd opens the taps and /dev/vhost-net in the host's namespace for a QEMU in
        its own) is on a mount of the opener's namespace: the host's. Ours is not always
        the host's: a systemd service with ProtectSystem=, PrivateTmp= and their kin runs in
        a namespace of its own, where a domain's tap fd was on no known mount and the
        check said "?" (nic.tap.fds failed on a healthy domain).
        """
        if pid not in self._mounts:
            if self._own is None:
                self._own = {
                    **_mount_types(f"{self.proc}/1/mountinfo"),
                    **_mount_types(f"{self.proc}/self/mountinfo"),
                }
            self._mounts[pid] = {**self._own, **_mount_types(f"{self.proc}/{pid}/mountinfo")}
        return self._mounts[pid]


def open_regular(pid: int, fd: int, proc: str = PROC) -> int | None:
    """A descriptor of our own on the regular file that fd ``fd`` of ``pid`` is (read-only,
    O_NONBLOCK), or None when it is not a regular file on a LOCAL_FS filesystem, or is gone.

    Opened through /proc's magic link: the very file the process holds, whatever path its
    mount namespace shows and whatever was since put at that path (a file in a directory
    the QEMU user writes may have become a symlink or a FIFO). A FIFO or device is refused
    from its stat before any open (a FIFO's open for reading waits for a writer), and the
    fstat after the open refuses one swapped in meanwhile by the process itself (dup2).
    """
    import stat

    base = f"{proc}/{pid}"
    try:
        mnt = parse_fdinfo(read_text(f"{base}/fdinfo/{fd}")).get("mnt_id", "")
        mount_id = int(mnt) if mnt.isdigit() else -1
        ours = _mount_types(f"{proc}/self/mountinfo")
        kind = ours.get(mount_id) or _mount_types(f"{base}/mountinfo").get(mount_id)
        # An overlay (a container's or the test host's root) reaches its layers' filesystems:
        # trusted only when it is a mount of our own namespace, which root made, not one
        # of the process's (its user may stack one on a FUSE of its own).
        if kind not in LOCAL_FS and not (kind == "overlay" and mount_id in ours):
            return None
        before = os.stat(f"{base}/fd/{fd}")
        if not stat.S_ISREG(before.st_mode):
            return None
        own = os.open(f"{base}/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None
    after = os.fstat(own)
    if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino):
        os.close(own)
        return None
    return own


def _mount_types(path: str) -> dict[int, str]:
    """Mount id -> filesystem type, from a mountinfo file ({} when it is gone)."""
    found: dict[int, str] = {}
    try:
        text = read_text(path)
    except FileNotFoundError:
        return found
    for line in text.splitlines():
        # ID PARENT MAJ:MIN ROOT POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER
        head, sep, tail = line.partition(" - ")
        mount_id = head.split(" ", 1)[0]
        if sep and mount_id.isdigit() and tail:
            found[int(mount_id)] = tail.split(" ", 1)[0]
    return found


def char_major(driver: str, proc: str = PROC) -> int | None:
    """The major number of character device driver ``driver`` (/proc/devices), if loaded."""
    try:
        text = read_text(f"{proc}/devices")
    except OSError:
        return None
    chars = text.split("Block devices:")[0]
    for line in chars.splitlines():
        number, _, name = line.strip().partition(" ")
        if name.strip() == driver and number.isdigit():
            return int(number)
    return None


def identify(
    target: str, number: int | None, macvtap_major: int | None, sys: str = SYS
) -> str | None:
    """What an fd is (see Fd.device), from readlink's ``target`` and the device number of
    the char device it is (None: not one); ``sys`` is sysfs's root."""
    if target.startswith(ANON_INODE):
        return target
    if number is None:
        return None
    major, minor = os.major(number), os.minor(number)
    if major == MISC_MAJOR:
        return _MISC.get(minor)
    if macvtap_major is not None and major == macvtap_major:
        # The kernel's name for the device (tap<ifindex>); the node's own name in QEMU's
        # /dev only when sysfs does not say (no sysfs, or a replayed recording).
        try:
            name = os.path.basename(os.readlink(f"{sys}/dev/char/{major}:{minor}"))
        except OSError:
            name = os.path.basename(target)
        index = tap_index(name, "tap")
        return None if index is None else f"{MACVTAP_PREFIX}{index}"
    return None


# The most fds one process's read takes (about 27 us each here: 1.8 s). A QEMU holds hundreds
# to a few thousand; any user's look-alike may hold as many as its limit allows (524,288 under
# systemd's default: 14 s, past what check --all has in the metrics unit).
MAX_FDS = 65_536


def read(
    pid: int,
    proc: str = PROC,
    *,
    max_fds: int = MAX_FDS,
    char: Callable[[int, str], int | None] | None = None,
    sys: str = SYS,
) -> Process:
    """Read process ``pid``. Raises CannotInspect (no such process, or not allowed to look).

    ``char`` gives the device number of fd N of ``pid`` (CharDevices(proc) if None; a
    recording's table in replays), ``sys`` is sysfs's root (a macvtap queue's ifindex).
    """
    base = f"{proc}/{pid}"
    try:
        argv = tuple(read_text(f"{base}/cmdline").split("\0"))
        comm = read_text(f"{base}/comm").strip()
        stat = read_text(f"{base}/stat")
        names = os.listdir(f"{base}/fd")
    except FileNotFoundError:
        raise CannotInspect(f"no process {pid}") from None
    except PermissionError:
        raise CannotInspect(f"not allowed to read the fds of process {pid} (run as root)") from None
    if len(names) > max_fds:
        raise TooManyFds(
            f"process {pid} holds {len(names)} fds, more than the {max_fds} vhostorch reads "
            "of one process: not read"
        )
    if argv and argv[-1] == "":
        argv = argv[:-1]
    if not argv:
        raise CannotInspect(f"process {pid} is a kernel thread or a zombie, not a QEMU")
    # Field 22 (starttime) follows the parenthesised comm, which may itself hold spaces.
    start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
    macvtap = char_major(MACVTAP_DRIVER, proc)
    live = CharDevices(proc) if char is None else None
    fds = []
    for name in names:
        try:
            target = os.readlink(f"{base}/fd/{name}")
            number, checked = None, None
            # Sockets, pipes and anon inodes show no path: no device node to stat.
            if target.startswith("/") and live is not None:
                # The fdinfo of the very file whose number it is (CharDevices.file).
                number, checked = live.file(pid, name) or (None, None)
            elif target.startswith("/") and char is not None:
                number = char(pid, name)
            device = identify(target, number, macvtap, sys)
            if not wants_fdinfo(device):
                info = {}
            elif checked is not None:
                info = checked
            else:
                info = parse_fdinfo(read_text(f"{base}/fdinfo/{name}"))
            if path_only(info):
                # No device at all (an anon inode reopened O_PATH through /proc, or a
                # recording's table, which gives the number whatever the fd's flags).
                device, info = None, {}
        except FileNotFoundError:
            continue  # closed while we looked
        except PermissionError:
            # Root may list a process's fds and still not follow them (another user
            # namespace's init, say).
            raise CannotInspect(f"not allowed to read the fds of process {pid}") from None
        fds.append(Fd(int(name), target, info, device))
    fds.sort(key=lambda fd: fd.num)
    return Process(pid, comm, argv, tuple(fds), tuple(threads(pid, proc)), start_ticks)


def start_time(pid: int, proc: str = PROC) -> int | None:
    """Field 22 of /proc/PID/stat, the start time in clock ticks after boot (after the
    command name, which may hold spaces): with the pid, it names one process. None: gone."""
    try:
        return int(read_text(f"{proc}/{pid}/stat").rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def boot_ticks() -> int:
    """Now, in the clock ticks after boot that start_time counts."""
    import time

    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * os.sysconf("SC_CLK_TCK"))


def threads(pid: int, proc: str = PROC) -> Iterator[Thread]:
    base = f"{proc}/{pid}/task"
    try:
        tids = sorted(int(t) for t in os.listdir(base))
    except FileNotFoundError:
        return
    for tid in tids:
        try:
            yield Thread(tid, read_text(f"{base}/{tid}/comm").strip())
        except FileNotFoundError:
            continue


def vhost_kthreads(proc: str = PROC) -> dict[str, list[int]]:
    """Kernel threads named ``vhost-*``, by name (read once for any number of QEMUs)."""
    found: dict[str, list[int]] = {}
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        try:
            comm = read_text(f"{proc}/{entry}/comm").strip()
            # Kernel threads have an empty command line, but so has a zombie, whose name any
            # user sets (PR_SET_NAME "vhost-<a QEMU's pid>", then exit): the kernel's flag.
            if not comm.startswith("vhost-") or read_text(f"{proc}/{entry}/cmdline"):
                continue
            if not is_kthread(read_text(f"{proc}/{entry}/stat")):
                continue
        except (FileNotFoundError, ProcessLookupError):
            continue
        found.setdefault(comm, []).append(int(entry))
    return found


PF_KTHREAD = 0x00200000  # include/linux/sched.h


def is_kthread(stat: str) -> bool:
    """Whether /proc/PID/stat's ``stat`` is a kernel thread's (field 9, flags, has PF_KTHREAD)."""
    try:
        return bool(int(stat.rsplit(")", 1)[1].split()[6]) & PF_KTHREAD)
    except (IndexError, ValueError):
        return False


def vhost_workers(process: Process, kthreads: dict[str, list[int]]) -> tuple[str, list[int]]:
    """The vhost workers of a QEMU: ("kthread", tids) or ("task", tids).

    Before Linux 6.4 each vhost device's worker is a kernel thread named
    ``vhost-<owner pid>`` (empty cmdline, its own /proc/<pid>); from 6.4 on it is
    a vhost_task inside the owner's own thread group, with the same name, listed
    in /proc/<owner>/task only. Both are looked for; the test host proves each
    (Debian's 6.1 and 6.12, tests/fixtures/observations/*-linux-6.12.json).
    Other user workers may share the thread group on new kernels (6.12's QEMU
    also has KVM's ``kvm-nx-lpage-re``); only the vhost name counts.
    """
    name = f"vhost-{process.pid}"[:15]  # comm is at most 15 bytes
    own = [t.tid for t in process.threads if t.comm == name]
    if own:
        return "task", own
    return "kthread", sorted(kthreads.get(name, []))


def program(pid: int | str, proc: str = PROC) -> str:
    """The basename of what ``pid`` runs ("" when it cannot be read)."""
    try:
        return os.path.basename(os.readlink(f"{proc}/{pid}/exe")).removesuffix(" (deleted)")
    except OSError:
        try:
            return os.path.basename(read_text(f"{proc}/{pid}/cmdline").split("\0")[0])
        except OSError:
            return ""


def is_qemu(program: str) -> bool:
    return program.startswith("qemu-system-") or program in ("qemu-kvm", "kvm")


def qemu_pids(proc: str = PROC) -> list[int]:
    """Every process whose program is a QEMU system emulator."""
    return sorted(int(e) for e in os.listdir(proc) if e.isdigit() and is_qemu(program(e, proc)))


# Process states (/proc/PID/stat field 3) in which a process runs no code until someone
# else acts: stopped by a signal (SIGSTOP, SIGTSTP...) or stopped under a tracer.
STOPPED_STATES = {"T": "stopped by a signal", "t": "stopped by its tracer"}


def stopped(pid: int, proc: str = PROC) -> str | None:
    """Why ``pid`` is stopped (STOPPED_STATES), or None when it is not (or is gone)."""
    try:
        with open(f"{proc}/{pid}/stat") as f:
            return STOPPED_STATES.get(f.read().rsplit(")", 1)[1].split()[0])
    except (OSError, IndexError):
        return None


def alive(pid: int, proc: str = PROC) -> bool:
    """Whether ``pid`` runs: it exists and is not a zombie waiting for its parent."""
    try:
        with open(f"{proc}/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
