"""The QMP backend: QEMU started by vhostorch (backends.process) with no network on its command
line; NICs added over QMP.

vhostorch opens each NIC's tap queues and one /dev/vhost-net per queue itself
and hands the fds to QEMU over the QMP socket (SCM_RIGHTS + ``getfd``), then
``netdev_add`` (type tap, ``fds``, ``vhost``, ``vhostfds``) and ``device_add``.
QEMU thus needs no access to /dev/net/tun or /dev/vhost-net, as under libvirt.

QEMU 7.2 behaviour relied on: a netdev takes the fds named by ``getfd`` (they
leave the monitor's list); ``netdev_del`` closes them; ``device_del`` finishes
only when the guest has released the device (ACPI eject), so unplugging waits
for the device to leave ``/machine/peripheral`` before deleting its netdev.
"""

from __future__ import annotations

import os
import time

from vhostorch.backends import process
from vhostorch.backends.contract import Begun, Description, Plugged
from vhostorch.check import observe
from vhostorch.check.report import FAIL, PASS, UNKNOWN
from vhostorch.errors import OperationFailed
from vhostorch.kernel import procfs, tun
from vhostorch.qemu.monitor import MonitorError, QmpSocket, read_virtio, vhost_started
from vhostorch.record import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

    from vhostorch.check.observe import Observation
    from vhostorch.qemu.monitor import MonitorView
    from vhostorch.vm.spec import NicSpec, VmSpec
    from vhostorch.vm.state import NicState, VmState

UNPLUG_TIMEOUT = 30.0


def ids(tap: str) -> tuple[str, str]:
    """(device id, netdev id) of the NIC on ``tap``: QEMU ids start with a letter."""
    return f"nic.{tap}", f"tap.{tap}"


def device_args(nic: NicSpec) -> dict[str, object]:
    """``device_add`` arguments: ``vectors`` = 2N+2 (a vector per virtqueue, control, config)."""
    device, netdev = ids(nic.tap.name)
    args: dict[str, object] = {
        "driver": "virtio-net-pci", "id": device, "netdev": netdev, "mac": nic.mac,
    }  # fmt: skip
    if nic.queues > 1:
        args.update(mq=True, vectors=nic.vectors)
    if nic.rx_queue_size is not None:
        args["rx_queue_size"] = nic.rx_queue_size
    if nic.tx_queue_size is not None:
        args["tx_queue_size"] = nic.tx_queue_size
    if nic.tap.mtu is not None:
        args["host_mtu"] = nic.tap.mtu  # offered to the guest (VIRTIO_NET_F_MTU)
    return args


def _open_queues(nic: NicSpec) -> list[int]:
    import errno

    try:
        return tun.open_queues(nic.tap.name, nic.queues)
    except OSError as err:
        why = err.strerror or str(err)
        if err.errno == errno.EBUSY:
            who = ", ".join(f"pid {p} ({c})" for p, c in tun.holders(nic.tap.name))
            why = f"it is in use{' by ' + who if who else ''}"
        elif err.errno == errno.EINVAL:
            why = "its queue mode differs from the NIC's queues"
        message = f"tap {nic.tap.name}: cannot open {nic.queues} queue(s): {why}"
        raise OperationFailed(message) from None


def _open_vhost(count: int) -> list[int]:
    fds: list[int] = []
    try:
        for _ in range(count):
            fds.append(os.open(procfs.VHOST_NET, os.O_RDWR | os.O_CLOEXEC))
    except OSError as err:
        for fd in fds:
            os.close(fd)
        raise OperationFailed(f"{procfs.VHOST_NET} does not open: {err.strerror}") from None
    return fds


def add_nic(sock: QmpSocket, nic: NicSpec, vhost_on: bool) -> None:
    """Open the NIC's queues (and vhost devices), pass them to QEMU, add netdev and device.

    All or nothing: on a failure the fds QEMU was given are released and the netdev
    removed. Raises OperationFailed (MonitorError for QEMU's refusals).
    """
    netdev = ids(nic.tap.name)[1]
    ours = _open_queues(nic)
    named: list[str] = []
    try:
        vhosts = _open_vhost(nic.queues) if vhost_on else []
        ours += vhosts
        tap_names = [f"{netdev}.q{i}" for i in range(nic.queues)]
        vhost_names = [f"{netdev}.v{i}" for i in range(len(vhosts))]
        # Tap then vhost device, queue by queue: QEMU numbers them in this order.
        order = [(ours[i], tap_names[i]) for i in range(nic.queues)]
        for i, fd in enumerate(vhosts):
            order.insert(2 * i + 1, (fd, vhost_names[i]))
        for fd, name in order:
            sock.pass_fd(fd, name)
            named.append(name)
        args: dict[str, object] = {"type": "tap", "id": netdev, "fds": ":".join(tap_names)}
        args["vhost"] = vhost_on
        if vhost_on:
            args["vhostfds"] = ":".join(vhost_names)
        port = free_port(sock)
        sock.execute("netdev_add", args)
        named = []  # the netdev holds them now
        try:
            device = device_args(nic)
            if port is not None:
                device["bus"] = port
            sock.execute("device_add", device)
        except MonitorError:
            _quietly(sock, "netdev_del", {"id": netdev})
            raise
    except BaseException:
        for name in named:
            _quietly(sock, "closefd", {"fdname": name})
        raise
    finally:
        for fd in ours:
            os.close(fd)  # QEMU has its own copies


def free_port(sock: QmpSocket) -> str | None:
    """A pcie-root-port vhostorch made (q35) with nothing plugged in; None on a machine
    without them (pc: its PCI bus takes hot-plugs itself).

    Asked of QOM, not ``query-pci``: before the firmware numbers the buses (a VM started
    paused, its NICs added before ``cont``), ``query-pci`` lists no device behind a root
    port (QEMU 7.2). A port's bus (``/machine/peripheral/PORT/PORT``) has a ``child[N]``
    property per device plugged into it.

    Raises OperationFailed when every one is taken: QEMU would otherwise put the NIC on
    pcie.0, which refuses hot-plug.
    """
    ports = sorted(
        (p for p in _peripherals(sock) if p.startswith(process.ROOT_PORT)),
        key=lambda p: int(p.removeprefix(process.ROOT_PORT) or 0),
    )
    for port in ports:
        props = sock.qom_names(f"/machine/peripheral/{port}/{port}")
        if not any(name.startswith("child[") for name in props):
            return port
    if not ports:
        return None
    raise OperationFailed(
        f"no free PCIe root port for another NIC: all {len(ports)} are in use (the VM spec's "
        "spare_ports sets how many are made beyond one per NIC)"
    )


def _quietly(sock: QmpSocket, command: str, args: dict[str, object]) -> None:
    try:
        sock.execute(command, args)
    except MonitorError:
        pass  # undoing after a failure that is already being reported


def start(launch: process.Launch, nics: Sequence[tuple[NicSpec, bool]]) -> int:
    """Add ``nics`` ((spec, vhost on)) to the QEMU being launched and let it run; its pid.

    On any failure QEMU is stopped and its work directory removed. Raises OperationFailed.
    """
    pid = launch.ready()
    try:
        sock = launch.connect()
        try:
            for nic, vhost_on in nics:
                add_nic(sock, nic, vhost_on)
            sock.execute("cont", None)
        finally:
            sock.close()
    except BaseException:
        launch.abort()
        raise
    return pid


def _socket(state: VmState) -> str:
    """The QMP socket of the QEMU of ``state``: where vhostorch has it made in the VM's work
    directory, never a path the state file names."""
    return process.files(state.workdir)[0]


def _connect(state: VmState) -> QmpSocket:
    """A connection to the QEMU of ``state``, refused unless that QEMU serves it. Raises
    OperationFailed (MonitorError)."""
    if state.qmp is None:
        raise OperationFailed(f"the state of VM {state.name} names no QMP socket")
    return process.connect(_socket(state), state.pid, state.start_time)


def attach(state: VmState, nic: NicSpec, vhost_on: bool) -> None:
    """Hot-plug ``nic`` into the running QEMU of ``state``. Raises OperationFailed."""
    sock = _connect(state)
    try:
        add_nic(sock, nic, vhost_on)
    finally:
        sock.close()


def _peripherals(sock: QmpSocket) -> set[str]:
    return set(sock.qom_names("/machine/peripheral"))


def detach(state: VmState, tap: str, timeout: float = UNPLUG_TIMEOUT, queues: int = 0) -> None:
    """Unplug the NIC on ``tap``: device_del, wait for the guest to release it, netdev_del.

    Raises OperationFailed when the guest does not release it in time (the NIC
    then stays as it was: attached, with its tap). Whatever part is gone already is
    skipped, so an unplug cut short is finished by another.
    """
    device, netdev = ids(tap)
    sock = _connect(state)
    try:
        if device in _peripherals(sock):
            sock.execute("device_del", {"id": device})
            deadline = time.monotonic() + timeout
            while device in _peripherals(sock):
                if time.monotonic() > deadline:
                    raise OperationFailed(
                        f"the guest did not release NIC {device} within {timeout:.0f} s (it needs "
                        "a running OS with ACPI hot-plug); it stays attached"
                    )
                time.sleep(0.1)
        try:
            sock.execute("netdev_del", {"id": netdev})
        except MonitorError as err:
            # Gone already: an unplug interrupted after this point, or a plug cut short
            # before its netdev_add, is finished by running this again.
            if err.error_class != "DeviceNotFound":
                raise
        # The fds a plug killed before its netdev_add had passed (getfd): QEMU keeps them,
        # and the tap with them, until they are closed by name.
        for i in range(queues):
            for fdname in (f"{netdev}.q{i}", f"{netdev}.v{i}"):
                _quietly(sock, "closefd", {"fdname": fdname})
    finally:
        sock.close()


class _Asking:
    """One kept connection for the wait's questions: in the test host a new connection per
    question cost the booting guest 125 ms of CPU, a kept one 9 ms. A question that fails or
    times out is asked again next time, on a new connection."""

    def __init__(self) -> None:
        self.sock: QmpSocket | None = None

    def waiting(self, state: VmState, devices: Sequence[str]) -> list[str]:
        try:
            sock = self.sock
            if sock is None:
                sock = _connect(state)  # closes itself when it fails
                self.sock = sock
            return [d for d in devices if not vhost_started(sock.execute, d)]
        except MonitorError:
            self.close()
            return list(devices)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class QmpBackend:
    """backends.contract.Backend for a QEMU vhostorch starts and plugs NICs into over QMP.

    QEMU is launched at ``begin``: it needs no NIC to start, so it builds the machine while
    the taps are made (tests/bench/test_bench_up.py measures what that saves).
    """

    def __init__(self) -> None:
        self.launch: process.Launch | None = None  # the QEMU ``begin`` launched
        self.ran = False  # whether it was let run (``plug``)
        self.asking = _Asking()

    def describe(self) -> Description:
        # QEMU uses vhost under TCG too; its monitor says "not yet" (warn) until the guest
        # driver is up: every other status is final.
        return Description("qmp", False, None, (PASS, FAIL, UNKNOWN))

    def begin(self, spec: VmSpec, workdir: str, uri: str | None, user: str | None) -> Begun:
        found = process.run_as(user)
        self.launch = process.Launch(spec, workdir, found)
        runs_as = process.ROOT if found is None else found.user
        return Begun("QEMU", self.launch.pid, self.launch.start_time, runs_as=runs_as)

    def plug(self, state: VmState, nics: Sequence[tuple[NicSpec, bool]]) -> Plugged:
        ids_ = tuple(ids(nic.tap.name) for nic, _ in nics)
        launch = self.launch
        if launch is not None and not self.ran:
            pid = start(launch, nics)
            self.ran = True
            return Plugged(pid, launch.start_time, launch.qmp, ids_)
        for nic, vhost_on in nics:
            attach(state, nic, vhost_on)
        return Plugged(state.pid, state.start_time, state.qmp, ids_)

    def unplug(self, state: VmState, nic: NicState, timeout: float) -> None:
        self.asking.close()  # QEMU's QMP server serves one client at a time
        detach(state, nic.tap, timeout, nic.queues)

    def stop(self, state: VmState) -> None:
        self.asking.close()
        launch = self.launch
        if launch is not None and not self.ran:
            launch.abort()  # ours, never let run: killed and reaped at once
            return
        if not state.pid and state.launched_after is not None:
            # A start killed before it recorded QEMU's pid: the QEMU serving its socket.
            found = process.find(state.workdir, state.launched_after)
            if found is not None:
                state = state.replace(pid=found[0], start_time=found[1])
        process.stop(state.pid or None, state.start_time, state.workdir)
        if launch is not None:
            launch.abort()  # reaps it (our child)

    def observe(self, state: VmState) -> Observation:
        """QEMU's monitor is asked over the socket vhostorch started it with, of that QEMU."""
        self.asking.close()

        def read() -> MonitorView:
            sock = _connect(state)
            try:
                return read_virtio(sock.execute, f"qmp:{_socket(state)}")
            finally:
                sock.close()

        return observe.observe(state.pid, monitor=read, plan=state)

    def ask(self, state: VmState, devices: Sequence[str]) -> list[str] | None:
        if state.qmp is None:
            return None
        if not devices:
            self.asking.close()
            return []
        return self.asking.waiting(state, devices)
