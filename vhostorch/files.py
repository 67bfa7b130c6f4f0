"""Files written whole: a file's bytes and mode are set before anyone reads it by its name.

`write` makes a file at a name nothing else uses (a temporary name, or one about to be
linked elsewhere); `replace` puts new contents at a name by renaming such a file over it,
so a reader sees the old file or the new one, never a part; `create` puts a whole file at
a name only if none is there (a claim: of two creators, one wins). Both open with O_NOFOLLOW, so
a symlink planted at the name is never written through, and set the mode with fchmod, so
the umask does not decide it. `read` reads such a file back, and nothing else put at its
name (a link, a FIFO that would hang the reader, a device); `read_regular` reads a file a
user names: only a regular file, never a FIFO or device opened, at most so many bytes.
Stdlib ``os`` (and ``stat``, which it imports) only: the hook's start-up path writes with it.
"""

from __future__ import annotations

import os
import stat  # os imports it: no cost

from vhostorch.errors import NotManaged
from vhostorch.errors import NotRegular as NotRegular

# Where a name becomes a file name, at most this many bytes of it (NAME_MAX is 255, and
# ".taps.tmp" and the like are added).
MAX_STEM = 200
_PLAIN = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.+@,=")
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


def _open(path: str, exclusive: bool, dir_fd: int | None = None) -> int:
    return os.open(path, _FLAGS | (os.O_EXCL if exclusive else os.O_TRUNC), 0o600, dir_fd=dir_fd)


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
    path: str,
    data: bytes,
    mode: int,
    *,
    temporary: str | None = None,
    durable: bool = False,
    dir_fd: int | None = None,
) -> None:
    """Put ``data`` at ``path`` with ``mode`` by renaming a new file over it: rename
    replaces ``path`` itself, never what a symlink there points to.

    The new file is ``temporary`` when the caller holds a lock that makes that name its own
    (a kill may leave it there, and the caller knows it by name); otherwise a random name
    beside ``path``, made with O_EXCL, so nothing already in the directory is written
    through. ``durable``: on disk before the rename (files under /run, on tmpfs, are not
    kept across a crash, so they need not be). ``dir_fd``: ``path`` (and ``temporary``)
    are relative to that open directory, which a rename of the directory's path meanwhile
    cannot change.
    """
    if temporary is None:
        tmp, fd = _beside(path, dir_fd)
    else:
        tmp, fd = temporary, _open(temporary, exclusive=False, dir_fd=dir_fd)
    try:
        _fill(fd, data, mode, durable)
        os.rename(tmp, path, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        remove(tmp, dir_fd)  # gone already when a signal came after the rename
        raise


def _beside(path: str, dir_fd: int | None = None) -> tuple[str, int]:
    """A new file of a random name beside ``path``, made with O_EXCL, and its fd."""
    directory, base = os.path.split(path)
    while True:
        # os.urandom, not secrets.token_hex: the same bytes, without importing random
        tmp = os.path.join(directory, f".{base}.{os.urandom(8).hex()}.new")
        try:
            return tmp, _open(tmp, exclusive=True, dir_fd=dir_fd)
        except FileExistsError:
            continue  # someone's file has that name: draw another


def create(path: str, data: bytes, mode: int, *, temporary: str) -> bool:
    """Put ``data`` at ``path`` unless something is there already: True when it was put.

    The file is written whole at ``temporary`` (a name the caller owns under its lock, on
    the same file system, so that what a kill leaves there is known and replaced next
    time) and then hard-linked to ``path`` (link fails if the name exists), so no reader
    ever sees it empty or half written.
    """
    tmp, fd = temporary, _open(temporary, exclusive=False)
    try:
        _fill(fd, data, mode, False)
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        remove(tmp)
    return True


def makedirs(path: str, mode: int) -> None:
    """Make ``path`` and its missing parents as directories of ``mode``, whatever the umask
    (mkdir's mode is masked by it); a directory already there keeps its mode."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    if parent != path:
        makedirs(parent, mode)
    try:
        os.mkdir(path, 0o700)  # nobody else can enter it before its mode is set
    except FileExistsError:
        if os.path.isdir(path):
            return  # made meanwhile by someone else: theirs, and its mode too
        raise
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def read(path: str, limit: int = 1 << 20) -> bytes:
    """The bytes of the regular file at ``path``, at most ``limit``; opened with O_NOFOLLOW
    and O_NONBLOCK, so a link there is not followed and a FIFO does not block. Raises
    OSError (FileNotFoundError when there is none; ELOOP for a link; EINVAL for what is not a
    regular file; EFBIG past ``limit``)."""
    import errno
    import stat

    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        data = b""
        while chunk := os.read(fd, limit + 1 - len(data)):
            data += chunk
            if len(data) > limit:
                raise OSError(errno.EFBIG, f"larger than {limit} bytes", path)
        return data
    finally:
        os.close(fd)


def remove(path: str, dir_fd: int | None = None) -> None:
    """Unlink ``path`` (relative to ``dir_fd`` when given); one already gone is no error."""
    try:
        os.unlink(path, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def stem(name: str) -> str:
    """``name`` as the start of a file name: one file per name, whatever libvirt allows.

    Letters, digits and ``-_.+@,=`` stay (so ordinary names keep their files); every
    other byte of the UTF-8 name, and a leading dot, becomes ``%XX``, which reads back.
    A stem longer than MAX_STEM keeps its first bytes and ends in ``~`` and the SHA-256
    of the whole name (``~`` is always escaped, so such a stem is never a short one).
    """
    raw = os.fsencode(name)  # argv's undecodable bytes come back as they were
    stem = "".join(
        chr(b) if b in _PLAIN and not (i == 0 and b == 0x2E) else f"%{b:02X}"
        for i, b in enumerate(raw)
    )
    if not raw:
        stem = "%"  # no byte escapes to a lone %
    if len(stem) > MAX_STEM:
        import hashlib  # only for names this long

        stem = f"{stem[: MAX_STEM - 65]}~{hashlib.sha256(raw).hexdigest()}"
    return stem


_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket",
          stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFLNK: "a symlink"}  # fmt: skip


def _kind(path: str, mode: int) -> NotRegular:
    return NotRegular(path, _KINDS.get(stat.S_IFMT(mode), "not a regular file"))


def read_regular(path: str, limit: int, *, follow: bool = False) -> bytes:
    """At most ``limit`` bytes of the regular file at ``path`` (ask for one more than you
    accept to learn that a file is too long). Raises NotRegular for anything else, and the
    OSError of a failed stat, open or read (FileNotFoundError when nothing is there).

    Anything but a regular file is refused from its stat alone, never opened: opening a
    FIFO for reading waits for a writer, and opening some devices acts (a watchdog starts
    counting). The open adds O_NONBLOCK and fstat checks again, for a FIFO put in its place
    meanwhile. ``follow``: a symlink is followed (a path the caller chose); otherwise it is
    refused, as a symlink planted in a directory others write.
    """
    mode = (os.stat(path) if follow else os.lstat(path)).st_mode
    if not stat.S_ISREG(mode):
        raise _kind(path, mode)
    nofollow = 0 if follow else os.O_NOFOLLOW
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | nofollow)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _kind(path, mode)
        chunks: list[bytes] = []
        left = limit
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 16))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_installed(path: str, what: str) -> str | None:
    """The text of a file vhostorch may have installed at ``path`` (a hook, a unit), None when
    nothing is there. Raises NotManaged, naming ``what`` ("a hook vhostorch installed"), for
    anything but a regular file (refused unopened: a FIFO would hang the read) or one that
    cannot be read; whether the text is vhostorch's is the caller's to judge."""
    try:
        return read_regular(path, 1 << 16).decode(errors="replace")
    except FileNotFoundError:
        return None
    except NotRegular as err:
        raise NotManaged(f"{path} is {err.what}, not {what}; not replacing it") from None
    except OSError as err:
        why = err.strerror or str(err)
        raise NotManaged(f"{path} cannot be read ({why}); not replacing it") from err
