"""Who holds a tap: one claim file per tap, made with O_EXCL, shared by `up` and the hook.

A tap belongs to one VM. The claim is the file /run/vhostorch/hook/taps/TAP
(the directory and format the libvirt hook has always used: the file holds the
holder's name and nothing else), created with ``O_CREAT|O_EXCL``, so of two
claimants racing for one tap exactly one wins, whatever the timing. The hook's
holders are libvirt domain names; `up`'s are ``up/VM`` (see ``up_holder``): a
libvirt domain name never has a '/', so the two never collide, and a tap held by
a domain is refused to `up` and the other way round.
"""

from __future__ import annotations

import os

from vhostorch.errors import OperationFailed

CLAIM_DIR = "/run/vhostorch/hook/taps"
FILE_MODE = 0o600
DIR_MODE = 0o700


class Claimed(OperationFailed):
    """The tap is held by another holder, kept in ``.holder``."""

    def __init__(self, tap: str, holder: str) -> None:
        super().__init__(f"tap {tap} is held by {describe(holder)}")
        self.tap = tap
        self.holder = holder


def up_holder(vm: str) -> str:
    """The holder name of VM ``vm`` started by `vhostorch up`."""
    return f"up/{vm}"


def describe(holder: str) -> str:
    kind, _, vm = holder.partition("/")
    if kind == "up" and vm:
        return f"VM {vm!r} (vhostorch up)"
    return f"domain {holder!r}"


def path(tap: str, root: str = CLAIM_DIR) -> str:
    if not tap or "/" in tap or tap in (".", ".."):
        raise OperationFailed(f"tap name {tap!r} cannot name a claim file")
    return os.path.join(root, tap)


def holder(tap: str, root: str = CLAIM_DIR) -> str | None:
    """Who holds ``tap``, or None."""
    try:
        with open(path(tap, root)) as f:
            return f.read()
    except FileNotFoundError:
        return None


def claim(tap: str, who: str, root: str = CLAIM_DIR) -> bool:
    """Claim ``tap`` for ``who``: True when claimed now, False when ``who`` held it already.

    Raises Claimed when another holder has it, OperationFailed when the file cannot be made.
    """
    os.makedirs(root, mode=DIR_MODE, exist_ok=True)
    where = path(tap, root)
    while True:
        try:
            fd = os.open(
                where, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                FILE_MODE,
            )  # fmt: skip
        except FileExistsError:
            held = holder(tap, root)
            if held is None:
                continue  # released meanwhile: try again
            if held == who:
                return False
            raise Claimed(tap, held) from None
        except OSError as err:
            raise OperationFailed(f"claim file {where}: {err.strerror}") from None
        try:
            os.fchmod(fd, FILE_MODE)  # the umask does not decide it
            os.write(fd, who.encode())
        finally:
            os.close(fd)
        return True


def release(tap: str, who: str, root: str = CLAIM_DIR) -> None:
    """Release ``tap`` when ``who`` holds it; anyone else's claim (or none) is left alone."""
    try:
        if holder(tap, root) == who:
            os.unlink(path(tap, root))
    except FileNotFoundError:
        pass
