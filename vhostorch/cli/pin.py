"""`vhostorch pin`: run a VM's vhost-net workers on chosen CPUs, and keep them there."""

from __future__ import annotations

from vhostorch.cli.argv import FLAG, INT, VALUE, Command, Option, Parsed
from vhostorch.cli.check import PID_MAX_LIMIT
from vhostorch.cli.output import JSON, emit, shown
from vhostorch.cli.vm import vm_name
from vhostorch.errors import EXIT_FAILED, EXIT_OK, InvalidSpec

PIN_EXIT_CODES = """A pin is recorded (/run/vhostorch/pins) so that `pin --reapply` (the metrics
timer runs it), `nic add` and `check` (nic.vhost.placement) know it; --clear forgets it.

exit codes:
  0  pinned (or cleared, or every recorded pin applied again)
  1  a worker could not be pinned (put back as it was), or a recorded pin could not be applied
  2  bad usage, CPUs a worker's cpuset does not allow or that are offline (nothing changed),
     or no such VM, domain or QEMU"""

COMMANDS = (
    Command(
        ("pin",),
        "pin a VM's vhost-net workers to CPUs (and apply recorded pins again)",
        "VM",
        "?",
        (
            Option("--cpus", VALUE, "the CPUs, as a list (0-3,8): the kernel's format"),
            Option(
                "--pid",
                INT,
                "the QEMU process instead of a VM vhostorch started",
                low=1,
                high=PID_MAX_LIMIT,
            ),
            Option(
                "--domain", VALUE, "the libvirt domain instead (its QEMU, from libvirt's pid file)"
            ),
            Option(
                "--clear", FLAG, "forget the pin; the workers may run where QEMU's main thread may"
            ),
            Option(
                "--reapply", FLAG, "apply every recorded pin again (workers that appeared since)"
            ),
            JSON,
        ),
        PIN_EXIT_CODES,
    ),
)


def _target(args: Parsed) -> tuple[int, str | None]:
    """The QEMU pid and VM name that VM, --pid or --domain names."""
    from vhostorch.check import observe
    from vhostorch.vm import state

    vm, pid, domain = args.texts("VM"), args.number("pid"), args.text("domain")
    if sum((bool(vm), pid is not None, domain is not None)) != 1:
        raise InvalidSpec("pin: give one of VM, --pid or --domain (or --reapply alone)")
    if vm:
        name = vm_name(vm[0])
        known = state.load(name)
        if known is None:
            raise InvalidSpec(f"pin: no VM {name!r} started by vhostorch (see --pid, --domain)")
        return known.pid, name
    if domain is not None:
        return observe.domain_pid(domain), domain
    assert pid is not None
    return pid, None


def _pin(args: Parsed) -> int:
    import contextlib

    from vhostorch.kernel import cpus
    from vhostorch.orchestrate import pinning
    from vhostorch.vm import state

    if args.flag("reapply"):
        if args.texts("VM") or args.number("pid") is not None or args.text("domain"):
            raise InvalidSpec("pin: --reapply takes no VM, --pid or --domain")
        if args.text("cpus") or args.flag("clear"):
            raise InvalidSpec("pin: --reapply goes alone (without --cpus or --clear)")
        done, failed = pinning.reapply()
        lines = [_line(p) for p in done]
        emit(
            {"ok": not failed, "pinned": [p.to_json() for p in done], "failed": failed},
            args.flag("json"),
            "\n".join(lines) if lines or failed else "no recorded pin to apply",
        )
        if not args.flag("json"):
            import sys

            for line in failed:  # as every command's errors: one line each, on stderr
                print(f"vhostorch: error: {shown(line)}", file=sys.stderr)
        return EXIT_FAILED if failed else EXIT_OK
    if args.texts("VM"):
        vm_name(args.texts("VM")[0])  # a bad name (or spec file) is named before the rest
    given = args.text("cpus")
    if (given is None) == (not args.flag("clear")):
        raise InvalidSpec("pin: give --cpus LIST or --clear")
    wanted = None if given is None else cpus.parse_list(cpus.cpu_list(given, "--cpus"))
    pid, vm = _target(args)
    # A VM vhostorch started: under its lock, as `nic add` (which pins its new workers) is.
    with state.Lock(vm) if args.texts("VM") and vm else contextlib.nullcontext():
        if wanted is None:
            pinned = pinning.clear(pid)
        else:
            pinned = pinning.apply(pid, wanted, "vhostorch pin", vm)
    emit({"ok": True, **pinned.to_json()}, args.flag("json"), _line(pinned, cleared=given is None))
    return EXIT_OK


def _line(p: object, cleared: bool = False) -> str:
    from vhostorch.orchestrate.pinning import Pinned

    assert isinstance(p, Pinned)
    who = shown(p.vm) if p.vm else f"QEMU {p.pid}"
    moved = ", ".join(f"{t} ({b} -> {a})" for t, b, a in p.workers)
    what = "unpinned" if cleared else f"vhost-net workers pinned to CPUs {p.cpus}"
    if not p.workers:
        return f"{who}: pin forgotten (no NIC uses vhost now)"
    return f"{who}: {what}: {moved}"


HANDLERS = {"pin": _pin}
