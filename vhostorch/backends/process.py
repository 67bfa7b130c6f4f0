"""A QEMU run by vhostorch: its command line, its user, its work directory, its start and stop.

QEMU runs as an unprivileged user (libvirt's QEMU user by default) under its seccomp
sandbox with every option on, as libvirt runs it: vhostorch opens the taps and
/dev/vhost-net and passes the fds, so QEMU needs no privilege. Measured on QEMU 7.2:
``-daemonize`` forks after the sandbox is installed, so with ``spawn=deny`` QEMU dies
of SIGSYS; ``-runas`` calls setuid after it too, so with ``elevateprivileges=deny`` it
exits 1 without a word. So QEMU is not daemonized and does not drop privileges
itself: vhostorch starts it in its own session with the user's uid, gid and groups
already set (as libvirt does), and knows it is up when QMP answers a command (QMP
commands run in the main loop, which runs only once the machine is built). It starts
paused (``-S``) and without any NIC; vhostorch.backends.qmp adds them and lets it run.

A QEMU is named by its pid and its start time (field 22 of /proc/PID/stat): a pid
alone can be reused by anything once QEMU is gone, so nothing is signalled unless
both match, and signals go through a pidfd opened before the start time is compared.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from itertools import pairwise

from vhostorch.errors import OperationFailed
from vhostorch.kernel import procfs
from vhostorch.qemu.monitor import MonitorError, QmpSocket
from vhostorch.record import TYPE_CHECKING, Record
from vhostorch.vm.spec import disk_format

if TYPE_CHECKING:
    from vhostorch.vm.spec import VmSpec

QEMU = "qemu-system-x86_64"
ROOT_PORT = "vho.port"  # id prefix of the pcie-root-ports a q35 VM's NICs are plugged into
START_TIMEOUT = 60.0  # QEMU building the machine (loading a kernel) before QMP answers
QMP_TIMEOUT = 10.0
QUIT_TIMEOUT = 10.0
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
ROOT = "root"  # the run-as value that keeps QEMU root (said as a warning)


class RunAs(Record):
    """The user QEMU runs as: name, uid, gid and supplementary groups."""

    user: str
    uid: int
    gid: int
    groups: tuple[int, ...]

    @classmethod
    def named(cls, user: str) -> RunAs:
        """Raises OperationFailed when there is no such user."""
        import pwd

        try:
            entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        except (KeyError, OverflowError):
            raise OperationFailed(f"QEMU cannot run as {user!r}: there is no such user") from None
        groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid, groups)


def default_user() -> str | None:
    """libvirt's QEMU user (qemu.conf's ``user``, else libvirt-qemu or qemu), None if none."""
    from vhostorch.libvirt import qemuconf

    try:
        settings = qemuconf.read() or {}
    except OSError:
        settings = {}
    return qemuconf.qemu_user(settings)


def run_as(user: str | None) -> RunAs | None:
    """Who QEMU runs as for ``user`` (None: the default); None means root."""
    user = user or default_user()
    if user is None or user == ROOT:
        return None
    found = RunAs.named(user)
    return None if found.uid == 0 else found


def files(workdir: str) -> tuple[str, str, str]:
    """(QMP socket, pid file, console log) in a VM's work directory."""
    return (f"{workdir}/qmp.sock", f"{workdir}/qemu.pid", f"{workdir}/console.log")


def _log(workdir: str) -> str:
    return f"{workdir}/qemu.log"


def argv(spec: VmSpec, workdir: str, qemu: str = QEMU) -> list[str]:
    """QEMU's command line for ``spec``: no NIC, a QMP socket, paused, sandboxed."""
    qmp, pidfile, console = files(workdir)
    args = [
        qemu, "-name", f"guest={spec.name},debug-threads=on", "-machine", spec.machine,
        "-accel", spec.accel, "-m", str(spec.memory), "-smp", str(spec.cpus),
        "-display", "none", "-nodefaults", "-no-user-config", "-S", "-sandbox", SANDBOX,
        "-pidfile", pidfile, "-qmp", f"unix:{qmp},server=on,wait=off",
        "-serial", f"file:{console}",
    ]  # fmt: skip
    if spec.accel == "kvm":
        args += ["-cpu", "host"]
    for index in range(spec.root_ports):
        # Each on its own chassis, so their slot numbers (0) never clash.
        args += ["-device", f"pcie-root-port,id={ROOT_PORT}{index},chassis={index + 1}"]
    if spec.kernel is not None:
        args += ["-kernel", spec.kernel]
        if spec.initrd is not None:
            args += ["-initrd", spec.initrd]
        if spec.cmdline is not None:
            args += ["-append", spec.cmdline]
    elif spec.disk is not None:
        fmt = disk_format(spec.disk)
        args += ["-drive", f"file={spec.disk.replace(',', ',,')},if=virtio,format={fmt}"]
    return args


def connect(qmp: str) -> QmpSocket:
    """An open connection to the QMP socket ``qmp``. Raises MonitorError."""
    sock = QmpSocket(qmp, QMP_TIMEOUT)
    sock.open()
    return sock


def boot_ticks() -> int:
    """Now, in the clock ticks after boot that /proc/PID/stat's start time counts."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * os.sysconf("SC_CLK_TCK"))


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (after the command name, which may hold spaces); None: gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


class Launch:
    """A QEMU being built: started at once, so that its set-up overlaps vhostorch's own.

    ``started`` is called with (pid, start time) as soon as QEMU exists, so that the
    caller records it before anything else can happen.
    """

    def __init__(
        self, spec: VmSpec, workdir: str, user: RunAs | None = None, qemu: str = QEMU
    ) -> None:
        self.workdir = workdir
        self.qemu = qemu
        self.qmp, self.pidfile, _ = files(workdir)
        os.makedirs(workdir, mode=0o700, exist_ok=True)
        os.chmod(workdir, 0o700)
        if user is not None:
            os.chown(workdir, user.uid, user.gid)  # QEMU makes its socket, pid file and log here
        log = os.open(_log(workdir), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            self.proc = subprocess.Popen(
                argv(spec, workdir, qemu),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # outlives `up`, and a terminal's ^C is not for it
                user=None if user is None else user.uid,
                group=None if user is None else user.gid,
                extra_groups=None if user is None else list(user.groups),
                umask=0o077,
            )
        except FileNotFoundError:
            remove_workdir(workdir)
            raise OperationFailed(f"{qemu} is not installed (Debian: qemu-system-x86)") from None
        finally:
            os.close(log)
        # Our child, not yet reaped: its pid cannot be reused while we read its start time.
        self.pid = self.proc.pid
        self.start_time = start_time(self.pid)

    def _exited(self) -> OperationFailed:
        self.proc.wait()
        try:
            with open(_log(self.workdir), errors="replace") as f:
                said = f.read()
        except OSError:
            said = ""
        remove_workdir(self.workdir)
        prefix = f"{os.path.basename(self.qemu)}: "
        lines = [
            line.strip().removeprefix(prefix) for line in said.splitlines()[-4:] if line.strip()
        ]
        return OperationFailed(
            f"QEMU exited at start: {'; '.join(lines) or f'exit status {self.proc.returncode}'}"
        )

    def ready(self) -> int:
        """Wait until QEMU has built the machine (QMP answers); its pid. Raises OperationFailed."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise self._exited()
            try:
                sock = connect(self.qmp)
                try:
                    sock.execute("query-status", None)
                finally:
                    sock.close()
                return self.pid
            except MonitorError:
                if self.proc.poll() is not None:
                    raise self._exited() from None
            if time.monotonic() > deadline:
                self.abort()
                raise OperationFailed(f"QEMU did not start within {START_TIMEOUT:.0f} s")
            time.sleep(0.02)

    def abort(self) -> None:
        """Stop this QEMU, whatever stage it reached (our child: its pid is not reused until
        it is reaped here). Not through Popen's poll or wait: a signal that interrupted an
        earlier Popen.poll (the wait for QMP polls it) can leave Popen's internal lock held,
        and Popen.wait then blocks for ever (seen: an `up` stuck 45 minutes after SIGTERM)."""
        if self.proc.returncode is None:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                _, status = os.waitpid(self.proc.pid, 0)
                self.proc.returncode = os.waitstatus_to_exitcode(status)
            except ChildProcessError:
                pass  # reaped already
        remove_workdir(self.workdir)


def _argv(pid: int) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def _legacy_ours(pid: int, workdir: str) -> bool:
    """For a state file without a start time: QEMU's binary, with exactly this work directory's
    pid file on its command line, and that pid file names it. A process that merely mentions
    the work directory (``tail -F .../console.log``) is not it."""
    try:
        exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return False
    args = _argv(pid)
    pidfile = files(workdir)[1]
    named = any(a == b"-pidfile" and b == pidfile.encode() for a, b in pairwise(args))
    return exe.startswith("qemu-system-") and named and _pid(pidfile) == pid


def ours(pid: int, started: int | None, workdir: str) -> bool:
    """Whether ``pid`` is still the QEMU vhostorch started (pids are reused)."""
    if started is None:
        return _legacy_ours(pid, workdir)
    return start_time(pid) == started


def find(workdir: str, after: int) -> tuple[int, int] | None:
    """(pid, start time) of the QEMU a start that died left in ``workdir``: named by its pid
    file, started after ``after`` (boot ticks), and QEMU's binary with that pid file."""
    pid = _pid(files(workdir)[1])
    if pid is None or not _legacy_ours(pid, workdir):
        return None
    started = start_time(pid)
    return None if started is None or started < after else (pid, started)


def _pid(pidfile: str) -> int | None:
    try:
        with open(pidfile) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while procfs.alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def stop(pid: int | None, started: int | None, workdir: str, timeout: float = QUIT_TIMEOUT) -> None:
    """Stop the QEMU vhostorch started: QMP ``quit``, then SIGTERM, then SIGKILL, by pidfd.

    Nothing is signalled unless ``pid`` is still that QEMU (``ours``), checked after
    the pidfd is open: the pidfd then names that process even if it exits meanwhile.
    """
    pidfd = -1
    if pid is not None:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            pass
    try:
        if pidfd >= 0 and pid is not None and ours(pid, started, workdir):
            _quit(files(workdir)[0])
            for sig in (signal.SIGTERM, signal.SIGKILL):
                if _wait_gone(pid, timeout):
                    break
                try:
                    signal.pidfd_send_signal(pidfd, sig)
                except ProcessLookupError:
                    break
            if not _wait_gone(pid, timeout):
                # Only a task blocked in the kernel outlives SIGKILL; its files stay for a look.
                raise OperationFailed(
                    f"QEMU pid {pid} does not exit, even on SIGKILL (blocked in the kernel: "
                    f"see /proc/{pid}/stack)"
                )
    finally:
        if pidfd >= 0:
            os.close(pidfd)
    remove_workdir(workdir)


def _quit(qmp: str) -> None:
    try:
        sock = connect(qmp)
        try:
            sock.execute("quit", None)
        finally:
            sock.close()
    except MonitorError:
        pass  # signals follow


def remove_workdir(workdir: str) -> None:
    """Remove a VM's work directory (console log, QMP socket, pid file); gone already is fine."""
    import shutil

    shutil.rmtree(workdir, ignore_errors=True)
