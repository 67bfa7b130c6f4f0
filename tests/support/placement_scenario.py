"""Where vhost workers run, and pinning them, in a test host with two CPUs (issue 22).

Run inside the test host (tests/testhost/test_placement_testhost.py boots one with ``--cpus
2`` per kernel and runs this with ``python -m tests.support.placement_scenario OUT``); it
writes what it saw, step by step, as JSON to OUT, and the test outside judges it. Each step
is what an operator does, through the installed ``vhostorch`` command:

  up         a VM of one vCPU and one vhost NIC (2 queue pairs), no pin: placement passes,
             each worker's model, cgroup, CPUs and last CPU shown
  vcpupin    its vCPU thread pinned to CPU 1 (as libvirt's <vcpupin> does): warned
  pin        ``vhostorch pin VM --cpus 0``: the workers move (read with taskset), check passes
  nic add    a second NIC hot-plugged: its workers are pinned too (the recorded pin)
  reset      QMP system_reset, the guest driver starts vhost again: where the workers are
  cpuset     QEMU (and a kernel-thread worker) in a cgroup whose cpuset is CPU 0: ``pin --cpus
             1`` refused in one line naming it, nothing changed
  clear      ``pin --clear``: back where QEMU's main thread may run, the record gone
  down       the record of a VM taken down is gone

The VM's vCPU runs on KVM inside the test host; its threads and workers are the test host's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from tests.support import guests, vms
from tests.support.kernel import vhostorch
from vhostorch.kernel import cpus
from vhostorch.qemu import monitor

VM = "vho-place"
TAP0, TAP1 = "vho-place-n0", "vho-place-n1"
CGROUP = "/sys/fs/cgroup/vho-place"


def check(pid: int) -> dict[str, Any]:
    done = vhostorch("check", "--pid", str(pid), "--json")
    data: dict[str, Any] = json.loads(done.stdout)
    data["exit"] = done.returncode
    return data


def placements(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in report["checks"] if c["id"] == "nic.vhost.placement"]


def taskset(tid: int) -> str:
    """A thread's affinity as util-linux's taskset reads it (not vhostorch's reader), written
    as the kernel writes lists (taskset says "0,1" for "0-1")."""
    out = subprocess.run(["taskset", "-pc", str(tid)], capture_output=True, text=True).stdout
    return cpus.format_list(cpus.parse_list(out.rsplit(":", 1)[-1]))


def vcpu_thread(pid: int) -> int:
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            if f.read().strip().startswith("CPU 0/"):
                return int(tid)
    raise AssertionError("no vCPU thread")


def workers(pid: int) -> dict[str, str]:
    return {str(t): taskset(t) for t in guests.vhost_workers(pid)}


def wait_started(pid: int, nics: int, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        report = check(pid)
        started = [c for c in report["checks"] if c["id"] == "nic.vhost.started"]
        if len(started) == nics and all(c["status"] == "pass" for c in started):
            return report
        if time.monotonic() > deadline:
            return report
        time.sleep(2)


def main(out: str) -> None:
    seen: dict[str, Any] = {"cpus": sorted(os.sched_getaffinity(0))}
    work = tempfile.mkdtemp(prefix="vho-place-")
    nic = {"tap": TAP0, "queues": 2, "vhost": "required"}
    spec = guests.spec_file(work, VM, [nic])
    try:
        code, up, err = vms.run("up", spec, "--wait", "180")
        seen["up"] = {"exit": code, "stderr": err}
        pid = up["vm"]["pid"]
        seen["up"]["report"] = check(pid)
        seen["up"]["workers"] = workers(pid)

        vcpu = vcpu_thread(pid)
        os.sched_setaffinity(vcpu, {1})
        seen["vcpupin"] = {"report": check(pid), "vcpu": taskset(vcpu)}

        done = vhostorch("pin", VM, "--cpus", "0", "--json")
        seen["pin"] = {"exit": done.returncode, "out": done.stdout, "stderr": done.stderr}
        seen["pin"]["workers"] = workers(pid)
        seen["pin"]["report"] = check(pid)

        code, _, err = vms.run("nic", "add", VM, "--tap", TAP1, "--queues", "2", "--wait", "180")
        seen["nic_add"] = {"exit": code, "stderr": err, "workers": workers(pid)}
        seen["nic_add"]["report"] = check(pid)

        before = workers(pid)
        sock = monitor.QmpSocket(up["vm"]["qmp"], 10.0)
        sock.open()
        try:
            sock.execute("system_reset", None)
        finally:
            sock.close()
        time.sleep(2)
        report = wait_started(pid, 2)
        seen["reset"] = {"before": before, "after": workers(pid), "report": report}
        done = vhostorch("pin", "--reapply", "--json")
        seen["reset"]["reapply"] = {"exit": done.returncode, "out": done.stdout}
        seen["reset"]["reapplied"] = workers(pid)
        seen["reset"]["report_after_reapply"] = check(pid)

        seen["cpuset"] = cpuset_refusal(pid)

        done = vhostorch("pin", VM, "--clear", "--json")
        seen["clear"] = {"exit": done.returncode, "stderr": done.stderr, "workers": workers(pid)}
        seen["clear"]["report"] = check(pid)
        seen["clear"]["record"] = os.path.exists(f"/run/vhostorch/pins/{pid}.json")

        done = vhostorch("pin", VM, "--cpus", "1", "--json")
        seen["down"] = {"pinned": done.returncode}
        seen["down"]["exit"] = vhostorch("down", VM).returncode
        seen["down"]["record"] = os.path.exists(f"/run/vhostorch/pins/{pid}.json")
    finally:
        if vms.state_of(VM) is not None:
            vhostorch("down", VM)
        with open(out, "w") as f:
            json.dump(seen, f, indent=1)


def cpuset_refusal(pid: int) -> dict[str, Any]:
    """QEMU moved into a cgroup whose cpuset is CPU 0; a pin to CPU 1 must be refused."""
    found: dict[str, Any] = {}
    with open("/sys/fs/cgroup/cgroup.subtree_control", "w") as f:
        f.write("+cpuset")
    os.makedirs(CGROUP, exist_ok=True)
    try:
        with open(f"{CGROUP}/cpuset.cpus", "w") as f:
            f.write("0")
        moved = [pid]
        with open(f"{CGROUP}/cgroup.procs", "w") as f:
            f.write(str(pid))
        for tid in guests.vhost_workers(pid):
            if not os.path.exists(f"/proc/{pid}/task/{tid}"):  # a kernel thread (< 6.4)
                with open(f"{CGROUP}/cgroup.procs", "w") as f:
                    f.write(str(tid))
                moved.append(tid)
        found["moved"] = moved
        found["before"] = workers(pid)
        done = vhostorch("pin", VM, "--cpus", "1")
        found.update(exit=done.returncode, stderr=done.stderr, after=workers(pid))
        found["report"] = check(pid)
    finally:
        for tid in [pid, *guests.vhost_workers(pid)]:
            try:
                with open("/sys/fs/cgroup/cgroup.procs", "w") as f:
                    f.write(str(tid))
            except OSError:
                pass  # a thread of QEMU's moves with it
        os.rmdir(CGROUP)
    return found


if __name__ == "__main__":
    main(sys.argv[1])
