"""The backend contract: the seven members orchestrate asks of a way to run a VM, and the records
it gets back.

A backend is one module of this package with a class that has the methods of ``Backend``,
named in the registry (vhostorch.backends); orchestrate never asks which backend it holds.
As os-vif's ``PluginBase`` (``describe``, ``plug``, ``unplug``), it says what it is with
``describe``, and the rest is starting, plugging and stopping. A backend object serves
one command (the registry makes a new one each time): a start it ``begin``\\ s is finished
by its ``plug`` and undone by its ``stop``. What it answers for a VM another command
started it reads from the VM's state (vm.state.VmState: its pid and start time, libvirt
URI and domain UUID, work directory, NICs), so a VM started by one vhostorch process is
stopped or hot-plugged by another, and a start killed outright (SIGKILL) is undone by
``stop`` from what the state recorded. Where a backend keeps its files (QEMU's QMP socket,
logs) under the work directory is its own business.

The protocol exists for mypy only: importing typing costs ~10 ms (record.py),
and `vhostorch up` loads none of it.
"""

from __future__ import annotations

from vhostorch.record import TYPE_CHECKING, Record

if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Protocol

    from vhostorch.check.observe import Observation
    from vhostorch.check.report import Status
    from vhostorch.vm.spec import BackendName, NicSpec, VmSpec
    from vhostorch.vm.state import NicState, VmState


class Description(Record):
    """What a backend is, what it needs and what it can do (os-vif's ``describe()``)."""

    name: BackendName
    # Needs: whether a libvirt connection URI (``up --connect``) means anything to it.
    takes_uri: bool
    # Needs: why it gives a NIC vhost only under accel "kvm"; None: under TCG too.
    vhost_needs_kvm: str | None
    # Can tell: the statuses of a NIC's ``nic.vhost.started`` check that will not change
    # as the guest boots (QEMU's monitor says "not yet"; the wiring trace cannot).
    final_started: tuple[Status, ...]


class Begun(Record):
    """A VM whose start has begun: what names it, recorded before anything else happens, so
    that ``stop`` finds it after a kill."""

    what: str  # what ``stop`` undoes ("QEMU", "domain NAME"), named when undoing fails
    pid: int = 0  # its QEMU's, when ``begin`` started one (0: not yet)
    start_time: int | None = None  # that QEMU's, from /proc/PID/stat
    vm_id: str | None = None  # what names the VM before its pid is known (libvirt: a UUID)
    uri: str | None = None  # the libvirt connection URI, when the backend is libvirt
    runs_as: str | None = None  # who QEMU runs as ("root" is warned of); None: not its to say


class Plugged(Record):
    """A VM with its NICs plugged: its QEMU (known once the VM runs) and each NIC's ids."""

    pid: int
    start_time: int | None
    qmp: str | None  # the QMP socket vhostorch talks to, when the backend has one
    ids: tuple[tuple[str, str], ...]  # (device id or alias, netdev id) of each NIC plugged


if TYPE_CHECKING:

    class Backend(Protocol):
        """A way to run a VM whose NICs are taps vhostorch made, with vhost where allowed."""

        def describe(self) -> Description:
            """What this backend is, needs and can do (read before anything is started)."""

        def begin(self, spec: VmSpec, workdir: str, uri: str | None, user: str | None) -> Begun:
            """Begin starting ``spec`` before its taps exist, so that its set-up overlaps
            theirs (``workdir`` is its own, made new; ``uri`` a libvirt URI, None: the
            system's; ``user`` who QEMU runs as where the backend decides it, None: its
            default). Raises OperationFailed."""

        def plug(self, state: VmState, nics: Sequence[tuple[NicSpec, bool]]) -> Plugged:
            """Plug ``nics`` ((spec, vhost on); their taps exist) into the VM of ``state``:
            the VM this object began starts with them and runs; a running one has them
            hot-plugged, each all or nothing. Raises OperationFailed."""

        def unplug(self, state: VmState, nic: NicState, timeout: float) -> None:
            """Unplug ``nic``, waiting up to ``timeout`` s for the guest to release it; a NIC
            not plugged, or plugged in part by a ``plug`` cut short, is fine.

            Raises OperationFailed (the NIC then stays attached)."""

        def stop(self, state: VmState) -> None:
            """Stop the VM of ``state`` and remove its work directory, whatever stage its start
            reached (one this object began, or one a killed command recorded as starting);
            a VM gone already is fine. Raises OperationFailed."""

        def observe(self, state: VmState) -> Observation:
            """What the check of running ``state`` is made from.

            Raises procfs.CannotInspect, OperationFailed."""

        def ask(self, state: VmState, devices: Sequence[str]) -> list[str] | None:
            """The ``devices`` whose vhost has not started yet, asked of QEMU itself and
            cheaply (the guest boots meanwhile); all of them when QEMU did not answer; None
            when this backend cannot ask (the wait then checks). No ``devices``: nothing more
            to ask, and what the questions held is released."""
