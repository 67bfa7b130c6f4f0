"""The hook program libvirt runs, and installing it as /etc/libvirt/hooks/qemu.d/NAME.

libvirt (6.5 and later) runs /etc/libvirt/hooks/qemu and then every executable in
qemu.d/, in name order; it looks for them when the daemon starts. vhostorch only
ever writes its own file in qemu.d/ and leaves any other hook, qemu included, as
it is. The program is thin: the interpreter, where the package is, and
vhostorch.hook.main. It runs with ``-IS`` (isolated, no site; one shebang argument): libvirt
waits for the hook on every start, and the hook needs nothing outside the
standard library and vhostorch.
"""

from __future__ import annotations

import os
import re
import sys

from vhostorch import files, rootcode
from vhostorch.errors import InvalidSpec, NotManaged, OperationFailed
from vhostorch.record import TYPE_CHECKING, Record

if TYPE_CHECKING:
    from vhostorch.host.bootunit import Action  # the same words for the boot unit's install

HOOKS_DIR = "/etc/libvirt/hooks"
DEFAULT_NAME = "vhostorch"
MARKER = "# vhostorch libvirt hook"
REPO_ROOT = "os.path.dirname(os.path.dirname(os.path.realpath(__file__)))"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# The kernel reads at most this much of a "#!" line (BINPRM_BUF_SIZE, Linux 5.1 and later);
# a longer line is cut, and the hook would run some other program, or none.
SHEBANG_MAX = 255


def program(python: str, package_root: str | None) -> str:
    """The hook program's text. ``package_root`` None: the source tree around the file
    (hooks/qemu in a checkout)."""
    where = REPO_ROOT if package_root is None else repr(package_root)
    return f"""#!{python}
{MARKER}: domain taps and vhost checks (see vhostorch.hook; exit codes there).
import os
import sys

sys.path.insert(0, {where})
from vhostorch.hook import main

sys.exit(main())
"""


def installed_program() -> str:
    """The program as installed: this interpreter, and the directory this package is in."""
    # vhostorch/hook/install.py: the directory that holds the vhostorch package.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return program(f"{sys.executable} {rootcode.HOOK_FLAGS}", root)


def refusal(python: str = sys.executable) -> str | None:
    """Why the hook must not be installed to run ``python``, or None.

    A "#!" line has no quoting: the kernel splits it at the first blank, so an interpreter
    path with one cannot be named there. And root runs what it names on every VM start, so
    all of it must be root's alone (vhostorch.rootcode).
    """
    line = f"#!{python} {rootcode.HOOK_FLAGS}"
    if any(ch.isspace() for ch in python):
        return f"the interpreter path {python!r} has a blank, which a #! line cannot hold"
    if len(os.fsencode(line)) > SHEBANG_MAX:
        return f"the interpreter path {python!r} is too long for a #! line ({SHEBANG_MAX} bytes)"
    return rootcode.refusal(python, rootcode.HOOK_FLAGS)


class Installed(Record):
    path: str
    action: Action
    other_hooks: tuple[str, ...]


def _path(name: str, hooks_dir: str) -> str:
    if not hooks_dir:
        raise InvalidSpec("the hooks directory must be a path, not an empty string")
    if not _NAME.fullmatch(name):
        raise InvalidSpec(f"hook name {name!r}: letters, digits, '.', '_', '-' (at most 64)")
    return os.path.join(hooks_dir, "qemu.d", name)


def _ours(path: str) -> str | None:
    """The text of the hook at ``path`` if vhostorch installed it; None if absent.

    Only a regular file can be ours: anything else (a FIFO, which would hang the read, a
    symlink) is refused without being opened (files.read_installed).
    """
    text = files.read_installed(path, "a hook vhostorch installed")
    if text is None:
        return None
    lines = text.splitlines()
    if len(lines) < 2 or not lines[1].startswith(MARKER):
        raise NotManaged(f"{path} exists and vhostorch did not install it; not replacing it")
    return text


def _others(hooks_dir: str, mine: str) -> tuple[str, ...]:
    found = []
    qemu = os.path.join(hooks_dir, "qemu")
    if os.path.exists(qemu):
        found.append(qemu)
    try:
        names = sorted(os.listdir(os.path.join(hooks_dir, "qemu.d")))
    except OSError:
        names = []
    found += [os.path.join(hooks_dir, "qemu.d", n) for n in names if n != mine]
    return tuple(found)


def install(name: str = DEFAULT_NAME, hooks_dir: str = HOOKS_DIR) -> Installed:
    """Write the hook (idempotent); replace only a hook vhostorch installed.

    Raises InvalidSpec (bad name or directory), NotManaged (someone else's file is there),
    OperationFailed (``refusal``: root must not run this interpreter and package).
    """
    path = _path(name, hooks_dir)
    old = _ours(path)
    why = refusal()
    if why:
        raise OperationFailed(f"not installing {path}: {why}")
    text = installed_program()
    if old != text:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        files.replace(path, text.encode(), 0o755, durable=True)
    action: Action = "unchanged" if old == text else "installed" if old is None else "updated"
    return Installed(path, action, _others(hooks_dir, name))


def uninstall(name: str = DEFAULT_NAME, hooks_dir: str = HOOKS_DIR) -> Installed:
    """Remove the hook if vhostorch installed it."""
    path = _path(name, hooks_dir)
    if _ours(path) is None:
        return Installed(path, "absent", _others(hooks_dir, name))
    os.unlink(path)
    return Installed(path, "removed", _others(hooks_dir, name))
