"""The kernel's live vhost and KVM state read by the BPF iterator (vhostorch.kernel.vhoststate),
in the test host on real vhost-net and KVM, with NO wiring trace armed and no pause: every
answer is checked against what other sources say (QEMU's PCI BARs over QMP, /proc's fdinfo
``eventfd-id`` and ``iff:``, the ``vhost-<pid>`` threads, and /proc/kallsyms for the waiters'
functions, which the reader itself never reads)."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from typing import Any

import pytest

from tests.support import guests
from vhostorch.check import wiring
from vhostorch.kernel import bpf, btf, vhoststate
from vhostorch.qemu import monitor

pytestmark = pytest.mark.testhost
QUEUES = 2
# QEMU's virtio-pci (hw/virtio/virtio-pci.c): the modern notify region sits at 0x3000 in the
# 64-bit memory BAR 4, 4 bytes per queue (page-per-vq off); the legacy notify register is
# the I/O BAR 0's VIRTIO_PCI_QUEUE_NOTIFY (16), written with the queue's index.
NOTIFY_OFFSET, NOTIFY_MULTIPLIER, LEGACY_NOTIFY = 0x3000, 4, 16
# The waiters' functions: vhost's poll of a kick eventfd (drivers/vhost/vhost.c), KVM's irqfd.
VHOST_POLL_WAKEUP, IRQFD_WAKEUP = "vhost_poll_wakeup", "irqfd_wakeup"


def fdinfo(pid: int, fd: int) -> dict[str, str]:
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        return dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)


def bars(execute: Any) -> dict[int, int]:
    """The virtio-net device's BAR addresses by index, from QMP query-pci."""
    for bus in execute("query-pci", None):
        for device in bus["devices"]:
            if device["id"]["device"] in (0x1000, 0x1041) and device["id"]["vendor"] == 0x1AF4:
                return {bar["bar"]: bar["address"] for bar in device["regions"]}
    raise AssertionError("no virtio-net device in query-pci")


def kallsyms(names: set[str]) -> dict[str, set[int]]:
    """Functions' addresses by name from /proc/kallsyms (the test host runs as root with
    kptr_restrict below 2): the independent source for the function pointers the reader
    reads."""
    found: dict[str, set[int]] = {}
    with open("/proc/kallsyms") as f:
        for line in f:
            parts = line.split()
            if parts[2:3] and parts[2] in names and parts[1] in ("t", "T") and int(parts[0], 16):
                found.setdefault(parts[2], set()).add(int(parts[0], 16))
    return found


def read_one(pid: int) -> vhoststate.KernelView:
    views = vhoststate.read([pid])
    return views[pid]


def test_live_state_of_a_running_vm_matches_every_other_source(in_testhost: None) -> None:
    assert not wiring.armed(), "this test proves wiring without the trace"
    ok, why = vhoststate.available()
    assert ok, why
    sock = os.path.join(tempfile.mkdtemp(prefix="vho-live-qmp-"), "qmp.sock")
    polls = kallsyms({VHOST_POLL_WAKEUP, IRQFD_WAKEUP})
    assert polls.keys() == {VHOST_POLL_WAKEUP, IRQFD_WAKEUP}, polls
    with guests.tap(QUEUES) as name:
        extra = [*guests.vhost_netdev(name, QUEUES), "-qmp", f"unix:{sock},server=on,wait=off"]
        with guests.guest(extra) as g:
            # Generous: the test host shares two cores with whatever else runs (load 20 seen).
            g.wait_for(r"VHOSTORCH-GUEST: nic eth0 up", timeout=180)
            qmp = monitor.QmpSocket(sock, 5)
            qmp.open(g.pid)
            try:
                bar = bars(qmp.execute)
                started = time.perf_counter()
                view = read_one(g.pid)
                first = time.perf_counter() - started
                assert view.stable
                _check_running(g.pid, view, name, bar, polls)
                # Benchmark: a pass over one QEMU, with the layout cached and without.
                started = time.perf_counter()
                for _ in range(5):
                    vhoststate.read([g.pid])
                cached = (time.perf_counter() - started) / 5
                started = time.perf_counter()
                vhoststate.read([g.pid], cache_dir=None)
                uncached = time.perf_counter() - started
                print(
                    f"\nlive read of one QEMU on {os.uname().release}: first {first * 1e3:.1f} ms,"
                    f" cached {cached * 1e3:.1f} ms (two passes), without the BTF cache"
                    f" {uncached * 1e3:.0f} ms"
                )
                # Paused, QEMU stops vhost and takes its ioeventfds and irqfds away.
                qmp.execute("stop", None)
                try:
                    paused = read_one(g.pid)
                    (kvm,) = paused.kvm
                    kicks = {q.kick for d in view.vhost for q in d.queues}
                    calls = {q.call for d in view.vhost for q in d.queues}
                    assert not kicks & {io.eventfd for io in kvm.ioeventfds}, kvm
                    assert not calls & {irq.eventfd for irq in kvm.irqfds}, kvm
                finally:
                    monitor.cont(qmp.execute)
                # Resumed, the wiring is back (QEMU makes new contexts or reuses them).
                deadline = time.monotonic() + 10
                while True:
                    again = read_one(g.pid)
                    try:
                        _check_running(g.pid, again, name, bar, polls)
                        break
                    except AssertionError:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.2)
            finally:
                qmp.close()


def _check_running(
    pid: int,
    view: vhoststate.KernelView,
    tap: str,
    bar: dict[int, int],
    polls: dict[str, set[int]],
) -> None:
    targets = guests.fd_targets(pid)
    # The vhost-net devices are QEMU's /dev/vhost-net fds, one per queue pair.
    vhost_fds = sorted(fd for fd, t in targets.items() if t == "/dev/vhost-net")
    assert [d.fd for d in view.vhost] == vhost_fds and len(vhost_fds) == QUEUES, view.vhost
    assert sorted(f.fd for f in view.files if f.kind == "vhost-net") == vhost_fds
    # Every eventfd context's id is fdinfo's eventfd-id of the same fd.
    eventfds = [f for f in view.files if targets.get(f.fd) == "anon_inode:[eventfd]"]
    assert eventfds and all(
        f.eventfd_id == int(fdinfo(pid, f.fd)["eventfd-id"]) for f in eventfds
    ), eventfds
    (kvm,) = view.kvm
    assert targets[kvm.fd] == "anon_inode:kvm-vm" and kvm.complete
    assert [f.fd for f in view.files if f.kind == "kvm-vm"] == [kvm.fd]
    io_by_ctx: dict[int, list[vhoststate.IoEventFd]] = {}
    for io in kvm.ioeventfds:
        io_by_ctx.setdefault(io.eventfd, []).append(io)
    irq_by_ctx = {irq.eventfd: irq for irq in kvm.irqfds}
    workers = guests.vhost_workers(pid)
    seen_workers = set()
    queues_seen: list[int] = []
    for device in view.vhost:
        assert [q.index for q in device.queues] == [0, 1]
        assert device.memory_regions and device.memory_regions > 0, device
        tids = {device.worker_tid} | {q.worker_tid for q in device.queues}
        tids.discard(None)
        assert len(tids) == 1 and tids <= set(workers), (tids, workers)
        seen_workers |= tids
        for q in device.queues:
            # kick: one of QEMU's eventfds, polled by vhost, a KVM ioeventfd on the legacy
            # notify port with the device's queue number as datamatch, and at that queue's
            # modern notify address.
            kick_fds = view.eventfd_fds(q.kick)
            assert kick_fds, q
            # A kick counter: vhost never reads its kick eventfd, so its count is every kick
            # since vhost started; the driver kicked RX when it gave vhost its buffers.
            (count,) = {f.eventfd_count for f in view.files if f.fd in kick_fds}
            assert count is not None and (count > 0 or q.index == 1), (q, count)
            # vhost's own waiter function, read from the virtqueue (check.live names vhost's
            # waiter by it), is vhost_poll_wakeup by kallsyms, and waits on the kick.
            assert q.poll_func in polls[VHOST_POLL_WAKEUP], (q, polls)
            assert q.poll_func in q.kick_waiters, q
            entries = io_by_ctx.get(q.kick or 0, [])
            legacy = [e.datamatch for e in entries if e.addr == bar[0] + LEGACY_NOTIFY]
            assert len(legacy) == 1 and legacy[0] is not None, (q, entries)
            queue = legacy[0]
            assert queue % 2 == q.index, (queue, q)  # RX even, TX odd
            queues_seen.append(queue)
            modern = bar[4] + NOTIFY_OFFSET + NOTIFY_MULTIPLIER * queue
            assert (modern, None) in {(e.addr, e.datamatch) for e in entries}, (queue, entries)
            # call: an irqfd with a GSI, KVM's irqfd_wakeup waiting on it.
            assert view.eventfd_fds(q.call), q
            irq = irq_by_ctx.get(q.call or 0)
            assert irq is not None and irq.gsi > 0, (queue, kvm.irqfds)
            assert polls[IRQFD_WAKEUP] & set(irq.waiters), irq
            # backend: the tap, by its /dev/net/tun fd's iff:.
            (tap_fd,) = view.fd_of_file(q.backend_file)
            assert fdinfo(pid, tap_fd)["iff"].strip() == tap
            assert q.acked_features and q.acked_features & (1 << 32), q  # VIRTIO_F_VERSION_1
            assert q.last_avail_idx is not None and q.last_used_idx is not None
    assert seen_workers == set(workers)
    assert sorted(queues_seen) == list(range(2 * QUEUES))
    assert all(device.worker_model for device in view.vhost)


def test_one_pass_reads_several_qemus(in_testhost: None) -> None:
    """Four QEMUs left in prelaunch (-S: no guest CPU time, so the figure is the read's own;
    vhost is not started yet, which the kernel shows: no kick, no backend, a call that is
    QEMU's own eventfd), read in one pass; the time per pass is printed."""
    found = vhoststate.layout()
    func = found.funcs[vhoststate.ITERATOR]
    assert func
    with contextlib.ExitStack() as stack:
        pids = []
        for _ in range(4):
            name = stack.enter_context(guests.tap(QUEUES))
            g = stack.enter_context(guests.guest([*guests.vhost_netdev(name, QUEUES), "-S"]))
            pids.append(g.pid)
        deadline = time.monotonic() + 180
        # QEMU opens one /dev/vhost-net per queue pair, one after the other, and wires each
        # after opening it: with all open, a read may still see one being wired (its two reads
        # disagree: not stable, as CI's load showed once). Read until every QEMU is done.
        while True:
            views = vhoststate.read(pids)
            if sorted(views) == sorted(pids) and all(
                v.stable and len(v.vhost) == QUEUES for v in views.values()
            ):
                break
            assert time.monotonic() < deadline, f"QEMU did not set up vhost-net: {views}"
            time.sleep(0.5)
        funcs = {q.poll_func for v in views.values() for d in v.vhost for q in d.queues}
        assert len(funcs) == 1, funcs
        for view in views.values():
            assert view.stable and len(view.vhost) == QUEUES and len(view.kvm) == 1
            (kvm,) = view.kvm
            for q in (q for d in view.vhost for q in d.queues):
                assert (q.kick, q.backend_file) == (None, None), q
                # vhost's waiter function is set when the device is opened (vhost_dev_init),
                # kick or none: one function, the module's, on every virtqueue.
                assert q.poll_func, q
                # QEMU gives vhost its masked notifier as the call from the start (vhost's
                # virtqueue init): one of its eventfds, no irqfd.
                assert view.eventfd_fds(q.call), q
                assert q.call not in {irq.eventfd for irq in kvm.irqfds}, q
        program = vhoststate.program(found, pids)
        started = time.perf_counter()
        fd = bpf.load(program, func)
        loaded = time.perf_counter() - started
        try:
            started = time.perf_counter()
            for _ in range(10):
                bpf.run(fd)
            one_pass = (time.perf_counter() - started) / 10
        finally:
            os.close(fd)
        started = time.perf_counter()
        vhoststate.read(pids[:1])
        single = time.perf_counter() - started
        print(
            f"\nlive read on {os.uname().release}: {len(program)} instructions, loaded in"
            f" {loaded * 1e3:.0f} ms; one pass over {len(pids)} QEMUs {one_pass * 1e3:.1f} ms;"
            f" read() of one QEMU (load and two passes) {single * 1e3:.0f} ms"
        )


def test_btf_layout_has_module_types_and_is_cached(in_testhost: None, tmp_path: Any) -> None:
    """kvm's and vhost_net's split BTF continue vmlinux's; the answers come back from the
    cache the second time, and a changed question misses it."""
    found = btf.layout(vhoststate.PATHS, (vhoststate.ITERATOR,), vhoststate.MODULES,
                       cache_dir=str(tmp_path))  # fmt: skip
    for path in ("_ioeventfd.addr", "kvm_kernel_irqfd.gsi", "vhost_net.vqs[1].vq.kick",
                 "kvm.ioeventfds", "socket.file"):  # fmt: skip
        assert found.members[path] is not None, path
    major, minor = (int(p) for p in os.uname().release.split(".")[:2])
    # vhost_task (vmlinux's) came with Linux 6.4; before, workers were kernel threads.
    assert (found.members["vhost_task.task"] is not None) == ((major, minor) >= (6, 4))
    vmlinux = btf.load(btf.VMLINUX)
    kvm = btf.load("kvm", base=vmlinux)
    assert kvm.first_id == vmlinux.next_id
    assert vmlinux.field("_ioeventfd.addr") is None  # only in kvm's BTF
    assert kvm.field("_ioeventfd.addr") == found.members["_ioeventfd.addr"]
    # Each module's split BTF continues vmlinux's ids, and holds the structs of its own
    # source file, which vmlinux's does not.
    own = {
        "vhost": "vhost_virtqueue.kick", "vhost_net": "vhost_net.dev",
        "kvm": "kvm_kernel_irqfd.gsi", "kvm_amd": "vcpu_svm.vmcb", "tun": "tun_struct.flags",
    }  # fmt: skip
    for module, path in own.items():
        split = btf.load(module, base=vmlinux)
        assert split.first_id == vmlinux.next_id and split.next_id > split.first_id, module
        assert vmlinux.field(path) is None and split.field(path) is not None, (module, path)
    (cached,) = os.listdir(tmp_path)
    assert os.stat(tmp_path / cached).st_mode & 0o777 == 0o600
    assert btf.layout(vhoststate.PATHS, (vhoststate.ITERATOR,), vhoststate.MODULES,
                      cache_dir=str(tmp_path)) == found  # fmt: skip
    # 6.1 keeps the worker in the device (a kernel thread), 6.5 on in each virtqueue.
    per_vq = found.members["vhost_net.vqs[0].vq.worker"] is not None
    assert per_vq == ((major, minor) >= (6, 5))


def test_vhost_vsock_is_told_apart_from_vhost_net(in_testhost: None) -> None:
    """A QEMU with a vhost-vsock device next to its vhost-net NIC: the vsock's vhost file
    (misc 10:241) is known as such and read as no NIC."""
    guests.load_modules(["vhost_vsock"])
    with guests.tap(1) as name:
        # A guest CID unique to this QEMU (CIDs are host-wide; 0-2 are reserved).
        extra = [*guests.vhost_netdev(name, 1), "-S",
                 "-device", f"vhost-vsock-pci,guest-cid={1000 + os.getpid() % 100000}"]  # fmt: skip
        with guests.guest(extra) as g:
            deadline = time.monotonic() + 180
            while not {"/dev/vhost-net", "/dev/vhost-vsock"} <= set(
                guests.fd_targets(g.pid).values()
            ):
                assert g.proc.poll() is None, guests.qemu_log(g)
                assert time.monotonic() < deadline, "QEMU did not open its vhost devices"
                time.sleep(0.2)
            view = read_one(g.pid)
            targets = guests.fd_targets(g.pid)
            kinds = {f.fd: f.kind for f in view.files}
            (vsock,) = [fd for fd, t in targets.items() if t == "/dev/vhost-vsock"]
            (net,) = [fd for fd, t in targets.items() if t == "/dev/vhost-net"]
            assert (kinds[vsock], kinds[net]) == ("vhost-vsock", "vhost-net")
            assert [d.fd for d in view.vhost] == [net]


def test_an_o_path_fd_on_the_real_vhost_net_is_no_vhost_device(in_testhost: None) -> None:
    """Any user may open /dev/vhost-net with O_PATH (search permission on /dev is all it
    needs): nobody's fd on the real node is no vhost-net fd to /proc's reader (before: its
    device number, 10:238, made it one) nor to the live reader (no private_data: no driver
    opened it). The same on a mknod'ed node on this machine: tests/kernel/test_fd_identity.py."""
    import subprocess

    from tests.support.nobody import AS_NOBODY, PYTHON
    from vhostorch.kernel import procfs

    code = (
        "import os, sys\n"
        "print(os.open('/dev/vhost-net', os.O_PATH), flush=True)\n"
        "sys.stdin.readline()\n"
    )
    proc = subprocess.Popen(
        [*AS_NOBODY, PYTHON, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdin and proc.stdout
    try:
        fd = int(proc.stdout.readline())
        assert os.stat(f"/proc/{proc.pid}/fd/{fd}").st_rdev == os.makedev(10, 238)
        seen = procfs.read(proc.pid).fd(fd)
        view = read_one(proc.pid)
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)
    assert seen is not None and seen.target == "/dev/vhost-net" and seen.device is None
    (file,) = [f for f in view.files if f.fd == fd]
    assert file.rdev == vhoststate.VHOST_NET_RDEV and file.kind is None and view.vhost == ()
