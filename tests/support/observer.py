"""A real TCG QEMU watched through a second QMP connection (its events and its own
query-status: the oracle of the rewire tests), and a slow drive that makes its stop slow."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
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


# Slow storage, for real: a null-co drive whose every request takes LATENCY s. QEMU answers
# stop only after bdrv_drain_all (the write in flight: up to LATENCY) and bdrv_flush_all
# (that write is not flushed yet: LATENCY more), so stop takes about twice LATENCY.
SLOW = "vhorwslow"


def slow_drive(latency: float) -> list[str]:
    return ["-drive", f"if=none,id={SLOW},driver=null-co,size=1M,latency-ns={int(latency * 1e9)}"]


def write_slowly(observer: Observer) -> None:
    """Start a write on the slow drive (qemu-io's aio_write returns while it is in flight)."""
    observer.sock.sendall(json.dumps({"execute": "human-monitor-command", "arguments": {
        "command-line": f'qemu-io {SLOW} "aio_write 0 512"'}}).encode() + b"\n")  # fmt: skip
    while True:
        reply = observer._read()
        if "return" in reply or "error" in reply:
            assert reply.get("return") == "", reply
            return
