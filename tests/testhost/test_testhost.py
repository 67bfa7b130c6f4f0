"""Inside the test host: real /dev/vhost-net, real KVM, and QEMU/libvirt guests using them.

These run in one boot per session (see tests/support/testhost.py); ``in_testhost``
refuses to run them anywhere else, because they load guests and change /etc.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.support import guests, kernel
from vhostorch.lab.run import read_text

pytestmark = pytest.mark.testhost

VHOST_GET_FEATURES = 0x8008AF00  # _IOR(0xAF, 0x00, __u64)
VHOST_SET_OWNER = 0xAF01
KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_CHECK_EXTENSION = 0xAE03
KVM_CAP_IRQFD = 32
KVM_CAP_IOEVENTFD = 36
VHOST_NET_F_VIRTIO_NET_HDR = 27
VIRTIO_F_VERSION_1 = 32


def count(targets: dict[int, str], path: str) -> int:
    return sum(1 for t in targets.values() if t == path)


def test_vhost_net_and_kvm_are_usable(in_testhost: None) -> None:
    fd = os.open("/dev/vhost-net", os.O_RDWR)
    try:
        features = struct.unpack("Q", fcntl.ioctl(fd, VHOST_GET_FEATURES, bytes(8)))[0]
        assert features >> VHOST_NET_F_VIRTIO_NET_HDR & 1, hex(features)
        assert features >> VIRTIO_F_VERSION_1 & 1, hex(features)
        # SET_OWNER starts this process's worker, as it does for QEMU.
        fcntl.ioctl(fd, VHOST_SET_OWNER)
        assert guests.vhost_workers(os.getpid()), "no vhost worker after VHOST_SET_OWNER"
    finally:
        os.close(fd)
    kvm = os.open("/dev/kvm", os.O_RDWR)
    try:
        assert fcntl.ioctl(kvm, KVM_GET_API_VERSION) == 12
        assert fcntl.ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_IRQFD) > 0
        assert fcntl.ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_IOEVENTFD) > 0
        vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
        assert os.readlink(f"/proc/self/fd/{vm}") == "anon_inode:kvm-vm"
        os.close(vm)
    finally:
        os.close(kvm)


@pytest.mark.parametrize("queues", [1, 4])
def test_qemu_vhost_on_holds_a_vhost_fd_and_worker_per_queue_pair(
    in_testhost: None, queues: int
) -> None:
    guests.image()
    with guests.tap(queues) as name:
        start = time.monotonic()
        with guests.guest(guests.vhost_netdev(name, queues)) as g:
            g.wait_for(r"VHOSTORCH-GUEST: nic eth0 up", timeout=120)
            up = time.monotonic() - start
            targets = guests.fd_targets(g.pid)
            assert count(targets, "/dev/vhost-net") == queues, targets
            assert count(targets, "/dev/net/tun") == queues, targets
            assert count(targets, "anon_inode:kvm-vm") == 1, targets
            assert len(guests.vhost_workers(g.pid)) == queues
            # The guest sees MSI-X vectors per queue (irqfd needs them).
            g.wait_for(r"irq .*PCI-MSI.*virtio0-input\.0", timeout=60)
            print(f"guest driver up {up:.1f} s after QEMU started ({queues} queue pairs)")


def test_libvirt_kvm_domain_with_vhost_queues_holds_the_vhost_fds(
    in_testhost: None, libvirtd: str
) -> None:
    import libvirt

    workdir = tempfile.mkdtemp(prefix="vho-dom-")
    os.chmod(workdir, 0o755)
    console = os.path.join(workdir, "console.log")
    name = kernel.unique("vho-t-")
    with guests.tap(4) as dev:
        xml = guests.domain_xml(name, dev, 4, console)
        conn = libvirt.open(libvirtd)
        try:
            dom = conn.createXML(xml, 0)
            try:
                with open(f"/run/libvirt/qemu/{name}.pid") as f:
                    pid = int(f.read().strip())
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
                netdev = json.loads(argv[argv.index(b"-netdev") + 1])
                assert netdev["vhost"] is True and len(netdev["vhostfds"].split(":")) == 4, netdev
                targets = guests.fd_targets(pid)
                assert count(targets, "/dev/vhost-net") == 4, targets
                assert count(targets, "/dev/net/tun") == 4, targets
                assert len(guests.vhost_workers(pid)) == 4
                deadline = time.monotonic() + 60
                while "VHOSTORCH-GUEST: nic eth0 up" not in read_text(console):
                    assert time.monotonic() < deadline, read_text(console)[-2000:]
                    time.sleep(0.2)
            finally:
                dom.destroy()
        finally:
            conn.close()
            subprocess.run(["rm", "-rf", workdir], check=False)


def _packets(dev: str) -> int:
    total = 0
    for stat in ("rx_packets", "tx_packets"):
        with open(f"/sys/class/net/{dev}/statistics/{stat}") as f:
            total += int(f.read())
    return total


# A syscall that moves a packet through an fd: its first argument is that fd.
IO_SYSCALLS = "read,write,readv,writev,preadv,pwritev,preadv2,pwritev2,recvmsg,sendmsg"
FIRST_FD = re.compile(rb"^(?:\d+\s+)?(\w+)\((\d+),", re.M)


@contextmanager
def _tap_syscalls(pid: int, counted: list[int]) -> Iterator[None]:
    """strace QEMU's threads but its vCPUs while the block runs; append to ``counted`` how
    many of their syscalls moved data through one of QEMU's tap fds.

    Exact where counting all syscalls was not: QEMU 10.0 (Debian 13) wakes its main loop on
    an eventfd of its own for seconds after the guest's driver is up (seen with strace; 26
    such syscalls once fell into the pings' window, against 12 allowed). The vCPU threads
    are left alone: they never touch the tap, and stopping each KVM_RUN exit would slow the
    guest.
    """
    taps = {fd for fd, target in guests.fd_targets(pid).items() if target == "/dev/net/tun"}
    assert taps, guests.fd_targets(pid)
    tids = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            if not f.read().startswith("CPU "):
                tids.append(tid)
    with tempfile.NamedTemporaryFile(prefix="vho-strace-") as out:
        argv = ["strace", "-qq", "-o", out.name, "-e", f"trace={IO_SYSCALLS}", "-e", "signal=none"]
        for tid in tids:
            argv += ["-p", tid]
        tracer = subprocess.Popen(argv, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 30
            while not all(_traced_by(pid, tid, tracer.pid) for tid in tids):
                assert tracer.poll() is None, tracer.stderr.read() if tracer.stderr else ""
                assert time.monotonic() < deadline, "strace did not attach within 30 s"
                time.sleep(0.05)
            yield
        finally:
            tracer.send_signal(signal.SIGINT)  # detaches from QEMU, which runs on
            tracer.wait(timeout=30)
        calls = FIRST_FD.findall(out.read())
    counted.append(sum(1 for _, fd in calls if int(fd) in taps))


def _traced_by(pid: int, tid: str, tracer: int) -> bool:
    with open(f"/proc/{pid}/task/{tid}/status") as f:
        return f"TracerPid:\t{tracer}\n" in f.read()


def _ping_through(vhost: str) -> tuple[int, int, int]:
    """Guest pings the tap's address; return (packets on the tap, syscalls QEMU made on the
    tap's fds, worker ns)."""
    with guests.tap(1) as name:
        append = "vho.addr=10.77.0.2/24 vho.ping=10.77.0.1 vho.count=60"
        with guests.guest(guests.vhost_netdev(name, 1, vhost), append=append) as g:
            g.wait_for(r"VHOSTORCH-GUEST: addr", timeout=120)
            workers = guests.vhost_workers(g.pid)
            assert len(workers) == (1 if vhost == "on" else 0)
            counted: list[int] = []
            with _tap_syscalls(g.pid, counted):
                before = (_packets(name), sum(map(guests.runtime_ns, workers)))
                kernel.run("ip", "addr", "add", "10.77.0.1/24", "dev", name)
                g.wait_for(r"VHOSTORCH-GUEST: ping ok 10\.77\.0\.1 received=60", timeout=120)
                after = (_packets(name), sum(map(guests.runtime_ns, workers)))
    packets, worker_ns = (b - a for a, b in zip(before, after, strict=True))
    [syscalls] = counted
    print(
        f"vhost={vhost}: {packets} packets, QEMU made {syscalls} syscalls on the tap, "
        f"vhost worker ran {worker_ns / 1e6:.1f} ms"
    )
    return packets, syscalls, worker_ns


def test_ping_is_carried_by_the_vhost_worker_not_by_qemu(in_testhost: None) -> None:
    packets, syscalls, worker_ns = _ping_through("on")
    assert packets >= 120  # 60 requests and 60 replies crossed the tap
    assert worker_ns > 0
    # QEMU's own threads read and write the tap per packet only when vhost does not.
    assert syscalls < packets / 10, "QEMU made syscalls per packet: it carries them itself"
    # Control: the same guest without vhost makes QEMU read and write every packet,
    # so the measurement above can tell the two apart.
    packets_off, syscalls_off, _ = _ping_through("off")
    assert packets_off >= 120
    assert syscalls_off >= packets_off


def test_a_qemu_without_virtio_devices_has_no_virtio_nic_to_read(in_testhost: None) -> None:
    """QEMU 7.2 answers x-query-virtio with [] when there is no virtio device; 10.0 (Debian
    13) with GenericError "No virtio devices found", which made `check` call the monitor of
    such a QEMU unreadable. Run in each userland's session, against its own QEMU."""
    from vhostorch.qemu import monitor

    workdir = tempfile.mkdtemp(prefix="vho-novirtio-")
    sock = os.path.join(workdir, "qmp.sock")
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-accel", "tcg", "-S", "-display", "none", "-nodefaults",
         "-qmp", f"unix:{sock},server=on,wait=off"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(sock):
            assert qemu.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        qmp = monitor.QmpSocket(sock, 10.0)
        qmp.open()
        try:
            view = monitor.read_virtio(qmp.execute, sock)
        finally:
            qmp.close()
        assert view.nics == ()
    finally:
        qemu.kill()  # our own child, by pid
        qemu.wait()
        subprocess.run(["rm", "-rf", workdir], check=False)
