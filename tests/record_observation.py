"""Record the observations under tests/fixtures/observations/ from a real test host.

One command re-records them all (about four minutes on two cores)::

    .venv/bin/python -m tests.record_observation

``--kernel 6.12`` records in a test host of that kernel series instead, into
files named ``NAME-linux-6.12.json`` (the default kernel's keep their plain names).

Outside the test host it boots one (``vhostorch lab run``), runs itself there
with ``--inside``, and copies the recordings it made into the fixtures
directory. Inside, for each setup below, it starts an inner QEMU/KVM guest with
vhost-net NICs on taps vhostorch made (as tests/test_check_testhost.py does),
the wiring trace armed before the guest driver starts, waits for the guest's
marker, and snapshots what ``observe`` reads (tests/observations.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

from tests import guests
from tests.observations import FIXTURES, snapshot
from vhostorch.check import verify, wiring
from vhostorch.check.observe import Observation
from vhostorch.lab.image import DEFAULT_KERNEL, kernel_series
from vhostorch.qemu import monitor

COMMAND = ".venv/bin/python -m tests.record_observation"


class Setup:
    """One recorded case: its NICs as (tap queues, vhost, device queues), what to wait for."""

    def __init__(
        self,
        name: str,
        what: str,
        nics: Sequence[tuple[int, str, int | None]],
        marker: str,
        append: str = "",
    ) -> None:
        self.name = name
        self.what = what
        self.nics = nics
        self.marker = marker
        self.append = append


SETUPS = (
    Setup("healthy-1q", "one virtio-net NIC, vhost=on, 1 queue pair, guest driver up",
          [(1, "on", None)], r"nic eth0 up"),
    Setup("healthy-4q", "one virtio-net NIC, vhost=on, 4 queue pairs (mq=on,vectors=10), "
          "guest driver up", [(4, "on", None)], r"nic eth0 up"),
    Setup("second-nic-vhost-off", "two NICs of 1 queue pair: net0 vhost=on, net1 vhost=off, "
          "guest drivers up", [(1, "on", None), (1, "off", None)], r"nic eth1 up"),
    Setup("device-4q-tap-2q", "one NIC whose tap netdev has 2 queue pairs and whose device is "
          "sized for 4 (vectors=10), vhost=on, guest driver up", [(2, "on", 4)], r"nic eth0 up"),
    Setup("no-guest-driver", "one NIC of 1 queue pair, vhost=on, the guest never loads "
          "virtio_net (vho.nodriver=1): vhost opened, not started", [(1, "on", None)],
          r"VHOSTORCH-GUEST: ready", append="vho.nodriver=1"),
)  # fmt: skip


def _qemu_version() -> str:
    out = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True)
    return out.stdout.splitlines()[0] if out.stdout else "?"


@contextmanager
def _running(setup: Setup, sock: str) -> Iterator[guests.Guest]:
    with ExitStack() as stack:
        extra: list[str] = []
        for index, (queues, vhost, device_queues) in enumerate(setup.nics):
            name = stack.enter_context(guests.tap(queues))
            extra += guests.vhost_netdev(name, queues, vhost, nic=index,
                                         device_queues=device_queues)  # fmt: skip
        extra += ["-qmp", f"unix:{sock},server=on,wait=off"]
        yield stack.enter_context(guests.guest(extra, append=setup.append))


def _report(obs: Observation) -> dict[str, object]:
    return verify.verify(obs).to_json()


def record(setup: Setup, out: str) -> str:
    sock = os.path.join(tempfile.mkdtemp(prefix="vho-rec-"), "qmp.sock")
    with _running(setup, sock) as g:
        g.wait_for(setup.marker, timeout=60)
        time.sleep(1)  # the last vrings are wired right after the marker

        def ask() -> monitor.MonitorView:
            return monitor.read_qmp(sock)

        about = {
            "setup": setup.what,
            "kernel": os.uname().release,
            "qemu": _qemu_version(),
            "host": "vhostorch test host (Linux under QEMU/TCG, nested KVM, /dev/vhost-net)",
            "recorded_by": COMMAND,
        }
        rec = snapshot(g.pid, about, ask, _report)
    path = os.path.join(out, f"{setup.name}.json")
    with open(path, "w") as f:
        json.dump(rec, f, indent=1, sort_keys=True)
        f.write("\n")
    return path


def inside(out: str, names: Sequence[str]) -> int:
    was_armed = wiring.armed()
    wiring.arm()
    try:
        for setup in SETUPS:
            if names and setup.name not in names:
                continue
            print("recorded", record(setup, out), flush=True)
    finally:
        if not was_armed:
            wiring.disarm()
    return 0


def fixture_name(setup: str, kernel: str) -> str:
    """``healthy-1q`` on the default kernel, ``healthy-1q-linux-6.12`` on another."""
    return setup if kernel == DEFAULT_KERNEL else f"{setup}-linux-{kernel}"


def outside(names: Sequence[str], kernel: str = DEFAULT_KERNEL) -> int:
    from vhostorch.lab import run as lab

    results = tempfile.mkdtemp(prefix="vho-record-", dir="/tmp")
    out = os.path.join(results, "observations")
    os.makedirs(out)
    command = [sys.executable, "-m", "tests.record_observation", "--inside", out, *names]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        done = lab.run(command, cwd=root, results=results, timeout=900, log=print, kernel=kernel)
        if done.status != 0:
            print(f"the recorder failed in the test host (exit {done.status})", file=sys.stderr)
            return 1
        FIXTURES.mkdir(parents=True, exist_ok=True)
        for name in sorted(os.listdir(out)):
            target = FIXTURES / f"{fixture_name(name.removesuffix('.json'), kernel)}.json"
            shutil.copy(os.path.join(out, name), target)
            print("wrote", target)
    finally:
        shutil.rmtree(results, ignore_errors=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inside", metavar="DIR", help="(in the test host) record into DIR")
    parser.add_argument(
        "--kernel", default=DEFAULT_KERNEL, help="kernel series of the test host (e.g. 6.12)"
    )
    parser.add_argument("names", nargs="*", help="setups to record (default: all)")
    args = parser.parse_args(argv)
    if args.inside:
        return inside(args.inside, args.names)
    return outside(args.names, kernel_series(args.kernel))


if __name__ == "__main__":
    sys.exit(main())
