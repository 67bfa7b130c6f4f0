"""Golden outputs of the check's verdicts, as virt-manager keeps golden in/out pairs.

Each recorded observation (tests/fixtures/observations) is replayed through the real
``observe`` and ``verify``, and its report rendered in every ``check --format`` (table,
plain and --strict; json; prometheus; openmetrics) is compared byte for
byte with tests/fixtures/verdicts/<name>[-<variant>]-out.<format>. They were captured
before the verdicts were typed, so they prove a change to the verdicts' types is
output-neutral. A host report (doctor) and an uninspectable domain (the hook) are built
by hand, as their facts are this host's. ``VHOSTORCH_REGOLD=1`` rewrites the files.

And the JSON is the shape the README documents:
``{"ok", "target", "nics", "checks": [{"id", "nic", "queue", "status", "message", "evidence"}]}``.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import re
from contextlib import redirect_stdout

import pytest

from tests.support import observations
from vhostorch.check import metrics, verify
from vhostorch.check.ids import HOST_KVM, VM_INSPECT
from vhostorch.check.report import FAIL, PASS, UNKNOWN, Check, DomainTarget, HostTarget, Report
from vhostorch.cli import check
from vhostorch.cli.argv import Parsed
from vhostorch.cli.output import report_text
from vhostorch.qemu import args

GOLDEN = pathlib.Path(__file__).parents[2] / "fixtures" / "verdicts"
README = pathlib.Path(__file__).parents[3] / "README.md"
RECORDED = observations.RECORDED
FINISHED = 1_767_225_600.0  # the check's end in the metrics: 2026-01-01 00:00 UTC


def rendered(report: Report) -> dict[str, str]:
    """``report`` in every format ``check`` prints, as ``check`` prints it."""
    out = {
        "table": report_text(report, False) + "\n",
        "strict.table": report_text(report, True) + "\n",
        "json": json.dumps(report.to_json(), indent=2) + "\n",
    }
    for form in metrics.FORMATS:
        out[form] = metrics.render([report], 0.25, form, finished=FINISHED)
    return out


def compare(stem: str, report: Report, root: pathlib.Path | None = None) -> None:
    for form, text in rendered(report).items():
        if root is not None:  # a log's path names the replay's directory
            text = text.replace(str(root), "<root>")
        path = GOLDEN / f"{stem}-out.{form}"
        if os.environ.get("VHOSTORCH_REGOLD"):
            path.write_text(text)
        assert text == path.read_text(), f"{path.name} changed"
    strict = report.to_json(True)  # --strict changes "ok" alone
    assert strict == {**report.to_json(), "ok": report.ok(True)}


@pytest.mark.parametrize(("name", "suffix", "monitor", "trace"), observations.REPLAYS)
def test_recorded_verdicts_render_as_before(
    name: str, suffix: str, monitor: bool, trace: bool, tmp_path: pathlib.Path
) -> None:
    obs = observations.observed(name, tmp_path, monitor=monitor, trace=trace)
    compare(name + suffix, verify.verify(obs), tmp_path)


def test_a_stopped_qemu_with_nics_not_applicable_renders_as_before(
    tmp_path: pathlib.Path,
) -> None:
    # The recorded command line with a vhost-user NIC and an e1000 added (constructed: they
    # are listed, never judged), as a QEMU stopped by a signal.
    obs = observations.observed("healthy-1q", tmp_path)
    argv = [
        *obs.process.argv, "-nic", "user,model=e1000",
        "-chardev", "socket,id=c0,path=/run/vu.sock", "-netdev", "vhost-user,id=vu,chardev=c0",
        "-device", "virtio-net-pci,netdev=vu,id=nvu",
    ]  # fmt: skip
    obs = obs.replace(args=args.parse(argv), stopped="T (stopped)")
    compare("mixed-stopped", verify.verify(obs), tmp_path)


def host_report() -> Report:
    checks = (
        Check("host.vhost-net", PASS, "/dev/vhost-net exists (vhost_net)", {"module": "vhost_net"}),
        Check(HOST_KVM, FAIL, "/dev/kvm is missing", {}),
    )
    return Report(HostTarget("h1", "6.1.0-57-amd64"), (), checks)


def domain_report() -> Report:
    unknown = Check(VM_INSPECT, UNKNOWN, "unknown: no QEMU process for domain d1")
    return Report(DomainTarget("d1"), (), (unknown,))


@pytest.mark.parametrize("stem", ["host", "domain"])
def test_host_and_domain_reports_render_as_before(stem: str) -> None:
    compare(stem, host_report() if stem == "host" else domain_report())


def test_check_all_json_wraps_the_reports(tmp_path: pathlib.Path) -> None:
    reports = [verify.verify(observations.observed(n, tmp_path / n)) for n in RECORDED[:2]]
    args = Parsed(check.COMMANDS[0], {"all": True, "json": True})
    out = io.StringIO()
    with redirect_stdout(out):
        check._print_reports(reports, args)
    data = json.loads(out.getvalue())
    assert list(data) == ["ok", "reports"]
    assert data["reports"] == [json.loads(json.dumps(r.to_json())) for r in reports]


def documented_keys() -> tuple[list[str], list[str]]:
    """The report's and a check's keys, as the README's JSON example shows them."""
    text = " ".join(README.read_text().split())  # the sentence wraps
    found = re.search(r'`\{"ok", "target", "nics", "checks": \[\{([^]]*)\}\]\}`', text)
    assert found, "the README no longer documents the JSON shape"
    check = [k.strip().strip('"') for k in found.group(1).split(",")]
    return ["ok", "target", "nics", "checks"], check


@pytest.mark.parametrize("name", RECORDED)
def test_json_has_the_documented_shape(name: str, tmp_path: pathlib.Path) -> None:
    report_keys, check_keys = documented_keys()
    for report in (verify.verify(observations.observed(name, tmp_path)), host_report()):
        data = json.loads(json.dumps(report.to_json()))
        assert list(data) == report_keys
        assert isinstance(data["ok"], bool) and isinstance(data["target"], dict)
        assert all(isinstance(nic, dict) and "name" in nic for nic in data["nics"])
        for one in data["checks"]:
            assert list(one) == check_keys
            assert one["status"] in ("pass", "warn", "fail", "unknown")
            assert isinstance(one["evidence"], dict)
