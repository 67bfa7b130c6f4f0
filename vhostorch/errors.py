"""The exceptions vhostorch raises, and the exit code the command line maps each to.

    VhostorchError                 root: every error the library raises on purpose   (exit 1)
     +-- HelpRequested             -h/--help was given; the message is the help text (exit 0)
     +-- InvalidSpec               the input is wrong; nothing was touched           (exit 2)
     +-- OperationFailed           the host refused or the state forbids it          (exit 1)
          +-- NotManaged           the device exists but vhostorch did not create it
          +-- InUse                a process holds the tap open (.name)
          +-- Mismatch             the device differs in a way that needs a recreate
          +-- KernelError          a netlink or ioctl call failed (.errno)
          |    +-- NetlinkError    the kernel refused a netlink request (.extack); an OSError
          +-- RollbackFailed       undoing a partial change failed too (.cause, .leftovers)
          +-- MonitorError         QEMU's monitor unreachable or refused (.error_class, .sent)
          +-- LibvirtFailed        libvirt refused a change to a domain
          +-- LeftPaused           a VM vhostorch paused may still be paused (.resume: how)
          +-- TraceUnavailable     the wiring trace cannot be armed or read here
          +-- CannotInspect        the process is gone, not readable or no QEMU      (exit 2)
          |    +-- TooManyFds      it holds more fds than one read takes (MAX_FDS)
          +-- DomainUnavailable    the libvirt domain cannot be inspected            (exit 2)
          +-- LabError             the test host did not boot or reach its command   (exit 125)
               +-- LabTimeout      the command ran out of time; the host was stopped (exit 124)
                    +-- LabFrozen  the test host stopped making progress (.evidence)
          +-- Claimed              another VM or domain holds the tap (.tap, .holder)
          +-- NotRegular           not a regular file at a path; refused unopened (.what)
          +-- LiveUnavailable      the kernel's live state cannot be read here (no BTF, no BPF)
               +-- BpfRefused      the kernel refused a BPF request (.errno, .log: the verifier's)

    KeyboardInterrupt              (Python's: outside the tree, so no `except Exception` takes it)
     +-- Interrupted               a stopping signal; what the command made is undone (exit 130)

A class without an exit code of its own has its parent's. The code is ``exit_code`` on the
class; each adapter maps it once: the command line (vhostorch.cli.main) uses it as it is,
the libvirt hook (vhostorch.hook.program) narrows it to 1 or 2, the Ansible modules
(module_utils/common.py) turn every error into ``fail_json``.

Messages say *what failed: why*, on one line. Where another exception explains the failure,
it is kept as ``__cause__`` (``raise ... from err``).
"""

from __future__ import annotations

import errno
import os

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
# A check target that cannot be looked at is bad input to `check`, as for the hook.
EXIT_CANNOT_INSPECT = EXIT_USAGE
EXIT_TIMEOUT = 124  # as `timeout`
EXIT_CANNOT_RUN = 125  # as `docker run` when the command could not be run
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE


class VhostorchError(Exception):
    """Root of the vhostorch exception tree."""

    exit_code = EXIT_FAILED


class HelpRequested(VhostorchError):
    """``-h``/``--help`` was given; the text to print is the message."""

    exit_code = EXIT_OK


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

    errno: int | None

    def __init__(self, message: str, errno: int) -> None:
        super().__init__(message)
        self.errno = errno


class NetlinkError(KernelError, OSError):
    """The kernel refused a netlink request; ``extack`` is its own explanation when it gave one.

    Also an OSError (``errno``, ``strerror``): callers of the kernel modules handle a failed
    socket, ioctl or netlink request alike.
    """

    def __init__(self, code: int, extack: str | None) -> None:
        OSError.__init__(self, code, os.strerror(code))
        self.extack = extack

    def __str__(self) -> str:
        text = self.strerror or errno.errorcode.get(self.errno or 0, "error")
        return f"{text} ({self.extack})" if self.extack else text


class RollbackFailed(OperationFailed):
    """A change failed and undoing the steps before it failed as well."""

    def __init__(self, message: str, cause: VhostorchError, leftovers: list[str]) -> None:
        super().__init__(message)
        self.cause = cause
        self.leftovers = leftovers


class MonitorError(OperationFailed):
    """QEMU's monitor could not be reached, or refused a question.

    ``error_class`` is the class of QEMU's error reply (``GenericError``,
    ``DeviceNotFound``, ``CommandNotFound``...), None when QEMU did not answer;
    ``sent`` is the request (``{"execute": ..., "arguments": ...}``) where known.
    """

    def __init__(
        self,
        message: str,
        *,
        error_class: str | None = None,
        sent: dict[str, object] | None = None,
    ) -> None:
        super().__init__(message)
        self.error_class = error_class
        self.sent = sent


class LibvirtFailed(OperationFailed):
    """libvirt refused a change to a domain."""


class LeftPaused(OperationFailed):
    """A VM that vhostorch paused was not seen running again in time: it may still be paused.
    ``why`` says what happened, ``resume`` how to resume it by hand."""

    def __init__(self, why: str, resume: str) -> None:
        super().__init__(f"left paused: {why}; resume it with {resume}")
        self.why = why
        self.resume = resume


class TraceUnavailable(OperationFailed):
    """The wiring trace cannot be armed or read here (no tracefs, not root, old kernel)."""


class CannotInspect(OperationFailed):
    """The process cannot be inspected: gone, not readable (not root), or not a QEMU."""

    exit_code = EXIT_CANNOT_INSPECT


class TooManyFds(CannotInspect):
    """A process holds more fds than one read takes (procfs.MAX_FDS): not read, and said
    (unlike a process that exited while looked at, which check --all passes over)."""


class DomainUnavailable(OperationFailed):
    """The domain cannot be inspected: libvirt unreachable, no such domain, not running."""

    exit_code = EXIT_CANNOT_INSPECT


class LabError(OperationFailed):
    """The test host could not be built, booted, or did not reach its command."""

    exit_code = EXIT_CANNOT_RUN


class LabTimeout(LabError):
    """The command did not finish in time; the test host was stopped."""

    exit_code = EXIT_TIMEOUT


class LabFrozen(LabTimeout):
    """The test host stopped making progress (a CPU stuck in its kernel for minutes, or
    no CPU running at all); it was stopped.

    ``evidence`` says what was seen, per CPU: its task and call chain from the kernel's
    lockup report, or its registers and LAPIC from QEMU's monitor (see vhostorch.lab.watch).
    """

    def __init__(self, message: str, evidence: str) -> None:
        super().__init__(message)
        self.evidence = evidence


class Claimed(OperationFailed):
    """The tap is claimed by another VM (``up``) or libvirt domain (the hook): ``.holder``."""

    def __init__(self, message: str, tap: str, holder: str) -> None:
        super().__init__(message)
        self.tap = tap
        self.holder = holder


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP (or SIGINT) stopped a command; the message names the signal. What the
    command had made is undone, as on any failure (vhostorch.signals)."""

    exit_code = EXIT_INTERRUPTED


class NotRegular(OperationFailed, OSError):
    """What is at a path is not a regular file; ``what`` names it ("a FIFO", "a directory").
    Also an OSError, as a failed open of that path would be."""

    def __init__(self, path: str, what: str) -> None:
        OperationFailed.__init__(self, f"{path} is {what}")
        self.path = path
        self.what = what


class LiveUnavailable(OperationFailed):
    """The kernel's own objects cannot be read here: no BTF for a type, no BPF iterators, not
    root, or lockdown; the message says which."""


class BpfRefused(LiveUnavailable):
    """The kernel refused a bpf(2) request: ``errno`` is its answer, ``log`` the verifier's
    whole log for a refused program (the message carries its first meaningful line)."""

    def __init__(self, message: str, errno: int, log: str = "") -> None:
        super().__init__(message)
        self.errno = errno
        self.log = log
