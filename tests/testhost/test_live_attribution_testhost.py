"""Which vhost fd and which worker serve which NIC and queue pair, from the kernel's present
state (issue 23), in the test host with NO wiring trace: two vhost NICs whose taps QEMU opens
itself (``ifname=``, no ``vhostfd=``), and the fork-owner mode's kernel-thread workers (vhost's
``fork_from_owner_default=N``, where the kernel has that control: Debian's 6.12)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import guests
from tests.support.kernel import vhostorch
from vhostorch.check import wiring
from vhostorch.kernel import btf

pytestmark = pytest.mark.testhost
FORK_FROM_OWNER = "/sys/module/vhost/parameters/fork_from_owner_default"
LIVE = "the kernel (live)"


def check(*args: str) -> tuple[int, dict[str, Any]]:
    done = vhostorch("check", *args, "--json")
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


def passing(pid: int) -> dict[str, Any]:
    """check --pid --strict once it passes (the guest driver may still be starting a device)."""
    deadline = time.monotonic() + 60
    while True:
        code, report = check("--pid", str(pid), "--strict")
        if code == 0:
            return report
        failed = [c for c in report["checks"] if c["status"] != "pass"]
        assert time.monotonic() < deadline, json.dumps(failed, indent=1)
        time.sleep(1)


def of(report: dict[str, Any], check_id: str, nic: str) -> dict[str, Any]:
    (found,) = [c for c in report["checks"] if c["id"] == check_id and c["nic"] == nic]
    return found


def iff(pid: int, fd: int) -> str:
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        return next(line for line in f if line.startswith("iff:")).split()[1]


def vhost_fds_by_tap(pid: int) -> dict[str, list[int]]:
    """Each tap's vhost fds as /proc shows them, without vhostorch: QEMU opening a tap itself
    (net/tap.c, net_init_tap) opens each queue's /dev/vhost-net right after its /dev/net/tun,
    so in a QEMU that never closed one, a vhost fd serves the tap of the tun fd below it."""
    found: dict[str, list[int]] = {}
    tap = None
    for fd, target in sorted(guests.fd_targets(pid).items()):
        if target == "/dev/net/tun":
            tap = iff(pid, fd)
        elif target == "/dev/vhost-net":
            assert tap is not None, "a vhost fd before any tap fd"
            found.setdefault(tap, []).append(fd)
    return found


def test_two_vhost_nics_get_their_vhost_fds_and_workers_from_the_kernel(untraced: None) -> None:
    assert not wiring.armed(), "this test attributes vhost fds without the trace"
    with guests.tap(2) as first, guests.tap(1) as second:
        extra = [*guests.vhost_netdev(first, 2), *guests.vhost_netdev(second, 1, nic=1)]
        with guests.guest(extra) as g:
            g.wait_for(r"VHOSTORCH-GUEST: nic eth1 up", timeout=180)
            report = passing(g.pid)
            expected = vhost_fds_by_tap(g.pid)
            assert [len(expected[first]), len(expected[second])] == [2, 1], expected
            major, minor = (int(p) for p in os.uname().release.split(".")[:2])
            model = "vhost_task" if (major, minor) >= (6, 4) else "kthread"
            workers: list[int] = []
            for nic, tap in (("net0", first), ("net1", second)):
                fds = of(report, "nic.vhost.fds", nic)["evidence"]
                assert (fds["fds"], fds["assigned_by"]) == (expected[tap], LIVE), fds
                # Each vring's backend, as the kernel holds it, is one of this NIC's tap fds.
                started = of(report, "nic.vhost.started", nic)["evidence"]
                assert started["source"] == "live"
                joined = {fd for pair in started["backends"].values() for fds in pair for fd in fds}
                assert {iff(g.pid, fd) for fd in joined} == {tap}, started
                worker = of(report, "nic.vhost.worker", nic)
                models = worker["evidence"]["kernel_models"]
                assert models == {str(fd): model for fd in expected[tap]}, worker
                (judged,) = [n for n in report["nics"] if n["name"] == nic]
                assert [w["vhost_fd"] for w in judged["workers"]] == expected[tap]
                assert {w["attributed_by"] for w in judged["workers"]} == {LIVE}
                workers += [w["tid"] for w in judged["workers"]]
            assert sorted(workers) == guests.vhost_workers(g.pid)
            # Unread (--no-live), the same fds come from the guess by fd order, said so.
            _, unread = check("--pid", str(g.pid), "--no-live")
            for nic, tap in (("net0", first), ("net1", second)):
                fds = of(unread, "nic.vhost.fds", nic)["evidence"]
                assert fds["fds"] == expected[tap] and fds["assigned_by"].startswith("fd order")


@pytest.fixture
def kthread_workers(in_testhost: None) -> Iterator[list[object]]:
    """vhost reloaded with fork_from_owner_default=0 (new devices get kernel-thread workers),
    then with its default again; yields the identity of vhost's BTF file before."""
    if not os.path.exists(FORK_FROM_OWNER):
        pytest.skip(f"Linux {os.uname().release} has no vhost fork-owner control")
    before = btf._identity(btf.BTF_ROOT, ["vhost"])
    loaded = [m for m in ("vhost_net", "vhost_vsock") if os.path.exists(f"/sys/module/{m}")]
    subprocess.run(["rmmod", *loaded, "vhost"], check=True)
    try:
        guests.modprobe("vhost", "fork_from_owner_default=0")
        guests.modprobe("vhost_net")
        yield before
    finally:
        subprocess.run(["rmmod", "vhost_net", "vhost"], check=False)
        guests.modprobe("-a", "vhost", *loaded)
        with open(FORK_FROM_OWNER) as f:
            assert f.read().strip() == "Y"


def test_fork_owner_kernel_thread_workers_are_read_from_the_kernel(
    kthread_workers: list[object], untraced: None
) -> None:
    """vhost_worker.kthread_task (the fork-owner mode off): the workers are kernel threads
    again on a 6.12 kernel, and the kernel says which device each serves."""
    # The reloaded module's BTF is another file: the per-boot BTF cache's key changed with it.
    assert btf._identity(btf.BTF_ROOT, ["vhost"]) != kthread_workers
    with guests.tap(2) as name, guests.guest(guests.vhost_netdev(name, 2)) as g:
        g.wait_for(r"VHOSTORCH-GUEST: nic eth0 up", timeout=180)
        report = passing(g.pid)
        tids = guests.vhost_workers(g.pid)
        assert len(tids) == 2 and not any(
            os.path.exists(f"/proc/{g.pid}/task/{tid}") for tid in tids
        ), tids  # kernel threads, outside QEMU's thread group
        worker = of(report, "nic.vhost.worker", "net0")
        assert worker["evidence"]["model"] == "kthread", worker
        assert set(worker["evidence"]["kernel_models"].values()) == {"kthread_task"}, worker
        assert "fork-owner" in worker["message"], worker
        (nic,) = report["nics"]
        assert sorted(w["tid"] for w in nic["workers"]) == tids
        assert {w["attributed_by"] for w in nic["workers"]} == {LIVE}
    doctor = json.loads(vhostorch("doctor", "--json").stdout)
    (model,) = [c for c in doctor["checks"] if c["id"] == "host.worker-model"]
    assert model["evidence"]["model"] == "kthread", model
    assert model["evidence"]["fork_from_owner_default"] == "N", model
