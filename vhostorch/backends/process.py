"""A QEMU run by vhostorch: its command line, its work directory, its start and its stop.

QEMU runs daemonized (``-daemonize``): its first process exits only once the
machine is built (kernel loaded, QMP socket listening), with QEMU's own error on
stderr when that fails, so a bad start is known at once and not by a timeout.
It starts paused (``-S``) and without any NIC; vhostorch.backends.qmp adds them
and lets it run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

from vhostorch.errors import OperationFailed
from vhostorch.kernel import procfs
from vhostorch.qemu.monitor import MonitorError, QmpSocket
from vhostorch.record import TYPE_CHECKING
from vhostorch.vm.spec import disk_format

if TYPE_CHECKING:
    from vhostorch.vm.spec import VmSpec

QEMU = "qemu-system-x86_64"
START_TIMEOUT = 60.0  # QEMU building the machine (loading a kernel) before it daemonizes
QMP_TIMEOUT = 10.0
QUIT_TIMEOUT = 10.0


def files(workdir: str) -> tuple[str, str, str]:
    """(QMP socket, pid file, console log) in a VM's work directory."""
    return (f"{workdir}/qmp.sock", f"{workdir}/qemu.pid", f"{workdir}/console.log")


def argv(spec: VmSpec, workdir: str, qemu: str = QEMU) -> list[str]:
    """QEMU's command line for ``spec``: no NIC, a QMP socket, paused, daemonized."""
    qmp, pidfile, console = files(workdir)
    args = [
        qemu, "-name", f"guest={spec.name},debug-threads=on", "-machine", spec.machine,
        "-accel", spec.accel, "-m", str(spec.memory), "-smp", str(spec.cpus),
        "-display", "none", "-nodefaults", "-no-user-config", "-S", "-daemonize",
        "-pidfile", pidfile, "-qmp", f"unix:{qmp},server=on,wait=off",
        "-serial", f"file:{console}",
    ]  # fmt: skip
    if spec.accel == "kvm":
        args += ["-cpu", "host"]
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


class Launch:
    """A QEMU being built: started at once, so that its set-up overlaps vhostorch's own."""

    def __init__(self, spec: VmSpec, workdir: str, qemu: str = QEMU) -> None:
        os.makedirs(workdir, mode=0o755, exist_ok=True)
        self.workdir = workdir
        self.qemu = qemu
        self.qmp, self.pidfile, _ = files(workdir)
        try:
            self.proc = subprocess.Popen(
                argv(spec, workdir, qemu),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        except FileNotFoundError:
            remove_workdir(workdir)
            raise OperationFailed(f"{qemu} is not installed (Debian: qemu-system-x86)") from None

    def ready(self) -> int:
        """Wait until QEMU has built the machine and daemonized; its pid. Raises OperationFailed."""
        try:
            _, err = self.proc.communicate(timeout=START_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.abort()
            raise OperationFailed(f"QEMU did not start within {START_TIMEOUT:.0f} s") from None
        if self.proc.returncode != 0:
            remove_workdir(self.workdir)
            prefix = f"{os.path.basename(self.qemu)}: "
            lines = [
                line.strip().removeprefix(prefix)
                for line in err.decode(errors="replace").splitlines()[-4:]
                if line.strip()
            ]
            said = "; ".join(lines) or f"exit status {self.proc.returncode}"
            raise OperationFailed(f"QEMU exited at start: {said}")
        pid = _pid(self.pidfile)
        if pid is None:
            self.abort()
            raise OperationFailed(f"QEMU started but wrote no pid file ({self.pidfile})")
        return pid

    def abort(self) -> None:
        """Stop this QEMU, whatever stage it reached."""
        if self.proc.poll() is None:
            self.proc.kill()  # the launcher vhostorch started; its daemon is stopped below
        self.proc.communicate()
        stop(_pid(self.pidfile), self.qmp, self.workdir)


def _pid(pidfile: str) -> int | None:
    try:
        with open(pidfile) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _ours(pid: int, workdir: str) -> bool:
    """Whether ``pid`` is still the QEMU vhostorch started (pids are reused)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f"{workdir}/".encode() in f.read()
    except OSError:
        return False


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while procfs.alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def stop(pid: int | None, qmp: str, workdir: str, timeout: float = QUIT_TIMEOUT) -> None:
    """Stop the QEMU vhostorch started: QMP ``quit``, then SIGTERM, then SIGKILL, by pid."""
    if pid is not None and _ours(pid, workdir):
        try:
            sock = connect(qmp)
            try:
                sock.execute("quit", None)
            finally:
                sock.close()
        except MonitorError:
            pass  # signals follow
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if _wait_gone(pid, timeout):
                break
            if _ours(pid, workdir):
                os.kill(pid, sig)
        if not _wait_gone(pid, timeout):
            # Only a task blocked in the kernel outlives SIGKILL; its files stay for a look.
            raise OperationFailed(
                f"QEMU pid {pid} does not exit, even on SIGKILL (blocked in the kernel: "
                f"see /proc/{pid}/stack)"
            )
    remove_workdir(workdir)


def remove_workdir(workdir: str) -> None:
    """Remove a VM's work directory (console log, QMP socket, pid file); gone already is fine."""
    import shutil

    shutil.rmtree(workdir, ignore_errors=True)
