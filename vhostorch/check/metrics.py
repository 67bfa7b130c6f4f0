"""The check's reports as metrics text, in one of two formats that differ in two things:

  openmetrics  OpenMetrics 1.0 (application/openmetrics-text), for scrapers that ask for it:
               a counter family is named without ``_total`` in HELP and TYPE (its samples
               keep it), and the text ends with ``# EOF``.
  prometheus   the classic text exposition format 0.0.4, which node_exporter's textfile
               collector parses (Go's expfmt TextParser): HELP and TYPE name the counter
               with ``_total``, as its samples are named (expfmt reads a sample whose name is
               not a TYPE'd family's as a family of its own, untyped), and no ``# EOF``.

Families (every one a HELP and a TYPE line):

  vhostorch_check_status{vm,pid,nic,queue,check,status}   gauge, 1 for the check's verdict
      and 0 for the three other statuses (pass, warn, fail, unknown): alert on
      ``vhostorch_check_status{status="fail"} == 1``. nic and queue are "" for a check
      about the host or the VM, queue is "" for a check about a whole NIC.
  vhostorch_nic_vhost_reason{vm,pid,nic,reason}            gauge, 1 per NIC that does not
      use vhost (or not fully), reason its stable code (check.reasons)
  vhostorch_vhost_worker_cpu_seconds_total{vm,pid,nic,queue_pair,tid}  counter, CPU time
      (utime + stime) of the vhost worker of each queue pair
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

``vm`` is the libvirt domain, else QEMU's -name, else "".
"""

from __future__ import annotations

from vhostorch.check.ids import KICK
from vhostorch.check.report import STATUSES, DomainTarget, JudgedNic, QemuTarget
from vhostorch.record import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

    from vhostorch.check.report import Check, Report

PREFIX = "vhostorch_"
FORMATS = ("openmetrics", "prometheus")


def _escape(value: object) -> str:
    # Label values, in both formats: backslash, double quote and line feed are escaped.
    text = "" if value is None else str(value)
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(pairs: Sequence[tuple[str, object]]) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


class _Family:
    """One metric family; ``suffix`` is what every sample's name adds (``_total`` for a
    counter), which the classic format's HELP and TYPE name too and OpenMetrics' do not."""

    def __init__(self, name: str, kind: str, help: str, suffix: str = "") -> None:
        self.name = PREFIX + name
        self.kind = kind
        self.help = help
        self.suffix = suffix
        self.samples: list[str] = []

    def add(self, labels: Sequence[tuple[str, object]], value: float) -> None:
        where = _labels(labels) if labels else ""
        self.samples.append(f"{self.name}{self.suffix}{where} {_number(value)}")

    def text(self, form: str) -> list[str]:
        name = self.name + (self.suffix if form == "prometheus" else "")
        return [f"# HELP {name} {self.help}", f"# TYPE {name} {self.kind}", *self.samples]


def vm_name(report: Report) -> str:
    target = report.target
    if isinstance(target, QemuTarget):
        return target.domain or target.name or ""
    return target.domain if isinstance(target, DomainTarget) else ""


def render(reports: Sequence[Report], duration: float, form: str = "openmetrics") -> str:
    """The metrics text of ``reports``, checked in ``duration`` seconds, in ``form`` (one of
    FORMATS)."""
    if form not in FORMATS:
        raise ValueError(f"no metrics format {form!r}")
    status = _Family(
        "check_status",
        "gauge",
        "Verdict of a vhostorch check: 1 for its status (pass, warn, fail, unknown), 0 for the "
        "others.",
    )
    reason = _Family(
        "nic_vhost_reason",
        "gauge",
        "1 for a NIC that does not use vhost, or not fully; reason is a stable code.",
    )
    cpu = _Family(
        "vhost_worker_cpu_seconds",
        "counter",
        "CPU time (user and system) of the vhost worker thread serving a queue pair.",
        "_total",
    )
    vm_ok = _Family("vm_ok", "gauge", "1 when no check of this QEMU failed.")
    kicks = _Family(
        "vring_kicks",
        "counter",
        "Guest kicks of a virtqueue since vhost started it (its kick eventfd's count).",
        "_total",
    )
    avail = _Family("vring_last_avail_index", "gauge", "vhost's last_avail_idx of a virtqueue.")
    used = _Family("vring_last_used_index", "gauge", "vhost's last_used_idx of a virtqueue.")
    for report in reports:
        vm = vm_name(report)
        pid = "" if report.pid is None else report.pid
        for c in report.checks:
            where = (("vm", vm), ("pid", pid), ("nic", c.nic), ("queue", c.queue), ("check", c.id))
            for s in STATUSES:
                status.add((*where, ("status", s)), 1 if c.status == s else 0)
            _vring(c, where[:4], kicks, avail, used)
        for nic in report.nics:
            if not isinstance(nic, JudgedNic):
                continue  # not applicable: no reason, no worker
            if nic.reason is not None:
                reason.add(
                    (("vm", vm), ("pid", pid), ("nic", nic.name), ("reason", nic.reason.code)), 1
                )
            for w in nic.workers:
                if w.cpu_seconds is None:
                    continue  # a worker whose CPU time could not be read has no sample
                worker = (
                    ("vm", vm), ("pid", pid), ("nic", nic.name),
                    ("queue_pair", w.queue_pair), ("tid", w.tid),
                )  # fmt: skip
                cpu.add(worker, float(w.cpu_seconds))
        vm_ok.add((("vm", vm), ("pid", pid)), 1 if report.ok() else 0)
    vms = _Family("check_vms", "gauge", "QEMU processes this check looked at.")
    vms.add((), len(reports))
    took = _Family("check_duration_seconds", "gauge", "How long vhostorch check took.")
    took.add((), round(duration, 6))
    lines = []
    for family in (status, reason, cpu, vm_ok, kicks, avail, used, vms, took):
        if family.samples or family not in (kicks, avail, used):
            lines += family.text(form)
    return "\n".join(lines) + ("\n# EOF\n" if form == "openmetrics" else "\n")


def _vring(
    c: Check, where: Sequence[tuple[str, object]], kicks: _Family, avail: _Family, used: _Family
) -> None:
    """A live nic.kick's kick count and ring indices as samples (check.live's evidence)."""
    evidence = c.evidence or {}
    if c.id != KICK or evidence.get("source") != "live":
        return
    count = evidence.get("kick")
    if isinstance(count, dict) and isinstance(count.get("count"), int):
        kicks.add(where, count["count"])
    ring = evidence.get("ring")
    if isinstance(ring, dict):
        for family, key in ((avail, "last_avail_idx"), (used, "last_used_idx")):
            if isinstance(ring.get(key), int):
                family.add(where, ring[key])
