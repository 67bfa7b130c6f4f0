"""Immutable value objects with equality, hash and repr from ``__slots__``.

Why not dataclasses: importing them costs about 30 ms (they pull in ``inspect``),
more than the whole of provisioning a VM's taps, which runs in a fresh process
on every VM start (tests/bench/test_bench_taps.py measures it).
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing costs ~10 ms to import; mypy treats this name as True
if TYPE_CHECKING:
    from collections.abc import Iterator


class Record:
    """Subclasses declare ``__slots__`` and an ``__init__`` that calls ``_init``."""

    __slots__: tuple[str, ...] = ()

    def _init(self, **values: object) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def _set(self, name: str, value: object) -> None:
        """Normalise a field during ``__init__`` (the object is immutable after it)."""
        object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def fields(self) -> Iterator[tuple[str, object]]:
        for name in self.__slots__:
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

    def replace(self, **changes: object) -> Record:
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
