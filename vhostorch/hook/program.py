"""The libvirt qemu hook: declared taps follow the domain's life, vhost is checked at start.

libvirt runs its hooks as ``qemu DOMAIN OPERATION SUB-OPERATION EXTRA`` with the
domain's XML on stdin, waits for them, and refuses the operation when one exits
non-zero (its stderr becomes the error). A hook must never call back into libvirt
(that deadlocks), so everything here comes from the XML, the host and /proc.

    prepare begin   create the taps the domain's <vhostorch:vm> metadata declares,
                    all or nothing; a tap of that name vhostorch did not create, or
                    one another domain holds, is refused
    started begin   check the domain's QEMU (vCPUs run; the guest driver is not up
                    yet, so kick/call wiring is reported as not yet wired or unknown);
                    the result goes to /run/vhostorch/DOMAIN.json and a summary to
                    syslog; with verify="enforce" a failed check fails the hook, and
                    libvirt stops the domain
    release end     delete the taps this hook created for the domain (and its
                    check result), nothing else
    anything else   exit 0 at once and print nothing (for migrate and restore,
                    printing would replace the domain XML)

What the hook holds is kept under /run/vhostorch/hook: DOMAIN.taps (the taps, and
whether the hook created each) under a per-domain lock, and one claim file per
tap, made with O_EXCL, so two domains declaring one tap cannot both have it.
"""

from __future__ import annotations

import os
import sys

from vhostorch import taps
from vhostorch.errors import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    InvalidSpec,
    NotManaged,
    OperationFailed,
    VhostorchError,
)
from vhostorch.hook import metadata
from vhostorch.libvirt import domxml, qemuconf
from vhostorch.lockfile import Lock
from vhostorch.record import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import BinaryIO, TextIO

    from vhostorch.check.report import Report
    from vhostorch.libvirt.domxml import Domain

RUN_DIR = "/run/vhostorch"
SYSLOG = "/dev/log"
MAX_XML = 64 << 20  # a domain XML is kilobytes; this only bounds a runaway writer
EXIT_CODES = """exit codes (libvirt refuses the operation on any non-zero one):
  0  done, or nothing to do (no vhostorch metadata, or an operation the hook ignores)
  1  refused: a tap could not be made (prepare), or the check failed with
     verify="enforce" (started), or a tap could not be deleted (release)
  2  bad input: arguments, domain XML or vhostorch metadata (nothing was touched)"""


class Places:
    """Where the hook keeps its files and sends its syslog line (tests point them elsewhere)."""

    def __init__(self, run_dir: str = RUN_DIR, syslog: str = SYSLOG) -> None:
        self.run = run_dir
        self.syslog = syslog
        self.state = os.path.join(run_dir, "hook")
        self.claims = os.path.join(self.state, "taps")

    def result(self, domain: str) -> str:
        return os.path.join(self.run, f"{domain}.json")

    def held(self, domain: str) -> str:
        return os.path.join(self.state, f"{domain}.taps")

    def lock(self, domain: str) -> str:
        return os.path.join(self.state, f"{domain}.lock")

    def claim(self, tap: str) -> str:
        return os.path.join(self.claims, tap)


def check_domain_name(name: str) -> str:
    """A domain name usable in a file name (libvirt forbids '/' in names too)."""
    if (
        not name
        or name in (".", "..")
        or "/" in name
        or "\0" in name
        or len(name.encode()) > 200
        or not name.isprintable()
    ):
        raise InvalidSpec(f"domain name {name!r} is not one libvirt allows")
    return name


def qemu_user(conf: str = qemuconf.PATH) -> str | None:
    """The user libvirt runs QEMU as: qemu.conf's ``user``, else the distribution default."""
    try:
        settings = qemuconf.read(conf) or {}
    except OSError:
        settings = {}
    return qemuconf.qemu_user(settings)


# --- what the hook holds ----------------------------------------------------------


def _read_held(places: Places, domain: str) -> dict[str, bool]:
    """Tap → whether this hook created it, for ``domain`` (empty: holds nothing).

    The file has one ``TAP created|borrowed`` line per tap (not JSON: the json
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
        if not tap or how not in ("created", "borrowed"):
            raise OperationFailed(f"hook state {places.held(domain)} is damaged: {line!r}")
        held[tap] = how == "created"
    return held


def _write_held(places: Places, domain: str, held: dict[str, bool]) -> None:
    path = places.held(domain)
    if not held:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.writelines(f"{t} {'created' if c else 'borrowed'}\n" for t, c in sorted(held.items()))
    os.rename(tmp, path)


def _claim(places: Places, tap: str, domain: str) -> bool:
    """Claim ``tap`` for ``domain``; False when it already was (a rerun). Raises when
    another domain holds it."""
    os.makedirs(places.claims, mode=0o755, exist_ok=True)
    path = places.claim(tap)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        try:
            with open(path) as f:
                holder = f.read()
        except FileNotFoundError:
            return _claim(places, tap, domain)  # released meanwhile
        if holder == domain:
            return False
        raise OperationFailed(
            f"tap {tap} is declared by domain {holder!r} too, which holds it"
        ) from None
    with os.fdopen(fd, "w") as f:
        f.write(domain)
    return True


def _unclaim(places: Places, tap: str, domain: str) -> None:
    try:
        with open(places.claim(tap)) as f:
            if f.read() != domain:
                return
        os.unlink(places.claim(tap))
    except FileNotFoundError:
        pass


# --- operations ---------------------------------------------------------------------


def prepare(declared: metadata.Declared, places: Places) -> list[str]:
    """Create the declared taps, all or nothing; return the names created now."""
    domain = declared.domain
    specs = [t.spec for t in declared.taps]
    with Lock(places.lock(domain), places.held(domain)):
        held = _read_held(places, domain)
        claimed: list[str] = []
        try:
            for spec in specs:
                if spec.name not in held and _claim(places, spec.name, domain):
                    claimed.append(spec.name)
            results = taps.ensure(specs, keep_existing=True, adopt_foreign=False) if specs else []
            created = [r.name for r in results if r.action == "created"]
            for r in results:
                held[r.name] = held.get(r.name, False) or r.name in created
            _write_held(places, domain, held)
        except BaseException:
            for tap in claimed:
                _unclaim(places, tap, domain)
            raise
    return created


def release(domain: str, places: Places) -> list[str]:
    """Delete the taps this hook created for ``domain``; give back what it borrowed.

    Returns the taps deleted. A tap that cannot be deleted (held open, or no longer
    vhostorch's) stays recorded, and the error names it.
    """
    deleted: list[str] = []
    errors: list[str] = []
    with Lock(places.lock(domain), places.held(domain)):
        held = _read_held(places, domain)
        for tap, created in sorted(held.items()):
            if created:
                try:
                    result = taps.delete([tap])
                except NotManaged:
                    pass  # replaced by a device vhostorch did not make: not ours to delete
                except OperationFailed as err:
                    errors.append(str(err))
                    continue
                else:
                    if result and result[0].action == "deleted":
                        deleted.append(tap)
            _unclaim(places, tap, domain)
            del held[tap]
        _write_held(places, domain, held)
        try:
            os.unlink(places.result(domain))  # the started check of a domain now gone
        except FileNotFoundError:
            pass
    if errors:
        raise OperationFailed("; ".join(errors))
    return deleted


def started(
    declared: metadata.Declared, domain: Domain, places: Places
) -> tuple[Report, list[str]]:
    """Check the domain's QEMU; write the result; return it and the enforced failures."""
    from vhostorch.check import observe as inspect
    from vhostorch.check import verify
    from vhostorch.check.ids import VM_INSPECT
    from vhostorch.check.report import FAIL, UNKNOWN, Check, Report
    from vhostorch.kernel import procfs

    try:
        pid = inspect.domain_pid(declared.domain)
        report = verify.verify(inspect.observe(pid, domain=domain))
    except procfs.CannotInspect as err:
        # Nothing proved: every verdict is unknown. Enforcing means proving, so it fails.
        unknown = Check(VM_INSPECT, UNKNOWN, f"unknown: {err}")
        report = Report({"domain": declared.domain}, (), (unknown,))
        if declared.enforce:
            return report, _record(declared, report, [f"cannot check: {err}"], places)
        return report, _record(declared, report, [], places)
    taps_of = {str(n["name"]): n.get("tap") for n in report.nics}
    enforced = []
    for c in report.checks:
        if c.status != FAIL:
            continue
        if c.nic is None:
            applies = declared.enforce  # host- or VM-wide: it fails every NIC
        else:
            tap = taps_of.get(c.nic)
            applies = declared.policy(tap if isinstance(tap, str) else None) == "enforce"
        if applies:
            where = f" {c.nic}" + (f" queue {c.queue}" if c.queue is not None else "")
            enforced.append(f"{c.id}{where if c.nic else ''}: {c.message}")
    return report, _record(declared, report, enforced, places)


def _record(
    declared: metadata.Declared, report: Report, enforced: list[str], places: Places
) -> list[str]:
    """Write the started check's result to RUN_DIR/DOMAIN.json; return ``enforced``."""
    import json
    import time

    result = {
        "domain": declared.domain,
        "hook": "started",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "policy": {"vm": declared.verify, "taps": {t.spec.name: t.verify for t in declared.taps}},
        "enforced_failures": enforced,
        "note": (
            "checked when libvirt started the vCPUs: the guest driver has not started vhost "
            "yet, so kick/call are not wired yet (vhostorch check --domain tells later)"
        ),
        "check": report.to_json(),
    }
    os.makedirs(places.run, mode=0o755, exist_ok=True)
    tmp = places.result(declared.domain) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.rename(tmp, places.result(declared.domain))
    return enforced


def summary(domain: str, report: Report, enforced: list[str]) -> str:
    counts: dict[str, int] = {}
    for c in report.checks:
        counts[c.status] = counts.get(c.status, 0) + 1
    text = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    line = f"domain {domain}: vhost check {text}"
    if enforced:
        line += f"; enforced: {enforced[0]}"
    else:
        failed = [c for c in report.checks if c.status == "fail"]
        if failed:
            line += f"; {failed[0].id}: {failed[0].message}"
    return line


def _syslog(message: str, warning: bool, path: str = SYSLOG) -> None:
    """One RFC 3164 line to the local syslog socket (facility daemon); none there: skip."""
    import socket

    priority = 3 * 8 + (4 if warning else 6)  # daemon.warning / daemon.info
    line = f"<{priority}>vhostorch-hook[{os.getpid()}]: {message}"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(path)
            s.send(line.encode(errors="replace")[:4000])
    except OSError:
        pass  # no syslog here; the JSON result is the record


# --- the program --------------------------------------------------------------------


def _xml(stdin: BinaryIO) -> str:
    data = stdin.read(MAX_XML + 1)
    if len(data) > MAX_XML:
        raise InvalidSpec("the domain XML on stdin is larger than 64 MiB")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise InvalidSpec("the domain XML on stdin is not UTF-8") from None


def run_hook(argv: list[str], stdin: BinaryIO, stderr: TextIO, places: Places | None = None) -> int:
    """Run one hook call: ``argv`` is DOMAIN OPERATION SUB-OPERATION EXTRA."""
    places = places or Places()
    try:
        if len(argv) < 3:
            raise InvalidSpec("usage: qemu DOMAIN OPERATION SUB-OPERATION [EXTRA]")
        name, op, sub = argv[0], argv[1], argv[2]
        job = {("prepare", "begin"), ("started", "begin"), ("release", "end")}
        if (op, sub) not in job:
            return EXIT_OK
        check_domain_name(name)
        if op == "release":
            release(name, places)
            return EXIT_OK
        root = domxml.root(_xml(stdin))
        declared = metadata.declared(root, default_owner=qemu_user())
        if declared.domain != name:
            raise InvalidSpec(f"the XML on stdin is domain {declared.domain!r}, not {name!r}")
        if declared.verify is None:
            return EXIT_OK
        if op == "prepare":
            prepare(declared, places)
            return EXIT_OK
        report, enforced = started(declared, domxml.domain(root), places)
        _syslog(summary(name, report, enforced), bool(enforced) or not report.ok(False),
                places.syslog)  # fmt: skip
        if enforced:
            raise OperationFailed(
                f"domain {name}: vhost check failed (verify=enforce): {enforced[0]}"
                + (f" (and {len(enforced) - 1} more)" if len(enforced) > 1 else "")
            )
        return EXIT_OK
    except (Exception, KeyboardInterrupt) as err:  # libvirt must not be left a traceback
        return _fail(stderr, err)


def _fail(stderr: TextIO, err: Exception | KeyboardInterrupt) -> int:
    """The hook's one mapping of an exception to its stderr line and exit code: bad input
    is 2, anything else 1 (libvirt refuses the operation on either)."""
    if isinstance(err, VhostorchError):
        message = str(err)
        code = err.exit_code if err.exit_code in (EXIT_FAILED, EXIT_USAGE) else EXIT_FAILED
    elif isinstance(err, KeyboardInterrupt):
        message, code = "interrupted", EXIT_FAILED
    else:
        message, code = f"internal error: {type(err).__name__}: {err}", EXIT_FAILED
    print(f"vhostorch hook: {' '.join(message.split())}", file=stderr)
    return code


def main() -> int:
    """Entry point of the installed hook program."""
    return run_hook(sys.argv[1:], sys.stdin.buffer, sys.stderr)
