"""What the commands print: JSON or text, tables, check reports, and the help texts they share."""

from __future__ import annotations

from vhostorch.cli.argv import FLAG, Option
from vhostorch.record import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

    from vhostorch.check.report import Report
    from vhostorch.taps import TapResult

EXIT_CODES = """exit codes:
  0  done, or nothing to do
  1  the operation failed (the host refused it, or its state forbids it)
  2  bad usage or invalid input (nothing was touched)"""

JSON = Option("--json", FLAG, "print JSON")
STRICT = Option("--strict", FLAG, "warn and unknown fail too")
STATUSES = ("fail", "warn", "unknown", "pass")  # the summary's order


def emit(data: object, as_json: bool, text: str) -> None:
    """Print ``data`` as JSON, or else ``text`` (nothing when it is empty)."""
    if as_json:
        import json

        print(json.dumps(data, indent=2))
    elif text:
        print(text)


def results_text(results: Sequence[TapResult]) -> str:
    lines = []
    for r in results:
        detail = f" ({', '.join(r.changes)})" if r.changes else ""
        lines.append(f"{r.name}: {r.action}{detail}")
    return "\n".join(lines)


def shown(text: str) -> str:
    """``text`` with every character that is not printable (control characters, line breaks,
    bidi overrides) written as an escape: what a report shows comes from processes any user
    runs (a QEMU's -name, its netdev ids), and ESC sequences or a newline there reached root's
    terminal (set its title, cleared it, forged a line of the report)."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"
        for c in text
    )


def table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def report_text(report: Report, strict: bool) -> str:
    from vhostorch.check.report import DomainTarget, HostTarget, JudgedNic

    target = report.target
    if isinstance(target, HostTarget):
        title = f"host {target.host} (Linux {target.kernel})"
    elif isinstance(target, DomainTarget):
        title = f"domain {target.domain}"  # made by the hook, which prints no table
    else:
        title = f"QEMU pid {target.pid}"
        if target.domain:
            title += f", domain {target.domain} (type {target.domain_type})"
        elif target.name:
            title += f" ({target.name})"
    per_nic = any(c.nic for c in report.checks)
    rows = [
        ["CHECK", "NIC", "QUEUE", "STATUS", "MESSAGE"]
        if per_nic
        else ["CHECK", "STATUS", "MESSAGE"]
    ]
    for c in report.checks:
        queue = "-" if c.queue is None else str(c.queue)
        where = [c.nic or "-", queue] if per_nic else []
        rows.append([shown(cell) for cell in (c.id, *where, c.status, c.message)])
    counts = {s: sum(1 for c in report.checks if c.status == s) for s in STATUSES}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    verdict = "OK" if report.ok(strict) else "FAILED"
    why = [
        f"{nic.name}: vhost not used ({nic.reason.code}): {nic.reason.message}"
        for nic in report.nics
        if isinstance(nic, JudgedNic) and nic.reason is not None
    ]
    why += [
        f"NIC {nic.name}: not applicable: {nic.reason}"
        for nic in report.nics
        if not isinstance(nic, JudgedNic)
    ]
    reasons = "".join(f"\n{shown(line)}" for line in why)
    return f"{shown(title)}\n{table(rows)}{reasons}\n{verdict}: {summary}"
