"""The values a user writes, checked and read: interface and namespace names, MAC addresses,
whole numbers, user and group accounts (stdlib only).

Each check returns the value (normalised) or raises InvalidSpec with one line that names
what was given; the specs (`taps.spec`, `vm.spec`) and the adapters (the CLI's options,
the hook's XML) are made of these.
"""

from __future__ import annotations

from vhostorch.errors import InvalidSpec

IFNAMSIZ = 16  # kernel buffer size, NUL included
MAX_ID = 0xFFFFFFFE  # (uid_t)-1 means "no owner" to tun, so it is not a valid id
# No number vhostorch takes has more digits than 2**64. The bound also keeps int() away from
# its 4300-digit limit (a ValueError) and from the quadratic cost of long decimal strings.
MAX_DIGITS = 20
_HEX = frozenset("0123456789abcdefABCDEF")
_NAME_START = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_NAME_REST = _NAME_START | frozenset("0123456789.-")


def check_text(value: str, what: str) -> str:
    """Return ``value`` if it is text, else raise InvalidSpec: argv bytes that are not UTF-8
    reach Python as lone surrogates (PEP 383), which no encoder, file name in a message or
    JSON reader downstream should meet."""
    try:
        value.encode()
    except UnicodeEncodeError:
        raw = value.encode(errors="surrogateescape")
        cut = f"{raw[:24]!r}..." if len(raw) > 24 else repr(raw)
        raise InvalidSpec(f"{what} is not valid UTF-8: {cut}") from None
    return value


def check_ifname(name: object, what: str = "interface name") -> str:
    """Return ``name`` if the kernel's dev_valid_name() would accept it, else raise InvalidSpec.

    '%' is refused too: TUNSETIFF treats a name with '%d' as a template and
    would create some other device (tap0, tap1, ...) than the one asked for.
    """
    if not isinstance(name, str) or not name:
        raise InvalidSpec(f"{what} must be a non-empty string")
    check_text(name, what)
    size = len(name.encode())
    if size >= IFNAMSIZ:
        raise InvalidSpec(f"{what} {name!r} is {size} bytes long; the kernel allows at most 15")
    if name in (".", ".."):
        raise InvalidSpec(f"{what} {name!r} is not allowed")
    for ch in name:
        if ch in "/:%" or ch.isspace() or not ch.isprintable():
            raise InvalidSpec(f"{what} {name!r} contains {ch!r}, which is not allowed")
    return name


def check_netns(name: object) -> str:
    """Return a valid named-namespace name (a file name under /run/netns)."""
    if not isinstance(name, str) or not name:
        raise InvalidSpec("network namespace name must be a non-empty string")
    check_text(name, "network namespace name")
    if name in (".", "..") or "/" in name or "\0" in name or len(name.encode()) > 255:
        raise InvalidSpec(f"network namespace name {name!r} is not a valid file name")
    return name


def parse_mac(value: object) -> str:
    """Normalise a unicast MAC address to lower-case colon form."""
    parts: list[str] = []
    if isinstance(value, str) and len(value) == 17:
        sep = value[2]
        parts = value.split(sep) if sep in ":-" else []
    if len(parts) != 6 or not all(len(p) == 2 and set(p) <= _HEX for p in parts):
        raise InvalidSpec(
            f"MAC address {shown(value)} is not six hex octets separated by ':' or '-'"
        )
    octets = [int(part, 16) for part in parts]
    if octets[0] & 1:
        raise InvalidSpec(f"MAC address {value!r} is a multicast address; a NIC needs unicast")
    if not any(octets):
        raise InvalidSpec(f"MAC address {value!r} is all zeros")
    return ":".join(f"{o:02x}" for o in octets)


def shown(value: object) -> str:
    """``value`` for an error line: repr(), cut short; a huge int only by its size.

    Formatting an int of more than 4300 digits raises ValueError, and a 5000-digit
    value would bury the reason in a message meant to be one line.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"a {value.bit_length()}-bit number"
    if isinstance(value, str) and len(value) > 40:
        return f"{value[:24]!r}... ({len(value)} characters)"
    return repr(value)


def parse_number(text: str, what: str) -> int:
    """A whole number written in ASCII digits, at most MAX_DIGITS of them. Raises InvalidSpec.

    int() and str.isdigit() also take '²', Arabic-Indic '٣', ' 1_0 ' and '+5': none of
    them is a number to vhostorch, and int('²') is a ValueError.
    """
    if not (0 < len(text) <= MAX_DIGITS and text.isascii() and text.isdigit()):
        raise InvalidSpec(
            f"{what} needs a whole number of at most {MAX_DIGITS} ASCII digits, not {shown(text)}"
        )
    return int(text)


def parse_account(value: object, what: str) -> str | int | None:
    """An owner or group: ``None``, a numeric id, or a user/group name."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidSpec(f"{what} must be a name or a numeric id, not {value!r}")
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = parse_number(value, f"{what} id")
    if isinstance(value, int):
        return check_int(value, f"{what} id", 0, MAX_ID)
    if isinstance(value, str) and _valid_account(value):
        return value
    raise InvalidSpec(f"{what} {shown(value)} is neither a numeric id nor a valid name")


def _valid_account(name: str) -> bool:
    """The portable user/group name form useradd accepts (with Samba's trailing '$')."""
    core = name[:-1] if name.endswith("$") else name
    return (
        0 < len(core) <= 32 and core[0] in _NAME_START and all(ch in _NAME_REST for ch in core[1:])
    )


def check_int(value: object, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidSpec(f"{what} must be an integer, not {shown(value)}")
    if not low <= value <= high:
        raise InvalidSpec(f"{what} {shown(value)} is out of range {low}..{high}")
    return value
