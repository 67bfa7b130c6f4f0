"""vhostorch.kernel.vhoststate on this machine's own kernel (root, BPF iterators): what the
program reads of a process's files is checked against /proc's fdinfo. vhost-net and KVM exist
only in the test host (tests/test_vhoststate_testhost.py)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from collections.abc import Iterator

import pytest

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


def test_symbols_are_functions_found_by_their_whole_name(tmp_path: pathlib.Path) -> None:
    """kallsyms' lines: "ADDRESS TYPE NAME" and a module's "\t[MODULE]"; a name that only
    begins another, data symbols, and zero addresses (kptr_restrict) are not taken."""
    kallsyms = tmp_path / "kallsyms"
    kallsyms.write_text(
        "ffffffff81000000 T _stext\n"
        "ffffffffc0a01000 t vhost_poll_wakeup_other\t[vhost]\n"
        "ffffffffc0a02000 t vhost_poll_wakeup\t[vhost]\n"
        "ffffffffc0b02000 d vhost_poll_wakeup\t[vhost]\n"
        "ffffffff812883e0 T irqfd_wakeup\n"
        "0000000000000000 t hidden\n"
        "ffffffff81300000 T irqfd_wakeup"
    )
    found = vhoststate.symbols(["vhost_poll_wakeup", "irqfd_wakeup", "hidden", "absent"],
                               str(kallsyms))  # fmt: skip
    assert found == {
        "vhost_poll_wakeup": {0xFFFFFFFFC0A02000},
        "irqfd_wakeup": {0xFFFFFFFF812883E0, 0xFFFFFFFF81300000},
    }
    # The running kernel's, as a line-by-line reading finds them.
    with open(vhoststate.KALLSYMS) as f:
        lines = [line.split() for line in f if line.split()[2:3] == ["_stext"]]
    expected = {int(p[0], 16) for p in lines if p[1] in "tT" and int(p[0], 16)}
    assert vhoststate.symbols(["_stext"]).get("_stext", set()) == expected


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
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable,
         "-c", code],
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
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c", code],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdin and proc.stdout
    try:
        attached, detached = (int(n) for n in proc.stdout.readline().split())

        def queues() -> dict[int, str | None]:
            view = vhoststate.read([proc.pid], cache_dir=str(tmp_path))[proc.pid]
            found = {f.fd: f.tun_queue for f in view.files if f.fd in (attached, detached)}
            assert all(f.tun_queue is None for f in view.files if f.fd not in found), view
            return found

        assert queues() == {attached: "attached", detached: "detached"}
        subprocess.run(["ip", "-n", ns, "link", "del", "vhotunq"], check=True)
        assert queues() == {attached: "gone", detached: "gone"}
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)
