#!/usr/bin/env bash
# Install everything, then run the main job: make a tap, start a small VM with
# vhost=on through QMP, wait for its guest driver, print the check table, tear
# everything down. Where this machine has no usable vhost-net and KVM, the same
# runs inside the disposable test host (vhostorch lab run), and says so.
# Exit status: 0 when every step worked and every check passed, else not 0.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# doctor exits 1 when a host check fails: its JSON is what matters here, and a doctor that
# gives none (it crashed) stops the demo, as json.load then fails.
doctor=$(.venv/bin/vhostorch doctor --json) || [ $? -eq 1 ]
ready=$(.venv/bin/python -c '
import json, sys
checks = {c["id"]: c["status"] for c in json.loads(sys.argv[1])["checks"]}
print("yes" if checks.get("host.vhost-net") == checks.get("host.kvm") == "pass" else "no")' "$doctor")
if [ "$ready" = yes ]; then
    exec bash scripts/demo-vm.sh
fi
echo "This machine has no usable /dev/vhost-net and KVM (vhostorch doctor says why):"
echo "running the demo inside the test host, a stock kernel booted under QEMU/TCG."
# The test host's console log and job files go to a directory of their own, removed when the
# demo succeeds or is interrupted, kept (and named) when it fails.
results=$(mktemp -d /tmp/vho-demo-lab-XXXXXX)
lab="" interrupted=""
stop() {
    interrupted=$1
    [ -z "$lab" ] || kill -TERM "$lab" 2>/dev/null || true
}
trap 'stop 130' INT
trap 'stop 143' TERM
trap 'stop 129' HUP
# lab run goes in the background so that a signal to this script reaches it at once (bash
# runs a trap only after its foreground command ends); it stops the test host and exits.
.venv/bin/vhostorch lab run --results "$results" -- bash scripts/demo-vm.sh &
lab=$!
[ -z "$interrupted" ] || stop "$interrupted"
while :; do
    status=0
    wait "$lab" || status=$?
    # wait returns early (status > 128) when a trap ran; lab run is then still stopping.
    kill -0 "$lab" 2>/dev/null || break
done
if [ "$status" -eq 0 ] || [ -n "$interrupted" ]; then
    rm -rf "$results"
else
    echo "demo: failed (exit $status); the test host's console log is in $results" >&2
fi
exit "${interrupted:-$status}"
