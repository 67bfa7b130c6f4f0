"""The hooks/qemu program as libvirt runs it, for the tests that run it: where it is, the domain
XML libvirt hands it, and what of a domain it leaves in its directories."""

from __future__ import annotations

import os

from vhostorch.hook.metadata import NAMESPACE
from vhostorch.hook.state import Places, file_stem

HOOK = os.path.abspath(os.path.join(__file__, "..", "..", "..", "hooks", "qemu"))


def domain(name: str, nics: list[tuple[str, int]], meta: str | None, vm: str = "") -> str:
    """A domain XML with ethernet interfaces on ``nics`` (tap, queues) and ``meta``
    (the <vhostorch:tap> elements; None: no vhostorch metadata at all)."""
    ifaces = "".join(
        f"<interface type='ethernet'><target dev='{dev}' managed='no'/><model type='virtio'/>"
        f"<driver name='vhost' queues='{queues}'/></interface>"
        for dev, queues in nics
    )
    block = (
        ""
        if meta is None
        else f"<vhostorch:vm xmlns:vhostorch='{NAMESPACE}' {vm}>{meta}</vhostorch:vm>"
    )
    return (
        f"<domain type='kvm'><name>{name}</name><metadata>{block}</metadata>"
        f"<devices>{ifaces}</devices></domain>"
    )


PLACES = Places()  # the program's own places


def left_of(name: str, taps: list[str]) -> list[str]:
    """Files of domain ``name`` and claims of ``taps`` still in the hook's directories."""
    stem = file_stem(name)
    found = []
    for directory in (PLACES.state, PLACES.run):
        if os.path.isdir(directory):
            found += [f for f in os.listdir(directory) if f.startswith(stem)]
    if os.path.isdir(PLACES.claims):
        found += [f"taps/{f}" for f in os.listdir(PLACES.claims) if f in taps]
    return found


def tap_xml(name: str, taps: list[str]) -> bytes:
    meta = "".join(f"<vhostorch:tap dev='{t}'/>" for t in taps)
    return domain(name, [(t, 1) for t in taps], meta).encode()
