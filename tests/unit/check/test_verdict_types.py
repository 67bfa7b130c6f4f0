"""Verdicts are decided by their types, never by their words.

A check's ``cause`` (a code) is what code reads: check.reasons finds a relayed interrupt,
orchestrate.settle a masked vector and check.rewire a VM it did not pause by it, whatever
the message says; no module compares a message, or a check id spelt as a literal instead
of check.ids. The records of a report render the documented JSON (test_verdict_golden
proves it byte for byte against outputs captured before they were records).
"""

from __future__ import annotations

import ast
import pathlib
import re

from tests.support import observations
from vhostorch.check import reasons, verify, vrings
from vhostorch.check.ids import CALL
from vhostorch.check.report import (
    MASKED,
    RELAYED_INTERRUPT,
    Check,
    Managed,
    QemuTarget,
    Report,
)

PACKAGE = pathlib.Path(__file__).parents[3] / "vhostorch"
CHECK_ID = re.compile(r"(host|vm|nic)\.[a-z][a-z.-]*")


def relayed(tmp_path: pathlib.Path, masked: bool = False) -> tuple[object, object, list[Check]]:
    """A recorded healthy QEMU whose call eventfds are no KVM irqfd (``masked``: QEMU's
    masked notifier), with the in-kernel irqchip on: the guest did not enable MSI-X."""
    obs = observations.observed("healthy-1q", tmp_path)
    assert obs.wiring is not None
    unwired = tuple(v.replace(irqfd=None, masked=masked) for v in obs.wiring.vrings)
    obs = obs.replace(wiring=obs.wiring.replace(vrings=unwired))
    nic = observations.nic_named(obs, "net0")
    return obs, nic, verify.nic_checks(obs, nic)


def test_a_relayed_interrupt_is_known_by_its_cause_not_its_words(tmp_path: pathlib.Path) -> None:
    obs, nic, checks = relayed(tmp_path)
    calls = [c for c in checks if c.id == CALL]
    assert calls and all(c.cause == RELAYED_INTERRUPT for c in calls)
    why = reasons.reason(obs, nic, checks)  # type: ignore[arg-type]
    assert why is not None and why.code == reasons.NO_MSIX
    assert why.evidence["queues"] == [c.queue for c in calls]
    # Reworded, the same verdicts give the same reason; the words alone give none.
    reworded = [c.replace(message="QEMU relays it") if c.id == CALL else c for c in checks]
    assert reasons.reason(obs, nic, reworded) == why  # type: ignore[arg-type]
    wordy = [c.replace(cause=None) if c.id == CALL else c for c in checks]
    assert reasons.reason(obs, nic, wordy) is None  # type: ignore[arg-type]


def test_a_masked_vector_is_its_cause(tmp_path: pathlib.Path) -> None:
    obs, nic, checks = relayed(tmp_path, masked=True)
    calls = [c for c in checks if c.id == CALL]
    assert calls and all(c.cause == MASKED and c.status == "warn" for c in calls)
    assert reasons.reason(obs, nic, checks) is None  # type: ignore[arg-type]
    assert vrings.call(obs, nic, 0) == calls[0]  # type: ignore[arg-type]


def test_the_cause_is_not_in_the_json() -> None:
    check = Check(CALL, "warn", "m", {"masked": True}, nic="net0", queue=1, cause=MASKED)
    assert check.asdict() == {"id": CALL, "nic": "net0", "queue": 1, "status": "warn",
                              "message": "m", "evidence": {"masked": True}}  # fmt: skip


def test_a_qemu_targets_json_names_only_what_is_known() -> None:
    assert QemuTarget(7, None).asdict() == {"pid": 7, "name": None}
    full = QemuTarget(7, "g", "T (stopped)", Managed("vm1", "qmp"), "d1", "kvm")
    assert full.asdict() == {"pid": 7, "name": "g", "stopped": "T (stopped)",
                             "vhostorch": {"vm": "vm1", "backend": "qmp"}, "domain": "d1",
                             "domain_type": "kvm"}  # fmt: skip
    report = Report(full, (), ())
    assert report.pid == 7 and report.to_json()["target"] == full.asdict()


def _decisions(tree: ast.AST) -> list[tuple[int, str]]:
    """Comparisons that read a message, or name a check id by a literal."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        sides += [e for s in sides if isinstance(s, ast.Tuple | ast.List | ast.Set) for e in s.elts]
        for side in sides:
            if isinstance(side, ast.Attribute) and side.attr == "message":
                found.append((node.lineno, "compares a message"))
            text = side.value if isinstance(side, ast.Constant) else None
            if isinstance(text, str) and CHECK_ID.fullmatch(text):
                found.append((node.lineno, f"compares the literal id {text!r}"))
    return found


def test_no_verdict_is_decided_by_words_or_literal_ids() -> None:
    bad = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: {what}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for line, what in _decisions(ast.parse(path.read_text()))
    ]
    assert bad == []


def test_the_scan_sees_both_kinds() -> None:
    source = 'a = c.id == "nic.call"\nb = "not a KVM irqfd" in c.message\nc = x in ("vm.kvm",)\n'
    assert [line for line, _ in _decisions(ast.parse(source))] == [1, 2, 3]


MISTYPED = """
from vhostorch.check.report import Check, Report, QemuTarget
from vhostorch.orchestrate.decision import Host, decide
from vhostorch.vm.spec import NicSpec, VmSpec

Check("vm.kvm", "passed", "m")
Check("nic.call", "fail", "m", cause="relayed")
Host(("ok", "m"), ("pass", "m"))
decide([], "kvn", "qmp", Host(("pass", "m"), ("pass", "m")))
Report({"pid": 1}, (), ())


def mode(nic: NicSpec, vm: VmSpec) -> bool:
    return nic.vhost == "require" or vm.accel == "hvf"
"""


def test_mypy_strict_refuses_a_status_cause_mode_or_accel_that_does_not_exist(
    tmp_path: pathlib.Path,
) -> None:
    import subprocess
    import sys

    source = tmp_path / "mistyped.py"
    source.write_text(MISTYPED)
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(source)],
        capture_output=True, text=True, cwd=PACKAGE.parent, check=False,
    )  # fmt: skip
    lines = {int(line.split(":")[1]) for line in done.stdout.splitlines() if ": error:" in line}
    assert lines == {6, 7, 8, 9, 10, 14}, done.stdout
