"""Pausing and resuming a real QEMU for ``check --rewire``, on this machine (TCG guests):
a running VM is stopped and continued, anything else is left as it is, and the resume
happens on every path (an error while paused, SIGTERM while paused).

What a second QMP client of the same QEMU hears (STOP and RESUME events, query-status)
is the oracle, not vhostorch's own answer. The wiring itself (unknown before, pass after)
is proved in the test host: tests/test_rewire_testhost.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests import kernel
from tests.kernel import vhostorch
from vhostorch.check import rewire
from vhostorch.errors import OperationFailed
from vhostorch.libvirt import connection as virt
from vhostorch.qemu import monitor


class Observer:
    """A second QMP connection to the QEMU: its events and its own query-status."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.buffer = b""
        self.events: list[str] = []
        self._read()  # greeting
        self.ask("qmp_capabilities")

    def _read(self) -> dict[str, object]:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            assert chunk, "QEMU closed the observer's QMP connection"
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        message: dict[str, object] = json.loads(line)
        if "event" in message:
            self.events.append(str(message["event"]))
        return message

    def ask(self, command: str) -> object:
        self.sock.sendall(json.dumps({"execute": command}).encode() + b"\n")
        while True:
            reply = self._read()
            if "return" in reply or "error" in reply:
                return reply.get("return", reply.get("error"))

    def status(self) -> str:
        reply = self.ask("query-status")
        assert isinstance(reply, dict)
        return str(reply["status"])

    def close(self) -> None:
        self.sock.close()


@contextmanager
def qemu(*extra: str) -> Iterator[tuple[int, str, Observer]]:
    """A TCG QEMU with two QMP sockets: one for the test's observer, and the last one, which
    vhostorch takes as the QEMU's own."""
    workdir = tempfile.mkdtemp(prefix="vho-rewire-")
    ours, theirs = os.path.join(workdir, "qmp.sock"), os.path.join(workdir, "observer.sock")
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-accel", "tcg", "-M", "pc", "-m", "64", "-display", "none",
         "-nodefaults", "-no-user-config", "-qmp", f"unix:{theirs},server=on,wait=off",
         "-qmp", f"unix:{ours},server=on,wait=off", *extra],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not (os.path.exists(ours) and os.path.exists(theirs)):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "QEMU made no QMP sockets"
            time.sleep(0.05)
        observer = Observer(theirs)
        try:
            yield proc.pid, ours, observer
        finally:
            observer.close()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        subprocess.run(["rm", "-rf", workdir], check=False)


def settle(observer: Observer) -> None:
    """Collect the events QEMU sent the observer so far (a query flushes them)."""
    observer.ask("query-name")


def test_a_running_qemu_is_stopped_and_continued_once() -> None:
    with qemu() as (pid, sock, observer):
        assert observer.status() == "running"
        paused = rewire.held(lambda wp: monitor.pause_resume(sock, pid, wp))
        settle(observer)
        assert paused.state == "running" and paused.via == f"qmp:{sock}"
        assert paused.ms is not None and 0 < paused.ms < 5000
        assert observer.events == ["STOP", "RESUME"]
        assert observer.status() == "running"


@pytest.mark.parametrize("how", ["stopped", "prelaunch"])
def test_a_qemu_that_is_not_running_is_left_as_it_is(how: str) -> None:
    with qemu(*(["-S"] if how == "prelaunch" else [])) as (pid, sock, observer):
        if how == "stopped":
            observer.ask("stop")
        before = observer.status()
        paused = rewire.held(lambda wp: monitor.pause_resume(sock, pid, wp))
        settle(observer)
        assert paused.ms is None and paused.state == before == ("paused" if how == "stopped"
                                                                else "prelaunch")  # fmt: skip
        assert "RESUME" not in observer.events
        assert observer.status() == before


def test_an_error_while_paused_still_resumes() -> None:
    def fail() -> None:
        raise RuntimeError("boom while paused")

    with qemu() as (pid, sock, observer):
        with pytest.raises(RuntimeError, match="boom"):
            rewire.held(lambda wp: monitor.pause_resume(sock, pid, wp), fail)
        settle(observer)
        assert observer.events == ["STOP", "RESUME"]
        assert observer.status() == "running"


def test_sigterm_while_paused_acts_only_after_the_resume() -> None:
    """The process is told SIGTERM while the guest is paused: the guest is resumed, then the
    process dies of the signal (it is held, not ignored)."""
    with qemu() as (pid, sock, observer):
        script = (
            "import os, signal, sys\n"
            "from vhostorch.check import rewire\n"
            "from vhostorch.qemu import monitor\n"
            f"rewire.held(lambda wp: monitor.pause_resume({sock!r}, {pid}, wp),\n"
            "            lambda: os.kill(os.getpid(), signal.SIGTERM))\n"
            "print('not reached: SIGTERM acts once the signals are released')\n"
        )
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        assert done.returncode == -signal.SIGTERM, done.stderr
        assert "not reached" not in done.stdout
        settle(observer)
        assert observer.events == ["STOP", "RESUME"]
        assert observer.status() == "running"


def test_rewire_is_refused_before_anything_is_paused_without_a_trace() -> None:
    """This machine has no tracefs: arming fails, in one line, exit 1, and no QEMU was paused."""
    if os.path.exists("/sys/kernel/tracing/kprobe_events"):
        pytest.skip("this machine has a tracefs: the test host covers it")
    with qemu() as (pid, _sock, observer):
        done = vhostorch("check", "--pid", str(pid), "--rewire")
        assert done.returncode == 1, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "tracefs" in done.stderr
        settle(observer)
        assert observer.events == [] and observer.status() == "running"


def test_rewire_with_bad_targets_is_usage() -> None:
    done = vhostorch("check", "--pid", "1", "--rewire", "--connect", "qemu:///system")
    assert done.returncode == 2 and "--connect" in done.stderr
    done = vhostorch("check", "--rewire")
    assert done.returncode == 2 and "give one of" in done.stderr


def test_a_qemu_without_a_trusted_qmp_socket_is_not_paused() -> None:
    with qemu() as (pid, sock, observer):
        os.chown(sock, 4242, 4242)  # neither root nor QEMU's user: not trusted
        (plan,) = rewire.plans(pid=pid, domain=None, qmp=None, every=False, uri=None)
        assert plan.pause is None and "belongs to uid 4242" in str(plan.why_not)
        check = rewire.rewire(plan, refuse=False)
        assert check.status == "warn" and check.evidence == {"paused": False}
        with pytest.raises(OperationFailed, match="cannot be paused"):
            rewire.rewire(plan, refuse=True)
        settle(observer)
        assert observer.events == []


def _domain_xml(name: str) -> str:
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices><memballoon model='none'/></devices>
</domain>"""


@contextmanager
def domain(uri: str) -> Iterator[str]:
    import libvirt

    name = kernel.unique("vho-rw-")
    conn = libvirt.open(uri)
    dom = conn.createXML(_domain_xml(name), 0)
    try:
        yield name
    finally:
        try:
            dom.destroy()
        finally:
            conn.close()


def _state(uri: str, name: str) -> int:
    import libvirt

    conn = libvirt.open(uri)
    try:
        return int(conn.lookupByName(name).state()[0])
    finally:
        conn.close()


def test_a_libvirt_domain_is_suspended_and_resumed(libvirtd: str) -> None:
    import libvirt

    with domain(libvirtd) as name:
        seen: list[int] = []
        paused = rewire.held(
            lambda wp: virt.pause_resume(name, libvirtd, wp),
            lambda: seen.append(_state(libvirtd, name)),
        )
        assert seen == [libvirt.VIR_DOMAIN_PAUSED]  # libvirt saw the pause itself
        assert paused.ms is not None and paused.ms > 0 and paused.via == f"libvirt:{name}"
        assert _state(libvirtd, name) == libvirt.VIR_DOMAIN_RUNNING


def test_a_suspended_domain_is_left_suspended_and_an_error_still_resumes(libvirtd: str) -> None:
    import libvirt

    with domain(libvirtd) as name:
        conn = libvirt.open(libvirtd)
        try:
            conn.lookupByName(name).suspend()
            paused = virt.pause_resume(name, libvirtd)
            assert paused.ms is None and paused.state == "paused"
            assert _state(libvirtd, name) == libvirt.VIR_DOMAIN_PAUSED
            conn.lookupByName(name).resume()
        finally:
            conn.close()

        def fail() -> None:
            raise RuntimeError("boom while suspended")

        with pytest.raises(RuntimeError, match="boom"):
            virt.pause_resume(name, libvirtd, fail)
        assert _state(libvirtd, name) == libvirt.VIR_DOMAIN_RUNNING
