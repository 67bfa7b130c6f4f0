"""The backends a VM can be run with, by name: the only place that tells them apart.

A third backend is one module implementing backends.contract.Backend, and one line here.
"""

from __future__ import annotations

from vhostorch.backends.libvirt import LibvirtBackend
from vhostorch.backends.qmp import QmpBackend
from vhostorch.errors import InvalidSpec
from vhostorch.record import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from vhostorch.backends.contract import Backend
    from vhostorch.vm.state import VmState

_BY_NAME: dict[str, Callable[[], Backend]] = {"qmp": QmpBackend, "libvirt": LibvirtBackend}
NAMES = tuple(_BY_NAME)  # the first is the default


def get(name: str) -> Backend:
    """The backend called ``name``. Raises InvalidSpec for a name not in NAMES."""
    try:
        make = _BY_NAME[name]
    except KeyError:
        raise InvalidSpec(f"backend must be one of {', '.join(NAMES)}, not {name!r}") from None
    return make()


def taking_uri() -> tuple[str, ...]:
    """The backends for which a libvirt URI (``up --connect``) means something."""
    return tuple(name for name in NAMES if get(name).takes_uri)


def of(state: VmState) -> Backend:
    """The backend that runs the VM of ``state``. Raises InvalidSpec."""
    return get(state.backend)
