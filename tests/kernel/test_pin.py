"""`vhostorch pin` on a real QEMU of this machine, with the real pin records under
/run/vhostorch/pins (each test's own QEMU pid names its record)."""

from __future__ import annotations

from pathlib import Path

from tests.support import vms
from tests.support.kernel import vhostorch
from tests.support.observer import qemu
from vhostorch import pins
from vhostorch.kernel import procfs

VM = "vhorevpin"


def test_a_pin_whose_qemu_has_no_vhost_worker_now_can_be_cleared_and_does_not_fail_reapply() -> (
    None
):
    """A VM pinned while it had a vhost NIC, whose vhost NICs were unplugged since: the
    record must neither fail every `pin --reapply` (the metrics timer's) nor outlive
    `pin --clear`. This machine has no /dev/vhost-net, so no pin can be made here: the record
    the pin left is written as pins.save wrote it (the only stand-in)."""
    with qemu() as (pid, _, _):
        start = procfs.start_time(pid)
        assert start is not None
        pins.save(pins.Pin(pid, start, "0", "vhostorch pin", None))
        try:
            done = vhostorch("pin", "--reapply")
            assert done.returncode == 0, done
            assert f"QEMU {pid}" not in done.stdout + done.stderr, done
            assert pins.load(pid, start) is not None  # kept for a vhost NIC added later

            done = vhostorch("pin", "--pid", str(pid), "--clear")
            assert done.returncode == 0, done
            assert done.stdout.strip() == f"QEMU {pid}: pin forgotten (no NIC uses vhost now)"
            assert pins.load(pid, start) is None

            # Nothing recorded, nothing to unpin: one line, exit 1.
            done = vhostorch("pin", "--pid", str(pid), "--clear")
            assert done.returncode == 1, done
            [line] = done.stderr.splitlines()
            assert "has no vhost-net worker to pin" in line, line
        finally:
            pins.forget(pid)


def test_nic_add_without_vhost_to_a_pinned_vm_with_no_vhost_worker_is_not_undone(
    tmp_path: Path,
) -> None:
    """`nic add` applies the VM's pin to the new NIC's workers; a NIC without vhost has none,
    nor has the VM (this machine has no /dev/vhost-net; the record stands in for the pin `up`
    made while it had a vhost NIC). The add failed ('no vhost-net worker to pin') and its
    undo could not unplug the NIC from a guest without an OS: left attached."""
    spec = vms.spec(str(tmp_path), VM, f"{VM}0", 1)
    code, up, err = vms.run("up", spec, "--wait", "1")
    assert code == 0, err
    pid = up["vm"]["pid"]
    start = procfs.start_time(pid)
    assert start is not None
    try:
        pins.save(pins.Pin(pid, start, "0", "spec", VM))
        done = vhostorch("nic", "add", VM, "--tap", f"{VM}1", "--vhost", "off", "--wait", "1")
        assert done.returncode == 0, done
        assert [n["tap"] for n in vms.state_of(VM)["nics"]] == [f"{VM}0", f"{VM}1"]  # type: ignore[index]
        assert pins.load(pid, start) is not None
    finally:
        pins.forget(pid)
        vhostorch("down", VM)
    assert vms.left(VM, [f"{VM}0", f"{VM}1"]) == []
