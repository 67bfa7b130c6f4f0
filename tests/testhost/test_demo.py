"""The README's main command, `bash scripts/demo.sh`, run as a new user runs it.

A rename once broke it (scripts/demo-vm.sh imported a module by its old name) and
nothing noticed, because no test ran it: here CI runs it end to end, from the
checkout, with CI=true and no stdin, booting the test host itself where this
machine has no usable vhost-net and KVM.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from vhostorch.check import ids

ROOT = Path(__file__).resolve().parents[2]
VM = "vho-demo"
TAP = "vho-demo-n0"
# The demo's spec: one NIC, vhost required, 2 queue pairs, so 4 virtqueues for kick and call.
QUEUE_PAIRS = 2
PER_VM = (ids.HOST_VHOST_NET, ids.VM_KVM)
PER_NIC = (
    ids.VHOST_REQUESTED,
    ids.QUEUES,
    ids.TAP_FDS,
    ids.VHOST_FDS,
    ids.VHOST_WORKER,
    ids.VHOST_STARTED,
    ids.VHOST_MEMTABLE,
    ids.FEATURES,
    ids.VHOST_PLACEMENT,
)
PER_QUEUE = (ids.KICK, ids.CALL)


def _demo_leftovers() -> list[str]:
    """What the demo could leave on this machine: its tap, a process (QEMU, the test host's
    QEMU, whose command line names the demo's results directory), state, temporary files."""
    found = []
    if subprocess.run(["ip", "link", "show", TAP], capture_output=True).returncode == 0:
        found.append(f"tap {TAP}")
    me = os.getpid()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(pid) != me and "vho-demo" in cmdline:
            found.append(f"process {pid}: {cmdline}")
    for path in (f"/run/vhostorch/vms/{VM}.json", f"/run/vhostorch/vms/{VM}.d"):
        if os.path.lexists(path):
            found.append(path)
    found += [f"/tmp/{n}" for n in os.listdir("/tmp") if n.startswith("vho-demo")]
    return found


def _table(out: str) -> tuple[list[list[str]], str]:
    """The check table `up` printed: its rows split in columns, and the verdict line."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:5] == [
        "CHECK", "NIC", "QUEUE", "STATUS", "MESSAGE"])  # fmt: skip
    rows = []
    for line in lines[start + 1 :]:
        if re.match(r"(OK|FAILED): ", line):
            return rows, line
        rows.append(line.split(None, 4))
    raise AssertionError(f"no verdict line after the check table:\n{out}")


def _machine(release: str) -> list[str]:
    """How a command runs on a machine of ``release``: this one (Debian 12), or a throwaway
    copy of Debian 13's root (lab.userland), chrooted on this machine's kernel."""
    if release == "debian12":
        return []
    from vhostorch.lab import userland

    land = userland.ensure_userland("trixie", log=print)
    return userland.chrooted(land, "env")


@pytest.mark.testhost(outside=True)
@pytest.mark.parametrize("release", ["debian12", "debian13"])
def test_demo_runs_as_a_new_user_runs_it_and_leaves_nothing_behind(release: str) -> None:
    """On Debian 13 (its root: QEMU 10, libvirt 11, Python 3.13, its own kernel 6.12 for the
    test host, fetched from its archive) as on this Debian 12 machine."""
    assert not _demo_leftovers(), "a demo run before this test left these"
    on = _machine(release)
    # scripts/demo.sh runs setup.sh first; in CI, test.sh has just run it: then it is quick.
    started = time.monotonic()
    subprocess.run([*on, "bash", "scripts/setup.sh"], cwd=ROOT, check=True,
                   stdin=subprocess.DEVNULL)  # fmt: skip
    setup = time.monotonic() - started
    started = time.monotonic()
    demo = subprocess.Popen(
        [*on, "bash", "scripts/demo.sh"],
        cwd=ROOT,
        env={**os.environ, "CI": "true"},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = demo.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(demo.pid, signal.SIGTERM)  # demo.sh passes it on to lab run
        out, _ = demo.communicate()
        pytest.fail(f"the demo did not finish within 600 s:\n{out}")
    seconds = time.monotonic() - started
    print(f"\nscripts/demo.sh: exit {demo.returncode} in {seconds:.1f} s (setup.sh {setup:.2f} s)")
    print(out)
    assert demo.returncode == 0, out
    assert setup < 10

    # The spec, as the README says: one NIC, 2 queue pairs, vhost required.
    assert f'name = "{VM}"' in out and f'tap = "{TAP}"' in out
    assert f"queues = {QUEUE_PAIRS}" in out and 'vhost = "required"' in out
    assert re.search(
        rf"^{VM}: up \(qmp backend, pid \d+, .*the guest driver started vhost", out, re.M
    )
    rows, verdict = _table(out)
    assert all(row[3] == "pass" for row in rows), out
    checks = sorted((row[0], row[2]) for row in rows)
    virtqueues = [str(q) for q in range(2 * QUEUE_PAIRS)]
    wanted = [(c, "-") for c in PER_VM + PER_NIC] + [(c, q) for c in PER_QUEUE for q in virtqueues]
    assert checks == sorted(wanted), out
    assert verdict == f"OK: {len(wanted)} pass"
    # The tap shown while the VM holds it: multi-queue (2 queue pairs), vnet_hdr, up, vhostorch's.
    shown = re.search(rf"^{TAP}\s+(.*)$", out, re.M)
    assert shown, out
    queues, vnet_hdr, *_, state, attached, managed = shown.group(1).split()
    assert (queues, vnet_hdr, state, attached, managed) == ("multi", "on", "up", "1", "yes")
    assert re.search(rf"^{VM}: down \(pid \d+ stopped; taps removed: {TAP}\)$", out, re.M)

    # Nothing left here: no tap, no QEMU (nor test host), no state, no temporary files.
    assert not _demo_leftovers()


@pytest.mark.skipif(
    os.path.exists("/dev/vhost-net"), reason="this machine has vhost-net: up would not refuse"
)
def test_a_failing_demo_step_stops_the_demo_loudly_and_cleans_up() -> None:
    # On this machine up refuses the spec (vhost required, no vhost-net): the demo must stop
    # there with up's error and status, not go on, and leave nothing behind.
    done = subprocess.run(
        ["bash", "scripts/demo-vm.sh"],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert re.search(r'^vhostorch: error: nic\[0\] \(vho-demo-n0\): vhost = "required" cannot be '
                     r"had: this host has no usable /dev/vhost-net", done.stderr, re.M)  # fmt: skip
    assert "tap show" not in done.stderr and "demo: failed (exit 1)" in done.stderr
    assert not _demo_leftovers()


@pytest.mark.testhost(outside=True)
@pytest.mark.skipif(
    os.path.exists("/dev/vhost-net"), reason="this machine has vhost-net: no test host to stop"
)
def test_a_signal_to_the_demo_stops_the_test_host_and_leaves_nothing() -> None:
    # SIGTERM to demo.sh alone (as `kill PID` or systemd's stop sends it) while the test host
    # boots: the test host is stopped at once, not left running the demo to its end.
    demo = subprocess.Popen(
        ["bash", "scripts/demo.sh"],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        assert demo.stdout is not None
        seen = ""
        while "running the demo inside the test host" not in seen:
            line = demo.stdout.readline()
            assert line, seen
            seen += line
        time.sleep(3)  # lab run has started the test host's QEMU by now
        assert any("vho-demo-lab-" in p for p in _demo_leftovers()), "no test host running"
        demo.send_signal(signal.SIGTERM)
        out, _ = demo.communicate(timeout=30)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
    assert demo.returncode == 128 + signal.SIGTERM, seen + out
    assert not _demo_leftovers()
