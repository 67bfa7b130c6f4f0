"""`vhostorch check`, `doctor` and `trace arm|disarm|status`: proving vhost, and what it needs."""

from __future__ import annotations

import sys

from vhostorch.cli.argv import FLAG, INT, MAX_SECONDS, NEGATE, PATH, VALUE, Command, Option, Parsed
from vhostorch.cli.output import EXIT_CODES, JSON, STRICT, emit, report_text
from vhostorch.errors import EXIT_FAILED, EXIT_OK, InvalidSpec
from vhostorch.record import TYPE_CHECKING

if TYPE_CHECKING:
    from vhostorch.check.report import Report

CHECK_EXIT_CODES = """Each check is pass, warn, fail or unknown, with evidence (--json shows it).
A verdict vhostorch cannot prove is unknown, never pass.

exit codes:
  0  no check failed (with --strict: every check passed)
  1  a check failed (with --strict: or warned, or is unknown); with --rewire, also a VM
     that is not running (paused, migrating) or cannot be paused, refused untouched, and
     a VM left paused (vm.rewire fails and says how to resume it)
  2  the target could not be inspected (no such process or domain, permission, bad usage)"""
CHECK_OUTPUT_EXIT_CODES = (
    CHECK_EXIT_CODES
    + """, or
     --output refused or not written

With --output, the file is written whatever the verdicts (exit 0 or 1); on exit 2 it is
left as it was, and no temporary file is left beside it (a signal waits until the file is
renamed into place)."""
)

UNIT = "vhostorch-trace.service"
PID_MAX_LIMIT = 1 << 22  # include/linux/threads.h on 64-bit: no pid is larger
UNIT_DIR = Option("--unit-dir", PATH, "systemd's unit directory (default /etc/systemd/system)")

COMMANDS = (
    Command(
        ("check",),
        "prove, per NIC and per queue, that vhost is attached to running QEMUs",
        "",
        "0",
        (
            Option("--pid", INT, "the QEMU process to check", low=1, high=PID_MAX_LIMIT),
            Option("--domain", VALUE, "the libvirt domain to check (its XML says what was asked)"),
            Option("--connect", VALUE, "libvirt URI for --domain (default qemu:///system)"),
            Option("--qmp", PATH, "the QMP socket of a QEMU you run (also read for its status)"),
            Option("--all", FLAG, "every QEMU process on this host"),
            Option(
                "--monitor",
                FLAG,
                "with --domain: ask QEMU's monitor through libvirt (libvirt then marks the "
                "domain tainted: custom-monitor)",
            ),
            STRICT,
            Option(
                "--watch",
                INT,
                "re-check every N seconds and report what changes",
                low=1,
                high=MAX_SECONDS,
            ),
            Option(
                "--rewire",
                FLAG,
                "first arm the trace and pause and resume each VM (milliseconds: QMP stop/cont, "
                "libvirt suspend/resume for a domain) so QEMU wires kick and call again; a VM "
                "not running (paused, migrating) is refused, exit 1",
            ),
            Option(
                "--no-live",
                NEGATE,
                "do not read the kernel's present state (a BPF iterator): kick and call from "
                "the wiring trace only, as on a host where it cannot be read",
                "live",
            ),
            JSON,
            Option(
                "--format",
                VALUE,
                "table (default), json (as --json), prometheus (the classic text format, for "
                "node_exporter's textfile collector) or openmetrics (for OpenMetrics scrapers)",
            ),
            Option(
                "--output",
                PATH,
                "write the output (any format) to this file instead of stdout, atomically (a "
                "new file beside it, fsync'd, mode 0644, renamed over it): for node_exporter's "
                "textfile directory; refused when its directory is a symlink or others may "
                "write it without the sticky bit; not with --watch",
            ),
        ),
        CHECK_OUTPUT_EXIT_CODES,
    ),
    Command(
        ("trace", "arm"),
        "record the ioctls that wire vhost kicks and calls to KVM (needed by nic.kick/nic.call)",
        "",
        "0",
        (JSON,),
        EXIT_CODES,
    ),
    Command(
        ("trace", "disarm"), "stop recording and remove the probe", "", "0", (JSON,), EXIT_CODES
    ),
    Command(
        ("trace", "status"), "say whether the wiring trace is armed", "", "0", (JSON,), EXIT_CODES
    ),
    Command(
        ("trace", "install-unit"),
        "arm the trace at every boot, before libvirt starts VMs (systemd unit " + UNIT + ")",
        "",
        "0",
        (UNIT_DIR, JSON),
        EXIT_CODES,
    ),
    Command(
        ("trace", "uninstall-unit"),
        "remove that unit (the trace stays as it is)",
        "",
        "0",
        (UNIT_DIR, JSON),
        EXIT_CODES,
    ),
    Command(
        ("doctor",),
        "validate this host for vhost-net before any VM runs",
        "",
        "0",
        (STRICT, JSON),
        CHECK_EXIT_CODES,
    ),
)


def _reports(args: Parsed, with_rewire: bool = False) -> list[Report]:
    from vhostorch.check import rewire, targets

    target = targets.Target(
        pid=args.number("pid"),
        domain=args.text("domain"),
        qmp=args.text("qmp"),
        every=args.flag("all"),
        uri=args.text("connect"),
        ask_monitor=args.flag("monitor"),
        live=args.flag("live"),
    )
    if not with_rewire:
        return targets.reports(target)
    # Said at once, in case a signal held during the pause ends the command before its report.
    return rewire.reports(
        target, warn=lambda line: print(f"vhostorch: warning: {line}", file=sys.stderr, flush=True)
    )


FORMATS = ("table", "json", "openmetrics", "prometheus")
METRICS = ("openmetrics", "prometheus")  # check.metrics.FORMATS, without importing it


def _format(args: Parsed) -> str:
    chosen = args.text("format") if args.command.path == ("check",) else None
    if chosen is not None and chosen not in FORMATS:
        raise InvalidSpec(f"check: --format must be one of {', '.join(FORMATS)}, not {chosen!r}")
    if args.flag("json"):
        if chosen not in (None, "json"):
            raise InvalidSpec(f"check: --json and --format {chosen} contradict each other")
        return "json"
    return chosen or "table"


def _print_reports(
    reports: list[Report], args: Parsed, took: float = 0.0, output: Output | None = None
) -> bool:
    """Print ``reports`` (one JSON document, their tables, or their metrics), or write them
    to ``output``; return whether all are ok. ``took``: how long checking them took, in
    seconds (for the metrics)."""
    strict = args.flag("strict")
    ok = all(r.ok(strict) for r in reports)
    chosen = _format(args)
    if chosen in METRICS:
        from vhostorch.check import metrics

        text = metrics.render(reports, took, chosen)
    elif chosen == "json":
        import json

        if args.command.path == ("check",) and args.flag("all"):
            data: object = {"ok": ok, "reports": [r.to_json(strict) for r in reports]}
        else:
            data = reports[0].to_json(strict)
        text = json.dumps(data, indent=2) + "\n"  # as output.emit prints it
    else:
        texts = [report_text(r, strict) for r in reports]
        text = ("\n\n".join(texts) if texts else "no QEMU processes") + "\n"
    if output is None:
        sys.stdout.write(text)
    else:
        output.write(text)
    return ok


class Output:
    """Where `check --output PATH` puts its text: PATH's directory, opened (without following
    a symlink) and judged when the command starts, before anything is checked or paused; the
    text is renamed into place relative to that open directory, so a rename or symlink put
    on its path meanwhile cannot send the file elsewhere.

    It is meant for node_exporter's textfile directory, written by root: a directory that is
    a symlink, or that others may write without the sticky bit (they could rename the file,
    or plant what root then replaces), is refused. Only a regular file at PATH is replaced:
    anything else there (a device node: `--output /dev/null` replaced the system's /dev/null
    with a file; a symlink such as /dev/stdout; a FIFO, a socket) is refused, when the
    command starts and again just before the rename. Call ``close`` when done.
    """

    def __init__(self, path: str) -> None:
        import errno
        import os
        import stat

        self.path = path
        directory, self.name = os.path.split(path)
        if self.name in ("", ".", ".."):
            raise InvalidSpec(f"check: --output {path}: names a directory, not a file")
        directory = directory or "."
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            self.dir_fd = os.open(directory, flags)
        except OSError as err:
            # O_NOFOLLOW with O_DIRECTORY fails a symlink with ENOTDIR (ELOOP without it)
            if err.errno in (errno.ENOTDIR, errno.ELOOP) and os.path.islink(directory):
                why = "is a symlink; not writing through it"
            else:
                why = f"cannot be opened: {err.strerror}"
            raise InvalidSpec(f"check: --output {path}: its directory {directory} {why}") from err
        mode = os.fstat(self.dir_fd).st_mode
        if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
            self.close()
            raise InvalidSpec(
                f"check: --output {path}: its directory {directory} is writable by others "
                f"without the sticky bit (mode {stat.S_IMODE(mode):04o}); not writing there"
            )
        try:
            self._only_a_file()
        except InvalidSpec:
            self.close()
            raise

    def _only_a_file(self) -> None:
        """Refuse (InvalidSpec) when something other than a regular file is at the path."""
        import os
        import stat

        try:
            found = os.stat(self.name, dir_fd=self.dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        except OSError as err:
            why = err.strerror
            raise InvalidSpec(f"check: --output {self.path}: cannot look at it: {why}") from err
        if not stat.S_ISREG(found.st_mode):
            kinds = {stat.S_IFLNK: "a symlink", stat.S_IFDIR: "a directory",
                     stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
                     stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket"}  # fmt: skip
            kind = kinds.get(stat.S_IFMT(found.st_mode), "not a regular file")
            raise InvalidSpec(
                f"check: --output {self.path}: is {kind}, not a regular file; not replacing it"
            )

    def write(self, text: str) -> None:
        """Put ``text`` at the path, whole (files.replace: a temporary file beside it, fsync'd,
        mode 0644, renamed over it), the stopping signals held meanwhile so that none leaves
        the temporary file behind: they act once it is renamed (or removed on an error).
        Raises InvalidSpec (exit 2) when it cannot be written."""
        from vhostorch import files, signals

        data = text.encode(errors="surrogateescape")  # the bytes stdout would have had
        self._only_a_file()  # again: the check took seconds
        try:
            with signals.Held():
                files.replace(self.name, data, 0o644, durable=True, dir_fd=self.dir_fd)
        except OSError as err:
            why = err.strerror or str(err)
            raise InvalidSpec(f"check: --output {self.path}: cannot write it: {why}") from err

    def close(self) -> None:
        import os

        os.close(self.dir_fd)


def _check(args: Parsed) -> int:
    watch = args.number("watch")
    if watch is not None and (chosen := _format(args)) in METRICS:
        raise InvalidSpec(f"check: --watch prints changes, not metrics (--format {chosen})")
    path = args.text("output")
    if path is None:
        return _check_to(args, watch, None)
    if watch is not None:
        raise InvalidSpec(
            "check: --watch prints changes as they come, --output writes one report (run the "
            "check again, from a timer, to rewrite it)"
        )
    output = Output(path)
    try:
        return _check_to(args, watch, output)
    finally:
        output.close()


def _check_to(args: Parsed, watch: int | None, output: Output | None) -> int:
    import time

    begun = time.perf_counter()
    reports = _reports(args, with_rewire=args.flag("rewire"))  # only the first round pauses
    ok = _print_reports(reports, args, time.perf_counter() - begun, output)
    if watch is None:
        return EXIT_OK if ok else EXIT_FAILED

    def key(report: Report) -> dict[tuple[object, ...], str]:
        return {(report.pid, c.id, c.nic, c.queue): c.status for c in report.checks}

    seen = {k: v for r in reports for k, v in key(r).items()}
    while True:
        try:
            time.sleep(watch)
        except KeyboardInterrupt:
            return EXIT_OK if ok else EXIT_FAILED  # stopping a watch is not an error
        reports = _reports(args)
        ok = all(r.ok(args.flag("strict")) for r in reports)
        now = {k: v for r in reports for k, v in key(r).items()}
        stamp = time.strftime("%H:%M:%S")
        for k in sorted(set(seen) | set(now), key=str):
            if seen.get(k) != now.get(k):
                pid, cid, nic, queue = k
                where = f"pid {pid} {cid}" + (f" {nic}" if nic else "")
                where += f" queue {queue}" if queue is not None else ""
                print(f"{stamp} {where}: {seen.get(k, 'absent')} -> {now.get(k, 'gone')}",
                      flush=True)  # fmt: skip
        seen = now


def _doctor(args: Parsed) -> int:
    from vhostorch.host import doctor

    ok = _print_reports([doctor.doctor()], args)
    return EXIT_OK if ok else EXIT_FAILED


def _trace(args: Parsed) -> int:
    from vhostorch.check import wiring

    verb = args.command.path[1]
    if verb.endswith("install-unit"):
        return _unit(args, verb)
    if verb == "arm":
        changed = wiring.arm()
        text = "wiring trace armed" if changed else "wiring trace was already armed"
    elif verb == "disarm":
        wiring.disarm()
        changed, text = True, "wiring trace disarmed"
    else:
        changed = False
        text = "wiring trace is " + ("armed" if wiring.armed() else "not armed")
    emit({"ok": True, "armed": wiring.armed(), "changed": changed}, args.flag("json"), text)
    return EXIT_OK


def _unit(args: Parsed, verb: str) -> int:
    from vhostorch.host import bootunit

    given = args.text("unit_dir")
    unit_dir = bootunit.UNIT_DIR if given is None else given
    done = bootunit.install(unit_dir) if verb == "install-unit" else bootunit.uninstall(unit_dir)
    text = f"{done.path}: {done.action}" + (", enabled" if done.enabled else "")
    data = {"ok": True, "changed": done.action not in ("unchanged", "absent"), **done.asdict()}
    emit(data, args.flag("json"), text)
    return EXIT_OK


HANDLERS = {"check": _check, "doctor": _doctor, "trace": _trace}
