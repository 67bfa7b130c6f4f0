"""`check --pid`/`--all` run as root talk QMP only to a QEMU's own socket (issue 16, point 10).

An unprivileged user (nobody here) can start a process that looks like QEMU (a copy of
python named qemu-system-x86_64, or python with QEMU's comm) whose command line names a
QMP socket it serves, or the real QEMU binary connecting out to such a socket. The fake
server records the pid (SO_PEERCRED) of every process that connects to it: vhostorch must
never be one of them, its monitor-based checks must be unknown with the reason, and a real
QEMU's own socket must still be asked.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

from tests.support.kernel import vhostorch
from tests.support.nobody import AS_NOBODY, PYTHON, QEMU
from vhostorch.check import observe, targets
from vhostorch.errors import MonitorError

pytestmark = pytest.mark.kernel

QEMU_ARGS = [QEMU, "-accel", "tcg", "-S", "-display", "none", "-nodefaults", "-qmp"]
FAKE = r"""
import socket, struct, sys, threading
with open("/proc/self/comm", "w") as f:
    f.write("qemu-system-x86")
path, log = sys.argv[2].removeprefix("unix:").split(",")[0], sys.argv[3]
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(path)
srv.listen(8)
VERSION = b'{"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}'
GREETING = b'{"QMP": {"version": ' + VERSION + b', "capabilities": []}}\r\n'
def serve(conn):
    try:
        conn.sendall(GREETING)
        while conn.recv(4096):
            conn.sendall(b'{"return": {}}\r\n')
    except OSError:
        pass
print("ready", flush=True)
while True:
    conn, _ = srv.accept()
    pid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
    with open(log, "a") as f:
        f.write(f"{pid}\n")
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


class Fake:
    """A QMP server run by nobody from ``exe``, its command line naming its own socket."""

    def __init__(self, root: str, exe: str) -> None:
        self.sock = os.path.join(root, "qmp.sock")
        self.log = os.path.join(root, "connections")
        script = os.path.join(root, "fake.py")
        with open(script, "w") as f:
            f.write(FAKE)
        argv = [exe, script, "-qmp", f"unix:{self.sock},server=on,wait=off", self.log]
        self.proc = subprocess.Popen(
            AS_NOBODY + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready", self.proc.stderr

    def connected(self) -> list[int]:
        try:
            with open(self.log) as f:
                return [int(line) for line in f]
        except FileNotFoundError:
            return []

    def stop(self) -> None:
        self.proc.kill()  # our own child, by its pid
        self.proc.wait()


@pytest.fixture
def nobody_dir() -> Iterator[str]:
    root = tempfile.mkdtemp(prefix="vho-qmp-")
    nobody = pwd.getpwnam("nobody")
    os.chown(root, nobody.pw_uid, nobody.pw_gid)
    os.chmod(root, 0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _copy_as(root: str, name: str) -> str:
    """``PYTHON`` copied to ``root/name``, owned by nobody (as a user could copy it)."""
    exe = os.path.join(root, name)
    shutil.copy(PYTHON, exe)
    nobody = pwd.getpwnam("nobody")
    os.chown(exe, nobody.pw_uid, nobody.pw_gid)
    os.chmod(exe, 0o755)
    return exe


def _monitor_error(pid: int) -> str | None:
    """Why the monitor of ``pid`` was not read (None: it was), as `check` would read it."""
    reader = targets._own_qmp(pid)
    assert reader is not None
    try:
        reader()
    except MonitorError as err:
        return str(err)
    return None


@pytest.mark.parametrize("how", ["copied-binary", "comm-only"])
def test_a_fake_qemu_of_another_user_is_never_connected_to(nobody_dir: str, how: str) -> None:
    exe = _copy_as(nobody_dir, "qemu-system-x86_64") if how == "copied-binary" else PYTHON
    fake = Fake(nobody_dir, exe)
    try:
        pid = fake.proc.pid
        runs = [vhostorch("check", "--pid", str(pid), "--json")]
        if how == "copied-binary":  # --all finds it by its program's name
            runs.append(vhostorch("check", "--all", "--json"))
            assert f'"pid": {pid}' in runs[-1].stdout, runs[-1].stdout[-2000:]
        for proc in runs:
            assert "internal error" not in proc.stderr, proc.stderr
        assert fake.connected() == []  # neither check --pid nor --all connected
        if how == "copied-binary":  # checks that need the monitor say why they are unknown
            observed = observe.observe(pid, monitor=targets._own_qmp(pid))
            assert observed.monitor is None and "QMP not asked" in str(observed.monitor_error)
        error = _monitor_error(pid)
        assert error is not None and "QMP not asked" in error, error
        assert "not a QEMU installed by root" in error, error
        assert fake.connected() == []
    finally:
        fake.stop()


def test_a_real_qemu_pointed_at_a_socket_it_does_not_serve_is_not_asked(nobody_dir: str) -> None:
    fake = Fake(nobody_dir, PYTHON)
    qemu = subprocess.Popen(
        [*AS_NOBODY, *QEMU_ARGS, f"unix:{fake.sock},server=off"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while qemu.pid not in fake.connected():  # QEMU connects out to the fake
            assert qemu.poll() is None and time.monotonic() < deadline, fake.connected()
            time.sleep(0.05)
        proc = vhostorch("check", "--pid", str(qemu.pid), "--json")
        assert "internal error" not in proc.stderr, proc.stderr
        assert fake.connected() == [qemu.pid]  # check --pid did not connect
        error = _monitor_error(qemu.pid)
        assert error is not None and "does not hold the listening socket" in error, error
        assert fake.connected() == [qemu.pid]
    finally:
        qemu.kill()  # our own children, by pid
        qemu.wait()
        fake.stop()


def test_a_real_qemus_own_socket_is_still_asked(nobody_dir: str) -> None:
    sock = os.path.join(nobody_dir, "own.sock")
    for as_user in ([], AS_NOBODY):  # run by root, and by an unprivileged user of its own
        qemu = subprocess.Popen(
            [*as_user, *QEMU_ARGS, f"unix:{sock},server=on,wait=off"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 20
            while not os.path.exists(sock):
                assert qemu.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            assert _monitor_error(qemu.pid) is None
            proc = vhostorch("check", "--pid", str(qemu.pid), "--json")
            assert "internal error" not in proc.stderr and proc.stdout, proc.stderr
        finally:
            qemu.kill()
            qemu.wait()
            if os.path.exists(sock):
                os.unlink(sock)


def test_a_relative_qmp_path_is_not_asked() -> None:
    """Relative to QEMU's directory, not to ours: a root QEMU started in another one."""
    root = tempfile.mkdtemp(prefix="vho-qmp-")
    qemu = subprocess.Popen(
        [*QEMU_ARGS, "unix:rel.sock,server=on,wait=off"],
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(os.path.join(root, "rel.sock")):
            assert qemu.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        reader = targets._own_qmp(qemu.pid)
        assert reader is not None
        with pytest.raises(MonitorError, match="relative"):
            reader()
    finally:
        qemu.kill()
        qemu.wait()
        shutil.rmtree(root, ignore_errors=True)


def test_what_a_fake_qemu_names_itself_reaches_roots_terminal_escaped(nobody_dir: str) -> None:
    """Any user's look-alike QEMU chooses its -name and netdev ids: `check --all`'s table
    printed them raw, so ESC sequences reached root's terminal (set its title, cleared it)
    and a newline forged a line of the report."""
    exe = _copy_as(nobody_dir, "qemu-system-x86_64")
    name = "guest=ev\x1b]0;PWNED\x07il\nOK: 9 pass"
    netdev = "tap,id=n\x1b[2J,vhost=on"
    proc = subprocess.Popen(
        [*AS_NOBODY, exe, "-c", "import time; time.sleep(60)", "-name", name, "-netdev", netdev],
    )  # fmt: skip
    try:
        time.sleep(0.5)  # exec'd: its command line is the look-alike's
        for argv in (["--pid", str(proc.pid)], ["--all"]):
            done = vhostorch("check", *argv)
            mine = done.stdout[done.stdout.index(f"QEMU pid {proc.pid}") :]
            assert "\x1b" not in done.stdout and "\x07" not in done.stdout, done.stdout
            assert "\nOK: 9 pass" not in mine, mine
            assert "(ev\\x1b]0;PWNED\\x07il\\x0aOK: 9 pass)" in mine.splitlines()[0], mine
    finally:
        proc.kill()  # our own child, by its pid
        proc.wait()
