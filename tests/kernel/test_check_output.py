"""`vhostorch check --output PATH`: the check's text put at PATH whole (for node_exporter's
textfile directory), on this machine's real QEMUs (without vhost: their checks fail, which
is what the file must show), read back with prometheus_client's parser.

A reader never sees a part of the file, however often it is rewritten; a hostile
directory is refused before anything is checked; no temporary file is left behind when the
write fails (a full tmpfs) or when SIGTERM comes while the file is being written (strace
holds the write's fsync for a second, so the signal surely comes then).
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families as classic

from tests.support.domains import plain_qemu, tap
from tests.support.kernel import EXE, vhostorch

LAST = "vhostorch_check_last_run_timestamp_seconds"


@pytest.fixture
def qemu_pid() -> Iterator[int]:
    """A real QEMU with a tap NIC that does not ask for vhost: its check fails (exit 1)."""
    with tap() as dev, plain_qemu(dev, "off") as pid:
        yield pid


@pytest.fixture
def textdir(tmp_path: pathlib.Path) -> pathlib.Path:
    """A directory as node_exporter's textfile directory is: root's, mode 0755."""
    path = tmp_path / "vhometrics-textfile"
    path.mkdir(mode=0o755)
    path.chmod(0o755)
    return path


def families(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    return {f.name: [(s.labels, s.value) for s in f.samples] for f in classic(text)}


def test_the_file_is_the_report_whatever_the_verdicts_and_the_exit_code_the_checks(
    qemu_pid: int, textdir: pathlib.Path
) -> None:
    every = json.loads(vhostorch("check", "--pid", str(qemu_pid), "--json").stdout)
    assert every["ok"] is False  # no vhost here: a failing check, exit 1
    target = textdir / "vhostorch.prom"
    done = vhostorch("check", "--pid", str(qemu_pid), "--format", "prometheus",
                     "--output", str(target))  # fmt: skip
    assert (done.returncode, done.stdout, done.stderr) == (1, "", "")
    seen = families(target.read_text())
    assert seen["vhostorch_vm_ok"] == [({"vm": "", "pid": str(qemu_pid)}, 0.0)]
    fails = [ls["check"] for ls, v in seen["vhostorch_check_status"]
             if ls["status"] == "fail" and v == 1]  # fmt: skip
    assert fails == [c["id"] for c in every["checks"] if c["status"] == "fail"] != []
    (stamp,) = seen[LAST]
    assert abs(stamp[1] - time.time()) < 30
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in textdir.iterdir()] == ["vhostorch.prom"]
    # Any format, the same way: the JSON is what stdout would have had.
    as_json = textdir / "vhostorch.json"
    done = vhostorch("check", "--pid", str(qemu_pid), "--json", "--output", str(as_json))
    assert (done.returncode, done.stdout) == (1, "")
    assert json.loads(as_json.read_text())["checks"] == every["checks"]


def test_a_reader_never_sees_a_part_of_the_file(qemu_pid: int, textdir: pathlib.Path) -> None:
    """node_exporter reads the file whenever Prometheus scrapes: 25 rewrites of it under a
    reader that reads it in a loop meanwhile, each read a whole exposition."""
    target = textdir / "vhostorch.prom"
    argv = [EXE, "check", "--all", "--format", "prometheus", "--output", str(target)]
    subprocess.run(argv, check=False, capture_output=True)
    stop = threading.Event()
    reads: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            reads.append(target.read_text())

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        codes = {subprocess.run(argv, capture_output=True).returncode for _ in range(25)}
    finally:
        stop.set()
        thread.join()
    assert codes == {1}
    assert len(reads) > 25
    torn = [text for text in set(reads) if LAST not in families(text)]
    assert not torn, torn[0][-200:]
    assert [p.name for p in textdir.iterdir()] == ["vhostorch.prom"]


@pytest.mark.parametrize("kind", ["symlink", "character device", "FIFO", "directory"])
def test_only_a_regular_file_at_the_path_is_replaced(
    kind: str, qemu_pid: int, textdir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """`check --output /dev/null` replaced the system's /dev/null with a regular file, and a
    symlink there (/dev/stdout) was replaced too (the fresh attack of issue 19): whatever is
    at the path but a regular file is refused in one line, left as it was, nothing written."""
    victim = tmp_path / "vhometrics-victim"
    victim.write_text("root's file\n")
    target = textdir / "vhostorch.prom"
    if kind == "symlink":
        target.symlink_to(victim)
    elif kind == "character device":
        os.mknod(target, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's numbers
    elif kind == "FIFO":
        os.mkfifo(target)
    else:
        target.mkdir()
    before = os.lstat(target)
    done = vhostorch("check", "--pid", str(qemu_pid), "--format", "prometheus",
                     "--output", str(target))  # fmt: skip
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert done.stderr == (
        f"vhostorch: error: check: --output {target}: is a {kind}, not a regular file; "
        "not replacing it\n"
    )
    after = os.lstat(target)
    assert (after.st_ino, after.st_mode, after.st_rdev) == (before.st_ino, before.st_mode,
                                                             before.st_rdev)  # fmt: skip
    assert victim.read_text() == "root's file\n"
    assert [p.name for p in textdir.iterdir()] == ["vhostorch.prom"]  # no temporary file


def test_a_regular_file_at_the_path_is_replaced(qemu_pid: int, textdir: pathlib.Path) -> None:
    target = textdir / "vhostorch.prom"
    target.write_text("last minute's\n")
    done = vhostorch("check", "--pid", str(qemu_pid), "--format", "prometheus",
                     "--output", str(target))  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert LAST in families(target.read_text())


@pytest.mark.parametrize("hostile", ["symlink", "world-writable"])
def test_a_hostile_directory_is_refused_untouched(
    hostile: str, qemu_pid: int, textdir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    if hostile == "symlink":
        directory = tmp_path / "vhometrics-link"
        directory.symlink_to(textdir)
        says = "is a symlink; not writing through it"
    else:
        directory = textdir
        directory.chmod(0o777)
        says = "writable by others without the sticky bit (mode 0777)"
    target = directory / "vhostorch.prom"
    done = vhostorch("check", "--pid", str(qemu_pid), "--format", "prometheus",
                     "--output", str(target))  # fmt: skip
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and says in done.stderr, done.stderr
    assert list(textdir.iterdir()) == []
    # With the sticky bit, as /tmp: others cannot rename or remove root's file there.
    if hostile == "world-writable":
        directory.chmod(0o1777)
        assert vhostorch("check", "--pid", str(qemu_pid), "--output", str(target)).returncode == 1
        assert [p.name for p in textdir.iterdir()] == ["vhostorch.prom"]


def test_watch_and_output_are_refused_together(textdir: pathlib.Path) -> None:
    done = vhostorch("check", "--all", "--watch", "5", "--output", str(textdir / "x"))
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "--watch prints changes as they come, --output writes one report" in done.stderr
    assert list(textdir.iterdir()) == []


def test_a_target_that_cannot_be_checked_leaves_the_file_as_it_was(
    textdir: pathlib.Path,
) -> None:
    target = textdir / "vhostorch.prom"
    target.write_text("the last round's\n")
    gone = 4194303  # PID_MAX_LIMIT - 1: no such process here
    assert not os.path.exists(f"/proc/{gone}")
    done = vhostorch("check", "--pid", str(gone), "--format", "prometheus", "--output", str(target))
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert target.read_text() == "the last round's\n"
    assert [p.name for p in textdir.iterdir()] == ["vhostorch.prom"]


def test_a_failed_write_leaves_no_temporary_file(qemu_pid: int, textdir: pathlib.Path) -> None:
    """A tmpfs of one page, full: the new file is made, its write fails (ENOSPC); exit 2,
    one line, and the directory holds what it held."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k,mode=0755", "vhometrics-full",
                    str(textdir)], check=True)  # fmt: skip
    try:
        (textdir / "filler").write_bytes(b"x" * 4096)
        target = textdir / "vhostorch.prom"
        done = vhostorch("check", "--pid", str(qemu_pid), "--format", "prometheus",
                         "--output", str(target))  # fmt: skip
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert "cannot write it: No space left on device" in done.stderr
        assert [p.name for p in textdir.iterdir()] == ["filler"]
    finally:
        subprocess.run(["umount", str(textdir)], check=True)


def children(pid: int) -> list[int]:
    return [int(c) for c in pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, -signal.SIGTERM), (signal.SIGINT, 130)])
def test_a_signal_while_the_file_is_written_leaves_no_temporary_file(
    sig: int, code: int, qemu_pid: int, textdir: pathlib.Path
) -> None:
    """strace delays the file's fsync by five seconds (one was missed under CI's load): a
    real process, a real signal, only the timing is arranged; the signal comes as soon as the
    new file appears. It waits until
    the file is renamed into place, then ends the command (SIGTERM's default action; SIGINT
    as an interruption, exit 130)."""
    target = textdir / "vhostorch.prom"
    tracer = subprocess.Popen(
        ["strace", "-f", "-o", "/dev/null", "-e", "trace=fsync",
         "-e", "inject=fsync:delay_enter=5000000",
         EXE, "check", "--all", "--format", "prometheus", "--output", str(target)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not any(p.name.endswith(".new") for p in textdir.iterdir()):
            assert tracer.poll() is None and time.monotonic() < deadline, "no file written"
            time.sleep(0.005)
        (command,) = children(tracer.pid)
        os.kill(command, sig)  # the vhostorch this test started
        tracer.wait(60)  # strace ends as the command did (a signal's death is its own)
    finally:
        if tracer.poll() is None:
            tracer.kill()  # the strace this test started
            tracer.wait()
    assert tracer.returncode == code, tracer.stderr.read() if tracer.stderr else ""
    assert [p.name for p in textdir.iterdir()] == ["vhostorch.prom"]
    assert LAST in families(target.read_text())
