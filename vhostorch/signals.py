"""The signals that stop a command (SIGINT, SIGTERM, SIGHUP), and how a command that changes
the host takes them: as a request to roll back.

``RollBack()`` turns the first of them into ``errors.Interrupted`` (the command's undo
steps then run as on any failure) and ignores the later ones, so that a second signal
cannot cut the undoing short. ``Held()`` blocks them around a step that must not be cut
between its effect and its record (a tap made and its undo pushed; a VM paused and
resumed): they act as soon as the step ends.

It imports ``_signal``, signal's C half: ``signal`` imports ``enum``, which costs more than
the rest of the libvirt hook's start-up (libvirt waits for the hook on every VM start).
"""

from __future__ import annotations

from vhostorch.errors import Interrupted
from vhostorch.record import TYPE_CHECKING

if TYPE_CHECKING:
    import signal as _signal
else:
    import _signal

STOPPING: dict[int, str] = {
    _signal.SIGINT: "SIGINT",
    _signal.SIGTERM: "SIGTERM",
    _signal.SIGHUP: "SIGHUP",
}


def ignore() -> None:
    """Ignore them from now on (a command on its way out must not turn one into a traceback)."""
    for sig in STOPPING:
        _signal.signal(sig, _signal.SIG_IGN)


def _interrupt(signum: int, frame: object) -> None:
    ignore()  # the rollback this starts runs to its end
    raise Interrupted(STOPPING.get(signum, str(signum)))


class RollBack:
    """While the block runs, the first stopping signal raises Interrupted; afterwards the
    handlers are as they were. Only the main thread can have handlers: elsewhere, nothing."""

    def __init__(self) -> None:
        self.old: dict[int, object] = {}

    def __enter__(self) -> RollBack:
        try:
            for sig in STOPPING:
                self.old[sig] = _signal.signal(sig, _interrupt)
        except ValueError:
            pass  # not the main thread
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self.old.items():
            _signal.signal(sig, old)  # type: ignore[arg-type]


class Held:
    """The stopping signals wait until the block ends, then act. The mask is the calling
    thread's: it holds them for the process while that is its only thread (every vhostorch
    command is; a thread that does not block them would take them meanwhile)."""

    def __enter__(self) -> None:
        self.old = _signal.pthread_sigmask(_signal.SIG_BLOCK, STOPPING)

    def __exit__(self, *exc: object) -> None:
        _signal.pthread_sigmask(_signal.SIG_SETMASK, self.old)
