"""Record the observations under tests/fixtures/observations/ from a real test host.

One command re-records them all (about five minutes on two cores)::

    .venv/bin/python -m tests.support.record_observation

``--kernel 6.12`` records in a test host of that kernel series instead, into
files named ``NAME-linux-6.12.json`` (the default kernel's keep their plain names);
``--userland trixie`` on Debian 13's root (QEMU 10, libvirt 11), into
``NAME-linux-6.12-trixie.json``.

Outside the test host it boots one (``vhostorch lab run``), runs itself there
with ``--inside``, and copies the recordings it made into the fixtures
directory. Inside, for each setup below, it starts an inner QEMU/KVM guest with
vhost-net NICs on taps vhostorch made (as tests/testhost/test_check_testhost.py does), or
a libvirt ``type='kvm'`` domain with one interface of a given type (as
tests/testhost/test_nic_types_testhost.py does; its live XML is recorded with it), the
wiring trace armed before the guest driver starts, waits for the guest's
marker, and snapshots what ``observe`` reads (tests/support/observations.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

from tests.support import daemons, guests, kernel
from tests.support.observations import FIXTURES, Recording, snapshot
from vhostorch.check import observe, verify, wiring
from vhostorch.check.observe import Observation
from vhostorch.lab.image import DEFAULT_KERNEL, kernel_series
from vhostorch.lab.userland import DEFAULT_USERLAND, default_kernel, userland_name
from vhostorch.libvirt import connection
from vhostorch.qemu import monitor

COMMAND = ".venv/bin/python -m tests.support.record_observation"


class Setup:
    """One recorded case: its NICs as (tap queues, vhost, device queues), what to wait for."""

    def __init__(
        self,
        name: str,
        what: str,
        nics: Sequence[tuple[int, str, int | None]],
        marker: str,
        append: str = "",
        interface: str | None = None,
    ) -> None:
        self.name = name
        self.what = what
        self.nics = nics
        self.marker = marker
        self.append = append
        # A libvirt domain's one <interface> instead of QEMU NICs on taps; {bridge} and
        # {lower} name the bridge and the dummy link (a macvtap's lower device) made for it.
        self.interface = interface


def _libvirt_setup(name: str, what: str, source: str, queues: int) -> Setup:
    attrs = f" queues='{queues}'" if queues > 1 else ""
    xml = f"{source}<model type='virtio'/><driver name='vhost'{attrs}/></interface>"
    return Setup(name, what, [], r"nic eth0 up", interface=xml)


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
    _libvirt_setup("direct-1q", "libvirt type='direct' (macvtap, mode='bridge' on a dummy link), "
                   "<driver name='vhost'/>, 1 queue pair, guest driver up",
                   "<interface type='direct'><source dev='{lower}' mode='bridge'/>", 1),
    _libvirt_setup("direct-4q", "libvirt type='direct' (macvtap, mode='bridge' on a dummy link), "
                   "<driver name='vhost' queues='4'/>, guest driver up",
                   "<interface type='direct'><source dev='{lower}' mode='bridge'/>", 4),
    _libvirt_setup("bridge-1q", "libvirt type='bridge' (libvirt's tap on a Linux bridge), "
                   "<driver name='vhost'/>, 1 queue pair, guest driver up",
                   "<interface type='bridge'><source bridge='{bridge}'/>", 1),
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


def _about(setup: Setup) -> dict[str, str]:
    return {
        "setup": setup.what,
        "kernel": os.uname().release,
        "qemu": _qemu_version(),
        "host": "vhostorch test host (Linux under QEMU/TCG, nested KVM, /dev/vhost-net)",
        "recorded_by": COMMAND,
    }


def record(setup: Setup, out: str) -> str:
    if setup.interface is not None:
        rec = _record_domain(setup, setup.interface)
    else:
        sock = os.path.join(tempfile.mkdtemp(prefix="vho-rec-"), "qmp.sock")
        with _running(setup, sock) as g:
            g.wait_for(setup.marker, timeout=120)
            time.sleep(1)  # the last vrings are wired right after the marker

            def ask() -> monitor.MonitorView:
                return monitor.read_qmp(sock)

            rec = snapshot(g.pid, _about(setup), ask, _report)
    path = os.path.join(out, f"{setup.name}.json")
    with open(path, "w") as f:
        json.dump(rec, f, indent=1, sort_keys=True)
        f.write("\n")
    return path


def _record_domain(setup: Setup, interface: str) -> Recording:
    """A libvirt domain with ``interface``, recorded with its live XML once its guest's
    driver is up; the bridge and dummy link it needs are made here and removed after."""
    bridge, lower = kernel.unique("vhb"), kernel.unique("vhd")
    workdir = tempfile.mkdtemp(prefix="vho-rec-")
    console = os.path.join(workdir, "console.log")
    name = kernel.unique("vho-rec-")
    xml = guests.typed_domain_xml(name, interface.format(bridge=bridge, lower=lower), console)
    uri = connection.SYSTEM_URI
    kernel.run("ip", "link", "add", bridge, "type", "bridge")
    kernel.run("ip", "link", "add", lower, "type", "dummy")
    try:
        for link in (bridge, lower):
            kernel.run("ip", "link", "set", link, "up")
        import libvirt

        conn = libvirt.open(uri)
        dom = conn.createXML(xml, 0)  # transient: gone once destroyed
        try:
            deadline = time.monotonic() + 90
            while not re.search(setup.marker, _text(console)):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name}: no {setup.marker!r}: {_text(console)[-2000:]}")
                time.sleep(0.5)
            time.sleep(1)  # the last vrings are wired right after the marker
            live = connection.domain_xml(name, uri)
            return snapshot(
                observe.domain_pid(name),
                _about(setup),
                lambda: connection.read_monitor(name, uri),
                _report,
                domain_xml=live,
            )
        finally:
            dom.destroy()
            conn.close()
    finally:
        kernel.run("ip", "link", "del", lower)
        kernel.run("ip", "link", "del", bridge)
        shutil.rmtree(workdir, ignore_errors=True)


def _text(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def inside(out: str, names: Sequence[str]) -> int:
    chosen = [s for s in SETUPS if not names or s.name in names]
    started: list[int] = []
    if any(s.interface is not None for s in chosen):
        guests.load_modules(("macvtap", "dummy"))  # the test host loads neither itself
        started = daemons.start()
    was_armed = wiring.armed()
    wiring.arm()
    try:
        for setup in chosen:
            print("recorded", record(setup, out), flush=True)
    finally:
        if not was_armed:
            wiring.disarm()
        daemons.stop(started)
    return 0


def fixture_name(setup: str, kernel: str, userland: str = DEFAULT_USERLAND) -> str:
    """``healthy-1q`` on the default kernel, ``healthy-1q-linux-6.12`` on another,
    ``healthy-1q-linux-6.12-trixie`` on another userland."""
    name = setup if kernel == DEFAULT_KERNEL else f"{setup}-linux-{kernel}"
    return name if userland == DEFAULT_USERLAND else f"{name}-{userland}"


def outside(
    names: Sequence[str], kernel: str = DEFAULT_KERNEL, userland: str = DEFAULT_USERLAND
) -> int:
    from vhostorch.lab import run

    results = tempfile.mkdtemp(prefix="vho-record-", dir="/tmp")
    out = os.path.join(results, "observations")
    os.makedirs(out)
    command = [sys.executable, "-m", "tests.support.record_observation", "--inside", out, *names]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        if userland != DEFAULT_USERLAND and kernel == DEFAULT_KERNEL:
            kernel = default_kernel(userland)
        done = run.run(command, cwd=root, results=results, timeout=900, log=print,
                       kernel=kernel, userland=userland)  # fmt: skip
        if done.status != 0:
            print(f"the recorder failed in the test host (exit {done.status})", file=sys.stderr)
            return 1
        FIXTURES.mkdir(parents=True, exist_ok=True)
        for name in sorted(os.listdir(out)):
            stem = fixture_name(name.removesuffix(".json"), kernel, userland)
            target = FIXTURES / f"{stem}.json"
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
    parser.add_argument(
        "--userland", default=DEFAULT_USERLAND, help="the test host's root (e.g. trixie)"
    )
    parser.add_argument("names", nargs="*", help="setups to record (default: all)")
    args = parser.parse_args(argv)
    if args.inside:
        return inside(args.inside, args.names)
    return outside(args.names, kernel_series(args.kernel), userland_name(args.userland))


if __name__ == "__main__":
    sys.exit(main())
