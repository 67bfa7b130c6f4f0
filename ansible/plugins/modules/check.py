#!/usr/bin/python
# Copyright: vhostorch developers
# Apache-2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: check
short_description: Prove, per NIC and per queue, that vhost-net is really attached to QEMUs
version_added: "0.1.0"
description:
  - Runs vhostorch's check on the managed host against one libvirt domain, one QEMU process,
    one QEMU's QMP socket, or every QEMU, and returns its result as JSON (the shape of
    C(vhostorch check --json)).
  - Each check is pass, warn, fail or unknown, with its evidence; a verdict vhostorch cannot
    prove is unknown, never pass.
  - Fails when the check fails (with O(strict), also on warn or unknown), unless
    O(fail_on_check=false). Never changes anything.
requirements:
  - the vhostorch Python library on the managed host; libvirt-python for O(domain)
  - root on the managed host (to read other processes' fds)
options:
  domain:
    description: The libvirt domain to check (its XML says what was asked).
    type: str
  pid:
    description: The QEMU process to check.
    type: int
  qmp:
    description: The QMP socket of a QEMU (also read for its virtio status).
    type: path
  all:
    description: Check every QEMU process on the host.
    type: bool
    default: false
  connect:
    description: libvirt URI, with O(domain).
    type: str
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - vhostorch.vhost.check_result
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
  platform:
    platforms: posix
author:
  - vhostorch developers (@vhostorch)
"""

EXAMPLES = r"""
- name: Every QEMU on the host has its vhost attached
  vhostorch.vhost.check:
    all: true

- name: Record one domain's check without failing the play
  vhostorch.vhost.check:
    domain: vm1
    fail_on_check: false
  register: vm1_check
"""

RETURN = r"""
ok:
  description: Whether every checked QEMU passed (no fail; with O(strict) no warn or unknown).
  returned: always
  type: bool
reports:
  description: One check result per QEMU, each with target, nics and checks (id, nic, queue,
    status, message, evidence).
  returned: always
  type: list
  elements: dict
"""

from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible_collections.vhostorch.vhost.plugins.module_utils.common import (  # noqa: E402
    failing_on_error,
    finish_with_check,
    require_vhostorch,
)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            domain=dict(type="str"),
            pid=dict(type="int"),
            qmp=dict(type="path"),
            all=dict(type="bool", default=False),
            connect=dict(type="str"),
            strict=dict(type="bool", default=False),
            fail_on_check=dict(type="bool", default=True),
        ),
        mutually_exclusive=[("domain", "pid", "qmp", "all")],
        required_one_of=[("domain", "pid", "qmp", "all")],
        required_by={"connect": "domain"},
        supports_check_mode=True,
    )
    require_vhostorch(module)
    from vhostorch.check import targets

    p = module.params
    with failing_on_error(module):
        target = targets.Target(
            pid=p["pid"], domain=p["domain"], qmp=p["qmp"], every=p["all"], uri=p["connect"]
        )
        reports = targets.reports(target)
    strict = p["strict"]
    ok = all(r.ok(strict) for r in reports)
    result = {"changed": False, "ok": ok, "reports": [r.to_json(strict) for r in reports]}
    finish_with_check(module, reports, result)


if __name__ == "__main__":
    main()
