"""Who holds a tap: one claim file per tap, shared by `up` and the libvirt hook.

A tap belongs to one VM. Its claim is the file /run/vhostorch/hook/taps/TAP, which holds
the holder's name and nothing else (the directory and format the hook has always used).
It is written whole and then linked into place (files.create), so of two claimants racing
for one tap exactly one wins, whatever the timing, and no one ever reads a claim empty.
The hook's holders are libvirt domain names; `up`'s are ``up/VM`` (``up_holder``): a
domain name never has a '/', so the two never collide, and a tap held by a domain is
refused to `up` and the other way round.
"""

from __future__ import annotations

import os

from vhostorch import files, rundir
from vhostorch.errors import Claimed, OperationFailed

CLAIM_DIR = rundir.CLAIMS
LEVELS = (rundir.CLAIMS_MODE, rundir.HOOK_MODE, rundir.RUN_MODE)  # hook/taps, hook, the run dir
FILE_MODE = 0o600  # a claim names a VM or domain: root's business alone


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
    """Who holds ``tap``, or None. Names are read as the file system gives them (a domain
    name that is not valid UTF-8 round-trips through os.fsdecode)."""
    where = path(tap, root)
    try:
        return os.fsdecode(files.read(where))
    except FileNotFoundError:
        return None
    except OSError as err:
        raise OperationFailed(f"claim file {where}: {err.strerror}") from None


# Where claims are written before they are linked into place: a name longer than any
# interface name can be (IFNAMSIZ - 1 = 15 bytes), so it is never a tap's claim.
SCRATCH = ".claims-being-made"


def scratch(who: str, root: str = CLAIM_DIR) -> str:
    """Where ``who`` writes a claim before linking it: a name of its own (a holder claims
    under its own lock, one tap at a time), so what a kill left there is replaced next time."""
    return os.path.join(root, SCRATCH, files.stem(who))


def claim(tap: str, who: str, root: str = CLAIM_DIR) -> bool:
    """Claim ``tap`` for ``who``: True when claimed now, False when ``who`` held it already.
    The caller holds ``who``'s lock (the VM's, or the domain's in the hook).

    Raises Claimed when another holder has it, OperationFailed when the file cannot be made.
    """
    rundir.ensure(os.path.join(root, SCRATCH), rundir.CLAIMS_MODE, *LEVELS)
    where = path(tap, root)
    while True:
        try:
            if files.create(where, os.fsencode(who), FILE_MODE, temporary=scratch(who, root)):
                return True
        except OSError as err:
            raise OperationFailed(f"claim file {where}: {err.strerror}") from err
        held = holder(tap, root)
        if held is None:
            continue  # released meanwhile: try again
        if held == who:
            return False
        raise Claimed(f"tap {tap} is held by {describe(held)}", tap, held)


def release(tap: str, who: str, root: str = CLAIM_DIR) -> None:
    """Release ``tap`` when ``who`` holds it; anyone else's claim (or none) is left alone.
    Raises OperationFailed when the claim directory is not root's alone (vhostorch.rundir)."""
    rundir.ensure(root, *LEVELS)
    if holder(tap, root) == who:
        files.remove(path(tap, root))


def forget(who: str, root: str = CLAIM_DIR) -> None:
    """Remove what a claim of ``who`` cut short by a kill left half made (its claims stay)."""
    files.remove(scratch(who, root))
