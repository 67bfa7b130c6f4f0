"""The vhostorch metadata of a libvirt domain (what the hook will manage): read, and refused."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhostorch.errors import InvalidSpec
from vhostorch.hook import metadata

NS = metadata.NAMESPACE


def domain(meta: str, interfaces: str) -> str:
    return f"""<domain type='kvm'><name>vm1</name>
<metadata>{meta}</metadata>
<devices>{interfaces}</devices></domain>"""


def ethernet(dev: str, queues: int | None = None, managed: str = "no") -> str:
    driver = f"<driver name='vhost' queues='{queues}'/>" if queues else ""
    return (f"<interface type='ethernet'><target dev='{dev}' managed='{managed}'/>"
            f"<model type='virtio'/>{driver}</interface>")  # fmt: skip


def test_declared_taps_take_their_queues_from_the_interface() -> None:
    xml = domain(
        f"<v:vm xmlns:v='{NS}' verify='enforce'><v:tap dev='t0' bridge='br0' mtu='9000'/>"
        "<v:tap dev='t1' owner='0' group='0' verify='warn'/></v:vm>",
        ethernet("t0", 4) + ethernet("t1"),
    )
    declared = metadata.parse(xml)
    assert declared.domain == "vm1" and declared.enforce
    t0, t1 = declared.taps
    assert (t0.spec.name, t0.spec.queues, t0.spec.multi_queue, t0.spec.bridge, t0.spec.mtu) == (
        "t0",
        4,
        True,
        "br0",
        9000,
    )
    assert (t0.spec.owner, t0.verify) == ("libvirt-qemu", "enforce")
    t1_fields = (t1.spec.queues, t1.spec.multi_queue, t1.spec.owner, t1.verify)
    assert t1_fields == (1, False, 0, "warn")  # a numeric owner is a uid


def test_a_domain_without_vhostorch_metadata_declares_nothing() -> None:
    xml = domain("<other xmlns='urn:x'/>", ethernet("t0"))
    assert metadata.parse(xml).taps == ()


@pytest.mark.parametrize(
    "meta, interfaces, message",
    [
        ("<v:tap dev='nope'/>", ethernet("t0"), "no <interface> has <target dev='nope'/>"),
        ("<v:tap dev='t0'/>", ethernet("t0", managed="yes"), "type='ethernet'"),
        ("<v:tap/>", ethernet("t0"), "dev is required"),
        ("<v:tap dev='t0' mtu='big'/>", ethernet("t0"), "mtu needs a whole number"),
        ("<v:tap dev='t0' colour='red'/>", ethernet("t0"), "unknown attribute 'colour'"),
        ("<v:tap dev='t0' verify='maybe'/>", ethernet("t0"), "verify must be one of warn"),
        ("<v:tap dev='t0'/><v:tap dev='t0'/>", ethernet("t0"), "declared twice"),
        ("<v:tap dev='t0' bridge='a/b'/>", ethernet("t0"), "#1 (t0)"),
    ],
)
def test_bad_metadata_is_refused_with_one_line_naming_it(
    meta: str, interfaces: str, message: str
) -> None:
    xml = domain(f"<v:vm xmlns:v='{NS}'>{meta}</v:vm>", interfaces)
    with pytest.raises(InvalidSpec) as err:
        metadata.parse(xml)
    assert message in str(err.value) and "\n" not in str(err.value)


_text = st.text(alphabet="abc0-_/'<&\"9 ", max_size=12)


@settings(max_examples=300, deadline=None)
@given(
    attrs=st.dictionaries(
        st.sampled_from(["dev", "bridge", "mtu", "owner", "group", "verify", "x"]), _text
    ),
    queues=st.one_of(st.none(), st.integers(-1, 300)),
    raw=st.text(max_size=40),
)
def test_any_input_parses_or_is_refused_cleanly(
    attrs: dict[str, str], queues: int | None, raw: str
) -> None:
    from xml.sax.saxutils import quoteattr

    tap = "<v:tap " + " ".join(f"{k}={quoteattr(v)}" for k, v in attrs.items()) + "/>"
    driver = "" if queues is None else f"<driver name='vhost' queues='{queues}'/>"
    iface = f"<interface type='ethernet'><target dev='t0' managed='no'/>{driver}</interface>"
    for xml in (domain(f"<v:vm xmlns:v='{NS}'>{tap}</v:vm>", iface), raw):
        try:
            metadata.parse(xml)
        except InvalidSpec as err:
            assert "\n" not in str(err)


def test_worker_cpus_are_a_cpu_list_on_the_vm_element() -> None:
    xml = domain(f"<v:vm xmlns:v='{NS}' worker-cpus='3,2'><v:tap dev='t0'/></v:vm>", ethernet("t0"))
    assert metadata.parse(xml).worker_cpus == "2-3"  # the kernel's list form
    assert metadata.parse(domain(f"<v:vm xmlns:v='{NS}'/>", "")).worker_cpus is None
    for bad, says in (("x", "not a CPU list"), ("", "no CPU given"), ("3-1", "not a CPU list")):
        with pytest.raises(InvalidSpec) as err:
            metadata.parse(domain(f"<v:vm xmlns:v='{NS}' worker-cpus='{bad}'/>", ""))
        assert str(err.value).startswith("<vhostorch:vm> worker-cpus: ") and says in str(err.value)
