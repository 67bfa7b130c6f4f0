"""The kernel interfaces vhostorch speaks itself, with the standard library only: rtnetlink
(rtnl), the /dev/net/tun ioctls (tun), network namespaces (netns), /proc (procfs), the kernel's
type layouts (btf), BPF iterators (bpf) and the live vhost/KVM state read through them
(vhoststate)."""
