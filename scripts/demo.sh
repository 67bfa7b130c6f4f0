#!/usr/bin/env bash
# Install everything, then run the main job: make a tap, start a small VM with
# vhost=on through QMP, wait for its guest driver, print the check table, tear
# everything down. Where this machine has no usable vhost-net and KVM, the same
# runs inside the disposable test host (vhostorch lab run), and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# doctor exits 1 when a check fails; its JSON is what matters here.
ready=$({ .venv/bin/vhostorch doctor --json || true; } | .venv/bin/python -c '
import json, sys
checks = {c["id"]: c["status"] for c in json.load(sys.stdin)["checks"]}
print("yes" if checks.get("host.vhost-net") == checks.get("host.kvm") == "pass" else "no")')
if [ "$ready" = yes ]; then
    exec bash scripts/demo-vm.sh
fi
echo "This machine has no usable /dev/vhost-net and KVM (vhostorch doctor says why):"
echo "running the demo inside the test host, a stock kernel booted under QEMU/TCG."
exec .venv/bin/vhostorch lab run -- bash scripts/demo-vm.sh
