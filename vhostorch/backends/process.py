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

Root never trusts a file QEMU's user can change (a guest that escapes into QEMU is that
user). A VM's work directory NAME.d is made fresh by each start (one found is renamed
away and removed, never reused) and is root's, and so are the files root makes there and
hands QEMU as fds: ``qemu.log`` (QEMU's stdout and stderr) and ``console.log`` (the
serial console, through ``-add-fd``). QEMU's user owns only ``NAME.d/qemu/``, where
QEMU makes its QMP socket; root connects to that socket without following a link and
asks nothing of whoever serves it unless it is this QEMU (its pid and start time, by
SO_PEERCRED), and removes that directory by directory fd, never following a link.
SO_PEERCRED names who made the listening socket, so it keeps out every other VM and user
but not QEMU's own user, who can take QEMU's listener (pidfd_getfd) and answer in its
place: QMP answers are read as untrusted input (a malformed one is a MonitorError), and
root hands that socket only fds QEMU already holds or needs for this very VM.
QEMU is started with no signal blocked, whatever `up` holds.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import time
from itertools import pairwise

from vhostorch.errors import OperationFailed
from vhostorch.kernel import procfs
from vhostorch.qemu.monitor import MonitorError, QmpSocket, connect_unix, peer
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


QEMU_DIR = "qemu"  # in a work directory: the one directory QEMU's user owns
LOG = "qemu.log"  # in a work directory: QEMU's stdout and stderr, root's
CONSOLE = "console.log"  # in a work directory: the serial console, root's
CONSOLE_FDSET = 1  # the -add-fd set QEMU finds the console's fd in
LEGACY_PIDFILE = "qemu.pid"  # where QEMU wrote its pid before QEMU_DIR (state files of then)
WORKDIR_MODE = 0o711  # QEMU's user passes through it to QEMU_DIR and can list nothing
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# New names in a new directory of root's: O_EXCL, and nothing to follow.
_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def files(workdir: str) -> tuple[str, str]:
    """(QMP socket, console log) of a VM's work directory: the socket in QEMU_DIR."""
    return f"{workdir}/{QEMU_DIR}/qmp.sock", f"{workdir}/{CONSOLE}"


def argv(spec: VmSpec, workdir: str, console_fd: int, qemu: str = QEMU) -> list[str]:
    """QEMU's command line for ``spec``: no NIC, a QMP socket, paused, sandboxed; its
    serial console written to ``console_fd`` (QEMU inherits it: ``-add-fd``)."""
    qmp = files(workdir)[0]
    args = [
        qemu, "-name", f"guest={spec.name},debug-threads=on", "-machine", spec.machine,
        "-accel", spec.accel, "-m", str(spec.memory), "-smp", str(spec.cpus),
        "-display", "none", "-nodefaults", "-no-user-config", "-S", "-sandbox", SANDBOX,
        "-qmp", f"unix:{qmp},server=on,wait=off",
        "-add-fd", f"fd={console_fd},set={CONSOLE_FDSET}",
        "-serial", f"file:/dev/fdset/{CONSOLE_FDSET}",
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


def connect(qmp: str, pid: int, started: int | None) -> QmpSocket:
    """An open connection to the QMP socket ``qmp`` of QEMU ``pid`` started at ``started``
    (a link there is not followed; any other server is refused before a byte is sent).
    Raises MonitorError."""
    sock = QmpSocket(qmp, QMP_TIMEOUT)
    sock.open(served_by=pid, started=started, follow=False)
    return sock


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (procfs.start_time); None: gone."""
    return procfs.start_time(pid)


def _unblocked() -> None:
    """In QEMU's process before exec: no signal blocked. The mask is inherited through
    fork and exec, and QEMU was started while `up` held SIGINT, SIGTERM and SIGHUP
    (signals.Held): blocked for life, they left `kill`, `systemctl stop` and `down`'s
    SIGTERM without effect."""
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


def make_workdir(workdir: str, user: RunAs | None) -> int:
    """A new work directory at ``workdir`` (root's, WORKDIR_MODE) with QEMU_DIR in it
    (``user``'s, 0700); an fd of the work directory. Whatever was at ``workdir`` is
    removed first (remove_workdir): a directory found there may hold what QEMU's user
    planted. ``workdir``'s parent is a run directory (rundir: only root writes there), so
    the name is root's between making and opening. Raises OperationFailed."""
    parent, name = os.path.split(workdir)
    remove_workdir(workdir)
    pfd = os.open(parent, _DIR)
    try:
        try:
            os.mkdir(name, 0o700, dir_fd=pfd)
        except FileExistsError:
            raise OperationFailed(
                f"work directory {workdir} is still there after removing it: not reused"
            ) from None
        fd = os.open(name, _DIR, dir_fd=pfd)
    finally:
        os.close(pfd)
    try:
        os.mkdir(QEMU_DIR, 0o700, dir_fd=fd)
        own = os.open(QEMU_DIR, _DIR, dir_fd=fd)
        try:
            os.fchmod(own, 0o700)  # mkdir's mode is masked by the umask
            if user is not None:
                os.fchown(own, user.uid, user.gid)  # QEMU makes its QMP socket here
        finally:
            os.close(own)
        os.fchmod(fd, WORKDIR_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


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
        self.qmp = files(workdir)[0]
        fd = make_workdir(workdir, user)
        try:
            log = os.open(LOG, _NEW, 0o600, dir_fd=fd)
            try:
                console = os.open(CONSOLE, _NEW, 0o600, dir_fd=fd)
            except BaseException:
                os.close(log)
                raise
        finally:
            os.close(fd)
        try:
            self.proc = subprocess.Popen(
                argv(spec, workdir, console, qemu),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=(console,),
                start_new_session=True,  # outlives `up`, and a terminal's ^C is not for it
                user=None if user is None else user.uid,
                group=None if user is None else user.gid,
                extra_groups=None if user is None else list(user.groups),
                umask=0o077,
                preexec_fn=_unblocked,  # vhostorch has one thread: nothing to deadlock on
            )
        except FileNotFoundError:
            remove_workdir(workdir)
            raise OperationFailed(f"{qemu} is not installed (Debian: qemu-system-x86)") from None
        finally:
            os.close(log)
            os.close(console)
        # Our child, not yet reaped: its pid cannot be reused while we read its start time.
        self.pid = self.proc.pid
        self.start_time = start_time(self.pid)

    def _exited(self) -> OperationFailed:
        self.proc.wait()
        said = _tail(self.workdir)
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
                sock = self.connect()
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

    def connect(self) -> QmpSocket:
        """An open connection to this QEMU's QMP socket. Raises MonitorError."""
        return connect(self.qmp, self.pid, self.start_time)

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


def _is_qemu(pid: int) -> bool:
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe")).startswith("qemu-system-")
    except OSError:
        return False


def _small(workdir: str, name: str, limit: int) -> bytes | None:
    """At most the last ``limit`` bytes of regular file ``name`` in ``workdir``, opened with
    O_NOFOLLOW and O_NONBLOCK (a link, a FIFO or a device put there is not read); None when
    there is none."""
    try:
        fd = os.open(workdir, _DIR)
    except OSError:
        return None
    try:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        file = os.open(name, flags, dir_fd=fd)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        size = os.fstat(file)
        if not stat.S_ISREG(size.st_mode):
            return None
        return os.pread(file, limit, max(0, size.st_size - limit))
    except OSError:
        return None
    finally:
        os.close(file)


def _tail(workdir: str) -> str:
    """The end of QEMU's stdout and stderr (LOG: root's, but QEMU may have written much)."""
    return (_small(workdir, LOG, 4096) or b"").decode(errors="replace")


def _legacy_ours(pid: int, workdir: str) -> bool:
    """For a state file without a start time (vhostorch before start times and QEMU_DIR):
    QEMU's binary, with exactly this work directory's pid file on its command line, and
    that pid file names it. A process that merely mentions the work directory (``tail -F
    .../console.log``) is not it."""
    pidfile = f"{workdir}/{LEGACY_PIDFILE}"
    named = any(a == b"-pidfile" and b == pidfile.encode() for a, b in pairwise(_argv(pid)))
    return _is_qemu(pid) and named and _legacy_pid(workdir) == pid


def _legacy_pid(workdir: str) -> int | None:
    try:
        return int(_small(workdir, LEGACY_PIDFILE, 32) or b"")
    except ValueError:
        return None


def ours(pid: int, started: int | None, workdir: str) -> bool:
    """Whether ``pid`` is still the QEMU vhostorch started (pids are reused)."""
    if started is None:
        return _legacy_ours(pid, workdir)
    return start_time(pid) == started


def find(workdir: str, after: int) -> tuple[int, int] | None:
    """(pid, start time) of the QEMU a start that died left in ``workdir``: the process
    serving its QMP socket (SO_PEERCRED; a link there is not followed), as the user who
    owns QEMU_DIR, running QEMU's binary with this very socket on its command line, and
    started after ``after`` (boot ticks). QEMU's user can put another socket there: what
    it leads to is then one of that user's own processes, or nothing."""
    qmp = files(workdir)[0]
    try:
        owner = os.stat(os.path.dirname(qmp), follow_symlinks=False).st_uid
        sock = connect_unix(qmp, QMP_TIMEOUT, follow=False)
    except (OSError, MonitorError):
        return _legacy_find(workdir, after)
    try:
        pid, uid, _ = peer(sock)
    except OSError:
        return None
    finally:
        sock.close()
    mine = f"unix:{qmp},server=on,wait=off".encode()
    named = any(a == b"-qmp" and b == mine for a, b in pairwise(_argv(pid)))
    started = start_time(pid)
    if uid != owner or not named or not _is_qemu(pid) or started is None or started < after:
        return None
    return pid, started


def _legacy_find(workdir: str, after: int) -> tuple[int, int] | None:
    """find for a work directory of vhostorch before QEMU_DIR: named by its pid file."""
    pid = _legacy_pid(workdir)
    if pid is None or not _legacy_ours(pid, workdir):
        return None
    started = start_time(pid)
    return None if started is None or started < after else (pid, started)


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
            _quit(workdir, pid, started)
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


def _quit(workdir: str, pid: int, started: int | None) -> None:
    # Before QEMU_DIR (no start time either), the socket was the work directory's own.
    qmp = files(workdir)[0] if started is not None else f"{workdir}/qmp.sock"
    try:
        sock = connect(qmp, pid, started)
        try:
            sock.execute("quit", None)
        finally:
            sock.close()
    except MonitorError:
        pass  # signals follow


def remove_workdir(workdir: str) -> None:
    """Remove a VM's work directory and all in it; gone already is fine.

    It is first renamed, in its parent (a run directory: root's alone), to a name of its
    own, so that one whose QEMU's user keeps adding to it is never found and reused; it and
    its QEMU_DIR become root's and 0700 before they are emptied (nobody else can then add
    to them), and nothing in them is followed (shutil.rmtree works by directory fd). What
    still cannot be removed stays under that name, and so does what a removal killed half
    way left: each removal removes every such name it finds too.
    """
    parent, name = os.path.split(workdir)
    try:
        pfd = os.open(parent, _DIR)
    except OSError:
        return
    try:
        gone = f"{_GONE}{os.urandom(8).hex()}"
        try:
            os.rename(name, gone, src_dir_fd=pfd, dst_dir_fd=pfd)
        except FileNotFoundError:
            pass  # none: what earlier removals left is still removed below
        # A removal killed half way (SIGKILL while emptying a directory QEMU's user had
        # filled: 200,000 files there) left its name, and nothing else ever removed it.
        for entry in os.listdir(pfd):
            if entry.startswith(_GONE):
                _purge(pfd, parent, entry)
    finally:
        os.close(pfd)


_GONE = ".gone-"  # the name prefix a work directory is renamed to before it is removed


def _purge(pfd: int, parent: str, gone: str) -> None:
    """Remove ``gone`` (in ``parent``, open as ``pfd``): seized, then emptied by dir fd."""
    import shutil

    try:
        fd = os.open(gone, _DIR, dir_fd=pfd)
    except FileNotFoundError:
        return  # another removal took it
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(gone, dir_fd=pfd)  # not a directory (a link, say): only root puts one here
        return
    try:
        _seize(fd)
        try:
            own = os.open(QEMU_DIR, _DIR, dir_fd=fd)
        except OSError:
            pass  # none (a work directory from before QEMU_DIR), or not a directory
        else:
            try:
                _seize(own)
            finally:
                os.close(own)
    finally:
        os.close(fd)
    try:
        shutil.rmtree(gone, dir_fd=pfd, ignore_errors=True)
    except RecursionError:
        # shutil.rmtree recurses once per level (Python 3.11): QEMU's user nested
        # directories deeper than the recursion limit, and `down` failed half done
        # (state and taps left). coreutils rm walks any depth by directory fd and
        # follows no link; the name is root's, in a directory only root writes.
        subprocess.run(
            ["rm", "-rf", "--one-file-system", "--", os.path.join(parent, gone)],
            stdin=subprocess.DEVNULL, capture_output=True, check=False,
        )  # fmt: skip


def _seize(fd: int) -> None:
    try:
        os.fchown(fd, os.geteuid(), os.getegid())
        os.fchmod(fd, 0o700)
    except OSError:
        pass  # not root: it is ours already, or the removal fails and says nothing
