"""`vhostorch check` in the test host, on real vhost-net and KVM: what passes and what must not."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
from typing import Any

import pytest

from tests.support import container, guests, kernel
from tests.support.kernel import vhostorch
from vhostorch.check import wiring

pytestmark = pytest.mark.testhost
VHOST_SET_OWNER = 0xAF01  # _IO(VHOST_VIRTIO, 0x01)

# Every check a healthy vhost NIC gets; kick and call come once per virtqueue.
NIC_CHECKS = {
    "nic.vhost.requested", "nic.queues", "nic.tap.fds", "nic.vhost.fds", "nic.vhost.worker",
    "nic.vhost.started", "nic.vhost.memtable", "nic.kick", "nic.call", "nic.features",
    "nic.vhost.placement",
}  # fmt: skip


def check(*args: str) -> tuple[int, dict[str, Any]]:
    done = vhostorch("check", *args, "--json")
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


def check_untraced(*args: str) -> tuple[int, dict[str, Any]]:
    """The same `check` with the wiring trace disarmed (issue 23: from the kernel's live state
    alone), armed again after: the module's VM is running, so no second boot is needed."""
    wiring.disarm()
    try:
        return check(*args)
    finally:
        wiring.arm()


def live_sources(report: dict[str, Any]) -> set[str]:
    wired = [c for c in report["checks"] if c["id"] in ("nic.kick", "nic.call")]
    return {c["evidence"]["source"] for c in wired}


def by_id(report: dict[str, Any], nic: str | None = None) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for c in report["checks"]:
        if nic is None or c["nic"] in (nic, None):
            found.setdefault(c["id"], []).append(c)
    return found


def qmp_socket() -> str:
    return os.path.join(tempfile.mkdtemp(prefix="vho-qmp-"), "qmp.sock")


def worker_model(pid: int) -> str:
    """How this kernel runs the vhost workers of ``pid``, read from /proc without vhostorch,
    and checked against the kernel fact: kernel threads before Linux 6.4 (6.1), vhost_task
    threads in the owner's thread group from 6.4 on (6.12)."""
    tids = guests.vhost_workers(pid)
    assert tids, f"no vhost-{pid} worker"
    in_group = [os.path.exists(f"/proc/{pid}/task/{tid}") for tid in tids]
    assert len(set(in_group)) == 1, in_group
    model = "task" if in_group[0] else "kthread"
    major, minor = (int(p) for p in os.uname().release.split(".")[:2])
    assert model == ("task" if (major, minor) >= (6, 4) else "kthread"), os.uname().release
    return model


@pytest.mark.parametrize("queues", [1, 4])
def test_healthy_vhost_nic_passes_every_check(traced: None, queues: int) -> None:
    sock = qmp_socket()
    with guests.tap(queues) as name:
        extra = [*guests.vhost_netdev(name, queues), "-qmp", f"unix:{sock},server=on,wait=off"]
        with guests.guest(extra) as g:
            g.wait_for(r"VHOSTORCH-GUEST: nic eth0 up", timeout=120)
            # --pid finds the QMP socket on QEMU's command line; --strict: nothing unknown.
            code, report = check("--pid", str(g.pid), "--strict")
            failed = [c for c in report["checks"] if c["status"] != "pass"]
            assert code == 0 and report["ok"] is True, json.dumps(failed, indent=1)
            checks = by_id(report)
            assert NIC_CHECKS | {"host.vhost-net", "vm.kvm"} == set(checks)
            assert len(checks["nic.kick"]) == len(checks["nic.call"]) == 2 * queues
            assert sorted(c["queue"] for c in checks["nic.kick"]) == list(range(2 * queues))
            # Each kick eventfd is distinct, and so is each call eventfd.
            kicks = {c["evidence"]["kick"]["eventfd_id"] for c in checks["nic.kick"]}
            calls = {c["evidence"]["call"]["eventfd_id"] for c in checks["nic.call"]}
            assert len(kicks) == len(calls) == 2 * queues and not kicks & calls
            assert checks["nic.vhost.fds"][0]["evidence"]["fds"] != []
            # One worker per vhost device, found and named in the model this kernel uses.
            (worker,) = checks["nic.vhost.worker"]
            model = worker_model(g.pid)
            assert worker["evidence"]["model"] == model, worker
            assert worker["evidence"]["tids"] == guests.vhost_workers(g.pid)
            assert len(worker["evidence"]["tids"]) == queues
            where = "threads of QEMU" if model == "task" else "kernel threads"
            assert f"({where}) for {queues} vhost device(s)" in worker["message"], worker
            [nic] = report["nics"]
            assert nic == {
                "name": "net0", "netdev": "n0", "tap": name, "queue_pairs": queues,
                "vhost_requested": True, "reason": None, "workers": nic["workers"],
            }  # fmt: skip
            # One worker per queue pair, as the kernel names it for its vhost device...
            assert [w["queue_pair"] for w in nic["workers"]] == list(range(queues))
            assert sorted(w["tid"] for w in nic["workers"]) == guests.vhost_workers(g.pid)
            assert {w["attributed_by"] for w in nic["workers"]} == {"the kernel (live)"}
            # Where each runs (issue 22): one CPU in the test host, so CPU 0; its model as the
            # kernel keeps it, its cgroup as /proc says.
            for w in nic["workers"]:
                assert (w["cpus"], w["last_cpu"]) == ("0", 0), w
                assert w["model"] == ("kthread" if model == "kthread" else "vhost_task"), w
                assert w["cgroup"] is not None and w["tid"] in guests.vhost_workers(g.pid), w
            # ...and the same pairing from the traced owner order when the kernel is not read.
            _, traced_only = check("--pid", str(g.pid), "--strict", "--no-live")
            [by_trace] = traced_only["nics"]
            assert {w["attributed_by"] for w in by_trace["workers"]} == {
                "VHOST_SET_OWNER order (traced)"
            }
            assert [(w["queue_pair"], w["tid"]) for w in by_trace["workers"]] == [
                (w["queue_pair"], w["tid"]) for w in nic["workers"]
            ]
            # The same QEMU named by its QMP socket gives the same verdicts.
            code_qmp, by_socket = check("--qmp", sock, "--strict")
            assert code_qmp == 0
            assert [(c["id"], c["queue"], c["status"]) for c in by_socket["checks"]] == [
                (c["id"], c["queue"], c["status"]) for c in report["checks"]
            ]
            # Untraced: the same verdicts, kick and call from the kernel's live state.
            code, untraced = check_untraced("--pid", str(g.pid), "--strict")
            failed = [c for c in untraced["checks"] if c["status"] != "pass"]
            assert code == 0 and untraced["ok"] is True, json.dumps(failed, indent=1)
            assert live_sources(untraced) == {"live"}


def test_guest_without_its_virtio_net_driver_warns_and_fails_strict(traced: None) -> None:
    sock = qmp_socket()
    with guests.tap(1) as name:
        extra = [*guests.vhost_netdev(name, 1), "-qmp", f"unix:{sock},server=on,wait=off"]
        with guests.guest(extra, append="vho.nodriver=1") as g:
            g.wait_for(r"VHOSTORCH-GUEST: ready", timeout=120)
            code, report = check("--pid", str(g.pid))
            checks = by_id(report)
            assert checks["nic.vhost.started"][0]["status"] == "warn"
            assert "has not started the device" in checks["nic.vhost.started"][0]["message"]
            assert {c["status"] for c in checks["nic.kick"] + checks["nic.call"]} == {"warn"}
            assert checks["nic.vhost.fds"][0]["status"] == "pass"  # opened, just not started
            assert code == 0 and report["ok"] is True  # a warning is not a failure...
            strict_code, strict = check("--pid", str(g.pid), "--strict")
            assert strict_code == 1 and strict["ok"] is False  # ...unless --strict
            # Untraced: the kernel shows vhost's vrings with no backend now (QEMU joins the
            # tap when the driver starts the device): warn, not-wired, from the live state.
            code, untraced = check_untraced("--pid", str(g.pid))
            live = by_id(untraced)
            assert code == 0 and live["nic.vhost.started"][0]["status"] == "warn", live
            kc = live["nic.kick"] + live["nic.call"]
            assert {(c["status"], c["evidence"]["source"]) for c in kc} == {("warn", "live")}, kc
            assert all("not started now" in c["message"] for c in kc), kc
            assert check_untraced("--pid", str(g.pid), "--strict")[0] == 1


def test_tap_with_fewer_queues_than_the_device_fails(traced: None) -> None:
    with guests.tap(2) as name, guests.guest(guests.vhost_netdev(name, 2, device_queues=4)) as g:
        g.wait_for(r"VHOSTORCH-GUEST: nic eth0 up", timeout=120)
        code, report = check("--pid", str(g.pid))
        queues = by_id(report)["nic.queues"][0]
        assert code == 1 and queues["status"] == "fail"
        expected = "sized for 4 queue pair(s) (vectors=10) but its tap netdev has 2"
        assert expected in queues["message"]
        code, untraced = check_untraced("--pid", str(g.pid))
        queues = by_id(untraced)["nic.queues"][0]
        assert code == 1 and queues["status"] == "fail" and expected in queues["message"]


def test_vhost_on_one_nic_of_two_fails_only_that_nic(traced: None) -> None:
    with guests.tap(1) as fast, guests.tap(1) as slow:
        extra = [*guests.vhost_netdev(fast, 1), *guests.vhost_netdev(slow, 1, "off", nic=1)]
        with guests.guest(extra) as g:
            g.wait_for(r"VHOSTORCH-GUEST: nic eth1 up", timeout=120)
            code, report = check("--pid", str(g.pid))
            assert code == 1
            good, bad = by_id(report, "net0"), by_id(report, "net1")
            failed = [c for cs in good.values() for c in cs if c["nic"] and c["status"] != "pass"]
            assert failed == []
            assert bad["nic.vhost.requested"][-1]["status"] == "fail"
            assert bad["nic.vhost.fds"][-1]["status"] == "fail"
            # The vhost fd belongs to net0 by the tap the kernel holds as its backend now, and
            # with the kernel unread, by the trace of VHOST_NET_SET_BACKEND.
            assert good["nic.vhost.fds"][-1]["evidence"]["assigned_by"] == "the kernel (live)"
            _, unread = check("--pid", str(g.pid), "--no-live")
            assert by_id(unread, "net0")["nic.vhost.fds"][-1]["evidence"]["assigned_by"].startswith(
                "VHOST_NET_SET_BACKEND"
            )
            # Untraced: the same verdicts; net0's kick and call from the live state.
            code, untraced = check_untraced("--pid", str(g.pid))
            assert code == 1
            good, bad = by_id(untraced, "net0"), by_id(untraced, "net1")
            failed = [c for cs in good.values() for c in cs if c["nic"] and c["status"] != "pass"]
            assert failed == [], json.dumps(failed, indent=1)
            assert {c["evidence"]["source"] for c in good["nic.kick"] + good["nic.call"]} == {
                "live"
            }
            assert bad["nic.vhost.requested"][-1]["status"] == "fail"
            assert bad["nic.vhost.fds"][-1]["status"] == "fail"


def test_libvirt_domain_with_vhost_passes_with_the_monitor(traced: None, libvirtd: str) -> None:
    import libvirt

    name = kernel.unique("vho-t-")
    with guests.tap(4) as dev:
        xml = guests.domain_xml(name, dev, 4)
        conn = libvirt.open(libvirtd)
        dom = conn.createXML(xml, 0)
        try:
            deadline = time.monotonic() + 60
            while True:
                code, report = check("--domain", name, "--monitor", "--strict")
                started = by_id(report)["nic.vhost.started"][0]["status"]
                if started == "pass" or time.monotonic() > deadline:
                    break
                time.sleep(1)
            failed = [c for c in report["checks"] if c["status"] != "pass"]
            assert code == 0 and report["ok"] is True, json.dumps(failed, indent=1)
            assert report["target"]["domain"] == name
            assert by_id(report)["nic.tap.fds"][0]["evidence"]["taps"] == [dev]
            # Without --monitor, started, memtable and features come from the kernel's present
            # state, and with it unread (--no-live) from the wiring trace.
            code_plain, plain = check("--domain", name, "--strict", "--no-live")
            assert code_plain == 0
            for check_id in ("nic.vhost.started", "nic.vhost.memtable", "nic.features"):
                assert by_id(plain)[check_id][0]["evidence"]["source"] == "wiring trace"
            # Without the trace: from the kernel they pass; unread, they are unknown, with the
            # reason, never passed.
            wiring.disarm()
            try:
                code_live, from_live = check("--domain", name, "--strict")
                code_bare, bare = check("--domain", name, "--no-live")
            finally:
                wiring.arm()
            assert code_live == 0, json.dumps(from_live["checks"], indent=1)
            for check_id in ("nic.vhost.started", "nic.vhost.memtable", "nic.features",
                             "nic.kick", "nic.call"):  # fmt: skip
                assert {c["evidence"]["source"] for c in by_id(from_live)[check_id]} == {"live"}
            assert code_bare == 0  # unknown is not a failure
            for check_id in ("nic.kick", "nic.call"):
                for c in by_id(bare)[check_id]:
                    assert c["status"] == "unknown" and "not armed" in c["message"], c
            for check_id in ("nic.vhost.started", "nic.vhost.memtable", "nic.features"):
                (c,) = by_id(bare)[check_id]
                assert c["status"] == "unknown" and "vhostorch trace arm" in c["message"], c
        finally:
            dom.destroy()
            conn.close()


def test_doctor_passes_vhost_net_in_the_test_host(in_testhost: None) -> None:
    report = json.loads(vhostorch("doctor", "--json").stdout)
    checks = by_id(report)
    assert checks["host.vhost-net"][0]["status"] == "pass"
    assert checks["host.vhost-net.access"][0]["status"] == "pass"
    # What doctor says before any QEMU runs is what a vhost device then really gets.
    fd = os.open("/dev/vhost-net", os.O_RDWR)
    try:
        fcntl.ioctl(fd, VHOST_SET_OWNER)
        seen = worker_model(os.getpid())
    finally:
        os.close(fd)
    (model,) = checks["host.worker-model"]
    assert model["status"] == "pass" and model["evidence"]["model"] == seen, model
    assert model["evidence"]["kernel"] == os.uname().release
    assert checks["host.kvm"][0]["status"] == "pass"  # kvm_amd on TCG's emulated SVM


def test_containerised_vm_with_vhost_passes_every_check(traced: None) -> None:
    """A QEMU run as KubeVirt's virt-launcher runs it (own mount and pid namespaces, a private
    /dev of mknod'ed nodes): its fds read <root>/dev/net/tun and <root>/dev/vhost-net from
    here, and are still its tap and vhost devices (issue 19: they were failed, "0 tap fd(s)",
    though QEMU said vhost was started)."""
    sock = qmp_socket()
    workdir = tempfile.mkdtemp(prefix="vho-guest-")
    console = os.path.join(workdir, "console.log")
    try:
        with guests.tap(1) as name:
            extra = [*guests.vhost_netdev(name, 1), "-qmp", f"unix:{sock},server=on,wait=off"]
            argv = guests.qemu_argv(console, "", extra)
            with container.qemu(argv, os.path.join(workdir, "qemu.log")) as c:
                g = guests.Guest(c.proc, console, workdir)
                # Slower than a plain guest's 30 s when the machine is loaded (seen: 25 s).
                g.wait_for(r"VHOSTORCH-GUEST: nic eth0 up", timeout=120)
                # Its devices read <its root>/dev/... from here (the test host, itself chrooted,
                # prefixes /root: the path the issue saw).
                targets = guests.fd_targets(c.pid).values()
                assert [t for t in targets if t.endswith(f"{c.root}/dev/vhost-net")], targets
                assert "/dev/vhost-net" not in targets and "/dev/net/tun" not in targets
                code, report = check("--pid", str(c.pid), "--strict")
                failed = [x for x in report["checks"] if x["status"] != "pass"]
                assert code == 0 and report["ok"] is True, json.dumps(failed, indent=1)
                checks = by_id(report)
                assert NIC_CHECKS | {"host.vhost-net", "vm.kvm"} == set(checks)
                assert checks["nic.tap.fds"][0]["evidence"]["taps"] == [name]
                # QEMU's own word (x-query-virtio-status), over its QMP socket.
                started = checks["nic.vhost.started"][0]["evidence"]
                assert started["vhost_started"] is True and started["source"] != "wiring trace"
                (worker,) = checks["nic.vhost.worker"]
                assert worker["evidence"]["tids"] == guests.vhost_workers(c.pid) != []
                # check --all lists it, with the same verdicts.
                code_all, every = check("--all", "--strict")
                (mine,) = [r for r in every["reports"] if r["target"].get("pid") == c.pid]
                assert code_all == 0 and mine["ok"] is True, json.dumps(every, indent=1)
                # Untraced: the kernel's objects are the same whatever namespace QEMU runs in.
                code, untraced = check_untraced("--pid", str(c.pid), "--strict")
                failed = [x for x in untraced["checks"] if x["status"] != "pass"]
                assert code == 0 and untraced["ok"] is True, json.dumps(failed, indent=1)
                assert live_sources(untraced) == {"live"}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _qmp(sock: str, pid: int, command: str) -> None:
    """One QMP command on the VM's socket, closed after: check --pid asks the same socket."""
    from vhostorch.qemu import monitor

    qmp = monitor.QmpSocket(sock, 30)
    qmp.open(pid)
    try:
        qmp.execute(command, None)
    finally:
        qmp.close()


def test_healthy_vhost_nic_passes_strict_from_the_live_state_without_the_trace(
    untraced: None,
) -> None:
    """Issue 23: no wiring trace and no pause: kick and call are proved from what the kernel
    holds now; a VM paused over QMP is judged from the present (not passed), and passes again
    once it runs."""
    assert not wiring.armed(), "this test proves kick and call without the trace"
    queues, sock = 2, qmp_socket()
    with guests.tap(queues) as name:
        extra = [*guests.vhost_netdev(name, queues), "-qmp", f"unix:{sock},server=on,wait=off"]
        with guests.guest(extra) as g:
            g.wait_for(r"VHOSTORCH-GUEST: nic eth0 up", timeout=180)
            code, report = check("--pid", str(g.pid), "--strict")
            failed = [c for c in report["checks"] if c["status"] != "pass"]
            assert code == 0 and report["ok"] is True, json.dumps(failed, indent=1)
            checks = by_id(report)
            vrings = checks["nic.kick"] + checks["nic.call"]
            assert len(vrings) == 4 * queues
            assert {c["evidence"]["source"] for c in vrings} == {"live"}
            for c in checks["nic.kick"]:
                assert c["evidence"]["polled"] is True and c["evidence"]["ioeventfds"], c
                assert isinstance(c["evidence"]["ring"]["last_avail_idx"], int), c
            for c in checks["nic.call"]:
                assert isinstance(c["evidence"]["irqfd"]["gsi"], int), c
            # The guest posted its RX buffers: each RX queue's kick eventfd counted kicks.
            rx = [c for c in checks["nic.kick"] if c["queue"] % 2 == 0]
            assert all(c["evidence"]["kick"]["count"] > 0 for c in rx), rx
            # Each queue pair's worker is the one the kernel names, none inferred.
            [nic] = report["nics"]
            assert {w["attributed_by"] for w in nic["workers"]} == {"the kernel (live)"}
            assert sorted(w["tid"] for w in nic["workers"]) == guests.vhost_workers(g.pid)
            # Paused: QEMU stops vhost; the present says so, never a pass from the past.
            _qmp(sock, g.pid, "stop")
            code, paused = check("--pid", str(g.pid))
            for c in by_id(paused)["nic.kick"] + by_id(paused)["nic.call"]:
                assert c["status"] in ("warn", "unknown") and "paused" in c["message"], c
            assert check("--pid", str(g.pid), "--strict")[0] == 1
            _qmp(sock, g.pid, "cont")
            deadline = time.monotonic() + 30
            while (found := check("--pid", str(g.pid), "--strict"))[0] != 0:
                assert time.monotonic() < deadline, json.dumps(found[1], indent=1)
                time.sleep(1)
