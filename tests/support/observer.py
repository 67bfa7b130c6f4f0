"""A real TCG QEMU watched through a second QMP connection (its events and its own
query-status: the oracle of the rewire tests), and a slow drive that makes its stop slow."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class Observer:
    """A second QMP connection to the QEMU: its events and its own query-status."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.buffer = b""
        self.events: list[str] = []
        self.asked = 0
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

    def send(self, command: str, arguments: dict[str, object] | None = None) -> int:
        """Send a command; its reply carries the id returned (replies are told apart by it:
        writing_slowly leaves some unread)."""
        self.asked += 1
        message: dict[str, object] = {"execute": command, "id": self.asked}
        if arguments is not None:
            message["arguments"] = arguments
        self.sock.sendall(json.dumps(message).encode() + b"\n")
        return self.asked

    def ask(self, command: str, arguments: dict[str, object] | None = None) -> object:
        asked = self.send(command, arguments)
        while True:
            reply = self._read()
            if reply.get("id") == asked and ("return" in reply or "error" in reply):
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


# Slow storage, for real: a null-co drive whose every request takes LATENCY s. QEMU answers
# stop only after bdrv_drain_all (the write in flight: up to LATENCY) and bdrv_flush_all
# (that write is not flushed yet: LATENCY more), so stop takes about twice LATENCY.
SLOW = "vhorwslow"


def slow_drive(latency: float) -> list[str]:
    return ["-drive", f"if=none,id={SLOW},driver=null-co,size=1M,latency-ns={int(latency * 1e9)}"]


_WRITE: tuple[str, dict[str, object]] = (
    "human-monitor-command",
    {"command-line": f'qemu-io {SLOW} "aio_write 0 512"'},
)


def write_slowly(observer: Observer) -> None:
    """Start a write on the slow drive (qemu-io's aio_write returns while it is in flight)."""
    assert observer.ask(*_WRITE) == ""


@contextmanager
def writing_slowly(observer: Observer, every: float = 0.5) -> Iterator[None]:
    """Keep a fresh write in flight on the slow drive until QEMU next says STOP, so that a
    stop sent at any moment in the block waits out nearly a whole latency, then the flush:
    about twice the latency, whatever the command under test does before it stops the guest.
    (One write made before `check --rewire` started had nearly drained when, in a loaded test
    host, its stop came about 20 s later: the stop was done within the 60 s bound.) The
    observer is this block's alone; the thread reads its events and replies meanwhile."""
    stops, done, failed = observer.events.count("STOP"), threading.Event(), []

    def stopped() -> bool:
        return done.is_set() or observer.events.count("STOP") > stops

    def feed() -> None:
        try:
            while not stopped():
                observer.send(*_WRITE)
                until = time.monotonic() + every
                while not stopped() and (left := until - time.monotonic()) > 0:
                    observer.sock.settimeout(left)
                    try:
                        observer._read()
                    except TimeoutError:
                        pass
        except BaseException as err:  # re-raised in the test's thread
            failed.append(err)
        finally:
            observer.sock.settimeout(10)

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
    if failed:
        raise failed[0]
