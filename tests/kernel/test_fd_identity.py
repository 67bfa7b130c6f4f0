"""QEMU's fds are known by what they are (device numbers, anon inode names, fdinfo), never
by the path readlink shows, which is a name in QEMU's own mount namespace (issue 19).

On this machine (tun and macvtap, no vhost-net): a real QEMU (TCG, paused) contained as
container runtimes run it, its /dev/net/tun a node made with mknod in a private tmpfs;
and a real macvtap queue opened through a node of another name. The same with vhost-net
and a running guest is in tests/testhost/test_check_testhost.py (the test host). An fd opened
with O_PATH on any such node, which any user may hold, is none of them.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import stat
import time

import pytest

from tests.support import container, kernel, observations
from tests.support.kernel import vhostorch
from tests.support.nobody import AS_NOBODY, PYTHON, QEMU
from vhostorch.kernel import procfs

pytestmark = pytest.mark.kernel


def _fd_targets(pid: int, wanted: str, timeout: float = 10) -> list[str]:
    """readlink of each fd of ``pid``, once one reads ``wanted`` (QEMU opens its tap after
    it starts)."""
    deadline = time.monotonic() + timeout
    while True:
        targets = []
        for num in os.listdir(f"/proc/{pid}/fd"):
            try:
                targets.append(os.readlink(f"/proc/{pid}/fd/{num}"))
            except FileNotFoundError:
                continue
        if wanted in targets or time.monotonic() > deadline:
            return targets
        time.sleep(0.05)


def test_a_contained_qemus_tap_is_found_by_device_number(tmp_path: pathlib.Path) -> None:
    tap = kernel.unique("vhoct")
    sock = str(tmp_path / "qmp.sock")
    argv = [
        QEMU, "-accel", "tcg", "-M", "pc", "-S", "-display", "none", "-nodefaults",
        "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no,vhost=off",
        "-device", "virtio-net-pci,netdev=n0,id=net0",
        "-qmp", f"unix:{sock},server=on,wait=off",
    ]  # fmt: skip
    with container.qemu(argv, str(tmp_path / "qemu.log")) as c:
        # The host sees the node under QEMU's root, not as /dev/net/tun.
        targets = _fd_targets(c.pid, f"{c.root}/dev/net/tun")
        assert "/dev/net/tun" not in targets
        done = vhostorch("check", "--pid", str(c.pid), "--json")
        report = json.loads(done.stdout)
        (fds,) = [check for check in report["checks"] if check["id"] == "nic.tap.fds"]
        assert fds["status"] == "pass", fds
        (tun,) = procfs.read(c.pid).fds_to(procfs.TUN)
        assert tun.tap == tap and tun.target == f"{c.root}/dev/net/tun"
        assert fds["evidence"]["taps"] == [tap] and fds["evidence"]["fds"] == [tun.num]
        # A recording of it keeps the device numbers, and its replay knows the fds again.
        files, links, rdevs = observations.proc_tree(c.pid)
        assert rdevs[f"{c.pid}/fd/{tun.num}"] == "10:200"
        rec = observations.Recording(
            about={}, pid=c.pid, netns=None, vhost_net=False, files=files, symlinks=links,
            trace=None, taps={}, monitor=None, monitor_error=None, report={}, rdevs=rdevs,
        )  # fmt: skip
        replayed = observations.replay(rec, tmp_path / "replay")
        assert replayed.process.fds_to(procfs.TUN) == [tun]
        # check --all would find it (proved in the test host, where no other QEMU's monitor
        # is disturbed): its exe reads <root>/usr/bin/..., the file's own name is the same.
        assert os.readlink(f"/proc/{c.pid}/exe").startswith(c.root)
        assert c.pid in procfs.qemu_pids()


def test_a_macvtap_queue_under_another_name_is_known_by_its_device(
    ns: str, tmp_path: pathlib.Path
) -> None:
    kernel.run("ip", "-n", ns, "link", "add", "d0", "type", "veth", "peer", "name", "d1")
    kernel.run("ip", "-n", ns, "link", "add", "link", "d0", "name", "mvt0", "type", "macvtap")
    index = kernel.link(ns, "mvt0")["ifindex"]
    # The node as the kernel made it, read in the link's namespace (sysfs there shows it).
    dev = kernel.run(
        "ip", "netns", "exec", ns, "cat", f"/sys/class/net/mvt0/macvtap/tap{index}/dev"
    ).stdout  # fmt: skip
    major, minor = (int(n) for n in dev.split(":"))
    node = tmp_path / "queue0"  # a runtime's name for it, not tap<ifindex>
    os.mknod(node, 0o600 | stat.S_IFCHR, os.makedev(major, minor))
    fd = os.open(node, os.O_RDWR)
    path = os.open(node, os.O_PATH)  # the node's name held, no queue opened: no device
    try:
        process = procfs.read(os.getpid())
        seen, named = process.fd(fd), process.fd(path)
    finally:
        os.close(fd)
        os.close(path)
    assert seen is not None and seen.target == str(node)
    assert seen.macvtap_index == index and seen.device == f"/dev/tap{index}"
    assert seen.tap is None  # no iff: for a macvtap
    assert named is not None and named.device is None and named.macvtap_index is None


def test_a_log_is_read_through_the_process_fd_never_its_path(tmp_path: pathlib.Path) -> None:
    """QEMU's stderr log is read through /proc/PID/fd/2: the file QEMU holds. Its path is
    in a directory QEMU's user may write; a FIFO put there made root's open of the path wait
    for a writer (check hung), a symlink made root read a file of its choosing."""
    import subprocess

    place = tmp_path / "qemu.d"
    place.mkdir()
    shutil.chown(place, "nobody")
    log = place / "qemu.log"
    log.write_text("vhost: the line QEMU wrote\n")
    shutil.chown(log, "nobody")
    with open(log, "ab") as err:
        proc = subprocess.Popen(
            [*AS_NOBODY, "sleep", "60"],
            stderr=err,
        )
    try:
        # The QEMU user swaps the path for a FIFO, and then for a symlink to a root-only file.
        log.unlink()
        os.mkfifo(log)
        fd = procfs.open_regular(proc.pid, 2)
        assert fd is not None
        with open(fd, "rb") as f:
            assert f.read() == b"vhost: the line QEMU wrote\n"
        log.unlink()
        log.symlink_to("/etc/shadow")
        fd = procfs.open_regular(proc.pid, 2)
        assert fd is not None
        with open(fd, "rb") as f:
            assert f.read() == b"vhost: the line QEMU wrote\n"
    finally:
        proc.kill()
        proc.wait()


def test_a_stderr_that_is_a_fifo_or_a_device_is_never_opened(tmp_path: pathlib.Path) -> None:
    import subprocess

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    with open(fifo, "wb") as w, open("/dev/null", "wb") as null:
        procs = [subprocess.Popen(["sleep", "60"], stderr=out) for out in (w, null)]
    try:
        started = time.monotonic()
        assert [procfs.open_regular(p.pid, 2) for p in procs] == [None, None]
        assert time.monotonic() - started < 1
    finally:
        os.close(reader)
        for p in procs:
            p.kill()
            p.wait()


# A look-alike QEMU any user can run: a copy of the system's python named like QEMU, its
# command line giving a NIC the fds it holds.
HOLDER = r"""
import os, sys, time
def at(fd, num):
    os.dup2(fd, num)
    os.close(fd)
vhost_node = sys.argv[1]
at(os.open("/dev/net/tun", os.O_PATH), 10)
at(os.open(vhost_node, os.O_PATH), 11)
at(os.open("/dev/kvm", os.O_PATH), 12)
at(os.eventfd(0), 13)
at(os.open("/proc/self/fd/13", os.O_PATH), 14)
print("ready", flush=True)
time.sleep(60)
"""


def test_an_o_path_fd_on_a_device_node_is_not_that_device() -> None:
    """open(O_PATH) needs only search permission on /dev, never permission on the node, and
    calls no driver: any user holds an "fd to /dev/vhost-net" that can do no ioctl. Known by
    its device number alone, it was counted: nobody's look-alike QEMU naming it as its
    NIC's vhostfd got nic.vhost.fds pass, "1 /dev/vhost-net fd(s)" (and with it the checks
    that follow a vhost fd). This machine has no /dev/vhost-net: a node root made with mknod
    (10:238, mode 0600, on the same ext4 the attack used) stands in, as a container's /dev
    would. /dev/net/tun (root's, 0600 here: nobody could not open it for real), /dev/kvm
    and an eventfd reopened through /proc are refused alike; the eventfd itself is one."""
    import pwd
    import subprocess
    import tempfile

    root = tempfile.mkdtemp(prefix="vhod2-")  # pytest's tmp_path is root's only
    try:
        os.chmod(root, 0o755)
        node = os.path.join(root, "vhost-net")
        os.mknod(node, 0o600 | stat.S_IFCHR, os.makedev(10, 238))
        exe = os.path.join(root, "qemu-system-x86_64")
        shutil.copy(PYTHON, exe)
        nobody = pwd.getpwnam("nobody")
        os.chown(exe, nobody.pw_uid, nobody.pw_gid)
        netdev = "tap,id=n0,fd=10,vhost=on,vhostfd=11"
        argv = [exe, "-c", HOLDER, node, "-netdev", netdev, "-device",
                "virtio-net-pci,netdev=n0,id=net0"]  # fmt: skip
        proc = subprocess.Popen(
            AS_NOBODY + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready", proc.communicate()
            with open(f"/proc/{proc.pid}/fdinfo/11") as f:
                assert int(procfs.parse_fdinfo(f.read())["flags"], 8) & os.O_PATH
            process = procfs.read(proc.pid)
            devices = {fd.num: fd.device for fd in process.fds}
            assert [devices[n] for n in (10, 11, 12, 14)] == [None] * 4, devices
            assert devices[13] == procfs.EVENTFD
            assert process.fds_to(procfs.VHOST_NET) == []
            done = vhostorch("check", "--pid", str(proc.pid), "--json")
            checks = {c["id"]: c for c in json.loads(done.stdout)["checks"]}
            vhost = checks["nic.vhost.fds"]
            assert vhost["status"] == "fail", vhost
            assert vhost["evidence"]["fds"] == [] and vhost["evidence"]["not_vhost_net"] == [11]
            assert vhost["message"].startswith("0 /dev/vhost-net fd(s) for 1 queue pair(s)")
            assert checks["nic.tap.fds"]["status"] == "fail", checks["nic.tap.fds"]
        finally:
            proc.kill()  # our own child, by its pid
            proc.wait()
    finally:
        shutil.rmtree(root, ignore_errors=True)


SWAPPER = """
import os, sys
p = os.open(sys.argv[1], os.O_PATH)
n = os.open("/dev/null", os.O_RDWR)
os.dup2(p, 100)
print("ready", flush=True)
while True:
    os.dup2(p, 100)
    os.dup2(n, 100)
"""


def test_an_fd_swapped_while_it_is_read_is_never_taken_for_the_device(
    tmp_path: pathlib.Path,
) -> None:
    """A process swaps its fd 100 between an O_PATH fd on a vhost-net node (a name, no
    device) and a real open of /dev/null, as fast as it can. fdinfo said /dev/null's flags
    (no O_PATH) while the stat saw the node: procfs counted a vhost-net fd (the re-attack of
    issue 19: 308 of 2,400 reads; nobody's look-alike QEMU got nic.vhost.fds pass). The
    fdinfo kept must be of the inode the stat saw; the swap is seen both ways, never as the
    device."""
    import subprocess

    node = tmp_path / "vhost-net"
    os.mknod(node, 0o600 | stat.S_IFCHR, os.makedev(10, 238))
    proc = subprocess.Popen(
        ["python3", "-c", SWAPPER, str(node)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        seen: dict[str, int] = {}
        for _ in range(300):
            (fd,) = [f for f in procfs.read(proc.pid).fds if f.num == 100] or [None]
            if fd is None:
                continue  # between the close and the dup of dup2: no fd 100 at that instant
            key = f"{fd.target} as {fd.device}"
            seen[key] = seen.get(key, 0) + 1
    finally:
        proc.kill()  # our own child, by its pid
        proc.wait()
    print(seen)
    assert not [k for k in seen if k.endswith(f"as {procfs.VHOST_NET}")], seen
    assert any(k.startswith(str(node)) for k in seen) and any("/dev/null" in k for k in seen)
