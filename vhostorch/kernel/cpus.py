"""Where a thread may run and where it ran: CPU lists, affinity, cgroup and cpuset, from /proc
and the cgroup filesystem; and setting a thread's affinity.

The kernel's list format ("0-3,8,10-11") is Cpus_allowed_list's in /proc/PID/status and
cpuset.cpus's. A vhost worker is found at two places: a kernel thread (Linux < 6.4, or
6.12's fork-owner mode off) is a process of its own, /proc/TID; a vhost_task (>= 6.4) is a
thread of QEMU, /proc/PID/task/TID. Every reader takes the /proc and /sys roots, so trees
recorded on real hosts drive the tests.

sched_setaffinity(2) on a thread in a cpuset cgroup keeps only the CPUs the cpuset allows
(kernel/sched/core.c: __sched_setaffinity intersects the mask with cpuset_cpus_allowed) and
fails with EINVAL only when nothing is left: a request partly outside the cpuset would be
cut silently, so ``allowed_by_cpuset`` is asked first.
"""

from __future__ import annotations

import os

from vhostorch.errors import InvalidSpec
from vhostorch.kernel.procfs import read_text
from vhostorch.record import TYPE_CHECKING, Record

if TYPE_CHECKING:
    from collections.abc import Iterable

PROC = "/proc"
SYS = "/sys"
CGROUP_FS = "/sys/fs/cgroup"
# comm of a QEMU vCPU thread: "CPU <index>/<accelerator>" (QEMU's qemu_thread_create name,
# "CPU %d/KVM"; TCG's "CPU %d/TCG").
VCPU_PREFIX = "CPU "
MAX_CPUS = 8192  # include/linux/threads.h NR_CPUS can be 8192 on distribution kernels


def parse_list(text: str) -> frozenset[int]:
    """The CPUs of a list in the kernel's format ("0-3,8"). Raises InvalidSpec."""
    cpus: set[int] = set()
    text = text.strip()
    if not text:
        return frozenset()
    for part in text.split(","):
        low, sep, high = part.strip().partition("-")
        # ASCII digits only: int() also takes other scripts' digits (U+0661), '1_0', '+1', ' 1'.
        if not _digits(low) or (sep and not _digits(high)):
            raise InvalidSpec(f"{text!r} is not a CPU list (such as 0-3,8)")
        first = int(low)
        last = int(high) if sep else first
        if last < first or last >= MAX_CPUS:
            raise InvalidSpec(f"{text!r} is not a CPU list (such as 0-3,8)")
        cpus.update(range(first, last + 1))
    return frozenset(cpus)


def _digits(text: str) -> bool:
    return text.isascii() and text.isdigit()


def cpu_list(value: object, what: str) -> str:
    """A CPU list a user gave as ``what`` (a spec key, a metadata attribute), in the kernel's
    list format, normalised ("3,2,1" -> "1-3"). Raises InvalidSpec naming ``what``."""
    if not isinstance(value, str):
        raise InvalidSpec(f'{what} must be a CPU list such as "2-3", not {value!r}')
    try:
        found = parse_list(value)
    except InvalidSpec as err:
        raise InvalidSpec(f"{what}: {err}") from None
    if not found:
        raise InvalidSpec(f"{what}: no CPU given")
    return format_list(found)


def format_list(cpus: Iterable[int]) -> str:
    """``cpus`` in the kernel's list format, ranges joined ("0-3,8")."""
    out: list[str] = []
    run: list[int] = []
    for cpu in sorted(set(cpus)):
        if run and cpu == run[-1] + 1:
            run.append(cpu)
            continue
        if run:
            out.append(_range(run))
        run = [cpu]
    if run:
        out.append(_range(run))
    return ",".join(out)


def _range(run: list[int]) -> str:
    return str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}"


class Place(Record):
    """Where one thread may run and ran: its comm, allowed CPUs, last CPU and cgroup."""

    tid: int
    comm: str
    cpus: frozenset[int]  # Cpus_allowed_list
    last_cpu: int | None  # stat's processor field
    cgroup: str | None  # the v2 path, else the v1 cpuset hierarchy's


def task_dir(pid: int, tid: int, proc: str = PROC) -> str | None:
    """/proc's directory of thread ``tid``: as a thread of ``pid``, else as a process of its
    own (a kernel thread); None when it is gone."""
    for path in (f"{proc}/{pid}/task/{tid}", f"{proc}/{tid}/task/{tid}"):
        if os.path.isdir(path):
            return path
    return None


def place(pid: int, tid: int, proc: str = PROC) -> Place | None:
    """Where thread ``tid`` (of QEMU ``pid``, or a kernel thread) runs; None when it is gone
    or cannot be read."""
    where = task_dir(pid, tid, proc)
    if where is None:
        return None
    try:
        status = read_text(f"{where}/status")
        stat = read_text(f"{where}/stat")
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    try:
        cpus = parse_list(fields["Cpus_allowed_list"])
        comm = fields.get("Name", "").strip()
    except (KeyError, InvalidSpec):
        return None
    after = stat.rsplit(")", 1)[-1].split()
    # Field 39 (processor) is the 37th after the comm.
    last = int(after[36]) if len(after) > 36 and after[36].isdigit() else None
    return Place(tid, comm, cpus, last, cgroup(where))


def cgroup(task: str) -> str | None:
    """A task's cgroup from its /proc directory's ``cgroup`` file, where its cpuset is: the v1
    cpuset hierarchy's path where one is mounted (a hybrid host has a v2 line too, without
    the cpuset controller), else the v2 path ("0::/x")."""
    try:
        lines = read_text(f"{task}/cgroup").splitlines()
    except OSError:
        return None
    v2 = None
    for line in lines:
        number, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if "cpuset" in controllers.split(","):
            return path
        if number == "0" and not controllers:
            v2 = path
    return v2


def cpuset(path: str, cgroup_fs: str = CGROUP_FS) -> frozenset[int] | None:
    """The CPUs cgroup ``path``'s cpuset allows (cpuset.cpus.effective on cgroup v2,
    cpuset.effective_cpus on v1); None where no cpuset applies or it cannot be read.

    On v2 a controller's files exist only in the cgroups whose parent enabled it
    (cgroup.subtree_control): one without them is bounded by its nearest ancestor that has
    them (the root always has), so that ancestor's is read."""
    rel = path.strip("/")
    try:
        return parse_list(
            read_text(os.path.join(cgroup_fs, "cpuset", rel, "cpuset.effective_cpus"))
        )
    except (OSError, InvalidSpec):
        pass
    parts = rel.split("/") if rel else []
    while True:
        try:
            return parse_list(read_text(os.path.join(cgroup_fs, *parts, "cpuset.cpus.effective")))
        except (OSError, InvalidSpec):
            pass
        if not parts:
            return None
        parts.pop()


def online(sys: str = SYS) -> frozenset[int] | None:
    """The CPUs online now; None when sysfs cannot say."""
    try:
        return parse_list(read_text(f"{sys}/devices/system/cpu/online"))
    except (OSError, InvalidSpec):
        return None


_SIBLINGS: dict[tuple[str, int], frozenset[int]] = {}


def siblings(cpu: int, sys: str = SYS) -> frozenset[int]:
    """The CPUs that share ``cpu``'s core (SMT siblings, itself included: its topology's
    thread_siblings_list); just ``cpu`` where sysfs cannot say. Read once per CPU (the
    topology does not change while a host runs; check --all asks for every QEMU)."""
    key = (sys, cpu)
    if key not in _SIBLINGS:
        path = f"{sys}/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list"
        try:
            found = parse_list(read_text(path)) | {cpu}
        except (OSError, InvalidSpec):
            found = frozenset({cpu})
        _SIBLINGS[key] = found
    return _SIBLINGS[key]


def vcpu_index(comm: str) -> int | None:
    """The vCPU index of a QEMU thread named ``CPU <n>/<accel>``, else None."""
    if not comm.startswith(VCPU_PREFIX):
        return None
    number, sep, _ = comm[len(VCPU_PREFIX) :].partition("/")
    return int(number) if sep and number.isdigit() else None


def set_affinity(tid: int, cpus: frozenset[int]) -> None:
    """Let thread ``tid`` run on ``cpus`` only. Raises OSError (ESRCH: gone; EINVAL: none of
    them allowed by its cpuset; EPERM)."""
    os.sched_setaffinity(tid, cpus)
