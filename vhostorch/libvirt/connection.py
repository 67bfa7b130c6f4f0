"""libvirt, through libvirt-python: the only module that imports it.

For checking, a running domain's live XML is all that is needed (its QEMU's pid
is check.observe.domain_pid); the connection is opened and closed here and never
handed out.
"""

from __future__ import annotations

# The error raised here, also importable from here (the tree is in vhostorch.errors).
from vhostorch.errors import DomainUnavailable as DomainUnavailable
from vhostorch.errors import LeftPaused as LeftPaused
from vhostorch.errors import LibvirtFailed as LibvirtFailed
from vhostorch.qemu.monitor import (
    RESUME_WITHIN,
    RUNNING,
    MonitorError,
    MonitorView,
    Paused,
    qmp_request,
    read_virtio,
)
from vhostorch.record import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

SYSTEM_URI = "qemu:///system"


def _libvirt() -> Any:
    try:
        import libvirt  # type: ignore[import-untyped]
    except ImportError as err:
        raise DomainUnavailable("libvirt-python is not installed") from err
    # libvirt prints its errors on stderr unless a handler takes them.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


def _open(libvirt: Any, uri: str) -> Any:
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as err:
        raise DomainUnavailable(f"cannot connect to {uri}: {err.get_error_message()}") from err


def _running(libvirt: Any, conn: Any, name: str, uri: str) -> Any:
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError as err:
        # libvirt's error says why (no such domain, or no permission to look).
        raise DomainUnavailable(f"no domain {name!r} at {uri}") from err
    if not dom.isActive():
        raise DomainUnavailable(f"domain {name!r} is not running")
    return dom


def domain_xml(name: str, uri: str = SYSTEM_URI) -> str:
    """The live XML of running domain ``name``. Raises DomainUnavailable."""
    libvirt = _libvirt()
    conn = _open(libvirt, uri)
    try:
        xml: str = _running(libvirt, conn, name, uri).XMLDesc(0)
        return xml
    finally:
        conn.close()


def read_monitor(name: str, uri: str = SYSTEM_URI) -> MonitorView:
    """read_virtio through libvirt's monitor pass-through. Raises MonitorError.

    libvirt marks the domain tainted ("custom-monitor") on the first such call
    and says so in the domain's log; callers make this opt-in.
    """
    import json

    import libvirt_qemu  # type: ignore[import-untyped]

    try:
        libvirt = _libvirt()
        conn = _open(libvirt, uri)
    except DomainUnavailable as err:
        raise MonitorError(str(err)) from err
    try:
        dom = _running(libvirt, conn, name, uri)

        def execute(command: str, arguments: dict[str, Any] | None) -> Any:
            sent = qmp_request(command, arguments)
            try:
                reply = json.loads(libvirt_qemu.qemuMonitorCommand(dom, json.dumps(sent), 0))
            except libvirt.libvirtError as err:
                raise MonitorError(f"QMP {command}: {err.get_error_message()}", sent=sent) from err
            if "error" in reply:
                error = reply["error"]
                raise MonitorError(
                    f"QMP {command}: {error.get('desc')}", error_class=error.get("class"), sent=sent
                )
            return reply.get("return")

        return read_virtio(execute, f"libvirt:{name}")
    finally:
        conn.close()


# The libvirt backend of `vhostorch up`: define, start, hot-plug, stop. Each call opens
# and closes its own connection; libvirt's message is kept in the error.
AFFECT_LIVE_AND_CONFIG = 1 | 2  # VIR_DOMAIN_AFFECT_LIVE | VIR_DOMAIN_AFFECT_CONFIG


def _message(err: Any) -> str:
    return " ".join(str(err.get_error_message() or err).split())


def _connection(uri: str) -> tuple[Any, Any]:
    libvirt = _libvirt()
    try:
        return libvirt, libvirt.open(uri)
    except libvirt.libvirtError as err:
        raise LibvirtFailed(f"cannot connect to {uri}: {_message(err)}") from err


def _lookup(libvirt: Any, conn: Any, name: str) -> Any | None:
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError:
        return None


def _by_uuid(libvirt: Any, conn: Any, uuid: str) -> Any | None:
    try:
        return conn.lookupByUUIDString(uuid)
    except libvirt.libvirtError:
        return None


def define_and_start(name: str, xml: str, uri: str = SYSTEM_URI) -> None:
    """Define domain ``name`` from ``xml`` and start it; undefine it if it does not start.

    Refuses a name libvirt already has (vhostorch never takes over a domain).
    """
    libvirt, conn = _connection(uri)
    try:
        if _lookup(libvirt, conn, name) is not None:
            raise LibvirtFailed(f"a libvirt domain named {name!r} exists already at {uri}")
        try:
            dom = conn.defineXML(xml)
        except libvirt.libvirtError as err:
            raise LibvirtFailed(f"libvirt refused the domain: {_message(err)}") from err
        try:
            dom.create()
        except libvirt.libvirtError as err:
            try:
                dom.undefine()
            except libvirt.libvirtError:
                pass  # the start error is the one to report
            raise LibvirtFailed(f"libvirt could not start {name}: {_message(err)}") from err
    finally:
        conn.close()


def destroy_and_undefine(name: str, uri: str = SYSTEM_URI, uuid: str | None = None) -> None:
    """Stop domain ``name`` (if it runs) and remove its definition; gone already is fine.
    With ``uuid``, only the domain of that UUID is the one (whatever its name now)."""
    libvirt, conn = _connection(uri)
    try:
        dom = _lookup(libvirt, conn, name) if uuid is None else _by_uuid(libvirt, conn, uuid)
        if dom is None:
            return
        try:
            if dom.isActive():
                dom.destroy()
            dom.undefine()
        except libvirt.libvirtError as err:
            raise LibvirtFailed(f"libvirt could not remove {name}: {_message(err)}") from err
    finally:
        conn.close()


def _change_device(libvirt: Any, change: Any, xml: str, what: str) -> None:
    """Run a domain's attach/detachDeviceFlags on ``xml``, live and in its definition."""
    try:
        change(xml, AFFECT_LIVE_AND_CONFIG)
    except libvirt.libvirtError as err:
        raise LibvirtFailed(f"libvirt could not {what}: {_message(err)}") from err


def attach(name: str, xml: str, uri: str = SYSTEM_URI) -> None:
    """Hot-plug the device in ``xml`` into running domain ``name`` (and its definition)."""
    libvirt, conn = _connection(uri)
    try:
        dom = _running(libvirt, conn, name, uri)
        _change_device(libvirt, dom.attachDeviceFlags, xml, f"hot-plug into {name}")
    finally:
        conn.close()


def detach(name: str, xml: str, gone: Any, timeout: float, uri: str = SYSTEM_URI) -> None:
    """Unplug the device in ``xml``; wait until ``gone(live_xml)`` says it left the guest.

    libvirt returns after waiting a few seconds for the guest, and finishes the
    removal later when the guest is slower, so the live XML is what tells.
    """
    import time

    libvirt, conn = _connection(uri)
    try:
        dom = _running(libvirt, conn, name, uri)
        _change_device(libvirt, dom.detachDeviceFlags, xml, f"unplug from {name}")
        deadline = time.monotonic() + timeout
        while not gone(dom.XMLDesc(0)):
            if time.monotonic() > deadline:
                raise LibvirtFailed(
                    f"the guest did not release the NIC within {timeout:.0f} s (it needs a "
                    "running OS with ACPI hot-plug); libvirt removes it when the guest does"
                )
            time.sleep(0.1)
    finally:
        conn.close()


# virDomainState, by value (libvirt-domain.h).
DOMAIN_STATES = ("nostate", RUNNING, "blocked", "paused", "shutdown", "shutoff", "crashed",
                 "pmsuspended")  # fmt: skip
VIR_DOMAIN_PAUSED = 3
VIR_DOMAIN_JOB_NONE = 0


def _run_state(dom: Any) -> str:
    """The domain's state by name; "running" only with no job (migration, save, dump)."""
    code = dom.state()[0]
    state = DOMAIN_STATES[code] if 0 <= code < len(DOMAIN_STATES) else f"state {code}"
    if state == RUNNING and dom.jobInfo()[0] != VIR_DOMAIN_JOB_NONE:
        return "migrating (a libvirt job is in progress: migration, save or dump)"
    return state


def pause_resume(
    name: str,
    uri: str = SYSTEM_URI,
    while_paused: Callable[[], None] | None = None,
    resume_within: float = RESUME_WITHIN,
) -> Paused:
    """Suspend and resume running domain ``name`` (virDomainSuspend/Resume: libvirt's own
    QMP ``stop``/``cont``, and it keeps its view of the domain's state), if it runs.

    A domain in any other state (paused, migrating...) is left as it is. Once the suspend
    was asked, the domain is resumed if it is paused, whatever happened, and must be seen
    running within ``resume_within`` s (on new connections if this one broke). libvirt
    waits for QEMU's answer to ``stop`` for as long as QEMU takes (slow storage: see
    monitor.RESUME_WITHIN); the suspend is waited for ``resume_within`` s at most, then the
    resume is asked all the same (libvirt runs it once the suspend is done, or gives up
    after its own wait for the domain's job). Raises DomainUnavailable, LibvirtFailed (the
    domain runs: it was not paused, or runs again), LeftPaused (it may still be paused, and
    how to resume it).
    """
    import time

    libvirt = _libvirt()
    conn = _open(libvirt, uri)
    suspending = None
    try:
        dom = _running(libvirt, conn, name, uri)
        try:
            state = _run_state(dom)
        except libvirt.libvirtError as err:
            raise LibvirtFailed(f"cannot read the state of {name}: {_message(err)}") from err
        if state != RUNNING:
            return Paused(state, None, f"libvirt:{name}")
        start = time.monotonic()
        late = None
        try:
            suspending = _Suspend(libvirt, dom)
            late = suspending.wait(resume_within)
            if late is None and while_paused is not None:
                while_paused()
        except libvirt.libvirtError as err:
            raise LibvirtFailed(f"libvirt could not suspend {name}: {_message(err)}") from err
        finally:
            busy = suspending.worker.is_alive if suspending else lambda: False
            trouble = _resume(libvirt, dom, name, uri, start + resume_within, late, busy)
        return Paused(state, (time.monotonic() - start) * 1000, f"libvirt:{name}", trouble)
    finally:
        if suspending is None or not suspending.worker.is_alive():
            conn.close()  # else the suspend still uses it; the process's exit closes it


class _Suspend:
    """``dom.suspend()`` in a thread of its own, so that its wait can be bounded (the thread
    inherits the signals held by the caller)."""

    def __init__(self, libvirt: Any, dom: Any) -> None:
        import threading

        self.libvirt = libvirt
        self.failed: Any = None
        self.worker = threading.Thread(
            target=self._run, args=(dom,), name="vhostorch-suspend", daemon=True
        )
        self.worker.start()

    def _run(self, dom: Any) -> None:
        try:
            dom.suspend()
        except self.libvirt.libvirtError as err:
            self.failed = err

    def wait(self, within: float) -> str | None:
        """None once the suspend is done, what is wrong when it is not done within ``within``
        s. Raises libvirtError (the suspend failed)."""
        self.worker.join(within)
        if self.worker.is_alive():
            return (
                f"libvirt's suspend not done within {within:.0f} s (QEMU answers stop only "
                "once it drained and flushed every block device: slow or stalled storage)"
            )
        if self.failed is not None:
            raise self.failed
        return None


def _resume(
    libvirt: Any,
    dom: Any,
    name: str,
    uri: str,
    deadline: float,
    late: str | None,
    busy: Callable[[], bool],
) -> str | None:
    """Resume ``dom`` if it is paused and see it running by ``deadline`` (one try at least),
    on new connections when this one fails; say what went wrong on the way (``late``: the
    suspend still running, as ``busy()`` tells). Raises LeftPaused, LibvirtFailed (the
    domain stopped meanwhile)."""
    import time

    resume = f"virsh -c {uri} resume {name}"
    if late is None:
        try:
            if dom.state()[0] == VIR_DOMAIN_PAUSED:
                dom.resume()
            if dom.state()[0] != VIR_DOMAIN_PAUSED:
                return None
            late = "libvirt still says paused after the resume"
        except libvirt.libvirtError as err:
            late = _message(err)
    last = late
    while True:
        try:
            conn = libvirt.open(uri)
        except libvirt.libvirtError as err:
            last = f"cannot connect to {uri}: {_message(err)}"
        else:
            try:
                again = conn.lookupByName(name)
                if not again.isActive():
                    raise LibvirtFailed(f"domain {name} stopped while paused ({late})")
                # While the suspend runs, libvirt may not say paused yet: resume all the same
                # (it waits for the suspend's job, then resumes, or does nothing if running).
                if busy() or again.state()[0] == VIR_DOMAIN_PAUSED:
                    again.resume()
                if not busy() and again.state()[0] != VIR_DOMAIN_PAUSED:
                    return f"{late}: resumed on a new connection"
            except libvirt.libvirtError as err:
                last = _message(err)
            finally:
                conn.close()
        if time.monotonic() >= deadline:
            raise LeftPaused(f"libvirt could not resume {name}: {last}", resume)
        time.sleep(0.2)
