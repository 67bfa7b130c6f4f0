"""Decoding the wiring trace, on a trace recorded in the test host (Linux 6.1, QEMU 7.2).

The fixture is the tracing instance's `trace` file, unedited, from two QEMUs started
there with vhost=on: pid 131 with 1 queue pair, pid 140 with 4 (mq=on, vectors=10),
both running the guest initramfs until its driver was up, then stopped (SIGTERM): the
trace ends with each QEMU's teardown (backends detached, irqfds and ioeventfds deassigned).
"""

from __future__ import annotations

import errno
import pathlib
from pathlib import Path

import pytest

from vhostorch.check import wiring
from vhostorch.kernel import procfs

FIXTURE = pathlib.Path(__file__).parents[2] / "fixtures" / "wiring-trace-linux-6.1-qemu-7.2.txt"


def _events(pid: int) -> list[wiring.Event]:
    return [e for e in wiring.parse_trace(FIXTURE.read_text()) if e.tgid == pid]


def _wired(pid: int) -> wiring.Wiring:
    """The state while the guest ran: up to QEMU's first backend detach at its exit."""
    events = _events(pid)
    detach = next(
        i for i, e in enumerate(events)
        if e.cmd == wiring.VHOST_NET_SET_BACKEND and e.words[0] >> 32 == 0xFFFFFFFF
    )  # fmt: skip
    return wiring.decode(events[:detach])


def test_parse_keeps_every_event_with_its_thread_group() -> None:
    events = wiring.parse_trace(FIXTURE.read_text())
    assert len(events) == 171  # "entries-in-buffer/entries-written: 171/171"
    assert {e.tgid for e in events} == {131, 140}
    # vCPU threads (where DRIVER_OK is handled) are attributed to their QEMU.
    assert any(e.tid != e.tgid for e in events)
    assert all(e.cmd in wiring.TRACED for e in events)


def test_four_queue_pairs_each_vring_has_its_own_ioeventfd_and_irqfd() -> None:
    wired = _wired(140)
    assert len(wired.owners) == 4  # one vhost device per queue pair
    vhost_fds = sorted({v.vhost_fd for v in wired.vrings})
    assert len(vhost_fds) == 4
    assert set(wired.backend_fds()) == set(vhost_fds)
    kicks, calls, gsis = set(), set(), set()
    for pair, fd in enumerate(vhost_fds):
        for index in (0, 1):
            vring = wired.vring(fd, index)
            assert vring is not None and vring.backend is not None and vring.backend >= 0
            queue = 2 * pair + index
            # Legacy port-I/O notify: the guest writes the queue index, KVM matches it.
            assert [n["datamatch"] for n in vring.ioeventfds if n["pio"]] == [queue]
            assert vring.irqfd is not None
            kicks.add(vring.kick)
            calls.add(vring.call)
            gsis.add(vring.irqfd["gsi"])
    assert len(kicks) == len(calls) == len(gsis) == 8
    assert all(wired.mem_regions[fd] >= 1 for fd in vhost_fds)
    features = {wired.features[fd] for fd in vhost_fds}
    assert len(features) == 1 and features.pop() >> 32 & 1  # VIRTIO_F_VERSION_1


def test_one_queue_pair() -> None:
    wired = _wired(131)
    assert len(wired.owners) == 1 and len(wired.vrings) == 2
    assert all(v.irqfd is not None and v.ioeventfds for v in wired.vrings)


def test_a_vector_the_guest_masks_parks_the_call_on_qemus_masked_notifier() -> None:
    events = _events(131)
    assert not any(v.masked for v in _wired(131).vrings)  # the guest ran with them unmasked
    calls = [i for i, e in enumerate(events) if e.cmd == wiring.VHOST_SET_VRING_CALL]
    first_kick = next(i for i, e in enumerate(events) if e.cmd == wiring.VHOST_SET_VRING_KICK)
    # Recorded: after vhost started, the guest masked and unmasked each vector once (an
    # interrupt move while its driver came up); QEMU swapped the call to the vring's
    # first eventfd (its masked notifier) and back to the irqfd's.
    remask = next(i for i in calls if i > first_kick)
    vhost_fd, index = events[remask].fd, events[remask].words[0] & 0xFFFFFFFF
    masked = wiring.decode(events[: remask + 1]).vring(vhost_fd, index)
    assert masked is not None and masked.masked and masked.irqfd is None
    first = next(events[i] for i in calls if events[i].words[0] & 0xFFFFFFFF == index)
    assert masked.call == first.words[0] >> 32
    unmask = next(i for i in calls if i > remask and events[i].words[0] & 0xFFFFFFFF == index)
    back = wiring.decode(events[: unmask + 1]).vring(vhost_fd, index)
    assert back is not None and not back.masked and back.irqfd is not None


def test_after_qemu_stopped_vhost_nothing_is_wired() -> None:
    stopped = wiring.decode(_events(140))
    assert stopped.vrings and all(v.backend == -1 for v in stopped.vrings)
    assert all(v.irqfd is None and not v.ioeventfds for v in stopped.vrings)


def test_deassigned_ioeventfd_and_irqfd_are_not_wiring() -> None:
    def event(cmd: int, *words: int) -> wiring.Event:
        padded = (*words, 0, 0, 0, 0)[:4]
        return wiring.Event(7, 7, 1.0, 3, cmd, (padded[0], padded[1], padded[2], padded[3]))

    kick_fd, call_fd = 20, 21
    events = [
        event(wiring.VHOST_SET_VRING_KICK, kick_fd << 32 | 0),
        event(wiring.VHOST_SET_VRING_CALL, call_fd << 32 | 0),
        event(wiring.KVM_IOEVENTFD, 0, 0xC010, kick_fd << 32 | 2, 3),
        event(wiring.KVM_IRQFD, 24 << 32 | call_fd, 0),
        event(wiring.KVM_IOEVENTFD, 0, 0xC010, kick_fd << 32 | 2,
              3 | wiring.KVM_IOEVENTFD_FLAG_DEASSIGN),
        event(wiring.KVM_IRQFD, 24 << 32 | call_fd, wiring.KVM_IRQFD_FLAG_DEASSIGN),
    ]  # fmt: skip
    vring = wiring.decode(events).vring(3, 0)
    assert vring is not None
    assert (vring.kick, vring.call, vring.ioeventfds, vring.irqfd) == (kick_fd, call_fd, (), None)


def test_worker_model_after_linux_6_4_is_a_thread_of_qemu() -> None:
    # Constructed, not recorded: no kernel >= 6.4 with vhost-net was at hand. From 6.4,
    # vhost_task_create() names the worker "vhost-<owner pid>" inside the owner's thread group.
    qemu = procfs.Process(
        500, "qemu-system-x86", ("qemu-system-x86_64",), (),
        (procfs.Thread(500, "qemu-system-x86"), procfs.Thread(503, "vhost-500"),
         procfs.Thread(504, "vhost-500"), procfs.Thread(501, "CPU 0/KVM")), 0,
    )  # fmt: skip
    assert procfs.vhost_workers(qemu, {}) == ("task", [503, 504])
    # Before 6.4: kernel threads found by name (the form the test host runs).
    assert procfs.vhost_workers(qemu.replace(threads=()), {"vhost-500": [77]}) == ("kthread", [77])


def test_disarm_waits_out_a_probe_the_kernel_briefly_calls_busy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fake for what cannot be made to happen on demand: the kernel refused the probe's
    # removal (EBUSY) right after its instance went, in the test host under load (7 of 42
    # arm/disarm cycles while inner guests started), and never in 200 quiet cycles.
    (tmp_path / "kprobe_events").write_text("")
    (tmp_path / "events" / wiring.GROUP / wiring.EVENT).mkdir(parents=True)
    answers = [OSError(errno.EBUSY, "Device or resource busy")] * 3
    written: list[str] = []

    def write(path: str, text: str, append: bool = False) -> None:
        if answers:
            raise answers.pop()
        written.append(text)

    monkeypatch.setattr(wiring, "_write", write)
    wiring.disarm(str(tmp_path))
    assert written == [f"-:{wiring.GROUP}/{wiring.EVENT}\n"]

    answers[:] = [OSError(errno.EBUSY, "Device or resource busy")] * 1000
    with pytest.raises(OSError) as still_busy:  # then disarm says so (TraceUnavailable)
        wiring._remove_probe(str(tmp_path), patience=0.2)
    assert still_busy.value.errno == errno.EBUSY
