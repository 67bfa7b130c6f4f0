"""The exceptions vhostorch raises, and the exit code each adapter maps them to.

    VhostorchError                 root: every error the library raises on purpose
     +-- InvalidSpec               the input is wrong; nothing was touched      (exit 2)
     +-- OperationFailed           the host refused or the state forbids it     (exit 1)
          +-- NotManaged           the device exists but vhostorch did not create it
          +-- InUse                a process holds the tap open
          +-- Mismatch             the device differs in a way that needs a recreate
          +-- KernelError          a netlink or ioctl call failed (carries errno)
          +-- RollbackFailed       undoing a partial change failed too

Messages say *what failed: why*, on one line.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class VhostorchError(Exception):
    """Root of the vhostorch exception tree."""

    exit_code = EXIT_FAILED


class InvalidSpec(VhostorchError):
    """A spec, name or value is invalid; raised before anything is touched."""

    exit_code = EXIT_USAGE


class OperationFailed(VhostorchError):
    """The operation could not be carried out on this host."""


class NotManaged(OperationFailed):
    """A device of that name exists and vhostorch did not create it."""


class InUse(OperationFailed):
    """A tap has queues attached (some process holds it open); ``name`` is the tap."""

    def __init__(self, message: str, name: str) -> None:
        super().__init__(message)
        self.name = name


class Mismatch(OperationFailed):
    """An existing tap differs in what cannot be changed in place."""


class KernelError(OperationFailed):
    """A netlink or ioctl call failed; ``errno`` is the kernel's answer."""

    def __init__(self, message: str, errno: int) -> None:
        super().__init__(message)
        self.errno = errno


class RollbackFailed(OperationFailed):
    """A change failed and undoing the steps before it failed as well."""

    def __init__(self, message: str, cause: VhostorchError, leftovers: list[str]) -> None:
        super().__init__(message)
        self.cause = cause
        self.leftovers = leftovers
