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
import re
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


class LabFrozen(LabTimeout):
    """The test host's kernel locked up (a CPU stuck for minutes); the test host was stopped.

    ``evidence`` is the lockup report condensed: per CPU, its task and call chain.
    """

    def __init__(self, message: str, evidence: str) -> None:
        super().__init__(message)
        self.evidence = evidence


# A CPU stuck this long in the kernel under TCG is a deadlock, not slowness: the
# slowest step seen in a healthy test host keeps a CPU busy for seconds, and a
# frozen one was seen stuck for 20 minutes (then only the timeout stopped it).
FROZEN_AFTER = 180
_LOCKUP = re.compile(r"soft lockup - CPU#(\d+) stuck for (\d+)s! \[(.*)\]")
_STAMP = re.compile(r"^\[\s*[\d.]+\] ")
_TASK = re.compile(r"^CPU: (\d+) PID: (\d+) Comm: (\S+)")
_FRAME = re.compile(r"^(\? )?([\w.]+)\+0x[0-9a-f]+/0x[0-9a-f]+")


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
    """The outer VM: no network device, the root shared read-only, ``results`` read-write.

    One vCPU by default: with two, QEMU 7.2's multi-threaded TCG froze the test host
    now and then (recorded in tests/fixtures/soft-lockup-linux-6.1-tcg-smp2.txt). A CPU
    patching kernel text (kprobes, ftrace, static keys: KVM flips some at each guest
    start) waits for the other to acknowledge, and that one loops on an int3 the
    patch had already removed from memory: its translated code was stale. A stress of
    kprobe arming next to inner guests froze 2 vCPUs in under a minute and never 1.
    ``thread=single`` avoids the race too but makes every IPI wait for a time slice
    (an inner guest took over 90 s to boot instead of 12 s).
    """
    # cryptomgr.notests: the crypto self-tests cost 0.7 s of a TCG boot and prove nothing here.
    # (khugepaged is held off by stage2: see there.) loglevel=5 keeps warnings on the console:
    # RCU stalls, hung tasks and soft lockups with their stacks (printed at the default level),
    # all CPUs' stacks at a soft lockup: what is left of a test host that froze.
    append = (
        "console=ttyS0 panic=-1 quiet loglevel=5 softlockup_all_cpu_backtrace=1 "
        "cryptomgr.notests rdinit=/init "
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


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _tail(path: str, lines: int = 5) -> str:
    if not os.path.exists(path):
        return "(no console log)"
    return " | ".join(_read(path).strip().splitlines()[-lines:]) or "(console log empty)"


def lockup(console: str, cpus: int) -> str | None:
    """The first soft lockup of ``console`` (a kernel log) condensed, or None if there is none.

    One line per CPU whose stack the kernel printed (the stuck one, then the others,
    since the test host boots with softlockup_all_cpu_backtrace): where it ran and
    its innermost reliable frames. A CPU that printed nothing could not take even an
    NMI, which is itself the finding.
    """
    lines = [_STAMP.sub("", line).strip() for line in console.splitlines()]
    first = next((i for i, line in enumerate(lines) if _LOCKUP.search(line)), None)
    if first is None:
        return None
    found = _LOCKUP.search(lines[first])
    assert found is not None
    cpu, seconds, task = found.groups()
    stacks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in lines[first + 1 : first + 400]:
        if _LOCKUP.search(line):
            break  # the next report repeats the first
        if task_line := _TASK.match(line):
            current = stacks.setdefault(f"CPU {task_line[1]} {task_line[3]}:{task_line[2]}", [])
        elif current is not None and line.startswith("RIP: 0010:"):
            current.append(line.removeprefix("RIP: 0010:").split("+")[0])
        elif current is not None and (frame := _FRAME.match(line)) and not frame[1]:
            current.append(frame[2])
    told = [f"{who}: {' < '.join(frames[:8]) or 'no frames'}" for who, frames in stacks.items()]
    silent = [c for c in range(cpus) if not any(k.startswith(f"CPU {c} ") for k in stacks)]
    told += [f"CPU {c}: no backtrace (not even an NMI got through)" for c in silent]
    return f"soft lockup, CPU#{cpu} stuck for {seconds}s [{task}]; " + "; ".join(told)


def frozen(console: str) -> bool:
    """True once the kernel says a CPU has been stuck for FROZEN_AFTER seconds or more."""
    return any(int(m[2]) >= FROZEN_AFTER for m in _LOCKUP.finditer(console))


def run(
    command: Sequence[str],
    *,
    cwd: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 900,
    memory_mib: int = 3072,
    cpus: int = 1,
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
    console = os.path.join(results, "console.log")
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
    looked = 0.0
    try:
        while True:
            now = time.monotonic()
            if boot is None and os.path.exists(os.path.join(results, "ready")):
                boot = now - start
            # The console is the only witness of a test host that froze: nothing inside
            # can run, but the kernel's lockup detector still prints there.
            if now - looked > 5:
                looked = now
                text = _read(console)
                if frozen(text):
                    evidence = lockup(text, cpus) or ""
                    raise LabFrozen(
                        f"the test host froze after {now - start:.0f} s ({evidence}); "
                        f"stopped it (QEMU pid {proc.pid})",
                        evidence,
                    )
            if now - start > timeout:
                what = "did not finish" if boot is not None else "did not reach its command"
                raise LabTimeout(
                    f"the test host {what} within {timeout:.0f} s; stopped it (QEMU pid "
                    f"{proc.pid}); console: {_tail(console, 12)}"
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
            f"the test host {where} (QEMU exit {proc.returncode}; console: {_tail(console)})"
        ) from None
    return Outcome(status, boot, seconds, results)


def _die_with_parent() -> None:
    """Runs in the QEMU child before exec: if we are killed, the test host goes too."""
    ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL


def _stdout(chunk: bytes) -> None:
    sys.stdout.buffer.write(chunk)
    sys.stdout.buffer.flush()
