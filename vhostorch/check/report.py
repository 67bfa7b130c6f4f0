"""Verdicts: one Check per (id, NIC, queue), and the Report that gathers them, typed.

A check is ``pass`` only on evidence that was seen; what could not be seen is
``unknown`` with the reason, never a pass. The ids of a QEMU's checks, what each
says and the module that makes it are listed in ``check.ids``; they are stable
(scripts and the Ansible module match on them).

As qemu.qmp's ``models.py`` gives each protocol structure a class, each part of a
report is a record here: the Check (with a ``cause``: which of its family's failures it
is, a code code reads instead of the message's words), the Report's target (a QEMU, the
host, or a libvirt domain whose QEMU could not be read), and its NICs (a judged NIC with
its Reason and vhost workers, or one vhost-net cannot serve, check.applicable). Each
renders itself to the JSON the README documents (``asdict``); the cause is not part of
it.
"""

from __future__ import annotations

from vhostorch.record import TYPE_CHECKING, Record

if TYPE_CHECKING:
    from typing import Final, Literal

    from vhostorch.vm.spec import BackendName

    Status = Literal["pass", "warn", "fail", "unknown"]
    # Which failure of its family a check is, where code (check.reasons, orchestrate.settle,
    # check.rewire) tells them apart; None for a pass, and for a check that needs none.
    Cause = Literal[
        "no-trace",  # the wiring trace saw nothing of this QEMU: kick/call are unknown
        "no-vhost-fd",  # the queue pair of this virtqueue has no vhost fd
        "driver-not-started",  # the guest driver has not started the device (no DRIVER_OK)
        "not-wired",  # vhost was not started on this vring
        "not-traced",  # the vring was not wired since the trace was armed
        "no-eventfd",  # vhost has no kick (or call) eventfd for this vring
        "relayed-kick",  # the kick eventfd is no KVM ioeventfd: QEMU relays notifications
        "other-queue",  # the kick eventfd is KVM's ioeventfd for another queue
        "masked",  # the call eventfd is QEMU's masked notifier (the guest masked the vector)
        "relayed-interrupt",  # the call eventfd is no KVM irqfd: QEMU injects interrupts
        "unstable-read",  # two reads of the kernel's live state disagreed: kick/call unknown
        "beyond-reader",  # the vring's eventfd is past what the live reader walks of KVM's lists
        "tap-gone",  # vhost's backend is a tap queue on no device: the tap was deleted under QEMU
        "on-vcpu-cpu",  # nic.vhost.placement: a worker may run on a pinned vCPU's CPU
        "on-vcpu-core",  # nic.vhost.placement: ... on an SMT sibling of a pinned vCPU's CPU
        "not-pinned",  # nic.vhost.placement: a worker may run off the CPUs a pin asked for
        "not-paused",  # vm.rewire: the VM was not paused (nothing was touched)
        "left-paused",  # vm.rewire: the VM was paused and could not be resumed
    ]
    # check.reasons' codes: why a NIC does not use vhost, or not fully.
    ReasonCode = Literal[
        "not-requested", "libvirt-open-failed", "vhost-net-missing", "qemu-fallback",
        "irqchip-off", "no-msix", "unexplained",
    ]  # fmt: skip

PASS: Final = "pass"
WARN: Final = "warn"
FAIL: Final = "fail"
UNKNOWN: Final = "unknown"
STATUSES: Final[tuple[Status, ...]] = (PASS, WARN, FAIL, UNKNOWN)

NO_TRACE: Final = "no-trace"
NO_VHOST_FD: Final = "no-vhost-fd"
DRIVER_NOT_STARTED: Final = "driver-not-started"
NOT_WIRED: Final = "not-wired"
NOT_TRACED: Final = "not-traced"
NO_EVENTFD: Final = "no-eventfd"
RELAYED_KICK: Final = "relayed-kick"
OTHER_QUEUE: Final = "other-queue"
MASKED: Final = "masked"
RELAYED_INTERRUPT: Final = "relayed-interrupt"
UNSTABLE_READ: Final = "unstable-read"
BEYOND_READER: Final = "beyond-reader"
TAP_GONE: Final = "tap-gone"
ON_VCPU_CPU: Final = "on-vcpu-cpu"
ON_VCPU_CORE: Final = "on-vcpu-core"
NOT_PINNED: Final = "not-pinned"
NOT_PAUSED: Final = "not-paused"
LEFT_PAUSED: Final = "left-paused"


class Check(Record):
    id: str
    nic: str | None
    queue: int | None
    status: Status
    message: str
    evidence: dict[str, object]
    cause: Cause | None

    def __init__(
        self,
        id: str,
        status: Status,
        message: str,
        evidence: dict[str, object] | None = None,
        *,
        nic: str | None = None,
        queue: int | None = None,
        cause: Cause | None = None,
    ) -> None:
        assert status in STATUSES, status
        self._init(
            id=id,
            nic=nic,
            queue=queue,
            status=status,
            message=message,
            evidence=evidence or {},
            cause=cause,
        )

    def asdict(self) -> dict[str, object]:
        """The documented JSON: the cause is for code here, the message says it to people."""
        return {
            "id": self.id,
            "nic": self.nic,
            "queue": self.queue,
            "status": self.status,
            "message": self.message,
            "evidence": self.evidence,
        }


class Reason(Record):
    """Why a NIC does not use vhost, or not fully (check.reasons says each code)."""

    code: ReasonCode
    message: str
    evidence: dict[str, object]

    def to_json(self) -> dict[str, object]:
        return self.asdict()


class Worker(Record):
    """The vhost worker serving one queue pair of a NIC, and its CPU time."""

    queue_pair: int
    vhost_fd: int
    tid: int
    cpu_seconds: float | None  # None: its stat was unreadable
    attributed_by: str  # which order tied workers to vhost fds (check.verify.workers)
    # Where it runs (check.placement; None where it could not be read): its model
    # ("kthread", "vhost_task", "kthread_task"; "task" where only its name told), its
    # cgroup (v2 path, or v1 cpuset path), the CPUs it may run on (the kernel's list
    # format, "0-1,4") and the CPU it last ran on.
    model: str | None = None
    cgroup: str | None = None
    cpus: str | None = None
    last_cpu: int | None = None


class JudgedNic(Record):
    """A NIC vhost-net can serve, judged by the checks: its place in ``Report.nics``."""

    name: str
    netdev: str
    tap: str | None
    queue_pairs: int
    vhost_requested: bool
    reason: Reason | None  # None: vhost is attached and wired
    workers: tuple[Worker, ...]


class NotApplicable(Record):
    """One NIC vhost-net cannot serve: its name, netdev, what it is and why it is not judged."""

    name: str
    netdev: str | None
    kind: str
    reason: str

    def asdict(self) -> dict[str, object]:
        """Its entry in a report's JSON ``nics`` (judged NICs' entries have no ``applicable``)."""
        return {
            "name": self.name,
            "netdev": self.netdev,
            "kind": self.kind,
            "applicable": False,
            "reason": self.reason,
        }


class Managed(Record):
    """A QEMU vhostorch started: its VM's name and the backend that runs it."""

    vm: str
    backend: BackendName


class QemuTarget(Record):
    """A QEMU process checked; the fields left None are not in its JSON."""

    pid: int
    name: str | None  # its -name guest=
    stopped: str | None = None  # why it runs no code now; its monitor was not asked
    vhostorch: Managed | None = None  # a VM vhostorch started
    domain: str | None = None  # the libvirt domain it runs, with its type
    domain_type: str | None = None

    def asdict(self) -> dict[str, object]:
        out: dict[str, object] = {"pid": self.pid, "name": self.name}
        if self.stopped is not None:
            out["stopped"] = self.stopped
        if self.vhostorch is not None:
            out["vhostorch"] = self.vhostorch.asdict()
        if self.domain is not None:
            out.update(domain=self.domain, domain_type=self.domain_type)
        return out


class HostTarget(Record):
    """This host, as doctor checks it before any VM runs."""

    host: str  # its node name
    kernel: str  # its kernel release


class DomainTarget(Record):
    """A libvirt domain whose QEMU could not be found or read (the hook's vm.inspect)."""

    domain: str


if TYPE_CHECKING:
    Target = QemuTarget | HostTarget | DomainTarget
    ReportedNic = JudgedNic | NotApplicable


class Report(Record):
    """Everything checked for one target (a QEMU process, or the host for doctor)."""

    target: Target
    nics: tuple[ReportedNic, ...]
    checks: tuple[Check, ...]

    def ok(self, strict: bool = False) -> bool:
        bad = (FAIL, WARN, UNKNOWN) if strict else (FAIL,)
        return not any(c.status in bad for c in self.checks)

    @property
    def pid(self) -> int | None:
        """The QEMU's pid; None for a report about the host or an unread domain."""
        return self.target.pid if isinstance(self.target, QemuTarget) else None

    def to_json(self, strict: bool = False) -> dict[str, object]:
        """The stable JSON shape: ok, target, nics, checks[{id, nic, queue, status, ...}]."""
        return {
            "ok": self.ok(strict),
            "target": self.target.asdict(),
            "nics": [nic.asdict() for nic in self.nics],
            "checks": [c.asdict() for c in self.checks],
        }
