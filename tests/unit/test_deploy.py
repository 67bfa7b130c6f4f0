"""What deploy/ ships for operators: the metrics timer's two systemd units, as systemd-analyze
reads them, and the Prometheus alerting rules, as promtool reads and unit-tests them.

The units run in tests/kernel/test_prometheus.py (their ExecStart, against a real Prometheus);
here they are read and verified.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

from tests.support import prometheus
from tests.support.kernel import EXE
from tests.support.prometheus import SERVICE, TIMER, unit_values


def verify(*units: Path) -> subprocess.CompletedProcess[str]:
    # --man=no: no man pages here; verify loads each unit, checks every directive and that
    # ExecStart's program is an executable, and prints any complaint.
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *map(str, units)], capture_output=True, text=True
    )


def test_the_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    # The program as an absolute path: systemd-analyze looks for a bare `vhostorch` on
    # systemd's own path, where this checkout's virtualenv is not.
    service = tmp_path / SERVICE.name
    service.write_text(prometheus.with_program(SERVICE.read_text(), EXE))
    shutil.copy(TIMER, tmp_path / TIMER.name)
    done = verify(service, tmp_path / TIMER.name)
    assert done.returncode == 0 and done.stdout + done.stderr == "", done.stderr
    # The oracle bites: a bad value and a missing program are reported.
    broken = tmp_path / "broken"
    broken.mkdir()
    text = service.read_text().replace("NoNewPrivileges=yes", "NoNewPrivileges=perhaps")
    (broken / SERVICE.name).write_text(text.replace(f"ExecStart={EXE} ", "ExecStart=/nowhere "))
    (broken / TIMER.name).write_text(TIMER.read_text().replace("=1min", "=a while"))
    done = verify(broken / SERVICE.name, broken / TIMER.name)
    assert all(s in done.stderr for s in ("perhaps", "/nowhere", "a while")), done.stderr


def test_the_service_writes_check_all_into_node_exporters_textfile_directory() -> None:
    words = prometheus.timer_command("vhostorch", prometheus.TEXTFILE_DIR)
    assert words == [
        "vhostorch", "check", "--all", "--format", "prometheus",
        "--output", f"{prometheus.TEXTFILE_DIR}/{prometheus.TEXTFILE}",
    ]  # fmt: skip
    assert unit_values(SERVICE, "Type") == ["oneshot"]
    # Exit 1 is a VM's failed check, which the file reports; 2 leaves the unit failed.
    assert unit_values(SERVICE, "SuccessExitStatus") == ["1"]
    # What check needs of root stays: other users' /proc/PID/fd, setns, the BPF iterator.
    [caps] = unit_values(SERVICE, "CapabilityBoundingSet")
    needed = {"CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH", "CAP_SYS_ADMIN", "CAP_BPF", "CAP_PERFMON"}
    assert needed <= set(caps.split()), caps
    assert unit_values(SERVICE, "NoNewPrivileges") == ["yes"]
    # Nothing that gives it a mount namespace of its own, where check cannot tell the taps
    # libvirtd opened (the unit says why; tests/kernel/test_prometheus.py shows it).
    for key in ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "ReadWritePaths",
                "ProtectKernelTunables", "ProtectKernelLogs", "ProtectControlGroups",
                "ProtectHostname", "ProtectProc", "RestrictNamespaces"):  # fmt: skip
        assert not unit_values(SERVICE, key), f"{key}: see the unit's comment"
    assert unit_values(TIMER, "OnUnitActiveSec") == ["1min"]
    assert unit_values(TIMER, "WantedBy") == ["timers.target"]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)


def test_the_rules_pass_promtool_check_and_their_unit_tests(tmp_path: Path) -> None:
    done = promtool("check", "rules", str(prometheus.RULES))
    assert done.returncode == 0 and "SUCCESS: 4 rules found" in done.stdout, done.stdout
    done = promtool("test", "rules", str(prometheus.RULES_TEST))
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr
    # The oracle bites: a rule that matches nothing fails its unit test.
    shutil.copy(prometheus.RULES_TEST, tmp_path)
    text = prometheus.RULES.read_text()
    (tmp_path / prometheus.RULES.name).write_text(
        text.replace(
            "expr: vhostorch_nic_vhost_reason == 1", "expr: vhostorch_nic_vhost_reason == 2"
        )
    )
    done = promtool("test", "rules", str(tmp_path / prometheus.RULES_TEST.name))
    assert done.returncode == 1 and "alertname: VhostorchNicNotOnVhost" in done.stderr


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    rules = yaml.safe_load(prometheus.RULES.read_text())
    [group] = rules["groups"]
    assert group["name"] == "vhostorch"
    alerts = {r["alert"] for r in group["rules"]}
    assert alerts == {
        "VhostorchNicNotOnVhost", "VhostorchCheckFailed", "VhostorchWorkerOnVcpuCpu",
        "VhostorchCheckStale",
    }  # fmt: skip
    for rule in group["rules"]:
        assert rule["labels"]["severity"] in ("info", "warning", "critical"), rule
        assert {"summary", "description"} <= set(rule["annotations"]), rule
    fires: set[str] = set()
    quiet: set[str] = set()
    tests = yaml.safe_load(prometheus.RULES_TEST.read_text())
    assert tests["rule_files"] == [prometheus.RULES.name]
    for test in tests["tests"]:
        for case in test["alert_rule_test"]:
            (fires if case["exp_alerts"] else quiet).add(case["alertname"])
    assert fires == alerts, alerts - fires
    assert quiet == alerts, alerts - quiet


def test_the_readmes_alert_is_the_one_the_unit_test_expects() -> None:
    """Its labels and annotations are those promtool checks the rules render (the labels
    Prometheus adds aside); tests/kernel/test_prometheus.py compares its shape with a real one."""
    shown = prometheus.readme_alert()
    tests = yaml.safe_load(prometheus.RULES_TEST.read_text())["tests"]
    expected = [
        alert
        for test in tests
        for case in test["alert_rule_test"]
        if case["alertname"] == shown["labels"]["alertname"]
        for alert in case["exp_alerts"]
    ]
    labels = {k: v for k, v in shown["labels"].items() if k != "alertname"}
    assert {"exp_labels": labels, "exp_annotations": shown["annotations"]} in expected


def test_deploys_units_are_the_ansible_roles_files() -> None:
    """One source: deploy/systemd's units link to the role's files/ (which the collection
    ships; ansible-test allows no link out of it), so an operator and the role install the
    same text."""
    role = prometheus.ROOT / "ansible" / "roles" / "vhost_host" / "files"
    for unit in (SERVICE, TIMER):
        assert unit.is_symlink() and unit.resolve() == role / unit.name, unit
        assert not (role / unit.name).is_symlink()
