"""Pin a QEMU's vhost-net workers to CPUs, record the pin, and apply it again later.

Which threads are vhost-net's: the check ties each NIC's queue pairs to their workers
(check.verify.workers; exactly where the kernel's live state is read, check.live). A QEMU
whose vhost workers include others (vhost-vsock's, also named ``vhost-PID``) and whose
vhost-net workers cannot be told apart is refused, never guessed at.

Before anything changes, every worker's cpuset (its cgroup's cpuset.cpus.effective) must
allow every CPU asked for, and they must be online: sched_setaffinity would otherwise keep
the part its cpuset allows without a word (kernel.cpus). Workers are pinned together under
signals.Held, each one's affinity read back; if one fails, those done are put back.

The record (vhostorch.pins) is what ``check`` judges against and what ``reapply`` applies
to workers that appeared since (a NIC hot-plugged, vhost started anew).
"""

from __future__ import annotations

import os

from vhostorch import pins, signals
from vhostorch.check import live, nics, observe, verify
from vhostorch.errors import InvalidSpec, OperationFailed
from vhostorch.kernel import cpus, procfs
from vhostorch.record import TYPE_CHECKING, Record
from vhostorch.vm import state

if TYPE_CHECKING:
    from vhostorch.pins import Source


class Pinned(Record):
    """What a pin did: the QEMU, the CPUs, and each worker's CPUs before and after."""

    pid: int
    vm: str | None
    cpus: str
    source: str
    workers: tuple[tuple[int, str, str], ...]  # (tid, CPUs before, CPUs after)

    def to_json(self) -> dict[str, object]:
        return {
            "pid": self.pid,
            "vm": self.vm,
            "cpus": self.cpus,
            "source": self.source,
            "workers": [{"tid": t, "before": b, "after": a} for t, b, a in self.workers],
        }


def vhost_net_workers(pid: int, proc: str = procfs.PROC) -> list[int]:
    """The tids of QEMU ``pid``'s vhost-net workers (none when no NIC uses vhost). Raises
    CannotInspect, OperationFailed.

    From what /proc and the wiring trace say first; the kernel's live state (a BPF program
    loaded, seconds under TCG: the hook runs this on libvirt's start path) only where they
    cannot tie every worker to its device (vhost-vsock's workers beside vhost-net's)."""
    # A VM vhostorch started may have NICs only QMP added (not on its command line): its
    # state says which.
    obs = observe.observe(pid, proc=proc, plan=state.by_pid(pid), pins_dir=os.devnull)
    found = _tied(obs)
    if found is None:
        gathered = live.gather([obs])
        found = _tied(gathered[0]) if gathered else None
    if found is None:
        vhost_fds = len(obs.process.fds_to(procfs.VHOST_NET))
        raise OperationFailed(
            f"QEMU {pid}: cannot tell its vhost-net workers from its other vhost workers "
            f"({len(obs.workers)} vhost-{pid} worker(s), {vhost_fds} /dev/vhost-net fd(s)); "
            "nothing changed"
        )
    return found


def _tied(obs: observe.Observation) -> list[int] | None:
    """The vhost-net workers of ``obs``, each tied to its device; None where some cannot be."""
    found: list[int] = []
    complete = True
    for nic in nics.find(obs):
        if not nic.vhost_fds:
            continue
        tied = verify.workers(obs, nic)
        complete &= len(tied) == len(nic.vhost_fds)
        found += [w.tid for w in tied]
    if not complete:
        if len(obs.workers) != len(obs.process.fds_to(procfs.VHOST_NET)):
            return None
        found = list(obs.workers)  # every vhost worker is one of its vhost-net devices'
    return sorted(set(found))


def _none(pid: int) -> OperationFailed:
    return OperationFailed(f"QEMU {pid} has no vhost-net worker to pin (no NIC uses vhost)")


def _still_worker(pid: int, tid: int, proc: str) -> bool:
    """Whether ``tid`` is still one of QEMU ``pid``'s vhost workers: a thread of QEMU named
    ``vhost-PID`` (a vhost_task) or a kernel thread so named. A worker that exited since it
    was listed (its NIC unplugged, QEMU stopping) leaves its tid to be reused by any thread;
    sched_setaffinity takes a tid, not a pidfd, so root would pin that thread instead."""
    name = f"vhost-{pid}"[:15]
    for where, own in ((f"{proc}/{pid}/task/{tid}", True), (f"{proc}/{tid}", False)):
        try:
            with open(f"{where}/comm") as f:
                if f.read().strip() != name:
                    continue
            if own:
                return True
            with open(f"{where}/stat") as f:
                return procfs.is_kthread(f.read())
        except OSError:
            continue
    return False


def online(wanted: frozenset[int], what: str = "--cpus") -> None:
    """Raise InvalidSpec unless every CPU of ``wanted`` is online (``what`` asked for them)."""
    up = cpus.online()
    if up is not None and not wanted <= up:
        raise InvalidSpec(
            f"{what}: CPU {cpus.format_list(wanted - up)} is not online on this host "
            f"(online: {cpus.format_list(up)}); nothing changed"
        )


def _allowed(
    pid: int, tids: list[int], wanted: frozenset[int], proc: str, cgroup_fs: str, what: str
) -> None:
    """Raise InvalidSpec unless every worker's cpuset and the online CPUs allow ``wanted``."""
    online(wanted, what)
    for tid in tids:
        where = cpus.place(pid, tid, proc)
        if where is None or not _still_worker(pid, tid, proc):
            raise OperationFailed(f"QEMU {pid}: worker {tid} is gone; nothing changed")
        allowed = None if where.cgroup is None else cpus.cpuset(where.cgroup, cgroup_fs)
        if allowed is not None and not wanted <= allowed:
            raise InvalidSpec(
                f"{what}: CPU {cpus.format_list(wanted - allowed)} is outside the cpuset of "
                f"worker {tid}'s cgroup {where.cgroup} ({cpus.format_list(allowed)}); "
                "nothing changed"
            )


def apply(
    pid: int,
    wanted: frozenset[int],
    source: Source,
    vm: str | None = None,
    *,
    proc: str = procfs.PROC,
    cgroup_fs: str = cpus.CGROUP_FS,
    pins_dir: str = pins.PINS,
    record: bool = True,
    tids: list[int] | None = None,
    what: str = "--cpus",
) -> Pinned:
    """Pin QEMU ``pid``'s vhost-net workers (``tids``: as vhost_net_workers found them) to
    ``wanted`` and record it (``record``).

    Raises InvalidSpec (CPUs not allowed: nothing changed), OperationFailed, CannotInspect.
    """
    if not wanted:
        raise InvalidSpec(f"{what}: no CPU given")
    start = procfs.start_time(pid, proc)
    if start is None:
        raise procfs.CannotInspect(f"no QEMU process {pid}")
    tids = vhost_net_workers(pid, proc) if tids is None else tids
    if not tids:
        raise _none(pid)
    _allowed(pid, tids, wanted, proc, cgroup_fs, what)
    done: list[tuple[int, frozenset[int]]] = []
    result = []
    with signals.Held():  # all pinned, or all as they were
        try:
            for tid in tids:
                if not _still_worker(pid, tid, proc):  # as late as can be: see _still_worker
                    raise OperationFailed(f"QEMU {pid}: worker {tid} is gone; put back as it was")
                before = frozenset(os.sched_getaffinity(tid))
                cpus.set_affinity(tid, wanted)
                done.append((tid, before))
                after = cpus.place(pid, tid, proc)
                if after is None or after.cpus != wanted:
                    got = "gone" if after is None else cpus.format_list(after.cpus)
                    raise OperationFailed(
                        f"QEMU {pid}: worker {tid} may run on {got} after the pin, not "
                        f"{cpus.format_list(wanted)}; put back as it was"
                    )
                result.append((tid, cpus.format_list(before), cpus.format_list(wanted)))
            if record:
                pins.save(pins.Pin(pid, start, cpus.format_list(wanted), source, vm), pins_dir)
        except OSError as err:
            _restore(done)
            raise OperationFailed(f"QEMU {pid}: pinning its workers: {err.strerror}") from None
        except BaseException:
            _restore(done)
            raise
    return Pinned(pid, vm, cpus.format_list(wanted), source, tuple(result))


def _restore(done: list[tuple[int, frozenset[int]]]) -> None:
    for tid, before in reversed(done):
        try:
            cpus.set_affinity(tid, before)
        except OSError:
            pass  # gone meanwhile: nothing of it to put back


def clear(pid: int, *, proc: str = procfs.PROC, pins_dir: str = pins.PINS) -> Pinned:
    """Forget QEMU ``pid``'s pin and let its vhost-net workers run where its main thread may
    (where a vhost_task starts; a kernel thread's cpuset still bounds it). A pin whose QEMU
    has no vhost-net worker now (its vhost NICs unplugged) is forgotten all the same."""
    start = procfs.start_time(pid, proc)
    if start is None:
        raise procfs.CannotInspect(f"no QEMU process {pid}")
    main = frozenset(os.sched_getaffinity(pid))
    known = pins.load(pid, start, pins_dir)
    vm = known.vm if known else None
    tids = vhost_net_workers(pid, proc)
    if tids:
        pinned = apply(pid, main, "vhostorch pin", vm, proc=proc, record=False, tids=tids)
    elif known is None:
        raise _none(pid)
    else:
        pinned = Pinned(pid, vm, cpus.format_list(main), "vhostorch pin", ())
    pins.forget(pid, pins_dir)
    return pinned


def reapply(
    *, proc: str = procfs.PROC, pins_dir: str = pins.PINS, only: int | None = None
) -> tuple[list[Pinned], list[str]]:
    """Apply every recorded pin again (``only``: QEMU ``only``'s); a record whose QEMU is gone
    is removed, one whose QEMU has no vhost-net worker now is kept for a NIC added later.
    Returns what was pinned and one line per QEMU that could not be."""
    done, failed = [], []
    for pid in pins.listed(pins_dir) if only is None else [only]:
        start = procfs.start_time(pid, proc)
        pin = None if start is None else pins.load(pid, start, pins_dir)
        if pin is None:
            if only is None:
                pins.forget(pid, pins_dir)  # its QEMU is gone (or the pid is another's now)
            continue
        try:
            wanted = cpus.parse_list(pin.cpus)
            tids = vhost_net_workers(pid, proc)
            if not tids:
                continue  # nothing to pin now (no NIC uses vhost): not a failure
            done.append(
                apply(
                    pid,
                    wanted,
                    pin.source,
                    pin.vm,
                    proc=proc,
                    pins_dir=pins_dir,
                    tids=tids,
                    what=f"the recorded pin ({pin.source})",
                )
            )
        except (InvalidSpec, OperationFailed, procfs.CannotInspect) as err:
            failed.append(str(err))
    return done, failed
