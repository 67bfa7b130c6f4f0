"""What vhostorch started and created for each VM: one JSON state file per VM.

``up`` writes it before it touches anything (status "starting", with each thing it
makes recorded before it is made: tap claims, taps, QEMU), so that ``down`` or the
next ``up`` can undo exactly what a start killed by SIGKILL or a power cut made; it
says "running" once the VM runs. The taps a VM's commands make carry the interface
alias ``vhostorch:TAG`` (taps.mark), TAG drawn once and recorded before the first tap
is made: a device that took a tap's name since is never taken for ours. Hot-plug
rewrites it, recording first what it is about to claim, make and plug (``claimed``,
``making``, ``plugging``), so that a ``nic add``/``nic del`` killed midway is finished
by the next ``nic`` command or ``down``; ``down`` removes it;
``check`` reads it to know the NICs of a VM whose netdevs were added over QMP
(they are not on QEMU's command line). Writes are atomic (rename), files are 0600
whatever the umask, and every change to one VM holds that VM's lock, so two commands on
one VM never interleave. The directory's place and mode are vhostorch.rundir's.
"""

from __future__ import annotations

import json
import os

from vhostorch import files, lockfile, rundir
from vhostorch.errors import OperationFailed
from vhostorch.record import TYPE_CHECKING, Record

if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Literal

    from vhostorch.vm.spec import Accel, BackendName, VhostMode

    Status = Literal["starting", "running"]

STATE_DIR = rundir.VMS
FILE_MODE = 0o600
STARTING: Status = "starting"  # up has begun and not finished: what it made is listed
RUNNING: Status = "running"


class NicState(Record):
    """One NIC as vhostorch set it up: its QEMU ids, tap, and whether vhost was asked of QEMU."""

    tap: str
    device: str
    netdev: str
    queues: int
    mac: str
    vhost: VhostMode  # the spec's mode
    vhost_on: bool  # what QEMU was told (preferred falls back to off without /dev/vhost-net)
    fallback: str | None  # why a preferred NIC runs without vhost
    tap_created: bool  # created for this VM, so removed with it


class VmState(Record):
    name: str
    backend: BackendName
    pid: int
    accel: Accel
    qmp: str | None  # the QMP backend's socket
    uri: str | None  # the libvirt backend's connection URI
    workdir: str  # the backend's files (QEMU's logs and QMP socket: backends.process)
    nics: tuple[NicState, ...]
    status: Status = RUNNING  # files written before the field existed were running VMs
    # QEMU's start time (/proc/PID/stat field 22, clock ticks after boot): with the pid,
    # what names that QEMU alone (pids are reused). None in files from before it existed.
    start_time: int | None = None
    # While starting: the boot-relative tick before QEMU was launched (a QEMU found by the
    # socket it serves must have started after it), the taps claimed and the taps being made.
    launched_after: int | None = None
    claimed: tuple[str, ...] = ()
    making: tuple[str, ...] = ()
    # What names the VM a backend makes before its pid is known (libvirt: the UUID given to
    # the domain), recorded before it is made: a start killed then is undone by that name
    # alone, never by a guess (another domain may have the VM's name).
    vm_id: str | None = None
    # The tag in the alias of every tap made for this VM (taps.mark); None in files from
    # before it existed (their taps carry the plain alias "vhostorch").
    tag: str | None = None
    # A hot-plug under way: the NIC being added (its ids are not known yet), kept until
    # it is recorded in ``nics`` or undone.
    plugging: NicState | None = None

    def nic(self, tap: str) -> NicState | None:
        return next((n for n in self.nics if n.tap == tap), None)

    def with_nics(self, nics: tuple[NicState, ...]) -> VmState:
        return self.replace(nics=nics)


def _path(name: str, root: str) -> str:
    return os.path.join(root, f"{name}.json")


def make_dir(root: str) -> None:
    """``root`` (the run directory's vms/) made or checked, with its mode and its parent's.
    Raises OperationFailed when it is not root's alone."""
    rundir.ensure(root, rundir.VMS_MODE, rundir.RUN_MODE)


def save(state: VmState, root: str = STATE_DIR) -> None:
    make_dir(root)
    path = _path(state.name, root)
    text = json.dumps(state.asdict(), indent=1)
    files.replace(path, text.encode(), FILE_MODE, temporary=path + ".tmp")  # under the VM's Lock


def _from_json(data: dict[str, object]) -> VmState:
    nics = tuple(NicState(**n) for n in data.pop("nics"))  # type: ignore[attr-defined]
    if data.get("plugging") is not None:
        data["plugging"] = NicState(**data["plugging"])  # type: ignore[arg-type]
    for key in ("claimed", "making"):
        if key in data:
            data[key] = tuple(str(t) for t in data[key])  # type: ignore[attr-defined]
    return VmState(nics=nics, **data)  # type: ignore[arg-type]


def load(name: str, root: str = STATE_DIR) -> VmState | None:
    """The state of VM ``name``, or None when vhostorch has not started it."""
    try:
        return _from_json(json.loads(files.read(_path(name, root))))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as err:
        where = _path(name, root)
        raise OperationFailed(f"state of VM {name}: {where} is unreadable: {err}") from None


def remove(name: str, root: str = STATE_DIR) -> None:
    """Remove VM ``name``'s state, and the new state a signal cut short (under its Lock)."""
    path = _path(name, root)
    files.remove(path)
    files.remove(path + ".tmp")


def every(root: str = STATE_DIR) -> Iterator[VmState]:
    try:
        names = sorted(n for n in os.listdir(root) if n.endswith(".json"))
    except FileNotFoundError:
        return
    for name in names:
        try:
            state = load(name.removesuffix(".json"), root)
        except OperationFailed:
            continue  # one damaged file does not hide the others
        if state is not None:
            yield state


def running(known: VmState) -> bool:
    """Whether ``known``'s QEMU still runs: the process with its pid has the start time
    recorded (a VM that died without ``down`` leaves its state, and any user's QEMU may get
    its pid; a state from before start times were recorded names no process)."""
    from vhostorch.kernel import procfs

    return known.start_time is not None and procfs.start_time(known.pid) == known.start_time


def by_pid(pid: int, root: str = STATE_DIR) -> VmState | None:
    """vhostorch's VM whose QEMU is process ``pid`` now (`running`)."""
    return next((s for s in every(root) if s.pid == pid and running(s)), None)


class Lock(lockfile.Lock):
    """One VM's lock (NAME.lock), held for a whole command; it goes with the VM's state."""

    def __init__(self, name: str, root: str = STATE_DIR) -> None:
        make_dir(root)
        super().__init__(os.path.join(root, f"{name}.lock"), _path(name, root))
