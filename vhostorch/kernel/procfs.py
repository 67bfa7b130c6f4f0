"""What /proc says about a process: command line, fds with their fdinfo, threads, vhost workers.

Every reader takes the /proc root as an argument, so trees recorded on real
systems can drive the tests of what is built on top (a process that vanishes
midway is reported as gone, never as a traceback).
"""

from __future__ import annotations

import os

# The error raised here, also importable from here (the tree is in vhostorch.errors).
from vhostorch.errors import CannotInspect as CannotInspect
from vhostorch.record import TYPE_CHECKING, Record

if TYPE_CHECKING:
    from collections.abc import Iterator

PROC = "/proc"
VHOST_NET = "/dev/vhost-net"
TUN = "/dev/net/tun"
KVM_VM = "anon_inode:kvm-vm"
EVENTFD = "anon_inode:[eventfd]"
# A macvtap queue: drivers/net/tap.c names each macvtap's character device
# "tap<ifindex>" (device_create(..., "tap%d", dev->ifindex)), and libvirt opens it by
# that name (virNetDevMacVLanTapOpen), once per queue. Its fdinfo has no iff: line
# (tap.c has no show_fdinfo; seen on Linux 6.1: pos, flags, mnt_id, ino only), so the
# link is known by its ifindex alone (tests/fixtures/observations/direct-*.json).
MACVTAP_PREFIX = "/dev/tap"


class Fd(Record):
    """One open file of a process: its number, what it points to, and its fdinfo lines."""

    num: int
    target: str
    info: dict[str, str]

    @property
    def tap(self) -> str | None:
        """The tap this /dev/net/tun fd is attached to (fdinfo ``iff:``), if any."""
        return self.info.get("iff") if self.target == TUN else None

    @property
    def macvtap_index(self) -> int | None:
        """The ifindex of the macvtap link this ``/dev/tapN`` fd is a queue of, if it is one."""
        index = self.target.removeprefix(MACVTAP_PREFIX)
        if index == self.target or not (index.isascii() and index.isdigit()):
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

    def fds_to(self, target: str) -> list[Fd]:
        return [fd for fd in self.fds if fd.target == target]

    def fd(self, num: int) -> Fd | None:
        for fd in self.fds:
            if fd.num == num:
                return fd
        return None


def _read(path: str) -> str:
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


def wants_fdinfo(target: str) -> bool:
    """Whether the fdinfo of an fd to ``target`` is read (and recorded with it)."""
    return target in _FDINFO_FOR or Fd(0, target, {}).macvtap_index is not None


def read(pid: int, proc: str = PROC) -> Process:
    """Read process ``pid``. Raises CannotInspect (no such process, or not allowed to look)."""
    base = f"{proc}/{pid}"
    try:
        argv = tuple(_read(f"{base}/cmdline").split("\0"))
        comm = _read(f"{base}/comm").strip()
        stat = _read(f"{base}/stat")
        names = os.listdir(f"{base}/fd")
    except FileNotFoundError:
        raise CannotInspect(f"no process {pid}") from None
    except PermissionError:
        raise CannotInspect(f"not allowed to read the fds of process {pid} (run as root)") from None
    if argv and argv[-1] == "":
        argv = argv[:-1]
    if not argv:
        raise CannotInspect(f"process {pid} is a kernel thread or a zombie, not a QEMU")
    # Field 22 (starttime) follows the parenthesised comm, which may itself hold spaces.
    start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
    fds = []
    for name in names:
        try:
            target = os.readlink(f"{base}/fd/{name}")
            info = parse_fdinfo(_read(f"{base}/fdinfo/{name}")) if wants_fdinfo(target) else {}
        except FileNotFoundError:
            continue  # closed while we looked
        except PermissionError:
            # Root may list a process's fds and still not follow them (another user
            # namespace's init, say).
            raise CannotInspect(f"not allowed to read the fds of process {pid}") from None
        fds.append(Fd(int(name), target, info))
    fds.sort(key=lambda fd: fd.num)
    return Process(pid, comm, argv, tuple(fds), tuple(threads(pid, proc)), start_ticks)


def start_time(pid: int, proc: str = PROC) -> int | None:
    """Field 22 of /proc/PID/stat, the start time in clock ticks after boot (after the
    command name, which may hold spaces): with the pid, it names one process. None: gone."""
    try:
        return int(_read(f"{proc}/{pid}/stat").rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def threads(pid: int, proc: str = PROC) -> Iterator[Thread]:
    base = f"{proc}/{pid}/task"
    try:
        tids = sorted(int(t) for t in os.listdir(base))
    except FileNotFoundError:
        return
    for tid in tids:
        try:
            yield Thread(tid, _read(f"{base}/{tid}/comm").strip())
        except FileNotFoundError:
            continue


def vhost_kthreads(proc: str = PROC) -> dict[str, list[int]]:
    """Kernel threads named ``vhost-*``, by name (read once for any number of QEMUs)."""
    found: dict[str, list[int]] = {}
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        try:
            comm = _read(f"{proc}/{entry}/comm").strip()
            # Kernel threads have an empty command line.
            if not comm.startswith("vhost-") or _read(f"{proc}/{entry}/cmdline"):
                continue
        except (FileNotFoundError, ProcessLookupError):
            continue
        found.setdefault(comm, []).append(int(entry))
    return found


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
            return os.path.basename(_read(f"{proc}/{pid}/cmdline").split("\0")[0])
        except OSError:
            return ""


def is_qemu(program: str) -> bool:
    return program.startswith("qemu-system-") or program in ("qemu-kvm", "kvm")


def qemu_pids(proc: str = PROC) -> list[int]:
    """Every process whose program is a QEMU system emulator."""
    return sorted(int(e) for e in os.listdir(proc) if e.isdigit() and is_qemu(program(e, proc)))


def alive(pid: int, proc: str = PROC) -> bool:
    """Whether ``pid`` runs: it exists and is not a zombie waiting for its parent."""
    try:
        with open(f"{proc}/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
