# Copyright: vhostorch developers
# Apache-2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""What the vhostorch modules share: the library on the managed host, and its errors."""

from __future__ import annotations

import traceback

from ansible.module_utils.basic import missing_required_lib

try:
    import vhostorch  # noqa: F401  (the library the modules drive, on the managed host)
except ImportError:
    IMPORT_ERROR: str | None = traceback.format_exc()
else:
    IMPORT_ERROR = None


def require_vhostorch(module) -> None:
    """Fail the task clearly when the managed host's Python has no vhostorch."""
    if IMPORT_ERROR is not None:
        module.fail_json(
            msg=missing_required_lib(
                "vhostorch",
                reason="on the managed host (the vhost_host role "
                "installs it with vhost_host_vhostorch_pip)",
            ),
            exception=IMPORT_ERROR,
        )


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split())
