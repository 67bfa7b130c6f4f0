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
  check.placement
    nic.vhost.placement where the NIC's workers may run: off the CPUs of pinned vCPUs, and
                        on the CPUs a pin asked for (vhostorch pin)
  check.rewire (check --rewire only)
    vm.rewire           the VM was paused and resumed so QEMU wired vhost again (pause_ms)
  hook.program (when the domain's QEMU cannot be looked at), check.targets (check --all:
  a QEMU its time ran out before)
    vm.inspect          the QEMU of the domain could be found and read (check --all: was read)

and the host checks ``doctor`` makes before any VM runs:

    host.vhost-net          /dev/vhost-net exists (with the module that provides it)
    host.vhost-net.access   /dev/vhost-net opens read-write
    host.tun                /dev/net/tun opens read-write
    host.kvm                /dev/kvm answers KVM's API (and which module serves it)
    host.worker-model       vhost workers are kernel threads (< 6.4) or threads of QEMU
    host.live               the kernel's live state can be read (nic.kick and nic.call, no trace)
    host.trace              the wiring trace is armed (nic.kick and nic.call where live cannot)
    host.trace.boot         the trace will be armed at next boot, before libvirt (boot unit)
    host.root-code          what the hook and the boot unit make root run is root's alone
    host.libvirt.acl        libvirt's cgroup_device_acl lets QEMU open /dev/vhost-net
    host.libvirt.user       libvirt's QEMU user can open the devices
    host.nofile             the open-file limit fits a VM's fds
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
VHOST_PLACEMENT = "nic.vhost.placement"
VM_INSPECT = "vm.inspect"
VM_REWIRE = "vm.rewire"

HOST_VHOST_NET_ACCESS = "host.vhost-net.access"
HOST_TUN = "host.tun"
HOST_KVM = "host.kvm"
HOST_WORKER_MODEL = "host.worker-model"
HOST_LIVE = "host.live"
HOST_TRACE = "host.trace"
HOST_TRACE_BOOT = "host.trace.boot"
HOST_ROOT_CODE = "host.root-code"
HOST_LIBVIRT_ACL = "host.libvirt.acl"
HOST_LIBVIRT_USER = "host.libvirt.user"
HOST_NOFILE = "host.nofile"
