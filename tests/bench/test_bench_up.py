"""Time to a guest's driver up: `vhostorch up` (QMP backend) against a shell script that makes
the same tap with `ip` and starts the same QEMU with `-netdev tap,ifname=...,vhost=on`.

Measured in the test host (real KVM and vhost-net), by one observer for both: the
time from the start of the command until the guest's console says its NIC is up
(its virtio-net driver has probed the device, so vhost has started). Rounds
alternate between the two so that drift in the nested host hits both alike.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import pytest

from tests.support import guests, kernel
from vhostorch.check import wiring
from vhostorch.lab.image import GUEST_APPEND

# On this machine's userland (Debian 12: 6.1 and 6.12), to keep CI inside its budget; Debian
# 13's figures in the README were measured at 10b9dfe (tests/support/testhost.py).
pytestmark = [pytest.mark.bench, pytest.mark.testhost(own_userland=True)]

ROUNDS = 3
MARKER = "VHOSTORCH-GUEST: nic eth0 up"
VHOSTORCH = os.path.join(os.path.dirname(sys.executable), "vhostorch")
SHELL = """set -e
ip tuntap add dev "$TAP" mode tap vnet_hdr
ip link set "$TAP" up
qemu-system-x86_64 -name guest="$NAME" -machine pc -accel kvm -m 256 -smp 1 -display none \
  -nodefaults -no-user-config -daemonize -pidfile "$DIR/qemu.pid" -serial "file:$DIR/console.log" \
  -cpu host -kernel "$KERNEL" -initrd "$INITRD" -append "$APPEND" \
  -netdev "tap,id=n0,ifname=$TAP,script=no,downscript=no,vhost=on" \
  -device "virtio-net-pci,netdev=n0,id=net0,mac=52:54:00:12:34:56"
"""


def _wait_for_marker(console: str, began: float, timeout: float = 180) -> float:
    while True:
        try:
            with open(console, errors="replace") as f:
                if MARKER in f.read():
                    return time.monotonic() - began
        except FileNotFoundError:
            pass
        assert time.monotonic() - began < timeout, f"no {MARKER!r} in {console}"
        time.sleep(0.02)


def _shell_round(workdir: str) -> float:
    img = guests.image()
    tap, name = kernel.unique("vs"), kernel.unique("vho-sh")
    env = dict(os.environ, TAP=tap, NAME=name, DIR=workdir, KERNEL=img.kernel,
               INITRD=img.guest_initrd, APPEND=GUEST_APPEND)  # fmt: skip
    began = time.monotonic()
    try:
        subprocess.run(["sh", "-c", SHELL], env=env, check=True)
        return _wait_for_marker(f"{workdir}/console.log", began)
    finally:
        with open(f"{workdir}/qemu.pid") as f:
            pid = int(f.read())
        # The QEMU this round started (os.kill: Debian 13's minimal root has no kill(1)).
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        while os.path.exists(f"/proc/{pid}"):
            time.sleep(0.05)
        subprocess.run(["ip", "link", "del", tap], check=False)
        os.unlink(f"{workdir}/console.log")


def _vhostorch_round(workdir: str) -> tuple[float, float, float]:
    name = kernel.unique("vho-up")
    spec = guests.spec_file(workdir, name, [{"tap": kernel.unique("vu")}])
    began = time.monotonic()
    up = subprocess.Popen([VHOSTORCH, "up", spec, "--strict"], stdout=subprocess.PIPE, text=True)
    try:
        console = f"/run/vhostorch/vms/{name}.d/console.log"
        driver = _wait_for_marker(console, began)
        out, _ = up.communicate(timeout=90)
        assert up.returncode == 0, out
        returned = time.monotonic() - began
    finally:
        up.wait()
        down_began = time.monotonic()
        assert subprocess.run([VHOSTORCH, "down", name], capture_output=True).returncode == 0
    return driver, returned, time.monotonic() - down_began


def test_up_reaches_the_guest_driver_as_fast_as_a_shell_script(in_testhost: None) -> None:
    was_armed = wiring.armed()
    # `up` arms the wiring trace (a kprobe on every ioctl, KVM_RUN included) and leaves it
    # armed; arm it first, so that every round of both sides runs under the same probe.
    wiring.arm()
    workdir = tempfile.mkdtemp(prefix="vho-bench-")
    shell, ours, returned, down = [], [], [], []
    try:
        # One round of vhostorch first, not counted: its first `up` of a boot was 10-15 s
        # slower than the next in every CI run (30.5-37.8 s against 17-29 s; the shell
        # script's first round is not), a cold start (its modules read over 9p, the first
        # live read parsing BTF) that made the median of three follow one more slow round
        # under CI's load (1.93x and 1.95x once each against a 1.8x guard).
        _vhostorch_round(workdir)
        for _ in range(ROUNDS):
            shell.append(_shell_round(workdir))
            driver, back, gone = _vhostorch_round(workdir)
            ours.append(driver)
            returned.append(back)
            down.append(gone)
    finally:
        subprocess.run(["rm", "-rf", workdir], check=False)
        if not was_armed:
            wiring.disarm()
    ratio = statistics.median(ours) / statistics.median(shell)
    print(
        f"\nbench up (QMP) to guest driver up: vhostorch {statistics.median(ours):.2f} s, shell + "
        f"ip + QEMU command line {statistics.median(shell):.2f} s (medians of {ROUNDS}), ratio "
        f"{ratio:.2f}x (target 1.2x); `up` returned with its check after "
        f"{statistics.median(returned):.2f} s, `down` took {statistics.median(down):.2f} s; "
        f"rounds: shell {', '.join(f'{t:.1f}' for t in shell)}, "
        f"vhostorch {', '.join(f'{t:.1f}' for t in ours)}"
    )
    # The guard is on the ratio. What vhostorch adds is a fixed amount of work (the
    # interpreter, its imports and qemu.qmp's, under TCG), so its seconds follow the CPU share
    # the test host gets: 2.2-3.3 s with one test host at a time, 3.7-4.4 s with two side by
    # side, 3.5-7.1 s with three beside the tests outside (clean-clone CI, 2 cores), where the
    # shell script's rounds took 11-17 s. Against the baseline measured in the same rounds it
    # stayed at 1.23x-1.50x in all of them. Inner guests boot in about 7 s alone, so the 1.2x
    # target is missed by that fixed cost (README, Benchmarks).
    assert ratio < 1.8, f"vhostorch took {ratio:.2f}x the shell script's time"
