"""The pure parts of starting VMs: the vhost decision, QEMU's command line and device
arguments, the domain XML, and the state files (the real runs are in test_up.py)."""

from __future__ import annotations

import ast
import os
import pathlib
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from vhostorch.backends import process, qmp
from vhostorch.backends.contract import Begun, Description, Plugged
from vhostorch.check.report import FAIL, PASS, WARN
from vhostorch.errors import OperationFailed
from vhostorch.kernel import procfs
from vhostorch.libvirt import domxml
from vhostorch.orchestrate import Host, decide
from vhostorch.taps import TapSpec
from vhostorch.vm import spec, state
from vhostorch.vm.spec import NicSpec, VmSpec
from vhostorch.vm.state import VmState

if TYPE_CHECKING:
    from collections.abc import Sequence

    from vhostorch.check.observe import Observation

GOOD = Host((PASS, "/dev/vhost-net is present"), (PASS, "/dev/kvm is usable (kvm_amd)"))
NO_VHOST = Host((FAIL, "/dev/vhost-net is missing"), (PASS, "/dev/kvm is usable"))
PVM = Host((PASS, "/dev/vhost-net is present"), (WARN, "KVM here is kvm_pvm"))
NO_KVM = Host((FAIL, "/dev/vhost-net is missing"), (FAIL, "/dev/kvm is missing"))


def nic(vhost: str, queues: int = 1, name: str = "t0") -> NicSpec:
    return NicSpec(TapSpec(name, queues=queues), "52:54:00:00:00:01", vhost=vhost)


def test_vhost_is_given_when_the_host_has_it() -> None:
    decided = decide([nic("required"), nic("preferred"), nic("off")], "kvm", "qmp", GOOD)
    assert [(on, why) for _, on, why in decided] == [(True, None), (True, None), (False, None)]


def test_required_is_refused_and_preferred_falls_back_with_the_reason() -> None:
    with pytest.raises(
        OperationFailed,
        match=r'nic\[0\] \(t0\): vhost = "required" cannot be had: '
        r"this host has no usable /dev/vhost-net \(/dev/vhost-net is missing\)",
    ):
        decide([nic("required")], "kvm", "qmp", NO_VHOST)  # fmt: skip
    [(_, on, why)] = decide([nic("preferred")], "kvm", "libvirt", NO_VHOST)
    assert (on, why) == (False, "this host has no usable /dev/vhost-net")
    # The index in the message is the NIC's place in the VM (hot-plug passes it on).
    with pytest.raises(OperationFailed, match=r"nic\[3\]"):
        decide([nic("required")], "kvm", "qmp", NO_VHOST, first=3)


def test_libvirt_needs_kvm_for_vhost_but_qemu_honours_it_under_tcg() -> None:
    with pytest.raises(OperationFailed, match="libvirt uses vhost only for type='kvm'"):
        decide([nic("required")], "tcg", "libvirt", GOOD)
    [(_, on, why)] = decide([nic("preferred")], "tcg", "libvirt", GOOD)
    assert not on and why is not None and "type='kvm'" in why
    [(_, on, why)] = decide([nic("required")], "tcg", "qmp", GOOD)
    assert on and why is None


def test_kvm_that_cannot_run_guests_refuses_required_and_kvm_missing_refuses_the_vm() -> None:
    with pytest.raises(OperationFailed, match=r"KVM is not usable \(KVM here is kvm_pvm\)"):
        decide([nic("required")], "kvm", "qmp", PVM)
    with pytest.raises(OperationFailed, match='accel = "kvm" but KVM is not usable'):
        decide([nic("off")], "kvm", "qmp", NO_KVM)
    assert decide([nic("off")], "tcg", "qmp", NO_KVM)[0][1] is False


def vm_spec(**changes: object) -> VmSpec:
    base: dict[str, object] = {
        "name": "vm1", "cpus": 2, "memory": 384,
        "boot": {"kernel": "/k", "initrd": "/i", "cmdline": "console=ttyS0 a=<&>"},
        "nic": [{"tap": "vm1-a", "queues": 4, "rx_queue_size": 1024, "mtu": 9000},
                {"tap": "vm1-b", "vhost": "off"}],
    }  # fmt: skip
    base.update(changes)
    return spec.from_mapping(base)


def test_qemu_command_line_has_no_network_and_a_paused_daemon_with_qmp() -> None:
    argv = process.argv(vm_spec(), "/run/w", 7)
    assert "-netdev" not in argv and "-nic" not in argv and "-device" not in argv
    assert {"-S", "-nodefaults", "-no-user-config"} <= set(argv)
    # Not daemonized: -daemonize forks after the sandbox is set, which spawn=deny kills.
    assert "-daemonize" not in argv and "-runas" not in argv
    assert argv[argv.index("-sandbox") + 1] == (
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
    )
    assert argv[argv.index("-qmp") + 1] == "unix:/run/w/qemu/qmp.sock,server=on,wait=off"
    # The console is a file root made, handed over as an fd: QEMU opens no path of its own.
    assert argv[argv.index("-add-fd") + 1] == "fd=7,set=1"
    assert argv[argv.index("-serial") + 1] == "file:/dev/fdset/1"
    assert "-pidfile" not in argv
    assert argv[argv.index("-append") + 1] == "console=ttyS0 a=<&>"  # one argv word, no shell
    assert argv[argv.index("-cpu") + 1] == "host"
    assert "-cpu" not in process.argv(vm_spec(accel="tcg"), "/w", 7)
    with tempfile.NamedTemporaryFile(suffix=",x.img") as disk:
        disk.write(b"QFI\xfb" + bytes(60))
        disk.flush()
        argv = process.argv(vm_spec(boot={"disk": disk.name}), "/w", 7)
        drive = argv[argv.index("-drive") + 1]
        assert drive == f"file={disk.name.replace(',', ',,')},if=virtio,format=qcow2"


def test_device_arguments_size_the_device_for_its_queues() -> None:
    four, one = vm_spec().nics
    assert qmp.device_args(four) == {
        "driver": "virtio-net-pci", "id": "nic.vm1-a", "netdev": "tap.vm1-a",
        "mac": four.mac, "mq": True, "vectors": 10, "rx_queue_size": 1024, "host_mtu": 9000,
    }  # fmt: skip
    assert "mq" not in qmp.device_args(one) and "vectors" not in qmp.device_args(one)


def test_domain_xml_reads_back_as_what_the_spec_asks() -> None:
    s = vm_spec()
    xml = domxml.render(s, [(s.nics[0], True), (s.nics[1], False)], "/run/w/console.log")
    domain = domxml.parse(xml)
    assert (domain.name, domain.type) == ("vm1", "kvm")
    assert [(i.type, i.target, i.model, i.driver, i.queues, i.mac) for i in domain.interfaces] == [
        ("ethernet", "vm1-a", "virtio", "vhost", 4, s.nics[0].mac),
        ("ethernet", "vm1-b", "virtio", "qemu", 1, s.nics[1].mac),
    ]
    root = ET.fromstring(xml)
    assert root.find("devices/interface/target").get("managed") == "no"  # type: ignore[union-attr]
    assert root.find("devices/interface/mtu").get("size") == "9000"  # type: ignore[union-attr]
    assert root.findtext("os/cmdline") == "console=ttyS0 a=<&>"
    assert root.find("features/acpi") is not None  # PCI hot-plug on 'pc' needs it
    assert domxml.parse(domxml.render(vm_spec(accel="tcg"), [], "/c")).type == "qemu"


def test_state_round_trips_and_the_lock_leaves_nothing_without_state(tmp_path: Path) -> None:
    root = str(tmp_path)  # pytest's, removed with its other runs (a mkdtemp here was left behind)
    nics = (state.NicState("t0", "nic.t0", "tap.t0", 2, "52:54:00:00:00:01", "preferred",
                             False, "no vhost", True),)  # fmt: skip
    # This test's own process stands for the VM's QEMU: by_pid wants its pid and start time.
    me, started = os.getpid(), procfs.start_time(os.getpid())
    saved = state.VmState("vm1", "qmp", me, "tcg", "/q", None, "/w", nics, start_time=started)
    with state.Lock("vm1", root):
        state.save(saved, root)
    assert state.load("vm1", root) == saved
    assert state.by_pid(me, root) == saved and state.by_pid(me + 1, root) is None
    # The same pid with another start time (a VM that died without down, its pid reused by
    # any user's process; issue 19, B3) is not that VM.
    with state.Lock("vm1", root):
        state.save(saved.replace(start_time=(started or 0) + 1), root)
    assert state.by_pid(me, root) is None
    with state.Lock("vm1", root):
        state.remove("vm1", root)
    assert os.listdir(root) == []
    with open(os.path.join(root, "vm2.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(OperationFailed, match=r"vm2\.json is unreadable"):
        state.load("vm2", root)
    assert list(state.every(root)) == []  # a damaged file hides no other VM


def test_up_waits_out_a_vector_the_guest_masked_for_a_moment() -> None:
    from vhostorch.check.report import MASKED, RELAYED_INTERRUPT, Check, QemuTarget, Report
    from vhostorch.orchestrate.settle import _settled

    nics = (state.NicState("t0", "nic.t0", "tap.t0", 1, "52:54:00:00:00:01", "required",
                             True, None, True),)  # fmt: skip
    saved = state.VmState("vm1", "qmp", 123, "kvm", "/q", None, "/w", nics)
    started = Check("nic.vhost.started", PASS, "up", nic="nic.t0")

    def report(call: Check) -> Report:
        return Report(QemuTarget(123, "vm1"), (), (started, call))

    at = {"nic": "nic.t0", "queue": 1}
    masked = Check("nic.call", WARN, "masked", {"masked": True}, **at, cause=MASKED)
    assert not _settled(report(masked), saved)
    for final in (
        Check("nic.call", PASS, "irqfd", {"masked": False}, **at),
        Check("nic.call", FAIL, "no irqfd", {"masked": False}, **at, cause=RELAYED_INTERRUPT),
    ):
        assert _settled(report(final), saved)


class _Recorded:
    """A third backend, registered for one test: what orchestrate asked of it, in order. It
    implements the whole contract (backends.contract.Backend: seven members)."""

    def __init__(self, tap: str, calls: list[str]) -> None:
        self.tap, self.calls = tap, calls

    def _saw(self, call: str) -> None:
        here = os.path.exists(f"/sys/class/net/{self.tap}")
        self.calls.append(f"{call} ({'tap present' if here else 'no tap'})")

    def describe(self) -> Description:
        return Description("qmp", False, None, (PASS, FAIL))

    def begin(self, spec: VmSpec, workdir: str, uri: str | None, user: str | None) -> Begun:
        self._saw("begin")
        return Begun("fake VM", os.getpid(), runs_as="nobody")

    def plug(self, state: state.VmState, nics: Sequence[tuple[NicSpec, bool]]) -> Plugged:
        self._saw("plug")
        ids = tuple((f"nic.{n.tap.name}", f"tap.{n.tap.name}") for n, _ in nics)
        return Plugged(os.getpid(), None, None, ids)

    def unplug(self, state: state.VmState, nic: state.NicState, timeout: float) -> None:
        self._saw("unplug")

    def stop(self, state: VmState) -> None:
        self._saw("stop")

    def observe(self, state: VmState) -> Observation:
        self._saw("observe")
        raise OperationFailed("no such NIC")

    def ask(self, state: state.VmState, devices: Sequence[str]) -> list[str] | None:
        if devices:
            self._saw("ask")
        return None


def test_the_contract_has_at_most_seven_members_and_each_backend_describes_itself() -> None:
    """os-vif's PluginBase is describe, plug and unplug: the fewer members a backend must
    implement, the likelier the next one is written."""
    from vhostorch import backends
    from vhostorch.backends import contract

    source = pathlib.Path(contract.__file__).read_text()
    tree = ast.parse(source)
    [protocol] = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "Backend"]
    members = [n.name for n in protocol.body if isinstance(n, ast.FunctionDef)]
    assert len(members) <= 7 and len(protocol.body) - 1 == len(members), members
    protocols = [
        n.name for n in ast.walk(tree)
        if isinstance(n, ast.ClassDef) and any(ast.unparse(b) == "Protocol" for b in n.bases)
    ]  # fmt: skip
    assert protocols == ["Backend"]
    assert set(members) <= {m for m in dir(_Recorded) if not m.startswith("_")}
    for name in backends.NAMES:
        assert backends.get(name).describe().name == name
    assert backends.taking_uri() == ("libvirt",)


def test_orchestrate_imports_no_backend_module() -> None:
    """Only the registry and the contract: what a backend keeps, and where, is its own."""
    import vhostorch.orchestrate

    allowed = {"vhostorch.backends", "vhostorch.backends.contract"}
    for path in pathlib.Path(vhostorch.orchestrate.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported = {f"{node.module}.{a.name}" for a in node.names} | {node.module}
                reached = {
                    m
                    for m in imported
                    if m.startswith(("vhostorch.backends.", "vhostorch.libvirt", "vhostorch.qemu"))
                }
                assert reached <= allowed | {
                    f"vhostorch.backends.contract.{a.name}" for a in node.names
                }, (path.name, reached)


@pytest.mark.kernel
def test_a_third_backend_is_rolled_back_in_order_the_vm_stopped_before_its_taps_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.support.kernel import unique
    from vhostorch import backends, orchestrate

    if os.geteuid() != 0:
        pytest.skip("makes a tap: needs root")
    tap = unique("vk")
    calls: list[str] = []
    monkeypatch.setitem(backends._BY_NAME, "fake", lambda: _Recorded(tap, calls))
    fake = spec.from_mapping({"name": "vm1", "boot": {"kernel": "/k"}, "nic": [{"tap": tap}]})
    with pytest.raises(OperationFailed, match="no such NIC"):
        orchestrate.up(fake, "fake", wait=0, root=str(tmp_path), host=GOOD)
    # The VM is begun before its taps are made, and stopped (once) before they go.
    assert calls == [
        "begin (no tap)", "plug (tap present)", "observe (tap present)", "stop (tap present)",
    ]  # fmt: skip
    assert not os.path.exists(f"/sys/class/net/{tap}")
    assert [f for f in os.listdir(tmp_path) if f.endswith(".json")] == []


def test_a_start_killed_outright_is_undone_by_its_backends_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a killed `up` left is found by the backend (the QMP backend: the QEMU serving
    its socket), not by orchestrate: `down` hands the recorded state to ``stop``."""
    from vhostorch import backends, orchestrate

    calls: list[str] = []
    seen: list[state.VmState] = []

    class Stopped(_Recorded):
        def stop(self, state: state.VmState) -> None:
            seen.append(state)
            super().stop(state)

    monkeypatch.setitem(backends._BY_NAME, "fake", lambda: Stopped("vho-none", calls))
    workdir = str(tmp_path / "vm1.d")
    killed = state.VmState(
        "vm1", "fake", 0, "tcg", None, None, workdir, (), status=state.STARTING,  # type: ignore[arg-type]
        launched_after=1234, vm_id="an-id",
    )  # fmt: skip
    with state.Lock("vm1", str(tmp_path)):
        state.save(killed, str(tmp_path))
    removed = orchestrate.down("vm1", root=str(tmp_path))
    assert calls == ["stop (no tap)"] and seen == [killed] and removed.state == killed
    assert state.load("vm1", str(tmp_path)) is None
