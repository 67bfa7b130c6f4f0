"""Proofs that `up`/`down` hold under signals and races (issue 16): they stop by themselves.

A soak of 200 up/down cycles with SIGTERM or SIGKILL sent at a random moment of `up`
in a fifth of them, each followed by the recovery a user would run; and 50
concurrent `up`s over 10 shared tap names. Real QEMU (TCG), real taps, real claim
files. The figures are printed (run with -s to see them).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time

import pytest

from tests.support import kernel
from tests.support.kernel import EXE
from tests.support.vms import left, locking, spec, state_of, wait_for
from vhostorch import claims
from vhostorch.kernel import tun

CYCLES = 200
LANES = 2  # VMs cycled side by side (2 cores)
INJECT_EVERY = 5  # a fifth of the cycles


def _vhostorch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, *args], capture_output=True, text=True)


def _lane(directory: str, lane: int, cycles: int, seed: int, tally: dict[str, int]) -> None:
    rng = random.Random(seed)
    name, tap = kernel.unique(f"vho-s{lane}"), kernel.unique("vs")
    path = spec(directory, name, tap)
    took = 0.3  # how long this lane's last clean `up` took: signals land within that span
    for cycle in range(cycles):
        if cycle % INJECT_EVERY == INJECT_EVERY - 1:
            sig = rng.choice([signal.SIGTERM, signal.SIGKILL])
            proc = subprocess.Popen(
                [EXE, "up", path, "--wait", "0"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            time.sleep(rng.uniform(0.0, took))
            proc.send_signal(sig)
            code = proc.wait(60)
            err = proc.stderr.read() if proc.stderr else ""
            tally[f"{sig.name} sent"] = tally.get(f"{sig.name} sent", 0) + 1
            state = state_of(name)
            if code == 0:
                tally["finished before the signal"] = tally.get("finished before the signal", 0) + 1
            elif sig == signal.SIGTERM:
                assert code in (130, -signal.SIGTERM), (code, err)
            if state is None:
                continue
            if state.get("status") == "running" or rng.random() < 0.5:
                done = _vhostorch("down", name)  # the user's recovery: down
                assert done.returncode == 0, done.stderr
                tally["recovered by down"] = tally.get("recovered by down", 0) + 1
            else:
                tally["recovered by the next up"] = tally.get("recovered by the next up", 0) + 1
            continue
        began = time.monotonic()
        done = _vhostorch("up", path, "--wait", "0")
        took = time.monotonic() - began
        assert done.returncode == 0, done.stderr
        done = _vhostorch("down", name)
        assert done.returncode == 0, done.stderr
        tally["clean cycles"] = tally.get("clean cycles", 0) + 1
    if state_of(name) is not None:
        assert _vhostorch("down", name).returncode == 0
    tally[f"left {lane}"] = len(left(name, [tap]))
    assert left(name, [tap]) == []


@pytest.mark.slow
def test_soak_200_cycles_with_signals_leaves_nothing(tmp_path: object) -> None:
    directory = str(tmp_path)
    os.chmod(directory, 0o755)
    tally: dict[str, int] = {}
    errors: list[BaseException] = []

    def lane(n: int) -> None:
        try:
            _lane(directory, n, CYCLES // LANES, 1600 + n, tally)
        except BaseException as err:
            errors.append(err)

    begin = time.monotonic()
    threads = [threading.Thread(target=lane, args=(n,)) for n in range(LANES)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"\nsoak: {CYCLES} cycles in {time.monotonic() - begin:.0f} s: {tally}")
    assert not errors, errors[0]


@pytest.mark.slow
def test_50_concurrent_ups_over_10_taps_one_winner_each(tmp_path: object) -> None:
    directory = str(tmp_path)
    os.chmod(directory, 0o755)
    taps = [kernel.unique("vc") for _ in range(10)]
    names = [kernel.unique("vho-c") for _ in range(50)]
    paths = [spec(directory, n, taps[i % 10]) for i, n in enumerate(names)]
    begin = time.monotonic()
    procs = [
        subprocess.Popen(
            [EXE, "up", p, "--wait", "0"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for p in paths
    ]
    results = [(p.wait(120), p.stderr.read() if p.stderr else "") for p in procs]
    took = time.monotonic() - begin
    try:
        winners = {i for i, (code, _) in enumerate(results) if code == 0}
        losers = [results[i] for i in range(50) if i not in winners]
        held = {t: {pid for pid, _ in tun.holders(t)} for t in taps}
        print(
            f"\nconcurrency: 50 ups over 10 taps in {took:.1f} s: {len(winners)} up, "
            f"{len(losers)} refused; QEMUs per tap: {sorted(len(h) for h in held.values())}"
        )
        assert sorted(i % 10 for i in winners) == list(range(10))  # one winner per tap
        assert all(len(h) == 1 for h in held.values())
        for code, err in losers:
            assert code == 1 and err.count("\n") == 1 and "is held by VM" in err, (code, err)
        for i in winners:
            assert claims.holder(taps[i % 10]) == claims.up_holder(names[i])
    finally:
        for name in names:
            if state_of(name) is not None:
                _vhostorch("down", name)
    for i, name in enumerate(names):
        assert left(name, [taps[i % 10]]) == []


# --- issue 19: nic add / nic del and the hook under signals --------------------------------

NIC_CYCLES = 30
HOOK_CYCLES = 60


def _count(tally: dict[str, int], key: str) -> None:
    tally[key] = tally.get(key, 0) + 1


def _started(cmd: list[str], stdin: bytes | None = None) -> tuple[subprocess.Popen[bytes], float]:
    """``cmd`` running, once it holds its lock (the VM's, the domain's: its work has begun,
    its signal handling is set up), and when that was seen."""
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stdin is not None
    if stdin:
        proc.stdin.write(stdin)
    proc.stdin.close()
    proc.stdin = None
    wait_for("the lock", lambda: locking(proc.pid) or proc.poll() is not None)
    return proc, time.monotonic()


def _worked(cmd: list[str], stdin: bytes | None = None) -> float:
    """Run ``cmd`` to its end (it must succeed); how long it worked holding its lock."""
    proc, began = _started(cmd, stdin)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return time.monotonic() - began


def _signalled(cmd: list[str], rng: random.Random, within: float, tally: dict[str, int],
               signals: tuple[signal.Signals, ...], failing: tuple[int, ...] = (130,),
               stdin: bytes | None = None) -> tuple[int, str]:  # fmt: skip
    """Run ``cmd`` and send it one of ``signals`` at a random moment within ``within`` s of
    its taking its lock; it must end in 0, ``failing`` or by the signal (SIGKILL; another
    only once its work is done, on its way out)."""
    sig = rng.choice(signals)
    proc, _ = _started(cmd, stdin)
    time.sleep(rng.uniform(0.0, within))
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    _count(tally, f"{cmd[2]} {sig.name}")  # add, del, prepare, release
    if proc.returncode == 0:
        _count(tally, "finished before the signal")
    elif proc.returncode == -sig:
        _count(tally, f"ended by {sig.name}")
    else:
        assert proc.returncode in failing, (cmd, proc.returncode, err)
        _count(tally, f"exit {proc.returncode}")
    return proc.returncode, err.decode(errors="replace")


@pytest.mark.slow
def test_nic_soak_with_signals_leaves_nothing(tmp_path: object) -> None:
    """NIC_CYCLES hot-plug cycles on one booted VM; in each, nic add or nic del (or both) is
    sent SIGTERM, SIGHUP or SIGKILL at a random moment of its work; the user's recovery is
    to run nic del again. After every cycle the VM is as `up` left it."""
    from tests.support.vms import Booted

    directory = str(tmp_path)
    os.chmod(directory, 0o755)
    rng = random.Random(1900)
    tally: dict[str, int] = {}
    stopping = (signal.SIGTERM, signal.SIGHUP, signal.SIGKILL)
    begin = time.monotonic()
    vm = Booted(directory)
    try:
        took = {"add": 0.5, "del": 1.0}  # how long the last clean one worked
        for cycle in range(NIC_CYCLES):
            # Four kinds of cycle: add and del signalled; add signalled; neither (measured);
            # del signalled.
            kind = cycle % 4
            tap = kernel.unique("vz")
            add = [EXE, "nic", "add", vm.name, "--tap", tap, "--vhost", "off", "--wait", "0"]
            delete = [EXE, "nic", "del", vm.name, tap]
            if kind in (0, 1):
                code, err = _signalled(add, rng, took["add"], tally, stopping)
                if code == 130:  # rolled back at once
                    assert vm.as_before(tap) == [], err
            else:
                took["add"] = _worked(add)
            if kind == 2:
                took["del"] = _worked(delete)
            elif kind != 1:  # 2: nothing to delete (the add was undone)
                _signalled(delete, rng, took["del"], tally, stopping, (130, 2))
            while True:  # the user's recovery: nic del again, until there is nothing to delete
                done = _vhostorch(*delete[1:])
                if done.returncode != 0:
                    assert done.returncode == 2 and "has no NIC on tap" in done.stderr, done.stderr
                    break
                _count(tally, "nic del run again")
            assert vm.as_before(tap) == [], cycle
            _count(tally, "cycles")
    finally:
        assert _vhostorch("down", vm.name).returncode == 0
    assert left(vm.name, [vm.tap]) == []
    print(f"\nnic soak: {NIC_CYCLES} cycles in {time.monotonic() - begin:.0f} s: {tally}")


@pytest.mark.slow
def test_hook_soak_with_signals_leaves_nothing(ns: str) -> None:
    """HOOK_CYCLES prepare/release cycles of one domain declaring 4 taps, in a throwaway
    namespace; prepare in two cycles of three and release in one of three get SIGTERM,
    SIGHUP, SIGINT or SIGKILL at a random moment of their work, and release is run again
    until it succeeds. After every cycle nothing of the domain's is left."""
    from tests.support.hook import HOOK, left_of, tap_xml
    from vhostorch.kernel import netns

    rng = random.Random(1901)
    tally: dict[str, int] = {}
    name = kernel.unique("vho-hs")
    taps = [f"h{name[-6:]}n{i}" for i in range(4)]
    xml = tap_xml(name, taps)
    stopping = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGKILL)
    prepare = [HOOK, name, "prepare", "begin", "-"]
    release = [HOOK, name, "release", "end", "-"]
    begin = time.monotonic()
    took = {"prepare": 0.05, "release": 0.05}
    with netns.entered(ns):
        for cycle in range(HOOK_CYCLES):
            if cycle % 3 != 2:
                code, err = _signalled(prepare, rng, took["prepare"], tally, stopping, (1,), xml)
                if code == 1:  # rolled back at once, in one line
                    assert err.count("\n") == 1, err
                    assert [t for t in taps if t in kernel.links(ns)] == []
            else:
                took["prepare"] = _worked(prepare, xml)
            if cycle % 3 == 1:
                _signalled(release, rng, took["release"], tally, stopping, (1,))
            if cycle % 3 == 2:
                took["release"] = _worked(release)
            while subprocess.run(release, capture_output=True).returncode != 0:
                _count(tally, "release run again")
            assert [t for t in taps if t in kernel.links(ns)] == [], cycle
            assert left_of(name, taps) == [], cycle
            _count(tally, "cycles")
    print(f"\nhook soak: {HOOK_CYCLES} cycles in {time.monotonic() - begin:.0f} s: {tally}")
