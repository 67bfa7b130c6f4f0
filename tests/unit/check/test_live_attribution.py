"""check.nics and check.verify from the kernel's present state: which vhost fd serves which NIC
and queue pair, and which worker, as the kernel holds them (issue 23).

The observations are recorded ones (tests/fixtures/observations, replayed through the real
``observe``); the kernel's state is a constructed ``vhoststate.KernelView``, as the BPF reader
would decode it: the reader itself needs root and real vhost-net, which only the test host has
(tests/testhost/test_vhoststate_testhost.py and test_check_testhost.py prove it there).
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Mapping

import pytest

from tests.support import observations
from vhostorch.check import live, nics, verify
from vhostorch.check.observe import Observation
from vhostorch.kernel import procfs, vhoststate
from vhostorch.kernel.vhoststate import KernelView, OpenFile, VhostNet, Virtqueue

TUN_FILE, VHOST_FILE = 0xFFFF_8880_0000_0000, 0xFFFF_8881_0000_0000  # made-up kernel addresses


def view(obs: Observation, backends: dict[int, int | None], stable: bool = True) -> KernelView:
    """The kernel's view of ``obs``'s QEMU: each vhost fd's two vrings joined to the tap fd
    ``backends`` names (None: unjoined), its worker tid 1000 + the vhost fd."""
    files = tuple(
        OpenFile(fd.num, TUN_FILE + fd.num if fd.device == procfs.TUN else VHOST_FILE + fd.num,
                 0, 0, "", None)
        for fd in obs.process.fds
    )  # fmt: skip

    def queue(index: int, tap: int | None) -> Virtqueue:
        backend = None if tap is None else TUN_FILE + tap
        return Virtqueue(index, None, (), None, backend, None, None, None, None)

    vhost = tuple(
        VhostNet(vfd, (queue(0, tap), queue(1, tap)), 1, 1000 + vfd, "kthread")
        for vfd, tap in sorted(backends.items())
    )
    return KernelView(obs.process.pid, files, vhost, (), stable)


def fds_of(obs: Observation, kind: str) -> list[int]:
    return [fd.num for fd in obs.process.fds_to(kind)]


def test_each_vhost_fd_goes_to_the_tap_the_kernel_holds_as_its_backend(
    tmp_path: pathlib.Path,
) -> None:
    """healthy-4q untraced: fd order alone would pair vhost fd 11 with queue pair 0. The kernel
    joins them the other way round here (as after a hot-unplug reused fd numbers): the queue
    pairs follow the kernel, and the evidence says so."""
    obs = observations.observed("healthy-4q", tmp_path, trace=False)
    taps, vhosts = fds_of(obs, procfs.TUN), fds_of(obs, procfs.VHOST_NET)
    assert len(taps) == len(vhosts) == 4
    live = obs.replace(live=view(obs, dict(zip(vhosts, reversed(taps), strict=True))))
    (nic,) = nics.find(live)
    assert [fd.num for fd in nic.tap_fds] == taps
    assert [fd.num for fd in nic.vhost_fds] == list(reversed(vhosts))
    assert nic.vhost_assigned_by == "the kernel (live)"
    # Without the kernel's state, the guess by fd order.
    (guessed,) = nics.find(obs)
    assert [fd.num for fd in guessed.vhost_fds] == vhosts
    assert guessed.vhost_assigned_by == "fd order (QEMU opens each after its tap)"
    # The report says so, and each queue pair's worker is its own device's.
    report = verify.verify(live).to_json()
    (fds,) = [c for c in report["checks"] if c["id"] == "nic.vhost.fds"]  # type: ignore[union-attr]
    assert fds["evidence"]["assigned_by"] == "the kernel (live)"
    (worker,) = [c for c in report["checks"] if c["id"] == "nic.vhost.worker"]  # type: ignore[union-attr]
    assert worker["evidence"]["kernel_models"] == dict.fromkeys(vhosts, "kthread")
    assert worker["message"].endswith(
        "; the kernel keeps this NIC's as kernel threads (vhost_dev.worker) (live)"
    )
    (reported,) = report["nics"]  # type: ignore[misc]
    assert [(w["queue_pair"], w["vhost_fd"], w["tid"]) for w in reported["workers"]] == [
        (pair, vfd, 1000 + vfd) for pair, vfd in enumerate(reversed(vhosts))
    ]


def test_the_kernel_is_preferred_to_the_trace(tmp_path: pathlib.Path) -> None:
    """healthy-4q traced: the trace saw each vhost fd joined in fd order; where the kernel
    holds it otherwise now, the present wins (the trace is the past)."""
    obs = observations.observed("healthy-4q", tmp_path)
    taps, vhosts = fds_of(obs, procfs.TUN), fds_of(obs, procfs.VHOST_NET)
    (traced,) = nics.find(obs)
    assert traced.vhost_assigned_by == "VHOST_NET_SET_BACKEND (traced)"
    assert [fd.num for fd in traced.vhost_fds] == vhosts
    swapped = {vhosts[0]: taps[1], vhosts[1]: taps[0], vhosts[2]: taps[2], vhosts[3]: taps[3]}
    (nic,) = nics.find(obs.replace(live=view(obs, swapped)))
    assert [fd.num for fd in nic.vhost_fds] == [vhosts[1], vhosts[0], vhosts[2], vhosts[3]]
    assert nic.vhost_assigned_by == "the kernel (live)"


def test_unjoined_or_unstable_kernel_state_says_nothing(tmp_path: pathlib.Path) -> None:
    """A device with no backend now (VM paused, guest driver not up) names no tap, and two
    reads that disagreed are not relied on: the trace, else fd order, decides."""
    obs = observations.observed("healthy-4q", tmp_path, trace=False)
    taps, vhosts = fds_of(obs, procfs.TUN), fds_of(obs, procfs.VHOST_NET)
    unjoined = view(obs, dict.fromkeys(vhosts))
    reversed_ = dict(zip(vhosts, reversed(taps), strict=True))
    for state in (unjoined, view(obs, reversed_, stable=False)):
        (nic,) = nics.find(obs.replace(live=state))
        assert [fd.num for fd in nic.vhost_fds] == vhosts, state
        assert nic.vhost_assigned_by == "fd order (QEMU opens each after its tap)"


def test_a_vhost_fd_joined_to_no_tap_of_a_nic_is_not_given_to_one(tmp_path: pathlib.Path) -> None:
    """second-nic-vhost-off untraced: net0 has vhost, net1 asked for none. The kernel joins the
    one vhost device to net0's tap: net0 gets it from the kernel, net1 nothing."""
    obs = observations.observed("second-nic-vhost-off", tmp_path, trace=False)
    (vfd,) = fds_of(obs, procfs.VHOST_NET)
    first = nics.find(obs)
    net0 = next(n for n in first if n.name == "net0")
    (tap,) = [fd.num for fd in net0.tap_fds]
    found = {n.name: n for n in nics.find(obs.replace(live=view(obs, {vfd: tap})))}
    assert [fd.num for fd in found["net0"].vhost_fds] == [vfd]
    assert found["net0"].vhost_assigned_by == "the kernel (live)"
    assert found["net1"].vhost_fds == []


def test_every_qemu_is_read_in_one_call_of_the_reader(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """check --all (check.targets) gives check.live.gather every observation at once, and it
    asks the reader once for every QEMU holding a vhost-net fd (one program load per
    ``MAX_PIDS`` of them, tests/kernel/test_check_live.py), none for a QEMU holding none."""
    names = ("healthy-1q", "healthy-4q", "second-nic-vhost-off", "bridge-1q")
    observed = [observations.observed(n, tmp_path / n, trace=False) for n in names]
    holders = [o.process.pid for o in observed if o.process.fds_to(procfs.VHOST_NET)]
    assert len(holders) == len(names)
    without = observed[0].replace(process=observed[0].process.replace(pid=99999, fds=()))
    calls: list[list[int]] = []

    def read(pids: list[int], held: Mapping[int, int]) -> dict[int, KernelView]:
        calls.append(list(pids))
        assert set(pids) <= set(held)  # each walk sized from the eventfds the QEMU holds
        return {o.process.pid: view(o, {}) for o in observed}

    monkeypatch.setattr(vhoststate, "available", lambda: (True, ""))
    monkeypatch.setattr(vhoststate, "read", read)
    # No /proc/kallsyms: vhost's waiter function comes from the reader (poll_func); reading
    # the kernel's 100,000+ symbols cost each check 0.4-0.7 s under the test host's TCG.
    opened: list[str] = []
    watching = [True]
    sys.addaudithook(lambda event, args: opened.append(str(args[0]))
                     if watching and event == "open" else None)  # fmt: skip
    try:
        gathered = live.gather([*observed, without])
    finally:
        watching.clear()
    assert "/proc/kallsyms" not in opened, opened
    assert calls == [holders]
    assert [o.live is not None for o in gathered] == [True] * len(names) + [False]


def test_a_nics_call_is_judged_by_its_own_vrings_not_another_nics(tmp_path: pathlib.Path) -> None:
    """healthy-4q's NIC with every vring's call no KVM irqfd (QEMU injects its interrupts: no
    MSI-X for it), beside another vhost device of the same QEMU whose call is an irqfd (a second
    NIC that has MSI-X): this NIC's calls are relayed (fail), not 'masked' because some other
    NIC's vring has an irqfd. Constructed: one QEMU with one NIC of each kind was not recorded."""
    from vhostorch.kernel.vhoststate import IrqFd, Kvm

    obs = observations.observed("healthy-4q", tmp_path, trace=False)
    taps, vhosts = fds_of(obs, procfs.TUN), fds_of(obs, procfs.VHOST_NET)
    state = view(obs, dict(zip(vhosts, taps, strict=True)))
    calls = iter(range(0xC000, 0xD000, 8))
    mine = tuple(
        d.replace(queues=tuple(q.replace(call=next(calls)) for q in d.queues)) for d in state.vhost
    )
    other_call = 0xE000
    other = VhostNet(999, (Virtqueue(0, None, (), other_call, None, None, None, None, None),),
                     1, 1999, "kthread")  # fmt: skip
    kvm = Kvm(998, (), (IrqFd(24, other_call, ()),), True)
    seen = obs.replace(live=state.replace(vhost=(*mine, other), kvm=(kvm,)))
    (nic,) = nics.find(seen)
    verdict = live.call(seen, nic, 0)
    assert (verdict.status, verdict.cause) == ("fail", "relayed-interrupt"), verdict
    # One vring of the NIC's own with an irqfd: its other vrings' calls are masked vectors.
    own = mine[0].queues[1].call
    assert own is not None
    kvm_own = kvm.replace(irqfds=(*kvm.irqfds, IrqFd(25, own, ())))
    masked = live.call(seen.replace(live=seen.live.replace(kvm=(kvm_own,))), nic, 0)
    assert (masked.status, masked.cause) == ("warn", "masked"), masked


VHOST_POLL, OTHER_WAITER = 0xFFFF_FFFF_C0A0_2000, 0xFFFF_FFFF_8128_83E0  # made-up functions


@pytest.mark.parametrize(
    ("waiters", "poll_func", "status", "polled", "says"),
    [
        ((OTHER_WAITER, VHOST_POLL), VHOST_POLL, "pass", True, "and vhost polls it (live)"),
        ((OTHER_WAITER,), VHOST_POLL, "fail", False, "vhost does not poll it now"),
        ((VHOST_POLL,), None, "pass", None, "whether vhost polls it is not known"),
    ],
)  # fmt: skip
def test_a_kick_is_polled_when_vhosts_own_waiter_function_waits_on_it(
    tmp_path: pathlib.Path, waiters: tuple[int, ...], poll_func: int | None, status: str,
    polled: bool | None, says: str,
) -> None:  # fmt: skip
    """vhost's waiter function is the one its virtqueues hold (poll_func, read by the reader
    from vhost_poll.wait.func), any of the QEMU's: a kick eventfd with it among its waiters is
    polled; without it, KVM's ioeventfd signals nobody (fail); a kernel whose BTF gave none
    leaves it unknown, said so, with no kallsyms read instead."""
    from vhostorch.kernel.vhoststate import IoEventFd, Kvm

    obs = observations.observed("healthy-1q", tmp_path, trace=False)
    taps, vhosts = fds_of(obs, procfs.TUN), fds_of(obs, procfs.VHOST_NET)
    state = view(obs, dict(zip(vhosts, taps, strict=True)))
    kick = 0xA000
    (device,) = state.vhost
    rx, tx = device.queues
    # The function is read from the other vring only: one of the QEMU's is enough.
    rx = rx.replace(kick=kick, kick_waiters=waiters)
    tx = tx.replace(poll_func=poll_func)
    kvm = Kvm(998, (IoEventFd(0xFE00_3000, 0, None, kick, 3),), (), True)
    seen = obs.replace(live=state.replace(vhost=(device.replace(queues=(rx, tx)),), kvm=(kvm,)))
    (nic,) = nics.find(seen)
    verdict = live.kick(seen, nic, 0)
    assert (verdict.status, verdict.evidence["polled"]) == (status, polled), verdict
    assert says in verdict.message, verdict
