"""Which QEMU a check looks at, and what looking costs (issue 19, point 10).

Real QEMUs (TCG, paused) run by an unprivileged user (nobody, via setpriv): one named
like a libvirt domain must never be taken for it (only libvirt's pid file names a
domain's QEMU), and one that is SIGSTOPped must not make a check wait for its monitor.
"""

from __future__ import annotations

import json
import os
import pathlib
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

from tests.support import guests, kernel
from tests.support.kernel import vhostorch
from tests.support.nobody import QEMU, paused_qemu, start_qemu
from vhostorch.check import observe, targets
from vhostorch.kernel import procfs

pytestmark = pytest.mark.kernel


class UserQemu:
    """QEMU run by nobody, named ``guest=NAME``, with a QMP socket of its own."""

    def __init__(self, root: str, name: str) -> None:
        self.sock = os.path.join(root, "qmp.sock")
        argv = paused_qemu(name, "-qmp", f"unix:{self.sock},server=on,wait=off")
        self.proc = start_qemu(
            argv, lambda _pid: os.path.exists(self.sock), timeout=10, stderr=subprocess.PIPE
        )
        self.pid = self.proc.pid

    def stop(self) -> None:
        os.kill(self.pid, signal.SIGCONT)  # a stopped process acts on SIGKILL anyway
        self.proc.kill()  # our own child, by its pid
        self.proc.wait()


@pytest.fixture
def nobody_qemu() -> Iterator[UserQemu]:
    root = tempfile.mkdtemp(prefix="vhocontainer-")  # pytest's tmp_path is root's only
    nobody = pwd.getpwnam("nobody")
    os.chown(root, nobody.pw_uid, nobody.pw_gid)
    try:
        qemu = UserQemu(root, kernel.unique("vhocontainer-"))
        try:
            yield qemu
        finally:
            qemu.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _name(qemu: UserQemu) -> str:
    with open(f"/proc/{qemu.pid}/cmdline") as f:
        argv = f.read().split("\0")
    return argv[argv.index("-name") + 1].removeprefix("guest=")


def test_a_users_qemu_named_like_a_domain_is_not_that_domain(
    nobody_qemu: UserQemu, tmp_path: pathlib.Path
) -> None:
    name = _name(nobody_qemu)
    pid_dir = tmp_path / "run"  # libvirt's run directory, without a pid file for the domain
    pid_dir.mkdir()
    with pytest.raises(procfs.CannotInspect, match=r"libvirt's pid file .*No such file"):
        observe.domain_pid(name, pid_dir=str(pid_dir))
    # A stale pid file (its pid now someone else's) is refused too...
    (pid_dir / f"{name}.pid").write_text(f"{os.getpid()}\n")
    with pytest.raises(procfs.CannotInspect, match="not that domain's QEMU"):
        observe.domain_pid(name, pid_dir=str(pid_dir))
    # ...and libvirt's word for it is taken.
    (pid_dir / f"{name}.pid").write_text(f"{nobody_qemu.pid}\n")
    assert observe.domain_pid(name, pid_dir=str(pid_dir)) == nobody_qemu.pid


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_a_stopped_qemu_is_reported_not_waited_for(nobody_qemu: UserQemu) -> None:
    pid = nobody_qemu.pid
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while _state(pid) != "T":  # it stops when it next runs
        assert time.monotonic() < deadline
        time.sleep(0.01)
    start = time.monotonic()
    observed = observe.observe(pid, monitor=targets._own_qmp(pid))
    took = time.monotonic() - start
    # Its QMP socket would take the connection and never greet: 5 s (the QMP timeout).
    assert took < 1.0, took
    assert observed.monitor is None
    assert observed.monitor_error == (
        f"QEMU (process {pid}) is stopped by a signal: its monitor cannot answer; not asked"
    )
    report = json.loads(vhostorch("check", "--pid", str(pid), "--json").stdout)
    assert report["target"]["stopped"] == "stopped by a signal", report
    # Running again, it is asked as before.
    os.kill(pid, signal.SIGCONT)
    assert observe.observe(pid, monitor=targets._own_qmp(pid)).monitor is not None


def test_a_qemu_whose_command_line_is_not_utf8_is_checked(tmp_path: pathlib.Path) -> None:
    """A -name of bytes that are not UTF-8 (any user may start such a QEMU) beside its own
    -qmp socket: `check --pid` was 'internal error: UnicodeDecodeError', exit 1."""
    sock = tmp_path / "qmp.sock"
    argv = [
        QEMU.encode(), b"-accel", b"tcg", b"-M", b"none", b"-S", b"-display", b"none",
        b"-nodefaults", b"-name", b"guest=vho\xff-latin1", b"-qmp",
        f"unix:{sock},server=on,wait=off".encode(),
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
            time.sleep(0.05)
        done = vhostorch("check", "--pid", str(proc.pid), "--json")
        assert done.returncode in (0, 1) and "internal error" not in done.stderr, done.stderr
        report = json.loads(done.stdout)
        assert report["target"]["name"] == "vho\ufffd-latin1", report["target"]
        assert report["checks"], report
    finally:
        proc.kill()  # the QEMU this test started
        proc.wait()


def test_a_users_qemu_named_out_of_libvirts_directories_is_not_followed(
    libvirtd: str, tmp_path: pathlib.Path
) -> None:
    """A QEMU any user starts with ``-name guest=../../../../tmp/DIR/evil`` and a tap NIC
    short of vhost: `check` opened /run/libvirt/qemu/<that>.pid as root, which was the FIFO
    the user put there, and hung for ever (the metrics unit, every minute), and read
    /var/log/libvirt/qemu/<that>.log through the user's symlink to a root-only file (the
    fresh attack of issue 19). libvirt refuses a '/' in a domain's name: such a name is no
    domain's, and the files are not opened."""
    from vhostorch import taps
    from vhostorch.kernel.tun import open_queues
    from vhostorch.taps.spec import TapSpec

    nobody = pwd.getpwnam("nobody")
    root = tempfile.mkdtemp(prefix="vhoname-")
    os.chown(root, nobody.pw_uid, nobody.pw_gid)
    secret = tmp_path / "root-only"
    secret.write_text("vhost: root's secret line\n")
    secret.chmod(0o600)
    os.mkfifo(os.path.join(root, "evil.pid"))
    os.symlink(secret, os.path.join(root, "evil.log"))
    name = "../../../.." + root + "/evil"
    dev = kernel.unique("vn")
    taps.ensure([TapSpec(dev, owner=nobody.pw_uid)])
    proc = None
    try:
        # The tap's queue opened here and passed (/dev/net/tun may be root's only, as here).
        [tun] = open_queues(dev, 1)
        try:
            proc = start_qemu(
                paused_qemu(name, "-netdev", f"tap,id=n0,fd={tun}"),
                lambda pid: "/dev/net/tun" in guests.fd_targets(pid).values(),
                timeout=10, stderr=subprocess.PIPE, pass_fds=(tun,),
            )  # fmt: skip
        finally:
            os.close(tun)
        started = time.monotonic()
        done = subprocess.run(
            [kernel.EXE, "check", "--pid", str(proc.pid), "--json"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        took = time.monotonic() - started
        assert done.returncode == 1 and "error" not in done.stderr, done.stderr
        assert "root's secret" not in done.stdout
        assert took < 20, took
        with pytest.raises(procfs.CannotInspect, match="not a domain name"):
            observe.domain_pid(name)
    finally:
        if proc is not None:
            proc.kill()  # our own child, by its pid
            proc.wait()
        taps.delete([dev])
        shutil.rmtree(root, ignore_errors=True)
