"""`vhostorch up / nic add / nic del / down`: one conformance suite, run against both backends.

In the test host (real vhost-net and KVM): every check passes with --strict, for
1 and 4 queue pairs, before and after a hot-plug. On this machine (no
/dev/vhost-net, no usable KVM): `required` is refused before anything is
touched, `preferred` starts a TCG VM whose check reports the fallback. Every
run ends with nothing left: no QEMU, tap, domain or state file.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import guests, kernel
from tests.support.kernel import vhostorch
from tests.support.vms import link_exists, run
from vhostorch.check import wiring
from vhostorch.kernel import procfs, tun
from vhostorch.lab.run import read_text
from vhostorch.vm import state

BACKENDS = ["qmp", "libvirt"]
# Every check of a healthy vhost NIC (kick and call once per virtqueue).
NIC_CHECKS = {
    "nic.vhost.requested", "nic.queues", "nic.tap.fds", "nic.vhost.fds", "nic.vhost.worker",
    "nic.vhost.started", "nic.vhost.memtable", "nic.kick", "nic.call", "nic.features",
    "nic.vhost.placement",
}  # fmt: skip


def domain_defined(name: str) -> bool:
    done = subprocess.run(
        ["virsh", "-c", "qemu:///system", "dominfo", name], capture_output=True, text=True
    )
    return done.returncode == 0


def leftovers(name: str, taps: list[str], pid: int | None) -> list[str]:
    """What a VM left behind after `down` (or a refused start): nothing, when all is well."""
    left = [f"tap {t}" for t in taps if link_exists(t)]
    left += [f for f in os.listdir(state.STATE_DIR) if f.startswith(f"{name}.")]
    if pid is not None and procfs.alive(pid):
        left.append(f"QEMU pid {pid}")
    if domain_defined(name):
        left.append(f"domain {name}")
    return left


def nic_fds(pid: int, tap: str) -> tuple[int, int]:
    """(fds on ``tap``, /dev/vhost-net fds) held by QEMU ``pid``."""
    process = procfs.read(pid)
    return (
        sum(1 for fd in process.fds if fd.tap == tap),
        len(process.fds_to(procfs.VHOST_NET)),
    )


def root_ports(pid: int) -> int:
    """pcie-root-ports of QEMU ``pid`` with nothing plugged in, as QOM lists them (the bus of
    port ID is /machine/peripheral/ID/ID, with a child[N] per device on it), asked over the
    QMP socket on its command line (QMP backend) or through libvirt's monitor."""
    from vhostorch.qemu import args

    parsed = args.parse(procfs.read(pid).argv)
    if parsed.qmp is not None and "/libvirt/" not in parsed.qmp:
        from vhostorch.qemu.monitor import QmpSocket

        sock = QmpSocket(parsed.qmp, 5)
        sock.open()
        try:
            return _free_ports(sock.execute)
        finally:
            sock.close()
    import libvirt
    import libvirt_qemu

    conn = libvirt.open("qemu:///system")
    try:
        dom = conn.lookupByName(str(parsed.name))

        def execute(command: str, arguments: dict[str, Any]) -> Any:
            sent = json.dumps({"execute": command, "arguments": arguments})
            return json.loads(libvirt_qemu.qemuMonitorCommand(dom, sent, 0))["return"]

        return _free_ports(execute)
    finally:
        conn.close()


def _free_ports(execute: Any) -> int:
    free = 0
    for prop in execute("qom-list", {"path": "/machine/peripheral"}):
        if prop["type"] != "child<pcie-root-port>":
            continue
        port = prop["name"]
        on_bus = execute("qom-list", {"path": f"/machine/peripheral/{port}/{port}"})
        free += not any(str(p["name"]).startswith("child[") for p in on_bus)
    return free


def by_nic(report: dict[str, Any], device: str) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for c in report["checks"]:
        if c["nic"] == device:
            found.setdefault(c["id"], []).append(c)
    return found


@pytest.fixture
def workdir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="vho-up-")
    os.chmod(path, 0o755)
    yield path
    subprocess.run(["rm", "-rf", path], check=False)


@pytest.fixture
def downed() -> Iterator[list[str]]:
    """VM names a test started; any still up at the end are taken down."""
    names: list[str] = []
    yield names
    for name in names:
        if state.load(name) is not None:
            vhostorch("down", name)


@pytest.fixture
def trace_restored(in_testhost: None) -> Iterator[None]:
    """`up` arms the wiring trace (host-wide); put it back as it was."""
    was = wiring.armed()
    yield
    if not was:
        wiring.disarm()


def libvirt_if(backend: str, request: pytest.FixtureRequest) -> None:
    if backend == "libvirt":
        request.getfixturevalue("libvirtd")


@pytest.mark.testhost
# q35 (PCIe root ports for hot-plug) with 4 queue pairs only: 1 pair adds nothing q35-specific
# and each lifecycle costs the test host session about 30 s.
@pytest.mark.parametrize(
    "machine, queues", [("pc", 1), ("pc", 4), ("q35", 4)], ids=["pc-1", "pc-4", "q35-4"]
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_vhost_vm_lifecycle_passes_every_check(
    backend: str,
    machine: str,
    queues: int,
    workdir: str,
    downed: list[str],
    trace_restored: None,
    request: pytest.FixtureRequest,
) -> None:
    libvirt_if(backend, request)
    name = kernel.unique("vho-vm")
    first, second = kernel.unique("vu"), kernel.unique("vp")
    spec = guests.spec_file(workdir, name, [{"tap": first, "queues": queues}], machine=machine)
    downed.append(name)

    code, out, err = run("up", spec, "--backend", backend, "--strict")
    not_passed = [c for c in out.get("check", {}).get("checks", []) if c["status"] != "pass"]
    assert code == 0, err or json.dumps(not_passed, indent=1)
    assert out["driver_up"] is True
    pid = out["vm"]["pid"]
    device = out["vm"]["nics"][0]["device"]
    checks = by_nic(out["check"], device)
    assert set(checks) == NIC_CHECKS
    assert len(checks["nic.kick"]) == len(checks["nic.call"]) == 2 * queues
    assert nic_fds(pid, first) == (queues, queues)
    if backend == "qmp":
        # Nothing about the NIC is on QEMU's command line: it all came over QMP.
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert b"-netdev" not in f.read()
        assert "QMP netdev_add" in checks["nic.vhost.requested"][0]["evidence"]["declared_by"]

    code, out, err = run("nic", "add", name, "--tap", second, "--queues", str(queues), "--strict")
    not_passed = [c for c in out.get("check", {}).get("checks", []) if c["status"] != "pass"]
    assert code == 0, err or json.dumps(not_passed, indent=1)
    plugged = next(n for n in out["vm"]["nics"] if n["tap"] == second)
    checks = by_nic(out["check"], plugged["device"])
    assert set(checks) == NIC_CHECKS, checks.keys()
    assert len(checks["nic.kick"]) == 2 * queues
    assert nic_fds(pid, second) == (queues, 2 * queues)
    # `check --pid` (another process, later) knows the hot-plugged NIC from vhostorch's state.
    done = vhostorch("check", "--pid", str(pid), "--strict", "--json")
    assert done.returncode == 0, done.stdout[-3000:]
    assert len(json.loads(done.stdout)["nics"]) == 2
    # Untraced (issue 23): both NICs, the hot-plugged one too, pass from the live state.
    wiring.disarm()
    try:
        done = vhostorch("check", "--pid", str(pid), "--strict", "--json")
    finally:
        wiring.arm()
    assert done.returncode == 0, done.stdout[-3000:]
    wired = [c for c in json.loads(done.stdout)["checks"] if c["id"] in ("nic.kick", "nic.call")]
    assert len(wired) == 8 * queues and {c["evidence"]["source"] for c in wired} == {"live"}

    if machine == "q35":
        assert root_ports(pid) == 4 - 1  # 4 spare (the default), one taken by the hot-plug
    code, out, err = run("nic", "del", name, second)
    assert code == 0, err
    assert nic_fds(pid, second) == (0, queues)
    assert not link_exists(second)
    assert [n["tap"] for n in out["vm"]["nics"]] == [first]

    code, out, err = run("down", name)
    assert code == 0, err
    assert out["taps_removed"] == [first]
    assert leftovers(name, [first, second], pid) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_required_vhost_is_refused_before_anything_starts(
    backend: str, workdir: str, request: pytest.FixtureRequest
) -> None:
    if os.path.exists("/dev/vhost-net"):
        pytest.skip("this host has /dev/vhost-net: the refusal is tested where it has none")
    libvirt_if(backend, request)
    name = kernel.unique("vho-vm")
    tap = kernel.unique("vr")
    spec = guests.spec_file(workdir, name, [{"tap": tap, "vhost": "required"}], accel="tcg")
    code, out, err = run("up", spec, "--backend", backend)
    assert code == 1 and out["ok"] is False
    assert err.count("\n") == 1 and "Traceback" not in err
    assert 'vhost = "required" cannot be had: this host has no usable /dev/vhost-net' in err
    assert "nothing was started" in err
    assert leftovers(name, [tap], None) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_preferred_starts_tcg_and_the_check_reports_the_fallback(
    backend: str, workdir: str, downed: list[str], request: pytest.FixtureRequest
) -> None:
    if os.path.exists("/dev/vhost-net"):
        pytest.skip("this host has /dev/vhost-net: there is no fallback to report")
    libvirt_if(backend, request)
    name = kernel.unique("vho-vm")
    first, second = kernel.unique("vf"), kernel.unique("vo")
    spec = guests.spec_file(
        workdir, name, [{"tap": first, "queues": 2, "vhost": "preferred"}], accel="tcg"
    )
    downed.append(name)
    code, out, err = run("up", spec, "--backend", backend)
    assert code == 0, err
    pid = out["vm"]["pid"]
    status = {(c["id"], c["nic"]): c for c in out["check"]["checks"]}
    device = out["vm"]["nics"][0]["device"]
    assert status[("host.vhost-net", None)]["status"] == "warn"
    assert status[("vm.kvm", None)]["status"] == "warn"
    fallback = status[("nic.vhost.requested", device)]
    assert fallback["status"] == "warn"
    assert "no usable /dev/vhost-net" in fallback["message"]
    assert "userspace data path" in fallback["message"]
    assert status[("nic.tap.fds", device)]["status"] == "pass"
    assert ("nic.vhost.fds", device) not in status  # nothing to attach, nothing claimed
    assert nic_fds(pid, first) == (2, 0)
    # --strict turns the fallback into a failure.
    assert vhostorch("check", "--pid", str(pid), "--strict").returncode == 1
    # Unplugging needs the guest's ACPI hot-plug: wait until it has booted (TCG is slow).
    console = os.path.join(out["vm"]["workdir"], "console.log")
    deadline = time.monotonic() + 120
    while "VHOSTORCH-GUEST: ready" not in read_text(console):
        assert time.monotonic() < deadline, read_text(console)[-2000:]
        time.sleep(0.5)

    code, out, err = run("nic", "add", name, "--tap", second, "--vhost", "off")
    assert code == 0, err
    plugged = next(n for n in out["vm"]["nics"] if n["tap"] == second)
    status = {(c["id"], c["nic"]): c for c in out["check"]["checks"]}
    assert status[("nic.vhost.requested", plugged["device"])]["status"] == "pass"
    assert "off for this NIC" in status[("nic.vhost.requested", plugged["device"])]["message"]
    assert nic_fds(pid, second) == (1, 0)
    code, out, err = run("nic", "del", name, second)
    assert code == 0, err
    assert nic_fds(pid, second) == (0, 0) and not link_exists(second)

    code, out, err = run("down", spec)  # a spec file names the VM too
    assert code == 0, err
    assert leftovers(name, [first, second], pid) == []


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "breakage, messages",
    [
        (
            {"machine": "nosuchmachine"},
            {"qmp": "QEMU exited at start: unsupported machine type",
             "libvirt": "libvirt refused the domain: XML error"},
        ),
        (
            {"kernel": "/nonexistent/vmlinuz"},
            {"qmp": "could not open kernel file '/nonexistent/vmlinuz'",
             "libvirt": "/nonexistent/vmlinuz"},
        ),
    ],
)  # fmt: skip
def test_a_start_that_fails_rolls_back_the_taps(
    backend: str,
    breakage: dict[str, str],
    messages: dict[str, str],
    workdir: str,
    request: pytest.FixtureRequest,
) -> None:
    message = messages[backend]
    libvirt_if(backend, request)
    name = kernel.unique("vho-vm")
    taps = [kernel.unique("vb"), kernel.unique("vb")]
    nics: list[dict[str, object]] = [
        {"tap": taps[0], "vhost": "preferred"}, {"tap": taps[1], "queues": 2, "vhost": "off"}
    ]  # fmt: skip
    spec = guests.spec_file(workdir, name, nics, accel="tcg", **breakage)
    code, out, err = run("up", spec, "--backend", backend)
    assert code == 1 and out["ok"] is False, err
    assert message in err and err.count("\n") == 1, err
    assert leftovers(name, taps, None) == []


def test_a_tap_in_use_is_refused_and_left_as_it_was(workdir: str) -> None:
    name = kernel.unique("vho-vm")
    free, held = kernel.unique("vb"), kernel.unique("vh")
    assert vhostorch("tap", "create", held, "--queues", "2").returncode == 0
    fds = tun.open_queues(held, 2)  # another process's VM, say
    try:
        nics: list[dict[str, object]] = [
            {"tap": free, "vhost": "preferred"}, {"tap": held, "queues": 2, "vhost": "off"}
        ]  # fmt: skip
        spec = guests.spec_file(workdir, name, nics, accel="tcg")
        code, _, err = run("up", spec)
        assert code == 1, err
        assert f"tap {held}" in err and "held open" in err and str(os.getpid()) in err
        assert leftovers(name, [free], None) == []
        assert nic_fds(os.getpid(), held) == (2, 0)  # still ours, untouched
    finally:
        for fd in fds:
            os.close(fd)
        vhostorch("tap", "delete", held)


def test_up_twice_and_down_of_an_unknown_vm_are_refused(workdir: str, downed: list[str]) -> None:
    name = kernel.unique("vho-vm")
    tap = kernel.unique("vt")
    spec = guests.spec_file(workdir, name, [{"tap": tap, "vhost": "off"}], accel="tcg")
    downed.append(name)
    code, out, err = run("up", spec, "--wait", "0")
    assert code == 0, err
    code, _, err = run("up", spec)
    assert code == 1 and f"VM {name} is already up (pid {out['vm']['pid']}" in err
    assert vhostorch("down", name).returncode == 0
    done = vhostorch("down", name)
    assert done.returncode == 1 and f"has not started a VM named '{name}'" in done.stderr
    bad = vhostorch("down", "../etc")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
