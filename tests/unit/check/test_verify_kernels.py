"""The same healthy VMs recorded on Linux 6.1 and 6.12 (and on 6.12 with Debian 13's QEMU
10.0): what changes between the kernels and the QEMUs, and that every check still finds what
it needs on each.

Recorded in the test host (tests/support/record_observation.py; ``--kernel 6.12`` for the
``*-linux-6.12`` files, ``--userland trixie`` for ``*-linux-6.12-trixie``). The kernel facts
they pin:

- vhost workers: on 6.1 a kernel thread per vhost device, ``vhost-<QEMU pid>``, with
  its own /proc/<pid> and an empty cmdline; on 6.12 (from 6.4) a vhost_task thread
  with the same name inside QEMU's thread group, seen only in /proc/<QEMU>/task.
- eventfd fdinfo: ``eventfd-count`` and ``eventfd-id`` on both; 6.12 adds
  ``eventfd-semaphore``. tun fdinfo: ``iff: <tap>`` on both.
- The wiring trace's kprobe on ``__x64_sys_ioctl`` with pt_regs fetch arguments
  records the same ioctls on both (6.12 dispatches syscalls through x64_sys_call,
  which still calls the wrapper).
"""

from __future__ import annotations

import os
import pathlib

import pytest

from tests.support import observations
from vhostorch.check import fds, verify
from vhostorch.check.ids import VHOST_PLACEMENT
from vhostorch.check.report import FAIL, PASS, UNKNOWN, JudgedNic
from vhostorch.kernel import procfs

# (recording, kernel series, worker model, queue pairs)
HEALTHY = [
    ("healthy-1q", "6.1", "kthread", 1),
    ("healthy-4q", "6.1", "kthread", 4),
    ("healthy-1q-linux-6.12", "6.12", "task", 1),
    ("healthy-4q-linux-6.12", "6.12", "task", 4),
    # Debian 13's userland: QEMU 10.0 (--userland trixie).
    ("healthy-1q-linux-6.12-trixie", "6.12", "task", 1),
    ("healthy-4q-linux-6.12-trixie", "6.12", "task", 4),
]
NIC_CHECKS = {
    "nic.vhost.requested", "nic.queues", "nic.tap.fds", "nic.vhost.fds", "nic.vhost.worker",
    "nic.vhost.started", "nic.vhost.memtable", "nic.kick", "nic.call", "nic.features",
}  # fmt: skip


@pytest.mark.parametrize(("name", "series", "model", "queues"), HEALTHY)
def test_every_check_passes_on_both_kernels(
    name: str, series: str, model: str, queues: int, tmp_path: pathlib.Path
) -> None:
    assert observations.load(name)["about"]["kernel"].startswith(f"{series}.")
    report = verify.verify(observations.observed(name, tmp_path))
    checks = report.to_json()["checks"]
    assert isinstance(checks, list)
    placed = [c for c in checks if c["id"] == VHOST_PLACEMENT]
    if observations.records_places(name):
        assert [c["status"] for c in placed] == [PASS]
    else:  # recorded before where threads run was: said, never guessed
        assert [(c["status"], c["message"][:20]) for c in placed] == [
            (UNKNOWN, "where QEMU's threads")
        ]
    checks = [c for c in checks if c["id"] != VHOST_PLACEMENT]
    assert {c["status"] for c in checks} == {PASS}, [c for c in checks if c["status"] != PASS]
    assert {c["id"] for c in checks} == NIC_CHECKS | {"host.vhost-net", "vm.kvm"}
    # Kick and call proved from the kprobe trace for every virtqueue.
    assert sum(c["id"] == "nic.kick" for c in checks) == 2 * queues
    assert sum(c["id"] == "nic.call" for c in checks) == 2 * queues


@pytest.mark.parametrize(("name", "series", "model", "queues"), HEALTHY)
def test_the_worker_is_found_in_the_model_of_its_kernel(
    name: str, series: str, model: str, queues: int, tmp_path: pathlib.Path
) -> None:
    obs = observations.observed(name, tmp_path)
    pid = obs.process.pid
    assert obs.worker_model == model and len(obs.workers) == queues
    own = {t.tid for t in obs.process.threads if t.comm == f"vhost-{pid}"}
    if model == "task":  # 6.12: threads of QEMU, and no kernel thread of that name
        assert set(obs.workers) == own
        assert not procfs.vhost_kthreads(str(tmp_path / "proc"))
    else:  # 6.1: kernel threads, none inside QEMU
        assert not own
        assert sorted(procfs.vhost_kthreads(str(tmp_path / "proc"))[f"vhost-{pid}"]) == list(
            obs.workers
        )
    check = fds.worker(obs, observations.nic_named(obs, "net0"))
    where = "threads of QEMU" if model == "task" else "kernel threads"
    assert (check.status, check.message) == (
        PASS,
        f"{queues} vhost-{pid} worker(s) ({where}) for {queues} vhost device(s)",
    )
    assert check.evidence["model"] == model


@pytest.mark.parametrize(("name", "series", "model", "queues"), HEALTHY)
def test_a_missing_worker_fails_on_both_kernels(
    name: str, series: str, model: str, queues: int, tmp_path: pathlib.Path
) -> None:
    """The recording with its vhost workers taken out of /proc: the check must notice."""
    rec = observations.load(name)
    pid = rec["pid"]
    worker = f"vhost-{pid}\n"
    rec["files"] = {
        rel: text
        for rel, text in rec["files"].items()
        if not (rel.endswith("/comm") and text == worker)
    }
    obs = observations.replay(rec, tmp_path)
    assert obs.workers == ()
    check = fds.worker(obs, observations.nic_named(obs, "net0"))
    assert (check.status, check.message) == (
        FAIL,
        f"0 vhost-{pid} worker(s) for {queues} vhost device(s): VHOST_SET_OWNER did not start "
        "them all",
    )


@pytest.mark.parametrize(("name", "series", "model", "queues"), HEALTHY)
def test_fdinfo_formats(
    name: str, series: str, model: str, queues: int, tmp_path: pathlib.Path
) -> None:
    obs = observations.observed(name, tmp_path)
    eventfds = obs.process.fds_to(procfs.EVENTFD)
    assert eventfds and all("eventfd-id" in fd.info and "eventfd-count" in fd.info
                            for fd in eventfds)  # fmt: skip
    # EFD_SEMAPHORE shown from Linux 6.4 (fs/eventfd.c, eventfd_show_fdinfo); not relied on.
    assert all(("eventfd-semaphore" in fd.info) == (series == "6.12") for fd in eventfds)
    taps = {fd.tap for fd in obs.process.fds_to(procfs.TUN)}
    assert taps == set(obs.taps) and None not in taps and len(taps) == 1
    tap = obs.taps[next(iter(taps))]
    assert tap is not None and tap.tun is not None
    assert tap.tun.multi_queue == (queues > 1) and tap.tun.vnet_hdr
    # The guest driver enables one queue pair at first; QEMU detaches the others
    # (TUNSETQUEUE IFF_DETACH_QUEUE): on both kernels they count as disabled, not gone.
    assert (tap.tun.attached_queues, tap.tun.disabled_queues) == (1, queues - 1)


def test_new_kernels_put_other_workers_in_qemu_too(tmp_path: pathlib.Path) -> None:
    """6.12 runs KVM's NX huge page recovery as a thread of QEMU as well (6.1: a kernel
    thread): only threads named vhost-<pid> count as vhost workers."""
    obs = observations.observed("healthy-1q-linux-6.12", tmp_path / "new")
    comms = {t.comm for t in obs.process.threads}
    assert "kvm-nx-lpage-re" in comms and len(obs.workers) == 1
    old = observations.observed("healthy-1q", tmp_path / "old")
    assert "kvm-nx-lpage-re" not in {t.comm for t in old.process.threads}


def test_qemu_10_holds_the_fds_qemu_7_2_does_and_its_vcpu_stats(tmp_path: pathlib.Path) -> None:
    """QEMU 10.0 (Debian 13) beside 7.2 (Debian 12), both on 6.12, one NIC with one queue
    pair: the same tun and vhost-net fds; two more eventfds of QEMU's own (15 against 13:
    the checks find the vrings' among them by the trace or the kernel's lists, never by
    number or order, and every check passes on both, above); and one KVM binary-stats fd
    per vCPU (``anon_inode:kvm-vcpu-stats:N``), which nothing reads."""
    old = observations.load("healthy-1q-linux-6.12")
    new = observations.load("healthy-1q-linux-6.12-trixie")
    assert old["about"]["qemu"].startswith("QEMU emulator version 7.2.")
    assert new["about"]["qemu"].startswith("QEMU emulator version 10.0.")

    def kinds(name: str, where: pathlib.Path) -> dict[str, int]:
        """How many fds of each kind (device or anon inode) the QEMU holds."""
        found: dict[str, int] = {}
        for fd in observations.observed(name, where).process.fds:
            if fd.device is not None:
                found[fd.device] = found.get(fd.device, 0) + 1
        return found

    before = kinds("healthy-1q-linux-6.12", tmp_path / "7.2")
    after = kinds("healthy-1q-linux-6.12-trixie", tmp_path / "10.0")
    for kind in (procfs.TUN, procfs.VHOST_NET):
        assert before.get(kind) == after.get(kind) == 1, (kind, before, after)
    assert (before[procfs.EVENTFD], after[procfs.EVENTFD]) == (13, 15)
    assert "anon_inode:kvm-vcpu-stats:0" not in before
    assert after.get("anon_inode:kvm-vcpu-stats:0") == 1


@pytest.mark.parametrize("traced", [True, False], ids=["traced", "untraced"])
@pytest.mark.parametrize(("name", "series", "model", "queues"), HEALTHY)
def test_each_queue_pairs_worker_is_the_one_owned_for_its_vhost_fd(
    name: str, series: str, model: str, queues: int, traced: bool, tmp_path: pathlib.Path
) -> None:
    """Workers are made at VHOST_SET_OWNER with growing tids: the trace's owner order pairs
    each vhost fd with its worker; without the trace, fd order stands in and says so."""
    obs = observations.observed(name, tmp_path, trace=traced)
    nic = observations.nic_named(obs, "net0")
    found = verify.workers(obs, nic)
    assert [w.queue_pair for w in found] == list(range(queues))
    assert [w.vhost_fd for w in found] == [fd.num for fd in nic.vhost_fds]
    assert sorted(w.tid for w in found) == sorted(obs.workers)
    assert {w.attributed_by for w in found} == {
        "VHOST_SET_OWNER order (traced)" if traced else "fd order"
    }
    if traced:
        assert obs.wiring is not None
        owned = [fd for fd in obs.wiring.owners if fd in {w.vhost_fd for w in found}]
        by_tid = sorted(found, key=lambda w: w.tid)
        assert [w.vhost_fd for w in by_tid] == owned[-queues:]


def test_a_vhost_task_workers_cpu_time_is_its_own_not_its_thread_groups(
    tmp_path: pathlib.Path,
) -> None:
    """On Linux >= 6.4 /proc/TID/stat of a thread sums its whole thread group (QEMU's CPU
    time); the worker's own is /proc/QEMU/task/TID/stat. Written here as the kernel lays
    them out, from the 6.12 recording: the group's total must not be taken for a worker's."""
    from vhostorch.check import observe

    obs = observations.observed("healthy-4q-linux-6.12", tmp_path)
    proc, pid = tmp_path / "proc", obs.process.pid
    fields = "S 1 1 1 0 -1 4194368 0 0 0 0 {utime} {stime} 0 0 20 0 1 0 100 0 0"
    for n, tid in enumerate(obs.workers):
        (proc / str(tid)).mkdir(exist_ok=True)
        (proc / str(tid) / "stat").write_text(f"{tid} (qemu-system-x86) " + fields.format(
            utime=100_000, stime=7_500) + "\n")  # fmt: skip
        task = proc / str(pid) / "task" / str(tid)
        task.mkdir(parents=True, exist_ok=True)
        (task / "stat").write_text(f"{tid} (vhost-{pid}) " + fields.format(
            utime=100 * (n + 1), stime=n) + "\n")  # fmt: skip
    ticks = os.sysconf("SC_CLK_TCK")
    got = observe.worker_cpu(obs.workers, pid, str(proc))
    assert got == {tid: (100 * (n + 1) + n) / ticks for n, tid in enumerate(obs.workers)}


FALLBACK = "qemu-system-x86_64: unable to start vhost net: 7: falling back on userspace virtio"


@pytest.mark.parametrize(
    ("monitor", "trace"),
    [(True, True), (False, True), (True, False)],
    ids=["monitor-and-trace", "trace", "monitor"],
)
@pytest.mark.parametrize(("name", "series", "model", "queues"), HEALTHY)
def test_a_fallback_line_in_qemus_log_is_no_reason_for_a_nic_vhost_runs_on(
    name: str, series: str, model: str, queues: int, monitor: bool, trace: bool,
    tmp_path: pathlib.Path,
) -> None:  # fmt: skip
    """A QEMU log that is appended to keeps an earlier run's 'falling back' line, and a line
    of one NIC says nothing of the NIC beside it: a NIC whose vhost the trace or the monitor
    saw running has no reason."""
    from vhostorch.check.observe import Logs

    stale = Logs("", (), "/var/log/qemu-stderr.log", (FALLBACK,))
    obs = observations.observed(name, tmp_path, monitor=monitor, trace=trace)
    report = verify.verify(obs.replace(logs=stale))
    assert [n.reason for n in report.nics if isinstance(n, JudgedNic)] == [None]


@pytest.mark.parametrize(("name", "series", "model", "queues"), HEALTHY)
def test_a_fallback_line_seen_without_monitor_or_trace_is_given_with_what_is_not_known(
    name: str, series: str, model: str, queues: int, tmp_path: pathlib.Path
) -> None:
    """Without the monitor or the trace nothing says vhost runs: the log's 'falling back'
    line is the reason, given with what is not known."""
    from vhostorch.check import reasons
    from vhostorch.check.observe import Logs

    stale = Logs("", (), "/var/log/qemu-stderr.log", (FALLBACK,))
    blind = observations.observed(name, tmp_path, monitor=False, trace=False)
    nic = observations.nic_named(blind, "net0")
    why = reasons.reason(blind.replace(logs=stale), nic, verify.nic_checks(blind, nic))
    assert why is not None and why.code == reasons.QEMU_FALLBACK
    assert "not known without QEMU's monitor or the wiring trace" in why.message
