"""What a QEMU command line asked for: tap netdevs (vhost, fds, queues), virtio-net devices, accel.

Reads both spellings QEMU accepts: ``key=value,...`` (with ``,,`` for a comma)
and the JSON form libvirt uses (``-netdev {"type":"tap","fds":"31:32",...}``).
"""

from __future__ import annotations

import json

from vhostorch.record import TYPE_CHECKING, Record

if TYPE_CHECKING:
    from collections.abc import Sequence

_TRUE = ("on", "yes", "true", "y")
_FALSE = ("off", "no", "false", "n")


def split_opts(text: str, implied: str) -> dict[str, str]:
    """``a,b=c,,d`` → {implied: "a", "b": "c,d"}: QEMU's option syntax."""
    parts: list[str] = []
    current = ""
    i = 0
    while i < len(text):
        c = text[i]
        if c == "," and text[i + 1 : i + 2] == ",":
            current += ","
            i += 2
            continue
        if c == ",":
            parts.append(current)
            current = ""
        else:
            current += c
        i += 1
    parts.append(current)
    opts: dict[str, str] = {}
    for index, part in enumerate(parts):
        key, eq, value = part.partition("=")
        if not eq:
            if index == 0 and implied:
                opts[implied] = part
            else:
                opts[part] = "on"  # a bare flag
        else:
            opts[key] = value
    return opts


def _options(text: str, implied: str) -> dict[str, object]:
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}
    return dict(split_opts(text, implied))


def _bool(value: object) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        if value.lower() in _TRUE:
            return True
        if value.lower() in _FALSE:
            return False
    return None


def _int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value, 0)
        except ValueError:
            return None
    return None


def _fds(value: object) -> tuple[int, ...]:
    """``"31:32:33"`` or ``31`` → fd numbers; names of fds passed over QMP are not numbers."""
    if value is None:
        return ()
    found = []
    for part in str(value).split(":"):
        number = _int(part)
        if number is not None:
            found.append(number)
    return tuple(found)


class NetdevArg(Record):
    """One ``-netdev`` (or the netdev half of ``-nic``) as given."""

    id: str
    type: str
    vhost: bool | None
    vhostforce: bool
    fds: tuple[int, ...]
    vhostfds: tuple[int, ...]
    ifname: str | None
    queues: int | None

    @property
    def queue_pairs(self) -> int:
        """As net/tap.c counts them: the fds given, else ``queues``, else 1."""
        return len(self.fds) or self.queues or 1

    @property
    def wants_vhost(self) -> bool:
        return bool(self.vhost or self.vhostforce or self.vhostfds)


class DeviceArg(Record):
    """One virtio-net ``-device`` (or the device half of ``-nic``)."""

    driver: str
    id: str | None
    netdev: str | None
    mq: bool
    vectors: int | None
    mac: str | None


class QemuArgs(Record):
    """What a command line asked for; ``devices`` are its virtio-net devices, ``other_nics``
    its NIC devices of other models (e1000, rtl8139...), which vhost-net cannot serve."""

    name: str | None
    accel: tuple[str, ...]
    netdevs: tuple[NetdevArg, ...]
    devices: tuple[DeviceArg, ...]
    qmp: str | None
    other_nics: tuple[DeviceArg, ...] = ()

    def device_for(self, netdev: str) -> DeviceArg | None:
        for device in self.devices:
            if device.netdev == netdev:
                return device
        return None

    def other_nic_for(self, netdev: str) -> DeviceArg | None:
        """The NIC device of another model than virtio-net on ``netdev``, if any."""
        for device in self.other_nics:
            if device.netdev == netdev:
                return device
        return None


def _netdev(opts: dict[str, object]) -> NetdevArg:
    fds = _fds(opts.get("fds")) or _fds(opts.get("fd"))
    vhostfds = _fds(opts.get("vhostfds")) or _fds(opts.get("vhostfd"))
    ifname = opts.get("ifname")
    return NetdevArg(
        id=str(opts.get("id", "")),
        type=str(opts.get("type", "")),
        vhost=_bool(opts.get("vhost")),
        vhostforce=bool(_bool(opts.get("vhostforce"))),
        fds=fds,
        vhostfds=vhostfds,
        ifname=ifname if isinstance(ifname, str) else None,
        queues=_int(opts.get("queues")),
    )


def _device(opts: dict[str, object], netdev: str | None = None) -> DeviceArg:
    mac = opts.get("mac")
    return DeviceArg(
        driver=str(opts.get("driver", "")),
        id=str(opts["id"]) if "id" in opts else None,
        netdev=netdev or (str(opts["netdev"]) if "netdev" in opts else None),
        mq=bool(_bool(opts.get("mq"))),
        vectors=_int(opts.get("vectors")),
        mac=mac if isinstance(mac, str) else None,
    )


def parse(argv: Sequence[str]) -> QemuArgs:
    """Read what matters to vhost from a QEMU command line; unknown options are ignored."""
    name = None
    accel: list[str] = []
    netdevs: list[NetdevArg] = []
    devices: list[DeviceArg] = []
    others: list[DeviceArg] = []
    qmp = None
    chardevs: dict[str, str] = {}
    monitors: list[str] = []
    nics = 0
    args = list(argv[1:])
    i = 0
    while i < len(args):
        opt = args[i].lstrip("-") if args[i].startswith("-") else ""
        value = args[i + 1] if i + 1 < len(args) else ""
        i += 1
        if opt == "enable-kvm":
            accel.append("kvm")
            continue
        if opt not in ("name", "accel", "machine", "M", "netdev", "nic", "device", "qmp",
                       "chardev", "mon"):  # fmt: skip
            continue
        i += 1
        if opt == "name":
            name = str(_options(value, "guest").get("guest", "")) or None
        elif opt == "accel":
            accel.append(str(_options(value, "accel").get("accel", "")))
        elif opt in ("machine", "M"):
            machine_accel = _options(value, "type").get("accel")
            if machine_accel:
                accel += str(machine_accel).split(":")
        elif opt == "netdev":
            netdevs.append(_netdev(_options(value, "type")))
        elif opt == "nic":
            opts = _options(value, "type")
            opts.setdefault("id", f"nic{nics}")
            nics += 1
            netdevs.append(_netdev(opts))
            # -nic's default model is the machine's default NIC (virtio-net-pci for
            # the machine types vhostorch starts); "none" adds no device.
            model = str(opts.get("model", "virtio-net-pci"))
            if model.startswith("virtio"):
                devices.append(_device({**opts, "driver": model}, str(opts["id"])))
            elif model != "none":
                others.append(_device({**opts, "driver": model}, str(opts["id"])))
        elif opt == "device":
            opts = _options(value, "driver")
            if str(opts.get("driver", "")).startswith("virtio-net"):
                devices.append(_device(opts))
            elif "netdev" in opts:
                others.append(_device(opts))  # a NIC of another model (e1000, rtl8139...)
        elif opt == "qmp" and value.startswith("unix:"):
            qmp = value[len("unix:") :].split(",", 1)[0]
        elif opt == "chardev":
            opts = _options(value, "backend")
            if opts.get("backend") == "socket" and "path" in opts:
                chardevs[str(opts.get("id", ""))] = str(opts["path"])
        elif opt == "mon":
            opts = _options(value, "chardev")
            if opts.get("mode") == "control":
                monitors.append(str(opts.get("chardev", "")))
    for chardev in monitors:
        if qmp is None and chardev in chardevs:
            qmp = chardevs[chardev]
    return QemuArgs(name, tuple(accel), tuple(netdevs), tuple(devices), qmp, tuple(others))
