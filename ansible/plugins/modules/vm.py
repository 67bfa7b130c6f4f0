#!/usr/bin/python
# Copyright: vhostorch developers
# Apache-2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: vm
short_description: Run a QEMU/KVM VM with vhost-net NICs from a spec, checked, or remove it
version_added: "0.1.0"
description:
  - With O(state=running), does what C(vhostorch up) does on the managed host when the VM is
    not running yet - makes its taps, starts it through QMP or libvirt, waits for the guest
    driver to start vhost, and checks every NIC and queue - and fails if the check fails
    (unless O(fail_on_check=false); the VM keeps running). A failure while starting undoes
    every step.
  - A VM that already runs (started by vhostorch with this name) is left as it is and checked
    again; C(changed) is then false. If it runs with other NICs the task fails rather than
    restarting it (C(vhostorch nic add) hot-plugs).
  - With O(state=absent), stops the VM and removes what vhostorch created for it (C(vhostorch
    down)).
  - Supports check mode (nothing is started or stopped).
requirements:
  - the vhostorch Python library on the managed host (the vhostorch.vhost.vhost_host role
    installs it); libvirt-python for O(backend=libvirt)
  - root on the managed host
options:
  name:
    description: VM name (also the libvirt domain name with O(backend=libvirt)).
    type: str
    required: true
  state:
    description: Whether the VM runs.
    type: str
    choices: [running, absent]
    default: running
  backend:
    description:
      - V(qmp) starts QEMU here with a QMP socket and passes it the tap and vhost fds;
        V(libvirt) defines and starts a libvirt domain.
    type: str
    choices: [qmp, libvirt]
    default: qmp
  connect:
    description: libvirt URI with O(backend=libvirt).
    type: str
    default: qemu:///system
  memory:
    description: Memory in MiB.
    type: int
    default: 512
  cpus:
    description: Virtual CPUs.
    type: int
    default: 1
  machine:
    description: QEMU machine type.
    type: str
    default: pc
  accel:
    description: Accelerator; vhost-net with libvirt needs V(kvm).
    type: str
    choices: [kvm, tcg]
    default: kvm
  kernel:
    description: Absolute path of a kernel to boot (exactly one of O(kernel) and O(disk)).
    type: path
  initrd:
    description: Absolute path of an initrd, with O(kernel).
    type: path
  cmdline:
    description: Kernel command line, with O(kernel).
    type: str
  disk:
    description: Absolute path of a disk image to boot (raw or qcow2).
    type: path
  worker_cpus:
    description:
      - CPUs (a list such as V(2-3)) to pin the VM's vhost-net workers to, as C(vhostorch pin)
        does; applied to a running VM whose pin differs. Unset leaves the workers as they are.
    type: str
  nics:
    description: The VM's virtio-net NICs, each on a tap vhostorch makes.
    type: list
    elements: dict
    default: []
    suboptions:
      tap:
        description: Tap name (default C(NAME-nN)).
        type: str
      queues:
        description: Queue pairs.
        type: int
        default: 1
      vhost:
        description:
          - V(required) refuses to start without vhost-net, V(preferred) falls back to QEMU's
            data path and the check warns, V(off) does not ask for it.
        type: str
        choices: [required, preferred, "off"]
        default: required
      mac:
        description: Guest MAC address (default derived from the VM name).
        type: str
      bridge:
        description: Bridge for the tap.
        type: str
      mtu:
        description: MTU of the tap, also offered to the guest.
        type: int
      owner:
        description: Tap owner.
        type: str
      group:
        description: Tap group.
        type: str
      rx_queue_size:
        description: RX ring size.
        type: int
        choices: [256, 512, 1024]
      tx_queue_size:
        description: TX ring size (QEMU caps it at 256 with kernel vhost-net).
        type: int
        choices: [256, 512, 1024]
  wait:
    description: Seconds to wait for the guest driver to start vhost.
    type: int
    default: 60
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
- name: A VM with a 4-queue vhost NIC, started through QMP and checked
  vhostorch.vhost.vm:
    name: vm1
    memory: 1024
    disk: /var/lib/vms/vm1.qcow2
    nics:
      - tap: vm1-net0
        queues: 4
        bridge: br0

- name: Stop it and remove its taps
  vhostorch.vhost.vm:
    name: vm1
    state: absent
"""

RETURN = r"""
vm:
  description: What vhostorch started and made (its state record); empty when absent.
  returned: always
  type: dict
  sample: {"name": "vm1", "backend": "qmp", "pid": 4242, "nics": [{"tap": "vm1-net0"}]}
check:
  description: The check of the running VM, as C(vhostorch check --json) prints it.
  returned: when the VM runs (not in check mode)
  type: dict
  sample: {"ok": true, "checks": [{"id": "nic.vhost.fds", "status": "pass"}]}
waited:
  description: Seconds waited for the guest driver.
  returned: when the VM was started
  type: float
"""

from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible_collections.vhostorch.vhost.plugins.module_utils.common import (  # noqa: E402
    failing_on_error,
    finish_with_check,
    require_vhostorch,
)

NIC_KEYS = (
    "tap",
    "queues",
    "vhost",
    "mac",
    "bridge",
    "mtu",
    "owner",
    "group",
    "rx_queue_size",
    "tx_queue_size",
)


def _spec(p):
    from vhostorch.vm import spec

    boot = {k: p[k] for k in ("kernel", "initrd", "cmdline", "disk") if p[k] is not None}
    nics = [{k: v for k, v in nic.items() if k in NIC_KEYS and v is not None} for nic in p["nics"]]
    return spec.from_mapping(
        {
            "name": p["name"],
            "memory": p["memory"],
            "cpus": p["cpus"],
            "machine": p["machine"],
            "accel": p["accel"],
            "boot": boot,
            "nic": nics,
            **({"worker_cpus": p["worker_cpus"]} if p["worker_cpus"] is not None else {}),
        }
    )


def _repin(module, current, asked):
    """Pin a running VM's vhost-net workers where the task asks, unless its pin says so
    already; whether that changed anything."""
    from vhostorch import pins
    from vhostorch.kernel import procfs
    from vhostorch.kernel.cpus import parse_list
    from vhostorch.orchestrate import pinning

    if asked.worker_cpus is None:
        return False
    start = procfs.start_time(current.pid)
    pin = None if start is None else pins.load(current.pid, start)
    if pin is not None and pin.cpus == asked.worker_cpus:
        return False
    if not module.check_mode:
        wanted = parse_list(asked.worker_cpus)
        pinning.apply(current.pid, wanted, "spec", current.name, what="worker_cpus")
    return True


def _checked(module, report, result):
    result["check"] = report.to_json(module.params["strict"])
    finish_with_check(module, [report], result)


def main():
    nic = dict(
        tap=dict(type="str"),
        queues=dict(type="int", default=1),
        vhost=dict(type="str", choices=["required", "preferred", "off"], default="required"),
        mac=dict(type="str"),
        bridge=dict(type="str"),
        mtu=dict(type="int"),
        owner=dict(type="str"),
        group=dict(type="str"),
        rx_queue_size=dict(type="int", choices=[256, 512, 1024]),
        tx_queue_size=dict(type="int", choices=[256, 512, 1024]),
    )
    module = AnsibleModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            state=dict(type="str", choices=["running", "absent"], default="running"),
            backend=dict(type="str", choices=["qmp", "libvirt"], default="qmp"),
            connect=dict(type="str", default="qemu:///system"),
            memory=dict(type="int", default=512),
            cpus=dict(type="int", default=1),
            machine=dict(type="str", default="pc"),
            accel=dict(type="str", choices=["kvm", "tcg"], default="kvm"),
            kernel=dict(type="path"),
            initrd=dict(type="path"),
            cmdline=dict(type="str"),
            disk=dict(type="path"),
            worker_cpus=dict(type="str"),
            nics=dict(type="list", elements="dict", options=nic, default=[]),
            wait=dict(type="int", default=60),
            strict=dict(type="bool", default=False),
            fail_on_check=dict(type="bool", default=True),
        ),
        supports_check_mode=True,
    )
    require_vhostorch(module)
    from vhostorch import orchestrate
    from vhostorch.kernel import procfs
    from vhostorch.vm import spec, state

    p = module.params
    with failing_on_error(module):
        name = spec.check_vm_name(p["name"])
        current = state.load(name)
        running = current is not None and procfs.alive(current.pid)
        if p["state"] == "absent":
            if current is None:
                module.exit_json(changed=False, vm={})
            if not module.check_mode:
                orchestrate.down(name)
            module.exit_json(changed=True, vm=current.asdict())
        asked = _spec(p)
        if running:
            wanted = sorted(n.tap.name for n in asked.nics)
            has = sorted(n.tap for n in current.nics)
            if wanted != has or current.backend != p["backend"]:
                module.fail_json(
                    msg=f"VM {name} runs ({current.backend}, taps {', '.join(has)}) but the task "
                    f"asks for {p['backend']} with taps {', '.join(wanted)}; it is not restarted "
                    "(state=absent first, or vhostorch nic add/del)",
                    vm=current.asdict(),
                )
            changed = _repin(module, current, asked)
            if module.check_mode:
                module.exit_json(changed=changed, vm=current.asdict())
            result = {"changed": changed, "vm": current.asdict()}
            _checked(module, orchestrate.check(current), result)
        if module.check_mode:
            module.exit_json(changed=True, vm={})
        if current is not None:
            orchestrate.down(name)  # its QEMU is gone: clean up what is left, then start anew
        if p["wait"] < 0:
            module.fail_json(msg="wait must be 0 or more seconds")
        outcome = orchestrate.up(asked, p["backend"], uri=p["connect"], wait=float(p["wait"]))
        result = {"changed": True, "vm": outcome.state.asdict(), "waited": outcome.waited}
        _checked(module, outcome.report, result)


if __name__ == "__main__":
    main()
