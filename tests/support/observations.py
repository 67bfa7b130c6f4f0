"""Recorded observations: what ``observe`` read of a real QEMU, kept as JSON, and replayed.

A recording holds exactly what ``check.observe.observe`` reads, as text: the
QEMU's /proc files and symlinks (cmdline, comm, stat, exe, ns/net, fd targets,
the fdinfo of tun/macvtap/vhost/eventfd/kvm fds, task/*/comm, /proc/devices), the
device number of each char device fd (``rdevs``: what an fd is, procfs.identify), its vhost
workers (kernel threads: comm, cmdline; both kinds: stat), the wiring trace's
lines for its pid, the taps as rtnetlink described them, QEMU's monitor view
(x-query-virtio*), for a libvirt domain its live XML (``domain_xml``), and what
``verify`` said of it live.

``snapshot`` records (as root, next to the QEMU); ``replay`` writes the /proc and
tracefs trees back under a directory and runs the real ``observe`` over them, so
procfs parsing, fd claiming and trace decoding all run again. Recordings live in
tests/fixtures/observations/; tests/support/record_observation.py makes them.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Callable, Iterable
from typing import NotRequired, TypedDict, cast

from vhostorch.check import nics, observe, wiring
from vhostorch.check.nics import Nic
from vhostorch.check.observe import Observation
from vhostorch.kernel import procfs
from vhostorch.kernel.rtnl import Link, TunInfo
from vhostorch.libvirt import domxml
from vhostorch.qemu.monitor import MonitorError, MonitorView, VirtioNet

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures" / "observations"
# The recorded observations' names, and each replayed as checked with everything, without
# --qmp/--monitor, and unarmed: (name, suffix, monitor, trace).
RECORDED = sorted(path.stem for path in FIXTURES.glob("*.json"))
VARIANTS = (("", True, True), ("-nomonitor", False, True), ("-notrace", True, False))
REPLAYS = [(name, *variant) for name in RECORDED for variant in VARIANTS]


class Recording(TypedDict):
    about: dict[str, str]
    pid: int
    netns: str | None
    vhost_net: bool
    files: dict[str, str]
    symlinks: dict[str, str]
    trace: str | None
    taps: dict[str, dict[str, object] | None]
    monitor: dict[str, object] | None
    monitor_error: str | None
    report: dict[str, object]
    domain_xml: NotRequired[str]  # a libvirt domain's live XML (recordings of domains only)
    # "PID/fd/N" -> "MAJ:MIN" of each char device fd; recordings made before fds were known
    # by device number lack it (see _recorded_rdevs).
    rdevs: NotRequired[dict[str, str]]


def _read(path: str) -> str | None:
    try:
        with open(path, errors="surrogateescape") as f:
            return f.read()
    except OSError:
        return None


def _link(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def proc_tree(
    pid: int, proc: str = procfs.PROC
) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """The files, symlinks and char device numbers ``observe`` reads for QEMU ``pid``
    (paths relative to ``proc``)."""
    files: dict[str, str] = {}
    links: dict[str, str] = {}
    rdevs: dict[str, str] = {}

    def keep_file(rel: str) -> None:
        text = _read(f"{proc}/{rel}")
        if text is not None:
            files[rel] = text

    def keep_link(rel: str) -> str | None:
        target = _link(f"{proc}/{rel}")
        if target is not None:
            links[rel] = target
        return target

    for name in ("cmdline", "comm", "stat"):
        keep_file(f"{pid}/{name}")
    keep_file("devices")
    keep_link(f"{pid}/exe")
    keep_link(f"{pid}/ns/net")
    char = procfs.CharDevices(proc)
    macvtap = procfs.char_major(procfs.MACVTAP_DRIVER, proc)
    for num in sorted(os.listdir(f"{proc}/{pid}/fd"), key=int):
        target = keep_link(f"{pid}/fd/{num}")
        if target is None:
            continue
        number = char(pid, num) if target.startswith("/") else None
        if number is not None:
            rdevs[f"{pid}/fd/{num}"] = f"{os.major(number)}:{os.minor(number)}"
        if procfs.wants_fdinfo(procfs.identify(target, number, macvtap)):
            keep_file(f"{pid}/fdinfo/{num}")
    worker = f"vhost-{pid}"[:15]
    for tid in os.listdir(f"{proc}/{pid}/task"):
        keep_file(f"{pid}/task/{tid}/comm")
        # Where each thread may run and ran (kernel.cpus.place); a vhost_task worker's own
        # CPU time (observe.worker_cpu) is in its stat too: /proc/TID/stat would be the
        # whole thread group's.
        for name in ("stat", "status", "cgroup"):
            keep_file(f"{pid}/task/{tid}/{name}")
    # The vhost workers that are kernel threads (Linux < 6.4), as vhost_kthreads finds them.
    for entry in os.listdir(proc):
        kthread = entry.isdigit() and _read(f"{proc}/{entry}/cmdline") == ""
        if kthread and (_read(f"{proc}/{entry}/comm") or "").strip() == worker:
            keep_file(f"{entry}/comm")
            keep_file(f"{entry}/cmdline")
            keep_file(f"{entry}/stat")
            for name in ("stat", "status", "cgroup"):
                keep_file(f"{entry}/task/{entry}/{name}")
    return files, links, rdevs


# Recordings made before fds were known by device number hold readlink's paths only, read
# in the host's own mount namespace, where the path is the device: these numbers are what
# those paths are (include/linux/miscdevice.h). A macvtap's major is dynamic and was not
# recorded: the replay gives it this one, in a /proc/devices of its own.
_PATH_RDEVS = {procfs.TUN: "10:200", procfs.VHOST_NET: "10:238", procfs.KVM: "10:232"}
_OLD_MACVTAP_MAJOR = 240


def _recorded_rdevs(rec: Recording) -> dict[str, str]:
    if "rdevs" in rec:
        return rec["rdevs"]
    found = {}
    for rel, target in rec["symlinks"].items():
        index = procfs.tap_index(target, procfs.MACVTAP_PREFIX)
        if target in _PATH_RDEVS:
            found[rel] = _PATH_RDEVS[target]
        elif index is not None:
            found[rel] = f"{_OLD_MACVTAP_MAJOR}:{index}"
    rec["files"].setdefault(
        "devices", f"Character devices:\n{_OLD_MACVTAP_MAJOR} {procfs.MACVTAP_DRIVER}\n"
    )
    return found


def trace_lines(pid: int, tracefs: str = wiring.TRACEFS) -> str | None:
    """The wiring trace's header and the lines of ``pid`` (None when it is not armed)."""
    if not wiring.armed(tracefs):
        return None
    text = _read(f"{tracefs}/instances/{wiring.INSTANCE}/trace") or ""
    kept = [
        line
        for line in text.splitlines()
        if line.startswith("#") or any(e.tgid == pid for e in wiring.parse_trace(line))
    ]
    return "\n".join(kept) + "\n"


def _monitor_view(data: dict[str, object]) -> MonitorView:
    nics = []
    for raw in cast("list[dict[str, object]]", data["nics"]):
        vhost = raw["vhost"]
        nics.append(
            VirtioNet(
                device=str(raw["device"]),
                path=str(raw["path"]),
                netdev=None if raw["netdev"] is None else str(raw["netdev"]),
                statuses=tuple(cast("list[str]", raw["statuses"])),
                vhost_started=bool(raw["vhost_started"]),
                vm_running=bool(raw["vm_running"]),
                num_vqs=int(cast("int", raw["num_vqs"])),
                vhost=cast("dict[str, object]", vhost) if vhost is not None else None,
                guest_features=tuple(cast("list[str]", raw["guest_features"])),
                acked_features=tuple(cast("list[str]", raw["acked_features"])),
            )
        )
    return MonitorView(str(data["source"]), cast("dict[str, object]", data["kvm"]), tuple(nics))


def _link_json(link: Link | None) -> dict[str, object] | None:
    return None if link is None else link.asdict()


def _optional_int(value: object) -> int | None:
    return None if value is None else int(cast("int", value))


def _link_from(data: dict[str, object] | None) -> Link | None:
    if data is None:
        return None
    tun = cast("dict[str, object] | None", data["tun"])
    info = None
    if tun is not None:
        info = TunInfo(
            tap=bool(tun["tap"]),
            pi=bool(tun["pi"]),
            vnet_hdr=bool(tun["vnet_hdr"]),
            multi_queue=bool(tun["multi_queue"]),
            persist=bool(tun["persist"]),
            owner=_optional_int(tun["owner"]),
            group=_optional_int(tun["group"]),
            attached_queues=int(cast("int", tun["attached_queues"])),
            disabled_queues=int(cast("int", tun["disabled_queues"])),
        )
    return Link(
        index=int(cast("int", data["index"])),
        name=str(data["name"]),
        kind=cast("str | None", data["kind"]),
        up=bool(data["up"]),
        mtu=int(cast("int", data["mtu"])),
        mac=cast("str | None", data["mac"]),
        master=_optional_int(data["master"]),
        alias=cast("str | None", data["alias"]),
        carrier=cast("bool | None", data["carrier"]),
        tun=info,
    )


def snapshot(
    pid: int,
    about: dict[str, str],
    monitor: Callable[[], MonitorView] | None,
    verify: Callable[[Observation], dict[str, object]],
    domain_xml: str | None = None,
) -> Recording:
    """Record QEMU ``pid`` as this host shows it now, with what ``verify`` says of it;
    ``domain_xml``: the live XML of the libvirt domain it runs, observed with it."""
    seen: dict[str, Link | None] = {}

    def links(names: Iterable[str]) -> dict[str, Link | None]:
        found = observe.read_links(names)
        seen.update(found)
        return found

    view: list[MonitorView] = []
    error: list[str] = []

    def ask() -> MonitorView:
        assert monitor is not None
        try:
            view.append(monitor())
        except MonitorError as err:
            error.append(str(err))
            raise
        return view[0]

    files, symlinks, rdevs = proc_tree(pid)
    trace = trace_lines(pid)
    domain = None if domain_xml is None else domxml.parse(domain_xml)
    obs = observe.observe(pid, domain=domain, monitor=ask if monitor else None, links=links)
    rec = Recording(
        about=about,
        pid=pid,
        netns=_link("/proc/self/ns/net"),
        vhost_net=obs.vhost_net,
        files=files,
        symlinks=symlinks,
        trace=trace,
        taps={name: _link_json(link) for name, link in seen.items()},
        monitor=view[0].asdict() if view else None,
        monitor_error=error[0] if error else None,
        report=verify(obs),
        rdevs=rdevs,
    )
    if domain_xml is not None:
        rec["domain_xml"] = domain_xml
    return rec


def records_places(name: str) -> bool:
    """Whether recording ``name`` holds where QEMU's threads run (recordings made before
    nic.vhost.placement do not: its verdict is then unknown)."""
    return any(rel.endswith("/status") for rel in load(name)["files"])


def load(name: str) -> Recording:
    with open(FIXTURES / f"{name}.json") as f:
        return cast("Recording", json.load(f))


def write_trees(rec: Recording, root: pathlib.Path) -> tuple[str, str]:
    """The recorded /proc and tracefs under ``root``: (proc, tracefs)."""
    proc, tracefs = root / "proc", root / "tracefs"
    for rel, text in rec["files"].items():
        path = proc / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, errors="surrogateescape")
    for rel, target in rec["symlinks"].items():
        path = proc / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(target)
    (proc / str(rec["pid"]) / "fd").mkdir(parents=True, exist_ok=True)
    if rec["trace"] is not None:
        instance = tracefs / "instances" / wiring.INSTANCE
        event = instance / "events" / wiring.GROUP / wiring.EVENT
        event.mkdir(parents=True)
        (event / "enable").write_text("1\n")
        (instance / "trace").write_text(rec["trace"])
    return str(proc), str(tracefs)


def replay(rec: Recording, root: pathlib.Path, *, monitor: bool = True) -> Observation:
    """``observe`` over the recorded trees under ``root`` (``monitor``: with the monitor view
    it recorded, else as a check without --qmp/--monitor sees it)."""
    rdevs = _recorded_rdevs(rec)
    proc, tracefs = write_trees(rec, root)

    def char(pid: int, fd: str) -> int | None:
        number = rdevs.get(f"{pid}/fd/{fd}")
        if number is None:
            return None
        major, minor = number.split(":")
        return os.makedev(int(major), int(minor))

    taps = {name: _link_from(data) for name, data in rec["taps"].items()}

    def links(names: Iterable[str]) -> dict[str, Link | None]:
        return {name: taps.get(name) for name in names}

    def ask() -> MonitorView:
        if rec["monitor_error"] is not None:
            raise MonitorError(rec["monitor_error"])
        assert rec["monitor"] is not None
        return _monitor_view(rec["monitor"])

    recorded_monitor = rec["monitor"] is not None or rec["monitor_error"] is not None
    xml = rec.get("domain_xml")
    return observe.observe(
        rec["pid"],
        domain=None if xml is None else domxml.parse(xml),
        proc=proc,
        tracefs=tracefs,
        links=links,
        netns=rec["netns"],
        vhost_net=rec["vhost_net"],
        monitor=ask if monitor and recorded_monitor else None,
        char=char,
        sys=str(root / "sys"),  # none: a macvtap's ifindex is its recorded node's name
        pins_dir=str(root / "pins"),  # none: no pin was asked for a recorded QEMU
    )


def observed(
    name: str, root: pathlib.Path, *, monitor: bool = True, trace: bool = True
) -> Observation:
    """Recording ``name`` observed again under ``root``; ``monitor``/``trace`` False leave that
    source out, as a check without --qmp/--monitor, or without the trace armed, sees it."""
    rec = load(name)
    if not trace:
        rec["trace"] = None
    return replay(rec, root, monitor=monitor)


def says(message: str, expected: str) -> bool:
    """``message`` is ``expected``, where "..." in ``expected`` stands for any text (a scenario
    table's way to give a message whose numbers vary)."""
    return re.fullmatch(".*".join(map(re.escape, expected.split("..."))), message, re.S) is not None


def nic_named(obs: Observation, name: str) -> Nic:
    """The NIC ``name`` of an observation, with the fds ``verify`` gives it."""
    return next(nic for nic in nics.find(obs) if nic.name == name)
