"""Whether the code an installed hook or boot unit makes root run can be changed by anyone else.

The libvirt hook (``python -IS``) and the trace unit (``python -I -m vhostorch``) make root run
this interpreter, the vhostorch package and whatever that interpreter loads at start-up. If a
user other than root can change any of it, that user becomes root at the next VM start or boot.
``findings`` lists what root would run and others can change, so that installing refuses and
``doctor`` warns:

- the interpreter, following each symlink to it;
- every file and directory of the vhostorch package (its ``__pycache__`` too: root loads it);
- each directory on the module path that interpreter builds in that mode (``-IS``: the package
  root and the standard library; ``-I``: site-packages too), and the files at their top (a
  ``.pth`` there runs at start-up, a module there shadows one imported later), and a
  virtualenv's ``pyvenv.cfg`` (it says where the standard library is);
- every directory above each of these.

"Can change" means: not owned by root, or writable by a group other than root's or by others.
A sticky directory above (``/tmp``) is allowed: nobody else can rename or delete an entry of
root's in it. ACLs are not read.
"""

from __future__ import annotations

import os
import stat
import sys

from vhostorch.record import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable

# The package this module is in: vhostorch/.
PACKAGE = os.path.dirname(os.path.abspath(__file__))
HOOK_FLAGS = "-IS"  # how the libvirt hook runs the interpreter (hook.install)
UNIT_FLAGS = "-I"  # how the trace unit runs it (host.bootunit)
_MAX_LINKS = 40  # as the kernel's own limit on symlinks followed (MAXSYMLINKS)


def _why(path: str, st: os.stat_result) -> str | None:
    """Why others can change what ``st`` describes, or None."""
    if st.st_uid != 0:
        return f"{path} belongs to uid {st.st_uid}, not root"
    if st.st_mode & stat.S_IWOTH and not (stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX):
        return f"{path} is writable by everyone (mode {stat.S_IMODE(st.st_mode):04o})"
    if st.st_mode & stat.S_IWGRP and st.st_gid != 0:
        if stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX:
            return None
        return f"{path} is writable by group {st.st_gid} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _above(path: str) -> list[str]:
    """``path``'s directories from ``/`` down, and ``path`` itself."""
    path = os.path.abspath(path)
    found = [path]
    while (parent := os.path.dirname(path)) != path:
        found.append(parent)
        path = parent
    return found[::-1]


def _chain(path: str) -> list[str]:
    """``path``, then each symlink's target in turn (relative ones from the link's directory)."""
    chain = [os.path.abspath(path)]
    while os.path.islink(chain[-1]) and len(chain) <= _MAX_LINKS:
        target = os.readlink(chain[-1])
        chain.append(os.path.normpath(os.path.join(os.path.dirname(chain[-1]), target)))
    return chain


def _module_path(interpreter: str, flags: str) -> list[str]:
    """The module path ``interpreter`` builds when run with ``flags`` (as the hook or unit
    runs it; -I ignores the environment, so this process's does not change the answer)."""
    import subprocess

    done = subprocess.run(
        [interpreter, flags, "-c", "import sys; print('\\0'.join(sys.path))"],
        capture_output=True,
        text=True,
        errors="surrogateescape",
        env={},
        timeout=30,
    )
    if done.returncode != 0:
        return []  # the interpreter itself is then reported, or does not run at all
    return [p for p in done.stdout.rstrip("\n").split("\0") if p]


def _paths(interpreter: str, flags: str) -> Iterable[str]:
    """Each path root would run or read code from, leaves before what holds them."""
    yield from _chain(interpreter)
    for top, dirs, names in os.walk(PACKAGE):
        dirs.sort()
        yield top
        yield from (os.path.join(top, n) for n in sorted(names))
    # Where Python looks for a virtualenv's pyvenv.cfg: beside the interpreter and above it.
    bindir = os.path.dirname(os.path.abspath(interpreter))
    yield from (os.path.join(d, "pyvenv.cfg") for d in (bindir, os.path.dirname(bindir)))
    module_path = _module_path(interpreter, flags)
    if flags == HOOK_FLAGS:
        module_path.insert(0, os.path.dirname(PACKAGE))  # the hook's sys.path.insert
    for entry in module_path:
        yield entry
        try:
            names = sorted(os.listdir(entry))
        except OSError:
            continue  # a zip, or absent: nothing below it
        yield from (os.path.join(entry, n) for n in names)


def findings(interpreter: str | None = None, flags: str = UNIT_FLAGS) -> list[str]:
    """Why others could change what root runs through ``interpreter`` with ``flags``: one
    line per path (the first reason found for it), empty when everything is root's alone."""
    interpreter = interpreter or sys.executable
    seen: set[str] = set()
    found: list[str] = []
    for leaf in _paths(interpreter, flags):
        for path in _above(leaf):
            if path in seen:
                continue
            seen.add(path)
            try:
                # Followed: what a link leads to is what root runs or reads (the links of the
                # interpreter's own chain are each listed by _chain, with their directories).
                st = os.stat(path)
            except OSError:
                continue  # absent (pyvenv.cfg outside a virtualenv): nothing to change
            why = _why(path, st)
            if why:
                found.append(why)
    return found


def refusal(interpreter: str | None = None, flags: str = UNIT_FLAGS) -> str | None:
    """``findings`` as one line (the first, and how many more), or None when there are none."""
    found = findings(interpreter, flags)
    if not found:
        return None
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    return f"root would run code others can change: {found[0]}{more}"
