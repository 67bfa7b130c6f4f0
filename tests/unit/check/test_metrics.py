"""The metrics text (check.metrics) as Prometheus reads it: every recorded observation's
report, in both formats, read back by prometheus_client's parsers (the classic text
format's, which node_exporter's expfmt resembles, for both; the strict OpenMetrics one for
``openmetrics``), says what the report says: the families the module docstring lists, one
status series at 1 per check, a worker's placement, the time the check finished.
"""

from __future__ import annotations

import math
import pathlib
from typing import Any

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics
from prometheus_client.parser import text_string_to_metric_families as classic

from tests.support import observations
from vhostorch.check import metrics, verify
from vhostorch.check.report import STATUSES, JudgedNic, QemuTarget, Report, Worker

FINISHED = 1_767_225_600.125
ALWAYS = {
    "vhostorch_check_status": "gauge",
    "vhostorch_nic_vhost_reason": "gauge",
    "vhostorch_vhost_worker_cpu_seconds": "counter",
    "vhostorch_vhost_worker_info": "gauge",
    "vhostorch_vhost_worker_last_cpu": "gauge",
    "vhostorch_vm_ok": "gauge",
    "vhostorch_check_vms": "gauge",
    "vhostorch_check_duration_seconds": "gauge",
    "vhostorch_check_last_run_timestamp_seconds": "gauge",
}
LIVE = {
    "vhostorch_vring_kicks": "counter",
    "vhostorch_vring_last_avail_index": "gauge",
    "vhostorch_vring_last_used_index": "gauge",
}

Samples = set[tuple[str, tuple[tuple[str, str], ...], float]]


def read(text: str, form: str) -> list[tuple[dict[str, Any], Samples]]:
    """``text`` read by prometheus_client's classic parser and, for OpenMetrics, its
    OpenMetrics parser: for each, its families by name and all their samples."""
    parsers = [classic] + ([openmetrics] if form == "openmetrics" else [])
    out = []
    for parser in parsers:
        families = list(parser(text))
        samples = {(s.name, tuple(sorted(s.labels.items())), s.value)
                   for f in families for s in f.samples}  # fmt: skip
        out.append(({f.name: f for f in families}, samples))
    return out


def rendered(report: Report, form: str) -> str:
    return metrics.render([report], 0.25, form, finished=FINISHED)


def value(samples: Samples, name: str, **labels: str) -> list[float]:
    return [v for n, ls, v in samples if n == name and labels.items() <= dict(ls).items()]


@pytest.mark.parametrize(("name", "suffix", "monitor", "trace"), observations.REPLAYS)
def test_every_recorded_report_reads_back_from_both_formats(
    name: str, suffix: str, monitor: bool, trace: bool, tmp_path: pathlib.Path
) -> None:
    report = verify.verify(observations.observed(name, tmp_path, monitor=monitor, trace=trace))
    prometheus, (om_classic, om) = (
        read(rendered(report, f), f) for f in ("prometheus", "openmetrics")
    )
    ((families, samples),) = prometheus
    assert om[1] == samples and om_classic[1] == samples
    # Each format's own parser types the families alike (the classic parser given
    # OpenMetrics reads the counter's samples as a family of their own: docs/check.md).
    types = {n: f.type for n, f in families.items()}
    assert {n: f.type for n, f in om[0].items()} == types
    live = {n: t for n, t in LIVE.items() if n in types}
    assert types == {**ALWAYS, **live}
    vm, pid = metrics.vm_name(report), str(report.pid)
    for c in report.checks:
        where = {"vm": vm, "pid": pid, "nic": c.nic or "", "check": c.id}
        where["queue"] = "" if c.queue is None else str(c.queue)
        series = {s: value(samples, "vhostorch_check_status", **where, status=s) for s in STATUSES}
        assert series == {s: [1.0 if s == c.status else 0.0] for s in STATUSES}, c
    workers = [(n, w) for n in report.nics if isinstance(n, JudgedNic) for w in n.workers]
    assert len(value(samples, "vhostorch_vhost_worker_info")) == len(workers)
    for nic, w in workers:
        ids = {"vm": vm, "pid": pid, "nic": nic.name, "queue_pair": str(w.queue_pair)}
        ids["tid"] = str(w.tid)
        place = {k: v or "" for k, v in (("model", w.model), ("cgroup", w.cgroup),
                                         ("cpus", w.cpus))}  # fmt: skip
        assert value(samples, "vhostorch_vhost_worker_info", **ids, **place) == [1.0]
        cpu = value(samples, "vhostorch_vhost_worker_cpu_seconds_total", **ids)
        assert cpu == ([] if w.cpu_seconds is None else [w.cpu_seconds])
    assert value(samples, "vhostorch_vm_ok") == [1.0 if report.ok() else 0.0]
    assert value(samples, "vhostorch_check_vms") == [1.0]
    assert value(samples, "vhostorch_check_duration_seconds") == [0.25]
    assert value(samples, "vhostorch_check_last_run_timestamp_seconds") == [FINISHED]


def a_report(tmp_path: pathlib.Path) -> Report:
    """A recorded report with workers (two queue pairs)."""
    report = verify.verify(observations.observed("device-4q-tap-2q", tmp_path))
    assert any(isinstance(n, JudgedNic) and n.workers for n in report.nics)
    return report


def test_a_workers_placement_is_its_info_and_last_cpu(tmp_path: pathlib.Path) -> None:
    report = a_report(tmp_path)
    placed = Worker(0, 30, 175, 1.5, "fd order", "vhost_task", "/machine.slice/vm-1.scope",
                    "0-1,4", 3)  # fmt: skip
    unplaced = Worker(1, 31, 176, None, "fd order")  # nothing read: info of "", no last CPU
    nics = tuple(
        n.replace(workers=(placed, unplaced)) if isinstance(n, JudgedNic) and n.workers else n
        for n in report.nics
    )
    for form in metrics.FORMATS:
        for _, samples in read(rendered(report.replace(nics=nics), form), form):
            where = {"model": "vhost_task", "cgroup": "/machine.slice/vm-1.scope", "cpus": "0-1,4"}
            info = value(samples, "vhostorch_vhost_worker_info", queue_pair="0", tid="175", **where)
            assert info == [1.0]
            bare = value(samples, "vhostorch_vhost_worker_info", queue_pair="1", tid="176",
                         model="", cgroup="", cpus="")  # fmt: skip
            assert bare == [1.0]
            last = [(dict(ls)["tid"], v) for n, ls, v in samples
                    if n == "vhostorch_vhost_worker_last_cpu"]  # fmt: skip
            assert last == [("175", 3.0)]
            assert value(samples, "vhostorch_vhost_worker_cpu_seconds_total") == [1.5]


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ('say "hi"\\ \nbye', 'say "hi"\\ \nbye'),  # escaped by the format, read back as it was
        ("caf\udce9", "caf\ufffd"),  # a -name byte that is not UTF-8: U+FFFD in UTF-8 text
    ],
)
def test_a_vm_name_any_qemu_may_have_reads_back(
    name: str, label: str, tmp_path: pathlib.Path
) -> None:
    report = a_report(tmp_path)
    assert isinstance(report.target, QemuTarget)
    report = report.replace(target=report.target.replace(name=name, domain=None))
    for form in metrics.FORMATS:
        text = rendered(report, form)
        text.encode()  # UTF-8, as both formats are
        for _, samples in read(text, form):
            assert value(samples, "vhostorch_vm_ok", vm=label) == [0.0]


def test_the_finish_time_defaults_to_now(tmp_path: pathlib.Path) -> None:
    import time

    before = time.time()
    text = metrics.render([a_report(tmp_path)], 0.5, "prometheus")
    ((_, samples),) = read(text, "prometheus")
    (stamp,) = value(samples, "vhostorch_check_last_run_timestamp_seconds")
    assert before - 0.01 <= stamp <= time.time() + 0.01 and not math.isnan(stamp)


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="no metrics format 'yaml'"):
        metrics.render([], 0.0, "yaml")
