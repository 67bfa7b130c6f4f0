# Copyright: vhostorch developers
# Apache-2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import annotations


class ModuleDocFragment:
    """The options of the modules that end with vhostorch's check (vm, check)."""

    DOCUMENTATION = r"""
options:
  strict:
    description: Count warn and unknown verdicts as failures too.
    type: bool
    default: false
  fail_on_check:
    description: Fail the task when the check fails.
    type: bool
    default: true
"""
