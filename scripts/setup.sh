#!/usr/bin/env bash
# Install everything vhostorch and its tests need on Debian 12 or 13, as root. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-dev pkg-config iproute2
  busybox-static cpio kmod strace python3 python3-venv python3-dev python3-apt gcc
  debootstrap    # makes the test host's Debian 13 userland (lab --userland trixie)
  zstd xz-utils  # Debian's 6.12 test-host kernel is zstd, its modules .ko.xz
  systemd        # systemd-analyze verifies the boot unit
  git            # tests read the 0.1.0 release from this checkout's history
)
# prometheus and prometheus-node-exporter: installed below with their services kept stopped.
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The real-components test starts its own Prometheus and node_exporter on loopback; the
# packages' postinst would start the system's services on this machine (it still enables them).
# A policy-rc.d that denies (invoke-rc.d and deb-systemd-invoke obey it, policy-rc.d(8)) keeps
# them stopped during this install only; one already there (a container's) is left alone.
services=(prometheus prometheus-node-exporter)
missing=()
for p in "${services[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages, their services not started: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  policy=/usr/sbin/policy-rc.d
  made_policy=
  if [[ ! -e $policy && ! -L $policy ]]; then
    # Removed again on any exit, a failed install's or an interrupted one's included.
    trap 'rm -f "$policy"' EXIT
    trap 'exit 130' INT TERM
    made_policy=1
    printf '#!/bin/sh\n# vhostorch setup.sh: no service starts during its install\nexit 101\n' >"$policy"
    chmod 0755 "$policy"
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if [[ $made_policy ]]; then
    rm -f "$policy"
    trap - EXIT INT TERM
  fi
fi

# Debian's udev rule gives /dev/kvm to the kvm group (mode 0660); a machine running without
# udev keeps it root's alone, and libvirt's QEMU (libvirt-qemu, in group kvm) cannot open it.
if [[ -c /dev/kvm ]] && getent group kvm >/dev/null && [[ $(stat -c %G /dev/kvm) != kvm ]]; then
  echo "setup: /dev/kvm to group kvm, mode 0660 (as udev would)"
  chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
fi

stamp=.venv/.installed
if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
# Reinstall only when the project's declared dependencies change.
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
  echo "setup: installing vhostorch into .venv"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e '.[test]'
  touch "$stamp"
fi
# Byte-compile: start-up time is part of every hook run, and some environments
# forbid Python to write .pyc files itself.
.venv/bin/python -m compileall -q vhostorch >/dev/null
