"""The present, not the past (issue 23): a running VM's vhost NIC judged by `check` from what
the kernel holds at the moment of the check (the live source), with the wiring trace disarmed
and no --rewire, before, during and after each event that changes it: a pause, a masked
MSI-X vector, the guest driver unloaded, a guest reset, and the tap deleted under the VM.

One VM serves the module (a boot costs 15-20 s per kernel), its tests run in file order,
each starting from and going back to a healthy VM (the last one deletes its tap). Its tap
queues and vhost-net devices are passed as fds, as libvirt passes them. The guest's PID 1 is
a shell on its serial console (``rdinit=/bin/busybox -- sh``: the lab's guest initramfs,
unchanged), fed over a socket, so the test tells the guest what to do: run the lab's /init
(driver up, markers), rmmod/insmod, or write the MSI-X table with busybox ``devmem`` (allowed
under Debian's IO_STRICT_DEVMEM: virtio-pci does not claim the MSI-X table's BAR). QEMU's
monitor for the test is on TCP, which `check` does not look for on the command line, and a
second one on a unix socket QEMU gets as a listening fd, for `check --qmp`: `check --pid`
asks no monitor, so each of its verdicts is the kernel's (``"source": "live"``).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import guests, kernel, testhost
from tests.support.kernel import vhostorch
from vhostorch import taps
from vhostorch.check import targets, wiring
from vhostorch.kernel import tun
from vhostorch.taps import TapSpec

pytestmark = pytest.mark.testhost
QUEUES = 2  # one guest CPU enables one pair: the second tap queue is detached, and healthy
PER_VRING = ("nic.kick", "nic.call")
LIVE = ("nic.kick", "nic.call", "nic.vhost.started", "nic.vhost.memtable", "nic.features")
# busybox sh on a console it cannot make its controlling tty says this once per start.
SHELL_STARTED = "job control turned off"
READY = "VHOSTORCH-GUEST: ready"
# Vector Control of MSI-X table entry N is the dword at table + 16 * N + 12 (PCI spec 6.8.2);
# bit 0 masks the vector. The guest finds the table from the MSI-X capability (id 0x11):
# dword 1 holds the BAR (BIR, low 3 bits) and the table's offset in it.
MASK_SCRIPT = r"""
cat > /vector <<'EOF'
cfg() { od -An -tu1 -j $(($1)) -N 1 "$dev/config" | tr -d ' '; }
dev=$(readlink -f /sys/class/net/eth0/device/..)
cap=$(cfg 0x34)
while [ "$(cfg $cap)" != 17 ]; do cap=$(cfg $((cap + 1))); done
word=$(od -An -tu4 -j $((cap + 4)) -N 4 "$dev/config" | tr -d ' ')
bar=$(sed -n "$((word % 8 + 1))p" "$dev/resource" | cut -d' ' -f1)
addr=$((bar + word - word % 8 + 16 * $1 + 12))
devmem $addr 32 $2
echo "VHOSTORCH-TEST: vector $1 control $(devmem $addr 32)"
EOF
cat > /function <<'EOF'
cfg() { od -An -tu1 -j $(($1)) -N 1 "$dev/config" | tr -d ' '; }
dev=$(readlink -f /sys/class/net/eth0/device/..)
cap=$(cfg 0x34)
while [ "$(cfg $cap)" != 17 ]; do cap=$(cfg $((cap + 1))); done
printf "\\$1" | dd of="$dev/config" bs=1 seek=$((cap + 3)) count=1 conv=notrunc 2>/dev/null
echo "VHOSTORCH-TEST: function control $(cfg $((cap + 3)))"
EOF
"""


class ShellGuest:
    """The module's VM: QEMU/KVM, its console a socket (input) and a file (output), QMP on TCP."""

    def __init__(self, tap: str, workdir: str) -> None:
        self.tap = tap
        self.console = os.path.join(workdir, "console.log")
        self.serial = os.path.join(workdir, "serial.sock")
        self.port = 20000 + os.getpid() % 20000
        # A second monitor for `check --qmp`: a unix socket QEMU gets as a listening fd, so
        # its path is on no command line (`check --pid` asks no monitor).
        self.qmp_path = os.path.join(workdir, "qmp.sock")
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(self.qmp_path)
        listener.listen(1)
        # The tap's queues and the vhost-net devices opened here and passed as fds, as
        # libvirt does: the NIC's fds are then known by number, whatever becomes of the tap.
        fds = tun.open_queues(tap, QUEUES)
        fds += [os.open("/dev/vhost-net", os.O_RDWR) for _ in range(QUEUES)]
        netdev = "tap,id=n0,vhost=on,fds={}:{},vhostfds={}:{}".format(*fds)
        device = f"virtio-net-pci,netdev=n0,id=net0,mq=on,vectors={2 * QUEUES + 2}"
        argv = guests.qemu_argv(self.console, "rdinit=/bin/busybox -- sh",
                                ["-netdev", netdev, "-device", device])  # fmt: skip
        at = argv.index("-serial")
        argv[at : at + 2] = [
            "-chardev",
            f"socket,id=con,path={self.serial},server=on,wait=off,logfile={self.console}",
            "-serial", "chardev:con",
            "-qmp", f"tcp:127.0.0.1:{self.port},server=on,wait=off",
            "-chardev", f"socket,id=qmp2,fd={listener.fileno()},server=on,wait=off",
            "-mon", "chardev=qmp2,mode=control",
        ]  # fmt: skip
        self.log = open(os.path.join(workdir, "qemu.log"), "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            pass_fds=[listener.fileno(), *fds],
        )  # fmt: skip
        listener.close()
        for fd in fds:
            os.close(fd)
        self.pid = self.proc.pid
        self.qmp: Any = None
        # The console as the guest wrote it, read from the socket as it comes: QEMU logs a
        # byte again each time it retries one the socket refused (EAGAIN), so its log file
        # doubles characters when a reader lags, and it drops what no client is there for.
        self.received = bytearray()
        self.input = socket.socket(socket.AF_UNIX)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.input.connect(self.serial)
                break
            except OSError:
                assert time.monotonic() < deadline and self.proc.poll() is None, "no console"
                time.sleep(0.05)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        with contextlib.suppress(OSError):
            while chunk := self.input.recv(65536):
                self.received += chunk

    def text(self) -> str:
        return bytes(self.received).decode(errors="replace")

    def wait_for(self, mark: str, count: int = 1, timeout: float = 180) -> None:
        """Until ``mark`` was printed ``count`` times (each boot prints the markers anew)."""
        deadline = time.monotonic() + timeout
        while self.text().count(mark) < count:
            assert self.proc.poll() is None, f"QEMU exited: {self.text()[-2000:]}"
            assert time.monotonic() < deadline, f"no {mark!r} x{count}: {self.text()[-2000:]}"
            time.sleep(0.2)

    def type(self, text: str) -> None:
        """Lines typed at the guest's shell, over the one connection held open (QEMU drops
        what it has not passed on to the UART when its client goes)."""
        for line in text.splitlines(keepends=True):
            self.input.sendall(line.encode())
            time.sleep(0.05)

    def boot(self, times: int) -> None:
        """Wait for the ``times``-th shell, run the lab's init in it, wait for its markers."""
        self.wait_for(SHELL_STARTED, times)
        # Without job control ash opens /dev/null for a background job: made before /init
        # mounts devtmpfs (the kernel's own initramfs has only /dev/console).
        self.type("/bin/busybox mknod /dev/null c 1 3; /init &\n")
        self.wait_for(READY, times)
        self.type(MASK_SCRIPT)

    def monitor(self, command: str, **args: object) -> Any:
        from qemu.qmp.legacy import QEMUMonitorProtocol

        if self.qmp is None:
            self.qmp = QEMUMonitorProtocol(("127.0.0.1", self.port))
            self.qmp.connect()
        return self.qmp.cmd(command, **args)

    def close(self) -> None:
        self.input.close()
        if self.qmp is not None:
            self.qmp.close()
        guests.stop(self.proc)
        self.log.close()


@pytest.fixture(scope="module")
def vm() -> Iterator[ShellGuest]:
    if not testhost.INSIDE:
        pytest.fail("this test changes the host it runs on: run it with -m testhost")
    was = wiring.armed()
    wiring.disarm()  # before the guest driver starts: nothing of it may be traced
    workdir = tempfile.mkdtemp(prefix="vhopresent-")
    tap = kernel.unique("vhopr")
    taps.ensure([TapSpec(tap, queues=QUEUES)])
    g = ShellGuest(tap, workdir)
    try:
        g.boot(1)
        yield g
    finally:
        g.close()
        taps.delete([tap])
        subprocess.run(["rm", "-rf", workdir], check=False)
        if was:
            wiring.arm()


def cli(pid: int, *args: str) -> tuple[int, dict[str, Any]]:
    """`vhostorch check --pid PID --json`: its exit code and report."""
    done = vhostorch("check", "--pid", str(pid), "--json", *args)
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


def check(pid: int | None = None, qmp: str | None = None) -> dict[str, Any]:
    """What `check --pid` (or `--qmp`) reports, each check with its cause (which the JSON
    leaves out: code tells failures apart by it), from the library the command runs."""
    (found,) = targets.reports(targets.Target(pid=pid, qmp=qmp))
    checks = [{**c.asdict(), "cause": c.cause} for c in found.checks]
    return {"ok": found.ok(), "strict": found.ok(strict=True), "checks": checks}


def verdicts(report: dict[str, Any]) -> dict[tuple[str, int | None], dict[str, Any]]:
    return {(c["id"], c["queue"]): c for c in report["checks"] if c["nic"]}


def healthy(g: ShellGuest, timeout: float = 60) -> dict[tuple[str, int | None], dict[str, Any]]:
    """Every check passes with --strict, each from the kernel now (the state may take a
    moment to settle after an event: QEMU rewires vhost when the guest or cont asks)."""
    deadline = time.monotonic() + timeout
    while True:
        report = check(g.pid)
        if report["strict"]:
            break
        bad = [c for c in report["checks"] if c["status"] != "pass"]
        assert time.monotonic() < deadline, json.dumps(bad, indent=1)
        time.sleep(0.5)
    found = verdicts(report)
    for (cid, _), c in found.items():
        if cid in LIVE:
            assert c["evidence"]["source"] == "live", c
    assert sum(1 for cid, _ in found if cid in PER_VRING) == 2 * 2 * QUEUES
    return found


def not_started_now(report: dict[str, Any], queues: range) -> None:
    """The vrings of ``queues`` (all, when vhost stopped) are not started now: warn, not-wired."""
    found = verdicts(report)
    for q in queues:
        for cid in PER_VRING:
            c = found[(cid, q)]
            assert (c["status"], c["cause"], c["evidence"]["source"]) == (
                "warn", "not-wired", "live"
            ), c  # fmt: skip
            assert c["message"].startswith("not started now: vhost has no backend (tap)"), c
    started = found[("nic.vhost.started", None)]
    assert (started["status"], started["cause"], started["evidence"]["source"]) == (
        "warn", "not-wired", "live"
    ), started  # fmt: skip
    assert report["ok"] is True  # a warning, not a failure


def test_paused_vm_is_not_started_now_and_passes_again_after_cont(
    untraced: None, vm: ShellGuest
) -> None:
    healthy(vm)
    vm.monitor("stop")
    try:
        # QEMU stops vhost (backend unset) and takes its ioeventfds and irqfds away.
        report = check(vm.pid)
        not_started_now(report, range(2 * QUEUES))
        for c in report["checks"]:
            if c["cause"] == "not-wired":
                assert "the VM is paused, or the guest driver is not up" in c["message"], c
        assert [cli(vm.pid)[0], cli(vm.pid, "--strict")[0]] == [0, 1]
        # Where QEMU's monitor is read, the present kernel state's verdicts say which it is.
        found = verdicts(check(qmp=vm.qmp_path))
        for q in range(2 * QUEUES):
            for cid in PER_VRING:
                c = found[(cid, q)]
                assert (c["status"], c["cause"], c["evidence"]["source"]) == (
                    "warn", "not-wired", "live"
                ), c  # fmt: skip
                assert "the VM is paused (QEMU's monitor says so)" in c["message"], c
        started = found[("nic.vhost.started", None)]
        assert (started["status"], started["message"]) == (
            "warn", "the VM is paused; vhost runs while it runs"
        ), started  # fmt: skip
    finally:
        vm.monitor("cont")
    healthy(vm)


def test_masked_msix_vector_is_masked_not_failed(untraced: None, vm: ShellGuest) -> None:
    """The guest masks the MSI-X vector of RX queue 0 (entry 1: entry 0 is the config
    vector) by writing its Vector Control word: QEMU gives vhost its masked notifier as the
    call, which no irqfd is; unmasked, the irqfd is vhost's call again."""
    before = healthy(vm)
    vm.type("sh /vector 1 1\n")
    vm.wait_for("VHOSTORCH-TEST: vector 1 control 0x00000001")
    try:
        deadline = time.monotonic() + 30
        while True:
            report = check(vm.pid)
            found = verdicts(report)
            call = found[("nic.call", 0)]
            if call["status"] != "pass" or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert (call["status"], call["cause"], call["evidence"]["source"]) == (
            "warn", "masked", "live"
        ), call  # fmt: skip
        assert call["evidence"]["masked"] is True and "masked" in call["message"], call
        assert call["evidence"]["call"]["eventfd_id"] != before[("nic.call", 0)]["evidence"][
            "call"]["eventfd_id"]  # fmt: skip
        # Only that vector: the other vrings, and every kick, still pass.
        others = {k: c["status"] for k, c in found.items() if k != ("nic.call", 0)}
        assert set(others.values()) == {"pass"}, others
        assert report["ok"] is True
    finally:
        vm.type("sh /vector 1 0\n")
        vm.wait_for("VHOSTORCH-TEST: vector 1 control 0x00000000")
    healthy(vm)


def test_msix_function_mask_is_masked_not_failed(untraced: None, vm: ShellGuest) -> None:
    """The guest masks every vector at once (MSI-X Message Control's Function Mask, bit 14,
    written through the device's config space): QEMU masks each vector, so no vring's call
    is an irqfd, and KVM keeps QEMU's irqfds of the masked vectors. Judged as masked, as
    one masked vector is, not as QEMU injecting the interrupts itself (which it judged
    before: relayed-interrupt, a failure)."""
    healthy(vm)
    vm.type("sh /function 300\n")  # octal: MSI-X Enable (0x80) | Function Mask (0x40)
    vm.wait_for("VHOSTORCH-TEST: function control 192")
    try:
        deadline = time.monotonic() + 30
        while True:
            report = check(vm.pid)
            found = verdicts(report)
            calls = [found[("nic.call", q)] for q in range(2 * QUEUES)]
            if all(c["status"] != "pass" for c in calls) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        for c in calls:
            assert (c["status"], c["cause"], c["evidence"]["source"]) == (
                "warn", "masked", "live"
            ), c  # fmt: skip
            assert "KVM keeps QEMU's irqfds of masked vectors" in c["message"], c
        kicks = {found[("nic.kick", q)]["status"] for q in range(2 * QUEUES)}
        assert kicks == {"pass"} and report["ok"] is True, report
    finally:
        vm.type("sh /function 200\n")  # MSI-X Enable alone
        vm.wait_for("VHOSTORCH-TEST: function control 128")
    healthy(vm)


def test_unloaded_guest_driver_is_not_started_now_not_failed(
    untraced: None, vm: ShellGuest
) -> None:
    healthy(vm)
    vm.type("rmmod virtio_net && echo VHOSTORCH-TEST: unloaded\n")
    vm.wait_for("VHOSTORCH-TEST: unloaded")
    # The driver's remove resets the device (status 0): QEMU stops vhost.
    deadline = time.monotonic() + 30
    while True:
        report = check(vm.pid)
        if verdicts(report)[("nic.vhost.started", None)]["status"] != "pass":
            break
        assert time.monotonic() < deadline, report
        time.sleep(0.5)
    not_started_now(report, range(2 * QUEUES))
    vm.type("insmod /modules/virtio_net.ko && echo VHOSTORCH-TEST: loaded\n")
    vm.wait_for("VHOSTORCH-TEST: loaded")
    healthy(vm)


def test_guest_reset_is_judged_during_and_after_the_reprobe(untraced: None, vm: ShellGuest) -> None:
    healthy(vm)
    shells = vm.text().count(SHELL_STARTED)
    vm.monitor("set-action", reboot="reset")  # the guests' -no-reboot would end QEMU
    vm.monitor("system_reset")
    # Until the guest's /init loads virtio_net again (this test starts it), vhost is stopped.
    vm.wait_for(SHELL_STARTED, shells + 1)
    not_started_now(check(vm.pid), range(2 * QUEUES))
    vm.boot(shells + 1)
    after = healthy(vm)
    # The driver wired vhost anew: a kick eventfd per vring again, each KVM's and polled.
    kicks = {after[("nic.kick", q)]["evidence"]["kick"]["eventfd_id"] for q in range(2 * QUEUES)}
    assert len(kicks) == 2 * QUEUES and None not in kicks, kicks


def test_tap_deleted_under_the_vm_fails(untraced: None, vm: ShellGuest) -> None:
    """`ip link del` of the tap while QEMU holds its fds (and vhost its socket): the kernel
    detaches every queue from the device, so vhost's backend is a tun queue on no device."""
    before = healthy(vm)[("nic.vhost.started", None)]
    # One guest CPU enables one queue pair of two: QEMU detaches the other pair's tap queue,
    # which is healthy.
    assert sorted(before["evidence"]["tap_queues"].values()) == ["attached", "detached"], before
    kernel.run("ip", "link", "del", vm.tap)
    report = check(vm.pid)
    found = verdicts(report)
    started = found[("nic.vhost.started", None)]
    fds = sorted(before["evidence"]["tap_queues"])
    assert started["evidence"]["tap_queues"] == dict.fromkeys(fds, "gone"), started
    assert (started["status"], started["cause"], started["evidence"]["source"]) == (
        "fail", "tap-gone", "live"
    ), started  # fmt: skip
    assert "the tap is gone" in started["message"], started
    taps = found[("nic.tap.fds", None)]
    assert (taps["status"], taps["evidence"]["orphans"]) == ("fail", fds), taps
    assert taps["message"].startswith(f"QEMU holds /dev/net/tun fd(s) {fds} on no device"), taps
    # KVM still signals vhost, and vhost still polls: the wiring is intact, the data path dead.
    assert {found[(cid, q)]["status"] for cid in PER_VRING for q in range(2 * QUEUES)} == {"pass"}
    code, _ = cli(vm.pid)
    assert code == 1 and report["ok"] is False
