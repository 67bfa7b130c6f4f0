"""An exclusive lock held for a whole command (flock), whose file goes with the state it guards."""

from __future__ import annotations

import os


class Lock:
    """flock on ``path``, created if need be, in a directory the caller made (vhostorch.rundir);
    on release the file is removed when ``state`` (the file the lock guards) does not exist,
    so nothing stays behind. A waiter that then holds a lock on the removed file retries on
    the new one."""

    def __init__(self, path: str, state: str) -> None:
        self.path = path
        self.state = state
        self.fd = -1

    def __enter__(self) -> Lock:
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            os.fchmod(fd, 0o600)  # not the umask's choice
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    self.fd = fd
                    return self
            except FileNotFoundError:
                pass
            os.close(fd)  # the file was removed while we waited: lock the new one

    def __exit__(self, *exc: object) -> None:
        if not os.path.exists(self.state):
            os.unlink(self.path)
        os.close(self.fd)
