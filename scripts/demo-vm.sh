#!/usr/bin/env bash
# The demo itself, on a host with vhost-net and KVM: one VM with a 2-queue vhost
# NIC, through the QMP backend, from a spec file; up, check, down.
set -euo pipefail
cd "$(dirname "$0")/.."
v=.venv/bin/vhostorch
# The guest: the test host's kernel and its tiny initramfs (built and cached by `lab build`).
eval "$($v lab build --json | .venv/bin/python -c '
import json, shlex, sys
from vhostorch.labimage import GUEST_APPEND
image = json.load(sys.stdin)["image"]
for var, value in (("kernel", image["kernel"]), ("initrd", image["guest_initrd"]),
                   ("cmdline", GUEST_APPEND)):
    print(f"{var}={shlex.quote(value)}")')"
dir=$(mktemp -d /tmp/vho-demo-XXXXXX)
armed=$($v trace status --json | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["armed"])')
cleanup() {
    { set +x; } 2>/dev/null
    $v down "$dir/demo.toml" >/dev/null 2>&1 || true
    [ "$armed" = True ] || $v trace disarm >/dev/null 2>&1 || true
    rm -rf "$dir"
}
trap cleanup EXIT
cat > "$dir/demo.toml" <<SPEC
name = "vho-demo"
memory = 256
cpus = 1
[boot]
kernel = "$kernel"
initrd = "$initrd"
cmdline = "$cmdline"
[[nic]]
tap = "vho-demo-n0"
queues = 2
vhost = "required"
SPEC
cat "$dir/demo.toml"
set -x
$v up "$dir/demo.toml" --strict
$v tap show vho-demo-n0
$v down "$dir/demo.toml"
