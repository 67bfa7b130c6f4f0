"""Verdicts: one Check per (id, NIC, queue), and the Report that gathers them.

A check is ``pass`` only on evidence that was seen; what could not be seen is
``unknown`` with the reason, never a pass. The ids of a QEMU's checks, what each
says and the module that makes it are listed in ``check.ids``; they are stable
(scripts and the Ansible module match on them).
"""

from __future__ import annotations

from vhostorch.record import Record

PASS, WARN, FAIL, UNKNOWN = "pass", "warn", "fail", "unknown"
STATUSES = (PASS, WARN, FAIL, UNKNOWN)


class Check(Record):
    id: str
    nic: str | None
    queue: int | None
    status: str
    message: str
    evidence: dict[str, object]

    def __init__(
        self,
        id: str,
        status: str,
        message: str,
        evidence: dict[str, object] | None = None,
        *,
        nic: str | None = None,
        queue: int | None = None,
    ) -> None:
        assert status in STATUSES, status
        self._init(
            id=id, nic=nic, queue=queue, status=status, message=message, evidence=evidence or {}
        )


class Report(Record):
    """Everything checked for one target (a QEMU process, or the host for doctor)."""

    target: dict[str, object]
    nics: tuple[dict[str, object], ...]
    checks: tuple[Check, ...]

    def ok(self, strict: bool = False) -> bool:
        bad = (FAIL, WARN, UNKNOWN) if strict else (FAIL,)
        return not any(c.status in bad for c in self.checks)

    def to_json(self, strict: bool = False) -> dict[str, object]:
        """The stable JSON shape: ok, target, nics, checks[{id, nic, queue, status, ...}]."""
        return {
            "ok": self.ok(strict),
            "target": self.target,
            "nics": list(self.nics),
            "checks": [c.asdict() for c in self.checks],
        }
