"""The libvirt backend: a domain vhostorch defines, whose interfaces are ``type='ethernet'`` on
taps vhostorch made (``managed='no'``); libvirt opens them and /dev/vhost-net itself.

Talks to libvirt through vhostorch.libvirt.connection (a connection per call) and
finds each interface by its tap in the live domain XML, which also gives the
check what it needs: the domain's monitor is never asked (libvirt would mark the
domain tainted), the wiring trace tells when its vhost started.
"""

from __future__ import annotations

import os

from vhostorch.backends import process
from vhostorch.backends.contract import Started
from vhostorch.check import observe as inspect
from vhostorch.check import wiring
from vhostorch.check.report import FAIL, PASS, UNKNOWN
from vhostorch.errors import OperationFailed
from vhostorch.libvirt import connection as virt
from vhostorch.libvirt import domxml
from vhostorch.record import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

    from vhostorch.check.observe import Observation
    from vhostorch.vm.spec import NicSpec, VmSpec
    from vhostorch.vm.state import NicState, VmState


def _uri(state: VmState) -> str:
    return state.uri or virt.SYSTEM_URI


def _ids(name: str, uri: str, taps: Sequence[str]) -> list[tuple[str, str]]:
    """(device alias, netdev id) libvirt gave the interface on each of ``taps``."""
    given = {
        iface.target: (iface.alias, iface.netdev_id)
        for iface in domxml.parse(virt.domain_xml(name, uri)).interfaces
        if iface.target and iface.alias and iface.netdev_id
    }
    missing = [tap for tap in taps if tap not in given]
    if missing:
        raise OperationFailed(f"domain {name} has no interface on tap {missing[0]} after start")
    return [given[tap] for tap in taps]


class _Start:
    """Nothing to begin: libvirt starts the domain once its taps exist."""

    def __init__(self, spec: VmSpec, workdir: str, uri: str) -> None:
        import uuid

        self.spec, self.workdir, self.uri = spec, workdir, uri
        self.what = f"domain {spec.name}"
        # The domain's UUID, drawn here so that it is recorded before the domain exists:
        # what a killed or interrupted start made is then removed by it, and nothing else.
        self.vm_id = str(uuid.uuid4())
        self.defining = False

    def process(self) -> None:
        return None  # libvirt starts QEMU in ``run``; the domain is found by its name

    def run(self, nics: Sequence[tuple[NicSpec, bool]]) -> Started:
        name = self.spec.name
        # New and root's (libvirt opens the console log): one found is removed, never reused.
        process.remove_workdir(self.workdir)
        os.mkdir(self.workdir, 0o755)
        xml = domxml.render(self.spec, nics, process.files(self.workdir)[1], self.vm_id)
        self.defining = True
        virt.define_and_start(name, xml, self.uri)
        try:
            pid = inspect.domain_pid(name)
        except BaseException:
            virt.destroy_and_undefine(name, self.uri)
            raise
        return Started(pid, None, self.uri, process.start_time(pid))

    def abort(self) -> None:
        if self.defining:  # a signal can come between the domain's start and its pid
            virt.destroy_and_undefine(self.spec.name, self.uri, self.vm_id)
        process.remove_workdir(self.workdir)


class LibvirtBackend:
    """backends.contract.Backend for a libvirt domain (``up --backend libvirt --connect URI``)."""

    takes_uri = True

    def vhost_refused(self, accel: str) -> str | None:
        if accel != "kvm":
            return "libvirt uses vhost only for type='kvm' domains, and accel is \"tcg\""
        return None

    def begin(self, spec: VmSpec, workdir: str, uri: str, user: str | None = None) -> _Start:
        return _Start(spec, workdir, uri)

    def runs_as(self, user: str | None) -> None:
        return None  # qemu.conf's user, libvirt's to decide

    def nic_ids(self, state: VmState, taps: Sequence[str]) -> list[tuple[str, str]]:
        return _ids(state.name, _uri(state), taps)

    def stop(self, state: VmState) -> None:
        virt.destroy_and_undefine(state.name, _uri(state), state.vm_id)
        process.remove_workdir(state.workdir)

    def attach(self, state: VmState, nic: NicSpec, vhost_on: bool) -> None:
        virt.attach(state.name, domxml.interface_xml(nic, vhost_on), _uri(state))

    def detach(self, state: VmState, nic: NicState, timeout: float) -> None:
        def gone(xml: str) -> bool:
            return all(i.target != nic.tap for i in domxml.parse(xml).interfaces)

        if gone(virt.domain_xml(state.name, _uri(state))):
            return  # never plugged (a nic add cut short) or unplugged already
        virt.detach(state.name, domxml.interface_ref(nic.mac), gone, timeout, _uri(state))

    def observe(self, state: VmState) -> Observation:
        domain = domxml.parse(virt.domain_xml(state.name, _uri(state)))
        return inspect.observe(state.pid, domain=domain, plan=state)

    def final_started(self) -> tuple[str, ...]:
        """Seen through the wiring trace, a vring not yet joined looks the same as one that
        never will be: only a pass is final (every status is, when the trace is not armed)."""
        return (PASS,) if wiring.armed() else (PASS, FAIL, UNKNOWN)

    def asker(self, state: VmState) -> None:
        return None  # asking the domain's monitor would mark it tainted
