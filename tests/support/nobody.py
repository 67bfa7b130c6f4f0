"""What any user may start, run as nobody: root's QEMU binary and look-alikes of it, the
processes root must never trust, played for real in the kernel tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from typing import Any

from vhostorch.kernel import procfs

QEMU = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
# The system's interpreter, whichever version the release has (3.11 on Debian 12, 3.13 on
# Debian 13): nobody cannot read one under /root, where a virtualenv's base may be (pyenv's).
PYTHON = os.path.realpath("/usr/bin/python3")


def paused_qemu(name: str, *extra: str, machine: str = "none") -> list[str]:
    """The command line of a paused TCG QEMU called ``guest=NAME``, ``extra`` its devices."""
    return [
        QEMU, "-accel", "tcg", "-M", machine, "-S", "-display", "none", "-nodefaults",
        "-name", f"guest={name}", *extra,
    ]  # fmt: skip


def start_qemu(
    argv: list[str],
    ready: Callable[[int], bool] | None = None,
    timeout: float = 20.0,
    **popen: Any,
) -> subprocess.Popen[Any]:
    """``argv`` run by nobody, once its process is a QEMU (setpriv execs it: the same pid)
    and ``ready(pid)`` holds; killed when it does not get there within ``timeout`` s."""
    popen.setdefault("stdin", subprocess.DEVNULL)
    proc = subprocess.Popen(AS_NOBODY + argv, **popen)
    deadline = time.monotonic() + timeout
    while not (procfs.program(proc.pid).startswith("qemu") and (ready is None or ready(proc.pid))):
        if proc.poll() is not None or time.monotonic() >= deadline:
            proc.kill()  # our own child, by its pid
            proc.wait()
            raise AssertionError(f"QEMU did not start: {' '.join(argv)}")
        time.sleep(0.05)
    return proc
