"""Gather what can be seen of a running QEMU into one Observation (no verdicts here).

Sources: /proc (fds, fdinfo, threads, command line), the vhost workers and their
CPU time, the taps over rtnetlink, the wiring trace, the logs that say why vhost
is not used (libvirtd's, and QEMU's own: libvirt's per-domain log or the file its
stderr goes to), /dev/vhost-net's mode against QEMU's credentials, and, when
given, the libvirt domain's XML and QEMU's monitor. ``verify`` turns an Observation
into checks. Every source is an argument of ``observe`` (a /proc root, a tracefs
root, a tap reader, log paths...), so an observation recorded on a real host
(tests/fixtures/observations) drives it again.
"""

from __future__ import annotations

import os

from vhostorch import files, pins
from vhostorch.check import wiring
from vhostorch.kernel import cpus, procfs
from vhostorch.kernel.rtnl import Link, Rtnl
from vhostorch.qemu import args
from vhostorch.qemu.monitor import MonitorError
from vhostorch.record import TYPE_CHECKING, Record

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from vhostorch.check.wiring import Wiring
    from vhostorch.kernel.cpus import Place
    from vhostorch.kernel.vhoststate import KernelView
    from vhostorch.libvirt.domxml import Domain
    from vhostorch.pins import Pin
    from vhostorch.qemu.args import QemuArgs
    from vhostorch.qemu.monitor import MonitorView
    from vhostorch.vm.state import VmState


class Observation(Record):
    process: procfs.Process
    args: QemuArgs
    worker_model: str
    workers: tuple[int, ...]
    taps: dict[str, Link | None]
    taps_seen: str | None
    vhost_net: bool
    domain: Domain | None
    monitor: MonitorView | None = None
    monitor_error: str | None = None
    wiring: Wiring | None = None
    wiring_note: str | None = None
    plan: VmState | None = None  # what vhostorch set up, for a VM it started
    logs: Logs | None = None  # what the logs say about vhost for this QEMU (check.reasons)
    device: dict[str, object] | None = None  # /dev/vhost-net against QEMU's credentials
    worker_cpu: dict[int, float] | None = None  # vhost worker tid -> CPU seconds (utime+stime)
    stopped: str | None = None  # why QEMU runs no code now (procfs.STOPPED_STATES), if it does not
    live: KernelView | None = None  # what the kernel holds now (check.live), where it was read
    live_note: str | None = None  # why it could not be read, when it was tried
    # Where each of QEMU's threads and vhost workers may run and ran, by tid (kernel.cpus);
    # None when none could be read (a recording made before they were recorded).
    places: dict[int, Place] | None = None
    pin: Pin | None = None  # the CPUs its vhost-net workers were asked to run on (pins)
    # CPU -> the CPUs sharing its core (SMT siblings), for the CPUs its vCPUs may run on
    siblings: dict[int, frozenset[int]] | None = None


class Logs(Record):
    """The log lines that tell why vhost is not used by this QEMU, with where they were read.

    libvirt (9.0) opens /dev/vhost-net itself and, when it cannot, only warns in
    its daemon's own log, libvirtd's or virtqemud's ('Unable to open vhost-net. Opened
    so far 0, requested 1'),
    with no domain name: the lines kept are those written in the minute before this
    QEMU started. QEMU writes 'unable to start vhost net: N: falling back on
    userspace virtio' to its stderr: libvirt's per-domain log, or the file fd 2 is.
    """

    libvirtd_log: str | None  # the daemon log the lines are from (None: no line)
    libvirtd_lines: tuple[str, ...]
    qemu_log: str | None
    qemu_lines: tuple[str, ...]


# libvirt's QEMU driver writes each running domain's pid here (qemu:///system).
PID_DIR = "/run/libvirt/qemu"
# The log of the daemon that runs libvirt's QEMU driver (log_outputs' default when there is
# no journald): libvirtd's, or virtqemud's where the modular daemons serve qemu:///system (a
# host moved from one to the other has both); and the per-domain logs where virtlogd keeps
# each QEMU's stderr (qemu:///system).
LIBVIRTD_LOG = "/var/log/libvirt/libvirtd.log"
VIRTQEMUD_LOG = "/var/log/libvirt/virtqemud.log"
DOMAIN_LOG_DIR = "/var/log/libvirt/qemu"
# The most of a log's end that is read: enough for a day of libvirtd at its default level.
LOG_TAIL = 4 << 20
# libvirt opens the vhost fds just before it starts QEMU (50 ms before, measured here).
OPEN_WINDOW = 10.0
UNABLE_TO_OPEN = "Unable to open vhost-net"


def tail_lines(file: str | int, limit: int = LOG_TAIL) -> list[str]:
    """The last ``limit`` bytes of ``file`` (a path, or a descriptor it closes) as lines (the
    first, cut, dropped). A path is opened without following a symlink or waiting on a FIFO
    and must be a regular file. Raises OSError."""
    if isinstance(file, str):
        import errno
        import stat

        file = os.open(file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        if not stat.S_ISREG(os.fstat(file).st_mode):
            os.close(file)
            raise OSError(errno.EINVAL, "not a regular file")
    with open(file, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - limit))
        data = f.read(limit).decode(errors="replace")
    lines = data.splitlines()
    return lines[1:] if size > limit else lines


def libvirt_time(line: str) -> float | None:
    """The time of a libvirt log line ('2026-11-30 15:25:53.459+0000: ...'), in epoch seconds."""
    import calendar
    import time

    stamp = line[:28]
    try:
        whole = time.strptime(stamp[:19], "%Y-%m-%d %H:%M:%S")
        fraction = float("0" + stamp[19:23]) if stamp[19] == "." else 0.0
    except (ValueError, IndexError):
        return None
    if stamp[23:28] != "+0000":
        return None
    return calendar.timegm(whole) + fraction


class LibvirtdLog:
    """The QEMU driver's daemon logs (libvirtd's, virtqemud's): their 'Unable to open
    vhost-net' warnings with their times and files, read at most once however many QEMUs ask
    (check --all)."""

    def __init__(self, *paths: str) -> None:
        self.paths = paths or (LIBVIRTD_LOG, VIRTQEMUD_LOG)
        self._warnings: list[tuple[float, str, str]] | None = None

    def warnings(self) -> list[tuple[float, str, str]]:
        """(time, line, file) in time order. Raises OSError when no log can be read."""
        if self._warnings is None:
            found, unread = [], []
            for path in self.paths:
                try:
                    lines = tail_lines(path)
                except OSError as err:
                    unread.append(err)
                    continue
                for line in lines:
                    if UNABLE_TO_OPEN in line:
                        when = libvirt_time(line)
                        if when is not None:
                            found.append((when, line, path))
            if len(unread) == len(self.paths):
                raise unread[0]
            self._warnings = sorted(found)
        return self._warnings


def _thread(line: str) -> str:
    """The libvirtd thread id of a log line ('TIME: TID: warning : ...')."""
    return line[29:].split(":", 1)[0].strip()


def libvirt_file(directory: str, name: str, suffix: str) -> str | None:
    """libvirt's file of domain ``name`` in ``directory`` (``NAME.pid``, ``NAME.log``); None
    for a name no domain can have. libvirt refuses a '/' in a domain's name, while any
    user's QEMU may call itself ``-name guest=../../../tmp/x``: root opened the FIFO put there
    and hung (check --all, the metrics unit), or read a root-only file through a symlink."""
    if not name or "/" in name or "\0" in name:
        return None
    return os.path.join(directory, f"{name}{suffix}")


def _pid_in(path: str) -> int:
    """The pid in libvirt's pid file at ``path`` (regular, no link followed, no FIFO waited
    on). Raises OSError or ValueError."""
    return int(files.read(path, 64).decode("ascii").strip())


def by_libvirt(pid: int, name: str, pid_dir: str = PID_DIR) -> bool:
    """Whether libvirt started QEMU ``pid`` as domain ``name`` (its pid file holds ``pid``)."""
    path = libvirt_file(pid_dir, name, ".pid")
    try:
        return path is not None and _pid_in(path) == pid
    except (OSError, ValueError):
        return False


def boot_time(proc: str = procfs.PROC) -> float:
    with open(f"{proc}/stat") as f:
        for line in f:
            if line.startswith("btime "):
                return float(line.split()[1])
    raise OSError(f"no btime in {proc}/stat")


def _qemu_log_lines(
    pid: int,
    name: str | None,
    process: procfs.Process,
    domain_log_dir: str | None,
    proc: str,
    pid_dir: str,
) -> tuple[str | None, tuple[str, ...]]:
    """QEMU's own log (libvirt's per-domain log when libvirt started it as that domain, else
    the regular file its stderr is) and its lines about vhost since this QEMU started."""
    path = libvirt_file(domain_log_dir, name, ".log") if name and domain_log_dir else None
    # Only libvirt's QEMU of that domain: another QEMU may take a domain's name.
    if path is not None and name and by_libvirt(pid, name, pid_dir):
        found = _vhost_lines(path, by_libvirt=True)  # libvirt's, in a root-only place
        if found is not None:
            return path, found
    stderr = process.fd(2)
    if stderr is not None and stderr.target.startswith("/"):
        # Read through QEMU's own fd, never the path readlink shows: that path may name
        # another file in our namespace (a container's), or be in a directory QEMU's user
        # writes, where a symlink or a FIFO may since have been put.
        fd = procfs.open_regular(pid, 2, proc)
        if fd is not None:
            found = _vhost_lines(fd, by_libvirt=False)
            if found is not None:
                return stderr.target, found
    return None, ()


def _vhost_lines(file: str | int, by_libvirt: bool) -> tuple[str, ...] | None:
    """The lines about vhost of a QEMU log (a path, or a descriptor it closes); None when
    it cannot be read, or is libvirt's and holds no start."""
    try:
        lines = tail_lines(file, 1 << 20)
    except OSError:
        return None
    if by_libvirt:
        # Each start appends a header line; only the last start's lines are this QEMU's.
        starts = [i for i, line in enumerate(lines) if ": starting up " in line]
        if not starts:
            return None
        lines = lines[starts[-1] :]
    return tuple(line for line in lines if "vhost" in line)


def device_access(pid: int, proc: str, dev: str) -> dict[str, object]:
    """/dev/vhost-net (mode, owner) against QEMU's credentials, and whether the module is
    loaded: why QEMU could or could not open it itself (DAC only; a device cgroup or an
    LSM may still refuse)."""
    import stat

    path = f"{dev}/vhost-net"
    facts: dict[str, object] = {"path": path}
    facts["module_loaded"] = os.path.isdir("/sys/module/vhost_net")
    try:
        st = os.stat(path)
    except OSError as err:
        facts["exists"] = False
        facts["error"] = err.strerror
        return facts
    facts.update(
        exists=True, char_device=stat.S_ISCHR(st.st_mode), mode=oct(st.st_mode & 0o7777),
        uid=st.st_uid, gid=st.st_gid,
    )  # fmt: skip
    try:
        with open(f"{proc}/{pid}/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
        uid = int(status["Uid"].split()[1])
        gids = {int(status["Gid"].split()[1]), *(int(g) for g in status["Groups"].split())}
    except (OSError, KeyError, ValueError, IndexError):
        return facts
    facts.update(qemu_uid=uid, qemu_gids=sorted(gids))
    rw = 0o6
    if uid == 0:
        allowed = True
    elif uid == st.st_uid:
        allowed = (st.st_mode >> 6) & rw == rw
    elif st.st_gid in gids:
        allowed = (st.st_mode >> 3) & rw == rw
    else:
        allowed = st.st_mode & rw == rw
    facts["qemu_may_open"] = allowed
    return facts


def worker_cpu(tids: Iterable[int], pid: int, proc: str = procfs.PROC) -> dict[int, float]:
    """CPU seconds (utime + stime) of each vhost worker, by tid.

    A vhost_task (Linux >= 6.4) is a thread of QEMU ``pid``: its own times are in
    /proc/PID/task/TID/stat, while /proc/TID/stat sums the whole thread group (all of
    QEMU's CPU time). A kernel thread (< 6.4) is a process of its own: /proc/TID/stat.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    found = {}
    for tid in tids:
        fields = None
        for path in (f"{proc}/{pid}/task/{tid}/stat", f"{proc}/{tid}/stat"):
            try:
                with open(path) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                break
            except (OSError, IndexError):
                continue
        if fields is None:
            continue
        # Fields 14 and 15 (utime, stime) are the 12th and 13th after the comm.
        found[tid] = (int(fields[11]) + int(fields[12])) / ticks
    return found


def vhost_net_present(dev: str = "/dev") -> bool:
    import stat

    try:
        return stat.S_ISCHR(os.stat(f"{dev}/vhost-net").st_mode)
    except OSError:
        return False


def _netns(pid: int | str, proc: str) -> str | None:
    try:
        return os.readlink(f"{proc}/{pid}/ns/net")
    except OSError:
        return None


def read_links(names: Iterable[str]) -> dict[str, Link | None]:
    """The links named, over rtnetlink (None for one that does not exist)."""
    # One RTM_GETLINK per tap: a dump of every link costs ~6 ms on a host with many.
    with Rtnl() as rtnl:
        return {name: rtnl.link(name) for name in names}


def observe(
    pid: int,
    *,
    domain: Domain | None = None,
    proc: str = procfs.PROC,
    kthreads: dict[str, list[int]] | None = None,
    monitor: Callable[[], MonitorView] | None = None,
    tracefs: str = wiring.TRACEFS,
    plan: VmState | None = None,
    links: Callable[[Iterable[str]], dict[str, Link | None]] = read_links,
    netns: str | None = None,
    vhost_net: bool | None = None,
    libvirtd_log: LibvirtdLog | None = None,
    domain_log_dir: str | None = None,
    dev: str = "/dev",
    pid_dir: str = PID_DIR,
    char: Callable[[int, str], int | None] | None = None,
    sys: str = procfs.SYS,
    pins_dir: str = pins.PINS,
) -> Observation:
    """Look at QEMU ``pid``. Raises procfs.CannotInspect when it cannot be read or is no QEMU.

    ``monitor`` reads QEMU's monitor; when it fails, the reason is kept and the
    checks that need it are unknown. ``plan`` is vhostorch's record of a VM it
    started (NICs added over QMP, and what the spec allowed). The rest say where
    to look: ``proc`` and ``tracefs`` are roots, ``kthreads`` the vhost kernel
    threads by name (read from ``proc`` if None), ``links`` reads taps by name,
    ``netns`` is the network namespace ``links`` reads in (this process's if
    None), ``vhost_net`` whether the host has /dev/vhost-net (looked at if None).
    ``libvirtd_log`` is libvirtd's log (None: not looked at), ``domain_log_dir`` holds
    libvirt's per-domain logs (None: not looked at), ``dev`` is where /dev/vhost-net is,
    ``pid_dir`` where libvirt writes its QEMUs' pids (its log is read only for those).
    ``char`` and ``sys`` tell what QEMU's fds are (procfs.read: device numbers, sysfs).
    ``pins_dir`` holds the pins asked for its vhost-net workers (vhostorch.pins).
    The logs and the device are read only for a QEMU they can tell something about.
    """
    process = procfs.read(pid, proc, char=char, sys=sys)
    name = procfs.program(pid, proc)
    if not procfs.is_qemu(name):
        raise procfs.CannotInspect(f"process {pid} is not a QEMU (it runs {name or '?'})")
    parsed = args.parse(process.argv)
    model, workers = procfs.vhost_workers(
        process, procfs.vhost_kthreads(proc) if kthreads is None else kthreads
    )
    names = {fd.tap for fd in process.fds if fd.tap}
    names |= {n.ifname for n in parsed.netdevs if n.ifname}
    if domain is not None:
        names |= {i.target for i in domain.interfaces if i.target}
    if plan is not None:
        names |= {n.tap for n in plan.nics}
    taps: dict[str, Link | None] = {}
    seen = None
    # Taps live in QEMU's network namespace; read them only when it is ours.
    if _netns(pid, proc) != (_netns("self", "/proc") if netns is None else netns):
        seen = "QEMU runs in another network namespace; its taps were not read"
    else:
        taps = links(sorted(n for n in names if n))
    view, error = None, None
    halted = procfs.stopped(pid, proc)
    if monitor is not None and halted:
        # A stopped QEMU accepts the connection (the kernel queues it) and never greets:
        # asking would wait the whole QMP timeout (5 s per stopped QEMU in check --all).
        error = f"QEMU (process {pid}) is {halted}: its monitor cannot answer; not asked"
    elif monitor is not None:
        try:
            view = monitor()
        except MonitorError as err:
            error = str(err)
    since = process.start_ticks / os.sysconf("SC_CLK_TCK")
    wired = wiring.read(pid, since, tracefs)
    note = None
    if wired is None:
        note = "the wiring trace is not armed (vhostorch trace arm, before the guest driver starts)"
    elif not wired.vrings:
        note = (
            "the wiring trace is armed but recorded no vring of this QEMU: they were wired "
            "before it was armed (a guest driver restart, or a pause and resume, wires them again)"
        )
    present = vhost_net_present(dev) if vhost_net is None else vhost_net
    vhost_fds = len(process.fds_to(procfs.VHOST_NET))
    tap_nics = [n for n in parsed.netdevs if n.type in ("tap", "bridge")]
    wanting = bool(tap_nics) or domain is not None or plan is not None
    logs, device = None, None
    if wanting:
        # Why vhost is missing is asked only of a QEMU with a tap NIC short of vhost fds;
        # why it is not at work, only of one that holds some.
        short = vhost_fds < sum(n.queue_pairs for n in tap_nics) or not tap_nics
        lines: tuple[str, ...] = ()
        source = None
        # libvirtd's warning names no domain: it is matched by time, so only to a QEMU
        # libvirt started (its pid file says so). A QEMU started by hand next to a
        # libvirtd starting another domain was once given that domain's warning.
        if (
            short
            and libvirtd_log is not None
            and parsed.name
            and by_libvirt(pid, parsed.name, pid_dir)
        ):
            try:
                started = boot_time(proc) + since
                warned = libvirtd_log.warnings()
                near = [(t, f) for w, t, f in warned if started - OPEN_WINDOW <= w <= started + 1]
                # The start's own worker thread wrote the last of them (one per NIC it could
                # not give vhost); other domains starting meanwhile come from other threads.
                if near:
                    last, source = near[-1]
                    lines = tuple(t for t, f in near if f == source and _thread(t) == _thread(last))
            except OSError:
                pass
        qlog: str | None = None
        qlines: tuple[str, ...] = ()
        if vhost_fds:
            qlog, qlines = _qemu_log_lines(pid, parsed.name, process, domain_log_dir, proc, pid_dir)
        logs = Logs(source, lines, qlog, qlines)
        if short:
            device = device_access(pid, proc, dev)
    cpu = worker_cpu(workers, pid, proc) if workers else None
    places = thread_places(process, workers, proc)
    return Observation(
        process, parsed, model, tuple(workers), taps, seen, present, domain, view, error, wired,
        note, plan, logs, device, cpu, halted, places=places, siblings=_siblings(places, sys),
        pin=pins.load(pid, process.start_ticks, pins_dir) if workers else None,
    )  # fmt: skip


def _siblings(places: dict[int, Place] | None, sys: str) -> dict[int, frozenset[int]] | None:
    """The SMT siblings of every CPU a vCPU thread may run on (check.placement)."""
    if places is None:
        return None
    used = {c for p in places.values() if cpus.vcpu_index(p.comm) is not None for c in p.cpus}
    return {c: cpus.siblings(c, sys) for c in sorted(used)}


def thread_places(
    process: procfs.Process, workers: Iterable[int], proc: str = procfs.PROC
) -> dict[int, Place] | None:
    """Where each thread of QEMU and each vhost worker may run and ran (kernel.cpus); None
    when not one could be read."""
    found = {}
    for tid in [*(t.tid for t in process.threads), *workers]:
        where = cpus.place(process.pid, tid, proc)
        if where is not None:
            found[tid] = where
    return found or None


def domain_pid(name: str, proc: str = procfs.PROC, pid_dir: str = PID_DIR) -> int:
    """The QEMU pid of running libvirt domain ``name``, without asking libvirt (a hook
    must not): libvirt's own pid file for it, nothing else. Raises procfs.CannotInspect.

    libvirt's QEMU driver (qemu:///system) writes it into its run directory, which only
    root can write, before the domain's hooks run. A command line saying ``-name
    guest=NAME`` proves nothing: any user can start a QEMU so named, and was once taken
    for the domain when the pid file was missing. The pid must still run a QEMU of that
    name (a stale file whose pid was reused is refused).
    """
    path = libvirt_file(pid_dir, name, ".pid")
    if path is None:
        raise procfs.CannotInspect(
            f"no QEMU process found for domain {name!r}: not a domain name (libvirt refuses "
            "'/' in one)"
        )
    try:
        pid = _pid_in(path)
    except (OSError, ValueError) as err:
        why = err.strerror if isinstance(err, OSError) else "no pid in it"
        raise procfs.CannotInspect(
            f"no QEMU process found for domain {name!r}: libvirt's pid file {path}: {why}"
        ) from None
    try:
        with open(f"{proc}/{pid}/cmdline") as f:
            argv = f.read().split("\0")
    except OSError:
        argv = []
    if not (
        procfs.alive(pid, proc)
        and procfs.is_qemu(procfs.program(pid, proc))
        and args.parse(argv).name == name
    ):
        raise procfs.CannotInspect(
            f"no QEMU process found for domain {name!r}: libvirt's pid file {path} names "
            f"process {pid}, which is not that domain's QEMU (stale)"
        )
    return pid
