"""Immutable value objects: fields from annotations, with ``__init__``, equality, hash and repr.

A record's fields are its annotated names, in order, after its bases' fields; a value
given in the class body is that field's default. The class gets ``__slots__`` for them
and, unless it writes its own (to validate or normalise), an ``__init__`` that takes
them positionally or by name. mypy reads the same rules through ``dataclass_transform``.
A record whose checks are declared as data (`taps.spec.TapSpec`) keeps that ``__init__``
and defines ``_validate`` (a dataclass's ``__post_init__``): it runs once the fields are
set, and may normalise them (``_set``) or raise.

Why not dataclasses: importing them costs about 30 ms (they pull in ``inspect``),
more than the whole of provisioning a VM's taps, which runs in a fresh process
on every VM start (tests/bench/test_bench_taps.py measures it).
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing costs ~10 ms to import; mypy treats this name as True
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import Any, ClassVar, TypeVar, dataclass_transform

    _R = TypeVar("_R", bound="Record")
else:

    def dataclass_transform(**_: object) -> object:
        return lambda cls: cls


_set_field = object.__setattr__  # records are immutable: their own __setattr__ refuses


def _own_fields(annotations: dict[str, str]) -> tuple[str, ...]:
    return tuple(
        name
        for name, kind in annotations.items()
        if not name.startswith("_") and not str(kind).startswith("ClassVar")
    )


@dataclass_transform(frozen_default=True)
class RecordType(type):
    """Makes each record class: slots for its fields, and the defaults its body gives."""

    def __new__(
        mcls, name: str, bases: tuple[type, ...], namespace: dict[str, object]
    ) -> RecordType:
        annotations = namespace.get("__annotations__", {})
        assert isinstance(annotations, dict)
        own = _own_fields(annotations)
        # A default cannot stay a class attribute: it would shadow the slot.
        defaults = {field: namespace.pop(field) for field in own if field in namespace}
        namespace["__slots__"] = own
        cls = super().__new__(mcls, name, bases, namespace)
        inherited: tuple[str, ...] = ()
        inherited_defaults: dict[str, object] = {}
        for base in bases:
            inherited += getattr(base, "_fields", ())
            inherited_defaults.update(getattr(base, "_defaults", {}))
        type.__setattr__(cls, "_fields", (*inherited, *own))
        type.__setattr__(cls, "_defaults", {**inherited_defaults, **defaults})
        return cls


class Record(metaclass=RecordType):
    """Subclasses annotate their fields; an ``__init__`` of their own calls ``_init``."""

    _fields: ClassVar[tuple[str, ...]]
    _defaults: ClassVar[dict[str, object]]
    # A subclass's checks, run by the made __init__ once the fields are set (a method there).
    _validate: ClassVar[Callable[[Any], None] | None] = None

    if not TYPE_CHECKING:  # mypy makes each subclass's __init__ from its fields

        def __init__(self, *args: object, **kwargs: object) -> None:
            cls = type(self)
            fields = cls._fields
            if not kwargs and len(args) == len(fields):  # the common call, as fast as _init
                for field, value in zip(fields, args, strict=False):  # lengths checked above
                    _set_field(self, field, value)
                if cls._validate is not None:
                    cls._validate(self)
                return
            if len(args) > len(fields):
                raise TypeError(f"{cls.__name__}() takes {len(fields)} fields, not {len(args)}")
            values = dict(zip(fields, args, strict=False))  # fewer args: the rest by name
            for field, value in kwargs.items():
                if field not in fields or field in values:
                    raise TypeError(f"{cls.__name__}() got an unexpected or repeated {field!r}")
                values[field] = value
            for field in fields:
                if field in values:
                    object.__setattr__(self, field, values[field])
                elif field in cls._defaults:
                    object.__setattr__(self, field, cls._defaults[field])
                else:
                    raise TypeError(f"{cls.__name__}() is missing {field!r}")
            if cls._validate is not None:
                cls._validate(self)

    def _init(self, **values: object) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def _set(self, name: str, value: object) -> None:
        """Normalise a field during ``__init__`` (the object is immutable after it)."""
        object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def fields(self) -> Iterator[tuple[str, object]]:
        for name in self._fields:
            yield name, getattr(self, name)

    def asdict(self) -> dict[str, object]:
        """Fields as a JSON-ready dict (records nested one level are expanded too)."""
        out: dict[str, object] = {}
        for name, value in self.fields():
            if isinstance(value, Record):
                value = value.asdict()
            elif isinstance(value, tuple):
                value = [v.asdict() if isinstance(v, Record) else v for v in value]
            out[name] = value
        return out

    def replace(self: _R, **changes: object) -> _R:
        """A copy with ``changes``, made through the subclass's ``__init__`` (so validated)."""
        values = dict(self.fields())
        values.update(changes)
        return type(self)(**values)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Record)
        return tuple(self.fields()) == tuple(other.fields())

    def __hash__(self) -> int:
        return hash(tuple(self.fields()))

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={value!r}" for name, value in self.fields())
        return f"{type(self).__name__}({inner})"
