"""Gather what can be seen of a running QEMU into one Observation (no verdicts here).

Sources: /proc (fds, fdinfo, threads, command line), the vhost workers, the
taps over rtnetlink, the wiring trace, and, when given, the libvirt domain's XML
and QEMU's monitor. ``verify`` turns an Observation into checks. Every source is
an argument of ``observe`` (a /proc root, a tracefs root, a tap reader...), so an
observation recorded on a real host (tests/fixtures/observations) drives it again.
"""

from __future__ import annotations

import os

from vhostorch.check import wiring as wiring_trace
from vhostorch.kernel import procfs
from vhostorch.kernel.rtnl import Link, Rtnl
from vhostorch.qemu import args as qemuargs
from vhostorch.qemu.monitor import MonitorError
from vhostorch.record import TYPE_CHECKING, Record

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from vhostorch.check.wiring import Wiring
    from vhostorch.libvirt.domxml import Domain
    from vhostorch.qemu.monitor import MonitorView
    from vhostorch.vm.state import VmState


class Observation(Record):
    process: procfs.Process
    args: qemuargs.QemuArgs
    worker_model: str
    workers: tuple[int, ...]
    taps: dict[str, Link | None]
    taps_seen: str | None
    vhost_net: bool
    domain: Domain | None
    monitor: MonitorView | None = None
    monitor_error: str | None = None
    wiring: Wiring | None = None
    wiring_note: str | None = None
    plan: VmState | None = None  # what vhostorch set up, for a VM it started


# libvirt's QEMU driver writes each running domain's pid here (qemu:///system).
PID_DIR = "/run/libvirt/qemu"


def vhost_net_present(dev: str = "/dev") -> bool:
    import stat

    try:
        return stat.S_ISCHR(os.stat(f"{dev}/vhost-net").st_mode)
    except OSError:
        return False


def _netns(pid: int | str, proc: str) -> str | None:
    try:
        return os.readlink(f"{proc}/{pid}/ns/net")
    except OSError:
        return None


def read_links(names: Iterable[str]) -> dict[str, Link | None]:
    """The links named, over rtnetlink (None for one that does not exist)."""
    # One RTM_GETLINK per tap: a dump of every link costs ~6 ms on a host with many.
    with Rtnl() as rtnl:
        return {name: rtnl.link(name) for name in names}


def observe(
    pid: int,
    *,
    domain: Domain | None = None,
    proc: str = procfs.PROC,
    kthreads: dict[str, list[int]] | None = None,
    monitor: Callable[[], MonitorView] | None = None,
    tracefs: str = wiring_trace.TRACEFS,
    plan: VmState | None = None,
    links: Callable[[Iterable[str]], dict[str, Link | None]] = read_links,
    netns: str | None = None,
    vhost_net: bool | None = None,
) -> Observation:
    """Look at QEMU ``pid``. Raises procfs.CannotInspect when it cannot be read or is no QEMU.

    ``monitor`` reads QEMU's monitor; when it fails, the reason is kept and the
    checks that need it are unknown. ``plan`` is vhostorch's record of a VM it
    started (NICs added over QMP, and what the spec allowed). The rest say where
    to look: ``proc`` and ``tracefs`` are roots, ``kthreads`` the vhost kernel
    threads by name (read from ``proc`` if None), ``links`` reads taps by name,
    ``netns`` is the network namespace ``links`` reads in (this process's if
    None), ``vhost_net`` whether the host has /dev/vhost-net (looked at if None).
    """
    process = procfs.read(pid, proc)
    name = procfs.program(pid, proc)
    if not procfs.is_qemu(name):
        raise procfs.CannotInspect(f"process {pid} is not a QEMU (it runs {name or '?'})")
    args = qemuargs.parse(process.argv)
    model, workers = procfs.vhost_workers(
        process, procfs.vhost_kthreads(proc) if kthreads is None else kthreads
    )
    names = {fd.tap for fd in process.fds if fd.tap}
    names |= {n.ifname for n in args.netdevs if n.ifname}
    if domain is not None:
        names |= {i.target for i in domain.interfaces if i.target}
    if plan is not None:
        names |= {n.tap for n in plan.nics}
    taps: dict[str, Link | None] = {}
    seen = None
    # Taps live in QEMU's network namespace; read them only when it is ours.
    if _netns(pid, proc) != (_netns("self", "/proc") if netns is None else netns):
        seen = "QEMU runs in another network namespace; its taps were not read"
    else:
        taps = links(sorted(n for n in names if n))
    view, error = None, None
    if monitor is not None:
        try:
            view = monitor()
        except MonitorError as err:
            error = str(err)
    since = process.start_ticks / os.sysconf("SC_CLK_TCK")
    wired = wiring_trace.read(pid, since, tracefs)
    note = None
    if wired is None:
        note = "the wiring trace is not armed (vhostorch trace arm, before the guest driver starts)"
    elif not wired.vrings:
        note = (
            "the wiring trace is armed but recorded no vring of this QEMU: they were wired "
            "before it was armed (a guest driver restart, or a pause and resume, wires them again)"
        )
    present = vhost_net_present() if vhost_net is None else vhost_net
    return Observation(
        process, args, model, tuple(workers), taps, seen, present, domain, view, error, wired,
        note, plan,
    )  # fmt: skip


def domain_pid(name: str, proc: str = procfs.PROC, pid_dir: str = PID_DIR) -> int:
    """The QEMU pid of running libvirt domain ``name``, without asking libvirt (a hook
    must not): its pid file, else the QEMU whose command line has ``-name guest=NAME``."""
    try:
        with open(os.path.join(pid_dir, f"{name}.pid")) as f:
            pid = int(f.read().strip())
        if procfs.alive(pid, proc):
            return pid
    except (OSError, ValueError):
        pass
    for pid in procfs.qemu_pids(proc):
        try:
            with open(f"{proc}/{pid}/cmdline") as f:
                argv = f.read().split("\0")
        except OSError:
            continue
        if qemuargs.parse(argv).name == name:
            return pid
    raise procfs.CannotInspect(f"no QEMU process found for domain {name!r}")
