"""Test-side tools that look at the kernel with something other than vhostorch's own code.

Links are read back with iproute2 (`ip -j -d link`), pyroute2 (an independent
decoder of the same RTM_NEWLINK messages vhostorch.kernel.rtnl parses) and sysfs;
taps are opened the way QEMU opens them by a separate process that issues
TUNSETIFF itself. pyroute2 is imported here only, never by vhostorch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

IFF_TAP = 0x0002
IFF_MULTI_QUEUE = 0x0100
IFF_PERSIST = 0x0800
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000

# A QEMU stand-in: open /dev/net/tun once per queue as net/tap-linux.c does
# (IFF_TAP|IFF_NO_PI, IFF_VNET_HDR when it can, IFF_MULTI_QUEUE when queues > 1 or asked),
# detach every queue if asked (TUNSETQUEUE IFF_DETACH_QUEUE, as QEMU does for the queues
# its guest does not use), report "ok" or the errno of the first failure, and hold the fds
# until stdin closes.
_OPENER = r"""
import fcntl, os, struct, sys
name, queues, vnet = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
multi, detach = sys.argv[4] == "1", sys.argv[5] == "1"
flags = 0x0002 | 0x1000 | (0x4000 if vnet else 0) | (0x0100 if queues > 1 or multi else 0)
fds = []
try:
    for _ in range(queues):
        fd = os.open("/dev/net/tun", os.O_RDWR)
        fds.append(fd)
        fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH22x", name.encode(), flags))
    for fd in fds if detach else ():
        fcntl.ioctl(fd, 0x400454D9, struct.pack("16sH22x", b"", 0x0400))  # TUNSETQUEUE
except OSError as err:
    print(f"errno {err.errno}", flush=True)
    sys.exit(1)
print("ok", flush=True)
sys.stdin.read()
"""

# The installed command line, beside the Python that runs the tests.
EXE = os.path.join(os.path.dirname(sys.executable), "vhostorch")


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


@contextmanager
def namespace() -> Iterator[str]:
    """A fresh network namespace with a unique name, always deleted."""
    name = unique("vho-t-")
    run("ip", "netns", "add", name)
    try:
        yield name
    finally:
        run("ip", "netns", "del", name, check=False)


def links(ns: str) -> dict[str, dict[str, Any]]:
    out = run("ip", "-n", ns, "-j", "-d", "link", "show").stdout
    return {link["ifname"]: link for link in json.loads(out)}


def link(ns: str, name: str) -> dict[str, Any]:
    found = links(ns)
    assert name in found, f"{name} not in namespace {ns}: {sorted(found)}"
    return found[name]


class Seen(NamedTuple):
    """What a link is, as one reader reports it: the fields every reader must agree on."""

    ifindex: int
    group: int
    mtu: int
    mac: str
    master: str | None
    up: bool
    kind: str | None
    multi_queue: bool | None
    vnet_hdr: bool | None
    queues: int | None  # queues attached, reported for multi-queue taps only


def seen_by_ip(ns: str) -> dict[str, Seen]:
    """Every link of ``ns`` as `ip -j -d link` shows it."""
    found = {}
    for name, got in links(ns).items():
        info = got.get("linkinfo", {})
        data = info.get("info_data", {}) if info.get("info_kind") == "tun" else {}
        group = got.get("group", "default")
        found[name] = Seen(
            got["ifindex"],
            0 if group == "default" else int(group) & 0xFFFFFFFF,  # ip prints it signed
            got["mtu"],
            got["address"],
            got.get("master"),
            "UP" in got["flags"],
            info.get("info_kind"),
            data.get("multi_queue"),
            data.get("vnet_hdr"),
            data.get("numqueues") if data.get("multi_queue") else None,
        )
    return found


def seen_by_pyroute2(ns: str) -> dict[str, Seen]:
    """Every link of ``ns`` as pyroute2 decodes it."""
    from pyroute2 import NetNS

    with NetNS(ns) as ipr:
        raw = list(ipr.get_links())
    names = {msg["index"]: msg.get_attr("IFLA_IFNAME") for msg in raw}
    found = {}
    for msg in raw:
        info = msg.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info else None
        data = info.get_attr("IFLA_INFO_DATA") if kind == "tun" else None

        def tun(attr: str, data: Any = data) -> Any:
            return None if data is None else data.get_attr(attr)

        multi = None if data is None else bool(tun("IFLA_TUN_MULTI_QUEUE"))
        master = msg.get_attr("IFLA_MASTER")
        found[msg.get_attr("IFLA_IFNAME")] = Seen(
            msg["index"],
            msg.get_attr("IFLA_GROUP"),
            msg.get_attr("IFLA_MTU"),
            msg.get_attr("IFLA_ADDRESS"),
            names.get(master) if master else None,
            bool(msg["flags"] & 1),  # IFF_UP
            kind,
            multi,
            None if data is None else bool(tun("IFLA_TUN_VNET_HDR")),
            tun("IFLA_TUN_NUM_QUEUES") if multi else None,
        )
    return found


def set_group(ns: str, dev: str, group: int) -> None:
    """Put ``dev`` in link ``group`` with pyroute2 (iproute2 6.1 refuses groups >= 2**31)."""
    from pyroute2 import NetNS

    with NetNS(ns) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname=dev)[0], group=group)


def seen_by_vhostorch(ns: str) -> dict[str, Seen]:
    """Every link of ``ns`` as vhostorch.kernel.rtnl decodes it."""
    from vhostorch.kernel import netns
    from vhostorch.kernel.rtnl import Rtnl

    with netns.entered(ns), Rtnl() as rtnl:
        got = rtnl.links()
    names = {link.index: name for name, link in got.items()}
    return {
        name: Seen(
            link.index,
            link.group,
            link.mtu,
            link.mac or "",
            names.get(link.master) if link.master else None,
            link.up,
            link.kind,
            None if link.tun is None else link.tun.multi_queue,
            None if link.tun is None else link.tun.vnet_hdr,
            link.tun.attached_queues if link.tun is not None and link.tun.multi_queue else None,
        )
        for name, link in got.items()
    }


def seen(ns: str) -> dict[str, Seen]:
    """The links of ``ns``, once iproute2, pyroute2 and vhostorch's own decoder agree on them.

    Three decoders of the same kernel answer: a bug in one cannot hide behind itself.
    """
    by_ip, by_pyroute2, by_us = seen_by_ip(ns), seen_by_pyroute2(ns), seen_by_vhostorch(ns)
    assert by_pyroute2 == by_ip, (by_pyroute2, by_ip)
    assert by_us == by_ip, (by_us, by_ip)
    return by_ip


def sysfs(ns: str, dev: str, attr: str) -> str:
    return run("ip", "netns", "exec", ns, "cat", f"/sys/class/net/{dev}/{attr}").stdout.strip()


def tun_flags(ns: str, dev: str) -> int:
    return int(sysfs(ns, dev, "tun_flags"), 16)


class Opener:
    """A process in ``ns`` holding ``queues`` queues of tap ``name`` open, QEMU's way
    (``multi_queue``: IFF_MULTI_QUEUE even for one queue; ``detach``: every queue then
    detached with TUNSETQUEUE, the fds kept)."""

    def __init__(
        self,
        ns: str,
        name: str,
        queues: int,
        vnet_hdr: bool = True,
        *,
        multi_queue: bool = False,
        detach: bool = False,
    ) -> None:
        cmd = [
            "ip",
            "netns",
            "exec",
            ns,
            sys.executable,
            "-c",
            _OPENER,
            name,
            str(queues),
            "1" if vnet_hdr else "0",
            "1" if multi_queue else "0",
            "1" if detach else "0",
        ]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.answer = self.proc.stdout.readline().strip()

    @property
    def ok(self) -> bool:
        return self.answer == "ok"

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # our own child, by its pid
            self.proc.wait()

    def __enter__(self) -> Opener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def qemu_can_open(ns: str, name: str, queues: int, vnet_hdr: bool = True) -> str:
    """'ok', or 'errno N' for the first queue the kernel refused."""
    with Opener(ns, name, queues, vnet_hdr) as opener:
        return opener.answer


def vhostorch(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run the installed command line as a user would."""
    return subprocess.run([EXE, *args], capture_output=True, text=True, check=check)


def statuses(report: dict[str, Any], check_id: str) -> set[str]:
    """The statuses a `check --json` report gives ``check_id`` (one per NIC or queue)."""
    return {c["status"] for c in report["checks"] if c["id"] == check_id}
