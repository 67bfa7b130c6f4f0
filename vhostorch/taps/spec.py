"""A tap as the user asks for it (`TapSpec`), and the one way every adapter makes one.

Each attribute of a tap is declared once, in ATTRS: its field, how a value is checked and
what an error calls it (with an integer's bounds). `TapSpec` checks itself against those
declarations, and `tap_from_mapping` is the way in for every adapter: the CLI (its options are
named as the attributes), a VM spec's ``[[nic]]`` table, the hook's ``<vhostorch:tap>``
element and the Ansible ``tap`` module each only say how they spell the keys. A new
attribute is a field and its declaration here, plus its spelling in the adapters that
offer it.

A field left as ``None`` is not managed: vhostorch neither sets nor resets it, so
`ensure` never undoes what an operator configured by hand and did not ask about.
"""

from __future__ import annotations

from vhostorch.errors import InvalidSpec
from vhostorch.inputs import (
    check_ifname,
    check_int,
    check_netns,
    parse_account,
    parse_mac,
    parse_number,
    shown,
)
from vhostorch.record import TYPE_CHECKING, Record

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from typing import Any

MAX_TAP_QUEUES = 256  # drivers/net/tun.c
MIN_MTU = 68  # tun's min_mtu (ETH_MIN_MTU)
MAX_MTU = 65521  # a tap's max_mtu: 65535 less its 14-byte Ethernet header


class Attr(Record):
    """One attribute of a tap: its TapSpec field, what errors call it, its check (given the
    declaration and a value, it returns the value normalised or raises InvalidSpec) and, for
    a whole number, its bounds (``high`` > 0: the attribute is a number)."""

    name: str
    what: str
    check: Callable[[Attr, object], object]
    low: int = 0
    high: int = 0


def _ifname(attr: Attr, value: object) -> str:
    return check_ifname(value, attr.what)


def _number(attr: Attr, value: object) -> int:
    return check_int(value, attr.what, attr.low, attr.high)


def _flag(attr: Attr, value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidSpec(f"{attr.what} must be true or false, not {shown(value)}")
    return value


def _account(attr: Attr, value: object) -> str | int | None:
    return parse_account(value, attr.what)


def _mac(attr: Attr, value: object) -> str:
    return parse_mac(value)


def _netns(attr: Attr, value: object) -> str:
    return check_netns(value)


# Every attribute of a TapSpec, in the order they are checked (so the first error is the one
# reported). The adapters spell them: the CLI's options (cli.taps), the [[nic]] keys
# (vm.spec), the <vhostorch:tap> attributes (hook.metadata), the Ansible tap module's options.
ATTRS = (
    Attr("name", "tap name", _ifname),
    Attr("queues", "queues", _number, 1, MAX_TAP_QUEUES),
    Attr("vnet_hdr", "vnet_hdr", _flag),
    Attr("up", "up", _flag),
    Attr("create_bridge", "create_bridge", _flag),
    Attr("mtu", "MTU", _number, MIN_MTU, MAX_MTU),
    Attr("bridge", "bridge name", _ifname),
    Attr("netns", "network namespace name", _netns),
    Attr("owner", "owner", _account),
    Attr("group", "group", _account),
    Attr("mac", "MAC address", _mac),
)


class TapSpec(Record):
    """One tap device as QEMU will open it: frozen, checked when made (ATTRS says how).

    ``queues`` is how many times QEMU opens the tap; the kernel needs
    IFF_MULTI_QUEUE on the device exactly when that is more than one.
    ``create_bridge`` says the bridge may be created when it is missing.
    """

    name: str
    queues: int = 1
    vnet_hdr: bool = True
    owner: str | int | None = None
    group: str | int | None = None
    mtu: int | None = None
    mac: str | None = None
    bridge: str | None = None
    netns: str | None = None
    up: bool = True
    create_bridge: bool = False

    def _validate(self) -> None:
        """Check each attribute as ATTRS declares it, then the rules between them."""
        unset = self._defaults
        for attr in ATTRS:
            value = getattr(self, attr.name)
            # None is "not managed" for a field whose default is None, and no value otherwise.
            if value is not None or unset.get(attr.name, ...) is not None:
                self._set(attr.name, attr.check(attr, value))
        if self.bridge is None:
            if self.create_bridge:
                raise InvalidSpec(f"tap {self.name}: creating a bridge needs a bridge name")
        elif self.bridge == self.name:
            raise InvalidSpec(f"tap {self.name!r} cannot be its own bridge")

    @property
    def multi_queue(self) -> bool:
        return self.queues > 1


def tap_from_mapping(
    given: Mapping[str, object],
    keys: Mapping[str, str] | None = None,
    *,
    defaults: Mapping[str, object] | None = None,
    text: bool = False,
) -> TapSpec:
    """The TapSpec an adapter's mapping asks for. Raises InvalidSpec.

    ``keys`` spells the attributes the adapter offers (attribute → its key; None: every
    attribute, under its own name). An attribute it does not offer, or whose key is absent
    or None, takes ``defaults`` (what the adapter knows itself, such as the hook's queues
    from the interface), else the field's own default. With ``text`` the values are text
    (XML attributes): a number is read from its digits, and an error about them names the key.
    """
    values: dict[str, Any] = dict(defaults or {})
    for attr in ATTRS:
        key = attr.name if keys is None else keys.get(attr.name)
        value = None if key is None else given.get(key)
        if value is None:
            continue
        if text and attr.high and isinstance(value, str):
            value = parse_number(value, str(key))
        values[attr.name] = value
    values.setdefault("name", None)  # refused by its check, as an empty name is
    return TapSpec(**values)


def check_batch(specs: Sequence[TapSpec]) -> str | None:
    """Validate the taps of one VM together; return their common namespace.

    One batch lives in one namespace because QEMU opens all its taps from its own.
    """
    if not specs:
        raise InvalidSpec("no tap given")
    names: set[str] = set()
    for spec in specs:
        if spec.name in names:
            raise InvalidSpec(f"tap {spec.name!r} is given more than once")
        names.add(spec.name)
    spaces = {s.netns for s in specs}
    if len(spaces) > 1:
        raise InvalidSpec("the taps of one batch must all be in the same network namespace")
    clash = {s.bridge for s in specs if s.bridge} & names
    if clash:
        raise InvalidSpec(f"{sorted(clash)[0]!r} is named both as a tap and as a bridge")
    return specs[0].netns
