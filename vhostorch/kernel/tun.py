"""The /dev/net/tun ioctls: make a persistent tap, and re-tune one nobody holds open.

Taps cannot be created over rtnetlink (tun's rtnl ops refuse it), so this is how
iproute2 and QEMU do it too. The device is made in the namespace of the calling
thread at the moment /dev/net/tun is opened.
"""

from __future__ import annotations

import fcntl
import os
import struct

from vhostorch.inputs import IFNAMSIZ
from vhostorch.record import TYPE_CHECKING, Record

if TYPE_CHECKING:
    from collections.abc import Callable

TUN_DEVICE = "/dev/net/tun"
# linux/if_tun.h
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOWNER = 0x400454CC
TUNSETGROUP = 0x400454CE
IFF_TAP = 0x0002
IFF_MULTI_QUEUE = 0x0100
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_TUN_EXCL = 0x8000  # fail with EBUSY instead of attaching to an existing device
_IFREQ = struct.Struct(f"{IFNAMSIZ}sH22x")


class TapFlags(Record):
    """What QEMU asks for when it opens the tap: the device must have been made the same way."""

    multi_queue: bool
    vnet_hdr: bool

    def ifr_flags(self) -> int:
        flags = IFF_TAP | IFF_NO_PI
        if self.multi_queue:
            flags |= IFF_MULTI_QUEUE
        if self.vnet_hdr:
            flags |= IFF_VNET_HDR
        return flags


def _attach(name: str, flags: int) -> int:
    fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(name.encode(), flags))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _id_arg(value: int) -> int:
    """A uid or gid as fcntl.ioctl's int argument, which it passes as a C int (an id from
    2**31 up is an OverflowError there). tun reads the argument back as a 32-bit uid_t/gid_t
    (make_kuid/make_kgid), so the same 32 bits, read as signed, are that id."""
    return value - (1 << 32) if value >= 1 << 31 else value


def _own(fd: int, owner: int | None, group: int | None) -> None:
    if owner is not None:
        fcntl.ioctl(fd, TUNSETOWNER, _id_arg(owner))
    if group is not None:
        fcntl.ioctl(fd, TUNSETGROUP, _id_arg(group))


def create_tap(
    name: str,
    flags: TapFlags,
    owner: int | None,
    group: int | None,
    label: Callable[[], object] | None = None,
) -> None:
    """Create a persistent tap; raises OSError(EBUSY) if the name is taken.

    ``label`` runs once the device exists and before it is made persistent: until then it
    lives only as long as this fd (closing a non-persistent tap's last fd deletes it, and
    a SIGKILL closes it), so what ``label`` sets on the device is on every tap this call
    can leave behind.
    """
    fd = _attach(name, flags.ifr_flags() | IFF_TUN_EXCL)
    try:
        _own(fd, owner, group)
        if label is not None:
            label()
        fcntl.ioctl(fd, TUNSETPERSIST, 1)
    finally:
        os.close(fd)


def retune_tap(name: str, flags: TapFlags, owner: int | None, group: int | None) -> None:
    """Attach to an existing persistent tap to change vnet_hdr, owner or group.

    TUNSETIFF on an existing device replaces its feature flags (vnet_hdr, no_pi)
    with the caller's, which is what makes vnet_hdr changeable in place. The
    queue mode must match the device's, else the kernel answers EINVAL.
    """
    fd = _attach(name, flags.ifr_flags())
    try:
        _own(fd, owner, group)
    finally:
        os.close(fd)


def open_queues(name: str, queues: int, vnet_hdr: bool = True) -> list[int]:
    """Open tap ``name`` once per queue as QEMU does; return the fds (to pass to QEMU).

    IFF_MULTI_QUEUE is asked for exactly when queues > 1, as net/tap-linux.c
    does. All or nothing: on a failure the fds opened so far are closed and the
    OSError (EINVAL for a queue-mode mismatch, EBUSY when a single-queue tap is
    already held) propagates.
    """
    flags = TapFlags(queues > 1, vnet_hdr).ifr_flags()
    fds: list[int] = []
    try:
        for _ in range(queues):
            fds.append(_attach(name, flags))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def holders(name: str, proc: str = "/proc") -> list[tuple[int, str]]:
    """(pid, command) of processes holding a tun fd attached to ``name`` (any namespace)."""
    found: list[tuple[int, str]] = []
    wanted = f"iff:\t{name}\n"
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        try:
            for fd in os.scandir(f"{entry.path}/fdinfo"):
                with open(fd.path) as info:
                    if wanted in info.read():
                        with open(f"{entry.path}/comm") as comm:
                            found.append((int(entry.name), comm.read().strip()))
                        break
        except OSError:
            continue  # the process ended or is not ours to read
    return found
