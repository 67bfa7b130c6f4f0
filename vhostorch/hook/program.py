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

What the hook holds is kept under /run/vhostorch/hook (hook.state): DOMAIN.taps, the
domain's record (each tap and whether the hook created it, borrowed it, or is about to
create it), under a per-domain lock, and one claim file per tap, so two domains declaring
one tap cannot both have it.

A crash must never leave a tap that blocks later starts. The record names a tap
("pending") before its claim or the tap itself exists, with the tag its alias will carry
(taps.mark, set before the tap can outlive the hook), and a tap is only made while its
claim is held; so whatever a SIGKILL leaves, the record says what it is, and release (or
the domain's next prepare) deletes exactly the recorded taps whose claim the domain holds
and that carry its mark: a device someone else made under that name meanwhile is left
alone. SIGTERM, SIGHUP and SIGINT roll prepare back at once.
"""

from __future__ import annotations

import os
import sys

from vhostorch import claims, files, signals, taps
from vhostorch.errors import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    Interrupted,
    InvalidSpec,
    NotManaged,
    OperationFailed,
    VhostorchError,
)
from vhostorch.hook import metadata, state
from vhostorch.hook.state import SYSLOG, Places
from vhostorch.libvirt import domxml, qemuconf
from vhostorch.record import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import BinaryIO, TextIO

    from vhostorch.check.report import Report
    from vhostorch.libvirt.domxml import Domain

# A domain XML is kilobytes (a <description> can make it more); libvirt's RPC carries at
# most 4 MiB of it (REMOTE_STRING_MAX), so anything past this is not from libvirt.
MAX_XML = 16 << 20
EXIT_CODES = """exit codes (libvirt refuses the operation on any non-zero one):
  0  done, or nothing to do (no vhostorch metadata, or an operation the hook ignores)
  1  refused: a tap could not be made (prepare), or the check failed with
     verify="enforce" (started), or a tap could not be deleted (release)
  2  bad input: arguments, domain XML or vhostorch metadata (nothing was touched)"""


def qemu_user(conf: str = qemuconf.PATH) -> str | None:
    """The user libvirt runs QEMU as: qemu.conf's ``user``, else the distribution default."""
    try:
        settings = qemuconf.read(conf) or {}
    except OSError:
        settings = {}
    return qemuconf.qemu_user(settings)


# --- operations ---------------------------------------------------------------------


def prepare(declared: metadata.Declared, places: Places) -> list[str]:
    """Create the declared taps, all or nothing; return the names created now.

    Before any claim or tap is made the record says what is to come: each new tap as
    "pending" (to be created) or "borrowed" (vhostorch made it before), so a prepare cut
    short by anything, SIGKILL included, leaves only what release can take back by record.
    """
    domain = declared.domain
    specs = [t.spec for t in declared.taps]
    with state.domain_lock(places, domain):
        held, tag = state.read_held(places, domain)
        left = [tap for tap, how in held.items() if how == "pending"]
        if left:  # a prepare that was killed: take back what it left first
            _take_back(places, domain, held, left, tag)
            state.write_held(places, domain, held, tag)
        if tag is None and not held:  # a record from before tags keeps vhostorch's plain alias
            tag = taps.new_tag()
        alias = taps.MANAGED_ALIAS if tag is None else taps.mark(tag)
        new = [spec.name for spec in specs if spec.name not in held]
        for tap in new:
            state.refuse_held(places, tap, domain)
        # Plans and refuses without changing anything: which new taps exist already.
        planned = (
            taps.ensure(specs, keep_existing=True, adopt_foreign=False, dry_run=True) if new else []
        )
        for r in planned:
            if r.name in new:
                held[r.name] = "pending" if r.action == "created" else "borrowed"
        if new:
            state.write_held(places, domain, held, tag)
        try:
            for tap in new:
                state.claim(places, tap, domain)
            # A signal now waits until ensure is done, so that its own rollback (of a bridge
            # port, an MTU: what the mark does not undo) is never cut short.
            with signals.Held():
                results = (
                    taps.ensure(specs, keep_existing=True, adopt_foreign=False, alias=alias)
                    if specs
                    else []
                )
            created = [r.name for r in results if r.action == "created"]
            for r in results:
                if held.get(r.name) == "pending":
                    held[r.name] = "created" if r.action == "created" else "borrowed"
            state.write_held(places, domain, held, tag)
        except BaseException:
            claims.forget(domain, places.claims)
            _take_back(places, domain, held, new, tag)
            state.write_held(places, domain, held, tag)
            raise
    return created


def _take_back(
    places: Places, domain: str, held: dict[str, str], names: list[str], tag: str | None
) -> list[str]:
    """Delete the taps of ``names`` that ``domain``'s record says it created or was about to
    create, while it holds their claim and they carry its mark (``tag``; a record from
    before tags: vhostorch's plain alias); give back the claims; drop them from ``held``.

    A tap is only made while its claim is held, and the claim goes only after the tap:
    without the claim, the tap is gone or is not this domain's; without the mark, it is a
    device someone made under that name since, and is left alone. Returns the errors of
    the taps that could not be deleted (they stay in ``held``).
    """
    errors = []
    mine = domain
    alias = taps.MANAGED_ALIAS if tag is None else taps.mark(tag)
    made = [t for t in names if held.get(t) == "created" and state.holder(places, t) == mine]
    if len(made) > 1:
        try:  # one batch, one RCU grace period for all (issue 14); all or nothing
            taps.delete(made, marks=dict.fromkeys(made, alias))
        except OperationFailed:
            pass  # refused whole, nothing deleted: tap by tap below, each with its own error
    for tap in names:
        ours = state.holder(places, tap) == mine
        if ours and held.get(tap) in ("created", "pending"):
            try:
                taps.delete([tap], marks={tap: alias})  # "replaced": not ours, left alone
            except NotManaged:
                pass  # changed into a device vhostorch did not make while being deleted
            except OperationFailed as err:
                errors.append(str(err))
                continue
        if ours:
            files.remove(places.claim(tap))
        held.pop(tap, None)
    return errors


def release(domain: str, places: Places) -> None:
    """Delete the taps this hook created for ``domain`` (or was creating when it was cut
    short); give back what it borrowed.

    A tap that cannot be deleted (held open) stays recorded, and the error names it.
    """
    # What a kill or a signal can leave besides the record: the started check, and the
    # temporary names of the record, the check and a claim.
    left = (places.result(domain), places.result(domain) + ".tmp",
            places.held(domain) + ".tmp", claims.scratch(domain, places.claims))  # fmt: skip
    if not any(os.path.lexists(p) for p in (places.held(domain), places.lock(domain), *left)):
        return  # nothing of this domain's: most domains, and every one without metadata
    with state.domain_lock(places, domain):
        held, tag = state.read_held(places, domain)
        errors = _take_back(places, domain, held, sorted(held), tag)
        state.write_held(places, domain, held, tag)
        for path in left:
            files.remove(path)  # the started check of a domain now gone; what a kill left
    if errors:
        raise OperationFailed("; ".join(errors))


def started(
    declared: metadata.Declared, domain: Domain, places: Places
) -> tuple[Report, list[str]]:
    """Check the domain's QEMU; write the result; return it and the enforced failures."""
    from vhostorch.check import observe, verify
    from vhostorch.check.ids import VM_INSPECT
    from vhostorch.check.report import FAIL, UNKNOWN, Check, DomainTarget, JudgedNic, Report
    from vhostorch.kernel import procfs

    unpinned: list[str] | None = None  # why the pin failed; None: not tried
    try:
        pid = observe.domain_pid(declared.domain)
        if declared.worker_cpus is not None:
            unpinned = _pin(pid, declared)
        report = verify.verify(observe.observe(pid, domain=domain))
    except procfs.CannotInspect as err:
        # Nothing proved: every verdict is unknown. Enforcing means proving, so it fails.
        unknown = Check(VM_INSPECT, UNKNOWN, f"unknown: {err}")
        report = Report(DomainTarget(declared.domain), (), (unknown,))
        if declared.enforce:
            return report, _record(declared, report, [f"cannot check: {err}"], places)
        return report, _record(declared, report, [], places)
    taps_of = {n.name: n.tap for n in report.nics if isinstance(n, JudgedNic)}
    enforced = [f"worker-cpus: {e}" for e in unpinned or []] if declared.enforce else []
    for c in report.checks:
        if c.status != FAIL:
            continue
        if c.nic is None:
            applies = declared.enforce  # host- or VM-wide: it fails every NIC
        else:
            tap = taps_of.get(c.nic)
            applies = declared.policy(tap) == "enforce"
        if applies:
            where = f" {c.nic}" + (f" queue {c.queue}" if c.queue is not None else "")
            enforced.append(f"{c.id}{where if c.nic else ''}: {c.message}")
    return report, _record(declared, report, enforced, places, unpinned)


def _pin(pid: int, declared: metadata.Declared) -> list[str]:
    """Pin the domain's vhost-net workers to its ``worker-cpus``; why it could not be done
    (the check then says where they run: nic.vhost.placement)."""
    from vhostorch.errors import InvalidSpec, OperationFailed
    from vhostorch.kernel.cpus import parse_list
    from vhostorch.orchestrate import pinning

    assert declared.worker_cpus is not None
    try:
        pinning.apply(
            pid,
            parse_list(declared.worker_cpus),
            "domain metadata",
            declared.domain,
            what="worker-cpus",
        )
    except (InvalidSpec, OperationFailed) as err:
        return [str(err)]
    return []


def _record(
    declared: metadata.Declared,
    report: Report,
    enforced: list[str],
    places: Places,
    unpinned: list[str] | None = None,
) -> list[str]:
    """Write the started check's result (``places.result``); return ``enforced``."""
    import json
    import time

    result = {
        "domain": declared.domain,
        "hook": "started",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "policy": {"vm": declared.verify, "taps": {t.spec.name: t.verify for t in declared.taps}},
        "enforced_failures": enforced,
        "worker_cpus": None
        if declared.worker_cpus is None
        else {
            "cpus": declared.worker_cpus,
            "pinned": unpinned == [],
            "errors": unpinned or [],
        },
        "note": (
            "checked when libvirt started the vCPUs: the guest driver has not started vhost "
            "yet, so kick/call are not wired yet (vhostorch check --domain tells later)"
        ),
        "check": report.to_json(),
    }
    state.write_result(places, declared.domain, json.dumps(result, indent=1))
    return enforced


def summary(domain: str, report: Report, enforced: list[str]) -> str:
    from vhostorch.check.report import FAIL  # loaded already: the report is made

    counts: dict[str, int] = {}
    for c in report.checks:
        counts[c.status] = counts.get(c.status, 0) + 1
    text = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    line = f"domain {domain}: vhost check {text}"
    if enforced:
        line += f"; enforced: {enforced[0]}"
    else:
        failed = [c for c in report.checks if c.status == FAIL]
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


def _xml(stdin: BinaryIO | None) -> str:
    if stdin is None:
        raise InvalidSpec("no domain XML: stdin is closed")
    try:
        data = stdin.read(MAX_XML + 1)
    except OSError as err:
        raise InvalidSpec(f"cannot read the domain XML on stdin: {err.strerror}") from None
    if len(data) > MAX_XML:
        raise InvalidSpec(f"the domain XML on stdin is larger than {MAX_XML >> 20} MiB")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise InvalidSpec("the domain XML on stdin is not UTF-8") from None


JOBS = {("prepare", "begin"), ("started", "begin"), ("release", "end")}


def run_hook(
    argv: list[str], stdin: BinaryIO | None, stderr: TextIO | None, places: Places | None = None
) -> int:
    """Run one hook call: ``argv`` is DOMAIN OPERATION SUB-OPERATION EXTRA; ``stdin`` None
    when it is closed. Returns the exit code, having written at most one line to ``stderr``."""
    places = places or Places()
    try:
        if len(argv) < 3:
            raise InvalidSpec("usage: qemu DOMAIN OPERATION SUB-OPERATION [EXTRA]")
        name, op, sub = argv[0], argv[1], argv[2]
        if (op, sub) not in JOBS:
            return EXIT_OK
        if op == "release":
            release(name, places)
            return EXIT_OK
        root = domxml.root(_xml(stdin))
        if root.find(f"metadata/{{{metadata.NAMESPACE}}}vm") is None:
            return EXIT_OK  # not vhostorch's domain, whatever its name
        declared = metadata.declared(root, default_owner=qemu_user())
        if declared.domain != name:
            raise InvalidSpec(f"the XML on stdin is domain {declared.domain!r}, not {name!r}")
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


def _fail(stderr: TextIO | None, err: Exception | KeyboardInterrupt) -> int:
    """The hook's one mapping of an exception to its stderr line and exit code: bad input
    is 2, anything else 1 (libvirt refuses the operation on either)."""
    if isinstance(err, VhostorchError):
        message = str(err)
        code = err.exit_code if err.exit_code in (EXIT_FAILED, EXIT_USAGE) else EXIT_FAILED
    elif isinstance(err, Interrupted):
        message, code = f"interrupted by {err}; what this call had made is undone", EXIT_FAILED
    elif isinstance(err, KeyboardInterrupt):
        message, code = "interrupted", EXIT_FAILED
    else:
        message, code = f"internal error: {type(err).__name__}: {err}", EXIT_FAILED
    if stderr is not None:  # None: fd 2 is closed, and libvirt reads nothing
        try:
            print(f"vhostorch hook: {' '.join(message.split())}", file=stderr, flush=True)
        except (OSError, ValueError):
            pass  # stderr is gone: the exit code still says it
    return code


def main() -> int:
    """Entry point of the installed hook program."""
    try:
        with signals.RollBack():
            stdin = sys.stdin.buffer if sys.stdin is not None else None
            return run_hook(sys.argv[1:], stdin, sys.stderr)
    finally:
        signals.ignore()  # done: a late signal must not turn into a traceback on the way out
