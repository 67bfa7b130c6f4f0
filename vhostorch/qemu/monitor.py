"""What QEMU's monitor says about its virtio-net devices: the only importer of qemu.qmp.

The questions (``read_virtio``) are asked through any ``execute`` callable, so
the same code runs over a QMP socket (here, with qemu.qmp; asyncio stays inside
this module) or through libvirt's monitor pass-through (vhostorch.libvirt.connection).

QEMU 7.2 facts relied on: ``x-query-virtio-status`` reports ``vhost-dev`` only
while vhost is started, and only for queue pair 0's vhost device (each queue
pair has its own; QEMU starts them all or none). Status and feature strings
read ``"NAME: description"``. ``x-query-virtio-vhost-queue-status`` returns 0
for ``kick`` and ``call``, so it is not used.
"""

from __future__ import annotations

import os

# The error raised here, also importable from here (the tree is in vhostorch.errors).
from vhostorch.errors import MonitorError as MonitorError
from vhostorch.kernel import procfs
from vhostorch.record import TYPE_CHECKING, Record

if TYPE_CHECKING:
    import socket
    from collections.abc import Callable
    from typing import Any

    Execute = Callable[[str, dict[str, Any] | None], Any]

DRIVER_OK = "VIRTIO_CONFIG_S_DRIVER_OK"


def _names(entries: object) -> list[str]:
    """``["VIRTIO_NET_F_MQ: Multiqueue ...", ...]`` → ``["VIRTIO_NET_F_MQ", ...]``."""
    if not isinstance(entries, list):
        return []
    return [str(e).split(":", 1)[0].strip() for e in entries]


def _features(value: object) -> tuple[str, ...]:
    """A VirtioDeviceFeatures: transport features (VERSION_1, EVENT_IDX...) and device ones."""
    if not isinstance(value, dict):
        return ()
    return tuple(_names(value.get("transports")) + _names(value.get("dev-features")))


class VirtioNet(Record):
    """One virtio-net device as the monitor sees it."""

    device: str
    path: str
    netdev: str | None
    statuses: tuple[str, ...]
    vhost_started: bool
    vm_running: bool
    num_vqs: int
    vhost: dict[str, object] | None
    guest_features: tuple[str, ...]
    acked_features: tuple[str, ...]

    @property
    def driver_ok(self) -> bool:
        return DRIVER_OK in self.statuses


class MonitorView(Record):
    source: str
    kvm: dict[str, object]
    nics: tuple[VirtioNet, ...]

    def nic_for(self, device: str | None, netdev: str | None) -> VirtioNet | None:
        for nic in self.nics:
            if (device and nic.device == device) or (netdev and nic.netdev == netdev):
                return nic
        return None


def read_virtio(execute: Execute, source: str) -> MonitorView:
    """Ask the monitor about every virtio-net device. Raises MonitorError."""
    nics = []
    for entry in execute("x-query-virtio", None):
        if entry.get("name") != "virtio-net":
            continue
        backend = str(entry["path"])
        path = backend.removesuffix("/virtio-backend")
        status = execute("x-query-virtio-status", {"path": backend})
        netdev = execute("qom-get", {"path": path, "property": "netdev"})
        vhost = status.get("vhost-dev")
        acked = vhost.get("acked-features") if isinstance(vhost, dict) else None
        nics.append(
            VirtioNet(
                device=path.rsplit("/", 1)[1] if "/peripheral/" in path else path,
                path=path,
                netdev=netdev if isinstance(netdev, str) and netdev else None,
                statuses=tuple(_names(status.get("status", {}).get("statuses"))),
                vhost_started=bool(status.get("vhost-started")),
                vm_running=bool(status.get("vm-running")),
                num_vqs=int(status.get("num-vqs", 0)),
                vhost=vhost if isinstance(vhost, dict) else None,
                guest_features=_features(status.get("guest-features")),
                acked_features=_features(acked),
            )
        )
    kvm = execute("query-kvm", None)
    return MonitorView(source, kvm if isinstance(kvm, dict) else {}, tuple(nics))


def vhost_started(execute: Execute, device: str) -> bool:
    """Whether vhost runs for the virtio-net device with id ``device`` (one cheap question)."""
    path = f"/machine/peripheral/{device}/virtio-backend"
    return bool(execute("x-query-virtio-status", {"path": path}).get("vhost-started"))


# query-status's "status" while the guest runs; every other state (paused, inmigrate,
# postmigrate, suspended...) is one vhostorch must not pause and resume.
RUNNING = "running"
# query-migrate's statuses while an outgoing migration is under way (qapi/migration.json,
# MigrationStatus); none, completed, failed and cancelled are the ones at rest.
MIGRATING = frozenset((
    "setup", "cancelling", "active", "postcopy-active", "postcopy-paused",
    "postcopy-recover-setup", "postcopy-recover", "colo", "pre-switchover", "device",
    "wait-unplug",
))  # fmt: skip


def run_state(execute: Execute) -> str:
    """QEMU's run state from ``query-status`` ("running", "paused", ...), or
    "migrating (STATUS)" while it runs with an outgoing migration under way. Raises MonitorError.
    """
    status = execute("query-status", None)
    state = str(status.get("status")) if isinstance(status, dict) else "unknown"
    if state != RUNNING:
        return state
    migration = execute("query-migrate", None)
    moving = migration.get("status") if isinstance(migration, dict) else None
    return f"migrating ({moving})" if moving in MIGRATING else state


def stop(execute: Execute) -> None:
    """Pause the guest (QMP ``stop``; QEMU stops vhost before replying). Raises MonitorError."""
    execute("stop", None)


def cont(execute: Execute) -> None:
    """Resume the guest (QMP ``cont``; QEMU restarts vhost before replying). Raises MonitorError.

    ``cont`` on a guest that runs already is accepted and changes nothing.
    """
    execute("cont", None)


class QmpSocket:
    """A synchronous face on qemu.qmp's asyncio client, for one socket."""

    def __init__(self, path: str, timeout: float) -> None:
        import asyncio

        from qemu.qmp import QMPClient

        self.path = path
        self.timeout = timeout
        self.loop = asyncio.new_event_loop()
        self.client = QMPClient("vhostorch")

    def _run(self, coro: Any) -> Any:
        import asyncio

        return self.loop.run_until_complete(asyncio.wait_for(coro, self.timeout))

    def open(
        self, served_by: int | None = None, started: int | None = None, follow: bool = True
    ) -> None:
        """Connect; with ``served_by``, only to that process (SO_PEERCRED of this very
        connection, so the path cannot be swapped between the check and the use), and with
        ``started`` too, only while that pid is still the process started then (its start
        time: pids are reused). ``follow`` False: a symlink at the path is not followed
        (the socket of a QEMU vhostorch started is in its user's directory).

        Raises MonitorError, before a byte is sent when the peer is another process.
        """
        from qemu.qmp import QMPError

        sock = connect_unix(self.path, self.timeout, follow)
        try:
            pid = peer(sock)[0]
            if served_by is not None and pid != served_by:
                raise MonitorError(
                    f"QMP at {self.path} is served by process {pid}, not by QEMU {served_by}: "
                    "not asked"
                )
            if started is not None and procfs.start_time(pid) != started:
                raise MonitorError(
                    f"QMP at {self.path} is served by process {pid}, which is not the QEMU of "
                    "that pid vhostorch started (gone, its pid reused): not asked"
                )
            self._run(self.client.connect(sock))
        except (QMPError, OSError, EOFError, TimeoutError, MonitorError) as err:
            sock.close()
            self.close()
            if isinstance(err, MonitorError):
                raise
            raise MonitorError(f"cannot reach QMP at {self.path}: {_why(err)}") from err

    def execute(self, command: str, arguments: dict[str, Any] | None) -> Any:
        from qemu.qmp import ExecuteError, QMPError

        sent = qmp_request(command, arguments)
        try:
            return self._run(self.client.execute(command, arguments))
        except ExecuteError as err:
            raise MonitorError(
                f"QMP {command}: {err}", error_class=err.error_class, sent=sent
            ) from err
        except (QMPError, OSError, EOFError, TimeoutError) as err:
            raise MonitorError(f"QMP {command}: {_why(err)}", sent=sent) from err

    def pass_fd(self, fd: int, name: str) -> None:
        """Give QEMU a copy of ``fd`` (SCM_RIGHTS) under ``name`` (``getfd``), for netdev_add."""
        from qemu.qmp import QMPError

        try:
            self.client.send_fd_scm(fd)
        except (QMPError, OSError) as err:
            raise MonitorError(f"passing fd {name} to QEMU: {_why(err)}") from err
        self.execute("getfd", {"fdname": name})

    def close(self) -> None:
        from qemu.qmp import QMPError

        try:
            self._run(self.client.disconnect())
        except (QMPError, OSError, EOFError, TimeoutError):
            pass  # closing a connection that may already be gone
        self.loop.close()


class Paused(Record):
    """What one pause and resume did: the run state found first (nothing was done unless it
    was "running"), and how long the guest was held, in ms (from sending the pause until the
    resume returned: an upper bound)."""

    state: str
    ms: float | None
    via: str


def pause_resume(
    path: str,
    served_by: int | None = None,
    while_paused: Callable[[], None] | None = None,
    timeout: float = 5.0,
) -> Paused:
    """``stop`` and ``cont`` the QEMU at QMP socket ``path`` on one connection, if it runs.

    A guest found in any other state (paused, migrating...) is left as it is. Once ``stop``
    was sent, ``cont`` is sent whatever happens (``while_paused`` raising, ``stop`` timing
    out; a second connection if the first broke). Raises MonitorError.
    """
    import time

    sock = QmpSocket(path, timeout)
    sock.open(served_by)
    try:
        state = run_state(sock.execute)
        if state != RUNNING:
            return Paused(state, None, f"qmp:{path}")
        start = time.monotonic()
        try:
            stop(sock.execute)
            if while_paused is not None:
                while_paused()
        finally:
            _resume(sock, path, served_by, timeout)
        return Paused(state, (time.monotonic() - start) * 1000, f"qmp:{path}")
    finally:
        sock.close()


def _resume(sock: QmpSocket, path: str, served_by: int | None, timeout: float) -> None:
    try:
        cont(sock.execute)
        return
    except MonitorError as err:
        if err.error_class is not None:
            raise  # QEMU answered and refused: another connection would hear the same
    again = QmpSocket(path, timeout)
    again.open(served_by)
    try:
        cont(again.execute)
    finally:
        again.close()


def qmp_request(command: str, arguments: dict[str, Any] | None) -> dict[str, object]:
    """A QMP request as it goes on the wire (kept in MonitorError.sent)."""
    request: dict[str, object] = {"execute": command}
    if arguments:
        request["arguments"] = arguments
    return request


def _why(err: BaseException) -> str:
    cause = err.__cause__ or err
    return str(cause) or type(cause).__name__


def read_qmp(path: str, timeout: float = 5.0, served_by: int | None = None) -> MonitorView:
    """read_virtio over the QMP socket at ``path`` (served by process ``served_by``, when
    given: see QmpSocket.open). Raises MonitorError."""
    sock = QmpSocket(path, timeout)
    sock.open(served_by)
    try:
        return read_virtio(sock.execute, f"qmp:{path}")
    finally:
        sock.close()


def connect_unix(path: str, timeout: float, follow: bool = True) -> socket.socket:
    """A stream connection to the unix socket at ``path``; ``follow`` False: only to a
    socket there, never through a symlink (the socket is opened O_PATH|O_NOFOLLOW and
    reached as /proc/self/fd/N, which also lifts sun_path's 108 bytes). Raises MonitorError.
    """
    import socket
    import stat

    target, held = path, -1
    try:
        if not follow:
            held = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
            if not stat.S_ISSOCK(os.fstat(held).st_mode):
                raise MonitorError(f"cannot reach QMP at {path}: not a socket (not followed)")
            target = f"/proc/self/fd/{held}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(target)
        except OSError:
            sock.close()
            raise
    except OSError as err:
        raise MonitorError(f"cannot reach QMP at {path}: {err.strerror or err}") from err
    finally:
        if held >= 0:
            os.close(held)
    return sock


def peer(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process that made the listening end (SO_PEERCRED)."""
    import socket
    import struct

    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3I", creds)
    return pid, uid, gid


def peer_pid(path: str, timeout: float = 5.0) -> int:
    """The pid of the QEMU serving the QMP socket at ``path`` (SO_PEERCRED). Raises MonitorError."""
    sock = connect_unix(path, timeout)
    try:
        return peer(sock)[0]
    except OSError as err:
        raise MonitorError(f"cannot reach QMP at {path}: {err.strerror or err}") from err
    finally:
        sock.close()
