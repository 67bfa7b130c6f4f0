"""What the libvirt hook keeps between calls, and where: each domain's record of its taps
and one claim file per tap, under /run/vhostorch/hook (`Places`, `file_stem`).

DOMAIN.taps is the domain's record: each tap and whether the hook created it, borrowed it,
or is about to create it, and the tag in the alias of the taps it makes for the domain
(taps.mark), replaced whole under the per-domain lock DOMAIN.lock. A claim is
one file per tap holding the domain's name, linked into place whole, so two domains
declaring one tap cannot both have it. DOMAIN is the domain's name escaped for a file name
(`file_stem`): libvirt allows names no file may have. The check made when a domain starts
goes to /run/vhostorch/DOMAIN.json (`Places.result`).

On the hook's start-up path: stdlib ``os`` only (no json: the record is a line per tap).
"""

from __future__ import annotations

import os

from vhostorch import claims, files, rundir
from vhostorch.errors import Claimed, OperationFailed
from vhostorch.files import stem as file_stem
from vhostorch.lockfile import Lock

RUN_DIR = rundir.RUN
SYSLOG = "/dev/log"
HOW = ("created", "borrowed", "pending")  # what a domain's record says of each tap
# The record's line that gives the tag of the taps the hook makes for the domain
# (taps.mark); no interface name has a ':', so no tap's line starts so.
TAG_LINE = ":tag"
FILE_MODE = 0o644


class Places:
    """Where the hook keeps its files and sends its syslog line (tests point them elsewhere)."""

    def __init__(self, run_dir: str = RUN_DIR, syslog: str = SYSLOG) -> None:
        self.run = run_dir
        self.syslog = syslog
        self.state = os.path.join(run_dir, "hook")
        self.claims = os.path.join(self.state, "taps")

    def result(self, domain: str) -> str:
        return os.path.join(self.run, f"{file_stem(domain)}.json")

    def held(self, domain: str) -> str:
        return os.path.join(self.state, f"{file_stem(domain)}.taps")

    def lock(self, domain: str) -> str:
        return os.path.join(self.state, f"{file_stem(domain)}.lock")

    def claim(self, tap: str) -> str:
        return os.path.join(self.claims, tap)


def read_held(places: Places, domain: str) -> tuple[dict[str, str], str | None]:
    """Tap → how ``domain`` holds it (one of HOW; empty: holds nothing), and the tag of
    the taps the hook made for it (None: none recorded, or a record from before tags).

    The file has one ``TAP created|borrowed|pending`` line per tap and a ``:tag TAG``
    line (not JSON: the json module's import is a good part of the cost libvirt waits for).
    """
    try:
        lines = files.read(places.held(domain)).decode(errors="replace").splitlines()
    except FileNotFoundError:
        return {}, None
    except OSError as err:
        raise OperationFailed(f"hook state {places.held(domain)}: {err.strerror}") from None
    held = {}
    tag = None
    for line in lines:
        tap, _, how = line.partition(" ")
        if tap == TAG_LINE and how:
            tag = how
            continue
        if not tap or how not in HOW:
            raise OperationFailed(f"hook state {places.held(domain)} is damaged: {line!r}")
        held[tap] = how
    return held, tag


def write_held(places: Places, domain: str, held: dict[str, str], tag: str | None) -> None:
    """Replace the record whole (the domain's lock is held: the temporary name is the
    domain's own); an empty one goes, and its tag with it."""
    path = places.held(domain)
    if not held:
        files.remove(path)
        return
    text = f"{TAG_LINE} {tag}\n" if tag else ""
    text += "".join(f"{tap} {how}\n" for tap, how in sorted(held.items()))
    files.replace(path, text.encode(), FILE_MODE, temporary=f"{path}.tmp")


def write_result(places: Places, domain: str, text: str) -> None:
    """Replace the started check's result, RUN_DIR/DOMAIN.json, whole (its temporary name
    is the domain's own; release removes one a kill left)."""
    rundir.ensure(places.run, rundir.RUN_MODE)
    path = places.result(domain)
    files.replace(path, text.encode(), FILE_MODE, temporary=f"{path}.tmp")


def domain_lock(places: Places, domain: str) -> Lock:
    """``domain``'s lock, its directory and the claims' made or checked (vhostorch.rundir)
    first: the claims of every domain are read under it."""
    rundir.ensure(places.claims, *claims.LEVELS)
    return Lock(places.lock(domain), places.held(domain))


def holder(places: Places, tap: str) -> str | None:
    """The name of the domain (or `up` VM) holding ``tap`` (None: no one)."""
    return claims.holder(tap, places.claims)


def _declared_too(tap: str, held_by: str) -> str:
    return f"tap {tap} is declared by {claims.describe(held_by)} too, which holds it"


def refuse_held(places: Places, tap: str, domain: str) -> None:
    """Raise OperationFailed when a holder other than ``domain`` holds ``tap``."""
    held_by = holder(places, tap)
    if held_by is not None and held_by != domain:
        raise OperationFailed(_declared_too(tap, held_by))


def claim(places: Places, tap: str, domain: str) -> bool:
    """Claim ``tap`` for ``domain`` (vhostorch.claims, shared with `up`); False when it
    already was (a rerun). Raises OperationFailed when another holder has it."""
    try:
        return claims.claim(tap, domain, places.claims)
    except Claimed as err:
        raise OperationFailed(_declared_too(tap, err.holder)) from err
