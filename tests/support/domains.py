"""Domains on the running libvirtd with one tap NIC, for the check tests on this machine: the
tap, the domain XML, the domain itself, and the wait until check sees the tap's fds."""

from __future__ import annotations

import json
import pathlib
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tests.support import kernel
from tests.support.kernel import vhostorch
from vhostorch import taps
from vhostorch.taps import TapSpec


@contextmanager
def tap() -> Iterator[str]:
    name = kernel.unique("vc")
    taps.ensure([TapSpec(name)])
    try:
        yield name
    finally:
        taps.delete([name])


@contextmanager
def domain(uri: str, xml: str) -> Iterator[object]:
    import libvirt

    conn = libvirt.open(uri)
    try:
        dom = conn.createXML(xml, 0)
        try:
            yield dom
        finally:
            dom.destroy()
    finally:
        conn.close()


def domain_xml(name: str, kind: str, dev: str, driver: str) -> str:
    return f"""<domain type='{kind}'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <interface type='ethernet'>
      <target dev='{dev}' managed='no'/>
      <model type='virtio'/>
      {driver}
    </interface>
    <memballoon model='none'/>
  </devices>
</domain>"""


def wait_for_tap_fd(pid: int, dev: str) -> subprocess.CompletedProcess[str]:
    deadline = time.monotonic() + 20
    while True:
        done = vhostorch("check", "--pid", str(pid), "--json")
        if done.stdout and json.loads(done.stdout)["nics"]:
            tap_fds = [c for c in json.loads(done.stdout)["checks"] if c["id"] == "nic.tap.fds"]
            if tap_fds and tap_fds[0]["status"] == "pass":
                return done
        assert time.monotonic() < deadline, done.stdout + done.stderr
        time.sleep(0.1)


@contextmanager
def plain_qemu(dev: str, vhost: str | None, log: pathlib.Path | None = None) -> Iterator[int]:
    netdev = f"tap,id=n0,ifname={dev},script=no,downscript=no"
    if vhost is not None:
        netdev += f",vhost={vhost}"
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        [
            "qemu-system-x86_64", "-S", "-M", "pc", "-m", "32", "-nodefaults", "-display", "none",
            "-netdev", netdev, "-device", "virtio-net-pci,netdev=n0,id=net0",
        ],
        stdin=subprocess.DEVNULL, stdout=out, stderr=out,
    )  # fmt: skip
    try:
        wait_for_tap_fd(proc.pid, dev)
        yield proc.pid
    finally:
        proc.kill()  # the QEMU this test started
        proc.wait()
        if log:
            out.close()  # type: ignore[union-attr]
