"""The backends a VM can be run with, by name: the only place that tells them apart.

A third backend is one module implementing backends.contract.Backend, its name in
``BackendName`` (vm.spec: the VM's state and the check's report carry it), and one line here.
"""

from __future__ import annotations

from vhostorch.backends.libvirt import LibvirtBackend
from vhostorch.backends.qmp import QmpBackend
from vhostorch.errors import InvalidSpec
from vhostorch.record import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Final

    from vhostorch.backends.contract import Backend
    from vhostorch.vm.spec import BackendName
    from vhostorch.vm.state import VmState

_BY_NAME: dict[BackendName, Callable[[], Backend]] = {"qmp": QmpBackend, "libvirt": LibvirtBackend}
NAMES: Final[tuple[BackendName, ...]] = tuple(_BY_NAME)  # the first is the default


def name_of(value: object) -> BackendName:
    """``value`` as a backend's name. Raises InvalidSpec for a name not in NAMES."""
    found = next((name for name in _BY_NAME if name == value), None)
    if found is None:
        raise InvalidSpec(f"backend must be one of {', '.join(NAMES)}, not {value!r}")
    return found


def get(name: str) -> Backend:
    """A new backend object of the backend called ``name`` (it serves one command). Raises
    InvalidSpec for a name not in NAMES."""
    return _BY_NAME[name_of(name)]()


def taking_uri() -> tuple[BackendName, ...]:
    """The backends for which a libvirt URI (``up --connect``) means something."""
    return tuple(name for name in NAMES if get(name).describe().takes_uri)


def of(state: VmState) -> Backend:
    """A backend object of the backend that runs the VM of ``state``. Raises InvalidSpec."""
    return get(state.backend)


__all__ = ["NAMES", "get", "name_of", "of", "taking_uri"]
