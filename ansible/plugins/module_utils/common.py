# Copyright: vhostorch developers
# Apache-2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""What the vhostorch modules share: the library on the managed host, and its errors."""

from __future__ import annotations

import traceback
from contextlib import contextmanager

from ansible.module_utils.basic import missing_required_lib

# The library release this collection drives (galaxy.yml's version): the modules import its
# modules by path, and 0.2 moved them into packages by area.
LIBRARY = (0, 2)

try:
    import vhostorch  # the library the modules drive, on the managed host
except ImportError:
    IMPORT_ERROR: str | None = traceback.format_exc()
    FOUND: str | None = None
else:
    IMPORT_ERROR = None
    FOUND = getattr(vhostorch, "__version__", "0")


def require_vhostorch(module) -> None:
    """Fail the task clearly when the managed host's Python has no vhostorch, or another
    release than this collection's."""
    if IMPORT_ERROR is not None:
        module.fail_json(
            msg=missing_required_lib(
                "vhostorch",
                reason="on the managed host (the vhost_host role "
                "installs it with vhost_host_vhostorch_pip)",
            ),
            exception=IMPORT_ERROR,
        )
    found = tuple(int(part) for part in str(FOUND).split(".")[:2] if part.isdigit())
    if found != LIBRARY:
        want = ".".join(map(str, LIBRARY))
        module.fail_json(
            msg=f"vhostorch {FOUND} is on the managed host, and this collection drives "
            f"vhostorch {want}.x: install that release (vhost_host_vhostorch_pip)"
        )


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


@contextmanager
def failing_on_error(module):
    """The modules' one mapping of the library's errors: any vhostorch error in the block
    fails the task with its message on one line (the CLI's exit code has no meaning here)."""
    from vhostorch.errors import VhostorchError

    try:
        yield
    except VhostorchError as err:
        module.fail_json(msg=one_line(err))


def finish_with_check(module, reports, result) -> None:
    """Exit with ``result``; fail instead, naming the first failure, when a check failed
    and the task's ``fail_on_check`` (with ``strict``: warn and unknown fail too) says so."""
    strict = module.params["strict"]
    if module.params["fail_on_check"] and not all(r.ok(strict) for r in reports):
        failed = [
            (r, c)
            for r in reports
            for c in r.checks
            if c.status == "fail" or (strict and c.status != "pass")
        ]
        report, first = failed[0]
        where = f" {first.nic}" if first.nic else ""
        module.fail_json(
            msg=f"vhost check failed for QEMU pid {report.pid}: "
            f"{first.id}{where}: {first.message} ({len(failed)} in all)",
            **result,
        )
    module.exit_json(**result)
