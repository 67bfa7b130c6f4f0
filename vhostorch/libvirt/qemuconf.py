"""libvirt's qemu.conf: its syntax, read the way libvirtd reads it, and the settings vhostorch
needs from it (the user QEMU runs as; the device ACL). Used by the hook and by doctor.

The syntax is libvirt's virconf (src/util/virconf.c): ``name = value`` statements
separated by newlines or ';', where a value is a string ("..." or '...' on one
line, or triple-quoted over several, with no escapes), an integer, or a list of
them in brackets that may span lines; '#' starts a comment outside strings.
When a name is set twice, libvirt uses the first setting (virConfGetValue).

libvirtd refuses to start on a malformed file, so a host that runs VMs has none;
what cannot be read here is skipped (to the end of its line) rather than refused.
On the hook's start-up path: stdlib ``pwd`` only.
"""

from __future__ import annotations

from vhostorch.record import TYPE_CHECKING

if TYPE_CHECKING:
    Scalar = str | int
    Value = Scalar | tuple[Scalar, ...]

PATH = "/etc/libvirt/qemu.conf"
# libvirt's build-time default QEMU user when qemu.conf sets none: Debian's, then Fedora's.
DEFAULT_USERS = ("libvirt-qemu", "qemu")
MAX_NUMBER_DIGITS = 20  # a 64-bit value
_BLANK = " \t\r"
_NAME_START = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_NAME = _NAME_START | frozenset("0123456789_")
_DIGITS = frozenset("0123456789")


def parse(text: str) -> dict[str, Value]:
    """Every setting in ``text``: a str, an int, or a tuple of them for a list."""
    settings: dict[str, Value] = {}
    pos, end = 0, len(text)
    while True:
        pos = _skip(text, pos, lines=True)
        if pos >= end:
            return settings
        start = pos
        if text[pos] in _NAME_START:
            while pos < end and text[pos] in _NAME:
                pos += 1
        name = text[start:pos]
        pos = _skip(text, pos, lines=False)
        value = None
        if name and text.startswith("=", pos):
            value, pos = _value(text, _skip(text, pos + 1, lines=False))
        if value is None:
            newline = text.find("\n", pos)
            pos = end if newline < 0 else newline
        else:
            settings.setdefault(name, value)


def read(path: str = PATH) -> dict[str, Value] | None:
    """The settings of the qemu.conf at ``path``; None when there is none (libvirt is not
    installed). Raises OSError when it cannot be read (it is root's, mode 0600)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return parse(f.read())
    except FileNotFoundError:
        return None


def device_acl(settings: dict[str, Value]) -> tuple[str, ...] | None:
    """``cgroup_device_acl``: the devices QEMU may open itself; None for libvirt's default."""
    acl = settings.get("cgroup_device_acl")
    if acl is None:
        return None
    return tuple(str(item) for item in (acl if isinstance(acl, tuple) else (acl,)))


def configured_user(settings: dict[str, Value]) -> str | None:
    """qemu.conf's ``user``: a name, or a numeric uid (libvirt's "+0" is given as "0")."""
    user = settings.get("user")
    if not isinstance(user, str) or not user:
        return None
    return user[1:] if user.startswith("+") else user


def qemu_user(settings: dict[str, Value]) -> str | None:
    """The user libvirt runs QEMU as: qemu.conf's ``user``, else the distribution default that
    exists here (None: neither)."""
    user = configured_user(settings)
    if user is not None:
        return user
    import pwd

    for name in DEFAULT_USERS:
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    return None


def _skip(text: str, pos: int, *, lines: bool) -> int:
    """Past blanks and a comment; with ``lines``, past line ends and ';' too."""
    end = len(text)
    while pos < end:
        ch = text[pos]
        if ch == "#":
            newline = text.find("\n", pos)
            pos = end if newline < 0 else newline
        elif ch in _BLANK or (lines and ch in "\n;"):
            pos += 1
        else:
            break
    return pos


def _value(text: str, pos: int) -> tuple[Value | None, int]:
    """The value at ``pos`` and where it ends; None when there is no well-formed one."""
    if not text.startswith("[", pos):
        return _scalar(text, pos)
    items: list[Scalar] = []
    pos = _skip(text, pos + 1, lines=True)
    while not text.startswith("]", pos):
        item, pos = _scalar(text, pos)
        if item is None:
            return None, pos
        items.append(item)
        pos = _skip(text, pos, lines=True)
        if text.startswith(",", pos):
            pos = _skip(text, pos + 1, lines=True)
        elif not text.startswith("]", pos):
            return None, pos
    return tuple(items), pos + 1


def _scalar(text: str, pos: int) -> tuple[Scalar | None, int]:
    if text.startswith('"""', pos):
        close = text.find('"""', pos + 3)
        return (None, pos) if close < 0 else (text[pos + 3 : close], close + 3)
    quote = text[pos : pos + 1]
    if quote in ('"', "'"):
        close = text.find(quote, pos + 1)
        newline = text.find("\n", pos + 1)
        if close < 0 or 0 <= newline < close:
            return None, pos
        return text[pos + 1 : close], close + 1
    start = pos
    if text.startswith(("+", "-"), pos):
        pos += 1
    digits = pos
    while pos < len(text) and text[pos] in _DIGITS:
        pos += 1
    # libvirt refuses a number that overflows its 64-bit value; int() refuses 4300 digits.
    if not digits < pos <= digits + MAX_NUMBER_DIGITS:
        return None, start
    return int(text[start:pos]), pos
