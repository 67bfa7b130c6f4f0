"""The backend contract: what orchestrate asks of a way to run a VM, and the record it gets back.

A backend is one module of this package with a class that has the methods of
``Backend``, named in the registry (vhostorch.backends); orchestrate never asks
which backend it holds. What a backend answers for a running VM it reads from
the VM's state (vm.state.VmState: its pid, QMP socket or libvirt URI, NICs), so
a VM started by one vhostorch process is stopped or hot-plugged by another.

The protocols exist for mypy only: importing typing costs ~10 ms (record.py),
and `vhostorch up` loads none of it.
"""

from __future__ import annotations

from vhostorch.record import TYPE_CHECKING, Record

if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Protocol

    from vhostorch.check.observe import Observation
    from vhostorch.vm.spec import NicSpec, VmSpec
    from vhostorch.vm.state import NicState, VmState


class Started(Record):
    """A VM running with its NICs: its QEMU's pid and how to reach it (kept in its state)."""

    pid: int
    qmp: str | None  # the QMP socket vhostorch talks to, when the backend has one
    uri: str | None  # the libvirt connection URI, when the backend is libvirt
    start_time: int | None = None  # QEMU's, from /proc/PID/stat, when the backend knows it


if TYPE_CHECKING:

    class Start(Protocol):
        """A VM being started: begun before its taps exist, so that its set-up overlaps theirs."""

        what: str  # what ``abort`` and the backend's ``stop`` undo, named when undoing fails

        @property
        def vm_id(self) -> str | None:
            """What will name the VM ``run`` makes, before its pid is known (libvirt: the
            domain's UUID), kept in the state before ``run`` so ``stop`` finds it after a kill."""

        def process(self) -> tuple[int, int | None] | None:
            """(pid, start time) of the QEMU ``begin`` started, when it started one itself
            (recorded at once, so that a start killed later can be undone)."""

        def run(self, nics: Sequence[tuple[NicSpec, bool]]) -> Started:
            """Start the VM with ``nics`` ((spec, vhost on)) on their taps, which exist now.

            A VM that does not come up is stopped again. Raises OperationFailed.
            """

        def abort(self) -> None:
            """Undo ``begin``, whatever stage the start reached before ``run`` returned."""

    class Asker(Protocol):
        """Asks QEMU itself, cheaply, whether vhost has started (the guest boots meanwhile)."""

        def waiting(self, devices: Sequence[str]) -> list[str]:
            """The ``devices`` whose vhost has not started yet; all of them when QEMU did not
            answer (the wait asks again, and the final check reports what it finds)."""

        def close(self) -> None:
            """Release what the questions held; a later ``waiting`` opens it again."""

    class Backend(Protocol):
        """A way to run a VM whose NICs are taps vhostorch made, with vhost where allowed."""

        takes_uri: bool  # whether ``begin``'s libvirt URI (``up --connect``) means anything to it

        def vhost_refused(self, accel: str) -> str | None:
            """Why this backend cannot give a NIC vhost under ``accel``, or None."""

        def begin(self, spec: VmSpec, workdir: str, uri: str, user: str | None = None) -> Start:
            """Begin starting ``spec`` (``workdir`` is its own, ``uri`` a libvirt URI, ``user``
            who QEMU runs as where the backend decides it; None: its default).

            Raises OperationFailed."""

        def runs_as(self, user: str | None) -> str | None:
            """Who QEMU will run as for ``user`` ("root" is warned about); None when the
            backend does not decide it (libvirt's qemu.conf does)."""

        def nic_ids(self, state: VmState, taps: Sequence[str]) -> list[tuple[str, str]]:
            """(device id or alias, netdev id) of the NIC on each of ``taps`` of running ``state``.

            Raises OperationFailed."""

        def stop(self, state: VmState) -> None:
            """Stop the VM and remove its work directory; a VM gone already is fine.

            Raises OperationFailed."""

        def attach(self, state: VmState, nic: NicSpec, vhost_on: bool) -> None:
            """Hot-plug ``nic`` (its tap exists) into running ``state``. Raises OperationFailed."""

        def detach(self, state: VmState, nic: NicState, timeout: float) -> None:
            """Unplug ``nic``, waiting up to ``timeout`` s for the guest to release it.

            Raises OperationFailed (the NIC then stays attached)."""

        def observe(self, state: VmState) -> Observation:
            """What the check of running ``state`` is made from.

            Raises procfs.CannotInspect, OperationFailed."""

        def final_started(self) -> tuple[str, ...]:
            """The statuses of a NIC's ``nic.vhost.started`` check that will not change."""

        def asker(self, state: VmState) -> Asker | None:
            """How the wait asks QEMU whether vhost started; None when it checks instead."""
