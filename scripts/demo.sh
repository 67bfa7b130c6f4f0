#!/usr/bin/env bash
# Install everything, then show the main job: provision a VM's taps on a bridge
# in a throwaway network namespace, show them as the kernel reports them, and
# remove everything again.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
ns="vho-demo-$$"
ip netns add "$ns"
trap 'ip netns del "$ns" 2>/dev/null || true' EXIT
v=.venv/bin/vhostorch
set -x
$v tap create vm0-net0 --queues 1 --bridge br-demo --create-bridge --owner libvirt-qemu --mtu 1500 --netns "$ns"
$v tap create vm0-net1 vm0-net2 --queues 4 --bridge br-demo --owner libvirt-qemu --group kvm --mtu 9000 --netns "$ns"
$v tap create vm0-net0 --queues 1 --bridge br-demo --owner libvirt-qemu --mtu 1500 --netns "$ns"
$v tap show --netns "$ns"
ip -n "$ns" -d -br link show type tun
$v tap delete vm0-net0 vm0-net1 vm0-net2 --bridge br-demo --netns "$ns"
