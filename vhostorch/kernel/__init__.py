"""The kernel interfaces vhostorch speaks itself, with the standard library only: rtnetlink
(rtnl), the /dev/net/tun ioctls (tun), network namespaces (netns) and /proc (procfs)."""
