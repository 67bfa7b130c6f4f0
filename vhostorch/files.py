"""Files written whole: a file's bytes and mode are set before anyone reads it by its name.

`write` makes a file at a name nothing else uses (a temporary name, or one about to be
linked elsewhere); `replace` puts new contents at a name by renaming such a file over it,
so a reader sees the old file or the new one, never a part. Both open with O_NOFOLLOW, so
a symlink planted at the name is never written through, and set the mode with fchmod, so
the umask does not decide it. Stdlib ``os`` only: the hook's start-up path writes with it.
"""

from __future__ import annotations

import os

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


def _open(path: str, exclusive: bool) -> int:
    return os.open(path, _FLAGS | (os.O_EXCL if exclusive else os.O_TRUNC), 0o600)


def _fill(fd: int, data: bytes, mode: int, durable: bool) -> None:
    try:
        os.fchmod(fd, mode)  # O_CREAT's mode is masked by the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def write(path: str, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` with ``mode``, truncating what is there."""
    _fill(_open(path, False), data, mode, False)


def replace(
    path: str, data: bytes, mode: int, *, temporary: str | None = None, durable: bool = False
) -> None:
    """Put ``data`` at ``path`` with ``mode`` by renaming a new file over it: rename
    replaces ``path`` itself, never what a symlink there points to.

    The new file is ``temporary`` when the caller holds a lock that makes that name its own
    (a kill may leave it there, and the caller knows it by name); otherwise a random name
    beside ``path``, made with O_EXCL, so nothing already in the directory is written
    through. ``durable``: on disk before the rename (files under /run, on tmpfs, are not
    kept across a crash, so they need not be).
    """
    directory, base = os.path.split(path)
    while True:
        # os.urandom, not secrets.token_hex: the same bytes, without importing random
        tmp = temporary or os.path.join(directory, f".{base}.{os.urandom(8).hex()}.new")
        try:
            fd = _open(tmp, exclusive=temporary is None)
            break
        except FileExistsError:
            continue  # someone's file has that name: draw another
    try:
        _fill(fd, data, mode, durable)
        os.rename(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def remove(path: str) -> None:
    """Unlink ``path``; one already gone is no error."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
