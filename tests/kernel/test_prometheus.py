"""The metrics path end to end with Debian's real components: the metrics timer's command (its
unit's ExecStart) writes the textfile for a real broken QEMU on this machine, Debian's
node_exporter serves it, Debian's Prometheus scrapes it every second with the shipped alerting
rules unmodified, and its HTTP API returns the series and the alert; then, with the QEMU gone
and the command run again, the series goes and the alert resolves.

The broken QEMU: this machine has no /dev/vhost-net, so a QEMU whose netdev says vhost=off
(its NIC not on vhost: reason not-requested, a failing check). The rules' `for:` (three
minutes: a file refreshed every minute must agree three runs in a row) is waited out, so the
test takes about four minutes and is marked slow.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support import prometheus
from tests.support.domains import plain_qemu, tap
from tests.support.kernel import EXE

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

FOR = 180  # the rules' `for:` of VhostorchNicNotOnVhost and VhostorchCheckFailed


def write_textfile(directory: Path) -> None:
    done = subprocess.run(
        prometheus.timer_command(EXE, str(directory)), capture_output=True, text=True, timeout=120
    )
    # 1: a VM's check failed, which the file reports (the unit's SuccessExitStatus=1).
    assert done.returncode in (0, 1), done.stderr
    assert (directory / prometheus.TEXTFILE).stat().st_mode & 0o777 == 0o644


def ours(alerts: list[dict[str, Any]], name: str, pid: int) -> list[dict[str, Any]]:
    return [
        a for a in alerts if a["labels"]["alertname"] == name and a["labels"].get("pid") == str(pid)
    ]


def test_prometheus_scrapes_the_timers_file_and_alerts_on_a_nic_not_on_vhost() -> None:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vhoprom-") as tmp:
        work = Path(tmp)
        textfiles = work / "textfile"
        textfiles.mkdir()
        stack = prometheus.Stack(work, textfiles)
        with stack.running():
            with tap() as dev, plain_qemu(dev, "off") as pid:
                write_textfile(textfiles)
                series = f'vhostorch_nic_vhost_reason{{pid="{pid}"}}'
                [found] = prometheus.wait_until("the series", lambda: stack.query(series), 30)
                assert found["metric"]["reason"] == "not-requested", found
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
                assert pending["annotations"]["summary"] == (
                    f"QEMU (pid {pid}): NIC net0 does not use vhost-net (not-requested)"
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
                assert firing["labels"]["reason"] == "not-requested", firing
                failed = ours(stack.alerts(), "VhostorchCheckFailed", pid)
                assert {a["labels"]["check"] for a in failed} >= {
                    c["metric"]["check"] for c in failing
                }, failed
            # The QEMU is gone: the next run's file has no series of it, and the alerts go.
            write_textfile(textfiles)
            prometheus.wait_until(
                "the series gone", lambda: not stack.query(series), 30, work / "prometheus.log"
            )
            prometheus.wait_until(
                "the alerts resolved",
                lambda: not [a for a in stack.alerts() if a["labels"].get("pid") == str(pid)],
                30,
            )
    print(f"real Prometheus test: {time.monotonic() - started:.0f} s")
