"""vhostorch.kernel.vhoststate on this machine's own kernel (root, BPF iterators): what the
program reads of a process's files is checked against /proc's fdinfo. vhost-net and KVM exist
only in the test host (tests/test_vhoststate_testhost.py)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import stat
import struct
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.support.nobody import AS_NOBODY
from vhostorch import errors
from vhostorch.kernel import bpf, btf, vhoststate

needs_btf = pytest.mark.skipif(
    not os.path.exists("/sys/kernel/btf/vmlinux") or os.geteuid() != 0,
    reason="needs root and the kernel's BTF",
)


@pytest.fixture
def child() -> Iterator[tuple[int, list[int]]]:
    """A process holding three eventfds and a dup of the first; its pid and fds."""
    code = (
        "import os, sys, time\n"
        "fds = [os.eventfd(0) for _ in range(3)]\n"
        "fds.append(os.dup(fds[0]))\n"
        "os.eventfd_write(fds[1], 5)\n"
        "print(*fds, flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout and proc.stdin
    fds = [int(n) for n in proc.stdout.readline().split()]
    try:
        yield proc.pid, fds
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)


def _eventfd_count(pid: int, fd: int) -> int:
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:  # printed in hex (fs/eventfd.c)
        return int(next(line for line in f if line.startswith("eventfd-count:")).split()[1], 16)


def _eventfd_id(pid: int, fd: int) -> int:
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        return int(next(line for line in f if line.startswith("eventfd-id:")).split()[1])


@needs_btf
def test_live_read_maps_eventfd_contexts_to_fdinfo(
    child: tuple[int, list[int]], tmp_path: pathlib.Path
) -> None:
    pid, fds = child
    views = vhoststate.read([pid], cache_dir=str(tmp_path))
    assert set(views) == {pid}  # only the pid asked for
    view = views[pid]
    assert view.stable and view.vhost == () and view.kvm == ()
    by_fd = {f.fd: f for f in view.files}
    assert sorted(by_fd) == sorted(int(n) for n in os.listdir(f"/proc/{pid}/fd"))
    for fd in fds:
        assert by_fd[fd].eventfd_id == _eventfd_id(pid, fd), by_fd[fd]
        assert by_fd[fd].kind == "eventfd"
        assert by_fd[fd].eventfd_count == _eventfd_count(pid, fd) == (5 if fd == fds[1] else 0)
    # A dup is the same file and context; distinct eventfds are distinct contexts.
    first, *_, dup = fds
    assert by_fd[dup].file == by_fd[first].file
    assert view.eventfd_fds(by_fd[first].private_data) == sorted([first, dup])
    assert len({by_fd[fd].private_data for fd in fds}) == 3
    # Files that are no eventfd carry no id (stdin is a pipe).
    assert by_fd[0].eventfd_id is None


@needs_btf
def test_a_thread_with_its_own_fd_table_does_not_stand_in_for_the_process(
    tmp_path: pathlib.Path,
) -> None:
    """A thread that unshared its fd table (unshare(CLONE_FILES)) and put another eventfd at
    fd 100, and one at fd 101 the process does not have: the view is the process's own table,
    as /proc/PID/fd shows it and every fd number a check names (before the fix the thread's
    table overwrote it: fd 100 read as the thread's eventfd, and 101 was there)."""
    code = (
        "import ctypes, os, sys, threading\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "os.dup2(os.eventfd(0), 100)\n"
        "ready = threading.Event()\n"
        "def thread():\n"
        "    assert libc.unshare(0x400) == 0, ctypes.get_errno()  # CLONE_FILES\n"
        "    other = os.eventfd(0)\n"
        "    os.dup2(other, 100)\n"
        "    os.dup2(other, 101)\n"
        "    ready.set()\n"
        "    threading.Event().wait()\n"
        "threading.Thread(target=thread, daemon=True).start()\n"
        "ready.wait()\n"
        "print(flush=True)\n"
        "sys.stdin.readline()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdin and proc.stdout
    try:
        proc.stdout.readline()
        view = vhoststate.read([proc.pid], cache_dir=str(tmp_path))[proc.pid]
        by_fd = {f.fd: f for f in view.files}
        assert sorted(by_fd) == sorted(int(n) for n in os.listdir(f"/proc/{proc.pid}/fd"))
        assert by_fd[100].eventfd_id == _eventfd_id(proc.pid, 100)
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)


@needs_btf
def test_files_merely_named_like_kvm_or_eventfd_are_neither(tmp_path: pathlib.Path) -> None:
    """QEMU may hold files whose names a VM's user chose (a disk image, a FIFO, on NFS or
    FUSE): a FIFO named ``kvm-vm`` (private_data: its pipe) and one named ``[eventfd]``. Only
    an anonymous inode's name says what a file is: before, the pipe was walked as KVM's lists
    (a Kvm from garbage, incomplete, which turns a relayed kick's fail into unknown) and the
    other read as an eventfd."""
    names = ("kvm-vm", "[eventfd]")
    for name in names:
        os.mkfifo(tmp_path / name)
    code = (
        "import os, sys\n"
        f"fds = [os.open(os.path.join({str(tmp_path)!r}, n), os.O_RDWR) for n in {names!r}]\n"
        "print(*fds, flush=True)\n"
        "sys.stdin.readline()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdin and proc.stdout
    try:
        fds = [int(n) for n in proc.stdout.readline().split()]
        view = vhoststate.read([proc.pid], cache_dir=str(tmp_path / "btf"))[proc.pid]
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)
    by_fd = {f.fd: f for f in view.files}
    assert view.kvm == ()
    assert [by_fd[fd].kind for fd in fds] == [None, None]
    assert [by_fd[fd].eventfd_id for fd in fds] == [None, None]


@needs_btf
def test_one_pass_reads_many_processes(
    child: tuple[int, list[int]], tmp_path: pathlib.Path
) -> None:
    pid, fds = child
    views = vhoststate.read([pid, os.getpid(), 2**22 - 1], cache_dir=str(tmp_path))
    assert set(views) == {pid, os.getpid()}  # a pid without a process is left out
    assert {f.fd for f in views[pid].files} >= set(fds)


@needs_btf
def test_many_pids_are_read_with_one_program_per_max_pids(
    child: tuple[int, list[int]], tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """check --all: one load and one unfiltered pass (read twice) per MAX_PIDS processes,
    whatever their number; every process asked for that exists is in the answer."""
    pid, _ = child
    loads: list[list[int | None]] = []
    real = bpf.iterate

    def counted(program: bpf.Program, func: int, runs: list[int | None]) -> list[bytes]:
        loads.append(list(runs))
        return real(program, func, runs)

    monkeypatch.setattr(bpf, "iterate", counted)
    # Pids above pid_max's largest value (2**22): no such process.
    absent = range(2**22 + 1, 2**22 + 1 + 2 * vhoststate.MAX_PIDS)
    pids = [pid, os.getpid(), *absent]
    assert len(set(pids)) == 2 * vhoststate.MAX_PIDS + 2  # three programs: 256, 256, 2 pids
    views = vhoststate.read(pids, cache_dir=str(tmp_path))
    assert loads == [[None, None]] * 3
    assert set(views) == {pid, os.getpid()}


@needs_btf
def test_the_program_is_accepted_and_bounded() -> None:
    found = vhoststate.layout(cache_dir=None)
    program = vhoststate.program(found, list(range(1, vhoststate.MAX_PIDS + 1)))
    program.assemble()  # no backward jump anywhere
    func = found.funcs[vhoststate.ITERATOR]
    assert func
    os.close(bpf.load(program, func))


def test_decode_refuses_partial_records() -> None:
    found = btf.Layout({}, {})
    with pytest.raises(errors.LiveUnavailable, match="not whole records"):
        vhoststate.decode(b"\0" * 7, found)


@needs_btf
def test_not_root_is_a_reason_not_a_traceback() -> None:
    code = (
        "from vhostorch.kernel import vhoststate\n"
        "print(vhoststate.available())\n"
        "try:\n    vhoststate.read([1])\n"
        "except vhoststate.LiveUnavailable as err:\n    print('refused:', err)\n"
    )
    done = subprocess.run(
        [*AS_NOBODY, sys.executable, "-c", code],
        capture_output=True, text=True, check=False, cwd=str(pathlib.Path(__file__).parents[2]),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        '(False, "reading the kernel\'s state needs root (CAP_BPF and CAP_PERFMON)")',
        "refused: reading the kernel's state needs root (CAP_BPF and CAP_PERFMON)",
    ]


def _bpf_fds(pid: int) -> list[str]:
    found = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("anon_inode:bpf"):
            found.append(target)
    return found


@needs_btf
def test_nothing_stays_attached(child: tuple[int, list[int]], tmp_path: pathlib.Path) -> None:
    """The program, link and iterator are fds of the reader, all closed after a read (and
    after a refused one): nothing of it outlives the call."""
    pid, _ = child
    before = sorted(os.listdir("/proc/self/fd"))
    for _ in range(3):
        vhoststate.read([pid], cache_dir=str(tmp_path))
    p = bpf.Program()
    p.exit()
    with pytest.raises(errors.BpfRefused):
        bpf.iterate(p, vhoststate.layout(cache_dir=str(tmp_path)).funcs[vhoststate.ITERATOR] or 0)
    assert _bpf_fds(os.getpid()) == []
    assert sorted(os.listdir("/proc/self/fd")) == before


@needs_btf
def test_two_reads_that_disagree_are_not_stable(tmp_path: pathlib.Path) -> None:
    """Two passes over a process whose fd 100 became another eventfd between them (dup2,
    told by a line on its stdin): the view is not stable (a caller then reports unknown);
    two passes over the same state are."""
    code = (
        "import os, sys\nfds = [os.eventfd(0), os.eventfd(0)]\nos.dup2(fds[0], 100)\n"
        "print(flush=True)\nsys.stdin.readline()\nos.dup2(fds[1], 100)\nprint(flush=True)\n"
        "sys.stdin.readline()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdin and proc.stdout
    found = vhoststate.layout(cache_dir=str(tmp_path))
    func = found.funcs[vhoststate.ITERATOR]
    assert func
    fd = bpf.load(vhoststate.program(found, [proc.pid]), func)
    try:
        proc.stdout.readline()
        before = vhoststate.decode(bpf.run(fd, proc.pid), found)
        same = vhoststate.decode(bpf.run(fd, proc.pid), found)
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.stdout.readline()
        after = vhoststate.decode(bpf.run(fd, proc.pid), found)
    finally:
        os.close(fd)
        proc.stdin.close()
        proc.wait(timeout=10)
    assert vhoststate.compared(before, same)[proc.pid].stable
    assert not vhoststate.compared(before, after)[proc.pid].stable
    assert vhoststate.compared(before, {}) == {proc.pid: before[proc.pid].replace(stable=False)}


@needs_btf
def test_an_eventfd_signalled_between_the_two_reads_is_still_stable(
    tmp_path: pathlib.Path,
) -> None:
    """A busy VM's kick eventfd counts every guest kick (vhost polls it and never reads it),
    so its count may differ between the two reads while its wiring does not: a process that
    signals an eventfd between two runs of the program (told by a line on its stdin) stands in
    for a guest's kick landing there. The view is stable (before, a kick between the reads made
    kick, call and started unknown: 'two reads of the kernel's state disagreed')."""
    code = (
        "import os, sys\nfd = os.eventfd(0)\nprint(fd, flush=True)\nsys.stdin.readline()\n"
        "os.eventfd_write(fd, 1)\nprint(flush=True)\nsys.stdin.readline()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdin and proc.stdout
    found = vhoststate.layout(cache_dir=str(tmp_path))
    func = found.funcs[vhoststate.ITERATOR]
    assert func
    fd = bpf.load(vhoststate.program(found, [proc.pid]), func)
    try:
        eventfd = int(proc.stdout.readline())
        before = vhoststate.decode(bpf.run(fd, proc.pid), found)
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.stdout.readline()
        after = vhoststate.decode(bpf.run(fd, proc.pid), found)
    finally:
        os.close(fd)
        proc.stdin.close()
        proc.wait(timeout=10)
    counts = [next(f.eventfd_count for f in v[proc.pid].files if f.fd == eventfd) for v in
              (before, after)]  # fmt: skip
    assert counts == [0, 1]
    assert vhoststate.compared(before, after)[proc.pid].stable


@needs_btf
def test_a_tap_queue_is_read_attached_detached_or_gone(ns: str, tmp_path: pathlib.Path) -> None:
    """A process holding two queues of a multi-queue tap, the second detached (TUNSETQUEUE
    IFF_DETACH_QUEUE, as QEMU does for queue pairs the guest leaves off): read as attached and
    detached; after `ip link del` of the tap under it, both are on no device: gone."""
    code = (
        "import fcntl, os, struct, sys\n"
        "TUNSETIFF, TUNSETQUEUE = 0x400454CA, 0x400454D9\n"
        "IFF_TAP, IFF_NO_PI, IFF_MULTI_QUEUE, IFF_DETACH_QUEUE = 2, 0x1000, 0x100, 0x400\n"
        "fds = []\n"
        "for _ in range(2):\n"
        "    fd = os.open('/dev/net/tun', os.O_RDWR)\n"
        "    fcntl.ioctl(fd, TUNSETIFF, struct.pack('16sH22x', b'vhotunq', "
        "IFF_TAP | IFF_NO_PI | IFF_MULTI_QUEUE))\n"
        "    fds.append(fd)\n"
        "fcntl.ioctl(fds[1], TUNSETQUEUE, struct.pack('16sH22x', b'', IFF_DETACH_QUEUE))\n"
        "print(*fds, flush=True)\n"
        "sys.stdin.read()\n"
    )
    _attached_detached_then_gone(ns, code, "vhotunq", str(tmp_path), others_none=True)


@needs_btf
def test_a_macvtap_queue_is_read_attached_detached_or_gone(ns: str, tmp_path: pathlib.Path) -> None:
    """libvirt's type='direct': vhost's backend is a macvtap queue (/dev/tapN, whose
    private_data is struct tap_queue). Two queues, the second detached (TUNSETQUEUE): read as
    attached and detached; after `ip link del` of the macvtap under them, gone (before, a
    macvtap queue was read as no tap at all, so a deleted macvtap passed nic.vhost.started)."""
    subprocess.run(["ip", "-n", ns, "link", "add", "vhorvlow", "type", "veth", "peer", "vhorvpeer"],
                   check=True)  # fmt: skip
    subprocess.run(
        ["ip", "-n", ns, "link", "add", "link", "vhorvlow", "name", "vhorvtap", "type",
         "macvtap", "mode", "bridge"], check=True,
    )  # fmt: skip
    code = (
        "import fcntl, os, struct, sys\n"
        "TUNSETQUEUE, IFF_DETACH_QUEUE = 0x400454D9, 0x400\n"
        "net = '/sys/class/net/vhorvtap'\n"
        "index = open(net + '/ifindex').read().strip()\n"
        "major, minor = open(f'{net}/macvtap/tap{index}/dev').read().split(':')\n"
        f"node = '{tmp_path}/tap' + index\n"
        "os.mknod(node, 0o600 | 0o020000, os.makedev(int(major), int(minor)))\n"
        "fds = [os.open(node, os.O_RDWR) for _ in range(2)]\n"
        "fcntl.ioctl(fds[1], TUNSETQUEUE, struct.pack('16sH22x', b'', IFF_DETACH_QUEUE))\n"
        "print(*fds, flush=True)\n"
        "sys.stdin.read()\n"
    )
    _attached_detached_then_gone(ns, code, "vhorvtap", str(tmp_path / "btf"))


def _attached_detached_then_gone(
    ns: str, code: str, link: str, cache: str, others_none: bool = False
) -> None:
    """Run ``code`` (it prints the fds of an attached and a detached queue of ``link``, then
    waits on stdin) in ``ns``: the reader says attached and detached, then, after `ip link del`
    of ``link``, gone for both (``others_none``: and no queue state for any other fd)."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c", code],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdin and proc.stdout
    try:
        attached, detached = (int(n) for n in proc.stdout.readline().split())

        def queues() -> dict[int, str | None]:
            view = vhoststate.read([proc.pid], cache_dir=cache)[proc.pid]
            found = {f.fd: f.tun_queue for f in view.files if f.fd in (attached, detached)}
            if others_none:
                assert all(f.tun_queue is None for f in view.files if f.fd not in found), view
            return found

        assert queues() == {attached: "attached", detached: "detached"}
        subprocess.run(["ip", "-n", ns, "link", "del", link], check=True)
        assert queues() == {attached: "gone", detached: "gone"}
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)


# KVM's UAPI (include/uapi/linux/kvm.h): this machine's KVM cannot run a guest, but it makes
# VMs whose ioeventfd and irqfd lists are the kernel's own, which is all the walk reads.
_KVM_CREATE_VM, _KVM_CREATE_IRQCHIP = 0xAE01, 0xAE60
_KVM_IOEVENTFD = 1 << 30 | 64 << 16 | 0xAE << 8 | 0x79  # _IOW(KVMIO, 0x79, struct kvm_ioeventfd)
_KVM_IRQFD = 1 << 30 | 32 << 16 | 0xAE << 8 | 0x76  # _IOW(KVMIO, 0x76, struct kvm_irqfd)


@contextlib.contextmanager
def kvm_vm(ioeventfds: list[int], irqfds: list[int]) -> Iterator[int]:
    """A KVM VM of this process with an ioeventfd (4 bytes at its own address) on each
    eventfd of ``ioeventfds`` and an irqfd (its own GSI) on each of ``irqfds``; its fd."""
    try:
        kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        pytest.skip(f"no /dev/kvm here: {err}")
    try:
        vm = fcntl.ioctl(kvm, _KVM_CREATE_VM, 0)
    finally:
        os.close(kvm)
    try:
        fcntl.ioctl(vm, _KVM_CREATE_IRQCHIP, 0)  # KVM refuses irqfds without one
        for n, efd in enumerate(ioeventfds):
            arg = struct.pack("<QQIiI36x", 0, 0x10000 + 4 * n, 4, efd, 0)
            fcntl.ioctl(vm, _KVM_IOEVENTFD, arg)
        for gsi, efd in enumerate(irqfds):
            fcntl.ioctl(vm, _KVM_IRQFD, struct.pack("<IIII16x", efd, gsi, 0, 0))
        yield vm
    finally:
        os.close(vm)


@contextlib.contextmanager
def opened_eventfds(n: int) -> Iterator[list[int]]:
    fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(n)]
    try:
        yield fds
    finally:
        for fd in fds:
            os.close(fd)


def test_kvms_lists_are_walked_as_far_as_the_processs_eventfds_allow() -> None:
    # Slack for eventfds made between the count and the read; the caps bound the program.
    assert vhoststate.bounds(0) == vhoststate.Bounds(32, 8)
    assert vhoststate.bounds(48) == vhoststate.Bounds(4 * 56, 56)
    caps = vhoststate.Bounds(vhoststate.MAX_IOEVENTFDS, vhoststate.MAX_IRQFDS)
    assert vhoststate.bounds(10**6) == caps
    assert vhoststate.bounds(vhoststate.MAX_IRQFDS) == caps


@needs_btf
def test_a_vm_with_more_irqfds_and_ioeventfds_than_a_fixed_walk_is_read_whole(
    tmp_path: pathlib.Path,
) -> None:
    """48 eventfds, each an irqfd and at three ioeventfd addresses (as QEMU puts a virtio
    queue's notifier on MMIO, fast MMIO and the legacy port): 144 ioeventfds and 48 irqfds,
    more than the 128 and 32 the reader used to walk (a VM of six 4-queue vhost NICs holds
    as many), all read, in order, and the VM's lists complete."""
    with opened_eventfds(48) as fds, kvm_vm(fds * 3, fds) as vm:
        view = vhoststate.read([os.getpid()], cache_dir=str(tmp_path))[os.getpid()]
        contexts = {f.fd: f.private_data for f in view.files}
    (kvm,) = view.kvm
    assert kvm.fd == vm and kvm.complete, kvm.walked
    assert [e.addr for e in kvm.ioeventfds] == [0x10000 + 4 * n for n in range(144)]
    assert [e.eventfd for e in kvm.ioeventfds] == [contexts[fd] for fd in fds * 3]
    assert [(i.gsi, i.eventfd) for i in kvm.irqfds] == [(n, contexts[fd]) for n, fd in
                                                          enumerate(fds)]  # fmt: skip
    assert kvm.walked is not None and kvm.walked.irqfds >= 48 and kvm.walked.ioeventfds >= 144


@needs_btf
@pytest.mark.parametrize("held", [1, 10**6], ids=["sized", "capped"])
def test_a_list_longer_than_the_walk_is_truncated_never_cut_silently(
    tmp_path: pathlib.Path, held: int
) -> None:
    """One eventfd at more ioeventfd addresses than the walk covers (KVM allows it, QEMU
    never does it): the entries walked are read, and the VM's lists are not complete (check
    then says beyond-reader, unknown), whether the walk was sized from the eventfds or at the
    hard cap."""
    walk = vhoststate.bounds(held)
    with opened_eventfds(1) as fds, kvm_vm(fds * (walk.ioeventfds + 1), fds):
        pid = os.getpid()
        view = vhoststate.read([pid], cache_dir=str(tmp_path), held={pid: held})[pid]
    (kvm,) = view.kvm
    assert not kvm.complete and kvm.walked == walk
    assert len(kvm.ioeventfds) == walk.ioeventfds and len(kvm.irqfds) == 1


@needs_btf
def test_o_path_files_on_devices_and_anon_inodes_are_none_of_them(tmp_path: pathlib.Path) -> None:
    """An O_PATH open needs only search permission on the directories, so any user may hold
    one on /dev/vhost-net (a node made with mknod stands in: this machine has none) or
    /dev/net/tun, and through /proc/self/fd on an eventfd or a kvm-vm of its own. No driver
    opened it: it has no ``private_data``. Before, the node's file was kind "vhost-net" (by
    its device number), the eventfd's an "eventfd" of id 0, and the kvm-vm's a Kvm with
    empty lists beside the real one."""
    node = tmp_path / "vhost-net"
    os.mknod(node, 0o600 | stat.S_IFCHR, os.makedev(10, 238))
    paths = [
        os.open(node, os.O_PATH | os.O_CLOEXEC),
        os.open("/dev/net/tun", os.O_PATH | os.O_CLOEXEC),
    ]
    try:
        with opened_eventfds(1) as (efd,), kvm_vm([efd], []) as vm:
            reopened = [
                os.open(f"/proc/self/fd/{fd}", os.O_PATH | os.O_CLOEXEC) for fd in (efd, vm)
            ]
            try:
                view = vhoststate.read([os.getpid()], cache_dir=str(tmp_path / "btf"))
            finally:
                for fd in reopened:
                    os.close(fd)
    finally:
        for fd in paths:
            os.close(fd)
    mine = view[os.getpid()]
    by_fd = {f.fd: f for f in mine.files}
    assert [by_fd[fd].rdev for fd in paths] == [10 << 20 | 238, 10 << 20 | 200]
    assert [by_fd[fd].name for fd in reopened] == ["[eventf", "kvm-vm"]
    for fd in paths + reopened:
        f = by_fd[fd]
        assert (f.private_data, f.kind, f.eventfd_id, f.tun_queue) == (0, None, None, None), f
    assert mine.vhost == ()
    assert [k.fd for k in mine.kvm] == [vm]  # the VM itself, not its O_PATH twin
    assert (by_fd[efd].kind, by_fd[vm].kind) == ("eventfd", "kvm-vm")
