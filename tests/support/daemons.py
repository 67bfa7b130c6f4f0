"""Start libvirtd and virtlogd for tests that need them (there is no systemd here).

Only daemons this module started are stopped, by the pid they wrote.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

SOCKET = "/run/libvirt/libvirt-sock"
DAEMONS = (("virtlogd", "/run/virtlogd.pid"), ("libvirtd", "/run/libvirtd.pid"))
OURS: list[int] = []  # pids this session started (the libvirtd fixture's)


def _alive(pidfile: str) -> bool:
    try:
        with open(pidfile) as f:
            os.kill(int(f.read().strip()), 0)
    except (OSError, ValueError):
        return False
    return True


def start() -> list[int]:
    """Start whichever daemon is not running; return the pids of those started."""
    started = []
    for name, pidfile in DAEMONS:
        if _alive(pidfile):
            continue
        subprocess.run([name, "-d"], check=True, capture_output=True)
        deadline = time.monotonic() + 60
        while not _alive(pidfile):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start (no live pid in {pidfile})")
            time.sleep(0.05)
        with open(pidfile) as f:
            started.append(int(f.read().strip()))
    deadline = time.monotonic() + 60
    while not os.path.exists(SOCKET):
        if time.monotonic() > deadline:
            raise RuntimeError(f"libvirtd did not open {SOCKET}")
        time.sleep(0.05)
    return started


def stop(pids: list[int]) -> None:
    for pid in reversed(pids):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)


def restart_libvirtd() -> None:
    """Restart the libvirtd this session started (it looks for hooks only at start)."""
    with open(DAEMONS[1][1]) as f:
        pid = int(f.read().strip())
    if pid not in OURS:
        raise RuntimeError(
            f"libvirtd (pid {pid}) was not started by the tests; hook tests need to restart it"
        )
    stop([pid])
    OURS.remove(pid)
    try:
        os.unlink(SOCKET)  # so that start() waits for the new daemon's socket
    except FileNotFoundError:
        pass
    OURS.extend(start())
