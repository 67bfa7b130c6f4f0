"""Immutable value objects with equality, hash and repr from ``__slots__``.

Why not dataclasses: importing them costs about 30 ms (they pull in ``inspect``),
more than the whole of provisioning a VM's taps, which runs in a fresh process
on every VM start (tests/bench/test_bench_taps.py measures it).
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing costs ~10 ms to import; mypy treats this name as True
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import TypeVar

    _R = TypeVar("_R", bound="Record")


class Record:
    """Subclasses declare ``__slots__`` and an ``__init__`` that calls ``_init``.

    A subclass of a record may add slots (or none); its fields are its bases' slots,
    then its own, and its ``__init__`` takes them all.
    """

    __slots__: tuple[str, ...] = ()
    _fields: tuple[str, ...] = ()  # every slot along the bases, set per class below

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        # Not ``self.__slots__``: a subclass's own ``__slots__ = ()`` would hide its
        # bases' fields, and every instance would compare equal.
        cls._fields = (*cls._fields, *cls.__dict__.get("__slots__", ()))

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
