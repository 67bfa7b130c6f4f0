"""Entering a named network namespace (iproute2's /run/netns/NAME) for the calling thread."""

from __future__ import annotations

import errno
import os

from vhostorch.errors import OperationFailed

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    setns = getattr(os, "setns", None)  # Python >= 3.12
    if setns is not None:
        setns(fd, CLONE_NEWNET)
        return
    import ctypes  # only paid for when a namespace is used on 3.11

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


class entered:  # lower case: used like a function, `with netns.entered(name):`
    """Run the body in namespace ``name`` (None: stay where we are), then come back.

    Sockets and tun fds opened inside stay bound to that namespace after we leave.
    A class, not contextlib: contextlib costs ~5 ms to import on the hook's path.
    """

    def __init__(self, name: str | None) -> None:
        self._name = name
        self._home = -1

    def __enter__(self) -> None:
        name = self._name
        if name is None:
            return
        try:
            target = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise OperationFailed(f"network namespace {name!r} does not exist") from None
        except OSError as err:
            raise OperationFailed(f"network namespace {name!r}: {err.strerror}") from err
        try:
            home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(target)
            except OSError as err:
                os.close(home)
                why = "not a network namespace" if err.errno == errno.EINVAL else err.strerror
                raise OperationFailed(f"cannot enter network namespace {name!r}: {why}") from err
            self._home = home
        finally:
            os.close(target)

    def __exit__(self, *exc: object) -> None:
        if self._home >= 0:
            try:
                _setns(self._home)
            finally:
                os.close(self._home)
                self._home = -1
