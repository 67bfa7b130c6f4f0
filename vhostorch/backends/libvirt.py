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
from vhostorch.backends.contract import Begun, Description, Plugged
from vhostorch.check import observe, wiring
from vhostorch.check.report import FAIL, PASS, UNKNOWN
from vhostorch.errors import OperationFailed
from vhostorch.libvirt import connection, domxml
from vhostorch.record import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

    from vhostorch.check.observe import Observation
    from vhostorch.check.report import Status
    from vhostorch.vm.spec import NicSpec, VmSpec
    from vhostorch.vm.state import NicState, VmState

UNPLUG_TIMEOUT = 30.0  # a NIC plugged whose alias libvirt does not show is unplugged again


def _uri(state: VmState) -> str:
    return state.uri or connection.SYSTEM_URI


def _ids(name: str, uri: str, taps: Sequence[str]) -> list[tuple[str, str]]:
    """(device alias, netdev id) libvirt gave the interface on each of ``taps``."""
    given = {
        iface.target: (iface.alias, iface.netdev_id)
        for iface in domxml.parse(connection.domain_xml(name, uri)).interfaces
        if iface.target and iface.alias and iface.netdev_id
    }
    missing = [tap for tap in taps if tap not in given]
    if missing:
        raise OperationFailed(f"domain {name} has no interface on tap {missing[0]} after start")
    return [given[tap] for tap in taps]


def _unplug(state: VmState, tap: str, mac: str, timeout: float) -> None:
    def gone(xml: str) -> bool:
        return all(i.target != tap for i in domxml.parse(xml).interfaces)

    if gone(connection.domain_xml(state.name, _uri(state))):
        return  # never plugged (a nic add cut short) or unplugged already
    connection.detach(state.name, domxml.interface_ref(mac), gone, timeout, _uri(state))


class _Start:
    """A domain begun: its UUID drawn, so that it is recorded before the domain exists: what
    a killed or interrupted start made is then removed by it, and nothing else."""

    def __init__(self, spec: VmSpec, workdir: str, uri: str) -> None:
        import uuid

        self.spec, self.workdir, self.uri = spec, workdir, uri
        self.vm_id = str(uuid.uuid4())
        self.defining = False  # whether libvirt may have the domain (a define was asked)
        self.ran = False

    def run(self, nics: Sequence[tuple[NicSpec, bool]]) -> Plugged:
        name = self.spec.name
        # New and root's (libvirt opens the console log): one found is removed, never reused.
        process.remove_workdir(self.workdir)
        os.mkdir(self.workdir, 0o755)
        xml = domxml.render(self.spec, nics, process.files(self.workdir)[1], self.vm_id)
        self.defining = True
        connection.define_and_start(name, xml, self.uri)
        self.ran = True
        pid = observe.domain_pid(name)  # a failure here is undone by ``stop``
        taps = [nic.tap.name for nic, _ in nics]
        return Plugged(pid, process.start_time(pid), None, tuple(_ids(name, self.uri, taps)))


class LibvirtBackend:
    """backends.contract.Backend for a libvirt domain (``up --backend libvirt --connect URI``).

    Nothing is begun at ``begin`` but the domain's UUID: libvirt starts the domain once its
    taps exist, at ``plug``.
    """

    def __init__(self) -> None:
        self.start: _Start | None = None  # the domain ``begin`` began

    def describe(self) -> Description:
        # Seen through the wiring trace, a vring not yet joined looks the same as one that
        # never will be: only a pass is final (every status is, when the trace is not armed).
        final: tuple[Status, ...] = (PASS,) if wiring.armed() else (PASS, FAIL, UNKNOWN)
        why = "libvirt uses vhost only for type='kvm' domains, and accel is \"tcg\""
        return Description("libvirt", True, why, final)

    def begin(self, spec: VmSpec, workdir: str, uri: str | None, user: str | None) -> Begun:
        # ``user`` is qemu.conf's to decide, libvirt's: not said here.
        self.start = start = _Start(spec, workdir, uri or connection.SYSTEM_URI)
        return Begun(f"domain {spec.name}", vm_id=start.vm_id, uri=start.uri)

    def plug(self, state: VmState, nics: Sequence[tuple[NicSpec, bool]]) -> Plugged:
        if self.start is not None and not self.start.ran:
            return self.start.run(nics)
        ids = []
        for nic, vhost_on in nics:
            connection.attach(state.name, domxml.interface_xml(nic, vhost_on), _uri(state))
            try:
                ids += _ids(state.name, _uri(state), [nic.tap.name])
            except OperationFailed:
                _unplug(state, nic.tap.name, nic.mac, UNPLUG_TIMEOUT)
                raise
        return Plugged(state.pid, state.start_time, None, tuple(ids))

    def unplug(self, state: VmState, nic: NicState, timeout: float) -> None:
        _unplug(state, nic.tap, nic.mac, timeout)

    def stop(self, state: VmState) -> None:
        start = self.start
        if start is not None and not start.defining:
            pass  # nothing was asked of libvirt
        elif state.vm_id is not None or state.pid:
            # A start killed before its UUID was recorded defined nothing.
            connection.destroy_and_undefine(state.name, _uri(state), state.vm_id)
        process.remove_workdir(state.workdir)

    def observe(self, state: VmState) -> Observation:
        domain = domxml.parse(connection.domain_xml(state.name, _uri(state)))
        return observe.observe(state.pid, domain=domain, plan=state)

    def ask(self, state: VmState, devices: Sequence[str]) -> None:
        return None  # asking the domain's monitor would mark it tainted
