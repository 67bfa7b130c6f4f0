"""Root and the QEMU user (issue 19, items 1 and 6), on the real thing.

`vhostorch up` starts real QEMUs (TCG, vhost "preferred": this machine has no
/dev/vhost-net) as libvirt's QEMU user, and that user, through `setpriv`, plays a guest that
escaped into its QEMU: it plants links, swaps sockets and keeps writing into what is its
own. Every test ends with nothing left: no QEMU, tap, claim, state or work directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import kernel
from tests.support.guests import tcg_spec
from tests.support.kernel import EXE
from tests.support.vms import left, state_of
from vhostorch.backends import process
from vhostorch.kernel import procfs, tun
from vhostorch.vm import state

pytestmark = pytest.mark.kernel

QEMU_USER = process.default_user() or "libvirt-qemu"
AS_QEMU = ["setpriv", f"--reuid={QEMU_USER}", "--regid=kvm", "--init-groups"]


def up(specs: str, name: str, tap: str) -> dict[str, Any]:
    done = subprocess.run(
        [EXE, "up", tcg_spec(specs, name, tap), "--wait", "0", "--json"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    vm: dict[str, Any] = json.loads(done.stdout)["vm"]
    return vm


def as_qemu_user(*argv: str) -> None:
    subprocess.run([*AS_QEMU, *argv], check=True, capture_output=True)


@contextlib.contextmanager
def planted(name: str, link: str) -> Iterator[tuple[str, str]]:
    """(victim, work directory): a file only root may write, and VM ``name``'s work directory
    as an older `up` left it after a `down` whose removal its user defeated (the QEMU user's),
    in which that user put ``link``, a link to the victim. Both go at the end."""
    fd, victim = tempfile.mkstemp(prefix="vho-priv-victim-")  # 0600, root's
    os.write(fd, b"root's alone\n")
    os.close(fd)
    workdir = os.path.join(state.STATE_DIR, f"{name}.d")
    try:
        state.make_dir(state.STATE_DIR)
        qemu = pwd.getpwnam(QEMU_USER)
        os.mkdir(workdir, 0o700)
        os.chown(workdir, qemu.pw_uid, qemu.pw_gid)
        as_qemu_user("ln", "-s", victim, f"{workdir}/{link}")
        yield victim, workdir
        with open(victim, "rb") as f:
            assert f.read() == b"root's alone\n"  # not truncated, not written
    finally:
        os.unlink(victim)
        subprocess.run(["rm", "-rf", workdir], check=False)


def gone(pid: int, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while procfs.alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# --- item 1: root follows nothing QEMU's user owns -----------------------------------------


def test_up_makes_a_new_work_directory_and_never_writes_through_a_planted_link(
    specs: str, names: list[str]
) -> None:
    """A `down` whose removal the user defeated left NAME.d, the user's; the user put
    qemu.log there as a link to a file only root may write. `up` opened it with O_TRUNC and
    handed the fd to QEMU (whose user then has it, through pidfd_getfd on its own QEMU)."""
    name, tap = kernel.unique("vho-pl"), kernel.unique("vpl")
    names.append(name)
    with planted(name, "qemu.log") as (victim, workdir):
        vm = up(specs, name, tap)
        fds = os.listdir(f"/proc/{vm['pid']}/fd")
        held = {os.readlink(f"/proc/{vm['pid']}/fd/{fd}") for fd in fds}
        assert victim not in held, held
        found = os.lstat(workdir)
        assert (found.st_uid, oct(found.st_mode & 0o7777)) == (0, "0o711")
        log = os.lstat(f"{workdir}/qemu.log")
        assert log.st_uid == 0 and not os.path.islink(f"{workdir}/qemu.log")
        assert subprocess.run([EXE, "down", name], capture_output=True).returncode == 0
        assert left(name, [tap]) == []


def test_a_libvirt_start_never_reuses_a_work_directory_its_user_filled(
    specs: str, names: list[str], libvirtd: str
) -> None:
    """The libvirt backend kept a work directory it found, for the console log libvirt opens:
    one left by an older `up` is QEMU's user's, who can put a link at console.log (libvirt 9.0
    here did not write through it; the directory was still the user's, and was reused)."""
    name, tap = kernel.unique("vho-pv"), kernel.unique("vpv")
    names.append(name)
    with planted(name, "console.log") as (_, workdir):
        done = subprocess.run(
            [EXE, "up", tcg_spec(specs, name, tap), "--backend", "libvirt", "--wait", "0"],
            capture_output=True, text=True,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        found = os.lstat(workdir)
        assert found.st_uid == 0 and not os.path.islink(f"{workdir}/console.log")
        assert subprocess.run([EXE, "down", name], capture_output=True).returncode == 0
        assert left(name, [tap]) == []


FILLER = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
print("filling", flush=True)
i = 0
while True:
    i += 1
    try:
        os.close(os.open(f"f{i}", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd))
    except OSError:
        pass
"""


def test_down_removes_a_work_directory_its_user_keeps_filling(specs: str, names: list[str]) -> None:
    """The user keeps a directory fd of its QEMU's directory and adds files to it without
    pause: `down` must still leave no work directory for the next `up` to find."""
    name, tap = kernel.unique("vho-fi"), kernel.unique("vfi")
    names.append(name)
    before = {n for n in os.listdir(state.STATE_DIR) if n.startswith(".gone-")}
    vm = up(specs, name, tap)
    own = os.path.dirname(vm["qmp"])  # the directory QEMU's user writes in
    filler = subprocess.Popen(
        [*AS_QEMU, "/usr/bin/python3", "-c", FILLER, own], stdout=subprocess.PIPE, text=True
    )
    try:
        assert filler.stdout is not None and filler.stdout.readline().strip() == "filling"
        time.sleep(0.3)
        done = subprocess.run([EXE, "down", name], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert not os.path.lexists(vm["workdir"])
    finally:
        filler.kill()  # our own child, by its pid
        filler.wait()
    after = {n for n in os.listdir(state.STATE_DIR) if n.startswith(".gone-")}
    assert after - before == set()  # removed whole, not only renamed away
    assert left(name, [tap]) == []


NESTER = r"""
import os, sys
os.chdir(sys.argv[1])
for _ in range(int(sys.argv[2])):
    os.mkdir("d")
    os.chdir("d")
"""


def test_down_removes_a_work_directory_its_user_nested_deeper_than_python_recurses(
    specs: str, names: list[str]
) -> None:
    """The user nests 3000 directories in its QEMU's directory: shutil.rmtree recursed once
    per level, `down` stopped QEMU then failed 'internal error: RecursionError' with the
    VM's state and tap left, and the tree stayed under a .gone- name."""
    name, tap = kernel.unique("vho-ne"), kernel.unique("vne")
    names.append(name)
    before = {n for n in os.listdir(state.STATE_DIR) if n.startswith(".gone-")}
    vm = up(specs, name, tap)
    as_qemu_user("/usr/bin/python3", "-c", NESTER, os.path.dirname(vm["qmp"]), "3000")
    done = subprocess.run([EXE, "down", name], capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    after = {n for n in os.listdir(state.STATE_DIR) if n.startswith(".gone-")}
    assert after - before == set()
    assert left(name, [tap]) == []


FILL = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
for i in range(int(sys.argv[2])):
    os.close(os.open(f"f{i}", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd))
"""


@pytest.mark.slow
def test_a_removal_killed_half_way_is_finished_by_the_next(specs: str, names: list[str]) -> None:
    """The user fills its QEMU's directory (200,000 files), `down` is SIGKILLed while it
    empties it: the renamed directory stayed in /run for good, as no later removal looked
    for it (each `down` of a filled VM could leave its files there until reboot)."""
    name, tap = kernel.unique("vho-hk"), kernel.unique("vhk")
    names.append(name)
    before = {n for n in os.listdir(state.STATE_DIR) if n.startswith(".gone-")}
    vm = up(specs, name, tap)
    as_qemu_user("/usr/bin/python3", "-c", FILL, os.path.dirname(vm["qmp"]), "200000")
    down = subprocess.Popen([EXE, "down", name], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while os.path.lexists(vm["workdir"]) and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.05)
    down.kill()  # our own child, by its pid: mid-removal
    down.wait()
    killed = {n for n in os.listdir(state.STATE_DIR) if n.startswith(".gone-")} - before
    assert killed, "the removal was not caught half way"
    subprocess.run([EXE, "down", name], capture_output=True)
    vm = up(specs, name, tap)
    assert subprocess.run([EXE, "down", name], capture_output=True).returncode == 0
    after = {n for n in os.listdir(state.STATE_DIR) if n.startswith(".gone-")}
    assert after & killed == set()
    assert left(name, [tap]) == []


STEAL = r"""
# As QEMU's user: take QEMU's listening QMP socket (pidfd_getfd), keep QEMU's monitor busy
# with a client of our own, and answer root's connections on the taken listener.
import ctypes, json, os, socket, sys
qemu, path, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
libc = ctypes.CDLL(None, use_errno=True)
pidfd = os.pidfd_open(qemu)
listener = None
for fd in os.listdir(f"/proc/{qemu}/fd"):
    got = libc.syscall(438, pidfd, int(fd), 0)  # pidfd_getfd
    if got < 0:
        continue
    try:
        s = socket.socket(fileno=got)
    except OSError:  # not a socket
        os.close(got)
        continue
    try:
        if s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) and s.getsockname() == path:
            listener = s
            break
    except OSError:
        pass
    s.close()
assert listener is not None, "no listener"
hog = socket.socket(socket.AF_UNIX)
hog.connect(path)
hog.recv(4096)  # QEMU's monitor now serves this client alone
GREET = b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, '
GREET += b'"capabilities": []}}\r\n'
ODD = {"x-query-virtio": [{"name": "virtio-net", "path": 7}], "qom-list": ["x"]}
ODD_STATUS = {"status": ["x"], "num-vqs": "many", "vhost-started": "yes"}
print("serving", flush=True)
decoder = json.JSONDecoder()
while True:
    conn, _ = listener.accept()
    conn.sendall(GREET)
    buf = ""
    try:
        while data := conn.recv(65536):
            buf += data.decode()
            while buf.strip():
                try:
                    req, end = decoder.raw_decode(buf.lstrip())
                except ValueError:
                    break
                buf = buf.lstrip()[end:]
                cmd, rid = req.get("execute"), json.dumps(req.get("id")).encode()
                if cmd == "qmp_capabilities":
                    answer = b'{"return": {}'
                elif mode == "deep":
                    answer = b'{"return": ' + b"[" * 100000 + b"]" * 100000
                else:
                    answer = b'{"return": ' + json.dumps(ODD.get(cmd, ODD_STATUS)).encode()
                conn.sendall(answer + b', "id": ' + rid + b"}\r\n")
    except OSError:
        pass
"""


@pytest.mark.parametrize("answers", ["types", "deep"])
def test_answers_the_qemu_user_gives_in_qemus_place_never_end_check_all(
    answers: str, specs: str, names: list[str]
) -> None:
    """QEMU's user takes QEMU's listening QMP socket (pidfd_getfd: same uid, so SO_PEERCRED
    still names QEMU), keeps QEMU's monitor busy and answers root itself: answers of other
    types ('types') or 100,000 nested brackets ('deep'). check --all and check --pid
    ended 'internal error' (AttributeError, RecursionError), with no report of any VM, and
    so did `nic add` and `nic del`."""
    name, tap = kernel.unique("vho-st"), kernel.unique("vst")
    names.append(name)
    vm = up(specs, name, tap)
    thief = subprocess.Popen(
        [*AS_QEMU, "/usr/bin/python3", "-c", STEAL, str(vm["pid"]), vm["qmp"], answers],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert thief.stdout is not None and thief.stdout.readline().strip() == "serving"
        for argv in (["--all"], ["--pid", str(vm["pid"])]):
            done = subprocess.run([EXE, "check", *argv], capture_output=True, text=True)
            assert "internal error" not in done.stderr, done.stderr
            assert f"QEMU pid {vm['pid']} ({name})" in done.stdout, done.stderr
        # A hot-plug and an unplug are refused in one line, and leave the VM as it was
        # (they ended 'internal error': a property list of strings was read as dicts).
        extra = kernel.unique("vsx")
        for argv in (["nic", "add", name, "--tap", extra, "--vhost", "off"],
                     ["nic", "del", name, tap]):  # fmt: skip
            done = subprocess.run([EXE, *argv], capture_output=True, text=True)
            assert done.returncode == 1, done.stderr
            assert "internal error" not in done.stderr and len(done.stderr.splitlines()) == 1
        assert [n["tap"] for n in (state_of(name) or {})["nics"]] == [tap]
        assert [f for f in left(name, [extra]) if f.startswith(("tap ", "claim "))] == []
    finally:
        thief.kill()  # our own child, by its pid
        thief.wait()
    assert subprocess.run([EXE, "down", name], capture_output=True).returncode == 0
    assert left(name, [tap]) == []


@pytest.mark.parametrize("how", ["symlink", "hardlink"])
@pytest.mark.parametrize("command", ["down", "nic add"])
def test_a_socket_the_qemu_user_swapped_in_is_never_asked(
    command: str, how: str, specs: str, names: list[str]
) -> None:
    """The user points VM one's QMP socket at VM two's (a link, or the very socket): `down`
    of VM one quit VM two, and a hot-plug went into VM two."""
    one, two = kernel.unique("vho-s1"), kernel.unique("vho-s2")
    tap1, tap2, extra = kernel.unique("vs1"), kernel.unique("vs2"), kernel.unique("vsx")
    names += [one, two]
    vm1, vm2 = up(specs, one, tap1), up(specs, two, tap2)
    as_qemu_user("rm", vm1["qmp"])
    as_qemu_user("ln", *(["-s"] if how == "symlink" else []), vm2["qmp"], vm1["qmp"])
    if command == "down":
        done = subprocess.run([EXE, "down", one], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr  # by SIGTERM, its QMP refused
        assert gone(vm1["pid"])
        assert left(one, [tap1]) == []
    else:
        done = subprocess.run(
            [EXE, "nic", "add", one, "--tap", extra, "--vhost", "off"],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
        assert "not asked" in done.stderr or "not a socket" in done.stderr, done.stderr
        assert tun.holders(extra) == [] and not os.path.exists(f"/sys/class/net/{extra}")
        assert procfs.alive(vm1["pid"])
    assert procfs.alive(vm2["pid"])  # VM two was not told anything
    assert {pid for pid, _ in tun.holders(tap2)} == {vm2["pid"]}
    assert subprocess.run([EXE, "down", two], capture_output=True).returncode == 0
    if command != "down":
        assert subprocess.run([EXE, "down", one], capture_output=True).returncode == 0
    assert left(one, [tap1, extra]) == [] and left(two, [tap2]) == []


@pytest.mark.parametrize("swapped", [False, True])
def test_a_start_killed_before_its_pid_is_found_by_its_own_socket_alone(
    swapped: bool, specs: str, names: list[str]
) -> None:
    """A SIGKILL between QEMU's start and `up` recording its pid leaves the state "starting",
    with no pid: `down` finds that QEMU as the server of its QMP socket. That instant cannot
    be hit on purpose from outside, so the state file is put back to what `up` had written by
    then; QEMU, its socket and `down` are real. (A guard for the way the QEMU is found, which
    replaced a pid file QEMU's user could write.) The user may have put another VM's socket
    there: that VM's QEMU names another socket on its command line and is left alone."""
    one, two = kernel.unique("vho-k1"), kernel.unique("vho-k2")
    tap1, tap2 = kernel.unique("vk1"), kernel.unique("vk2")
    names += [one, two]
    vm1 = up(specs, one, tap1)
    running = state_of(one)
    assert running is not None
    killed = {**running, "status": "starting", "pid": 0, "start_time": None, "nics": [],
              "claimed": [tap1], "making": [tap1],
              "launched_after": running["start_time"] - 1}  # fmt: skip
    with open(os.path.join(state.STATE_DIR, f"{one}.json"), "w") as f:
        json.dump(killed, f)
    if swapped:
        vm2 = up(specs, two, tap2)
        as_qemu_user("rm", vm1["qmp"])
        as_qemu_user("ln", vm2["qmp"], vm1["qmp"])  # the very socket: a link is not followed
    done = subprocess.run([EXE, "down", one], capture_output=True, text=True)
    if not swapped:
        assert done.returncode == 0, done.stderr
        assert gone(vm1["pid"]) and left(one, [tap1]) == []
        return
    # QEMU one is not found, so its tap is still held and stays: down says so.
    assert done.returncode == 1 and "held open" in done.stderr, done.stderr
    assert procfs.alive(vm2["pid"]) and procfs.alive(vm1["pid"])
    os.kill(vm1["pid"], signal.SIGKILL)  # the QEMU this test started
    assert gone(vm1["pid"])
    for name in (one, two):
        assert subprocess.run([EXE, "down", name], capture_output=True).returncode == 0
    assert left(one, [tap1]) == [] and left(two, [tap2]) == []


# --- item 6: QEMU takes the stopping signals -----------------------------------------------


def test_qemu_started_by_up_blocks_no_stopping_signal_and_dies_on_sigterm(
    specs: str, names: list[str]
) -> None:
    """`up` starts QEMU while it holds SIGHUP, SIGINT and SIGTERM; QEMU kept them blocked for
    life, so `kill`, `systemctl stop` and down's own SIGTERM did nothing. (QEMU blocks a few
    signals of its own, SIGBUS, SIGUSR1, SIGALRM and SIGIO, to read them from a signalfd.)"""
    name, tap = kernel.unique("vho-sg"), kernel.unique("vsg")
    names.append(name)
    pid = up(specs, name, tap)["pid"]
    with open(f"/proc/{pid}/status") as f:
        blocked = next(int(line.split()[1], 16) for line in f if line.startswith("SigBlk:"))
    stopping = {s: bool(blocked & (1 << (s - 1))) for s in (signal.SIGHUP, signal.SIGINT,
                                                            signal.SIGTERM)}  # fmt: skip
    assert not any(stopping.values()), (hex(blocked), stopping)
    os.kill(pid, signal.SIGTERM)  # QEMU vhostorch started for this test
    assert gone(pid, 10), "QEMU ignored SIGTERM"
    assert subprocess.run([EXE, "down", name], capture_output=True).returncode == 0
    assert left(name, [tap]) == []
