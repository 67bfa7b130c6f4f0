"""The ids of the checks ``verify`` makes for a QEMU, in one place.

They are stable: scripts and the Ansible module match on them. Each id is made by
one family module, listed above its ids:

  check.machine
    host.vhost-net      /dev/vhost-net exists and can be opened
    vm.kvm              the QEMU runs a KVM VM (anon_inode:kvm-vm), not TCG
  check.request
    nic.vhost.requested vhost was asked for, and what asked for it reached QEMU
    nic.queues          the device is sized for the queue pairs its tap netdev has
  check.fds
    nic.tap.fds         one tap fd per queue pair, on the right tap, queue mode matching
    nic.vhost.fds       one /dev/vhost-net fd per queue pair
    nic.vhost.worker    a vhost worker thread per vhost device
  check.running
    nic.vhost.started   the guest driver reached DRIVER_OK and vhost started (warn before)
    nic.vhost.memtable  vhost holds a table of guest memory regions
    nic.features        the features vhost was set to
  check.vrings
    nic.kick            per virtqueue: the kick eventfd is a KVM ioeventfd
    nic.call            per virtqueue: the call eventfd is a KVM irqfd (MSI-X, in-kernel irqchip)
"""

from __future__ import annotations

HOST_VHOST_NET = "host.vhost-net"
VM_KVM = "vm.kvm"
VHOST_REQUESTED = "nic.vhost.requested"
QUEUES = "nic.queues"
TAP_FDS = "nic.tap.fds"
VHOST_FDS = "nic.vhost.fds"
VHOST_WORKER = "nic.vhost.worker"
VHOST_STARTED = "nic.vhost.started"
VHOST_MEMTABLE = "nic.vhost.memtable"
FEATURES = "nic.features"
KICK = "nic.kick"
CALL = "nic.call"
