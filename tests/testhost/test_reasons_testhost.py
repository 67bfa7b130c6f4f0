"""Why vhost is not (fully) used, and the OpenMetrics output, in the test host: real
/dev/vhost-net, real KVM, real vhost workers.

Reproduced here: MSI-X not in use (the guest booted with pci=nomsi, or a device
with vectors=0); no in-kernel irqchip (kernel_irqchip=off, with QEMU's default CPU
model: with -cpu host QEMU 7.2 aborts, asserted below), and split is no reason;
QEMU falling back on its userspace virtio (the vhost module loaded with
max_mem_regions=0: QEMU opens the device, then its memory table is refused at
start), seen in the file its stderr is and in the monitor; a QEMU that may not open
/dev/vhost-net refuses to start (so no reason code describes it).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from tests.support import guests
from tests.support.kernel import vhostorch

pytestmark = pytest.mark.testhost


def report_of(pid: int) -> dict[str, Any]:
    done = vhostorch("check", "--pid", str(pid), "--json")
    assert done.stdout, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def untraced_report_of(pid: int) -> dict[str, Any]:
    """`report_of` with the wiring trace disarmed (issue 23: kick and call from the kernel's
    live state), armed again after: the same running VM, no second boot."""
    from vhostorch.check import wiring

    wiring.disarm()
    try:
        return report_of(pid)
    finally:
        wiring.arm()


def judged_alike(traced: dict[str, Any], untraced: dict[str, Any]) -> None:
    """The untraced report gives every check the verdict the traced one gave, and the same
    reason, with kick and call decided by the live source."""
    verdicts = [[(c["id"], c["nic"], c["queue"], c["status"]) for c in r["checks"]]
                for r in (traced, untraced)]  # fmt: skip
    assert verdicts[0] == verdicts[1], json.dumps(untraced["checks"], indent=1)
    assert [n["reason"] and n["reason"]["code"] for n in traced["nics"]] == [
        n["reason"] and n["reason"]["code"] for n in untraced["nics"]
    ], untraced["nics"]
    wired = [c for c in untraced["checks"] if c["id"] in ("nic.kick", "nic.call")]
    assert wired and {c["evidence"]["source"] for c in wired} == {"live"}, wired


def reason_of(pid: int, nic: str = "net0") -> dict[str, Any] | None:
    reasons = {n["name"]: n["reason"] for n in report_of(pid)["nics"]}
    return reasons[nic]


def test_healthy_vhost_has_no_reason_and_metrics_count_worker_cpu(traced: None) -> None:
    with guests.tap(2) as name, guests.guest(guests.vhost_netdev(name, 2)) as g:
        g.wait_for(r"VHOSTORCH-GUEST: nic eth0 up", timeout=120)
        report = report_of(g.pid)
        (nic,) = report["nics"]
        assert nic["reason"] is None
        # One worker per queue pair, each a vhost-<pid> thread with its CPU time.
        assert [w["queue_pair"] for w in nic["workers"]] == [0, 1]
        assert sorted(w["tid"] for w in nic["workers"]) == guests.vhost_workers(g.pid)
        # Each worker's own CPU time: together less than QEMU's whole (on >= 6.4 a worker is
        # a thread of QEMU, whose /proc/TID/stat would give the thread group's total).
        with open(f"/proc/{g.pid}/stat") as f:
            utime, stime = f.read().rsplit(")", 1)[1].split()[11:13]
        group = (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK")
        assert sum(w["cpu_seconds"] for w in nic["workers"]) < group, (nic["workers"], group)
        done = vhostorch("check", "--all", "--format", "openmetrics")
        families = {f.name: f for f in text_string_to_metric_families(done.stdout)}
        cpu = [
            s
            for s in families["vhostorch_vhost_worker_cpu_seconds"].samples
            if s.labels["pid"] == str(g.pid)
        ]
        assert families["vhostorch_vhost_worker_cpu_seconds"].type == "counter"
        assert sorted(s.labels["queue_pair"] for s in cpu) == ["0", "1"]
        assert all(s.name.endswith("_total") and s.value >= 0 for s in cpu)
        assert not [
            s
            for s in families["vhostorch_nic_vhost_reason"].samples
            if s.labels["pid"] == str(g.pid)
        ]
        mine = [
            s
            for s in families["vhostorch_check_status"].samples
            if s.labels["pid"] == str(g.pid) and s.value == 1
        ]
        assert {s.labels["check"] for s in mine} >= {"nic.vhost.fds", "nic.kick", "nic.call"}
        # Traffic makes the workers work: their counters only grow.
        before = {w["tid"]: w["cpu_seconds"] for w in nic["workers"]}
        time.sleep(1)
        after = {w["tid"]: w["cpu_seconds"] for w in report_of(g.pid)["nics"][0]["workers"]}
        assert all(after[t] >= before[t] for t in before)
        judged_alike(report, untraced_report_of(g.pid))


@pytest.mark.parametrize(
    ("append", "vectors"), [("pci=nomsi", None), ("", 0)], ids=["guest-nomsi", "vectors-0"]
)
def test_without_msix_every_interrupt_goes_through_qemu(
    traced: None, append: str, vectors: int | None
) -> None:
    with guests.tap(1) as name:
        netdev, device = guests.vhost_netdev(name, 1)[1::2]
        if vectors is not None:
            device += f",vectors={vectors}"
        with guests.guest(["-netdev", netdev, "-device", device], append=append) as g:
            g.wait_for(r"VHOSTORCH-GUEST: nic eth0 up", timeout=120)
            report = report_of(g.pid)
            why = report["nics"][0]["reason"]
            assert why is not None and why["code"] == "no-msix", why
            calls = [c for c in report["checks"] if c["id"] == "nic.call"]
            assert calls and {c["status"] for c in calls} == {"fail"}
            if vectors == 0:
                assert why["evidence"] == {"vectors": 0}
            else:
                assert why["evidence"]["queues"] == [0, 1]
            # Untraced: no call eventfd is a KVM irqfd now; the same failures, from the kernel.
            untraced = untraced_report_of(g.pid)
            judged_alike(report, untraced)
            for c in untraced["checks"]:
                if c["id"] == "nic.call":
                    assert "QEMU injects the interrupts itself" in c["message"], c


def _modprobe(*argv: str) -> None:
    env: dict[str, str] = {}
    with open(os.path.join(os.environ["VHOSTORCH_LAB_RESULTS"], "lab.env")) as f:
        for line in f:
            key, _, value = line.strip().partition("=")
            env[key] = value.strip("'")
    done = subprocess.run(
        ["modprobe", "-d", env["LAB_ROOT"], "-S", env["LAB_KVER"], *argv],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


@pytest.fixture
def vhost_without_memory_slots(in_testhost: None) -> Iterator[None]:
    """The vhost module reloaded with max_mem_regions=0, then with its default again."""
    subprocess.run(["rmmod", "vhost_net", "vhost"], check=True)
    try:
        _modprobe("vhost", "max_mem_regions=0")
        _modprobe("vhost_net")
        yield
    finally:
        subprocess.run(["rmmod", "vhost_net", "vhost"], check=False)
        _modprobe("-a", "vhost", "vhost_net")
        with open("/sys/module/vhost/parameters/max_mem_regions") as f:
            assert f.read().strip() == "64"


def test_qemu_that_fell_back_on_userspace_virtio(
    traced: None, vhost_without_memory_slots: None
) -> None:
    """QEMU opens /dev/vhost-net (it reads max_mem_regions=0 as invalid and assumes 64),
    the kernel refuses its memory table when the driver starts the device, and QEMU
    carries on in userspace: its stderr (a file) and its monitor both say so."""
    with guests.tap(1) as name:
        sock = f"/tmp/{name}.qmp"
        extra = [*guests.vhost_netdev(name, 1), "-qmp", f"unix:{sock},server=on,wait=off"]
        with guests.guest(extra) as g:
            # The guest's NIC comes up all the same: QEMU moves its packets.
            g.wait_for(r"VHOSTORCH-GUEST: nic eth0 up", timeout=120)
            assert "unable to start vhost net: 7: falling back on userspace virtio" in (
                guests.qemu_log(g)
            )
            report = report_of(g.pid)
            why = report["nics"][0]["reason"]
            assert why is not None and why["code"] == "qemu-fallback", why
            assert why["evidence"]["log"] == os.path.join(g.workdir, "qemu.log")
            (line,) = why["evidence"]["lines"]
            assert "unable to start vhost net: 7: falling back on userspace virtio" in line
            fds = [c for c in report["checks"] if c["id"] == "nic.vhost.fds"]
            assert [c["status"] for c in fds] == ["pass"]  # it does hold the device
            judged_alike(report, untraced_report_of(g.pid))
            # The monitor alone says it too: driver up, vhost not started.
            done = vhostorch("check", "--qmp", sock, "--json")
            by_qmp = json.loads(done.stdout)["nics"][0]["reason"]
            assert by_qmp["code"] == "qemu-fallback", by_qmp
            assert by_qmp["evidence"]["monitor"]["vhost_started"] is False
            assert "VIRTIO_CONFIG_S_DRIVER_OK" in " ".join(by_qmp["evidence"]["monitor"]["status"])
        assert not os.path.exists(sock)  # QEMU removes its socket when it stops


# QEMU 10.0's words for kernel_irqchip=off with KVM (7.2 ran it, deprecated).
USERSPACE_APIC_REFUSED = "KVM does not support userspace APIC"


def _irqchip_guest(machine: str, cpu: str | None) -> list[str]:
    argv = guests.qemu_argv("/dev/null", "", [])
    at = argv.index("-M")
    argv[at + 1] = machine
    at = argv.index("-cpu")
    if cpu is None:
        del argv[at : at + 2]
    else:
        argv[at + 1] = cpu
    return argv


@pytest.mark.parametrize("machine", ["pc", "q35"])
@pytest.mark.parametrize("cpu", ["host", "host,kvm-poll-control=off"])
def test_qemu_refuses_kernel_irqchip_off_with_cpu_host(
    in_testhost: None, machine: str, cpu: str
) -> None:
    """QEMU 7.2 with KVM and kernel_irqchip=off aborts with -cpu host: KVM refuses an MSR.
    QEMU 10.0 refuses kernel_irqchip=off with KVM whatever the CPU model."""
    argv = _irqchip_guest(f"{machine},kernel_irqchip=off", cpu)
    done = subprocess.run([*argv, "-S"], capture_output=True, text=True, timeout=60)
    if guests.qemu_version() >= (10, 0):
        assert done.returncode == 1, done.stderr
        assert USERSPACE_APIC_REFUSED in done.stderr
        return
    assert done.returncode == -6, done.stderr
    assert "failed to set MSR 0x4b564d06 to 0x0" in done.stderr
    assert "kvm_buf_set_msrs: Assertion" in done.stderr


@pytest.mark.parametrize(
    ("machine", "cpu", "code"),
    [("pc,kernel_irqchip=off", None, "irqchip-off"), ("pc,kernel_irqchip=split", "host", None)],
    ids=["off", "split"],
)
def test_kernel_irqchip(traced: None, machine: str, cpu: str | None, code: str | None) -> None:
    """off: vhost runs but no call eventfd is an irqfd (QEMU 7.2; QEMU 10.0 refuses to start,
    so irqchip-off is a reason only older QEMUs give). split: the IOAPIC is in QEMU but MSI-X
    still goes through KVM irqfds, so no reason (a false alarm would be a bug)."""
    if code is not None and guests.qemu_version() >= (10, 0):
        done = subprocess.run([*_irqchip_guest(machine, cpu), "-S"], capture_output=True,
                              text=True, timeout=60)  # fmt: skip
        assert done.returncode == 1 and USERSPACE_APIC_REFUSED in done.stderr, done.stderr
        return
    with guests.tap(1) as name:
        netdev = guests.vhost_netdev(name, 1)
        workdir = f"/tmp/{name}"
        os.mkdir(workdir)
        console = f"{workdir}/console.log"
        argv = _irqchip_guest(machine, cpu)
        argv[argv.index("-serial") + 1] = f"file:{console}"
        with open(f"{workdir}/qemu.log", "wb") as log:
            proc = subprocess.Popen(
                [*argv, *netdev], stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        try:
            g = guests.Guest(proc, console, workdir)
            g.wait_for(r"VHOSTORCH-GUEST: nic eth0 up", timeout=120)
            report = report_of(g.pid)
            why = report["nics"][0]["reason"]
            calls = {c["status"] for c in report["checks"] if c["id"] == "nic.call"}
            fds = {c["status"] for c in report["checks"] if c["id"] == "nic.vhost.fds"}
            assert fds == {"pass"}
            if code is None:
                assert why is None, why
                assert calls == {"pass"}
            else:
                assert why is not None and why["code"] == code, why
                assert why["evidence"] == {"kernel_irqchip": "off"}
                assert calls == {"fail"}
            judged_alike(report, untraced_report_of(g.pid))
        finally:
            guests.stop(proc)
            subprocess.run(["rm", "-rf", workdir], check=False)


DENIED = "tap: open vhost char device failed: Permission denied"


@pytest.fixture
def vhost_net_mode_000(in_testhost: None) -> Iterator[None]:
    mode = os.stat("/dev/vhost-net").st_mode & 0o7777
    os.chmod("/dev/vhost-net", 0)
    try:
        yield
    finally:
        os.chmod("/dev/vhost-net", mode)


@pytest.mark.parametrize(
    ("user", "options", "returncode", "says"),
    [
        ("nobody", "vhost=on", -6, f"warning: {DENIED}"),  # then net_client_init1's assertion
        ("nobody", "vhost=on,vhostforce=on", 1, DENIED),
        ("root", "vhost=on", None, ""),
    ],
    ids=["vhost", "vhostforce", "root"],
)  # fmt: skip
def test_a_qemu_that_may_not_open_vhost_net_does_not_run(
    vhost_net_mode_000: None, user: str, options: str, returncode: int | None, says: str
) -> None:
    """Why there is no vhost-net-denied code: QEMU that cannot open the device refuses to
    start (7.2 warns, then aborts on an assertion; 10.0 says it as an error and exits 1);
    root (QEMU as root, or libvirtd, which opens it for its QEMUs) is not stopped by the
    mode."""
    if (user, options) == ("nobody", "vhost=on") and guests.qemu_version() >= (10, 0):
        returncode, says = 1, f"vhost=on: {DENIED}"
    with guests.tap(1) as name:
        argv = [
            "qemu-system-x86_64", "-accel", "tcg", "-S", "-display", "none", "-nodefaults",
            "-m", "64", "-netdev", f"tap,id=n0,ifname={name},script=no,downscript=no,{options}",
            "-device", "virtio-net-pci,netdev=n0",
        ]  # fmt: skip
        if user == "nobody":  # with CAP_NET_ADMIN, so that the tap opens
            argv = [
                "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                "--inh-caps=+net_admin", "--ambient-caps=+net_admin", *argv,
            ]  # fmt: skip
            done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
            assert done.returncode == returncode, done.stderr
            assert says in done.stderr
            assert (returncode == -6) == ("net_client_init1: Assertion `nc' failed" in done.stderr)
            return
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 20
            while "/dev/vhost-net" not in guests.fd_targets(proc.pid).values():
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        finally:
            guests.stop(proc)
