"""What the libvirt hook keeps between calls, and where: each domain's record of its taps
and one claim file per tap, under /run/vhostorch/hook (`Places`, `file_stem`).

DOMAIN.taps is the domain's record: each tap and whether the hook created it, borrowed it,
or is about to create it, replaced whole under the per-domain lock DOMAIN.lock. A claim is
one file per tap holding the domain's name, linked into place whole, so two domains
declaring one tap cannot both have it. DOMAIN is the domain's name escaped for a file name
(`file_stem`): libvirt allows names no file may have. The check made when a domain starts
goes to /run/vhostorch/DOMAIN.json (`Places.result`).

On the hook's start-up path: stdlib ``os`` only (no json: the record is a line per tap).
"""

from __future__ import annotations

import os

from vhostorch import files
from vhostorch.errors import OperationFailed

RUN_DIR = "/run/vhostorch"
SYSLOG = "/dev/log"
# Where a name becomes a file name, at most this many bytes of it (NAME_MAX is 255, and
# ".taps.tmp" and the like are added).
MAX_STEM = 200
_PLAIN = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.+@,=")
HOW = ("created", "borrowed", "pending")  # what a domain's record says of each tap
FILE_MODE = 0o644
DIR_MODE = 0o755


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

    def new_claim(self, domain: str) -> str:
        """Where a claim is written whole before it is linked into place."""
        return os.path.join(self.state, f"{file_stem(domain)}.claim")

    def claim(self, tap: str) -> str:
        return os.path.join(self.claims, tap)


def file_stem(name: str) -> str:
    """``name`` as the start of a file name: one file per name, whatever libvirt allows.

    Letters, digits and ``-_.+@,=`` stay (so ordinary names keep their files); every
    other byte of the UTF-8 name, and a leading dot, becomes ``%XX``, which reads back.
    A stem longer than MAX_STEM keeps its first bytes and ends in ``~`` and the SHA-256
    of the whole name (``~`` is always escaped, so such a stem is never a short one).
    """
    raw = os.fsencode(name)  # argv's undecodable bytes come back as they were
    stem = "".join(
        chr(b) if b in _PLAIN and not (i == 0 and b == 0x2E) else f"%{b:02X}"
        for i, b in enumerate(raw)
    )
    if not raw:
        stem = "%"  # no byte escapes to a lone %
    if len(stem) > MAX_STEM:
        import hashlib  # only for names this long

        stem = f"{stem[: MAX_STEM - 65]}~{hashlib.sha256(raw).hexdigest()}"
    return stem


def read_held(places: Places, domain: str) -> dict[str, str]:
    """Tap → how ``domain`` holds it (one of HOW; empty: holds nothing).

    The file has one ``TAP created|borrowed|pending`` line per tap (not JSON: the json
    module's import is a good part of the cost libvirt waits for).
    """
    try:
        with open(places.held(domain)) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return {}
    except OSError as err:
        raise OperationFailed(f"hook state {places.held(domain)}: {err.strerror}") from None
    held = {}
    for line in lines:
        tap, _, how = line.partition(" ")
        if not tap or how not in HOW:
            raise OperationFailed(f"hook state {places.held(domain)} is damaged: {line!r}")
        held[tap] = how
    return held


def write_held(places: Places, domain: str, held: dict[str, str]) -> None:
    """Replace the record whole (the domain's lock is held: the temporary name is the
    domain's own)."""
    path = places.held(domain)
    if not held:
        files.remove(path)
        return
    text = "".join(f"{tap} {how}\n" for tap, how in sorted(held.items()))
    files.replace(path, text.encode(), FILE_MODE, temporary=f"{path}.tmp")


def write_result(places: Places, domain: str, text: str) -> None:
    """Replace the started check's result, RUN_DIR/DOMAIN.json, whole (its temporary name
    is the domain's own; release removes one a kill left)."""
    os.makedirs(places.run, mode=DIR_MODE, exist_ok=True)
    path = places.result(domain)
    files.replace(path, text.encode(), FILE_MODE, temporary=f"{path}.tmp")


def holder(places: Places, tap: str) -> bytes | None:
    """The name of the domain holding ``tap`` (None: no one)."""
    try:
        with open(places.claim(tap), "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def refuse_held(places: Places, tap: str, domain: str) -> None:
    """Raise OperationFailed when a domain other than ``domain`` holds ``tap``."""
    held_by = holder(places, tap)
    if held_by is not None and held_by != os.fsencode(domain):
        name = os.fsdecode(held_by)
        raise OperationFailed(f"tap {tap} is declared by domain {name!r} too, which holds it")


def claim(places: Places, tap: str, domain: str) -> bool:
    """Claim ``tap`` for ``domain``; False when it already was (a rerun). Raises when
    another domain holds it.

    The claim is written in full under the domain's own name and then linked into place
    (link fails if the name exists), so a claim is never seen empty or half written, even
    after a SIGKILL.
    """
    os.makedirs(places.claims, mode=DIR_MODE, exist_ok=True)
    new = places.new_claim(domain)
    files.write(new, os.fsencode(domain), FILE_MODE)
    try:
        os.link(new, places.claim(tap))
    except FileExistsError:
        if holder(places, tap) is None:
            return claim(places, tap, domain)  # released meanwhile
        refuse_held(places, tap, domain)
        return False
    finally:
        files.remove(new)
    return True
