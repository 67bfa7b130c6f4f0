"""VMs started through the installed `vhostorch` command, for the tests of `up`, `down` and
`nic`: running it, the spec of a one-NIC TCG VM, its state file, what a VM leaves behind, and a
VM whose guest has booted."""

from __future__ import annotations

import json
import os
import subprocess
import time
from typing import Any

from tests.support import guests, kernel
from tests.support.kernel import vhostorch
from vhostorch import claims
from vhostorch.kernel import procfs
from vhostorch.vm import state


def run(*args: str) -> tuple[int, dict[str, Any], str]:
    done = vhostorch(*args, "--json")
    try:
        data = json.loads(done.stdout)
    except ValueError:
        data = {}
    return done.returncode, data, done.stderr


def link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", name], capture_output=True).returncode == 0


def spec(directory: str, name: str, tap: str, queues: int = 2) -> str:
    nic = {"tap": tap, "queues": queues, "vhost": "preferred"}
    return guests.spec_file(directory, name, [nic], accel="tcg")


def state_of(name: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(state.STATE_DIR, f"{name}.json")) as f:
            data: dict[str, Any] = json.load(f)
            return data
    except FileNotFoundError:
        return None


def qemus_of(name: str) -> list[int]:
    """QEMU processes whose command line names this VM's work directory."""
    mark = f"{state.STATE_DIR}/{name}.d/".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if cmdline.startswith(b"qemu-system") and mark in cmdline and procfs.alive(int(entry)):
            found.append(int(entry))
    return found


def left(name: str, taps: list[str]) -> list[str]:
    """Everything a VM can leave: taps, claims, QEMUs, state, lock and work directory."""
    found = [f"tap {t}" for t in taps if link_exists(t)]
    found += [f"claim {t}" for t in taps if claims.holder(t) is not None]
    found += [f"QEMU {p}" for p in qemus_of(name)]
    found += [f for f in os.listdir(state.STATE_DIR) if f.startswith(f"{name}.")]
    return found


def wait_for(what: str, ready: Any, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = ready()
        if got:
            return got
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.01)


class Booted:
    """A VM whose guest has booted (it answers ACPI hot-unplug), shared by a module's tests."""

    def __init__(self, directory: str) -> None:
        self.name, self.tap = kernel.unique("vho-n"), kernel.unique("vn")
        code, out, err = run("up", spec(directory, self.name, self.tap), "--wait", "0")
        assert code == 0, err
        self.pid: int = out["vm"]["pid"]
        console = os.path.join(out["vm"]["workdir"], "console.log")

        def ready() -> bool:
            with open(console, errors="replace") as f:
                return "VHOSTORCH-GUEST: ready" in f.read()

        wait_for("the guest", ready, timeout=180)

    def nics(self) -> list[str]:
        saved = state_of(self.name)
        assert saved is not None
        return [n["tap"] for n in saved["nics"]]

    def as_before(self, tap: str) -> list[str]:
        """What differs from the VM as `up` left it, with ``tap`` hot-plugged and gone again."""
        found = [f"tap {tap}"] if link_exists(tap) else []
        found += [f"claim {tap}"] if claims.holder(tap) is not None else []
        saved = state_of(self.name) or {}
        if [n["tap"] for n in saved.get("nics", [])] != [self.tap]:
            found.append(f"NICs {saved.get('nics')}")
        if saved.get("claimed") != [self.tap] or saved.get("making") or saved.get("plugging"):
            found.append(f"record {saved.get('claimed')} {saved.get('making')}")
        if not procfs.alive(self.pid):
            found.append("QEMU gone")
        return found


def locking(pid: int) -> bool:
    """Whether process ``pid`` holds an flock (a VM's lock: its command is under way)."""
    with open("/proc/locks") as f:
        return any(line.split()[4] == str(pid) for line in f if "FLOCK" in line)
