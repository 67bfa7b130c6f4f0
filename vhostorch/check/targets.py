"""The QEMUs a check is about (a pid, a libvirt domain, a QMP socket, or all of them),
each observed with what tells most about it, and checked."""

from __future__ import annotations

import os
import time

from vhostorch.check import live, observe, verify
from vhostorch.check.ids import VM_INSPECT
from vhostorch.check.report import UNKNOWN, Check, Managed, QemuTarget, Report
from vhostorch.errors import InvalidSpec
from vhostorch.kernel import procfs
from vhostorch.libvirt import connection, domxml
from vhostorch.qemu import args, monitor
from vhostorch.record import TYPE_CHECKING, Record
from vhostorch.vm import state

if TYPE_CHECKING:
    from collections.abc import Callable


# check --all reads QEMUs' monitors one after another, each within monitor.READ_WITHIN; all
# the reads together get this long. A user can start QEMUs whose monitors take their whole
# time (the real binary, its socket answered by the user's code), and the metrics unit runs
# check --all every minute with TimeoutStartSec=50s: ten such QEMUs took it past that
# (issue 19, D3). The rest of the run (/proc, the kernel's live state) takes seconds.
MONITORS_WITHIN = 20.0
# check --all as a whole ends its reading of QEMUs this long after it began, monitors' time
# included: the metrics unit kills it at 50 s (TimeoutStartSec, with pin --reapply before it).
# Any user can make /proc work as long as it likes (every fd of every QEMU-named process is
# read: 5 processes of 19,900 fds took 2.58 s, issue 19, B2). The time is looked at between
# QEMUs: one QEMU's read may still follow (its monitor within READ_WITHIN, its /proc), then
# the kernel's live state and the output, all inside the 15 s left. QEMUs not read by then
# are reported, each unknown with the reason (vm.inspect), never left out.
CHECK_ALL_WITHIN = 35.0
# Less time left than this is not worth a connection: the read is not started.
LEAST_READ = 0.1


class MonitorTime:
    """What ``check --all`` may still spend reading monitors, over all its QEMUs."""

    def __init__(self, seconds: float = MONITORS_WITHIN) -> None:
        self.seconds = seconds
        self.spent = 0.0
        self.asked = 0  # monitors asked so far

    def read_within(self) -> float:
        """How long the next read may take. Raises MonitorError once the time is spent."""
        left = self.seconds - self.spent
        if left < LEAST_READ:
            raise monitor.MonitorError(f"QMP not asked: {self._why()}")
        return min(monitor.READ_WITHIN, left)

    def _why(self) -> str:
        return (
            f"check --all's {self.seconds:.3g} s for reading all QEMUs' monitors are spent "
            f"({self.asked} asked before this one)"
        )

    def read(self, ask: Callable[[float], monitor.MonitorView]) -> monitor.MonitorView:
        """``ask(within)``, its time counted. Raises MonitorError."""
        within = self.read_within()
        started = time.monotonic()
        try:
            return ask(within)
        except monitor.MonitorError as err:
            # The read took all it was given, which was less than its own bound: the
            # budget cut it (asyncio's timers may fire a clock tick early).
            if within < monitor.READ_WITHIN and time.monotonic() - started >= within - 0.01:
                raise monitor.MonitorError(f"{err} (cut short: {self._why()})") from err
            raise
        finally:
            self.spent += time.monotonic() - started
            self.asked += 1


class Target(Record):
    """What a check is about: exactly one of ``pid``, ``domain``, ``qmp``, ``every`` (all
    QEMUs); ``uri`` and ``ask_monitor`` are for a domain (checked by who reads them)."""

    pid: int | None = None
    domain: str | None = None
    qmp: str | None = None
    every: bool = False
    uri: str | None = None
    ask_monitor: bool = False
    live: bool = True  # read the kernel's present state (check.live) where it can be

    def check_one(self) -> None:
        """Raise InvalidSpec unless the target is exactly one thing."""
        chosen = (self.pid is not None, self.domain is not None, self.every, self.qmp is not None)
        if sum(chosen) != 1:
            raise InvalidSpec("check: give one of --pid, --domain, --qmp or --all")


def reports(target: Target) -> list[Report]:
    """Check one target.

    Raises InvalidSpec for a bad combination, procfs.CannotInspect (or
    DomainUnavailable) when the target cannot be looked at.
    """
    target.check_one()
    pid, domain, qmp, uri = target.pid, target.domain, target.qmp, target.uri
    if uri and domain is None:
        raise InvalidSpec("check: --connect goes with --domain")
    if target.ask_monitor and domain is None:
        raise InvalidSpec("check: --monitor goes with --domain (--pid and --qmp use QMP directly)")
    # Why a NIC does not use vhost is in libvirt's logs: read libvirtd's once for all QEMUs.
    log, logdir = observe.LibvirtdLog(), observe.DOMAIN_LOG_DIR
    if domain is not None:
        return [_domain(domain, uri or connection.SYSTEM_URI, target.ask_monitor, log, target.live)]
    if qmp is not None:
        try:
            qemu = monitor.peer_pid(qmp)
        except monitor.MonitorError as err:
            raise procfs.CannotInspect(str(err)) from err
        observed = observe.observe(
            qemu,
            monitor=lambda: monitor.read_qmp(qmp, served_by=qemu),
            plan=state.by_pid(qemu),
            libvirtd_log=log,
            domain_log_dir=logdir,
        )
        return _verified([observed], target.live)
    if pid is not None:
        observed = observe.observe(
            pid, monitor=_own_qmp(pid), plan=state.by_pid(pid), libvirtd_log=log,
            domain_log_dir=logdir,
        )  # fmt: skip
        return _verified([observed], target.live)
    return every_qemu(_plans(), log, target.live)


def every_qemu(
    plans: dict[int, state.VmState],
    log: observe.LibvirtdLog,
    use_live: bool,
    within: float = CHECK_ALL_WITHIN,
) -> list[Report]:
    """check --all: every QEMU, those of ``plans`` (vhostorch's VMs) first, read until
    ``within`` seconds have passed (their monitors within MONITORS_WITHIN); each QEMU not read
    by then is reported unknown (vm.inspect) with the reason. The reports keep pid order."""
    deadline = time.monotonic() + within
    kthreads = procfs.vhost_kthreads()
    found: list[observe.Observation] = []
    unread: list[tuple[int, str | None]] = []  # (pid, why; None: the time ran out)
    budget = MonitorTime()
    every = procfs.qemu_pids()
    # The VMs vhostorch started (root's records) are read first, so that QEMUs a user
    # started cannot spend the time before them.
    for qemu in sorted(every, key=lambda pid: pid not in plans):
        if time.monotonic() >= deadline:
            unread.append((qemu, None))
            continue
        try:
            observed = observe.observe(
                qemu,
                kthreads=kthreads,
                monitor=_own_qmp(qemu, budget=budget),
                plan=plans.get(qemu),
                libvirtd_log=log,
                domain_log_dir=observe.DOMAIN_LOG_DIR,
            )
        except procfs.TooManyFds as err:
            unread.append((qemu, f"unknown: {err}"))
            continue
        except procfs.CannotInspect:
            continue  # it exited while we looked
        found.append(observed)
    late = f"unknown: check --all's {within:g} s ran out before this QEMU was read"
    reports = _verified(found, use_live) + [
        _unread(qemu, plans.get(qemu), why or late) for qemu, why in unread
    ]
    order = {pid: i for i, pid in enumerate(every)}
    reports.sort(key=lambda r: order[r.pid or 0])
    return reports


def _unread(pid: int, plan: state.VmState | None, why: str) -> Report:
    """The report of a QEMU check --all had no time left for: its one verdict is unknown,
    as the hook's for a QEMU it cannot read."""
    managed = None if plan is None else Managed(plan.name, plan.backend)
    return Report(QemuTarget(pid, None, vhostorch=managed), (), (Check(VM_INSPECT, UNKNOWN, why),))


def _plans(root: str = state.STATE_DIR) -> dict[int, state.VmState]:
    """vhostorch's VMs whose QEMUs run (state.running), by pid: a VM's plan is what it set
    up (NICs added over QMP)."""
    return {known.pid: known for known in state.every(root) if state.running(known)}


def _verified(observed: list[observe.Observation], use_live: bool) -> list[Report]:
    """Each observation checked, with what the kernel holds now for all of them, read at once
    (check.live: one program load and one pass, whatever the number of QEMUs)."""
    return [verify.verify(o) for o in (live.gather(observed) if use_live else observed)]


def _domain(
    name: str, uri: str, ask_monitor: bool, log: observe.LibvirtdLog, use_live: bool
) -> Report:
    domain = domxml.parse(connection.domain_xml(name, uri))
    reader = (lambda: connection.read_monitor(name, uri)) if ask_monitor else None
    pid = observe.domain_pid(name)
    observed = observe.observe(
        pid,
        domain=domain,
        monitor=reader,
        plan=state.by_pid(pid),
        libvirtd_log=log,
        domain_log_dir=observe.DOMAIN_LOG_DIR,
    )
    return _verified([observed], use_live)[0]


def _own_qmp(
    qemu: int, proc: str = procfs.PROC, budget: MonitorTime | None = None
) -> Callable[[], monitor.MonitorView] | None:
    """A QEMU started with -qmp unix:PATH is asked over that socket, when it is its own,
    within monitor.READ_WITHIN (and what is left of ``budget``, when given: check --all).

    Any user can start a process called qemu-system-x86_64 whose command line names a
    socket it serves (or someone else's): root must not talk to it on that word. When the
    socket is not trusted, or the budget is spent, reading the monitor fails with the
    reason (checks say unknown).
    """
    try:
        # Any bytes: a -name that is not UTF-8 was an internal error here (the socket path's
        # own bytes are kept, surrogate-escaped, as the kernel has them).
        with open(f"{proc}/{qemu}/cmdline", errors="surrogateescape") as f:
            path = args.parse(f.read().split("\0")).qmp
    except OSError:
        return None
    if not path:
        return None

    def ask(within: float) -> monitor.MonitorView:
        return monitor.read_qmp(trusted_qmp(qemu, path, proc), within, served_by=qemu)

    def read() -> monitor.MonitorView:
        return ask(monitor.READ_WITHIN) if budget is None else budget.read(ask)

    return read


def trusted_qmp(qemu: int, path: str, proc: str = procfs.PROC) -> str:
    """``path``, if root may talk QMP to it on behalf of process ``qemu``. Raises MonitorError.

    Trusted: ``qemu`` runs a QEMU binary root installed (not a copy or a look-alike a
    user made), ``path`` is absolute (a relative one is relative to QEMU's directory, not
    ours) and is a socket owned by root or by QEMU's own user. Who serves it is checked on
    the fds of ``qemu`` before connecting (it holds the listening socket), and again on the
    connection itself (read_qmp's ``served_by``): it must be ``qemu``.
    """
    import stat

    why = None
    try:
        exe = os.readlink(f"{proc}/{qemu}/exe").removesuffix(" (deleted)")
        binary = os.stat(f"{proc}/{qemu}/exe")  # the running file, even if replaced since
        user = _euid(qemu, proc)
    except OSError as err:
        raise monitor.MonitorError(f"QMP not asked: cannot read process {qemu}: {err}") from err
    if not procfs.is_qemu(os.path.basename(exe)) or binary.st_uid != 0:
        why = f"process {qemu} runs {exe}, which is not a QEMU installed by root"
    elif binary.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        why = f"process {qemu} runs {exe}, which others than root may write"
    elif not path.startswith("/"):
        why = f"its QMP path {path!r} is relative"
    else:
        try:
            sock = os.lstat(path)
        except OSError as err:
            raise monitor.MonitorError(f"QMP not asked: {path}: {err.strerror}") from err
        if not stat.S_ISSOCK(sock.st_mode):
            why = f"{path} is not a socket"
        elif sock.st_uid not in (0, user):
            why = f"{path} belongs to uid {sock.st_uid}, neither root nor QEMU's user {user}"
        elif not _listens(qemu, path, proc):
            why = f"process {qemu} does not hold the listening socket at {path}"
    if why:
        raise monitor.MonitorError(f"QMP not asked: {why}")
    return path


def _listens(pid: int, path: str, proc: str) -> bool:
    """Whether ``pid`` holds a listening unix socket bound at ``path``: known before any
    connection, from its network namespace's /proc/net/unix and its own fds."""
    listening = set()
    try:
        with open(f"{proc}/{pid}/net/unix") as f:
            next(f)  # Num RefCount Protocol Flags Type St Inode Path
            for line in f:
                fields = line.split(None, 7)
                # Flags 00010000 is __SO_ACCEPTCON: the socket listens.
                if len(fields) == 8 and fields[7].rstrip("\n") == path and fields[3] == "00010000":
                    listening.add(f"socket:[{fields[6]}]")
        return (
            any(
                os.readlink(f"{proc}/{pid}/fd/{fd}") in listening
                for fd in os.listdir(f"{proc}/{pid}/fd")
            )
            if listening
            else False
        )
    except (OSError, StopIteration):
        return False


def _euid(pid: int, proc: str) -> int:
    with open(f"{proc}/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                return int(line.split()[2])
    raise OSError(f"no Uid line in {proc}/{pid}/status")
