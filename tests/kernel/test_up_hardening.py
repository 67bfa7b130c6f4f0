"""`up` and `down` under attack (issue 16, items 1, 2, 5, 6, 12), on the real thing.

Real QEMU (TCG, vhost "preferred": this machine has no /dev/vhost-net), real taps in
the root namespace with unique names, real signals sent to the `vhostorch` process,
real claim files in /run/vhostorch/hook/taps. Each test reproduces the attack as it
was reported and ends with nothing left behind.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

from tests.support import kernel
from tests.support.kernel import EXE
from tests.support.vms import (
    Booted,
    left,
    link_exists,
    locking,
    qemus_of,
    run,
    spec,
    state_of,
    wait_for,
)
from vhostorch import claims
from vhostorch.kernel import procfs, tun
from vhostorch.vm.state import STATE_DIR

# --- item 1: a tap belongs to one VM -------------------------------------------------


@pytest.mark.parametrize("apart", [0.0, 0.05])
def test_two_ups_of_one_tap_the_second_is_refused(
    apart: float, specs: str, names: list[str]
) -> None:
    tap = kernel.unique("vs")
    first, second = kernel.unique("vho-a"), kernel.unique("vho-b")
    names += [first, second]
    procs = []
    for name in (first, second):
        path = spec(specs, name, tap)
        procs.append(
            subprocess.Popen(
                [EXE, "up", path, "--wait", "0"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
        time.sleep(apart)
    done = [(p.wait(60), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in done)
    assert codes == [0, 1], done
    loser = next(err for code, _, err in done if code == 1)
    assert loser.count("\n") == 1 and f"tap {tap} is held by VM" in loser, loser
    winner = first if done[0][0] == 0 else second
    assert len({pid for pid, _ in tun.holders(tap)}) == 1  # one QEMU holds its queues
    assert claims.holder(tap) == claims.up_holder(winner)
    assert subprocess.run([EXE, "down", winner], capture_output=True).returncode == 0
    assert left(first, [tap]) == [] and left(second, [tap]) == []


def test_a_tap_a_libvirt_domain_holds_is_refused_and_the_hook_refuses_ours(
    specs: str, names: list[str]
) -> None:
    from vhostorch.errors import OperationFailed
    from vhostorch.hook import state

    tap, mine = kernel.unique("vd"), kernel.unique("vd")
    name = kernel.unique("vho-c")
    names.append(name)
    assert claims.claim(tap, "some-domain")  # as the hook's prepare leaves it
    try:
        code, _, err = run("up", spec(specs, name, tap), "--wait", "0")
        assert code == 1 and f"tap {tap} is held by domain 'some-domain'" in err, err
        assert not link_exists(tap) and state_of(name) is None
    finally:
        claims.release(tap, "some-domain")
    code, _, err = run("up", spec(specs, name, mine), "--wait", "0")
    assert code == 0, err
    with pytest.raises(OperationFailed, match=f"declared by VM '{name}' \\(vhostorch up\\)"):
        state.claim(state.Places(), mine, "some-domain")
    assert subprocess.run([EXE, "down", name], capture_output=True).returncode == 0
    assert left(name, [tap, mine]) == []


# --- item 2: signals during up ---------------------------------------------------------


def _up_until_qemu(specs: str, name: str, tap: str) -> tuple[subprocess.Popen[str], int]:
    """An `up` stopped in the middle: its QEMU started (and recorded), the wait not over."""
    proc = subprocess.Popen(
        [EXE, "up", spec(specs, name, tap), "--wait", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    pid = wait_for("QEMU", lambda: qemus_of(name))[0]
    return proc, pid


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_or_sighup_during_up_rolls_everything_back(
    sig: signal.Signals, specs: str, names: list[str]
) -> None:
    name, tap = kernel.unique("vho-t"), kernel.unique("vg")
    names.append(name)
    for _ in range(5):
        proc, qemu = _up_until_qemu(specs, name, tap)
        # Stopped where it is, so that the signal lands in the middle of `up` (a fast `up`
        # can finish between seeing its QEMU and the signal: then it is taken down and
        # tried again).
        proc.send_signal(signal.SIGSTOP)
        proc.send_signal(sig)
        proc.send_signal(signal.SIGCONT)
        code = proc.wait(60)
        _, err = proc.communicate()
        if code != 0:
            break
        assert subprocess.run([EXE, "down", name], capture_output=True).returncode == 0
    else:
        pytest.fail("up finished before the signal five times: the test needs a slower start")
    assert code == 130 and "interrupted" in err and err.count("\n") == 1, (code, err)
    assert not procfs.alive(qemu)
    assert left(name, [tap]) == []


@pytest.mark.parametrize("recovery", ["down", "up"])
def test_sigkill_during_up_is_undone_by_down_or_the_next_up(
    recovery: str, specs: str, names: list[str]
) -> None:
    name, tap = kernel.unique("vho-k"), kernel.unique("vk")
    names.append(name)
    proc, qemu = _up_until_qemu(specs, name, tap)
    proc.kill()
    proc.wait()
    proc.communicate()
    state = state_of(name)
    assert state is not None  # what it had made is on record
    if recovery == "down":
        code, _, err = run("down", name)
        assert code == 0, err
    else:
        code, out, err = run("up", spec(specs, name, tap), "--wait", "0")
        assert code == 0, err
        assert out["vm"]["nics"][0]["tap_created"] is True  # so `down` deletes it
        assert run("down", name)[0] == 0
    assert not procfs.alive(qemu)
    assert left(name, [tap]) == []


# --- item 5: down signals its own QEMU only ------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True])
def test_down_spares_a_process_that_took_the_dead_qemus_pid(
    legacy: bool, specs: str, names: list[str]
) -> None:
    name, tap = kernel.unique("vho-p"), kernel.unique("vp")
    names.append(name)
    code, out, err = run("up", spec(specs, name, tap), "--wait", "0")
    assert code == 0, err
    workdir = out["vm"]["workdir"]
    os.kill(out["vm"]["pid"], signal.SIGKILL)  # the QEMU this test's `up` started
    wait_for("QEMU gone", lambda: not procfs.alive(out["vm"]["pid"]))
    # A root `tail -F` on the console, with the pid the state file names (as if reused).
    tail = subprocess.Popen(["tail", "-F", f"{workdir}/console.log"], stderr=subprocess.DEVNULL)
    try:
        path = os.path.join(STATE_DIR, f"{name}.json")
        with open(path) as f:
            data = json.load(f)
        data["pid"] = tail.pid
        if legacy:
            del data["start_time"]  # a file written before start times were kept
        with open(path, "w") as f:
            json.dump(data, f)
        code, _, err = run("down", name)
        assert code == 0, err
        assert tail.poll() is None, "down killed a process that is not its QEMU"
    finally:
        tail.kill()
        tail.wait()
    assert left(name, [tap]) == []


# --- item 6: modes and trust ---------------------------------------------------------------


def test_under_umask_000_nothing_is_world_writable(specs: str, names: list[str]) -> None:
    name, tap = kernel.unique("vho-m"), kernel.unique("vm")
    names.append(name)
    done = subprocess.run(
        ["sh", "-c", 'umask 000 && exec "$0" up "$1" --wait 0', EXE, spec(specs, name, tap)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    modes = {
        "state": os.stat(os.path.join(STATE_DIR, f"{name}.json")).st_mode,
        "lock": os.stat(os.path.join(STATE_DIR, f"{name}.lock")).st_mode,
        "dir": os.stat(STATE_DIR).st_mode,
        "workdir": os.stat(os.path.join(STATE_DIR, f"{name}.d")).st_mode,
        "qemu": os.stat(os.path.join(STATE_DIR, f"{name}.d", "qemu")).st_mode,
        "log": os.stat(os.path.join(STATE_DIR, f"{name}.d", "qemu.log")).st_mode,
        "console": os.stat(os.path.join(STATE_DIR, f"{name}.d", "console.log")).st_mode,
        "claim": os.stat(claims.path(tap)).st_mode,
    }
    assert {k: oct(stat.S_IMODE(m)) for k, m in modes.items()} == {
        "state": "0o600", "lock": "0o600", "dir": "0o711", "workdir": "0o711", "qemu": "0o700",
        "log": "0o600", "console": "0o600", "claim": "0o600",
    }  # fmt: skip
    assert run("down", name)[0] == 0
    assert left(name, [tap]) == []


@pytest.mark.parametrize("how", ["named", "symlink"])
def test_a_forged_state_file_does_not_make_down_remove_another_directory(
    how: str, specs: str, names: list[str]
) -> None:
    name, tap = kernel.unique("vho-f"), kernel.unique("vf")
    names.append(name)
    code, out, err = run("up", spec(specs, name, tap), "--wait", "0")
    assert code == 0, err
    victim = tempfile.mkdtemp(prefix="vho-victim-")
    with open(os.path.join(victim, "precious"), "w") as f:
        f.write("keep")
    path = os.path.join(STATE_DIR, f"{name}.json")
    with open(path) as f:
        data = json.load(f)
    real_workdir = data["workdir"]
    try:
        if how == "named":
            data["workdir"] = victim
            with open(path, "w") as f:
                json.dump(data, f)
            code, _, err = run("down", name)
            assert code == 1 and "refusing" in err, err
            assert os.path.exists(os.path.join(victim, "precious"))
            data["workdir"] = real_workdir  # put back: down then works
            with open(path, "w") as f:
                json.dump(data, f)
        else:
            os.kill(out["vm"]["pid"], signal.SIGKILL)
            wait_for("QEMU gone", lambda: not procfs.alive(out["vm"]["pid"]))
            subprocess.run(["rm", "-rf", real_workdir], check=True)
            os.symlink(victim, real_workdir)
            code, _, err = run("down", name)
            assert code == 1 and "refusing" in err, err
            assert os.path.exists(os.path.join(victim, "precious"))
            os.unlink(real_workdir)
            os.mkdir(real_workdir)
        assert run("down", name)[0] == 0
    finally:
        subprocess.run(["rm", "-rf", victim], check=False)
    assert left(name, [tap]) == []


# --- item 12: QEMU runs unprivileged, sandboxed -------------------------------------------


def test_qemu_runs_as_libvirts_qemu_user_under_seccomp(specs: str, names: list[str]) -> None:
    import pwd

    try:
        user = pwd.getpwnam("libvirt-qemu")
    except KeyError:
        pytest.skip("no libvirt-qemu user on this host")
    name, tap = kernel.unique("vho-u"), kernel.unique("vu")
    names.append(name)
    code, out, err = run("up", spec(specs, name, tap), "--wait", "0")
    assert code == 0, err
    assert "warning" not in err
    with open(f"/proc/{out['vm']['pid']}/status") as f:
        status = dict(line.split(":", 1) for line in f.read().splitlines())
    assert status["Uid"].split() == [str(user.pw_uid)] * 4
    assert status["Seccomp"].strip() == "2"  # filter mode: -sandbox on
    assert tun.holders(tap)  # it got its queues all the same
    assert run("down", name)[0] == 0
    # --user root keeps root, and says so.
    code, out, err = run("up", spec(specs, name, tap), "--wait", "0", "--user", "root")
    assert code == 0 and "QEMU runs as root" in err, err
    assert run("down", name)[0] == 0
    assert left(name, [tap]) == []


def _domain_uuid(name: str) -> str | None:
    done = subprocess.run(["virsh", "-q", "-c", "qemu:///system", "domuuid", name],
                          capture_output=True, text=True)  # fmt: skip
    return done.stdout.strip() or None if done.returncode == 0 else None


def test_a_libvirt_start_killed_before_its_pid_is_undone_by_its_uuid_alone(
    specs: str, names: list[str], libvirtd: str
) -> None:
    """A SIGKILL between libvirt starting the domain and `up` recording its pid leaves the
    state "starting", no pid, and the UUID vhostorch gave the domain (recorded before it was
    defined). That instant cannot be hit on purpose from outside, so the state file is put
    back to what `up` had written by then; the domain, libvirtd and `down` are real. A domain
    of that name but another UUID is not vhostorch's start, and is left alone."""
    name, tap = kernel.unique("vho-u"), kernel.unique("vu")
    names.append(name)
    code, _, err = run("up", spec(specs, name, tap), "--backend", "libvirt", "--wait", "0")
    assert code == 0, err
    running = state_of(name)
    assert running is not None and running["vm_id"] == _domain_uuid(name)
    path = os.path.join(STATE_DIR, f"{name}.json")
    killed = {**running, "status": "starting", "pid": 0, "start_time": None, "nics": [],
              "claimed": [tap], "making": [tap], "launched_after": None}  # fmt: skip
    with open(path, "w") as f:
        json.dump({**killed, "vm_id": "00000000-0000-4000-8000-000000000001"}, f)
    code, _, err = run("down", name)
    # Not the UUID recorded: the domain is not touched, so its QEMU still holds the tap.
    assert code == 1 and "held open" in err, err
    assert _domain_uuid(name) == running["vm_id"]
    with open(path, "w") as f:  # the same start, recorded as `up` recorded it
        json.dump(killed, f)
    os.makedirs(running["workdir"], exist_ok=True)
    claims.claim(tap, claims.up_holder(name))
    code, _, err = run("down", name)
    assert code == 0, err
    assert _domain_uuid(name) is None
    assert left(name, [tap]) == []


# --- issue 19, items 4 and 8: recovery deletes only the tap vhostorch made ------------------


def _alias(tap: str) -> str | None:
    """The interface alias of ``tap``; "(deleted)" when there is no such device."""
    try:
        with open(f"/sys/class/net/{tap}/ifalias") as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return "(deleted)"


def _persistent(tap: str) -> bool:
    try:
        with open(f"/sys/class/net/{tap}/tun_flags") as f:
            return bool(int(f.read(), 16) & kernel.IFF_PERSIST)
    except (FileNotFoundError, ValueError):
        return False


def _replace_with_someone_elses(tap: str) -> None:
    """Delete ``tap`` and make another tap of that name, as another tool would (multi-queue
    with vnet_hdr, as the spec's: a start could take it as it is)."""
    subprocess.run(["ip", "link", "delete", tap], check=True)
    add = ["ip", "tuntap", "add", "dev", tap, "mode", "tap", "multi_queue", "vnet_hdr"]
    subprocess.run(add, check=True)
    subprocess.run(["ip", "link", "set", tap, "up", "alias", "someone-else"], check=True)


def _killed_starting(specs: str, name: str, tap: str) -> int:
    """An `up` killed (SIGKILL) while "starting", after it made its tap; its QEMU's pid."""
    for _ in range(5):
        proc, qemu = _up_until_qemu(specs, name, tap)
        # Made for good (TUNSETPERSIST): before that, the kill takes the tap with it.
        _until("persistent", proc, qemu, tap)
        proc.send_signal(signal.SIGSTOP)  # where it is: still starting, or up already?
        state = state_of(name)
        proc.kill()
        proc.wait()
        proc.communicate()
        if state is not None and state["status"] == "starting":
            return qemu
        assert run("down", name)[0] == 0  # it had finished: again
    pytest.fail("up finished before the kill five times")


@pytest.mark.parametrize("recovery", ["down", "up"])
def test_after_a_killed_up_recovery_spares_a_tap_someone_made_under_its_name(
    recovery: str, specs: str, names: list[str]
) -> None:
    """Item 4: recovery (down, the next up) of a start killed after making its tap; then
    item 8: down of a running VM whose tap was replaced."""
    name, tap = kernel.unique("vho-r"), kernel.unique("vr")
    names.append(name)
    qemu = _killed_starting(specs, name, tap)
    made = _alias(tap)
    try:
        _replace_with_someone_elses(tap)
        if recovery == "down":
            code, out, err = run("down", name)
            assert code == 0, err
            assert _alias(tap) == "someone-else"  # it survived
            assert out["taps_left"] == [tap] and out["taps_removed"] == []
        else:  # the next up undoes the dead start, then takes the tap as it finds it
            code, out, err = run("up", spec(specs, name, tap), "--wait", "0")
            assert code == 0, err
            assert _alias(tap) == "someone-else"
            assert out["vm"]["nics"][0]["tap_created"] is False
            code, out, err = run("down", name)
            assert code == 0 and out["taps_left"] == [], err
        assert _alias(tap) == "someone-else"
        assert made is not None and made.startswith("vhostorch:"), made  # the start's mark
        assert not procfs.alive(qemu)
        assert left(name, [tap]) == [f"tap {tap}"]  # state, claim, QEMU: all gone
        # Item 8: replaced while the VM runs; the text says so, in one line.
        subprocess.run(["ip", "link", "delete", tap], check=True)
        code, _, err = run("up", spec(specs, name, tap), "--wait", "0")
        assert code == 0, err
        _replace_with_someone_elses(tap)
        done = subprocess.run([EXE, "down", name], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert done.stdout.count("\n") == 1 and f"left alone: {tap}" in done.stdout, done.stdout
        assert _alias(tap) == "someone-else"
        assert left(name, [tap]) == [f"tap {tap}"]
    finally:
        subprocess.run(["ip", "link", "delete", tap], capture_output=True)


# --- issue 19, item 5: nic add and nic del under signals --------------------------------------


@pytest.fixture(scope="module")
def booted() -> Iterator[Booted]:
    directory = tempfile.mkdtemp(prefix="vho-nic-")
    os.chmod(directory, 0o755)
    vm = None
    try:
        vm = Booted(directory)
        yield vm
    finally:
        if vm is not None:
            subprocess.run([EXE, "down", vm.name], capture_output=True)
            assert left(vm.name, [vm.tap]) == []
        subprocess.run(["rm", "-rf", directory], check=False)


def _nic(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([EXE, "nic", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


def _plugged(pid: int, tap: str) -> bool:
    return any(holder == pid for holder, _ in tun.holders(tap))


def _until(moment: str, proc: subprocess.Popen[str], pid: int, tap: str) -> None:
    """Wait until a command making ``tap`` has claimed it, made it (for good: persistent),
    or passed QEMU its fds (``moment``), or has ended."""
    reached = {
        "claimed": lambda: claims.holder(tap) is not None,
        "made": lambda: link_exists(tap),
        "persistent": lambda: _persistent(tap),
        "plugged": lambda: _plugged(pid, tap),
    }[moment]
    wait_for(moment, lambda: reached() or proc.poll() is not None)


@pytest.mark.parametrize("moment", ["claimed", "made", "plugged"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_during_nic_add_undoes_it(
    sig: signal.Signals, moment: str, booted: Booted
) -> None:
    for _ in range(5):
        tap = kernel.unique("va")
        proc = _nic("add", booted.name, "--tap", tap, "--vhost", "off", "--wait", "0")
        _until(moment, proc, booted.pid, tap)
        proc.send_signal(sig)
        code = proc.wait(120)
        _, err = proc.communicate()
        if code == 130 or tap not in booted.nics():
            break
        # It had finished (and recorded the NIC) before the signal: take it out, try again.
        assert run("nic", "del", booted.name, tap)[0] == 0
    else:
        pytest.fail("nic add finished before the signal five times")
    assert code == 130 and err.count("\n") == 1 and "interrupted" in err, (code, err)
    assert booted.as_before(tap) == []


@pytest.mark.parametrize("moment", ["made", "plugged"])
@pytest.mark.parametrize("recovery", ["nic del", "nic add of another"])
def test_a_nic_add_killed_outright_is_undone_by_the_next_nic_command(
    recovery: str, moment: str, booted: Booted
) -> None:
    for _ in range(5):
        tap = kernel.unique("vk")
        proc = _nic("add", booted.name, "--tap", tap, "--vhost", "off", "--wait", "0")
        _until(moment, proc, booted.pid, tap)
        proc.kill()
        code = proc.wait(60)
        _, err = proc.communicate()
        if code == -signal.SIGKILL:
            break
        # It had finished before the kill (a loaded machine): take it out, try again.
        assert code == 0 and run("nic", "del", booted.name, tap)[0] == 0, (code, err)
    else:
        pytest.fail("nic add finished before the kill five times")
    state = state_of(booted.name)
    assert state is not None
    if tap in booted.nics():  # killed after it had recorded the NIC: whole, on record
        assert state["plugging"] is None
    else:  # what it was doing is on record
        assert state.get("plugging", {})["tap"] == tap, state
        assert state["claimed"] == [booted.tap, tap]
    if recovery == "nic add of another":
        other = kernel.unique("vk")
        code, _, err = run("nic", "add", booted.name, "--tap", other, "--vhost", "off",
                           "--wait", "0")  # fmt: skip
        assert code == 0, err
        assert run("nic", "del", booted.name, other)[0] == 0
        if tap in booted.nics():
            assert run("nic", "del", booted.name, tap)[0] == 0
        assert booted.as_before(other) == []
    else:
        code, _, err = run("nic", "del", booted.name, tap)
        assert code == 0, err
    assert booted.as_before(tap) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
@pytest.mark.parametrize("moment", ["unplugging", "deleting"])
def test_a_signal_during_nic_del_leaves_the_nic_whole_or_gone(
    sig: signal.Signals, moment: str, booted: Booted
) -> None:
    from vhostorch.taps.teardown import NamespaceLock

    tap = kernel.unique("vd")
    code, _, err = run("nic", "add", booted.name, "--tap", tap, "--vhost", "off", "--wait", "0")
    assert code == 0, err
    if moment == "unplugging":
        proc = _nic("del", booted.name, tap)
        wait_for("nic del under way", lambda: locking(proc.pid))
        time.sleep(0.05)  # the guest takes longer than that to release the device
        proc.send_signal(sig)
    else:
        # Tap deletes in a namespace take turns: holding that turn stops nic del right after
        # it has recorded the NIC gone, before it deletes the tap and gives back the claim.
        with NamespaceLock():
            proc = _nic("del", booted.name, tap)
            wait_for("the NIC off the record", lambda: tap not in booted.nics())
            time.sleep(0.1)
            proc.send_signal(sig)
            time.sleep(0.1)
    code = proc.wait(120)
    _, err = proc.communicate()
    assert code in (0, 130), (code, err)
    if tap in booted.nics():  # stopped while the guest was releasing it: whole, and recorded
        assert link_exists(tap) and claims.holder(tap) == claims.up_holder(booted.name)
        code, _, err = run("nic", "del", booted.name, tap)  # run again, it finishes
        assert code == 0, err
    assert booted.as_before(tap) == []
