"""Where vhost workers run, and pinning them, proved in a test host with two CPUs (issue 22).

The test-host sessions have one CPU, where every thread runs on CPU 0 and nothing can be
placed; this boots a test host of its own with ``--cpus 2`` for each kernel (6.1: workers
are kernel threads; 6.12: vhost_tasks of QEMU) and runs tests/support/placement_scenario.py
there, which does what an operator does and writes what it saw. Here it is judged, with
the workers' CPUs read by util-linux's taskset, not by vhostorch. It runs after the sessions
(``testhost_sessions``): two TCG CPUs take this machine's two cores, which the sessions'
benchmarks must not share (beside them, the up benchmark's ratio went from 1.4x to 1.95x).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
KERNEL_MODEL = {"6.1": "kthread", "6.12": "task"}


def _placed(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in report["checks"] if c["id"] == "nic.vhost.placement"]


def _workers(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [w for nic in report["nics"] for w in nic.get("workers", [])]


@pytest.mark.testhost(outside=True)
@pytest.mark.parametrize("kernel", ["6.1", "6.12"])
def test_workers_are_placed_pinned_and_warned_in_a_two_cpu_test_host(
    kernel: str, tmp_path: Path, testhost_sessions: None
) -> None:
    out = tmp_path / "seen.json"
    done = subprocess.run(
        [str(ROOT / ".venv/bin/vhostorch"), "lab", "run", "--cpus", "2", "--kernel", kernel,
         "--results", str(tmp_path), "--timeout", "900", "--",
         ".venv/bin/python", "-m", "tests.support.placement_scenario", str(out)],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert out.exists(), f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    seen = json.loads(out.read_text())
    for step in ("up", "vcpupin", "pin", "nic_add", "reset", "cpuset", "clear"):
        report = seen.get(step, {}).get("report")
        said = [(c["status"], c["message"]) for c in _placed(report)] if report else None
        print(f"linux-{kernel} {step}: {said}")
    print(f"linux-{kernel} reset: workers {seen['reset']['before']} -> {seen['reset']['after']}")
    refused = seen["cpuset"]
    print(f"linux-{kernel} cpuset: {refused['stderr'].strip()} (moved {refused['moved']})")
    assert done.returncode == 0, (done.stderr[-3000:], seen)
    assert seen["cpus"] == [0, 1]

    # up: one NIC of 2 queue pairs; its workers may run on both CPUs, no vCPU is pinned.
    up = seen["up"]
    assert up["exit"] == 0, up
    [placed] = _placed(up["report"])
    assert placed["status"] == "pass" and "no vCPU is pinned" in placed["message"], placed
    workers = _workers(up["report"])
    assert len(workers) == 2 and {w["queue_pair"] for w in workers} == {0, 1}, workers
    assert {str(w["tid"]) for w in workers} == set(up["workers"])  # the threads taskset read
    for w in workers:
        assert w["cpus"] == "0-1" == up["workers"][str(w["tid"])], w
        assert w["last_cpu"] in (0, 1) and w["cgroup"] is not None, w
        model = w["model"]
        assert model.startswith("kthread") if kernel == "6.1" else model != "kthread", w

    # The vCPU pinned to CPU 1 (as <vcpupin> does): the workers may share it: warned.
    vcpupin = seen["vcpupin"]
    assert vcpupin["vcpu"] == "1"
    [placed] = _placed(vcpupin["report"])
    assert placed["status"] == "warn", placed
    assert "pinned vCPU 0" in placed["message"] and "CPU 1" in placed["message"], placed
    assert [v["pinned"] for v in placed["evidence"]["vcpus"]] == [True]

    # vhostorch pin VM --cpus 0: taskset sees every worker on CPU 0; the check passes on it.
    pin = seen["pin"]
    assert pin["exit"] == 0, pin
    assert set(pin["workers"].values()) == {"0"}, pin["workers"]
    [placed] = _placed(pin["report"])
    assert placed["status"] == "pass", placed
    assert placed["evidence"]["pin"] == {"cpus": "0", "source": "vhostorch pin", "vm": "vho-place"}

    # A NIC hot-plugged later: its two workers are pinned too, by the recorded pin.
    added = seen["nic_add"]
    assert added["exit"] == 0, added
    assert len(added["workers"]) == 4 and set(added["workers"].values()) == {"0"}, added
    assert [c["status"] for c in _placed(added["report"])] == ["pass", "pass"]

    # A guest reset: vhost is stopped and started again; wherever the workers are then,
    # `pin --reapply` leaves them all on CPU 0 and the check passes.
    reset = seen["reset"]
    assert reset["reapply"]["exit"] == 0, reset["reapply"]
    assert set(reset["reapplied"].values()) == {"0"}, reset
    assert [c["status"] for c in _placed(reset["report_after_reapply"])] == ["pass", "pass"]
    if reset["after"] == reset["before"]:  # the same workers: the pin held through the reset
        assert [c["status"] for c in _placed(reset["report"])] == ["pass", "pass"]

    # In a cgroup whose cpuset is CPU 0, a pin to CPU 1 is refused, naming it; nothing moved.
    cpuset = seen["cpuset"]
    assert cpuset["exit"] == 2, cpuset
    message = cpuset["stderr"].strip()
    assert len(message.splitlines()) == 1, message
    assert "CPU 1 is outside the cpuset" in message and "/vho-place (0)" in message, message
    assert cpuset["after"] == cpuset["before"], cpuset

    # --clear: the workers may run where QEMU's main thread may; the record is gone.
    clear = seen["clear"]
    assert clear["exit"] == 0 and not clear["record"], clear
    assert set(clear["workers"].values()) == {"0-1"}, clear
    assert all("pin" not in c["evidence"] for c in _placed(clear["report"]))

    # down removes the pin record of the VM it stopped.
    assert seen["down"] == {"pinned": 0, "exit": 0, "record": False}, seen["down"]
