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

from tests import kernel
from tests.test_up_hardening import EXE, left, spec, state_of
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
