"""What QEMU's monitor says about its virtio-net devices: the only importer of qemu.qmp.

The questions (``read_virtio``) are asked through any ``execute`` callable, so
the same code runs over a QMP socket (here, with qemu.qmp; asyncio stays inside
this module) or through libvirt's monitor pass-through (vhostorch.libvirt.connection).

QEMU 7.2 facts relied on: ``x-query-virtio-status`` reports ``vhost-dev`` only
while vhost is started, and only for queue pair 0's vhost device (each queue
pair has its own; QEMU starts them all or none). Status and feature strings
read ``"NAME: description"``. ``x-query-virtio-vhost-queue-status`` returns 0
for ``kick`` and ``call``, so it is not used. QEMU 10.0 (Debian 13) answers the same, except
``x-query-virtio`` on a machine without virtio devices (``_virtio_devices``).
"""

from __future__ import annotations

import os

# The errors raised here, also importable from here (the tree is in vhostorch.errors).
from vhostorch.errors import LeftPaused as LeftPaused
from vhostorch.errors import MonitorError as MonitorError
from vhostorch.kernel import procfs
from vhostorch.record import TYPE_CHECKING, Record

if TYPE_CHECKING:
    import asyncio
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


# How long one read of a QEMU's monitor over QMP may take in all (read_qmp: the connection,
# the greeting and every question): one deadline for the whole read, not one per question.
# Whoever holds QEMU's socket chooses how many questions a read asks (two per device
# x-query-virtio lists) and can answer each just inside a per-question timeout: 20 devices
# answered after 4.5 s each kept check --all busy for minutes (issue 19, D3).
READ_WITHIN = 5.0
# The most virtio-net devices one read asks about (two questions each); a QEMU that lists
# more is not read (MonitorError), so its checks say unknown, never pass. Above one PCI
# bus's 32 slots; vhostorch's own VMs have far fewer.
MAX_NICS = 64

# What reading a QMP answer of an unexpected shape raises: QEMU's user can answer root in
# QEMU's place (pidfd_getfd of QEMU's listening socket passes the SO_PEERCRED check, and a
# guest that escapes into QEMU is that user), so an answer is input like any other.
MALFORMED = (AttributeError, KeyError, TypeError, ValueError, IndexError)


def read_virtio(execute: Execute, source: str) -> MonitorView:
    """Ask the monitor about every virtio-net device, MAX_NICS at most. Raises MonitorError
    (more devices than that listed, or an answer of another shape than QEMU's too: one
    hostile VM ended check --all, 'internal error')."""
    try:
        return _read_virtio(execute, source)
    except MALFORMED as err:
        raise MonitorError(f"{source}: a malformed answer ({type(err).__name__}: {err})") from err


def _virtio_devices(execute: Execute) -> Any:
    """x-query-virtio's list. QEMU 7.2 answers [] for a machine with no virtio device; 10.0
    (Debian 13) answers GenericError "No virtio devices found" instead, the command's only
    error (it takes no argument): read as the empty list it means."""
    try:
        return execute("x-query-virtio", None)
    except MonitorError as err:
        if err.error_class == "GenericError":
            return []
        raise


def _read_virtio(execute: Execute, source: str) -> MonitorView:
    nics = []
    listed = [e for e in _virtio_devices(execute) if e.get("name") == "virtio-net"]
    if len(listed) > MAX_NICS:
        raise MonitorError(
            f"{source}: QEMU lists {len(listed)} virtio-net devices, more than the {MAX_NICS} "
            "vhostorch asks about: not read"
        )
    for entry in listed:
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


def cont(execute: Execute) -> None:
    """Resume the guest (QMP ``cont``; QEMU restarts vhost before replying). Raises MonitorError.

    ``cont`` on a guest that runs already is accepted and changes nothing.
    """
    execute("cont", None)


class Sent(Record):
    """A command sent on a QmpSocket, its answer still to be read (QmpSocket.answer)."""

    command: str
    request: dict[str, object]
    task: asyncio.Task[Any]


class QmpSocket:
    """A synchronous face on qemu.qmp's asyncio client, for one socket.

    Each exchange (the connection, one command) waits ``timeout`` s at most; with
    ``deadline`` (a time.monotonic() value), all of them together end by then too.
    """

    def __init__(self, path: str, timeout: float, deadline: float | None = None) -> None:
        import asyncio

        from qemu.qmp import QMPClient

        self.path = path
        self.timeout = timeout
        self.deadline = deadline
        self.loop = asyncio.new_event_loop()
        self.client = QMPClient("vhostorch")
        self.pending: set[asyncio.Task[Any]] = set()

    def _within(self) -> float:
        """How long the next exchange may wait: ``timeout``, or less as ``deadline`` nears."""
        import time

        if self.deadline is None:
            return self.timeout
        return max(0.0, min(self.timeout, self.deadline - time.monotonic()))

    def _run(self, coro: Any, within: float) -> Any:
        import asyncio

        from vhostorch import signals

        # A stopping signal waits for the exchange to end (the timeout bounds it): raised
        # inside asyncio's machinery it would leave qemu.qmp's tasks half done and this
        # connection open, and QEMU's monitor serves one client at a time, so a rollback
        # (a hot-plug's unplug) could not reach it; it acts as soon as this returns.
        with signals.Held():
            return self.loop.run_until_complete(asyncio.wait_for(coro, within))

    def connected(self) -> bool:
        """Whether the connection still stands (QEMU may still answer what was sent on it)."""
        from qemu.qmp import Runstate

        return bool(self.client.runstate == Runstate.RUNNING)

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

        within = self._within()
        sock = connect_unix(self.path, within, follow)
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
            self._run(self.client.connect(sock), self._within())
        except BaseException as err:
            # Closed whatever cut the connect short (a stopping signal too): QEMU's monitor
            # serves one client at a time, so a connection left open here would keep the
            # rollback's own (a hot-plug's unplug) waiting until it times out.
            sock.close()
            self.close()
            if isinstance(err, MonitorError) or not isinstance(
                err, (QMPError, OSError, EOFError, TimeoutError, RecursionError)
            ):
                raise
            # QEMU greets and negotiates in its main loop, which a command may hold (stop
            # draining block devices): then the connection stands and nothing answers.
            # The read's own bound, not ``within`` (a deadline began before the connect:
            # within is a little less, and "4.97 s" said nothing more).
            late = f"no answer within {self.timeout:.3g} s"
            why = late if isinstance(err, TimeoutError) else _why(err)
            raise MonitorError(f"cannot reach QMP at {self.path}: {why}") from err

    def execute(self, command: str, arguments: dict[str, Any] | None) -> Any:
        """Send ``command`` and wait for its answer (``timeout`` s, or until ``deadline``;
        nothing is sent once it has passed). Raises MonitorError."""
        within = self._within()
        if within <= 0:
            raise MonitorError(
                f"QMP {command}: not asked, {self._spent()}", sent=qmp_request(command, arguments)
            )
        return self.answer(self.send(command, arguments), within)

    def _spent(self) -> str:
        return f"the {self.timeout:.3g} s all questions of this read share are spent"

    def qom_names(self, path: str) -> list[str]:
        """The names of the properties ``qom-list`` gives for ``path``. Raises MonitorError,
        also for an answer not of QEMU's shape: whoever holds QEMU's socket may answer."""
        answer = self.execute("qom-list", {"path": path})
        if not isinstance(answer, list) or not all(
            isinstance(p, dict) and isinstance(p.get("name"), str) for p in answer
        ):
            raise MonitorError(f"QMP qom-list {path}: the answer is not a list of properties")
        return [p["name"] for p in answer]

    def send(self, command: str, arguments: dict[str, Any] | None) -> Sent:
        """Send ``command``; ``answer`` waits for what QEMU says to it."""
        task = self.loop.create_task(self.client.execute(command, arguments))
        self.pending.add(task)
        task.add_done_callback(self._settled)
        return Sent(command, qmp_request(command, arguments), task)

    def _settled(self, task: asyncio.Task[Any]) -> None:
        self.pending.discard(task)
        if not task.cancelled():
            task.exception()  # read, so that asyncio does not log one nobody waited for

    def answer(self, sent: Sent, within: float) -> Any:
        """QEMU's answer to ``sent``, waited for ``within`` s at most. On a timeout the command
        is not withdrawn: QEMU runs a connection's commands in order, and one sent after it
        still runs after it (``connected`` tells whether QEMU can still answer).

        Raises MonitorError (``error_class`` set when QEMU answered with an error).
        """
        import asyncio

        from qemu.qmp import ExecuteError, QMPError

        from vhostorch import signals

        command = sent.command
        try:
            with signals.Held():  # as in _run: a signal acts once the exchange has ended
                return self.loop.run_until_complete(
                    asyncio.wait_for(asyncio.shield(sent.task), max(within, 0.0))
                )
        except ExecuteError as err:
            raise MonitorError(
                f"QMP {command}: {err}", error_class=err.error_class, sent=sent.request
            ) from err
        except TimeoutError as err:
            why = f"no answer within {within:.1f} s"
            if self.deadline is not None and self._within() <= 0:
                why += f": {self._spent()}"
            raise MonitorError(f"QMP {command}: {why}", sent=sent.request) from err
        except (QMPError, OSError, EOFError, RecursionError) as err:
            # RecursionError: json's decoder recurses once per level, and QEMU's user can
            # answer in QEMU's place (MALFORMED): 100,000 nested brackets ended check --all.
            raise MonitorError(f"QMP {command}: {_why(err)}", sent=sent.request) from err

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

        for task in list(self.pending):
            task.cancel()  # QEMU still runs a command it read; its answer is not awaited
        try:
            # Not bound by ``deadline``: closing waits for nothing QEMU does.
            self._run(self.client.disconnect(), self.timeout)
        except (QMPError, OSError, EOFError, TimeoutError, RecursionError):
            pass  # closing a connection that may already be gone (or that sent too deep)
        self.loop.close()


class Paused(Record):
    """What one pause and resume did: the run state found first (nothing was done unless it
    was "running"), how long the guest was held, in ms (from sending the pause until the
    resume was confirmed: an upper bound), and what went wrong on the way, when the guest was
    resumed all the same (``trouble``: a late ``stop``, a lost connection)."""

    state: str
    ms: float | None
    via: str
    trouble: str | None = None


# How long, from sending ``stop``, the guest is given to be running again before it is
# reported left paused. QEMU answers ``stop`` only once every block device is drained and
# flushed (softmmu/cpus.c do_vm_stop: the run state turns "paused" and STOP is sent first,
# then bdrv_drain_all and bdrv_flush_all), and its main loop answers nothing else meanwhile:
# on slow storage that is seconds, not milliseconds.
RESUME_WITHIN = 60.0


def pause_resume(
    path: str,
    served_by: int | None = None,
    while_paused: Callable[[], None] | None = None,
    timeout: float = 5.0,
    resume_within: float = RESUME_WITHIN,
) -> Paused:
    """``stop`` and ``cont`` the QEMU at QMP socket ``path``, if it runs.

    A guest found in any other state (paused, migrating...) is left as it is. Once ``stop``
    was sent, the guest is resumed whatever happens (``while_paused`` raising, ``stop`` not
    answered within ``timeout``, the connection lost) and ``query-status`` must say it runs,
    within ``resume_within`` s of the ``stop``: ``cont`` is sent on the same connection,
    where QEMU runs it after the ``stop`` even when that finishes late, and on new
    connections if that one broke. Raises MonitorError (nothing left paused: the guest was
    not paused, or runs again), LeftPaused (it may still be paused, and how to resume it).
    """
    import time

    via = f"qmp:{path}"
    sock = QmpSocket(path, timeout)
    sock.open(served_by)
    try:
        state = run_state(sock.execute)
        if state != RUNNING:
            return Paused(state, None, via)
        start = time.monotonic()
        late = None
        stopping = sock.send("stop", None)
        try:
            try:
                sock.answer(stopping, timeout)
            except MonitorError as err:
                if err.error_class is not None:
                    raise  # refused, so not paused (the resume below makes sure of it)
                late = err  # no answer yet, or the connection broke: it may pause later
            if late is None and while_paused is not None:
                while_paused()
        finally:
            how = _resume(sock, path, served_by, timeout, start, resume_within, late)
        return Paused(state, (time.monotonic() - start) * 1000, via, how)
    finally:
        sock.close()


def _resume(
    sock: QmpSocket,
    path: str,
    served_by: int | None,
    timeout: float,
    started: float,
    within: float,
    late: MonitorError | None,
) -> str | None:
    """Make the guest run again within ``within`` s of ``started`` and confirm it; say how,
    when it was not the plain way (``late``: what ``stop`` got instead of an answer). Raises
    LeftPaused, MonitorError (QEMU is gone)."""
    import time

    resume = f"QMP cont on {path} (qmp-shell {path}, then: cont)"
    deadline = started + within
    if sock.connected():
        try:
            # Queued behind the stop: run as soon as the stop is done, however late.
            sock.answer(sock.send("cont", None), deadline - time.monotonic())
            status = _status(sock, deadline)
        except MonitorError as err:
            if err.error_class is not None:
                raise LeftPaused(f"QEMU refused cont: {err}", resume) from err
            if sock.connected():
                raise LeftPaused(_stalled(within, err), resume) from err
            late = late or err  # the connection broke: new ones below
        else:
            if status != RUNNING:
                raise LeftPaused(f"QEMU says {status} after cont", resume)
            if late is None:
                return None
            return (
                f"{late}: QEMU drains and flushes every block device before it answers stop "
                "(slow or stalled storage); the cont queued behind it resumed the guest"
            )
    last: MonitorError | None = late
    while time.monotonic() < deadline:
        try:
            if _cont_afresh(path, served_by, min(timeout, deadline - time.monotonic())):
                return f"{late or 'the QMP connection broke'}: resumed on a new connection"
        except MonitorError as err:
            if err.error_class is not None:
                raise LeftPaused(f"QEMU refused cont: {err}", resume) from err
            last = err
        if served_by is not None and not _alive(served_by):
            raise MonitorError(f"QEMU {served_by} exited while paused") from last
        time.sleep(0.2)
    raise LeftPaused(_stalled(within, last), resume)


def _stalled(within: float, last: MonitorError | None) -> str:
    why = f"not seen running within {within:.0f} s of stop: {last}"
    if isinstance(last.__cause__ if last else None, TimeoutError):
        why += (
            " (QEMU's monitor answers nothing until stop has drained and flushed every block "
            "device: slow or stalled storage)"
        )
    return why


def _status(sock: QmpSocket, deadline: float) -> str:
    import time

    status = sock.answer(sock.send("query-status", None), deadline - time.monotonic())
    return str(status.get("status")) if isinstance(status, dict) else "unknown"


def _cont_afresh(path: str, served_by: int | None, timeout: float) -> bool:
    """On a new connection: ``cont`` unless the guest runs, then whether it runs. Raises
    MonitorError."""
    import time

    sock = QmpSocket(path, timeout)
    sock.open(served_by)
    try:
        deadline = time.monotonic() + timeout
        if _status(sock, deadline) != RUNNING:
            cont(sock.execute)
        return _status(sock, deadline) == RUNNING
    finally:
        sock.close()


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists
    return True


def qmp_request(command: str, arguments: dict[str, Any] | None) -> dict[str, object]:
    """A QMP request as it goes on the wire (kept in MonitorError.sent)."""
    request: dict[str, object] = {"execute": command}
    if arguments:
        request["arguments"] = arguments
    return request


def _why(err: BaseException) -> str:
    cause = err.__cause__ or err
    return str(cause) or type(cause).__name__


def read_qmp(path: str, timeout: float = READ_WITHIN, served_by: int | None = None) -> MonitorView:
    """read_virtio over the QMP socket at ``path`` (served by process ``served_by``, when
    given: see QmpSocket.open), all of it within ``timeout`` s. Raises MonitorError."""
    import time

    sock = QmpSocket(path, timeout, deadline=time.monotonic() + timeout)
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
        except BaseException:
            # Closed whatever ends the connect (a stopping signal too, raised as the
            # connection is made): QEMU's monitor serves one client at a time, so a socket
            # left open here would keep out the rollback's own connection.
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
