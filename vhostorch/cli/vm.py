"""`vhostorch up`, `down` and `nic add|del`: VMs vhostorch starts, and their NICs."""

from __future__ import annotations

import os

from vhostorch.cli.argv import INT, MAX_SECONDS, VALUE, Command, Option, Parsed
from vhostorch.cli.output import EXIT_CODES, JSON, STRICT, emit, report_text
from vhostorch.cli.taps import BRIDGE, GROUP, MTU, OWNER, QUEUES
from vhostorch.errors import EXIT_FAILED, EXIT_OK, InvalidSpec
from vhostorch.inputs import check_ifname
from vhostorch.record import TYPE_CHECKING
from vhostorch.vm.spec import RING_SIZES

if TYPE_CHECKING:
    from vhostorch.orchestrate import Outcome

UP_EXIT_CODES = """The exit code is the check's, once the guest driver has started vhost (or the
wait ran out); a failure before that undoes every step (taps, VM, state).

exit codes:
  0  the VM runs and no check failed (with --strict: every check passed)
  1  a check failed, or the VM could not be started (the host refused; nothing is left)
  2  bad usage or an invalid spec (nothing was touched)"""

WAIT = Option(
    "--wait",
    INT,
    "seconds to wait for the guest driver to start vhost (default 60)",
    high=MAX_SECONDS,
)

COMMANDS = (
    Command(
        ("up",),
        "make the taps, start the VM of a spec (TOML), wait for its guest driver, check it",
        "SPEC",
        "1",
        (
            Option("--backend", VALUE, "qmp (QEMU started here, NICs over QMP) or libvirt"),
            Option("--connect", VALUE, "libvirt URI (default qemu:///system)"),
            Option(
                "--user",
                VALUE,
                "user QEMU runs as (qmp backend; default libvirt's QEMU user, else root)",
            ),
            WAIT,
            STRICT,
            JSON,
        ),
        UP_EXIT_CODES,
    ),
    Command(
        ("down",),
        "stop a VM vhostorch started and remove the taps it created for it",
        "VM",
        "1",
        (JSON,),
        EXIT_CODES.replace("2  bad usage", "2  bad usage (VM is a name or a spec file)", 1),
    ),
    Command(
        ("nic", "add"),
        "hot-plug a NIC (its tap made here) into a VM vhostorch started, then check it",
        "VM",
        "1",
        (
            Option("--tap", VALUE, "tap name (default: VM-nN)"),
            QUEUES.replace(help="queue pairs (default 1)"),
            Option("--vhost", VALUE, "required (default), preferred or off"),
            Option("--mac", VALUE, "guest MAC (default: derived from the VM name)"),
            BRIDGE.replace(help="bridge for the tap"),
            MTU.replace(help="MTU of the tap (and offered to the guest)"),
            OWNER.replace(help="tap owner"),
            GROUP.replace(help="tap group"),
            Option(
                "--rx-queue-size",
                INT,
                "rx ring size (256, 512, 1024)",
                low=min(RING_SIZES),
                high=max(RING_SIZES),
            ),
            Option(
                "--tx-queue-size",
                INT,
                "tx ring size (256; QEMU caps it for kernel vhost)",
                low=min(RING_SIZES),
                high=max(RING_SIZES),
            ),
            WAIT,
            STRICT,
            JSON,
        ),
        UP_EXIT_CODES,
    ),
    Command(
        ("nic", "del"),
        "unplug a NIC from a VM vhostorch started; delete its tap if vhostorch made it",
        "VM TAP",
        "2",
        (JSON,),
        EXIT_CODES,
    ),
)


def _outcome(outcome: Outcome, args: Parsed, what: str) -> int:
    state, report = outcome.state, outcome.report
    strict = args.flag("strict")
    where = f"pid {state.pid}" + (f", QMP {state.qmp}" if state.qmp else "")
    if not any(n.vhost_on for n in state.nics):
        waited = "no NIC uses vhost, so nothing to wait for"
    elif outcome.driver_up:
        waited = f"the guest driver started vhost after {outcome.waited:.1f} s"
    else:
        waited = f"the guest driver did not start vhost within {outcome.waited:.0f} s"
    emit(
        {
            "ok": report.ok(strict),
            "vm": state.asdict(),
            "waited": round(outcome.waited, 2),
            "driver_up": outcome.driver_up,
            "check": report.to_json(strict),
        },
        args.flag("json"),
        f"{state.name}: {what} ({state.backend} backend, {where}); {waited}\n"
        + report_text(report, strict),
    )
    return EXIT_OK if report.ok(strict) else EXIT_FAILED


def _wait(args: Parsed) -> float:
    from vhostorch import orchestrate

    wait = args.number("wait")
    return orchestrate.WAIT_DRIVER if wait is None else float(wait)


def _up(args: Parsed) -> int:
    from vhostorch import backends, orchestrate
    from vhostorch.libvirt import connection
    from vhostorch.vm import spec

    wanted = spec.load(args.texts("SPEC")[0])
    backend = args.text("backend") or "qmp"
    if args.text("connect") and backend not in backends.taking_uri():
        raise InvalidSpec(f"up: --connect goes with --backend {' or '.join(backends.taking_uri())}")
    import sys

    outcome = orchestrate.up(
        wanted,
        backends.name_of(backend),
        uri=args.text("connect") or connection.SYSTEM_URI,
        wait=_wait(args),
        user=args.text("user"),
        warn=lambda line: print(f"vhostorch: warning: {line}", file=sys.stderr),
    )
    return _outcome(outcome, args, "up")


def vm_name(given: str) -> str:
    """A VM name, or the name in a spec file (``down spec.toml`` as well as ``down vm1``)."""
    from vhostorch.vm import spec

    if given.endswith(".toml") or os.sep in given:
        return spec.load(given).name
    return spec.check_vm_name(given)


def _down(args: Parsed) -> int:
    from vhostorch import orchestrate

    done = orchestrate.down(vm_name(args.texts("VM")[0]))
    state, removed, replaced = done.state, list(done.deleted), list(done.replaced)
    text = f"{state.name}: down (pid {state.pid} stopped"
    text += f"; taps removed: {', '.join(removed)}" if removed else "; no tap to remove"
    if replaced:
        text += (
            f"; left alone: {', '.join(replaced)} (a device that took the name of a tap "
            "vhostorch made: not vhostorch's)"
        )
    emit(
        {"ok": True, "vm": state.asdict(), "taps_removed": removed, "taps_left": replaced},
        args.flag("json"),
        text + ")",
    )
    return EXIT_OK


def _nic(args: Parsed) -> int:
    from vhostorch import orchestrate
    from vhostorch.vm import spec, state

    if args.command.path[1] == "del":
        name, tap = args.texts("VM TAP")
        after = orchestrate.nic_del(vm_name(name), check_ifname(tap, "tap name"))
        emit(
            {"ok": True, "vm": after.asdict()}, args.flag("json"), f"{after.name}: {tap} unplugged"
        )
        return EXIT_OK
    name = vm_name(args.texts("VM")[0])
    current = state.load(name)
    index = spec.next_nic_index(name, current.nics if current else ())
    entry = {
        "tap": args.text("tap"), "queues": args.number("queues"), "vhost": args.text("vhost"),
        "mac": args.text("mac"), "bridge": args.text("bridge"), "mtu": args.number("mtu"),
        "owner": args.text("owner"), "group": args.text("group"),
        "rx_queue_size": args.number("rx_queue_size"),
        "tx_queue_size": args.number("tx_queue_size"),
    }  # fmt: skip
    nic = spec.nic_from_mapping(name, index, {k: v for k, v in entry.items() if v is not None})
    outcome = orchestrate.nic_add(name, nic, wait=_wait(args))
    return _outcome(outcome, args, f"{nic.tap.name} plugged in")


HANDLERS = {"up": _up, "down": _down, "nic": _nic}
