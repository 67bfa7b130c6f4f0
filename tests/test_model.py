"""Spec validation, property-based: what is accepted is what the kernel and QEMU can use."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vhostorch.errors import InvalidSpec
from vhostorch.model import MAX_MTU, MAX_TAP_QUEUES, MIN_MTU, TapSpec, check_ifname, parse_mac

FORBIDDEN = "/:% \t\n\x0b\x0c\r"
valid_char = st.characters(
    blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp", "Cf"), blacklist_characters=FORBIDDEN
)
valid_name = st.text(valid_char, min_size=1, max_size=15).filter(
    lambda n: len(n.encode()) <= 15 and n not in (".", "..") and n.isprintable()
)


@given(valid_name)
def test_valid_names_are_kept(name: str) -> None:
    assert TapSpec(name).name == name


@given(st.text(min_size=1, max_size=40))
def test_a_name_is_accepted_exactly_when_the_kernel_rule_holds(name: str) -> None:
    kernel_ok = (
        len(name.encode()) < 16
        and name not in (".", "..")
        and not any(c in "/:%" or c.isspace() or not c.isprintable() for c in name)
    )
    try:
        check_ifname(name)
    except InvalidSpec as err:
        assert not kernel_ok, err
        assert "\n" not in str(err)
    else:
        assert kernel_ok


@given(st.integers())
def test_queues_range(queues: int) -> None:
    if 1 <= queues <= MAX_TAP_QUEUES:
        spec = TapSpec("t", queues=queues)
        assert spec.multi_queue == (queues > 1)
    else:
        with pytest.raises(InvalidSpec, match="queues"):
            TapSpec("t", queues=queues)


@given(st.integers())
def test_mtu_range(mtu: int) -> None:
    if MIN_MTU <= mtu <= MAX_MTU:
        assert TapSpec("t", mtu=mtu).mtu == mtu
    else:
        with pytest.raises(InvalidSpec, match="MTU"):
            TapSpec("t", mtu=mtu)


@given(st.binary(min_size=6, max_size=6), st.sampled_from([":", "-"]), st.booleans())
def test_mac_normalisation(raw: bytes, sep: str, upper: bool) -> None:
    text = sep.join(f"{b:02X}" if upper else f"{b:02x}" for b in raw)
    if raw[0] & 1 or not any(raw):
        with pytest.raises(InvalidSpec):
            parse_mac(text)
    else:
        assert parse_mac(text) == ":".join(f"{b:02x}" for b in raw)


@given(st.text(max_size=20))
def test_mac_garbage_is_refused(text: str) -> None:
    parts = text.replace("-", ":").split(":")
    looks_valid = len(text) == 17 and len(parts) == 6
    if not looks_valid:
        with pytest.raises(InvalidSpec):
            parse_mac(text)


@given(st.one_of(st.integers(), st.text(max_size=40), st.booleans(), st.none()))
def test_owner_is_an_id_a_name_or_refused(value: object) -> None:
    try:
        spec = TapSpec("t", owner=value)  # type: ignore[arg-type]
    except InvalidSpec as err:
        assert "owner" in str(err)
        return
    assert spec.owner is None or isinstance(spec.owner, int | str)
    if isinstance(spec.owner, int):
        assert 0 <= spec.owner < 0xFFFFFFFF


@pytest.mark.parametrize(
    "bad",
    [
        {"queues": True},
        {"vnet_hdr": 1},
        {"mtu": 1500.0},
        {"bridge": "t"},
        {"netns": "a/b"},
        {"netns": ".."},
    ],
)
def test_wrong_types_and_shapes(bad: dict[str, object]) -> None:
    with pytest.raises(InvalidSpec):
        TapSpec("t", **bad)  # type: ignore[arg-type]


def test_specs_are_immutable_values() -> None:
    spec = TapSpec("t", mac="52-54-00-AA-BB-CC")
    assert spec == TapSpec("t", mac="52:54:00:aa:bb:cc")
    assert hash(spec) == hash(TapSpec("t", mac="52:54:00:aa:bb:cc"))
    with pytest.raises(AttributeError):
        spec.name = "u"  # type: ignore[misc]
