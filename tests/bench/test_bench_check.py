"""`vhostorch check --all` over 20 and then 200 running QEMUs, against a shell loop that merely
lists their fds and threads (the floor of reading /proc), both as fresh processes, in the same
run; and its cost per VM at 20 and at 200 (flat: no per-VM cost grows with the fleet).

The QEMUs are real (one tap NIC each, started paused with -S under TCG with 16 MiB, so they
cost no CPU and ~20 MiB each).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import pytest

from tests.support import kernel
from vhostorch import taps
from vhostorch.taps import TapSpec

pytestmark = [pytest.mark.bench, pytest.mark.kernel]

FLEETS = (20, 200)
ROUNDS = 9
VHOSTORCH = os.path.join(os.path.dirname(sys.executable), "vhostorch")
SHELL = (
    "for p in $(pgrep -x qemu-system-x86); do ls -l /proc/$p/fd > /dev/null; "
    "ls /proc/$p/task > /dev/null; done"
)


@contextmanager
def qemu(tap: str) -> Iterator[int]:
    proc = subprocess.Popen(
        [
            "qemu-system-x86_64", "-S", "-M", "pc", "-accel", "tcg", "-m", "16", "-nodefaults",
            "-display", "none", "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
            "-device", "virtio-net-pci,netdev=n0,id=net0",
        ],
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield proc.pid
    finally:
        proc.kill()  # the QEMU this benchmark started
        proc.wait()


def _median(cmd: list[str]) -> float:
    times = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _qemus() -> set[int]:
    done = subprocess.run(["pgrep", "-x", "qemu-system-x86"], capture_output=True, text=True)
    return {int(p) for p in done.stdout.split()}


def _wait_for_taps(pids: list[int]) -> int:
    """Wait until every QEMU of ``pids`` has opened its tap; return how many QEMUs check saw."""
    deadline = time.monotonic() + 120
    while True:
        done = subprocess.run([VHOSTORCH, "check", "--all", "--json"],
                              capture_output=True, text=True)  # fmt: skip
        reports = json.loads(done.stdout)["reports"]
        tapped = {r["target"]["pid"] for r in reports if r["nics"]}
        if tapped >= set(pids):
            return len(reports)
        assert time.monotonic() < deadline, done.stdout[-2000:]
        time.sleep(0.5)


def test_check_all_over_20_and_200_qemus_against_listing_their_fds() -> None:
    others = _qemus()  # QEMUs of other work on this machine: both sides look at them too
    names = [kernel.unique("vb") for _ in range(FLEETS[-1])]
    taps.ensure([TapSpec(n) for n in names])
    figures = []
    try:
        with ExitStack() as stack:
            pids: list[int] = []
            for fleet in FLEETS:
                pids += [stack.enter_context(qemu(n)) for n in names[len(pids) : fleet]]
                seen = _wait_for_taps(pids)
                shell = _median(["sh", "-c", SHELL])
                check = _median([VHOSTORCH, "check", "--all", "--json"])
                metrics = _median([VHOSTORCH, "check", "--all", "--format", "openmetrics"])
                figures.append((fleet, seen, shell, check, metrics))
    finally:
        taps.delete(names)
    print()
    for fleet, seen, shell, check, metrics in figures:
        print(
            f"bench check --all, {fleet} QEMUs ({seen} on the host): vhostorch {check * 1000:.1f} "
            f"ms ({check / seen * 1000:.2f} ms per VM), --format openmetrics "
            f"{metrics * 1000:.1f} ms, shell loop listing fds and threads {shell * 1000:.1f} ms "
            f"(medians of {ROUNDS}), ratio {check / shell:.2f}x (target 1.0x)"
        )
    (_, seen20, _, check20, _), (_, seen200, shell200, check200, _) = figures
    # What one more VM costs, from 20 to 200, against the cost per VM at 20 (which also
    # carries the fixed cost of starting Python): flat, or below.
    marginal = (check200 - check20) / (seen200 - seen20)
    print(
        f"bench check --all per VM: {check20 / seen20 * 1000:.2f} ms at {seen20}, "
        f"{check200 / seen200 * 1000:.2f} ms at {seen200}, each VM from {seen20} to {seen200}: "
        f"{marginal * 1000:.2f} ms ({len(others)} other QEMUs on the host)"
    )
    assert marginal <= 1.2 * check20 / seen20  # flat: no cost that grows with the fleet
    assert check200 / shell200 < 1.3  # the target is 1.0x; headroom for a shared machine
