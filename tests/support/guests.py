"""Inner guests for tests in the test host: QEMU/KVM with the lab kernel and guest initramfs.

The guest prints ``VHOSTORCH-GUEST: ...`` markers on its serial console (a
file here); tests wait for them. Processes are ended by the pid started here.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from tests.support import kernel
from vhostorch import taps
from vhostorch.lab.image import GUEST_APPEND, Image, ensure_image
from vhostorch.taps import TapSpec

_IMAGE: list[Image] = []


def image() -> Image:
    if not _IMAGE:
        _IMAGE.append(ensure_image())
    return _IMAGE[0]


class Guest:
    def __init__(self, proc: subprocess.Popen[bytes], console: str, workdir: str) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.console = console
        self.workdir = workdir

    def text(self) -> str:
        try:
            with open(self.console, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def wait_for(self, pattern: str, timeout: float = 120) -> re.Match[str]:
        """Wait for a console line matching ``pattern``; fail with the console's tail."""
        regex = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        while True:
            found = regex.search(self.text())
            if found:
                return found
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"QEMU exited ({self.proc.returncode}) before {pattern!r}: {self.tail()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} within {timeout:.0f} s: {self.tail()}")
            time.sleep(0.1)

    def tail(self, lines: int = 15) -> str:
        return " | ".join(self.text().strip().splitlines()[-lines:])


_QEMU_VERSION: list[tuple[int, int]] = []


def qemu_version() -> tuple[int, int]:
    """This userland's QEMU (major, minor): 7.2 on Debian 12, 10.0 on Debian 13. Where the two
    behave differently a test says what each does; versions between were not run."""
    if not _QEMU_VERSION:
        out = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True)
        found = re.search(r"version (\d+)\.(\d+)", out.stdout)
        assert found, out.stdout + out.stderr
        _QEMU_VERSION.append((int(found.group(1)), int(found.group(2))))
    return _QEMU_VERSION[0]


def qemu_argv(
    console: str, append: str, extra: Sequence[str], memory: int = 256, cpus: int = 1
) -> list[str]:
    img = image()
    # i440fx ("pc"): fewer built-in devices to probe than q35, 4 s less under nested KVM.
    # debug-threads names threads ("CPU 0/KVM", ...) as libvirt does, so tests can tell them apart.
    fixed = "qemu-system-x86_64 -accel kvm -cpu host -M pc -display none -nodefaults"
    fixed += " -no-user-config -no-reboot -name guest,debug-threads=on"
    return [
        *fixed.split(),
        *("-m", str(memory), "-smp", str(cpus), "-serial", f"file:{console}"),
        *("-kernel", img.kernel, "-initrd", img.guest_initrd),
        *("-append", f"{GUEST_APPEND} {append}".strip()),
        *extra,
    ]


@contextmanager
def guest(extra: Sequence[str], append: str = "", cpus: int = 1) -> Iterator[Guest]:
    """QEMU/KVM running the guest initramfs with ``extra`` arguments (NICs); always stopped."""
    workdir = tempfile.mkdtemp(prefix="vho-guest-")
    console = os.path.join(workdir, "console.log")
    with open(os.path.join(workdir, "qemu.log"), "wb") as log:
        proc = subprocess.Popen(
            qemu_argv(console, append, extra, cpus=cpus),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield Guest(proc, console, workdir)
    finally:
        stop(proc)
        subprocess.run(["rm", "-rf", workdir], check=False)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def qemu_log(g: Guest) -> str:
    with open(os.path.join(g.workdir, "qemu.log"), errors="replace") as f:
        return f.read()


def fd_targets(pid: int) -> dict[int, str]:
    """fd number -> readlink of /proc/PID/fd/N."""
    found = {}
    base = f"/proc/{pid}/fd"
    for name in os.listdir(base):
        try:
            found[int(name)] = os.readlink(f"{base}/{name}")
        except OSError:
            continue
    return found


def vhost_workers(pid: int) -> list[int]:
    """Tids of ``vhost-PID`` workers: kernel threads (< 6.4) or QEMU's own threads (>= 6.4)."""
    comm = f"vhost-{pid}"[:15]
    found = []
    candidates = [f"/proc/{p}" for p in os.listdir("/proc") if p.isdigit()]
    candidates += [f"/proc/{pid}/task/{t}" for t in os.listdir(f"/proc/{pid}/task")]
    for path in candidates:
        try:
            with open(f"{path}/comm") as f:
                if f.read().strip() == comm:
                    found.append(int(path.rsplit("/", 1)[1]))
        except OSError:
            continue
    return sorted(set(found))


def runtime_ns(tid: int) -> int:
    """Time ``tid`` has spent on a CPU, in nanoseconds (schedstat's first field)."""
    with open(f"/proc/{tid}/schedstat") as f:
        return int(f.read().split()[0])


@contextmanager
def tap(queues: int, address: str | None = None) -> Iterator[str]:
    """A tap made by vhostorch for one guest, deleted afterwards."""
    name = kernel.unique("vt")
    taps.ensure([TapSpec(name, queues=queues)])
    try:
        if address:
            kernel.run("ip", "addr", "add", address, "dev", name)
        yield name
    finally:
        taps.delete([name])


def vhost_netdev(
    name: str, queues: int, vhost: str = "on", nic: int = 0, device_queues: int | None = None
) -> list[str]:
    """-netdev/-device for a tap NIC; ``device_queues`` sizes the device differently."""
    netdev = f"tap,id=n{nic},ifname={name},script=no,downscript=no,vhost={vhost}"
    device = f"virtio-net-pci,netdev=n{nic},id=net{nic},mac=52:54:00:12:34:{0x56 + nic:02x}"
    if queues > 1:
        netdev += f",queues={queues}"
    sized = device_queues or queues
    if sized > 1:
        device += f",mq=on,vectors={2 * sized + 2}"
    return ["-netdev", netdev, "-device", device]


def domain_xml(
    name: str,
    dev: str,
    queues: int,
    console: str | None = None,
    vtype: str = "kvm",
    metadata: str = "",
) -> str:
    """A libvirt domain (``vtype`` kvm or qemu) booting the guest initramfs, its NIC on
    tap ``dev`` with vhost asked for; ``metadata`` goes in its <metadata>."""
    img = image()
    serial = (
        f"<serial type='file'><source path='{console}'/><target port='0'/></serial>"
        if console
        else ""
    )
    cpu = "<cpu mode='host-passthrough'/>" if vtype == "kvm" else ""
    return f"""<domain type='{vtype}'>
  <name>{name}</name>
  <metadata>{metadata}</metadata>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{img.kernel}</kernel>
    <initrd>{img.guest_initrd}</initrd>
    <cmdline>{GUEST_APPEND}</cmdline>
  </os>
  {cpu}
  <devices>
    <interface type='ethernet'>
      <target dev='{dev}' managed='no'/>
      <model type='virtio'/>
      <driver name='vhost' queues='{queues}'/>
    </interface>
    {serial}
    <memballoon model='none'/>
  </devices>
</domain>"""


def spec_file(
    directory: str,
    name: str,
    nics: Sequence[dict[str, object]],
    accel: str = "kvm",
    kernel: str | None = None,
    machine: str = "pc",
) -> str:
    """A VM spec (TOML) booting the guest initramfs; ``nics`` are its [[nic]] tables."""
    img = image()
    lines = [
        f'name = "{name}"', "memory = 256", f'accel = "{accel}"', f'machine = "{machine}"',
        "[boot]", f'kernel = "{kernel or img.kernel}"', f'initrd = "{img.guest_initrd}"',
        f'cmdline = "{GUEST_APPEND}"',
    ]  # fmt: skip
    for nic in nics:
        lines.append("[[nic]]")
        for key, value in nic.items():
            lines.append(f"{key} = {value!r}".replace("'", '"'))
    path = os.path.join(directory, f"{name}.toml")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def tcg_spec(directory: str, name: str, tap: str) -> str:
    """A one-NIC TCG VM's spec (vhost preferred): what runs on this machine, without KVM."""
    return spec_file(directory, name, [{"tap": tap, "vhost": "preferred"}], accel="tcg")


# What libvirt's NAT network and type='direct' need beyond what the test host loads: the
# kernel's own module autoload cannot find modules there (they live in the unpacked kernel
# tree), so they are loaded by name. iptables here is iptables-nft: its xtables matches and
# targets (REJECT, MASQUERADE, conntrack) go through nft_compat.
NETWORK_MODULES = (
    "macvtap", "dummy", "ip_tables", "iptable_nat", "iptable_filter", "iptable_mangle", "nf_nat",
    "xt_MASQUERADE", "xt_CHECKSUM", "xt_conntrack", "ipt_REJECT", "nf_tables", "nft_chain_nat",
    "nft_compat", "nft_reject", "nft_reject_ipv4", "nft_reject_inet", "nft_ct", "nft_masq",
    "nf_reject_ipv4", "xt_addrtype", "xt_tcpudp", "xt_state",
)  # fmt: skip


def load_modules(names: Sequence[str]) -> None:
    """modprobe ``names`` from the test host's kernel tree (its lab.env names it)."""
    modprobe("-a", *names)


def modprobe(*argv: str) -> None:
    """modprobe ARGV (a module and its parameters, or -a and modules) from the test host's
    kernel tree (its lab.env names it)."""
    env: dict[str, str] = {}
    with open(os.path.join(os.environ["VHOSTORCH_LAB_RESULTS"], "lab.env")) as f:
        for line in f:
            key, _, value = line.strip().partition("=")
            env[key] = value.strip("'")
    done = subprocess.run(
        ["modprobe", "-d", env["LAB_ROOT"], "-S", env["LAB_KVER"], *argv],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr


def typed_domain_xml(name: str, interfaces: str, console: str, machine: str = "pc") -> str:
    """A type='kvm' domain booting the guest initramfs with ``interfaces`` (XML) as its NICs."""
    img = image()
    return f"""<domain type='kvm'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='{machine}'>hvm</type>
    <kernel>{img.kernel}</kernel>
    <initrd>{img.guest_initrd}</initrd>
    <cmdline>{GUEST_APPEND}</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <cpu mode='host-passthrough'/>
  <devices>
    {interfaces}
    <serial type='file'><source path='{console}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>"""
