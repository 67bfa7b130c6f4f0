"""The hook installed into a real libvirtd: taps follow the domain, enforce stops a start.

On this machine (TCG domains; libvirt drops <driver name='vhost'/> for them without a
word, which is what enforce is for) and in the test host (KVM, real vhost-net). The
hook goes in as /etc/libvirt/hooks/qemu.d/<unique name>; libvirtd (the one the tests
started) is restarted to see it, and again once it is removed.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import daemons, guests, kernel
from tests.support.kernel import statuses
from vhostorch import taps
from vhostorch.check import wiring
from vhostorch.hook import install
from vhostorch.hook.metadata import ManagedTap, render
from vhostorch.hook.state import Places
from vhostorch.kernel import procfs
from vhostorch.taps import TapSpec


@pytest.fixture(scope="module")
def hooked(libvirtd: str) -> Iterator[str]:
    name = kernel.unique("vho-hook")
    install.install(name)
    try:
        daemons.restart_libvirtd()
        yield libvirtd
    finally:
        install.uninstall(name)
        daemons.restart_libvirtd()


def virsh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True)


@pytest.fixture
def domains() -> Iterator[list[str]]:
    """Domains a test defined: destroyed and undefined at the end."""
    names: list[str] = []
    yield names
    for name in names:
        virsh("destroy", name)
        virsh("undefine", name)


def define(names: list[str], vtype: str, verify: str, meta: str | None = None) -> tuple[str, str]:
    name, tap = kernel.unique("vho-hd"), kernel.unique("vh")
    workdir = tempfile.mkdtemp(prefix="vho-hookxml-")
    metadata = meta if meta is not None else render([ManagedTap(TapSpec(tap), verify)], verify)
    xml = guests.domain_xml(name, tap, 1, vtype=vtype, metadata=metadata.replace("TAP", tap))
    path = os.path.join(workdir, "domain.xml")
    with open(path, "w") as f:
        f.write(xml)
    done = virsh("define", path)
    subprocess.run(["rm", "-rf", workdir], check=False)  # libvirt keeps its own copy
    assert done.returncode == 0, done.stderr
    names.append(name)
    return name, tap


def tap_of(name: str) -> taps.TapState | None:
    found = taps.show(name) if os.path.exists(f"/sys/class/net/{name}") else []
    return found[0] if found else None


def result(name: str) -> dict[str, Any]:
    with open(Places().result(name)) as f:
        data: dict[str, Any] = json.load(f)
    return data


def nothing_left(name: str, tap: str) -> list[str]:
    left = [f"tap {tap}"] if tap_of(tap) else []
    places = Places()
    left += [p for p in (places.result(name), places.held(name), places.claim(tap))
             if os.path.exists(p)]  # fmt: skip
    return left


def test_the_tap_lives_from_prepare_to_release_and_warn_only_reports(
    hooked: str, domains: list[str]
) -> None:
    name, tap = define(domains, "qemu", "warn")
    assert tap_of(tap) is None
    done = virsh("start", name)
    assert done.returncode == 0, done.stderr
    state = tap_of(tap)
    assert state is not None and state.managed and state.attached_queues == 1
    with open(f"/run/libvirt/qemu/{name}.pid") as f:
        pid = int(f.read())
    assert sum(1 for fd in procfs.read(pid).fds if fd.tap == tap) == 1
    data = result(name)
    # libvirt dropped vhost (a TCG domain): the check says so, warn lets the domain run.
    assert data["enforced_failures"] == [] and data["check"]["ok"] is False
    assert statuses(data["check"], "nic.vhost.fds") == {"fail"}
    assert virsh("destroy", name).returncode == 0
    assert nothing_left(name, tap) == []


def test_enforce_stops_a_start_that_has_no_vhost(hooked: str, domains: list[str]) -> None:
    name, tap = define(domains, "qemu", "enforce")
    done = virsh("start", name)
    assert done.returncode != 0
    # libvirt shows the hook's one line: the first enforced failure (here the root cause).
    expected = "vhost check failed (verify=enforce): host.vhost-net: /dev/vhost-net is missing"
    assert expected in done.stderr, done.stderr
    assert virsh("domstate", name).stdout.strip() == "shut off"
    assert nothing_left(name, tap) == []


def test_bad_metadata_refuses_the_start_and_leaves_nothing(hooked: str, domains: list[str]) -> None:
    bad = ("<vhostorch:vm xmlns:vhostorch='http://vhostorch.org/xmlns/libvirt/1'>"
           "<vhostorch:tap dev='TAP' verify='sometimes'/></vhostorch:vm>")  # fmt: skip
    name, tap = define(domains, "qemu", "warn", bad)
    done = virsh("start", name)
    assert done.returncode != 0
    assert "verify must be one of warn, enforce, not 'sometimes'" in done.stderr, done.stderr
    assert virsh("domstate", name).stdout.strip() == "shut off"
    assert nothing_left(name, tap) == []


@pytest.fixture
def trace_armed() -> Iterator[None]:
    """The wiring trace armed (as `vhostorch up` leaves it), then put back as it was."""
    was = wiring.armed()
    wiring.arm()
    yield
    if not was:
        wiring.disarm()


@pytest.mark.testhost
@pytest.mark.parametrize("traced", [True, False], ids=["traced", "untraced"])
def test_started_check_passes_with_real_vhost(
    hooked: str, domains: list[str], trace_armed: None, traced: bool
) -> None:
    if not traced:
        wiring.disarm()  # put back by trace_armed
    # With worker-cpus (issue 22): the hook pins the domain's vhost-net workers at `started`,
    # (one CPU here: the pin is applied, recorded and judged; the two-CPU test host proves
    # workers moving, test_placement_testhost), from /proc and the trace, or fd order
    # untraced, without a BPF load on libvirt's start path.
    element = render([ManagedTap(TapSpec("TAP"), "enforce")], "enforce")
    meta = element.replace("<vhostorch:vm ", "<vhostorch:vm worker-cpus='0' ", 1)
    name, tap = define(domains, "kvm", "enforce", meta)
    done = virsh("start", name)
    assert done.returncode == 0, done.stderr
    data = result(name)
    report = data["check"]
    assert data["enforced_failures"] == [] and report["ok"] is True, report
    assert data["worker_cpus"] == {"cpus": "0", "pinned": True, "errors": []}, data["worker_cpus"]
    [placed] = [c for c in report["checks"] if c["id"] == "nic.vhost.placement"]
    assert placed["status"] == "pass", placed
    assert placed["evidence"]["pin"] == {"cpus": "0", "source": "domain metadata", "vm": name}
    for check_id in ("nic.vhost.requested", "nic.tap.fds", "nic.vhost.fds", "nic.vhost.worker"):
        assert statuses(report, check_id) == {"pass"}, check_id
    if not traced:
        # Issue 23, a legitimate difference: the hook does not read the kernel's live state
        # (a BPF load is seconds under TCG, on libvirt's start path, and at `started` the
        # driver has wired nothing to read), so untraced its kick, call and started are
        # unknown, saying the trace is not armed: never a failure that enforce would act on.
        assert [c for c in report["checks"] if c["status"] == "fail"] == []
        for check_id in ("nic.kick", "nic.call", "nic.vhost.started"):
            found = [c for c in report["checks"] if c["id"] == check_id]
            assert found and {c["status"] for c in found} == {"unknown"}, found
            assert all("arm" in c["message"] for c in found), found
        assert virsh("destroy", name).returncode == 0
        assert nothing_left(name, tap) == []
        return
    # At `started` the guest has just been given its vCPUs: its driver has not started vhost
    # yet. The trace shows vrings not joined yet, which is a warning (libvirt's monitor, which
    # a hook must not ask, would tell "not yet" from "never"), not a failure to enforce.
    started = [c for c in report["checks"] if c["id"] == "nic.vhost.started"]
    assert [c["status"] for c in started] == ["warn"], started
    assert "not started (yet)" in started[0]["message"]
    assert statuses(report, "nic.kick") <= {"warn", "unknown"}
    assert "not wired yet" in data["note"]
    counts: dict[str, int] = {}
    for c in report["checks"]:
        counts[c["status"]] = counts.get(c["status"], 0) + 1
    print(f"\nhook started check in the test host: {counts}; note: {data['note']}")
    assert virsh("destroy", name).returncode == 0
    assert nothing_left(name, tap) == []
