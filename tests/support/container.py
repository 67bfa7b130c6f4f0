"""A QEMU run the way container runtimes run it, for tests: its own mount and pid namespaces,
a root of its own, and a private /dev on tmpfs holding device nodes made with mknod.

KubeVirt's virt-launcher runs QEMU so: from the host it is an ordinary pid, but the
paths its fds show there are names in its own mount namespace (``/dev/net/tun`` reads
``<root>/dev/net/tun`` from the host). Here the root is the host's own ``/`` bound
again under a fresh directory (the QEMU binary, the guest kernel and /tmp stay where
they are), with a tmpfs on its ``/dev`` and a fresh procfs for the new pid namespace.
Every mount lives in the new mount namespace only (unshare makes it private), so it
goes when QEMU does. ``unshare --fork`` ignores SIGTERM and waits for its child:
QEMU itself is signalled, and ``--kill-child`` covers unshare being killed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

# (name, major, minor): what a runtime's device plugins mknod for a QEMU with vhost-net.
NODES = (
    ("net/tun", 10, 200), ("vhost-net", 10, 238), ("kvm", 10, 232),
    ("null", 1, 3), ("zero", 1, 5), ("urandom", 1, 9),
)  # fmt: skip

_SETUP = """set -e
root=$1; shift
mount --rbind / "$root"
mount -t tmpfs -o mode=0755 vhocontainer-dev "$root/dev"
mkdir "$root/dev/net"
{nodes}
mount -t proc proc "$root/proc"
exec chroot "$root" "$@"
"""


class Contained:
    """The QEMU (``pid``, as the host numbers it), the unshare above it, its root's path."""

    def __init__(self, proc: subprocess.Popen[bytes], pid: int, root: str) -> None:
        self.proc = proc
        self.pid = pid
        self.root = root


def _child(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = f.read().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


@contextmanager
def qemu(argv: Sequence[str], log: str, timeout: float = 10) -> Iterator[Contained]:
    """Run ``argv`` (a QEMU command line) contained; its output goes to ``log``. Always
    stopped (its pid signalled, then unshare reaped), its root directory removed."""
    root = tempfile.mkdtemp(prefix="vhocontainer-root-")
    nodes = "\n".join(
        f'mknod -m 0666 "$root/dev/{name}" c {major} {minor}' for name, major, minor in NODES
    )
    command = [
        "unshare", "--mount", "--pid", "--fork", "--kill-child",
        "sh", "-c", _SETUP.format(nodes=nodes), "vhocontainer", root, *argv,
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    pid = None
    try:
        deadline = time.monotonic() + timeout
        while True:
            pid = _child(proc.pid)
            # sh execs chroot, which execs QEMU: the same pid throughout.
            if pid is not None and _comm(pid).startswith("qemu-system"):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                with open(log, errors="replace") as f:
                    raise AssertionError(f"no contained QEMU (unshare: {proc.poll()}): {f.read()}")
            time.sleep(0.05)
        yield Contained(proc, pid, root)
    finally:
        if pid is not None and proc.poll() is None:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()  # --kill-child: the kernel then SIGKILLs QEMU
            proc.wait()
        os.rmdir(root)  # empty: its mounts were the namespace's, gone with it
