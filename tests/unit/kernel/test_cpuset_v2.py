"""kernel.cpus.cpuset on a cgroup v2 tree. This machine's cpuset controller is bound to its v1
hierarchy (a cgroup2 mount here offers no cpuset), so the v2 tree is written as the kernel
lays it out; the test host (v2) proves the rest (tests/testhost/test_placement_testhost.py)."""

from __future__ import annotations

from pathlib import Path

from vhostorch.kernel import cpus


def test_a_v2_cgroup_without_the_cpuset_controller_is_bounded_by_its_nearest_ancestors(
    tmp_path: Path,
) -> None:
    """machine.slice limited to CPU 0 (AllowedCPUs=), its scope not given the controller (no
    cpuset.* files there): a pin to CPU 1 was not refused up front (None: 'no cpuset'), and
    sched_setaffinity then cut it or failed with EINVAL, exit 1 and no cgroup named."""
    (tmp_path / "cpuset.cpus.effective").write_text("0-1\n")
    (tmp_path / "machine.slice").mkdir()
    (tmp_path / "machine.slice/cpuset.cpus.effective").write_text("0\n")
    scope = tmp_path / "machine.slice/machine-qemu.scope/emulator"
    scope.mkdir(parents=True)
    emulator = "/machine.slice/machine-qemu.scope/emulator"
    assert cpus.cpuset(emulator, str(tmp_path)) == frozenset({0})
    assert cpus.cpuset("/machine.slice", str(tmp_path)) == frozenset({0})
    assert cpus.cpuset("/user.slice", str(tmp_path)) == frozenset({0, 1})  # the root's
    assert cpus.cpuset("/", str(tmp_path)) == frozenset({0, 1})
    assert cpus.cpuset("/x", str(tmp_path / "none")) is None  # no cpuset anywhere


def test_a_v1_cpuset_is_read_where_the_task_is(tmp_path: Path) -> None:
    group = tmp_path / "cpuset/vm"
    group.mkdir(parents=True)
    (tmp_path / "cpuset/cpuset.effective_cpus").write_text("0-3\n")
    (group / "cpuset.effective_cpus").write_text("2\n")
    assert cpus.cpuset("/vm", str(tmp_path)) == frozenset({2})
