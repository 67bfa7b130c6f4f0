"""The run directory, /run/vhostorch: where each directory vhostorch keeps in it is, its one
mode, and the one function that makes or checks it (`ensure`).

    /run/vhostorch      0755  the hook's started-check results (DOMAIN.json, 0644)
      vms/              0711  each VM's state (NAME.json, 0600), lock and work directory
                              NAME.d/ (0711, root's: QEMU's stdout and stderr, and qemu/,
                              QEMU's user's, for its QMP socket and console log): others may
                              pass through, to reach qemu/, and list or read nothing
      hook/             0755  each domain's record of its taps (DOMAIN.taps) and lock
        taps/           0700  one claim file per tap (vhostorch.claims)
      taps/             0700  the per-namespace tap-delete locks (vhostorch.taps.teardown)
      btf/              0700  the live reader's per-boot cache of structure offsets
                              (vhostorch.kernel.btf)
      pins/             0700  each pinned QEMU's worker CPUs (PID.json, 0600; vhostorch.pins)

Whichever command makes a directory first (`up`, the hook's prepare, a tap delete, `check`
reading the live state, `pin`), it gets its mode from here, whatever the umask, and one
found with another mode is given its own (a run directory made under umask 077 by an older
version heals). Root then works with
paths inside these directories, so each one, and every directory above it, must be one that
nobody else can change: a symlink, a directory owned by another user, or one that others
can write (above the run directory, only a sticky one such as /tmp may be) is refused, in
one line, before anything is read or written there.

Stdlib ``os`` only: the libvirt hook's start-up path makes them.
"""

from __future__ import annotations

import errno
import os

from vhostorch.errors import OperationFailed

RUN = "/run/vhostorch"
VMS = f"{RUN}/vms"
HOOK = f"{RUN}/hook"
CLAIMS = f"{HOOK}/taps"
TAP_LOCKS = f"{RUN}/taps"
BTF = f"{RUN}/btf"  # kernel.btf's per-boot cache of structure offsets
PINS = f"{RUN}/pins"

RUN_MODE = 0o755
VMS_MODE = 0o711
HOOK_MODE = 0o755
CLAIMS_MODE = 0o700
TAP_LOCKS_MODE = 0o700
BTF_MODE = 0o700
PINS_MODE = 0o700
# A directory made above the run directory because it was missing (a test's root, say).
ABOVE_MODE = 0o755

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_OTHERS_WRITE = 0o022
_STICKY = 0o1000


def ensure(path: str, *modes: int) -> None:
    """Make or check directory ``path``, giving it ``modes[0]``, its parent ``modes[1]``
    and so on up (the levels of the run directory it is part of: ``ensure(VMS, VMS_MODE,
    RUN_MODE)``), whatever the umask. Directories above those levels are only checked (one
    that is missing is made with ABOVE_MODE).

    Every level is walked from ``/`` by directory fd with O_NOFOLLOW, so what is checked is
    what is used. Raises OperationFailed when a level is a symlink or not a directory, is
    owned by another user, or can be written by others (above the levels: unless sticky).
    """
    parts = [p for p in path.split("/") if p]
    if not path.startswith("/") or not parts or not modes or len(modes) > len(parts):
        raise ValueError(f"{path!r} with {len(modes)} level(s): not an absolute run path")
    fd = os.open("/", _DIR)
    try:
        for index, part in enumerate(parts):
            level = len(parts) - 1 - index  # 0: path itself
            mode = modes[level] if level < len(modes) else None
            where = "/" + "/".join(parts[: index + 1])
            child, made = _enter(fd, part, where)
            os.close(fd)
            fd = child
            found = os.fstat(fd)
            if not made:
                _trust(found, where, mode is not None)
            want = ABOVE_MODE if made and mode is None else mode
            if want is not None and found.st_mode & 0o7777 != want:
                try:
                    os.fchmod(fd, want)  # mkdir's mode is masked by the umask
                except OSError as err:
                    raise OperationFailed(f"run directory {where}: {err.strerror}") from None
    finally:
        os.close(fd)


def _enter(parent: int, name: str, where: str) -> tuple[int, bool]:
    """(fd of directory ``name`` in ``parent``, whether it was made now)."""
    made = False
    try:
        return os.open(name, _DIR, dir_fd=parent), made
    except FileNotFoundError:
        try:
            os.mkdir(name, 0o700, dir_fd=parent)  # nobody else can enter it before its mode
            made = True
        except FileExistsError:
            pass  # made meanwhile by another command: checked as found
        except OSError as err:
            raise _refused(err, where) from None
    except OSError as err:
        raise _refused(err, where) from None
    try:
        return os.open(name, _DIR, dir_fd=parent), made
    except OSError as err:
        raise _refused(err, where) from None


def _refused(err: OSError, where: str) -> OperationFailed:
    if err.errno in (errno.ELOOP, errno.ENOTDIR):
        return OperationFailed(
            f"run directory {where} is a symlink or not a directory: refusing to use it"
        )
    return OperationFailed(f"run directory {where}: {err.strerror}")


def _trust(found: os.stat_result, where: str, ours: bool) -> None:
    """Raise OperationFailed unless nobody but root (or us) can change ``where``."""
    owner = found.st_uid
    if owner not in (0, os.geteuid()):
        raise OperationFailed(
            f"run directory {where} is owned by uid {owner}, not root: refusing to use it"
        )
    if found.st_mode & _OTHERS_WRITE and (ours or not found.st_mode & _STICKY):
        raise OperationFailed(
            f"run directory {where} can be written by others (mode {found.st_mode & 0o7777:o}):"
            " refusing to use it"
        )
