"""Turn an Observation into checks: a pure function, so recorded observations can test it.

It composes the families: the host and VM (check.machine), then per tap NIC what
was asked (check.request), what QEMU holds (check.fds), vhost at work
(check.running) and each virtqueue's kick and call (check.vrings). check.ids
lists every check id and the module that makes it. Each NIC of the report also
says why it does not use vhost, when it does not (check.reasons), and the CPU time
of the vhost worker of each of its queue pairs.
"""

from __future__ import annotations

from vhostorch.check import (
    applicable,
    fds,
    live,
    machine,
    nics,
    placement,
    reasons,
    request,
    running,
    vrings,
)
from vhostorch.check.report import JudgedNic, Managed, QemuTarget, Report, Worker
from vhostorch.kernel import procfs
from vhostorch.record import TYPE_CHECKING

if TYPE_CHECKING:
    from vhostorch.check.nics import Nic
    from vhostorch.check.observe import Observation
    from vhostorch.check.report import Check, Reason, ReportedNic


def nic_checks(obs: Observation, nic: Nic, placed: tuple[Worker, ...] | None = None) -> list[Check]:
    """Every check of one NIC, in the order a report lists them (``placed``: its workers
    with where they run, as ``workers`` gives them; read when None)."""
    checks = [request.requested(obs, nic), request.queues(obs, nic), fds.tap_fds(obs, nic)]
    if nic.state is not None and not nic.state.vhost_on and not nic.netdev.wants_vhost:
        return checks  # vhost is off or fell back as the spec allows: nothing to attach
    checks += [fds.vhost_fds(obs, nic), fds.worker(obs, nic)]
    if not nic.vhost_fds:
        return checks  # nothing further can be attached
    # QEMU's monitor says most (it was asked for); else what the kernel holds now; else the
    # wiring trace (check.running).
    judge = live if obs.monitor is None and obs.live is not None else running
    checks += [judge.started(obs, nic), judge.memtable(obs, nic)]
    checks += vrings.vrings(obs, nic)
    checks.append(judge.features(obs, nic))
    checks.append(placement.placement(obs, nic, workers(obs, nic) if placed is None else placed))
    return checks


def verify(obs: Observation) -> Report:
    """All checks for one QEMU."""
    checks = [machine.host_vhost_net(obs), machine.vm_kvm(obs)]
    found = nics.find(obs)
    why: list[Reason | None] = []
    placed = [workers(obs, nic) for nic in found]
    for nic, theirs in zip(found, placed, strict=True):
        mine = nic_checks(obs, nic, theirs)
        checks += mine
        why.append(reasons.reason(obs, nic, mine))
    not_applicable = applicable.find(obs)  # listed in nics, never judged
    if not found and not not_applicable:
        checks.append(request.no_tap_nic())
    domain = obs.domain
    target = QemuTarget(
        obs.process.pid,
        obs.args.name,
        stopped=obs.stopped,  # its monitor was not asked (check.observe)
        vhostorch=None if obs.plan is None else Managed(obs.plan.name, obs.plan.backend),
        domain=None if domain is None else domain.name,
        domain_type=None if domain is None else domain.type,
    )
    nic_info: tuple[ReportedNic, ...] = tuple(
        JudgedNic(
            nic.name,
            nic.netdev.id,
            nics.tap_name(obs, nic),
            nic.netdev.queue_pairs,
            nic.netdev.wants_vhost,
            reason,
            theirs,
        )
        for nic, reason, theirs in zip(found, why, placed, strict=True)
    )
    nic_info += tuple(not_applicable)
    return Report(target, nic_info, tuple(checks))


def workers(obs: Observation, nic: Nic) -> tuple[Worker, ...]:
    """The vhost worker of each queue pair of ``nic`` with its CPU seconds.

    Each vhost device (one per queue pair) gets its worker at VHOST_SET_OWNER, one
    device after the other, and tids grow: the workers in tid order serve the vhost fds
    in the order they were owned. The wiring trace tells that order; without it, fd
    order stands in for it (QEMU opens and owns each device in turn), which a fd number
    reused after a hot-unplug can break, so each entry says which order it used. No
    worker is attributed unless there are as many workers as vhost fds. Where the kernel's
    state was read (check.live), it names each device's worker and nothing is inferred.
    Each says where it runs (check.placement.placed).
    """
    return placement.placed(obs, _attributed(obs, nic))


def _attributed(obs: Observation, nic: Nic) -> tuple[Worker, ...]:
    kernel = _live_workers(obs, nic)
    if kernel:
        return kernel
    every = [fd.num for fd in obs.process.fds_to(procfs.VHOST_NET)]
    if not nic.vhost_fds or len(every) != len(obs.workers) or obs.worker_cpu is None:
        return ()
    order, by = sorted(every), "fd order"
    owned = {fd: i for i, fd in enumerate(obs.wiring.owners)} if obs.wiring else {}
    if all(fd in owned for fd in every):  # the last VHOST_SET_OWNER of each fd counts
        order, by = sorted(every, key=owned.__getitem__), "VHOST_SET_OWNER order (traced)"
    by_fd = dict(zip(order, sorted(obs.workers), strict=True))
    cpu = obs.worker_cpu
    return tuple(
        Worker(pair, fd.num, tid, cpu.get(tid), by)  # no cpu: its stat was unreadable
        for pair, fd in enumerate(nic.vhost_fds)
        if (tid := by_fd.get(fd.num)) is not None
    )


def _live_workers(obs: Observation, nic: Nic) -> tuple[Worker, ...]:
    """Each queue pair's worker as the kernel names it (check.live); () unless all are."""
    if obs.live is None or obs.worker_cpu is None:
        return ()
    cpu, found = obs.worker_cpu, []
    by_fd = {d.fd: d for d in obs.live.vhost}
    for pair, fd in enumerate(nic.vhost_fds):
        device = by_fd.get(fd.num)
        if device is None:
            return ()
        tids = {q.worker_tid for q in device.queues if q.worker_tid}
        tid = device.worker_tid or (tids.pop() if len(tids) == 1 else None)  # >= 6.5: per vq
        if tid is None:
            return ()
        found.append(Worker(pair, fd.num, tid, cpu.get(tid), "the kernel (live)"))
    return tuple(found)
