#!/usr/bin/python
# Copyright: vhostorch developers
# Apache-2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: tap
short_description: Make a tap device for a vhost-net NIC match its spec, or delete it
version_added: "0.1.0"
description:
  - Creates or updates a tap device with the vhostorch library on the managed host, all in one
    step or not at all; or deletes it.
  - The queue mode is multi-queue exactly when O(queues) is more than 1, as QEMU and libvirt
    open the tap once per queue pair and ask for multi-queue only then.
  - MTU, MAC, bridge and up/down change in place; vnet_hdr, owner and group change in place
    while no process holds the tap; the queue mode changes only by a recreate (O(recreate)),
    which is refused for a tap a process holds open or that vhostorch did not create.
  - C(changed) is true only when the tap changed. Supports check mode and diff.
requirements:
  - the vhostorch Python library on the managed host (the vhostorch.vhost.vhost_host role
    installs it)
  - root (CAP_NET_ADMIN) on the managed host
options:
  name:
    description: Name of the tap (at most 15 characters).
    type: str
    required: true
  state:
    description:
      - V(present) makes the tap match; V(absent) deletes it (only a tap vhostorch created,
        unless O(force)).
    type: str
    choices: [present, absent]
    default: present
  queues:
    description: Queue pairs QEMU will open on the tap.
    type: int
    default: 1
  vnet_hdr:
    description: Give the tap IFF_VNET_HDR (what vhost-net and QEMU's virtio-net expect).
    type: bool
    default: true
  owner:
    description: User (name or uid) allowed to open the tap, such as V(libvirt-qemu).
    type: str
  group:
    description: Group (name or gid) allowed to open the tap.
    type: str
  mtu:
    description: MTU of the tap.
    type: int
  mac:
    description: MAC address of the tap itself (the host side).
    type: str
  bridge:
    description: Bridge to attach the tap to. It must exist unless O(create_bridge).
    type: str
  create_bridge:
    description: Create O(bridge) when it is missing.
    type: bool
    default: false
  up:
    description: Whether the tap is up.
    type: bool
    default: true
  recreate:
    description: Recreate a tap vhostorch made whose queue mode differs (never one held open).
    type: bool
    default: false
  force:
    description: With O(state=absent), delete a tap vhostorch did not create too (never one
      held open).
    type: bool
    default: false
  netns:
    description: Named network namespace (as in C(ip netns)) the tap lives in.
    type: str
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
  platform:
    platforms: posix
author:
  - vhostorch developers (@vhostorch)
"""

EXAMPLES = r"""
- name: A 4-queue tap for a libvirt domain, on a bridge
  vhostorch.vhost.tap:
    name: vm1-net0
    queues: 4
    owner: libvirt-qemu
    mtu: 9000
    bridge: br0

- name: Remove it
  vhostorch.vhost.tap:
    name: vm1-net0
    state: absent
"""

RETURN = r"""
action:
  description: What happened to the tap (in check mode, what would).
  returned: always
  type: str
  sample: created
changes:
  description: The attributes that changed (or would).
  returned: always
  type: list
  elements: str
  sample: ["mtu 1500 -> 9000"]
tap:
  description: The tap as the kernel reports it afterwards; empty when there is none.
  returned: always
  type: dict
  sample: {"name": "vm1-net0", "queue_mode": "multi", "mtu": 9000, "bridge": "br0"}
"""

from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible_collections.vhostorch.vhost.plugins.module_utils.common import (  # noqa: E402
    failing_on_error,
    require_vhostorch,
)

DIFF_KEYS = ("queue_mode", "vnet_hdr", "owner", "group", "mtu", "mac", "bridge", "up")


def _current(name, netns):
    from vhostorch import taps
    from vhostorch.errors import OperationFailed

    try:
        found = taps.show(name, netns=netns)
    except OperationFailed:
        return {}
    return found[0].asdict() if found else {}


def _expected(spec, before):
    """What a present tap's diffed attributes will be (unset ones stay as they are)."""
    from vhostorch import taps

    ids = taps.resolve_ids(spec)
    after = {k: before.get(k) for k in DIFF_KEYS}
    after.update(
        queue_mode="multi" if spec.queues > 1 else "single", vnet_hdr=spec.vnet_hdr, up=spec.up
    )
    for key, value in (
        ("owner", ids.owner),
        ("group", ids.group),
        ("mtu", spec.mtu),
        ("mac", spec.mac),
        ("bridge", spec.bridge),
    ):
        if value is not None:
            after[key] = value
    return after


def main():
    module = AnsibleModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            state=dict(type="str", choices=["present", "absent"], default="present"),
            queues=dict(type="int", default=1),
            vnet_hdr=dict(type="bool", default=True),
            owner=dict(type="str"),
            group=dict(type="str"),
            mtu=dict(type="int"),
            mac=dict(type="str"),
            bridge=dict(type="str"),
            create_bridge=dict(type="bool", default=False),
            up=dict(type="bool", default=True),
            recreate=dict(type="bool", default=False),
            force=dict(type="bool", default=False),
            netns=dict(type="str"),
        ),
        supports_check_mode=True,
    )
    require_vhostorch(module)
    from vhostorch import taps

    p = module.params
    with failing_on_error(module):
        before = _current(p["name"], p["netns"])
        if p["state"] == "present":
            # The module's options are named as the tap's attributes (taps.spec.ATTRS).
            spec = taps.tap_from_mapping(p)
            [result] = taps.ensure([spec], recreate=p["recreate"], dry_run=module.check_mode)
            changed = result.action != "unchanged"
            predicted = _expected(spec, before)
        else:
            [result] = taps.delete(
                [p["name"]], netns=p["netns"], force=p["force"], dry_run=module.check_mode
            )
            changed = result.action == "deleted"
            predicted = {}
        after = _current(p["name"], p["netns"]) if not module.check_mode else predicted
    diff = {
        "before": {k: before[k] for k in DIFF_KEYS} if before else {},
        "after": {k: after.get(k) for k in DIFF_KEYS} if after else {},
    }
    module.exit_json(
        changed=changed,
        action=result.action,
        changes=list(result.changes),
        tap=after if not module.check_mode else predicted,
        diff=diff,
    )


if __name__ == "__main__":
    main()
