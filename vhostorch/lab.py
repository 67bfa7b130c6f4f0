"""The disposable test host: boot a stock kernel under QEMU/TCG on this machine's root, run one
command in it, stream its output, return its exit status, power off.

Inside, /dev/vhost-net, /dev/kvm (nested on TCG's emulated SVM), tun and bridge
are real, and QEMU, libvirtd, Python and the project's virtualenv are the same
files as outside: the root is shared read-only over 9p under a tmpfs overlay.
The outer VM has no network device. A read-write directory (``results``) is
shared back at the same path; the command's working directory is kept.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

from vhostorch.labimage import FILES, IMAGE_ENV, Image, LabError, ensure_image
from vhostorch.record import TYPE_CHECKING, Record

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

QEMU = "qemu-system-x86_64"
# Passed into the test host; the rest of the environment is this machine's own business.
ENV_PASSED = (
    "PATH",
    "HOME",
    "LANG",
    "LC_ALL",
    "TERM",
    "CI",
    "PYTHONPATH",
    "PYTHONDONTWRITEBYTECODE",
    "PYTHONUNBUFFERED",
    "HYPOTHESIS_PROFILE",
)


class LabTimeout(LabError):
    """The command did not finish in time; the test host was stopped."""

    exit_code = 124  # as `timeout`


class Outcome(Record):
    """How a run went: the command's exit status and where the time went."""

    __slots__ = ("status", "boot_seconds", "seconds", "results")
    status: int
    boot_seconds: float | None
    seconds: float
    results: str

    def __init__(
        self, status: int, boot_seconds: float | None, seconds: float, results: str
    ) -> None:
        self._init(status=status, boot_seconds=boot_seconds, seconds=seconds, results=results)


def _available_mib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return 0


def _job(command: Sequence[str], cwd: str, env: dict[str, str]) -> str:
    lines = ["#!/bin/sh", f"cd {shlex.quote(cwd)} || exit 125"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]
    lines.append("exec " + " ".join(shlex.quote(c) for c in command))
    return "\n".join(lines) + "\n"


def qemu_command(image: Image, results: str, memory_mib: int, cpus: int) -> list[str]:
    """The outer VM: no network device, the root shared read-only, ``results`` read-write."""
    # cryptomgr.notests: the crypto self-tests cost 0.7 s of a TCG boot and prove nothing here.
    # (khugepaged is held off by stage2: see there.) loglevel=4 keeps errors on the console
    # (RCU stalls, hung tasks, soft lockups): what is left of a test host that froze.
    append = (
        "console=ttyS0 panic=-1 quiet loglevel=4 cryptomgr.notests rdinit=/init "
        f"vho.results={results}"
    )
    return [
        QEMU,
        "-accel",
        "tcg",
        "-M",
        "q35",
        "-cpu",
        "max",
        "-smp",
        str(cpus),
        "-m",
        str(memory_mib),
        "-display",
        "none",
        "-nodefaults",
        "-no-reboot",
        "-nic",
        "none",
        "-serial",
        f"file:{results}/console.log",
        "-serial",
        "stdio",
        "-kernel",
        image.kernel,
        "-initrd",
        image.host_initrd,
        "-append",
        append,
        "-virtfs",
        "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        "-virtfs",
        f"local,path={results},mount_tag=results,security_model=none,multidevs=remap",
    ]


def _tail(path: str, lines: int = 5) -> str:
    try:
        with open(path, errors="replace") as f:
            text = f.read().strip().splitlines()
    except OSError:
        return "(no console log)"
    return " | ".join(text[-lines:]) or "(console log empty)"


def run(
    command: Sequence[str],
    *,
    cwd: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 900,
    memory_mib: int = 3072,
    cpus: int = 2,
    results: str | None = None,
    output: Callable[[bytes], None] | None = None,
    log: Callable[[str], None] | None = None,
    image: Image | None = None,
) -> Outcome:
    """Run ``command`` in a fresh test host and return its outcome.

    ``results`` is the directory shared back (a new one under /tmp if None; it is
    kept either way). ``image`` defaults to the cached one, built if missing.
    Raises LabError when the host cannot be built or booted or does not reach
    the command, LabTimeout when ``timeout`` runs out.
    """
    if not command:
        raise LabError("no command given")
    if shutil.which(QEMU) is None:
        raise LabError(
            f"QEMU is missing: {QEMU} not found (install the Debian package qemu-system-x86)"
        )
    if not os.path.exists("/dev/net/tun"):
        raise LabError("/dev/net/tun is missing on this machine")
    need = memory_mib + 256
    if _available_mib() < need:
        raise LabError(
            f"not enough memory: the test host needs {need} MiB, "
            f"{_available_mib()} MiB are available"
        )
    image = image or ensure_image(log=log)
    results = results or tempfile.mkdtemp(prefix="vhostorch-lab-", dir="/tmp")
    results = os.path.realpath(results)
    if any(c.isspace() for c in results):
        raise LabError(f"the results directory {results!r} must not contain spaces")
    os.makedirs(results, exist_ok=True)
    for stale in ("exit-status", "ready", "console.log"):
        if os.path.exists(os.path.join(results, stale)):
            os.unlink(os.path.join(results, stale))
    shutil.copy(os.path.join(FILES, "stage2"), os.path.join(results, "stage2"))
    with open(os.path.join(results, "lab.env"), "w") as f:
        f.write(f"LAB_ROOT={shlex.quote(image.root)}\nLAB_KVER={shlex.quote(image.kver)}\n")
    passed = {k: v for k, v in os.environ.items() if k in ENV_PASSED or k.startswith("VHOSTORCH_")}
    passed.update(env or {})
    passed["VHOSTORCH_IN_TESTHOST"] = "1"
    passed[IMAGE_ENV] = json.dumps(image.asdict())
    passed["VHOSTORCH_LAB_RESULTS"] = results
    with open(os.path.join(results, "job.sh"), "w") as f:
        f.write(_job(command, cwd or os.getcwd(), passed))

    write = output or _stdout
    start = time.monotonic()
    boot: float | None = None
    proc = subprocess.Popen(
        qemu_command(image, results, memory_mib, cpus),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        preexec_fn=_die_with_parent,
    )
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    try:
        while True:
            if boot is None and os.path.exists(os.path.join(results, "ready")):
                boot = time.monotonic() - start
            if time.monotonic() - start > timeout:
                what = "did not finish" if boot is not None else "did not reach its command"
                # The console's last lines are the only witness of a test host that froze
                # (a soft lockup or a stall prints there, when nothing inside can run).
                raise LabTimeout(
                    f"the test host {what} within {timeout:.0f} s; stopped it (QEMU pid "
                    f"{proc.pid}); console: {_tail(os.path.join(results, 'console.log'), 12)}"
                )
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                write(chunk)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()  # the QEMU we started, by its pid
            proc.wait()
        proc.stdout.close()
    seconds = time.monotonic() - start
    try:
        with open(os.path.join(results, "exit-status")) as f:
            status = int(f.read().strip())
    except (OSError, ValueError):
        where = "did not finish its command" if boot is not None else "did not reach its command"
        raise LabError(
            f"the test host {where} (QEMU exit {proc.returncode}; console: "
            f"{_tail(os.path.join(results, 'console.log'))})"
        ) from None
    return Outcome(status, boot, seconds, results)


def _die_with_parent() -> None:
    """Runs in the QEMU child before exec: if we are killed, the test host goes too."""
    ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL


def _stdout(chunk: bytes) -> None:
    sys.stdout.buffer.write(chunk)
    sys.stdout.buffer.flush()
