"""kernel.cpus against this machine's kernel: where a thread may run, its cpuset, and the
kernel behaviour `vhostorch pin` relies on (a pin outside a thread's cpuset is cut short
without an error, or refused when nothing of it is left), read back with util-linux's
taskset rather than vhostorch's own reader."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.kernel import vhostorch
from vhostorch.errors import InvalidSpec
from vhostorch.kernel import cpus

CPUSET_V1 = Path("/sys/fs/cgroup/cpuset")


@pytest.fixture
def sleeper() -> Iterator[int]:
    proc = subprocess.Popen(["sleep", "600"])
    try:
        while Path(f"/proc/{proc.pid}/comm").read_text().strip() != "sleep":
            time.sleep(0.01)  # until it has exec'd
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def _taskset(tid: int) -> str:
    """taskset's list ("0,1" where the kernel writes "0-1"), in the kernel's form."""
    out = subprocess.run(["taskset", "-pc", str(tid)], capture_output=True, text=True).stdout
    return cpus.format_list(cpus.parse_list(out.rsplit(":", 1)[-1]))


def test_a_threads_place_is_what_the_kernel_says(sleeper: int) -> None:
    where = cpus.place(sleeper, sleeper)
    assert where is not None
    assert where.comm == "sleep"
    assert where.cpus == frozenset(os.sched_getaffinity(sleeper))
    assert cpus.format_list(where.cpus) == _taskset(sleeper)
    online = cpus.online()
    assert online is not None and where.last_cpu in online
    assert where.cgroup is not None and where.cgroup.startswith("/")
    cpus.set_affinity(sleeper, frozenset({0}))
    after = cpus.place(sleeper, sleeper)
    assert after is not None and after.cpus == {0} and _taskset(sleeper) == "0"
    assert cpus.place(sleeper, 1 << 22) is None  # no such thread: None, no error


@pytest.mark.skipif(
    not (CPUSET_V1 / "cpuset.cpus").exists() or len(os.sched_getaffinity(0)) < 2,
    reason="needs a cgroup v1 cpuset hierarchy and two CPUs (this machine has both)",
)
def test_a_pin_outside_the_cpuset_is_cut_short_or_refused_by_the_kernel(sleeper: int) -> None:
    group = CPUSET_V1 / f"vho-cpus-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        (group / "cpuset.cpus").write_text("0")
        (group / "cpuset.mems").write_text((CPUSET_V1 / "cpuset.mems").read_text().strip())
        (group / "cgroup.procs").write_text(str(sleeper))
        where = cpus.place(sleeper, sleeper)
        assert where is not None and where.cgroup == f"/{group.name}"
        assert cpus.cpuset(where.cgroup) == {0}
        # Asked for 0-1, the kernel keeps 0 and says nothing: why pin checks the cpuset first.
        cpus.set_affinity(sleeper, frozenset({0, 1}))
        assert _taskset(sleeper) == "0"
        with pytest.raises(OSError) as refused:
            cpus.set_affinity(sleeper, frozenset({1}))
        assert refused.value.errno == 22  # EINVAL: nothing the cpuset allows
    finally:
        (CPUSET_V1 / "cgroup.procs").write_text(str(sleeper))
        group.rmdir()


@pytest.mark.parametrize(
    ("text", "cpus_"),
    [("0", {0}), ("0-3,8", {0, 1, 2, 3, 8}), (" 1,3 \n", {1, 3}), ("", set()), ("2-2", {2})],
)
def test_cpu_lists_read_as_the_kernel_writes_them(text: str, cpus_: set[int]) -> None:
    assert cpus.parse_list(text) == cpus_
    assert cpus.parse_list(cpus.format_list(cpus_)) == cpus_


# Python's int() takes what the kernel's list format does not: other scripts' digits
# (ARABIC-INDIC ONE and THREE, FULLWIDTH ONE), '_' between digits, a sign or spaces after '-'.
ODD = ["\u0661", "0-\u0663", "\uff11", "0-1_0", "0-+1", "1- 2", "1 -2"]


@pytest.mark.parametrize(
    "text", ["a", "1-", "-1", "3-1", "1,,2", "0x1", "1-9999", "+1", "1.5", *ODD]
)
def test_bad_cpu_lists_are_one_line_errors(text: str) -> None:
    with pytest.raises(InvalidSpec) as err:
        cpus.cpu_list(text, "worker_cpus")
    assert str(err.value).startswith("worker_cpus: ") and "\n" not in str(err.value)


@pytest.mark.parametrize("text", [*ODD, " "])
def test_pin_refuses_a_bad_cpu_list_before_looking_at_the_process(text: str, sleeper: int) -> None:
    done = vhostorch("pin", "--pid", str(sleeper), "--cpus", text)
    assert done.returncode == 2, done
    [line] = done.stderr.splitlines()
    assert line.startswith("vhostorch: error: --cpus: "), line
    assert "not a CPU list" in line or "no CPU given" in line, line


def test_a_cpu_list_is_normalised() -> None:
    assert cpus.cpu_list("3,1,2,0", "x") == "0-3"
    assert cpus.format_list([5, 1, 2, 3, 7, 8]) == "1-3,5,7-8"
    with pytest.raises(InvalidSpec, match="no CPU given"):
        cpus.cpu_list("", "x")
