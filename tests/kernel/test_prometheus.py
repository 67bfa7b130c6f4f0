"""The metrics path end to end with Debian's real components: the metrics timer's command (its
unit's ExecStart) writes the textfile for a real broken QEMU on this machine, Debian's
node_exporter serves it, Debian's Prometheus scrapes it every second with the shipped alerting
rules unmodified, and its HTTP API returns the series and the alert; then, with the QEMU gone
and the command run again, the series goes and the alert resolves.

The broken VM: libvirt's silent fallback. This machine has no /dev/vhost-net, and a
type='kvm' domain with no <driver> starts without vhost, libvirtd only logging it (its NIC
not on vhost: reason libvirt-open-failed, failing checks). The rules' `for:` (three
minutes: a file refreshed every minute must agree three runs in a row) is waited out, so the
test takes about four minutes and is marked slow. Last, the file is removed, as when the check
stops reporting, and VhostorchCheckStale is pending.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import kernel, prometheus
from tests.support.domains import domain, domain_xml, tap, wait_for_tap_fd
from tests.support.kernel import EXE
from vhostorch.check import observe

pytestmark = pytest.mark.kernel

# What libvirt's silent fallback is reported as: libvirtd's log says it could not open
# /dev/vhost-net, or (the log rotated away) the device is missing.
REASONS = ("libvirt-open-failed", "vhost-net-missing")
FOR = 180  # the rules' `for:` of VhostorchNicNotOnVhost and VhostorchCheckFailed


def write_textfile(directory: Path) -> None:
    done = subprocess.run(
        prometheus.timer_command(EXE, str(directory)), capture_output=True, text=True, timeout=120
    )
    # 1: a VM's check failed, which the file reports (the unit's SuccessExitStatus=1).
    assert done.returncode in (0, 1), done.stderr
    assert (directory / prometheus.TEXTFILE).stat().st_mode & 0o777 == 0o644


def stale(stack: prometheus.Stack) -> list[dict[str, Any]]:
    return [a for a in stack.alerts() if a["labels"]["alertname"] == "VhostorchCheckStale"]


def ours(alerts: list[dict[str, Any]], name: str, pid: int) -> list[dict[str, Any]]:
    return [
        a for a in alerts if a["labels"]["alertname"] == name and a["labels"].get("pid") == str(pid)
    ]


@pytest.mark.slow
def test_prometheus_scrapes_the_timers_file_and_alerts_on_a_nic_not_on_vhost(libvirtd: str) -> None:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vhoprom-") as tmp:
        work = Path(tmp)
        textfiles = work / "textfile"
        textfiles.mkdir()
        stack = prometheus.Stack(work, textfiles)
        with stack.running():
            name = kernel.unique("vhoprom-")
            with tap() as dev, domain(libvirtd, domain_xml(name, "kvm", dev, "")):
                pid = observe.domain_pid(name)
                wait_for_tap_fd(pid, dev)
                write_textfile(textfiles)
                series = f'vhostorch_nic_vhost_reason{{vm="{name}"}}'
                [found] = prometheus.wait_until("the series", lambda: stack.query(series), 30)
                assert found["metric"]["reason"] in REASONS and found["metric"]["pid"] == str(pid)
                assert found["metric"]["nic"] == "net0" and found["value"][1] == "1", found
                failing = stack.query(f'vhostorch_check_status{{pid="{pid}",status="fail"}} == 1')
                assert failing, "a failing check of the QEMU"
                # Pending at once (the rules matched the real series), firing after `for:`.
                [pending] = prometheus.wait_until(
                    "the alert pending",
                    lambda: ours(stack.alerts(), "VhostorchNicNotOnVhost", pid),
                    30,
                )
                assert pending["state"] == "pending", pending
                assert pending["labels"]["severity"] == "warning"
                reason = found["metric"]["reason"]
                assert pending["annotations"]["summary"] == (
                    f"VM {name} (pid {pid}): NIC net0 does not use vhost-net ({reason})"
                )
                # The file is served as written: no run is needed while the alert waits.
                [firing] = prometheus.wait_until(
                    "the alert firing",
                    lambda: [
                        a
                        for a in ours(stack.alerts(), "VhostorchNicNotOnVhost", pid)
                        if a["state"] == "firing"
                    ],
                    FOR + 30,
                )
                assert firing["labels"]["reason"] == reason, firing
                # The README's example has this alert's shape.
                shown = prometheus.readme_alert()
                assert set(shown) == set(firing) and shown["state"] == "firing"
                assert set(shown["labels"]) == set(firing["labels"]), firing["labels"]
                assert set(shown["annotations"]) == set(firing["annotations"])
                assert firing["value"] == shown["value"], firing
                failed = ours(stack.alerts(), "VhostorchCheckFailed", pid)
                assert {a["labels"]["check"] for a in failed} >= {
                    c["metric"]["check"] for c in failing
                }, failed
            # The domain is gone: the next run's file has no series of it, and the alerts go.
            write_textfile(textfiles)
            prometheus.wait_until(
                "the series gone", lambda: not stack.query(series), 30, work / "prometheus.log"
            )
            prometheus.wait_until(
                "the alerts resolved",
                lambda: not [a for a in stack.alerts() if a["labels"].get("pid") == str(pid)],
                30,
            )
            # The check stops reporting (its file gone): VhostorchCheckStale is pending at
            # once for this node_exporter, from the hour it did report (firing after `for:`).
            assert not stale(stack), "the check reports"
            (textfiles / prometheus.TEXTFILE).unlink()
            [silent] = prometheus.wait_until("the stale alert", lambda: stale(stack), 30)
            assert silent["state"] == "pending", silent
            assert silent["labels"]["instance"] == f"127.0.0.1:{stack.node_port}", silent
    print(f"real Prometheus test: {time.monotonic() - started:.0f} s")


def test_the_hardened_service_reports_what_a_plain_root_run_does(libvirtd: str) -> None:
    """The unit's sandboxing (its capability bounding set and no_new_privs), reproduced
    without systemd as PID 1 (this machine has none: `systemd-run -p` cannot be used), takes
    nothing check reads; a private mount namespace, which ProtectSystem= and its kin would
    give the service, does. The VM is libvirt's silent fallback: a type='kvm' domain with no
    <driver>, started without vhost-net (this machine has none), its QEMU libvirt's user's in
    libvirt's mount namespace, its tap opened by libvirtd. One domain, not --all: other
    tests' VMs come and go between two runs."""
    name = kernel.unique("vhoprom-")
    with (
        tempfile.TemporaryDirectory(prefix="vhoprom-") as textfiles,
        tap() as dev,
        domain(libvirtd, domain_xml(name, "kvm", dev, "")),
    ):
        argv = [EXE, "check", "--domain", name, "--json"]
        plain = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        report = json.loads(plain.stdout)
        assert report["nics"][0]["reason"]["code"] in REASONS
        assert report["nics"][0]["tap"] == dev, report["nics"]
        hardened = subprocess.run(
            prometheus.hardened_argv(argv), capture_output=True, text=True, timeout=120
        )
        assert hardened.returncode == plain.returncode == 1, hardened.stderr
        assert json.loads(hardened.stdout) == report
        # The service's first command, as written (after its "-"), sandboxed: no pin is
        # recorded for this domain, so there is nothing to apply and nothing fails.
        [pre] = prometheus.unit_values(prometheus.SERVICE, "ExecStartPre")
        words = shlex.split(pre.lstrip("-"))
        assert words[:3] == ["vhostorch", "pin", "--reapply"], words
        first = subprocess.run(
            prometheus.hardened_argv([EXE, *words[1:]]), capture_output=True, text=True
        )
        assert first.returncode == 0 and first.stderr == "", first
        # The timer's own command line, sandboxed, writes its file.
        timer = prometheus.hardened_argv(prometheus.timer_command(EXE, textfiles))
        done = subprocess.run(timer, capture_output=True, text=True, timeout=120)
        assert done.returncode in (0, 1), done.stderr
        written = Path(textfiles, prometheus.TEXTFILE).read_text()
        samples = [s for f in text_string_to_metric_families(written) for s in f.samples]
        assert [
            s.labels["reason"]
            for s in samples
            if s.name == "vhostorch_nic_vhost_reason" and s.labels["vm"] == name
        ] == [report["nics"][0]["reason"]["code"]], written
        # The sandbox is there: capabilities are the bounding set's.
        caps = prometheus.hardened_argv(["grep", "CapEff", "/proc/self/status"])
        effective = int(subprocess.run(caps, capture_output=True, text=True).stdout.split()[1], 16)
        assert effective == 0xC000A85006, hex(effective)  # the unit's ten capabilities
        # In a mount namespace of its own (what ProtectSystem= and its kin give a service),
        # check still tells the domain's tap, whose fd libvirtd opened on a mount only the
        # host's namespace has: it reads PID 1's mounts too. It said "?" and failed
        # nic.tap.fds before.
        private = ["unshare", "-m", "--propagation", "private", *argv]
        elsewhere = json.loads(subprocess.run(private, capture_output=True, text=True).stdout)
        assert elsewhere == report
