"""nic.vhost.placement's verdicts over a recorded VM (healthy-1q-linux-6.12: one vCPU, one vhost
worker, a vhost_task), with where its threads run set as each case has it: the recording's
/proc status files rewritten, replayed through the real ``observe`` and ``verify``. The
two-CPU test host proves the same on live threads (tests/testhost/test_placement_testhost.py);
these are the cases it cannot make: more CPUs, a domain's <cputune>, a VM-wide cpuset."""

from __future__ import annotations

import pathlib
import re

import pytest

from tests.support import observations
from vhostorch import pins
from vhostorch.check import verify
from vhostorch.check.ids import VHOST_PLACEMENT
from vhostorch.check.report import (
    FAIL,
    NOT_PINNED,
    ON_VCPU_CORE,
    ON_VCPU_CPU,
    PASS,
    UNKNOWN,
    WARN,
    Check,
)
from vhostorch.kernel import procfs
from vhostorch.libvirt import domxml

NAME = "healthy-1q-linux-6.12"


def _roles(rec: observations.Recording) -> tuple[int, int, list[int]]:
    """(vCPU tid, worker tid, other tids) of the recorded QEMU."""
    pid = rec["pid"]
    vcpu, worker, others = 0, 0, []
    for rel, text in rec["files"].items():
        found = re.fullmatch(rf"{pid}/task/(\d+)/comm", rel)
        if not found:
            continue
        tid = int(found[1])
        if text.startswith("CPU 0/"):
            vcpu = tid
        elif text.strip() == f"vhost-{pid}":
            worker = tid
        else:
            others.append(tid)
    assert vcpu and worker and others
    return vcpu, worker, others


def _judge(
    tmp_path: pathlib.Path,
    vcpu: str,
    worker: str,
    others: str,
    xml: str | None = None,
    pin: str | None = None,
    siblings: dict[int, str] | None = None,
) -> Check:
    rec = observations.load(NAME)
    pid = rec["pid"]
    tids = _roles(rec)
    for tid, cpus in zip((tids[0], tids[1]), (vcpu, worker), strict=True):
        _allow(rec, f"{pid}/task/{tid}/status", cpus)
    for tid in tids[2]:
        _allow(rec, f"{pid}/task/{tid}/status", others)
    for cpu, listed in (siblings or {}).items():
        topology = tmp_path / "sys" / "devices" / "system" / "cpu" / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "thread_siblings_list").write_text(listed + "\n")
    if pin is not None:
        start = int(rec["files"][f"{pid}/stat"].rsplit(")", 1)[1].split()[19])
        pins.save(pins.Pin(pid, start, pin, "vhostorch pin", "vm1"), str(tmp_path / "pins"))
    obs = observations.replay(rec, tmp_path)
    if xml is not None:
        obs = obs.replace(domain=domxml.parse(xml))
    [placed] = [c for c in verify.verify(obs).checks if c.id == VHOST_PLACEMENT]
    return placed


def _allow(rec: observations.Recording, rel: str, cpus: str) -> None:
    text = rec["files"][rel]
    rec["files"][rel] = re.sub(r"(?m)^Cpus_allowed_list:.*$", f"Cpus_allowed_list:\t{cpus}", text)


CPUTUNE = """<domain type='kvm'><name>vm1</name><cputune>
  <vcpupin vcpu='0' cpuset='0-7'/><emulatorpin cpuset='0-1'/></cputune></domain>"""


@pytest.mark.parametrize(
    ("vcpu", "worker", "others", "xml", "status", "cause", "message"),
    [
        ("0-7", "0-7", "0-7", None, PASS, None, "1 worker(s) may run on CPUs 0-7; no vCPU is pinned"),  # noqa: E501
        # <vcpupin> to CPU 3, emulator free: the worker (its thread) may run on CPU 3.
        ("3", "0-7", "0-7", None, WARN, ON_VCPU_CPU, "worker ... may run on CPU 3, which pinned vCPU 0 has (CPU 3)..."),  # noqa: E501
        # <emulatorpin> keeps the emulator and its vhost_task off the vCPU's CPU.
        ("3", "0-1", "0-1", None, PASS, None, "1 worker(s) may run on CPUs 0-1; apart from the pinned vCPUs' CPU 3"),  # noqa: E501
        # A VM-wide cpuset every thread shares reserves nothing.
        ("2-3", "2-3", "2-3", None, PASS, None, "... no vCPU is pinned"),
        # The domain pins vCPU 0 to every CPU QEMU has (as Nova does for a guest NUMA node's
        # shared CPUs): that reserves nothing; a worker on two of them takes no CPU of its own.
        ("0-7", "0-1", "0-7", CPUTUNE, PASS, None, "1 worker(s) may run on CPUs 0-1; no vCPU is pinned"),  # noqa: E501
    ],
)  # fmt: skip
def test_placement_against_the_vms_vcpus(
    tmp_path: pathlib.Path,
    vcpu: str,
    worker: str,
    others: str,
    xml: str | None,
    status: str,
    cause: str | None,
    message: str,
) -> None:
    placed = _judge(tmp_path, vcpu, worker, others, xml)
    assert (placed.status, placed.cause) == (status, cause), placed
    assert observations.says(placed.message, message), placed.message
    [w] = placed.evidence["workers"]  # type: ignore[misc]
    assert w["cpus"] == worker and w["queue_pair"] == 0
    [v] = placed.evidence["vcpus"]  # type: ignore[misc]
    assert v["cpus"] == vcpu and v["pinned"] == (cause == ON_VCPU_CPU or vcpu == "3")
    if xml is not None:
        assert placed.evidence["cputune"] == {"vcpupin": {"0": "0-7"}, "emulatorpin": "0-1"}


def test_a_pin_not_applied_fails_and_one_applied_passes(tmp_path: pathlib.Path) -> None:
    astray = _judge(tmp_path / "a", "0-7", "0-7", "0-7", pin="2-3")
    assert (astray.status, astray.cause) == (FAIL, NOT_PINNED), astray
    assert "not 2-3 as vhostorch pin asked (vhostorch pin --reapply applies it)" in astray.message
    held = _judge(tmp_path / "b", "0-7", "2-3", "0-7", pin="2-3")
    assert held.status == PASS and ", as vhostorch pin asked;" in held.message, held
    assert held.evidence["pin"] == {"cpus": "2-3", "source": "vhostorch pin", "vm": "vm1"}


def test_a_pin_of_an_earlier_process_of_that_pid_is_not_this_qemus(tmp_path: pathlib.Path) -> None:
    rec = observations.load(NAME)
    pins.save(pins.Pin(rec["pid"], 1, "2-3", "vhostorch pin", None), str(tmp_path / "pins"))
    obs = observations.replay(rec, tmp_path)
    assert obs.pin is None


def test_threads_not_read_are_unknown_never_a_pass(tmp_path: pathlib.Path) -> None:
    obs = observations.observed(NAME, tmp_path)
    for places, says in ((None, "where QEMU's threads run could not be read"),
                         ({}, "worker(s) ...: where they run could not be read")):  # fmt: skip
        [placed] = [
            c for c in verify.verify(obs.replace(places=places)).checks if c.id == VHOST_PLACEMENT
        ]
        assert placed.status == UNKNOWN and observations.says(placed.message, says + "..."), placed


def test_cputune_is_read_from_domain_xml() -> None:
    dom = domxml.parse(
        "<domain type='kvm'><name>d</name><cputune><vcpupin vcpu='1' cpuset='4-5'/>"
        "<vcpupin vcpu='0' cpuset='2,3'/><vcpupin vcpu='2' cpuset='^1'/>"
        "<emulatorpin cpuset='0-1'/></cputune></domain>"
    )
    # libvirt's ^N exclusion is left out: the threads' own affinity is what is judged.
    assert dom.vcpupin == ((0, frozenset({2, 3})), (1, frozenset({4, 5})))
    assert dom.emulatorpin == frozenset({0, 1})
    assert domxml.parse("<domain type='kvm'><name>d</name></domain>").vcpupin == ()


def test_procfs_start_time_is_what_pins_are_keyed_by() -> None:
    assert procfs.start_time(1) is not None


def test_a_worker_on_the_other_hyperthread_of_a_pinned_vcpus_core_is_warned(
    tmp_path: pathlib.Path,
) -> None:
    # CPUs 3 and 7 are one core's two threads (thread_siblings_list), vCPU 0 has CPU 3.
    pairs = {c: f"{c % 4},{c % 4 + 4}" for c in range(8)}
    near = _judge(tmp_path / "a", "3", "4-7", "0-7", siblings=pairs)
    assert (near.status, near.cause) == (WARN, ON_VCPU_CORE), near
    assert observations.says(near.message, "worker ... may run on CPU 7, on the core of CPU 3, ...")
    assert near.evidence["siblings"] == {"7": 3}
    apart = _judge(tmp_path / "b", "3", "0-2,4-6", "0-7", siblings=pairs)
    assert apart.status == PASS, apart
    # Where sysfs does not say (the recordings, a host without topology), no core is assumed.
    unknown_topology = _judge(tmp_path / "c", "3", "4-7", "0-7")
    assert unknown_topology.status == PASS and "siblings" not in unknown_topology.evidence
