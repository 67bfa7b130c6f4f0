"""Every Record in the package: its slots, annotations and __init__ name the same fields, and
``replace`` gives back the subclass (what equality, hash, repr, asdict and replace rely on)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import vhostorch
from vhostorch.check.report import Check
from vhostorch.cli.argv import INT, Option
from vhostorch.errors import InvalidSpec
from vhostorch.record import Record
from vhostorch.taps import TapSpec
from vhostorch.vm.spec import NicSpec, VmSpec

for _module in pkgutil.walk_packages(vhostorch.__path__, "vhostorch."):
    if _module.name != "vhostorch.__main__":  # it runs the CLI
        importlib.import_module(_module.name)


def _subclasses(cls: type[Record]) -> list[type[Record]]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


RECORDS = sorted(set(_subclasses(Record)), key=lambda c: f"{c.__module__}.{c.__qualname__}")
# Records whose __init__ validates its input: a real-looking instance each.
_TAP = TapSpec("vt0", queues=2, mtu=9000, mac="52:54:00:12:34:56", bridge="br0")
_NIC = NicSpec(_TAP, "52:54:00:12:34:56", rx_queue_size=1024)
SAMPLES: dict[type[Record], Record] = {
    TapSpec: _TAP,
    NicSpec: _NIC,
    VmSpec: VmSpec("vm0", (_NIC,), kernel="/boot/vmlinuz"),
    Check: Check("nic.vhost", "pass", "vhost is attached", {"fd": 7}, nic="net0", queue=0),
    Option: Option("--mtu", INT, "MTU of the tap", low=68, high=65521),
}


def _ids(cls: type[Record]) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _slots(cls: type[Record]) -> list[str]:
    """Every slot along the bases, base first: a subclass may extend its parent's slots."""
    return [s for klass in reversed(cls.__mro__) for s in klass.__dict__.get("__slots__", ())]


def _placeholder(cls: type[Record]) -> Record:
    """An instance whose every field holds a distinct string (for records that only store)."""
    record = object.__new__(cls)
    for name in _slots(cls):
        object.__setattr__(record, name, f"<{name}>")
    return record


def test_every_area_is_walked() -> None:
    modules = {cls.__module__.split(".")[1] for cls in RECORDS}
    assert {"taps", "kernel", "vm", "check", "hook"} <= modules
    assert len(RECORDS) > 30


@pytest.mark.parametrize("cls", RECORDS, ids=_ids)
def test_slots_annotations_and_init_name_the_same_fields(cls: type[Record]) -> None:
    own = cls.__dict__.get("__slots__")
    assert isinstance(own, tuple), "a record's class gets __slots__ (no per-instance dict)"
    assert not hasattr(_placeholder(cls), "__dict__")
    fields = _slots(cls)
    assert len(fields) == len(set(fields)), f"a field is declared twice: {fields}"
    assert list(cls._fields) == fields
    # Each class annotates exactly the fields it adds.
    assert list(inspect.get_annotations(cls)) == list(own)
    assert set(cls._defaults) <= set(fields)
    if cls.__init__ is Record.__init__:
        return  # made from the fields: test_a_made_init_takes_the_fields_in_order
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    assert all(p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters), (
        "name every field in __init__ (replace() calls it with each of them)"
    )
    assert sorted(p.name for p in parameters) == sorted(fields)


def test_a_made_init_takes_the_fields_in_order_with_their_defaults() -> None:
    from vhostorch.check.wiring import Vring

    ring = Vring(3, 0, 40, 41, None, (), None)
    assert ring.masked is False and ring.kick == 40  # the default from the class body
    assert ring == Vring(vhost_fd=3, index=0, kick=40, call=41, backend=None, ioeventfds=(),
                         irqfd=None, masked=False)  # fmt: skip
    with pytest.raises(TypeError, match="missing 'irqfd'"):
        Vring(3, 0, 40, 41, None, ())  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="unexpected or repeated 'kick'"):
        Vring(3, 0, 40, 41, None, (), None, kick=1)  # type: ignore[misc]
    with pytest.raises(TypeError, match="takes 8 fields, not 9"):
        Vring(3, 0, 40, 41, None, (), None, False, 9)  # type: ignore[call-arg]
    with pytest.raises(AttributeError, match="immutable"):
        ring.kick = 1  # type: ignore[misc]


@pytest.mark.parametrize("cls", RECORDS, ids=_ids)
def test_replace_gives_back_the_subclass(cls: type[Record]) -> None:
    record = SAMPLES.get(cls) or _placeholder(cls)
    copy = record.replace()
    assert type(copy) is cls
    assert copy == record and repr(copy) == repr(record)
    if cls in SAMPLES:
        return
    for name in cls._fields:
        changed = record.replace(**{name: "<other>"})
        assert type(changed) is cls and getattr(changed, name) == "<other>"
        assert changed != record, f"{name} is not compared"


def test_replace_is_typed_as_the_subclass_and_validates() -> None:
    spec: TapSpec = _TAP.replace(queues=1)  # mypy: a TapSpec, not a Record
    assert not spec.multi_queue and spec.mtu == 9000
    with pytest.raises(InvalidSpec, match="queues"):
        _TAP.replace(queues=0)


def test_a_subclass_compares_the_fields_of_its_base() -> None:
    from vhostorch.taps import DeleteLink

    # DeleteLink adds no slot to CreateBridge's; it once compared no field at all.
    assert DeleteLink("a") != DeleteLink("b")
    assert repr(DeleteLink("a")) == "DeleteLink(name='a')"
    assert DeleteLink("a").asdict() == {"name": "a"}
