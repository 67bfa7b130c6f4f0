#!/usr/bin/env bash
# The demo itself, on a host with vhost-net and KVM: one VM with a 2-queue vhost
# NIC, through the QMP backend, from a spec file; up, check, down. Any step that
# fails stops it with a non-zero status, and whatever it started is undone on the
# way out (also on SIGINT, SIGTERM, SIGHUP). It uses only the `vhostorch` command.
set -euo pipefail
cd "$(dirname "$0")/.."
v=.venv/bin/vhostorch
py=.venv/bin/python
# The guest: the test host's kernel, its tiny initramfs and their command line, built and
# cached by `lab build`, which prints them under "guest". Read into a variable first:
# set -e does not see a failure inside `eval "$(...)"` (that hid a broken import once).
guest=$($v lab build --json | $py -c '
import json, shlex, sys
guest = json.load(sys.stdin)["guest"]
for var in ("kernel", "initrd", "cmdline"):
    print(f"{var}={shlex.quote(guest[var])}")')
eval "$guest"
armed=$($v trace status --json | $py -c 'import json, sys; print(json.load(sys.stdin)["armed"])')
dir=$(mktemp -d /tmp/vho-demo-XXXXXX)
started=no
cleanup() {
    local status=$?
    trap - EXIT INT TERM HUP
    if [ "$started" = yes ]; then
        # A step from up to down failed, or a signal came. up undoes its own steps when it
        # fails (down then finds no VM and says so), not when the VM started and a check failed.
        echo "demo: failed (exit $status); down, in case the VM is up:" >&2
        $v down "$dir/demo.toml" >&2 || true
    fi
    # up arms the wiring trace if it was not; leave the host as it was.
    if [ "$started" != no ] && [ "$armed" != True ]; then
        $v trace disarm >/dev/null || status=1
    fi
    rm -rf "$dir"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP
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
# Each step shown as `set -x` would show it.
step() {
    echo "+ $*" >&2
    "$@"
}
started=yes
step $v up "$dir/demo.toml" --strict
step $v tap show vho-demo-n0
step $v down "$dir/demo.toml"
started=done
