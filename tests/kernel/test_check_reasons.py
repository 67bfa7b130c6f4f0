"""Why vhost is not used (check.reasons) and the metrics output (OpenMetrics, and the classic
Prometheus text format node_exporter's textfile collector reads), on this machine's real QEMUs
and libvirt domains.

This machine has no /dev/vhost-net, so what is real here: libvirt could not open it
(a type='kvm' domain without <driver>), vhost not requested (vhost=off, a type='qemu'
domain, <driver name='qemu'/>), and the device missing when libvirtd's log says
nothing. The MSI-X, irqchip and fallback reasons need vhost: test_reasons_testhost.py.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import time
from typing import Any

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.parser import text_string_to_metric_families as classic_families

from tests.support import kernel
from tests.support.domains import domain, domain_xml, plain_qemu, tap, wait_for_tap_fd
from tests.support.kernel import vhostorch
from vhostorch.check import metrics, observe, targets, verify
from vhostorch.check.report import Worker
from vhostorch.libvirt import connection, domxml

NO_VHOST_NET = not os.path.exists("/dev/vhost-net")
needs_no_vhost_net = pytest.mark.skipif(
    not NO_VHOST_NET, reason="needs a host without /dev/vhost-net (as this one)"
)


def reasons(report: dict[str, Any]) -> dict[str, dict[str, Any] | None]:
    return {nic["name"]: nic["reason"] for nic in report["nics"]}


# Each format read by prometheus_client's parser for it: the OpenMetrics one (strict: a
# sample outside its family, a missing # EOF, is an error) and the classic text format's
# (which, as node_exporter's expfmt, makes a sample named unlike every TYPE'd family a
# family of its own, untyped).
PARSERS = {"openmetrics": text_string_to_metric_families, "prometheus": classic_families}


def parse(text: str, form: str) -> dict[str, Any]:
    families = {f.name: f for f in PARSERS[form](text)}
    assert len(families) == 9 and set(metrics.FORMATS) == set(PARSERS), sorted(families)
    return families


def scrape(*argv: str, form: str = "openmetrics") -> tuple[int, dict[str, Any]]:
    """``vhostorch check ARGV --format FORM``, parsed by prometheus_client's parser for it."""
    done = vhostorch("check", *argv, "--format", form)
    assert done.stdout.endswith("# EOF\n") == (form == "openmetrics"), done.stderr
    return done.returncode, parse(done.stdout, form)


@needs_no_vhost_net
def test_libvirt_that_could_not_open_vhost_net_is_the_reason(libvirtd: str) -> None:
    name = kernel.unique("vho-t-")
    with tap() as dev, domain(libvirtd, domain_xml(name, "kvm", dev, "")):
        done = vhostorch("check", "--domain", name, "--json")
        assert done.returncode == 1, done.stderr
        why = reasons(json.loads(done.stdout))["net0"]
        assert why is not None and why["code"] == "libvirt-open-failed", why
        # The warning libvirtd wrote in its own log (not the domain's) for this start.
        (line,) = why["evidence"]["lines"]
        assert "Unable to open vhost-net. Opened so far 0, requested 1" in line
        assert why["evidence"]["log"] == observe.LIBVIRTD_LOG
        assert why["evidence"]["device"]["exists"] is False
        assert "this host has no /dev/vhost-net" in why["message"]
        text = vhostorch("check", "--domain", name).stdout
        assert "net0: vhost not used (libvirt-open-failed): libvirt could not open" in text
        # --all finds the same reason from the command line alone (no domain XML).
        every = json.loads(vhostorch("check", "--all", "--json").stdout)
        mine = next(r for r in every["reports"] if r["target"]["name"] == name)
        assert reasons(mine)["net0"]["code"] == "libvirt-open-failed"  # type: ignore[index]
        # And the metrics say it with a reason label.
        _, families = scrape("--domain", name)
        (sample,) = families["vhostorch_nic_vhost_reason"].samples
        assert sample.labels == {
            "vm": name, "pid": str(mine["target"]["pid"]), "nic": "net0",
            "reason": "libvirt-open-failed",
        } and sample.value == 1  # fmt: skip


@needs_no_vhost_net
def test_without_libvirtds_warning_the_missing_device_is_the_reason(
    libvirtd: str, tmp_path: pathlib.Path
) -> None:
    """libvirtd's log rotated away (or log_outputs elsewhere): the device facts still tell."""
    name = kernel.unique("vho-t-")
    empty = tmp_path / "libvirtd.log"
    empty.write_text("")
    with tap() as dev, domain(libvirtd, domain_xml(name, "kvm", dev, "")):
        pid = observe.domain_pid(name)
        xml = domxml.parse(connection.domain_xml(name, libvirtd))
        obs = observe.observe(pid, domain=xml, libvirtd_log=observe.LibvirtdLog(str(empty)))
        report = verify.verify(obs).to_json()
        why = reasons(report)["net0"]
        assert why is not None and why["code"] == "vhost-net-missing", why
        assert why["evidence"]["device"]["exists"] is False
        assert why["evidence"]["device"]["module_loaded"] is False


@pytest.mark.parametrize(
    ("kind", "driver", "evidence"),
    [
        ("qemu", "<driver name='vhost'/>", {"domain_type": "qemu", "domain_driver": "vhost"}),
        ("kvm", "<driver name='qemu'/>", {"domain_driver": "qemu"}),
    ],
)
def test_a_domain_that_does_not_ask_for_vhost(
    libvirtd: str, kind: str, driver: str, evidence: dict[str, str]
) -> None:
    name = kernel.unique("vho-t-")
    with tap() as dev, domain(libvirtd, domain_xml(name, kind, dev, driver)):
        report = json.loads(vhostorch("check", "--domain", name, "--json").stdout)
        why = reasons(report)["net0"]
        assert why is not None and why["code"] == "not-requested", why
        assert evidence.items() <= why["evidence"].items()


@pytest.mark.parametrize(("vhost", "says"), [("off", "(vhost=off)"), (None, "(no vhost=on)")])
def test_a_qemu_whose_netdev_does_not_ask_for_vhost(vhost: str | None, says: str) -> None:
    with tap() as dev, plain_qemu(dev, vhost) as pid:
        report = json.loads(vhostorch("check", "--pid", str(pid), "--json").stdout)
        why = reasons(report)["net0"]
        assert why is not None and why["code"] == "not-requested"
        assert says in why["message"] and why["evidence"]["vhost"] == (
            False if vhost == "off" else None
        )


def test_openmetrics_says_what_the_json_says(libvirtd: str) -> None:
    """Every check of every QEMU is one series per status, exactly one of them 1."""
    name = kernel.unique("vho-t-")
    with (
        tap() as dev,
        tap() as other,
        plain_qemu(other, "off") as pid,
        domain(libvirtd, domain_xml(name, "kvm", dev, "")),
    ):
        every = json.loads(vhostorch("check", "--all", "--json").stdout)
        code, families = scrape("--all")
        assert code == 1  # the exit code is the check's, whatever the format
        assert set(families) == {
            "vhostorch_check_status", "vhostorch_nic_vhost_reason",
            "vhostorch_vhost_worker_cpu_seconds", "vhostorch_vhost_worker_info",
            "vhostorch_vhost_worker_last_cpu", "vhostorch_vm_ok", "vhostorch_check_vms",
            "vhostorch_check_duration_seconds", "vhostorch_check_last_run_timestamp_seconds",
        }  # fmt: skip
        assert families["vhostorch_vhost_worker_cpu_seconds"].type == "counter"
        status: dict[tuple[str, ...], dict[str, float]] = {}
        for s in families["vhostorch_check_status"].samples:
            key = (s.labels["pid"], s.labels["check"], s.labels["nic"], s.labels["queue"])
            status.setdefault(key, {})[s.labels["status"]] = s.value
        for report in every["reports"]:
            pid_label = str(report["target"]["pid"])
            for c in report["checks"]:
                queue = "" if c["queue"] is None else str(c["queue"])
                got = status.pop((pid_label, c["id"], c["nic"] or "", queue))
                assert got == {s: float(s == c["status"]) for s in ("pass", "warn", "fail",
                                                                    "unknown")}  # fmt: skip
        assert status == {}  # no series the JSON does not have
        by_reason = {
            s.labels["pid"]: s.labels["reason"]
            for s in families["vhostorch_nic_vhost_reason"].samples
        }
        assert by_reason[str(pid)] == "not-requested"
        (vms,) = families["vhostorch_check_vms"].samples
        assert vms.value == len(every["reports"])
        (took,) = families["vhostorch_check_duration_seconds"].samples
        assert 0 < took.value < 30 and math.isfinite(took.value)
        (finished,) = families["vhostorch_check_last_run_timestamp_seconds"].samples
        assert abs(finished.value - time.time()) < 60
        oks = {s.labels["pid"]: s.value for s in families["vhostorch_vm_ok"].samples}
        assert oks[str(pid)] == 0
        # --pid gives the one QEMU's series only.
        _, one = scrape("--pid", str(pid))
        assert {s.labels["pid"] for s in one["vhostorch_check_status"].samples} == {str(pid)}


def one_status_each(families: dict[str, Any], every: dict[str, Any]) -> None:
    """Every check of every report in ``every`` (check --all --json) is four status series,
    exactly one of them 1 (its verdict); and no series the JSON does not have."""
    status: dict[tuple[str, ...], dict[str, float]] = {}
    for s in families["vhostorch_check_status"].samples:
        key = (s.labels["pid"], s.labels["check"], s.labels["nic"], s.labels["queue"])
        assert s.labels["status"] not in status.setdefault(key, {}), s  # no series twice
        status[key][s.labels["status"]] = s.value
    for report in every["reports"]:
        for c in report["checks"]:
            queue = "" if c["queue"] is None else str(c["queue"])
            got = status.pop((str(report["target"]["pid"]), c["id"], c["nic"] or "", queue))
            assert got == {s: float(s == c["status"]) for s in ("pass", "warn", "fail",
                                                                "unknown")}  # fmt: skip
    assert status == {}


def thread_cpu_seconds(pid: int, tid: int) -> float:
    fields = pathlib.Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@pytest.mark.parametrize("form", ["prometheus", "openmetrics"])
def test_each_metrics_format_types_the_counter_for_its_parser(form: str) -> None:
    """--format prometheus for node_exporter's textfile collector (classic text format 0.0.4),
    --format openmetrics for OpenMetrics scrapers: each read by its own parser, on real QEMUs,
    types the worker CPU counter ``counter`` and gives every check one status series at 1."""
    with tap() as one, tap() as two, plain_qemu(one, "off") as pid, plain_qemu(two, None):
        every = json.loads(vhostorch("check", "--all", "--json").stdout)
        code, families = scrape("--all", form=form)
        assert code == (0 if every["ok"] else 1)
        assert {str(pid)} <= {str(r["target"]["pid"]) for r in every["reports"]}
        one_status_each(families, every)
        cpu = families["vhostorch_vhost_worker_cpu_seconds"]
        assert cpu.type == "counter" and not any(f.endswith("_total") for f in families)
        # This machine has no /dev/vhost-net, so no QEMU here has a vhost worker: the same
        # QEMU's report as a vhost-net host gives it (a worker per queue pair; one of the
        # QEMU's own threads stands in for it) puts a sample in the counter family, which
        # stays the one family of that name, typed counter, in the classic parser too.
        (report,) = targets.reports(targets.Target(pid=pid))
        tid = max(int(t) for t in os.listdir(f"/proc/{pid}/task"))
        cpu_time = thread_cpu_seconds(pid, tid)
        worker = Worker(0, 99, tid, cpu_time, "fd order")
        nics = tuple(n.replace(workers=(worker,)) for n in report.nics)
        text = metrics.render([report.replace(nics=nics)], 0.5, form)
        cpu = parse(text, form)["vhostorch_vhost_worker_cpu_seconds"]
        assert cpu.type == "counter", text
        (sample,) = cpu.samples
        assert sample.name == "vhostorch_vhost_worker_cpu_seconds_total"
        assert sample.labels == {"vm": metrics.vm_name(report), "pid": str(pid),
                                 "nic": "net0", "queue_pair": "0", "tid": str(tid)}  # fmt: skip
        assert sample.value == worker.cpu_seconds
        counter_lines = [ln for ln in text.splitlines() if "vhost_worker_cpu_seconds" in ln]
        typed = "vhostorch_vhost_worker_cpu_seconds" + ("_total" if form == "prometheus" else "")
        assert counter_lines[1] == f"# TYPE {typed} counter"


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--all", "--format", "yaml"], "one of table, json, openmetrics, prometheus"),
        (["--all", "--json", "--format", "openmetrics"], "contradict"),
        (["--all", "--watch", "5", "--format", "openmetrics"], "--watch prints changes"),
        (["--all", "--watch", "5", "--format", "prometheus"], "not metrics (--format prometheus)"),
        (["--all", "--json", "--format", "prometheus"], "contradict"),
    ],
)
def test_bad_format_is_a_one_line_refusal(argv: list[str], error: str) -> None:
    done = vhostorch("check", *argv)
    assert done.returncode == 2 and error in done.stderr
    # Nothing on stdout, but with --json the error object.
    assert done.stdout == "" or json.loads(done.stdout)["ok"] is False


def test_libvirtds_warning_goes_only_to_a_qemu_libvirt_started(tmp_path: pathlib.Path) -> None:
    """libvirtd's warning names no domain and is matched by time: a QEMU started by hand
    next to libvirtd starting another domain must not be given it (seen in the test host).
    virtqemud's log is read as libvirtd's."""
    with tap() as dev:
        proc = subprocess.Popen(
            [
                "qemu-system-x86_64", "-S", "-M", "pc", "-m", "32", "-nodefaults", "-display",
                "none", "-name", "guest=byhand", "-netdev",
                f"tap,id=n0,ifname={dev},script=no,downscript=no,vhost=off",
                "-device", "virtio-net-pci,netdev=n0,id=net0",
            ],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_for_tap_fd(proc.pid, dev)
            started = observe.boot_time() + observe.procfs.read(proc.pid).start_ticks / os.sysconf(
                "SC_CLK_TCK"
            )
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(started))
            log = tmp_path / "libvirtd.log"
            log.write_text(
                f"{stamp}.000+0000: 4242: warning : qemuInterfaceOpenVhostNet:762 : "
                "Unable to open vhost-net. Opened so far 0, requested 1\n"
            )
            pids = tmp_path / "pids"
            pids.mkdir()
            seen = observe.observe(
                proc.pid, libvirtd_log=observe.LibvirtdLog(str(log)), pid_dir=str(pids)
            )
            assert seen.logs is not None and seen.logs.libvirtd_lines == ()
            # The same QEMU, had libvirt started it as domain byhand: the warning is its.
            (pids / "byhand.pid").write_text(f"{proc.pid}\n")
            seen = observe.observe(
                proc.pid, libvirtd_log=observe.LibvirtdLog(str(log)), pid_dir=str(pids)
            )
            assert seen.logs is not None and len(seen.logs.libvirtd_lines) == 1
            assert seen.logs.libvirtd_log == str(log)
            # Under the modular daemons the warning is virtqemud's, in its own log, with no
            # libvirtd log at all. Constructed: no Debian release packages virtqemud (12, 13
            # and sid ship only libvirtd), so no test here can make it write one.
            modular = tmp_path / "virtqemud.log"
            log.rename(modular)
            both = observe.LibvirtdLog(str(log), str(modular))
            seen = observe.observe(proc.pid, libvirtd_log=both, pid_dir=str(pids))
            assert seen.logs is not None and len(seen.logs.libvirtd_lines) == 1
            assert seen.logs.libvirtd_log == str(modular)
            # Neither log readable: no line, and no error (nothing can be said from logs).
            modular.unlink()
            none = observe.LibvirtdLog(str(log), str(modular))
            seen = observe.observe(proc.pid, libvirtd_log=none, pid_dir=str(pids))
            assert seen.logs is not None and seen.logs.libvirtd_lines == ()
        finally:
            proc.kill()  # the QEMU this test started
            proc.wait()
