"""nic.vhost.placement: where a NIC's vhost workers may run, against the VM's pinned vCPUs and
the pin asked for them.

A vhost worker does the NIC's copying; on a CPU that one of the VM's vCPUs has for itself it
takes that vCPU's time (the guest stalls while its own packets are moved), which costs more
than vhost saves. Where a worker may run depends on the kernel: a kernel thread (< 6.4) is
attached to its owner's cgroups (cgroup_attach_task_all) and may run on every CPU their
cpuset allows; a vhost_task (>= 6.4) is a thread of QEMU, made by the thread that called
VHOST_SET_OWNER, and inherits that thread's affinity and cgroup (under libvirt: the emulator
thread's, so it follows ``<emulatorpin>``). So both are read, never assumed.

A vCPU counts as pinned when its thread may run on fewer CPUs than QEMU's threads together
(pinned by libvirt's ``<vcpupin>``, by ``<cputune>``'s emulatorpin leaving it elsewhere, or
by hand with taskset), or when the domain's ``<vcpupin>`` gives it fewer. A VM-wide cpuset
(``<vcpu cpuset=>``, a cgroup) that every thread shares reserves nothing, nor does a
``<vcpupin>`` to all of those CPUs (OpenStack Nova writes one per vCPU, a guest NUMA node's
shared CPUs): the worker sharing them takes no CPU the vCPU has for itself.

  warn     a worker may run on a CPU a pinned vCPU has (cause ``on-vcpu-cpu``), or on an
           SMT sibling of one (the same core: ``on-vcpu-core``)
  fail     a pin was asked for (check.pins) and a worker may run elsewhere (``not-pinned``)
  unknown  where the threads run could not be read, or no worker is known
  pass     otherwise, with every worker's and vCPU's CPUs as evidence
"""

from __future__ import annotations

from vhostorch.check.ids import VHOST_PLACEMENT
from vhostorch.check.report import (
    FAIL,
    NOT_PINNED,
    ON_VCPU_CORE,
    ON_VCPU_CPU,
    PASS,
    UNKNOWN,
    WARN,
)
from vhostorch.kernel.cpus import format_list, parse_list, vcpu_index
from vhostorch.record import TYPE_CHECKING

if TYPE_CHECKING:
    from vhostorch.check.nics import Nic
    from vhostorch.check.observe import Observation
    from vhostorch.check.report import Check, Worker
    from vhostorch.kernel.cpus import Place


def placed(obs: Observation, workers: tuple[Worker, ...]) -> tuple[Worker, ...]:
    """``workers`` with where each runs (model, cgroup, CPUs, last CPU), as far as read."""
    kernel = {d.fd: d.worker_model for d in obs.live.vhost} if obs.live is not None else {}
    places = obs.places or {}
    out = []
    for w in workers:
        where = places.get(w.tid)
        model = kernel.get(w.vhost_fd, obs.worker_model)
        if where is None:
            out.append(w.replace(model=model))
            continue
        out.append(
            w.replace(
                model=model,
                cgroup=where.cgroup,
                cpus=format_list(where.cpus),
                last_cpu=where.last_cpu,
            )
        )
    return tuple(out)


def vcpus(obs: Observation) -> list[tuple[int, Place]]:
    """The VM's vCPU threads by index, with where each runs."""
    places = obs.places or {}
    found = []
    for thread in obs.process.threads:
        index = vcpu_index(thread.comm)
        if index is not None and thread.tid in places:
            found.append((index, places[thread.tid]))
    return sorted(found, key=lambda pair: pair[0])


def _domain_pins(obs: Observation) -> dict[int, frozenset[int]]:
    """The domain's ``<vcpupin>`` CPU sets by vCPU (none for a VM outside libvirt)."""
    if obs.domain is None:
        return {}
    return dict(obs.domain.vcpupin)


def reserved(obs: Observation) -> dict[int, list[int]]:
    """CPU -> the pinned vCPUs that have it (see the module docstring)."""
    places = obs.places or {}
    workers = set(obs.workers)
    others = [
        places[t.tid].cpus
        for t in obs.process.threads
        if t.tid in places and t.tid not in workers and vcpu_index(t.comm) is None
    ]
    whole = frozenset().union(*others, *(p.cpus for _, p in vcpus(obs)))
    configured = _domain_pins(obs)
    found: dict[int, list[int]] = {}
    for index, where in vcpus(obs):
        if where.cpus < whole or configured.get(index, whole) < whole:
            for cpu in where.cpus:
                found.setdefault(cpu, []).append(index)
    return found


def placement(obs: Observation, nic: Nic, workers: tuple[Worker, ...]) -> Check:
    """nic.vhost.placement of ``nic``, whose attributed workers are ``workers`` (placed)."""
    evidence: dict[str, object] = {}
    if obs.places is None:
        return nic.check(
            VHOST_PLACEMENT,
            UNKNOWN,
            "where QEMU's threads run could not be read (/proc/PID/task/TID/status)",
            evidence,
        )
    tids = [w.tid for w in workers]
    attributed = bool(workers)
    if not attributed:
        # Not tied to queue pairs (check.verify.workers): all of QEMU's vhost workers stand in;
        # a NIC's own are among them.
        tids = list(obs.workers)
    if not tids:
        return nic.check(VHOST_PLACEMENT, UNKNOWN, "no vhost worker to place", evidence)
    places = obs.places
    missing = [t for t in tids if t not in places]
    pairs = {w.tid: w.queue_pair for w in workers}
    evidence["workers"] = [
        {
            "tid": t,
            "queue_pair": pairs.get(t),
            "cpus": format_list(places[t].cpus),
            "last_cpu": places[t].last_cpu,
            "cgroup": places[t].cgroup,
        }
        for t in tids
        if t in places
    ]
    if not attributed:
        evidence["attributed"] = False
    on = reserved(obs)
    evidence["vcpus"] = [
        {
            "vcpu": index,
            "tid": where.tid,
            "cpus": format_list(where.cpus),
            "last_cpu": where.last_cpu,
            "pinned": any(index in v for v in on.values()),
        }
        for index, where in vcpus(obs)
    ]
    if obs.domain is not None and (obs.domain.vcpupin or obs.domain.emulatorpin is not None):
        evidence["cputune"] = {
            "vcpupin": {str(v): format_list(c) for v, c in obs.domain.vcpupin},
            "emulatorpin": None
            if obs.domain.emulatorpin is None
            else format_list(obs.domain.emulatorpin),
        }
    if obs.pin is not None:
        evidence["pin"] = obs.pin.to_json()
    if missing:
        gone = ", ".join(map(str, missing))
        return nic.check(
            VHOST_PLACEMENT, UNKNOWN, f"worker(s) {gone}: where they run could not be read",
            evidence,
        )  # fmt: skip
    who = "worker" if attributed else "this QEMU's worker"
    if obs.pin is not None:
        wanted = parse_list(obs.pin.cpus)
        astray = [t for t in tids if places[t].cpus != wanted]
        if astray:
            t = astray[0]
            return nic.check(
                VHOST_PLACEMENT,
                FAIL,
                f"{who} {t}{_pair(pairs, t)} may run on CPUs {format_list(places[t].cpus)}, not "
                f"{obs.pin.cpus} as {obs.pin.source} asked (vhostorch pin --reapply applies it)",
                evidence,
                cause=NOT_PINNED,
            )
    for t in tids:
        shared = sorted(cpu for cpu in places[t].cpus if cpu in on)
        if shared:
            cpu = shared[0]
            vcpu = on[cpu][0]
            return nic.check(
                VHOST_PLACEMENT,
                WARN,
                f"{who} {t}{_pair(pairs, t)} may run on CPU {format_list(shared)}, which pinned "
                f"vCPU {vcpu} has (CPU {cpu}): it takes that vCPU's time; pin the workers "
                f"elsewhere (vhostorch pin)",
                evidence,
                cause=ON_VCPU_CPU,
            )
    # Hyperthreads of one core share its execution units: a worker on the sibling of a
    # pinned vCPU's CPU still takes that vCPU's time.
    cores: dict[int, tuple[int, int]] = {}  # sibling CPU -> (the pinned CPU, its vCPU)
    for cpu in sorted(on):
        for sibling in sorted((obs.siblings or {}).get(cpu, frozenset()) - on.keys()):
            cores.setdefault(sibling, (cpu, on[cpu][0]))
    if cores:
        evidence["siblings"] = {str(s): cpu for s, (cpu, _) in sorted(cores.items())}
    for t in tids:
        near = sorted(cpu for cpu in places[t].cpus if cpu in cores)
        if near:
            cpu, vcpu = cores[near[0]]
            return nic.check(
                VHOST_PLACEMENT,
                WARN,
                f"{who} {t}{_pair(pairs, t)} may run on CPU {format_list(near)}, on the core "
                f"of CPU {cpu}, which pinned vCPU {vcpu} has (SMT siblings): it takes that "
                f"vCPU's time; pin the workers elsewhere (vhostorch pin)",
                evidence,
                cause=ON_VCPU_CORE,
            )
    every = frozenset().union(*(places[t].cpus for t in tids))
    spread = f"CPU{'s' if len(every) > 1 else ''} {format_list(every)}"
    held = f"CPU{'s' if len(on) > 1 else ''} {format_list(on)}"
    apart = f"apart from the pinned vCPUs' {held}" if on else "no vCPU is pinned"
    pinned = f", as {obs.pin.source} asked" if obs.pin is not None else ""
    return nic.check(
        VHOST_PLACEMENT,
        PASS,
        f"{len(tids)} {who}(s) may run on {spread}{pinned}; {apart}",
        evidence,
    )


def _pair(pairs: dict[int, int], tid: int) -> str:
    return f" (queue pair {pairs[tid]})" if tid in pairs else ""
