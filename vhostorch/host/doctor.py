"""Host validation before any VM runs, in the spirit of virt-host-validate, for vhost.

Checks (stable ids, listed in vhostorch.check.ids): host.vhost-net, host.vhost-net.access,
host.tun, host.kvm, host.worker-model, host.live, host.trace, host.trace.boot, host.root-code,
host.libvirt.acl, host.libvirt.user, host.nofile.
"""

from __future__ import annotations

import os

from vhostorch.check import ids
from vhostorch.check.report import FAIL, PASS, UNKNOWN, WARN, Check, HostTarget, Report
from vhostorch.libvirt import qemuconf

KVM_GET_API_VERSION = 0xAE00
KVM_API_VERSION = 12
# A queue pair costs QEMU about six fds (tap, vhost-net, a kick and a call eventfd per
# virtqueue); a VM with a few 16-queue NICs passes the traditional 1024.
NOFILE_WANTED = 4096


class Paths:
    """Where the host's facts live (tests point these at recorded trees)."""

    def __init__(
        self,
        dev: str = "/dev",
        sys: str = "/sys",
        qemu_conf: str = qemuconf.PATH,
        systemd: str = "/etc/systemd/system",
    ) -> None:
        self.dev = dev
        self.sys = sys
        self.qemu_conf = qemu_conf
        self.systemd = systemd


def _char_device(path: str) -> os.stat_result | None:
    import stat

    try:
        st = os.stat(path)
    except OSError:
        return None
    return st if stat.S_ISCHR(st.st_mode) else None


def _module_file(name: str) -> str | None:
    release = os.uname().release
    base = f"/lib/modules/{release}"
    try:
        with open(f"{base}/modules.dep") as f:
            for line in f:
                path = line.split(":", 1)[0]
                stem = os.path.basename(path).split(".ko", 1)[0]
                if stem.replace("-", "_") == name:
                    return f"{base}/{path}"
    except OSError:
        pass
    return None


def vhost_net_checks(paths: Paths) -> list[Check]:
    dev = f"{paths.dev}/vhost-net"
    st = _char_device(dev)
    loaded = os.path.isdir(f"{paths.sys}/module/vhost_net")
    if st is None:
        if loaded:
            message = "vhost_net is loaded but /dev/vhost-net is missing (devtmpfs/udev?)"
        elif _module_file("vhost_net"):
            message = (
                "/dev/vhost-net is missing: the vhost_net module is not loaded (modprobe vhost_net)"
            )
        else:
            message = (
                "/dev/vhost-net is missing and this kernel has no vhost_net module "
                "(CONFIG_VHOST_NET): every virtio-net NIC falls back to QEMU's data path"
            )
        return [Check(ids.HOST_VHOST_NET, FAIL, message, {"path": dev, "module_loaded": loaded})]
    checks = [
        Check(ids.HOST_VHOST_NET, PASS, "/dev/vhost-net is present",
              {"path": dev, "module_loaded": loaded, "mode": oct(st.st_mode & 0o777)})
    ]  # fmt: skip
    try:
        os.close(os.open(dev, os.O_RDWR))
        checks.append(Check(ids.HOST_VHOST_NET_ACCESS, PASS, "/dev/vhost-net opens read-write"))
    except OSError as err:
        checks.append(
            Check(ids.HOST_VHOST_NET_ACCESS, FAIL, f"/dev/vhost-net does not open: {err.strerror}")
        )
    return checks


def _tun(paths: Paths) -> Check:
    dev = f"{paths.dev}/net/tun"
    if _char_device(dev) is None:
        return Check(ids.HOST_TUN, FAIL, "/dev/net/tun is missing: load the tun module")
    try:
        os.close(os.open(dev, os.O_RDWR))
    except OSError as err:
        return Check(ids.HOST_TUN, FAIL, f"/dev/net/tun does not open: {err.strerror}")
    return Check(ids.HOST_TUN, PASS, "/dev/net/tun opens read-write")


def kvm_check(paths: Paths) -> Check:
    dev = f"{paths.dev}/kvm"
    if _char_device(dev) is None:
        return Check(ids.HOST_KVM, FAIL, "/dev/kvm is missing: no hardware virtualization, and "
                     "libvirt uses vhost only for type='kvm' domains")  # fmt: skip
    import fcntl

    try:
        fd = os.open(dev, os.O_RDWR)
    except OSError as err:
        return Check(ids.HOST_KVM, FAIL, f"/dev/kvm does not open: {err.strerror}")
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as err:
        return Check(ids.HOST_KVM, FAIL, f"/dev/kvm does not answer KVM_GET_API_VERSION: {err}")
    finally:
        os.close(fd)
    modules = sorted(m for m in ("kvm_intel", "kvm_amd", "kvm_pvm")
                     if os.path.isdir(f"{paths.sys}/module/{m}"))  # fmt: skip
    evidence: dict[str, object] = {"api_version": version, "modules": modules}
    if version != KVM_API_VERSION:
        return Check(ids.HOST_KVM, FAIL, f"/dev/kvm speaks API {version}, not {KVM_API_VERSION}",
                     evidence)  # fmt: skip
    if modules == ["kvm_pvm"]:
        return Check(ids.HOST_KVM, WARN, "KVM here is kvm_pvm (paravirtualized, for running "
                     "inside a cloud VM): QEMU starts with it, but stock guest kernels may hang",
                     evidence)  # fmt: skip
    if not modules:
        return Check(ids.HOST_KVM, UNKNOWN, "/dev/kvm answers, from no module vhostorch knows",
                     evidence)  # fmt: skip
    return Check(ids.HOST_KVM, PASS, f"/dev/kvm is usable ({', '.join(modules)})", evidence)


# vhost's fork-owner control (CONFIG_VHOST_ENABLE_FORK_OWNER_CONTROL: Linux 6.16, and Debian's
# 6.12 backport): N makes each new device's worker a kernel thread again, as before 6.4.
FORK_FROM_OWNER = "module/vhost/parameters/fork_from_owner_default"


def _worker_model(sysfs: str = "/sys") -> Check:
    release = os.uname().release
    parts = release.split(".")
    try:
        version = (int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0))
    except (ValueError, IndexError):
        return Check(ids.HOST_WORKER_MODEL, UNKNOWN, f"cannot read kernel version {release!r}")
    try:
        with open(os.path.join(sysfs, FORK_FROM_OWNER)) as f:
            fork_owner: str | None = f.read().strip()
    except OSError:
        fork_owner = None  # no such control, or vhost not loaded: the kernel's default
    evidence: dict[str, object] = {"kernel": release}
    if fork_owner is not None:
        evidence["fork_from_owner_default"] = fork_owner
    if version >= (6, 4) and fork_owner == "N":
        message = (
            "vhost workers are kernel threads named vhost-<QEMU pid>: vhost's "
            "fork_from_owner_default is N (the fork-owner mode, off)"
        )
        model = "kthread"
    elif version >= (6, 4):
        message = "vhost workers are threads inside each QEMU (vhost_task, Linux 6.4 and later)"
        model = "task"
    else:
        message = "vhost workers are kernel threads named vhost-<QEMU pid> (before Linux 6.4)"
        model = "kthread"
    return Check(ids.HOST_WORKER_MODEL, PASS, message, {**evidence, "model": model})


def _trace(paths: Paths) -> Check:
    from vhostorch.check import wiring

    tracefs = f"{paths.sys}/kernel/tracing"
    if wiring.armed(tracefs):
        return Check(ids.HOST_TRACE, PASS, "the wiring trace is armed: nic.kick and nic.call can "
                     "be proved for QEMUs whose guest drivers start from now on")  # fmt: skip
    if not os.path.exists(f"{tracefs}/kprobe_events"):
        return Check(ids.HOST_TRACE, WARN, f"no tracefs with kprobe events at {tracefs}: nic.kick "
                     "and nic.call will be unknown (mount -t tracefs tracefs "
                     f"{tracefs}; CONFIG_KPROBE_EVENTS)")  # fmt: skip
    return Check(ids.HOST_TRACE, WARN, "the wiring trace is not armed: nic.kick and nic.call will "
                 "be unknown (vhostorch trace arm, before VMs start)")  # fmt: skip


def trace_at_boot(paths: Paths) -> Check:
    """host.trace.boot: the boot unit is installed, enabled and runnable (host.bootunit)."""
    from vhostorch.host import bootunit

    found = bootunit.state(paths.systemd)
    evidence: dict[str, object] = {"unit": found.path, "installed": found.installed,
                                   "enabled_by": list(found.enabled_by),
                                   "exec_start": found.exec_start}  # fmt: skip
    fix = "vhostorch trace install-unit"
    if found.armed_at_boot:
        return Check(ids.HOST_TRACE_BOOT, PASS, f"{bootunit.NAME} arms the wiring trace at "
                     "boot, before libvirt starts VMs", evidence)  # fmt: skip
    if found.refused:
        why = found.refused
        evidence["refused"] = found.refused
    elif not found.installed:
        why = f"{found.path} is not installed (or not vhostorch's)"
    elif "multi-user.target" not in found.enabled_by:
        why = f"{bootunit.NAME} is not enabled (no multi-user.target.wants/ link)"
    else:
        why = f"its ExecStart does not run ({found.exec_start}): vhostorch moved or was removed"
    return Check(ids.HOST_TRACE_BOOT, WARN, f"the wiring trace will not be armed at next boot: "
                 f"{why}; VMs autostarted then get nic.kick/nic.call unknown ({fix})",
                 evidence)  # fmt: skip


def root_code() -> Check:
    """host.root-code: the code the hook and the boot unit make root run is root's alone."""
    import sys

    from vhostorch import rootcode

    found = rootcode.findings(sys.executable, rootcode.UNIT_FLAGS)
    found += [f for f in rootcode.findings(sys.executable, rootcode.HOOK_FLAGS) if f not in found]
    evidence: dict[str, object] = {"interpreter": sys.executable, "package": rootcode.PACKAGE,
                                   "findings": found}  # fmt: skip
    if not found:
        return Check(ids.HOST_ROOT_CODE, PASS, "the interpreter and the vhostorch package the "
                     "hook and the boot unit run as root are root's alone", evidence)  # fmt: skip
    more = f" (and {len(found) - 1} more, in the evidence)" if len(found) > 1 else ""
    return Check(ids.HOST_ROOT_CODE, WARN, f"root would run code others can change: {found[0]}"
                 f"{more}; hook install and trace install-unit refuse (install vhostorch where "
                 "only root can write)", evidence)  # fmt: skip


def _libvirt(paths: Paths) -> list[Check]:
    try:
        conf = qemuconf.read(paths.qemu_conf)
    except OSError as err:
        return [
            Check(ids.HOST_LIBVIRT_ACL, UNKNOWN, f"cannot read {paths.qemu_conf}: {err.strerror}")
        ]
    if conf is None:
        return [
            Check(ids.HOST_LIBVIRT_ACL, UNKNOWN, f"libvirt is not installed ({paths.qemu_conf})")
        ]
    checks = []
    acl = qemuconf.device_acl(conf)
    if acl is None:
        checks.append(
            Check(
                ids.HOST_LIBVIRT_ACL,
                PASS,
                "cgroup_device_acl is libvirt's default; "
                "libvirt opens /dev/vhost-net itself and passes the fds to QEMU",
            )
        )
    elif "/dev/vhost-net" in acl:
        checks.append(
            Check(
                ids.HOST_LIBVIRT_ACL,
                PASS,
                "cgroup_device_acl lists /dev/vhost-net",
                {"cgroup_device_acl": list(acl)},
            )
        )
    else:
        checks.append(
            Check(
                ids.HOST_LIBVIRT_ACL,
                WARN,
                "cgroup_device_acl is set without /dev/vhost-net: a QEMU that opens "
                "it itself (hot-plug without fds) is refused",
                {"cgroup_device_acl": list(acl)},
            )
        )
    checks.append(_qemu_user(qemuconf.qemu_user(conf), paths))
    return checks


def _qemu_user(user: str | None, paths: Paths) -> Check:
    import grp
    import pwd

    if user is None:
        defaults = ", ".join(qemuconf.DEFAULT_USERS)
        return Check(ids.HOST_LIBVIRT_USER, FAIL, "qemu.conf sets no user, and none of libvirt's "
                     f"default QEMU users ({defaults}) exists")  # fmt: skip
    numeric = user.isascii() and user.isdigit()  # str.isdigit() alone takes '²'
    try:
        entry = pwd.getpwuid(int(user)) if numeric else pwd.getpwnam(user)
    except (KeyError, OverflowError, ValueError):
        return Check(ids.HOST_LIBVIRT_USER, FAIL, f"libvirt's QEMU user {user!r} does not exist")
    groups = {g.gr_gid for g in grp.getgrall() if entry.pw_name in g.gr_mem} | {entry.pw_gid}
    try:
        st = os.stat(f"{paths.dev}/kvm")
    except OSError:
        return Check(ids.HOST_LIBVIRT_USER, UNKNOWN, "no /dev/kvm to check access to")
    mode = st.st_mode
    allowed = (
        entry.pw_uid == 0
        or (st.st_uid == entry.pw_uid and mode & 0o600 == 0o600)
        or (st.st_gid in groups and mode & 0o060 == 0o060)
        or mode & 0o006 == 0o006
    )
    evidence: dict[str, object] = {"user": entry.pw_name, "kvm_gid": st.st_gid,
                                   "kvm_mode": oct(mode & 0o777)}  # fmt: skip
    if not allowed:
        return Check(
            ids.HOST_LIBVIRT_USER,
            FAIL,
            f"libvirt's QEMU user {entry.pw_name} cannot open /dev/kvm",
            evidence,
        )
    return Check(ids.HOST_LIBVIRT_USER, PASS,
                 f"libvirt's QEMU user {entry.pw_name} can open /dev/kvm (taps and vhost-net "
                 "are opened by libvirtd and passed as fds)", evidence)  # fmt: skip


def _nofile() -> Check:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    evidence: dict[str, object] = {"soft": soft, "hard": hard, "wanted": NOFILE_WANTED}
    if soft != resource.RLIM_INFINITY and soft < NOFILE_WANTED:
        return Check(
            ids.HOST_NOFILE,
            WARN,
            f"open-file limit {soft} is low for many queues (a queue pair costs about "
            f"6 fds); raise it to {NOFILE_WANTED} or more (libvirt: max_files)",
            evidence,
        )
    return Check(ids.HOST_NOFILE, PASS, f"open-file limit {soft} allows many queues", evidence)


def doctor(paths: Paths | None = None) -> Report:
    """Validate this host for vhost-net before any VM runs."""
    paths = paths or Paths()
    checks = [*vhost_net_checks(paths), _tun(paths), kvm_check(paths), _worker_model(paths.sys)]
    from vhostorch.check import live  # host.live: reading the kernel's state, not a trace

    checks += [live.host_check(), _trace(paths), trace_at_boot(paths), root_code()]
    checks += [*_libvirt(paths), _nofile()]
    return Report(HostTarget(os.uname().nodename, os.uname().release), (), tuple(checks))
