"""The CPUs each QEMU's vhost-net workers were asked to run on: one record per QEMU, in the run
directory (``/run/vhostorch/pins/PID.json``, root's, 0600).

A pin is asked for by ``vhostorch pin``, by a spec's ``worker_cpus`` (``up``) or by a domain's
``<vhostorch:vm worker-cpus=>`` (the hook, when the domain has started). The record outlives
the command that asked: ``nic add``, ``pin --reapply`` (the metrics timer runs it) apply it
again to workers that appeared since (a hot-plugged NIC, a device vhost started anew), and
``check`` judges the workers against it (nic.vhost.placement). A record is the QEMU's by pid
and start time, so a pid reused by another process is never pinned by it.

Stdlib only: the hook reads it.
"""

from __future__ import annotations

import json
import os

from vhostorch import files, rundir
from vhostorch.record import TYPE_CHECKING, Record

if TYPE_CHECKING:
    from typing import Literal

    Source = Literal["vhostorch pin", "spec", "domain metadata"]

PINS = rundir.PINS
LEVELS = (rundir.PINS_MODE, rundir.RUN_MODE)
_LIMIT = 4096


class Pin(Record):
    """The CPU list (kernel list format) QEMU ``pid`` (started at ``start_ticks``) asked its
    vhost-net workers to run on, who asked, and the VM's name where it has one."""

    pid: int
    start_ticks: int
    cpus: str
    source: Source
    vm: str | None

    def to_json(self) -> dict[str, object]:
        return {"cpus": self.cpus, "source": self.source, "vm": self.vm}


def _path(pid: int, root: str) -> str:
    return os.path.join(root, f"{pid}.json")


def save(pin: Pin, root: str = PINS) -> None:
    """Record ``pin``, replacing the QEMU's earlier one. Raises OperationFailed (the run
    directory cannot be trusted) or OSError."""
    rundir.ensure(root, *LEVELS[: 2 if root == PINS else 1])
    data = json.dumps(pin.asdict(), sort_keys=True).encode()
    files.replace(_path(pin.pid, root), data, 0o600)


def load(pid: int, start_ticks: int, root: str = PINS) -> Pin | None:
    """QEMU ``pid``'s pin, if it has one; a record left by an earlier process of that pid
    (another start time), or one that cannot be read as a pin, counts as none."""
    try:
        data = json.loads(files.read(_path(pid, root), _LIMIT))
        pin = Pin(
            int(data["pid"]),
            int(data["start_ticks"]),
            str(data["cpus"]),
            data["source"],
            None if data.get("vm") is None else str(data["vm"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if pin.pid != pid or pin.start_ticks != start_ticks:
        return None
    if pin.source not in ("vhostorch pin", "spec", "domain metadata"):
        return None
    return pin


def listed(root: str = PINS) -> list[int]:
    """The pids that have a record."""
    try:
        names = os.listdir(root)
    except OSError:
        return []
    return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())


def forget(pid: int, root: str = PINS) -> None:
    files.remove(_path(pid, root))
