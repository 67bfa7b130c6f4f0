"""check.live on this host (root, a BTF kernel, KVM unusable, no /dev/vhost-net): doctor's
host.live says what loading the reader here gives, a check over QEMUs that hold no vhost-net fd
loads no program, a live kick's count and ring indices become metrics, and a tap deleted
under a QEMU that opened it itself is named as such. The verdicts from
a real vhost-net VM are proved in the test host (test_check_testhost.py)."""

from __future__ import annotations

import json
import os
import pathlib

import pytest

from tests.support import kernel
from tests.support.domains import plain_qemu, tap
from vhostorch.check import live, metrics, observe
from vhostorch.check.ids import HOST_LIVE, KICK
from vhostorch.check.report import PASS, Check, QemuTarget, Report
from vhostorch.kernel import vhoststate


def test_doctor_says_whether_the_kernels_state_can_be_read_here() -> None:
    done = kernel.vhostorch("doctor", "--json")
    (found,) = [c for c in json.loads(done.stdout)["checks"] if c["id"] == HOST_LIVE]
    ok, why = vhoststate.available()
    if ok:  # as here: root on a kernel with BTF, so the program is loaded and run once
        assert found["status"] == "pass", found
    else:
        assert found["status"] == "warn" and why in found["message"], found


def test_a_qemu_holding_no_vhost_net_fd_loads_no_program(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The load is most of a live read's cost (75 ms to 2 s): check --all on a host whose QEMUs
    # hold no vhost-net fd must not pay it. A read that raises would show in live_note.
    def refused(*_: object, **__: object) -> None:
        raise AssertionError("the reader was loaded for a QEMU with no vhost-net fd")

    monkeypatch.setattr(vhoststate, "read", refused)
    with tap() as dev, plain_qemu(dev, "off") as pid:
        observed = observe.observe(pid)
        [after] = live.gather([observed])
    assert after.live is None and after.live_note is None
    assert after == observed


def test_a_live_kick_gives_its_count_and_ring_progress_as_metrics() -> None:
    evidence: dict[str, object] = {
        "source": "live", "vhost_fd": 30, "vring": 0,
        "ring": {"last_avail_idx": 256, "last_used_idx": 250},
        "kick": {"fds": [31], "eventfd_id": 7, "count": 42},
    }  # fmt: skip
    kick = Check(KICK, PASS, "live", evidence, nic="net0", queue=0)
    traced = Check(KICK, PASS, "trace", {"source": "trace"}, nic="net0", queue=1)
    report = Report(QemuTarget(123, "vm1"), (), (kick, traced))
    for form in metrics.FORMATS:
        lines = metrics.render([report], 0.1, form).splitlines()
        where = '{nic="net0",pid="123",queue="0",vm="vm1"}'
        assert f"vhostorch_vring_kicks_total{where} 42.0" in lines
        assert f"vhostorch_vring_last_avail_index{where} 256.0" in lines
        assert f"vhostorch_vring_last_used_index{where} 250.0" in lines
        # Only the live one: a traced kick has no count.
        assert sum("vhostorch_vring_kicks_total{" in line for line in lines) == 1
        counter = "vhostorch_vring_kicks" + ("_total" if form == "prometheus" else "")
        assert f"# TYPE {counter} counter" in lines


def test_the_metrics_families_of_the_live_state_are_documented() -> None:
    text = (pathlib.Path(__file__).parents[2] / "docs" / "check.md").read_text()
    for family in ("vring_kicks_total", "vring_last_avail_index", "vring_last_used_index"):
        assert f"vhostorch_{family}" in text and f"vhostorch_{family}" in metrics.__doc__  # type: ignore[operator]


def test_a_tap_deleted_under_qemu_is_said_to_be_gone() -> None:
    """`ip link del` of the tap a running QEMU opened by name (ifname=): its fds stay open on
    no device (fdinfo's iff: is empty), so none names the tap; nic.tap.fds says QEMU holds
    them on no device, not that it holds none (the message before)."""
    with tap() as dev, plain_qemu(dev, "off") as pid:
        kernel.run("ip", "link", "del", dev)
        done = kernel.vhostorch("check", "--pid", str(pid), "--json")
        (found,) = [c for c in json.loads(done.stdout)["checks"] if c["id"] == "nic.tap.fds"]
        tun = [fd for fd in os.listdir(f"/proc/{pid}/fd")
               if os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/net/tun"]  # fmt: skip
    assert found["status"] == "fail", found
    assert found["evidence"]["orphans"] == [int(fd) for fd in tun], found
    assert found["message"] == (
        f"QEMU holds /dev/net/tun fd(s) [{tun[0]}] on no device: the tap {dev} was deleted "
        "under the running VM"
    ), found
