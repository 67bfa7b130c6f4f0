"""The check's reports as metrics text, rendered by prometheus_client in one of two formats:

  openmetrics  OpenMetrics 1.0 (application/openmetrics-text), for scrapers that ask for it:
               a counter family is named without ``_total`` in HELP and TYPE (its samples
               keep it), and the text ends with ``# EOF``.
  prometheus   the classic text exposition format 0.0.4, which node_exporter's textfile
               collector parses (Go's expfmt TextParser): HELP and TYPE name the counter
               with ``_total``, as its samples are named, and no ``# EOF``.

The reports become metric families in a Collector of this module, registered in a
CollectorRegistry of its own (never prometheus_client's global one) and written by
prometheus_client's ``generate_latest`` of the format. prometheus_client is imported inside
``render`` (about 55 ms: its package imports http.server): the libvirt hook and `tap create`
import vhostorch.cli, never this renderer.

Families (every one a HELP and a TYPE line):

  vhostorch_check_status{vm,pid,nic,queue,check,status}   gauge, 1 for the check's verdict
      and 0 for the three other statuses (pass, warn, fail, unknown): alert on
      ``vhostorch_check_status{status="fail"} == 1``. nic and queue are "" for a check
      about the host or the VM, queue is "" for a check about a whole NIC.
  vhostorch_nic_vhost_reason{vm,pid,nic,reason}            gauge, 1 per NIC that does not
      use vhost (or not fully), reason its stable code (check.reasons)
  vhostorch_vhost_worker_cpu_seconds_total{vm,pid,nic,queue_pair,tid}  counter, CPU time
      (utime + stime) of the vhost worker of each queue pair (no sample where unreadable)
  vhostorch_vhost_worker_info{vm,pid,nic,queue_pair,tid,model,cgroup,cpus}  gauge, 1 per
      vhost worker: where it runs (check.report.Worker: its model, cgroup and allowed CPUs
      in the kernel's list format; "" where not read)
  vhostorch_vhost_worker_last_cpu{vm,pid,nic,queue_pair,tid}  gauge, the CPU the worker
      last ran on (no sample where not read)
  vhostorch_vring_kicks_total{vm,pid,nic,queue}            counter, the guest's kicks of a
      virtqueue since vhost started it (its kick eventfd's count, which vhost never drains)
  vhostorch_vring_last_avail_index{vm,pid,nic,queue}       gauge, vhost's last_avail_idx
  vhostorch_vring_last_used_index{vm,pid,nic,queue}        gauge, vhost's last_used_idx
      (ring progress: 16-bit, wrapping; a queue whose indices never move carries nothing)
      These three come from the kernel's live state (check.live) and are left out, HELP and
      TYPE too, when it was not read (no such sample in any report).
  vhostorch_vm_ok{vm,pid}                                   gauge, 1 when no check failed
  vhostorch_check_vms                                       gauge, the QEMUs checked
  vhostorch_check_duration_seconds                          gauge, how long the check took
  vhostorch_check_last_run_timestamp_seconds                gauge, when the check finished
      (unix time): ``time() - vhostorch_check_last_run_timestamp_seconds > 900`` tells a
      check that stopped reporting (a textfile keeps its last contents)

``vm`` is the libvirt domain, else QEMU's -name, else "".
"""

from __future__ import annotations

from vhostorch.check.ids import KICK
from vhostorch.check.report import STATUSES, DomainTarget, JudgedNic, QemuTarget
from vhostorch.record import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

    from vhostorch.check.report import Check, Report

PREFIX = "vhostorch_"
FORMATS = ("openmetrics", "prometheus")
STATUS = ("vm", "pid", "nic", "queue", "check", "status")
REASON = ("vm", "pid", "nic", "reason")
WORKER = ("vm", "pid", "nic", "queue_pair", "tid")
PLACE = (*WORKER, "model", "cgroup", "cpus")
QUEUE = ("vm", "pid", "nic", "queue")
VM = ("vm", "pid")


def vm_name(report: Report) -> str:
    target = report.target
    if isinstance(target, QemuTarget):
        return target.domain or target.name or ""
    return target.domain if isinstance(target, DomainTarget) else ""


def _text(value: object) -> str:
    """A label value: "" for None; a name that came from argv or /proc with bytes that are
    not UTF-8 (kept as surrogates) gets U+FFFD for them, as both formats are UTF-8."""
    text = "" if value is None else str(value)
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def render(
    reports: Sequence[Report],
    duration: float,
    form: str = "openmetrics",
    *,
    finished: float | None = None,
) -> str:
    """The metrics text of ``reports``, checked in ``duration`` seconds and finished at
    ``finished`` (unix time; None: now), in ``form`` (one of FORMATS). Raises ValueError
    for another form."""
    if form not in FORMATS:
        raise ValueError(f"no metrics format {form!r}")
    if finished is None:
        import time

        finished = time.time()
    import prometheus_client.exposition
    import prometheus_client.openmetrics.exposition
    from prometheus_client.registry import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Reports(reports, duration, finished))
    encode: Callable[[CollectorRegistry], bytes] = (
        prometheus_client.openmetrics.exposition.generate_latest  # untyped there
        if form == "openmetrics"
        else prometheus_client.exposition.generate_latest
    )
    return encode(registry).decode()


class _Reports:
    """A prometheus_client Collector (its protocol is ``collect``) of the reports' families,
    in the order the module docstring lists them."""

    def __init__(self, reports: Sequence[Report], duration: float, finished: float) -> None:
        self.reports = reports
        self.duration = duration
        self.finished = finished

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

        def gauge(name: str, help: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(PREFIX + name, help, labels=labels)

        def counter(name: str, help: str, labels: Sequence[str]) -> CounterMetricFamily:
            return CounterMetricFamily(PREFIX + name, help, labels=labels)

        status = gauge(
            "check_status",
            "Verdict of a vhostorch check: 1 for its status (pass, warn, fail, unknown), 0 for "
            "the others.",
            STATUS,
        )
        reason = gauge(
            "nic_vhost_reason",
            "1 for a NIC that does not use vhost, or not fully; reason is a stable code.",
            REASON,
        )
        cpu = counter(
            "vhost_worker_cpu_seconds",
            "CPU time (user and system) of the vhost worker thread serving a queue pair.",
            WORKER,
        )
        info = gauge(
            "vhost_worker_info",
            "1 per vhost worker thread: its model, cgroup and allowed CPUs (empty where not read).",
            PLACE,
        )
        last_cpu = gauge(
            "vhost_worker_last_cpu", "The CPU a vhost worker thread last ran on.", WORKER
        )
        vm_ok = gauge("vm_ok", "1 when no check of this QEMU failed.", VM)
        kicks = counter(
            "vring_kicks",
            "Guest kicks of a virtqueue since vhost started it (its kick eventfd's count).",
            QUEUE,
        )
        avail = gauge("vring_last_avail_index", "vhost's last_avail_idx of a virtqueue.", QUEUE)
        used = gauge("vring_last_used_index", "vhost's last_used_idx of a virtqueue.", QUEUE)
        for report in self.reports:
            vm = vm_name(report)
            pid = _text(report.pid)
            for c in report.checks:
                where = [_text(v) for v in (vm, pid, c.nic, c.queue, c.id)]
                for s in STATUSES:
                    status.add_metric([*where, s], 1 if c.status == s else 0)
                _vring(c, where[:4], kicks, avail, used)
            for nic in report.nics:
                if not isinstance(nic, JudgedNic):
                    continue  # not applicable: no reason, no worker
                if nic.reason is not None:
                    reason.add_metric([_text(vm), pid, _text(nic.name), nic.reason.code], 1)
                for w in nic.workers:
                    worker = [_text(v) for v in (vm, pid, nic.name, w.queue_pair, w.tid)]
                    info.add_metric([*worker, *(_text(v) for v in (w.model, w.cgroup, w.cpus))], 1)
                    if w.cpu_seconds is not None:  # unreadable: no sample
                        cpu.add_metric(worker, float(w.cpu_seconds))
                    if w.last_cpu is not None:
                        last_cpu.add_metric(worker, w.last_cpu)
            vm_ok.add_metric([_text(vm), pid], 1 if report.ok() else 0)
        yield from (status, reason, cpu, info, last_cpu, vm_ok)
        yield from (family for family in (kicks, avail, used) if family.samples)
        yield GaugeMetricFamily(
            PREFIX + "check_vms", "QEMU processes this check looked at.", len(self.reports)
        )
        yield GaugeMetricFamily(
            PREFIX + "check_duration_seconds", "How long vhostorch check took.",
            round(self.duration, 6),
        )  # fmt: skip
        yield GaugeMetricFamily(
            PREFIX + "check_last_run_timestamp_seconds",
            "When vhostorch check finished, in seconds since the epoch.",
            round(self.finished, 3),
        )


def _vring(
    c: Check,
    where: Sequence[str],
    kicks: CounterMetricFamily,
    avail: GaugeMetricFamily,
    used: GaugeMetricFamily,
) -> None:
    """A live nic.kick's kick count and ring indices as samples (check.live's evidence)."""
    evidence = c.evidence or {}
    if c.id != KICK or evidence.get("source") != "live":
        return
    count = evidence.get("kick")
    if isinstance(count, dict) and isinstance(count.get("count"), int):
        kicks.add_metric(where, count["count"])
    ring = evidence.get("ring")
    if isinstance(ring, dict):
        for family, key in ((avail, "last_avail_idx"), (used, "last_used_idx")):
            if isinstance(ring.get(key), int):
                family.add_metric(where, ring[key])
