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

# The error raised here, also importable from here (the tree is in vhostorch.errors).
from vhostorch.errors import InvalidSpec
from vhostorch.errors import LabError as LabError
from vhostorch.errors import LabFrozen as LabFrozen
from vhostorch.errors import LabTimeout as LabTimeout
from vhostorch.lab import watch
from vhostorch.lab.image import DEFAULT_KERNEL, FILES, IMAGE_ENV, Image, ensure_image
from vhostorch.lab.userland import DEFAULT_USERLAND, Userland, ensure_userland
from vhostorch.record import TYPE_CHECKING, Record

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

QEMU = "qemu-system-x86_64"
MONITOR = "monitor.sock"  # in the results directory
USERLAND_ENV = "VHOSTORCH_LAB_USERLAND"  # inside: the userland the test host booted
# sun_path holds 108 bytes with its NUL.
_SOCKET_PATH_MAX = 107
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


class Outcome(Record):
    """How a run went: the command's exit status and where the time went."""

    status: int
    boot_seconds: float | None
    seconds: float
    results: str


def available_mib() -> int:
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


def qemu_command(
    image: Image, results: str, memory_mib: int, cpus: int, userland: Userland | None = None
) -> list[str]:
    """The outer VM: no network device, the userland's root shared read-only (this
    machine's by default; with another, this machine's root too, as ``machine``),
    ``results`` read-write, QEMU's monitor on ``results``/monitor.sock.

    Two bugs of Debian's QEMU 7.2 TCG (there is no newer one) shape it:

    - A lost wakeup. The LAPIC timer fires on QEMU's main thread, which tells the
      vCPU thread to poll its APIC by setting a flag; VMRUN (an inner guest entered
      through the emulated SVM) sets another flag in the same word without QEMU's lock
      (svm_helper.c; fixed upstream after 10.1). When the two race the poll request is
      lost: the timer interrupt waits in the LAPIC's IRR, the CPU halts, and with a
      one-shot timer nothing ever arms again. It hung a clean-clone CI run here and a
      loop of `up`/`down` (HMP showed HLT=1, IF=1, IRR 236, the timer at 0: see
      tests/fixtures/lost-wakeup-qemu-7.2-tcg-hmp.txt). ``nohz=off highres=off`` keep
      the LAPIC timer periodic: QEMU re-arms it itself and asks for a poll at every
      tick, so a lost request costs 4 ms instead of the test host.
    - Stale code with two vCPUs, hence one by default: a CPU patching kernel text
      (kprobes, ftrace, static keys: KVM flips some at each guest start) waits for the
      other to acknowledge, and that one loops on an int3 the patch had already removed
      from memory (tests/fixtures/soft-lockup-linux-6.1-tcg-smp2.txt). A stress of
      kprobe arming next to inner guests froze 2 vCPUs in under a minute.
      ``thread=single`` avoids that race but makes every IPI wait for a time slice (an
      inner guest took over 90 s to boot instead of 12 s).
    """
    # cryptomgr.notests: the crypto self-tests cost 0.7 s of a TCG boot and prove nothing here.
    # (khugepaged is held off by stage2: see there.) loglevel=5 keeps warnings on the console:
    # RCU stalls, hung tasks and soft lockups with their stacks (printed at the default level),
    # all CPUs' stacks at a soft lockup: what is left of a test host that froze.
    append = (
        "console=ttyS0 panic=-1 quiet loglevel=5 softlockup_all_cpu_backtrace=1 "
        "nohz=off highres=off cryptomgr.notests rdinit=/init "
        f"vho.results={results}"
    )
    root = userland.root if userland is not None else "/"
    machine = []
    if root != "/":
        machine = [
            "-virtfs",
            "local,path=/,mount_tag=machine,security_model=none,readonly=on,multidevs=remap",
        ]
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
        f"local,path={root},mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        *machine,
        "-virtfs",
        f"local,path={results},mount_tag=results,security_model=none,multidevs=remap",
        "-qmp",
        f"unix:{results}/{MONITOR},server=on,wait=off",
    ]


def read_text(path: str) -> str:
    """A log's text so far (bytes that are not UTF-8 replaced); "" when there is none yet."""
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _tail(path: str, lines: int = 5) -> str:
    if not os.path.exists(path):
        return "(no console log)"
    return " | ".join(read_text(path).strip().splitlines()[-lines:]) or "(console log empty)"


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
    stalled_after: float = watch.STALLED_AFTER,
    kernel: str = DEFAULT_KERNEL,
    userland: str = DEFAULT_USERLAND,
) -> Outcome:
    """Run ``command`` in a fresh test host and return its outcome.

    ``results`` is the directory shared back (a new one under /tmp if None; it is
    kept either way). ``image`` defaults to the cached one of ``kernel`` (a series such
    as ``6.12``, or the default kernel), built if missing; ``userland`` names the root
    it boots (this machine's, or a Debian release's: lab.userland), built if missing.
    Raises InvalidSpec when ``results`` cannot be made, LabError when the host cannot be
    built or booted or does not reach the command, LabTimeout when ``timeout`` runs out,
    LabFrozen when it stops making progress: a CPU stuck in its kernel for
    watch.FROZEN_AFTER seconds, or no heartbeat for ``stalled_after`` seconds.
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
    if available_mib() < need:
        raise LabError(
            f"not enough memory: the test host needs {need} MiB, "
            f"{available_mib()} MiB are available"
        )
    if results is not None:
        _check_results(os.path.realpath(results))
        try:  # before the image is fetched or built: a directory that cannot be is bad input
            os.makedirs(results, exist_ok=True)
        except OSError as err:
            raise InvalidSpec(f"the results directory {results!r} cannot be made: "
                              f"{err.strerror or err}") from None  # fmt: skip
    land = ensure_userland(userland, log=log)
    image = image or ensure_image(log=log, kernel=kernel)
    results = os.path.realpath(results or tempfile.mkdtemp(prefix="vhostorch-lab-", dir="/tmp"))
    monitor = os.path.join(results, MONITOR)
    os.makedirs(results, exist_ok=True)
    for stale in ("exit-status", "ready", "console.log", watch.HEARTBEAT, MONITOR):
        if os.path.exists(os.path.join(results, stale)):
            os.unlink(os.path.join(results, stale))
    shutil.copy(os.path.join(FILES, "stage2"), os.path.join(results, "stage2"))
    workdir = os.path.realpath(cwd or os.getcwd())
    with open(os.path.join(results, "lab.env"), "w") as f:
        f.write(f"LAB_ROOT={shlex.quote(image.root)}\nLAB_KVER={shlex.quote(image.kver)}\n")
        f.write(_carried(land, workdir, image))
    passed = {k: v for k, v in os.environ.items() if k in ENV_PASSED or k.startswith("VHOSTORCH_")}
    passed.update(env or {})
    passed["VHOSTORCH_IN_TESTHOST"] = "1"
    passed[USERLAND_ENV] = land.name
    passed[IMAGE_ENV] = json.dumps(image.asdict())
    passed["VHOSTORCH_LAB_RESULTS"] = results
    console = os.path.join(results, "console.log")
    with open(os.path.join(results, "job.sh"), "w") as f:
        f.write(_job(command, workdir, passed))
    # host-init mounts the results share at its own path, which must exist in the root.
    mountpoint = os.path.join(land.root, results.lstrip("/"))
    made = land.root != "/" and not os.path.exists(mountpoint)
    if made:
        os.makedirs(mountpoint)

    write = output or _stdout
    start = time.monotonic()
    boot: float | None = None
    proc = subprocess.Popen(
        qemu_command(image, results, memory_mib, cpus, land),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        preexec_fn=_die_with_parent,
    )
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    looked = 0.0
    heartbeat: watch.Heartbeat | None = None
    try:
        while True:
            now = time.monotonic()
            if boot is None and os.path.exists(os.path.join(results, "ready")):
                boot = now - start
                heartbeat = watch.Heartbeat(os.path.join(results, watch.HEARTBEAT), now)
            if now - looked > 5:
                looked = now
                _watch(console, heartbeat, now, stalled_after, monitor, cpus, proc.pid)
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
        if made:
            os.rmdir(mountpoint)
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


def _carried(userland: Userland, workdir: str, image: Image) -> str:
    """lab.env's lines for stage2: with a userland other than this machine's root, the paths
    shown from this machine at their own (the working directory, the checkout, the lab cache
    the image is in; none inside another) and the virtualenv that is the checkout's .venv."""
    if userland.root == "/":
        return ""
    cache = os.path.dirname(os.path.dirname(image.kernel))
    paths: list[str] = []
    for path in sorted({workdir, userland.project, cache}, key=len):
        if path != "/" and not any(path.startswith(p.rstrip("/") + "/") for p in paths):
            paths.append(path)
    for path in paths:
        if any(c.isspace() for c in path):
            raise LabError(f"{path!r} must not contain spaces to be shown in the test host")
    return (
        f"LAB_CARRY={shlex.quote(' '.join(paths))}\nLAB_PROJECT={shlex.quote(userland.project)}\n"
        f"LAB_VENV={shlex.quote(userland.venv)}\n"
    )


def _check_results(results: str) -> None:
    if any(c.isspace() for c in results):
        raise LabError(f"the results directory {results!r} must not contain spaces")
    if len(os.fsencode(os.path.join(results, MONITOR))) > _SOCKET_PATH_MAX:
        raise LabError(
            f"the results directory {results!r} is too long: QEMU's monitor socket goes there "
            f"and a socket path has at most {_SOCKET_PATH_MAX} bytes"
        )


def _watch(
    console: str,
    heartbeat: watch.Heartbeat | None,
    now: float,
    stalled_after: float,
    monitor: str,
    cpus: int,
    pid: int,
) -> None:
    """Raise LabFrozen if the test host has stopped making progress (see watch)."""
    text = read_text(console)
    if watch.frozen(text):
        evidence = watch.lockup(text, cpus) or ""
        raise LabFrozen(f"the test host froze ({evidence}); stopped it (QEMU pid {pid})", evidence)
    silent = heartbeat.silent_for(now) if heartbeat is not None else 0.0
    if silent >= stalled_after:
        evidence = _ask_monitor(monitor, cpus)
        raise LabFrozen(
            f"the test host stopped: no heartbeat for {silent:.0f} s ({evidence}); "
            f"stopped it (QEMU pid {pid})",
            evidence,
        )


def _ask_monitor(path: str, cpus: int) -> str:
    """What QEMU's monitor shows of the CPUs, or why it could not be asked."""
    from vhostorch.qemu.monitor import MonitorError, QmpSocket

    sock = QmpSocket(path, timeout=10.0)
    try:
        sock.open()  # closes itself when it fails
        try:
            return watch.monitor_evidence(
                lambda line: str(sock.execute("human-monitor-command", {"command-line": line})),
                cpus,
            )
        finally:
            sock.close()
    except MonitorError as err:
        return f"no CPU state: {err}"


def _die_with_parent() -> None:
    """Runs in the QEMU child before exec: if we are killed, the test host goes too."""
    ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL


def _stdout(chunk: bytes) -> None:
    sys.stdout.buffer.write(chunk)
    sys.stdout.buffer.flush()
