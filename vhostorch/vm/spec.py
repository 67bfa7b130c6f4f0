"""A VM and its NICs as the user declares them (library types, or a TOML file).

Both start backends (QMP and libvirt) take the same VmSpec. Validation happens
when a spec is made, before anything is touched, with one-line InvalidSpec
errors that name the field (``nic[1].queues``).

    name = "vm1"
    memory = 512              # MiB
    cpus = 2
    machine = "pc"            # QEMU machine type: pc (i440fx) or q35 (PCIe)
    accel = "kvm"             # kvm | tcg
    spare_ports = 4           # q35 only: free PCIe root ports for NICs hot-plugged later
    worker_cpus = "2-3"       # the CPUs its vhost-net workers run on (vhostorch pin)

    [boot]                    # a kernel (and initrd, cmdline), or a disk image
    kernel = "/srv/vm1/vmlinuz"
    initrd = "/srv/vm1/initrd.img"
    cmdline = "console=ttyS0"

    [[nic]]
    tap = "vm1-net0"          # created and owned by vhostorch
    queues = 4
    vhost = "required"        # required | preferred | off
    mac = "52:54:00:12:34:56" # default: derived from the VM name and NIC index
    bridge = "br0"
    mtu = 1500
    rx_queue_size = 1024
    tx_queue_size = 256
"""

from __future__ import annotations

from vhostorch import files, taps
from vhostorch.errors import InvalidSpec
from vhostorch.inputs import check_int, parse_mac, shown
from vhostorch.record import TYPE_CHECKING, Record

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import Any, Final, Literal, Protocol

    VhostMode = Literal["required", "preferred", "off"]
    Accel = Literal["kvm", "tcg"]
    # The backends a VM can run with (vhostorch.backends: each is registered there by it).
    BackendName = Literal["qmp", "libvirt"]

    from vhostorch.taps import TapSpec

    class Plugged(Protocol):
        """A NIC a VM has (vhostorch.vm.state.NicState is one)."""

        @property
        def tap(self) -> str: ...
        @property
        def mac(self) -> str: ...


VHOST_MODES: Final[tuple[VhostMode, ...]] = ("required", "preferred", "off")
ACCELS: Final[tuple[Accel, ...]] = ("kvm", "tcg")
MAX_MEMORY_MIB = 1 << 22  # 4 TiB
MAX_CPUS = 288
MAX_NAME = 64
MAX_SPEC_BYTES = 1 << 20  # a spec is a few hundred bytes; a MiB leaves room for comments
# QEMU accepts power-of-two ring sizes 256..1024; for kernel vhost it caps the tx ring at
# 256 (only vhost-user and vDPA get more), so a larger tx_queue_size would be ignored.
RING_SIZES = (256, 512, 1024)
KERNEL_VHOST_MAX_TX = 256
QCOW2_MAGIC = b"QFI\xfb"
# q35 has no hot-pluggable bus of its own (pcie.0 is not): each NIC, cold or hot, sits on
# a pcie-root-port, and a hot-plug needs a free one made at start. The default leaves room
# for a few NICs added later; each costs the guest a bridge to enumerate, nothing more.
DEFAULT_SPARE_PORTS = 4
MAX_SPARE_PORTS = 32
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


def check_vm_name(name: object) -> str:
    """A VM name that is also safe as a file name and a libvirt domain name."""
    if not isinstance(name, str) or not name:
        raise InvalidSpec("name must be a non-empty string")
    if len(name) > MAX_NAME or not set(name) <= _NAME_CHARS or name[0] in ".-":
        raise InvalidSpec(
            f"name {name!r} must be 1..{MAX_NAME} letters, digits, '_', '.' or '-', "
            "not starting with '.' or '-'"
        )
    return name


def disk_format(path: str) -> str:
    """qcow2 or raw, from the image's first bytes (QEMU and libvirt must be told)."""
    try:
        with open(path, "rb") as f:
            return "qcow2" if f.read(4) == QCOW2_MAGIC else "raw"
    except OSError:
        return "raw"  # QEMU or libvirt says what is wrong with the path


def default_mac(vm: str, index: int) -> str:
    """A stable locally administered MAC for NIC ``index`` of ``vm`` (52:54:00 is QEMU's OUI)."""
    import hashlib

    digest = hashlib.sha256(f"{vm}/{index}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


def accel_of(value: object) -> Accel:
    """``value`` as an accelerator name. Raises InvalidSpec for one vhostorch does not know."""
    found = next((accel for accel in ACCELS if accel == value), None)
    if found is None:
        raise InvalidSpec(f"accel must be one of {', '.join(ACCELS)}, not {shown(value)}")
    return found


class NicSpec(Record):
    """One virtio-net NIC: its tap (created by vhostorch), guest MAC, queues and vhost mode."""

    tap: TapSpec
    mac: str
    vhost: VhostMode
    rx_queue_size: int | None
    tx_queue_size: int | None

    def __init__(
        self,
        tap: TapSpec,
        mac: str,
        vhost: str = "required",
        rx_queue_size: int | None = None,
        tx_queue_size: int | None = None,
    ) -> None:
        if vhost not in VHOST_MODES:
            raise InvalidSpec(f"vhost must be one of {', '.join(VHOST_MODES)}, not {shown(vhost)}")
        for what, size in (("rx_queue_size", rx_queue_size), ("tx_queue_size", tx_queue_size)):
            if size is not None and (isinstance(size, bool) or size not in RING_SIZES):
                raise InvalidSpec(f"{what} must be one of {RING_SIZES}, not {shown(size)}")
        if vhost != "off" and tx_queue_size is not None and tx_queue_size > KERNEL_VHOST_MAX_TX:
            raise InvalidSpec(
                f"tx_queue_size {tx_queue_size}: QEMU caps it at {KERNEL_VHOST_MAX_TX} with "
                "kernel vhost-net"
            )
        self._init(
            tap=tap, mac=parse_mac(mac), vhost=vhost, rx_queue_size=rx_queue_size,
            tx_queue_size=tx_queue_size,
        )  # fmt: skip

    @property
    def queues(self) -> int:
        return self.tap.queues

    @property
    def vectors(self) -> int:
        """MSI-X vectors: one per virtqueue (2 per queue pair), the control queue, config."""
        return 2 * self.queues + 2


def is_pcie(machine: str) -> bool:
    """Whether ``machine`` is a q35 (PCI Express) machine: "q35" or a versioned "pc-q35-*"."""
    return machine == "q35" or machine.startswith("pc-q35-")


class VmSpec(Record):
    name: str
    memory: int
    cpus: int
    machine: str
    accel: Accel
    kernel: str | None
    initrd: str | None
    cmdline: str | None
    disk: str | None
    nics: tuple[NicSpec, ...]
    spare_ports: int  # free pcie-root-ports for hot-plug (q35; 0 on other machines)
    worker_cpus: str | None  # the CPUs its vhost-net workers are pinned to (kernel list format)

    @property
    def pcie(self) -> bool:
        return is_pcie(self.machine)

    @property
    def root_ports(self) -> int:
        """pcie-root-ports to make at start: one per NIC, and the spare ones (0 unless q35)."""
        return len(self.nics) + self.spare_ports if self.pcie else 0

    def __init__(
        self,
        name: str,
        nics: Sequence[NicSpec],
        memory: int = 512,
        cpus: int = 1,
        machine: str = "pc",
        accel: str = "kvm",
        kernel: str | None = None,
        initrd: str | None = None,
        cmdline: str | None = None,
        disk: str | None = None,
        spare_ports: int | None = None,
        worker_cpus: str | None = None,
    ) -> None:
        check_vm_name(name)
        check_int(memory, "memory (MiB)", 16, MAX_MEMORY_MIB)
        check_int(cpus, "cpus", 1, MAX_CPUS)
        accel_of(accel)
        if not isinstance(machine, str) or not machine or "," in machine:
            raise InvalidSpec(
                f"machine must be a QEMU machine type such as 'pc', not {shown(machine)}"
            )
        if spare_ports is None:
            spare_ports = DEFAULT_SPARE_PORTS if is_pcie(machine) else 0
        check_int(spare_ports, "spare_ports", 0, MAX_SPARE_PORTS)
        if spare_ports and not is_pcie(machine):
            raise InvalidSpec(
                f"spare_ports is for q35 machines (PCIe root ports); machine {machine!r} "
                "hot-plugs on its own PCI bus"
            )
        if (kernel is None) == (disk is None):
            raise InvalidSpec("boot needs exactly one of kernel or disk")
        if kernel is None and (initrd is not None or cmdline is not None):
            raise InvalidSpec("initrd and cmdline go with kernel, not with disk")
        for what, path in (("kernel", kernel), ("initrd", initrd), ("disk", disk)):
            if path is not None and (not isinstance(path, str) or not path.startswith("/")):
                raise InvalidSpec(f"{what} must be an absolute path, not {shown(path)}")
        if cmdline is not None and not isinstance(cmdline, str):
            raise InvalidSpec("cmdline must be a string")
        if worker_cpus is not None:
            from vhostorch.kernel.cpus import cpu_list

            worker_cpus = cpu_list(worker_cpus, "worker_cpus")
        if not nics:
            raise InvalidSpec("a VM needs at least one nic")
        taps.check_batch([n.tap for n in nics])
        macs = [n.mac for n in nics]
        if len(set(macs)) != len(macs):
            raise InvalidSpec("two NICs have the same MAC address")
        self._init(
            name=name, memory=memory, cpus=cpus, machine=machine, accel=accel, kernel=kernel,
            initrd=initrd, cmdline=cmdline, disk=disk, nics=tuple(nics), spare_ports=spare_ports,
            worker_cpus=worker_cpus,
        )  # fmt: skip


_VM_KEYS = {
    "name", "memory", "cpus", "machine", "accel", "boot", "nic", "spare_ports", "worker_cpus",
}  # fmt: skip
_BOOT_KEYS = {"kernel", "initrd", "cmdline", "disk"}
# The [[nic]] keys that spell a tap's attributes (taps.spec.ATTRS; `mac` is the guest's).
_TAP_KEYS = {"name": "tap", "queues": "queues", "mtu": "mtu", "bridge": "bridge",
             "owner": "owner", "group": "group"}  # fmt: skip
_NIC_KEYS = {*_TAP_KEYS.values(), "vhost", "mac", "rx_queue_size", "tx_queue_size"}


def _unknown(where: str, given: Mapping[str, object], known: set[str]) -> None:
    extra = sorted(set(given) - known)
    if extra:
        raise InvalidSpec(f"{where}: unknown key {extra[0]!r} (known: {', '.join(sorted(known))})")


def from_mapping(data: Mapping[str, Any]) -> VmSpec:
    """A VmSpec from parsed TOML (or any mapping of the same shape). Raises InvalidSpec."""
    _unknown("vm", data, _VM_KEYS)
    name = check_vm_name(data.get("name"))
    boot = data.get("boot", {})
    if not isinstance(boot, dict):
        raise InvalidSpec("boot must be a table")
    _unknown("boot", boot, _BOOT_KEYS)
    entries = data.get("nic", [])
    if not isinstance(entries, list):
        raise InvalidSpec("nic must be an array of tables ([[nic]])")
    nics = [nic_from_mapping(name, index, entry) for index, entry in enumerate(entries)]
    return VmSpec(
        name,
        nics,
        memory=data.get("memory", 512),
        cpus=data.get("cpus", 1),
        machine=data.get("machine", "pc"),
        accel=data.get("accel", "kvm"),
        kernel=boot.get("kernel"),
        initrd=boot.get("initrd"),
        cmdline=boot.get("cmdline"),
        disk=boot.get("disk"),
        spare_ports=data.get("spare_ports"),
        worker_cpus=data.get("worker_cpus"),
    )


def default_tap(vm: str, index: int) -> str:
    return f"{vm[:10]}-n{index}"


def next_nic_index(vm: str, nics: Sequence[Plugged]) -> int:
    """The index of a new NIC of ``vm`` besides ``nics``: the first one from ``len(nics)`` on
    whose default tap name and MAC are both free (a NIC unplugged earlier leaves a gap, and a
    NIC added with an explicit tap or MAC may hold a later index's defaults)."""
    taken = {n.tap for n in nics} | {n.mac for n in nics}
    return next(
        i
        for i in range(len(nics), len(nics) + len(taken) + 1)
        if {default_tap(vm, i), default_mac(vm, i)}.isdisjoint(taken)
    )


def nic_from_mapping(vm: str, index: int, entry: object) -> NicSpec:
    """NIC ``index`` of VM ``vm`` from one ``[[nic]]`` table. Raises InvalidSpec naming it."""
    where = f"nic[{index}]"
    if not isinstance(entry, dict):
        raise InvalidSpec(f"{where} must be a table")
    _unknown(where, entry, _NIC_KEYS)
    try:
        tap = taps.tap_from_mapping(entry, _TAP_KEYS, defaults={"name": default_tap(vm, index)})
        return NicSpec(
            tap,
            entry.get("mac") or default_mac(vm, index),
            vhost=entry.get("vhost", "required"),
            rx_queue_size=entry.get("rx_queue_size"),
            tx_queue_size=entry.get("tx_queue_size"),
        )
    except InvalidSpec as err:
        raise InvalidSpec(f"{where}: {err}") from None


def load(path: str) -> VmSpec:
    """Read a VM spec from a TOML file. Raises InvalidSpec (with the file name).

    Only a regular file of at most MAX_SPEC_BYTES is read: a FIFO or a device is refused
    without being opened (a FIFO would wait for a writer, /dev/zero never ends).
    """
    import tomllib

    try:
        raw = files.read_regular(path, MAX_SPEC_BYTES + 1, follow=True)
    except files.NotRegular as err:
        raise InvalidSpec(f"{path}: is {err.what}, not a spec file") from None
    except OSError as err:
        raise InvalidSpec(f"{path}: {err.strerror or err}") from None
    if len(raw) > MAX_SPEC_BYTES:
        raise InvalidSpec(f"{path}: longer than {MAX_SPEC_BYTES} bytes; not a spec file")
    try:
        data = tomllib.loads(raw.decode())
    except UnicodeDecodeError as err:
        raise InvalidSpec(f"{path}: not UTF-8 text (byte {err.start})") from None
    except tomllib.TOMLDecodeError as err:
        raise InvalidSpec(f"{path}: not valid TOML: {err}") from None
    except RecursionError:
        # tomllib parses nested arrays and inline tables by recursion.
        raise InvalidSpec(f"{path}: arrays or tables nested too deeply") from None
    except ValueError:
        # tomllib lets int()'s own limit through: a decimal of more than 4300 digits.
        raise InvalidSpec(f"{path}: a number in it is too long to be read") from None
    try:
        return from_mapping(data)
    except InvalidSpec as err:
        raise InvalidSpec(f"{path}: {err}") from None
