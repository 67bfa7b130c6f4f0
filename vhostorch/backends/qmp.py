"""The QMP backend: QEMU with no network on its command line; NICs added over QMP.

vhostorch opens each NIC's tap queues and one /dev/vhost-net per queue itself
and hands the fds to QEMU over the QMP socket (SCM_RIGHTS + ``getfd``), then
``netdev_add`` (type tap, ``fds``, ``vhost``, ``vhostfds``) and ``device_add``.
QEMU thus needs no access to /dev/net/tun or /dev/vhost-net, as under libvirt.

QEMU runs daemonized (``-daemonize``): its first process exits only once the
machine is built (kernel loaded, QMP socket listening), with QEMU's own error on
stderr when that fails, so a bad start is known at once and not by a timeout.
It starts paused (``-S``) and runs once its NICs are in.

QEMU 7.2 behaviour relied on: a netdev takes the fds named by ``getfd`` (they
leave the monitor's list); ``netdev_del`` closes them; ``device_del`` finishes
only when the guest has released the device (ACPI eject), so unplugging waits
for the device to leave ``/machine/peripheral`` before deleting its netdev.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

from vhostorch.errors import OperationFailed
from vhostorch.kernel import procfs, tun
from vhostorch.qemu.monitor import MonitorError, QmpSocket
from vhostorch.record import TYPE_CHECKING
from vhostorch.vm.spec import disk_format

if TYPE_CHECKING:
    from vhostorch.vm.spec import NicSpec, VmSpec

QEMU = "qemu-system-x86_64"
START_TIMEOUT = 60.0  # QEMU building the machine (loading a kernel) before it daemonizes
QMP_TIMEOUT = 10.0
QUIT_TIMEOUT = 10.0
UNPLUG_TIMEOUT = 30.0


def ids(tap: str) -> tuple[str, str]:
    """(device id, netdev id) of the NIC on ``tap``: QEMU ids start with a letter."""
    return f"nic.{tap}", f"tap.{tap}"


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


def device_args(nic: NicSpec) -> dict[str, object]:
    """``device_add`` arguments: ``vectors`` = 2N+2 (a vector per virtqueue, control, config)."""
    device, netdev = ids(nic.tap.name)
    args: dict[str, object] = {
        "driver": "virtio-net-pci", "id": device, "netdev": netdev, "mac": nic.mac,
    }  # fmt: skip
    if nic.queues > 1:
        args.update(mq=True, vectors=nic.vectors)
    if nic.rx_queue_size is not None:
        args["rx_queue_size"] = nic.rx_queue_size
    if nic.tx_queue_size is not None:
        args["tx_queue_size"] = nic.tx_queue_size
    if nic.tap.mtu is not None:
        args["host_mtu"] = nic.tap.mtu  # offered to the guest (VIRTIO_NET_F_MTU)
    return args


def _connect(qmp: str) -> QmpSocket:
    sock = QmpSocket(qmp, QMP_TIMEOUT)
    sock.open()
    return sock


def _open_queues(nic: NicSpec) -> list[int]:
    import errno

    try:
        return tun.open_queues(nic.tap.name, nic.queues)
    except OSError as err:
        why = err.strerror or str(err)
        if err.errno == errno.EBUSY:
            who = ", ".join(f"pid {p} ({c})" for p, c in tun.holders(nic.tap.name))
            why = f"it is in use{' by ' + who if who else ''}"
        elif err.errno == errno.EINVAL:
            why = "its queue mode differs from the NIC's queues"
        message = f"tap {nic.tap.name}: cannot open {nic.queues} queue(s): {why}"
        raise OperationFailed(message) from None


def _open_vhost(count: int) -> list[int]:
    fds: list[int] = []
    try:
        for _ in range(count):
            fds.append(os.open(procfs.VHOST_NET, os.O_RDWR | os.O_CLOEXEC))
    except OSError as err:
        for fd in fds:
            os.close(fd)
        raise OperationFailed(f"{procfs.VHOST_NET} does not open: {err.strerror}") from None
    return fds


def add_nic(sock: QmpSocket, nic: NicSpec, vhost_on: bool) -> None:
    """Open the NIC's queues (and vhost devices), pass them to QEMU, add netdev and device.

    All or nothing: on a failure the fds QEMU was given are released and the netdev
    removed. Raises OperationFailed (MonitorError for QEMU's refusals).
    """
    netdev = ids(nic.tap.name)[1]
    ours = _open_queues(nic)
    named: list[str] = []
    try:
        vhosts = _open_vhost(nic.queues) if vhost_on else []
        ours += vhosts
        tap_names = [f"{netdev}.q{i}" for i in range(nic.queues)]
        vhost_names = [f"{netdev}.v{i}" for i in range(len(vhosts))]
        # Tap then vhost device, queue by queue: QEMU numbers them in this order.
        order = [(ours[i], tap_names[i]) for i in range(nic.queues)]
        for i, fd in enumerate(vhosts):
            order.insert(2 * i + 1, (fd, vhost_names[i]))
        for fd, name in order:
            sock.pass_fd(fd, name)
            named.append(name)
        args: dict[str, object] = {"type": "tap", "id": netdev, "fds": ":".join(tap_names)}
        args["vhost"] = vhost_on
        if vhost_on:
            args["vhostfds"] = ":".join(vhost_names)
        sock.execute("netdev_add", args)
        named = []  # the netdev holds them now
        try:
            sock.execute("device_add", device_args(nic))
        except MonitorError:
            _quietly(sock, "netdev_del", {"id": netdev})
            raise
    except BaseException:
        for name in named:
            _quietly(sock, "closefd", {"fdname": name})
        raise
    finally:
        for fd in ours:
            os.close(fd)  # QEMU has its own copies


def _quietly(sock: QmpSocket, command: str, args: dict[str, object]) -> None:
    try:
        sock.execute(command, args)
    except MonitorError:
        pass  # undoing after a failure that is already being reported


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
            _remove(workdir)
            raise OperationFailed(f"{qemu} is not installed (Debian: qemu-system-x86)") from None

    def ready(self) -> int:
        """Wait until QEMU has built the machine and daemonized; its pid. Raises OperationFailed."""
        try:
            _, err = self.proc.communicate(timeout=START_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.abort()
            raise OperationFailed(f"QEMU did not start within {START_TIMEOUT:.0f} s") from None
        if self.proc.returncode != 0:
            _remove(self.workdir)
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


def start(launch: Launch, nics: list[tuple[NicSpec, bool]]) -> int:
    """Add ``nics`` ((spec, vhost on)) to the QEMU being launched and let it run; its pid.

    On any failure QEMU is stopped and its work directory removed. Raises OperationFailed.
    """
    pid = launch.ready()
    try:
        sock = _connect(launch.qmp)
        try:
            for nic, vhost_on in nics:
                add_nic(sock, nic, vhost_on)
            sock.execute("cont", None)
        finally:
            sock.close()
    except BaseException:
        stop(pid, launch.qmp, launch.workdir)
        raise
    return pid


def _pid(pidfile: str) -> int | None:
    try:
        with open(pidfile) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def attach(qmp: str, nic: NicSpec, vhost_on: bool) -> None:
    """Hot-plug ``nic`` into the running QEMU behind ``qmp``. Raises OperationFailed."""
    sock = _connect(qmp)
    try:
        add_nic(sock, nic, vhost_on)
    finally:
        sock.close()


def _peripherals(sock: QmpSocket) -> set[str]:
    return {str(p.get("name")) for p in sock.execute("qom-list", {"path": "/machine/peripheral"})}


def detach(qmp: str, tap: str, timeout: float = UNPLUG_TIMEOUT) -> None:
    """Unplug the NIC on ``tap``: device_del, wait for the guest to release it, netdev_del.

    Raises OperationFailed when the guest does not release it in time (the NIC
    then stays as it was: attached, with its tap).
    """
    device, netdev = ids(tap)
    sock = _connect(qmp)
    try:
        if device in _peripherals(sock):
            sock.execute("device_del", {"id": device})
            deadline = time.monotonic() + timeout
            while device in _peripherals(sock):
                if time.monotonic() > deadline:
                    raise OperationFailed(
                        f"the guest did not release NIC {device} within {timeout:.0f} s (it needs "
                        "a running OS with ACPI hot-plug); it stays attached"
                    )
                time.sleep(0.1)
        sock.execute("netdev_del", {"id": netdev})
    finally:
        sock.close()


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
            sock = _connect(qmp)
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
    _remove(workdir)


def _remove(workdir: str) -> None:
    import shutil

    shutil.rmtree(workdir, ignore_errors=True)
