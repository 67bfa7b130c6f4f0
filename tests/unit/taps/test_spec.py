"""Tap specs and the values in them: what is accepted is what the kernel and QEMU can use
(property-based), and every adapter makes its taps the one way, with the same words."""

from __future__ import annotations

import ast
import pathlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vhostorch import cli, taps
from vhostorch.errors import InvalidSpec
from vhostorch.hook import metadata
from vhostorch.inputs import check_ifname, parse_mac
from vhostorch.taps.spec import ATTRS, MAX_MTU, MAX_TAP_QUEUES, MIN_MTU, TapSpec
from vhostorch.vm import spec

ANSIBLE_TAP = pathlib.Path(__file__).resolve().parents[3] / "ansible/plugins/modules/tap.py"

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


# ----- one way in: taps.tap_from_mapping, for the CLI, [[nic]], <vhostorch:tap> and Ansible ------

DECLARED = [attr.name for attr in ATTRS]


def _ansible_options() -> set[str]:
    """The options the Ansible tap module declares (its argument_spec), read from its source."""
    for node in ast.walk(ast.parse(ANSIBLE_TAP.read_text())):
        if isinstance(node, ast.keyword) and node.arg == "argument_spec":
            assert isinstance(node.value, ast.Call)
            return {k.arg for k in node.value.keywords if k.arg}
    raise AssertionError("no argument_spec in the Ansible tap module")


def test_each_field_is_declared_once_and_each_adapter_spells_only_declared_ones() -> None:
    assert sorted(DECLARED) == sorted(TapSpec._fields) and len(set(DECLARED)) == len(DECLARED)
    create = next(c for c in cli.COMMANDS if c.path == ("tap", "create"))
    # `tap create` and the Ansible module offer every attribute, named as it is (the tap's
    # name is the CLI's positional); a [[nic]] table and <vhostorch:tap> spell some of them.
    assert set(DECLARED) - {"name"} <= {o.dest for o in create.options}
    assert set(DECLARED) <= _ansible_options()
    assert set(spec._TAP_KEYS) <= set(DECLARED)
    assert set(metadata._TAP_KEYS) <= set(DECLARED)


# One bad value per attribute and the words for it, which every adapter offering the attribute
# gives after its own prefix ("vhostorch: error: ", "nic[0]: ", "<vhostorch:tap> #1 (t0): ").
BAD = [
    ("name", "a b", "tap name 'a b' contains ' ', which is not allowed"),
    ("queues", 0, "queues 0 is out of range 1..256"),
    ("vnet_hdr", 1, "vnet_hdr must be true or false, not 1"),
    ("up", "yes", "up must be true or false, not 'yes'"),
    ("create_bridge", None, None),  # None is no value for a flag, so its default
    ("mtu", 67, "MTU 67 is out of range 68..65521"),
    ("bridge", "a/b", "bridge name 'a/b' contains '/', which is not allowed"),
    ("netns", "..", "network namespace name '..' is not a valid file name"),
    ("owner", "!x", "owner '!x' is neither a numeric id nor a valid name"),
    ("group", "9" * 11, "group id 99999999999 is out of range 0..4294967294"),
    ("mac", "zz", "MAC address 'zz' is not six hex octets separated by ':' or '-'"),
]


def test_every_attribute_has_a_bad_value_in_the_table() -> None:
    assert [attr for attr, _, _ in BAD] == DECLARED


def _refusal(make: object) -> str | None:
    assert callable(make)
    try:
        make()
    except InvalidSpec as err:
        return str(err)
    return None


@pytest.mark.parametrize(("attr", "value", "words"), BAD, ids=[b[0] for b in BAD])
def test_a_bad_value_is_refused_in_the_same_words_by_every_adapter(
    attr: str, value: object, words: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    given = {"name": "t0", attr: value}
    assert _refusal(lambda: taps.tap_from_mapping(given)) == words  # the Ansible module's way
    if words is None:
        assert taps.tap_from_mapping(given) == TapSpec("t0")
        return
    if attr in spec._TAP_KEYS:
        nic = {spec._TAP_KEYS[attr]: value}
        assert _refusal(lambda: spec.nic_from_mapping("vm", 0, nic)) == f"nic[0]: {words}"
    if attr in metadata._TAP_KEYS:
        dev = value if attr == "name" else "t0"
        tap = f"<v:tap {metadata._TAP_KEYS[attr]}='{value}'" + (
            " dev='t0'/>" if dev == "t0" else "/>"
        )
        xml = (f"<domain><name>d</name><metadata><v:vm xmlns:v='{metadata.NAMESPACE}'>{tap}"
               f"</v:vm></metadata><devices><interface type='ethernet'><target dev='{dev}' "
               "managed='no'/></interface></devices></domain>")  # fmt: skip
        assert _refusal(lambda: metadata.parse(xml)) == f"<vhostorch:tap> #1 ({dev}): {words}"
    option = next((o for o in cli.taps.COMMANDS[0].options if o.dest == attr), None)
    # Text options reach the spec as they are; numbers are bounded by the option itself.
    words_as_cli = {"name": [str(value)]}
    if option is not None and option.kind == "value":
        words_as_cli[attr] = ["t0", option.name, str(value)]
    if attr in words_as_cli:
        argv = ["tap", "create", "--netns", "vhotapway-none", *words_as_cli[attr]]
        assert cli.main(argv) == 2
        assert capsys.readouterr().err == f"vhostorch: error: {words}\n"


def test_a_mapping_takes_defaults_then_the_declared_ones_and_text_for_numbers() -> None:
    spelt = {"name": "dev", "mtu": "mtu"}
    made = taps.tap_from_mapping(
        {"dev": "t0", "mtu": "9000", "queues": "7"}, spelt, defaults={"queues": 4}, text=True
    )
    assert made == TapSpec("t0", queues=4, mtu=9000)  # queues is not spelt: the default
    assert _refusal(lambda: taps.tap_from_mapping({"dev": "t0", "mtu": "x"}, spelt, text=True)) == (
        "mtu needs a whole number of at most 20 ASCII digits, not 'x'"  # named by its key
    )
    assert _refusal(lambda: taps.tap_from_mapping({"dev": "t0", "mtu": "9000"}, spelt)) == (
        "MTU must be an integer, not '9000'"  # text only when the adapter says so
    )
    assert _refusal(lambda: taps.tap_from_mapping({})) == "tap name must be a non-empty string"
