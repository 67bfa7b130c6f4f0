"""Whether each NIC of a VM gets vhost, decided before anything is touched (a pure function of
the spec, the backend and what this host offers)."""

from __future__ import annotations

from vhostorch import backends
from vhostorch.check.report import FAIL, PASS
from vhostorch.errors import OperationFailed
from vhostorch.host import doctor
from vhostorch.record import TYPE_CHECKING, Record

if TYPE_CHECKING:
    from collections.abc import Sequence

    from vhostorch.check.report import Status
    from vhostorch.vm.spec import Accel, BackendName, NicSpec

    # Each NIC, whether QEMU gets vhost for it, and why a preferred one does not.
    Decided = list[tuple[NicSpec, bool, str | None]]


class Host(Record):
    """What decides whether vhost can be had: doctor's checks for /dev/vhost-net and KVM."""

    vhost: tuple[Status, str]  # (status, doctor's message)
    kvm: tuple[Status, str]

    @classmethod
    def probe(cls, paths: doctor.Paths | None = None) -> Host:
        paths = paths or doctor.Paths()
        checks = doctor.vhost_net_checks(paths)
        worst = next((c for c in checks if c.status != PASS), checks[0])
        kvm = doctor.kvm_check(paths)
        return cls((worst.status, worst.message), (kvm.status, kvm.message))


def decide(
    nics: Sequence[NicSpec], accel: Accel, backend: BackendName, host: Host, first: int = 0
) -> Decided:
    """Pure: for each NIC, whether QEMU gets vhost, and why not; refuses what cannot be had.

    ``required`` needs /dev/vhost-net, with accel kvm a usable KVM, and what the
    backend needs (libvirt uses vhost only for type='kvm' domains; QEMU itself uses
    vhost under TCG too). ``preferred`` falls back to QEMU's data path, and says why.
    Raises OperationFailed, InvalidSpec (an unknown backend).
    """
    if accel == "kvm" and host.kvm[0] == FAIL:
        raise OperationFailed(f'accel = "kvm" but KVM is not usable: {host.kvm[1]}')
    refused = None if accel == "kvm" else backends.get(backend).describe().vhost_needs_kvm
    decided: Decided = []
    for index, nic in enumerate(nics, first):
        why, detail = None, ""
        if host.vhost[0] != PASS:
            why = "this host has no usable /dev/vhost-net"
            detail = f" ({host.vhost[1]})"
        elif refused is not None:
            why = refused
        elif accel == "kvm" and host.kvm[0] != PASS:
            why = f"KVM is not usable ({host.kvm[1]})"
        if nic.vhost == "required" and why is not None:
            raise OperationFailed(
                f'nic[{index}] ({nic.tap.name}): vhost = "required" cannot be had: {why}{detail}; '
                'nothing was started (vhost = "preferred" would start without it)'
            )
        on = nic.vhost != "off" and why is None
        decided.append((nic, on, why if nic.vhost == "preferred" and not on else None))
    return decided
