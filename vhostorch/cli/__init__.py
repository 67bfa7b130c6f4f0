"""The `vhostorch` command: argument parsing and output only; the work is in the library.

Start-up cost matters (a libvirt hook runs this on every VM start), so modules
are imported inside the command that needs them, and parsing is vhostorch.cli.argv.
"""

from __future__ import annotations

import os
import sys

from vhostorch.cli.argv import (
    APPEND,
    FLAG,
    INT,
    NEGATE,
    VALUE,
    Command,
    HelpRequested,
    Option,
    Parsed,
    parse,
)
from vhostorch.errors import EXIT_FAILED, EXIT_OK, InvalidSpec, VhostorchError
from vhostorch.record import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

EXIT_CODES = """exit codes:
  0  done, or nothing to do
  1  the operation failed (the host refused it, or its state forbids it)
  2  bad usage or invalid input (nothing was touched)"""

LAB_EXIT_CODES = """COMMAND runs as root in the same working directory, on a copy-on-write
view of this machine's root; the test host has no network device. Its output
is streamed here.

exit codes:
  N    COMMAND's own exit status
  2    bad usage
  124  the timeout ran out (the test host was stopped)
  125  the test host could not be built or booted, or did not reach COMMAND"""

CHECK_EXIT_CODES = """Each check is pass, warn, fail or unknown, with evidence (--json shows it).
A verdict vhostorch cannot prove is unknown, never pass.

exit codes:
  0  no check failed (with --strict: every check passed)
  1  a check failed (with --strict: or warned, or is unknown)
  2  the target could not be inspected (no such process or domain, permission, bad usage)"""

UP_EXIT_CODES = """The exit code is the check's, once the guest driver has started vhost (or the
wait ran out); a failure before that undoes every step (taps, VM, state).

exit codes:
  0  the VM runs and no check failed (with --strict: every check passed)
  1  a check failed, or the VM could not be started (the host refused; nothing is left)
  2  bad usage or an invalid spec (nothing was touched)"""

HOOK_EXIT_CODES = """libvirt looks for hooks when it starts: restart libvirtd (or virtqemud) after
installing or removing one. An existing /etc/libvirt/hooks/qemu is left alone (libvirt
runs it, then qemu.d/* in name order). What the hook does: pydoc vhostorch.hook.program.

exit codes:
  0  done, or nothing to do
  1  a file of that name exists that vhostorch did not install (left as it is)
  2  bad usage"""

NETNS = Option("--netns", VALUE, "named network namespace (as in `ip netns`)")
WAIT = Option("--wait", INT, "seconds to wait for the guest driver to start vhost (default 60)")
STRICT = Option("--strict", FLAG, "warn and unknown fail too")
JSON = Option("--json", FLAG, "print JSON")
HOOK_NAME = Option("--name", VALUE, "file name in qemu.d (default vhostorch)")
HOOKS_DIR = Option("--hooks-dir", VALUE, "libvirt's hook directory (default /etc/libvirt/hooks)")
COMMANDS = (
    Command(
        ("tap", "create"),
        "create or update taps (idempotent; all or nothing)",
        "NAME",
        "+",
        (
            Option("--queues", INT, "queue pairs QEMU will open (default 1)"),
            Option("--no-vnet-hdr", NEGATE, "create the tap without IFF_VNET_HDR", "vnet_hdr"),
            Option("--owner", VALUE, "user (name or uid) allowed to open it, e.g. libvirt-qemu"),
            Option("--group", VALUE, "group (name or gid) allowed to open it"),
            Option("--mtu", INT, "MTU of the tap"),
            Option("--mac", VALUE, "MAC address of the tap itself (the host side)"),
            Option("--bridge", VALUE, "bridge to attach to; it must exist unless --create-bridge"),
            Option("--create-bridge", FLAG, "create the bridge if it is missing"),
            Option("--down", NEGATE, "leave the tap down", "up"),
            Option(
                "--recreate",
                FLAG,
                "recreate a tap vhostorch made whose queue mode differs (never one held open)",
            ),
            NETNS,
            JSON,
        ),
        EXIT_CODES,
    ),
    Command(
        ("tap", "delete"),
        "delete taps vhostorch created",
        "NAME",
        "+",
        (
            Option(
                "--bridge", APPEND, "also delete this bridge if vhostorch made it and it is empty"
            ),
            Option(
                "--force", FLAG, "delete taps vhostorch did not create too (never one held open)"
            ),
            NETNS,
            JSON,
        ),
        EXIT_CODES,
    ),
    Command(("tap", "show"), "show one tap, or every tap", "NAME", "?", (NETNS, JSON), EXIT_CODES),
    Command(
        ("check",),
        "prove, per NIC and per queue, that vhost is attached to running QEMUs",
        "",
        "0",
        (
            Option("--pid", INT, "the QEMU process to check"),
            Option("--domain", VALUE, "the libvirt domain to check (its XML says what was asked)"),
            Option("--connect", VALUE, "libvirt URI for --domain (default qemu:///system)"),
            Option("--qmp", VALUE, "the QMP socket of a QEMU you run (also read for its status)"),
            Option("--all", FLAG, "every QEMU process on this host"),
            Option(
                "--monitor",
                FLAG,
                "with --domain: ask QEMU's monitor through libvirt (libvirt then marks the "
                "domain tainted: custom-monitor)",
            ),
            Option("--strict", FLAG, "warn and unknown fail too"),
            Option("--watch", INT, "re-check every N seconds and report what changes"),
            JSON,
        ),
        CHECK_EXIT_CODES,
    ),
    Command(
        ("trace", "arm"),
        "record the ioctls that wire vhost kicks and calls to KVM (needed by nic.kick/nic.call)",
        "",
        "0",
        (JSON,),
        EXIT_CODES,
    ),
    Command(
        ("trace", "disarm"), "stop recording and remove the probe", "", "0", (JSON,), EXIT_CODES
    ),
    Command(
        ("trace", "status"), "say whether the wiring trace is armed", "", "0", (JSON,), EXIT_CODES
    ),
    Command(
        ("doctor",),
        "validate this host for vhost-net before any VM runs",
        "",
        "0",
        (Option("--strict", FLAG, "warn and unknown fail too"), JSON),
        CHECK_EXIT_CODES,
    ),
    Command(
        ("up",),
        "make the taps, start the VM of a spec (TOML), wait for its guest driver, check it",
        "SPEC",
        "1",
        (
            Option("--backend", VALUE, "qmp (QEMU started here, NICs over QMP) or libvirt"),
            Option("--connect", VALUE, "libvirt URI (default qemu:///system)"),
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
            Option("--queues", INT, "queue pairs (default 1)"),
            Option("--vhost", VALUE, "required (default), preferred or off"),
            Option("--mac", VALUE, "guest MAC (default: derived from the VM name)"),
            Option("--bridge", VALUE, "bridge for the tap"),
            Option("--mtu", INT, "MTU of the tap (and offered to the guest)"),
            Option("--owner", VALUE, "tap owner"),
            Option("--group", VALUE, "tap group"),
            Option("--rx-queue-size", INT, "rx ring size (256, 512, 1024)"),
            Option("--tx-queue-size", INT, "tx ring size (256; QEMU caps it for kernel vhost)"),
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
    Command(
        ("hook", "install"),
        "install the libvirt hook (qemu.d/NAME): domains' declared taps, vhost check at start",
        "",
        "0",
        (HOOK_NAME, HOOKS_DIR, JSON),
        HOOK_EXIT_CODES,
    ),
    Command(
        ("hook", "uninstall"),
        "remove the libvirt hook vhostorch installed",
        "",
        "0",
        (HOOK_NAME, HOOKS_DIR, JSON),
        HOOK_EXIT_CODES,
    ),
    Command(
        ("lab", "build"),
        "fetch the test host's kernel and build its boot files (cached; rebuilt on change)",
        "",
        "0",
        (JSON,),
        LAB_EXIT_CODES,
    ),
    Command(
        ("lab", "run"),
        "boot the disposable test host (real vhost-net and KVM), run COMMAND in it, power off",
        "COMMAND",
        "...",
        (
            Option("--timeout", INT, "seconds before everything is stopped (default 900)"),
            Option("--memory", INT, "MiB of memory for the test host (default 3072)"),
            Option(
                "--cpus", INT, "virtual CPUs of the test host (default 1; 2 can freeze under TCG)"
            ),
            Option("--env", APPEND, "KEY=VALUE to set for COMMAND (repeatable)"),
            Option("--results", VALUE, "directory shared back read-write (default: a new one)"),
        ),
        LAB_EXIT_CODES,
    ),
)


def _emit(data: Any, as_json: bool, text: str) -> None:
    if as_json:
        import json

        print(json.dumps(data, indent=2))
    elif text:
        print(text)


def _results_text(results: Sequence[Any]) -> str:
    lines = []
    for r in results:
        detail = f" ({', '.join(r.changes)})" if r.changes else ""
        lines.append(f"{r.name}: {r.action}{detail}")
    return "\n".join(lines)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def _cmd_tap(args: Parsed) -> int:
    from vhostorch import taps
    from vhostorch.model import TapSpec

    verb = args.command.path[1]
    names = args.texts("NAME")
    netns = args.text("netns")
    if verb == "create":
        mac = args.text("mac")
        if mac and len(names) > 1:
            raise InvalidSpec("--mac names one address, so give one tap with it")
        queues = args.number("queues")
        specs = [
            TapSpec(
                name,
                queues=1 if queues is None else queues,
                vnet_hdr=args.flag("vnet_hdr"),
                owner=args.text("owner"),
                group=args.text("group"),
                mtu=args.number("mtu"),
                mac=mac,
                bridge=args.text("bridge"),
                netns=netns,
                up=args.flag("up"),
                create_bridge=args.flag("create_bridge"),
            )
            for name in names
        ]
        results = taps.ensure(specs, recreate=args.flag("recreate"))
        _emit(
            {"ok": True, "taps": [r.asdict() for r in results]},
            args.flag("json"),
            _results_text(results),
        )
    elif verb == "delete":
        results = taps.delete(
            names, netns=netns, bridges=args.texts("bridge"), force=args.flag("force")
        )
        _emit(
            {"ok": True, "taps": [r.asdict() for r in results]},
            args.flag("json"),
            _results_text(results),
        )
    else:
        states = taps.show(names[0] if names else None, netns=netns)
        rows = [
            [
                "NAME",
                "QUEUES",
                "VNET_HDR",
                "OWNER",
                "GROUP",
                "MTU",
                "MAC",
                "BRIDGE",
                "STATE",
                "ATTACHED",
                "MANAGED",
            ]
        ]
        for s in states:
            state = ("up" if s.up else "down") + ("" if s.carrier else ",no-carrier")
            rows.append(
                [
                    s.name,
                    s.queue_mode,
                    "on" if s.vnet_hdr else "off",
                    "-" if s.owner is None else str(s.owner),
                    "-" if s.group is None else str(s.group),
                    str(s.mtu),
                    s.mac or "-",
                    s.bridge or "-",
                    state,
                    str(s.attached_queues),
                    "yes" if s.managed else "no",
                ]
            )
        _emit(
            {"ok": True, "taps": [s.asdict() for s in states]},
            args.flag("json"),
            _table(rows) if states else "no taps",
        )
    return EXIT_OK


def _cmd_lab(args: Parsed) -> int:
    from vhostorch.lab import image as labimage
    from vhostorch.lab import run as lab

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    if args.command.path[1] == "build":
        image = labimage.ensure_image(log=log)
        _emit(
            {"ok": True, "image": image.asdict()},
            args.flag("json"),
            "\n".join(f"{k}: {v}" for k, v in image.asdict().items()),
        )
        return EXIT_OK
    env = {}
    for item in args.texts("env"):
        key, eq, value = item.partition("=")
        if not eq or not key.isidentifier():
            raise InvalidSpec(f"lab run: --env needs KEY=VALUE, not {item!r}")
        env[key] = value
    for dest in ("timeout", "memory", "cpus"):
        given = args.number(dest)
        if given is not None and given < 1:
            raise InvalidSpec(f"lab run: --{dest} must be at least 1")
    outcome = lab.run(
        args.texts("COMMAND"),
        env=env,
        timeout=args.number("timeout") or 900,
        memory_mib=args.number("memory") or 3072,
        cpus=args.number("cpus") or 1,
        results=args.text("results"),
        log=log,
    )
    boot = "?" if outcome.boot_seconds is None else f"{outcome.boot_seconds:.1f}"
    log(
        f"vhostorch lab: exit {outcome.status}; booted in {boot} s, {outcome.seconds:.1f} s in "
        f"all; results in {outcome.results}"
    )
    return outcome.status


def _report_text(report: Any, strict: bool) -> str:
    target = report.target
    if "pid" in target:
        title = f"QEMU pid {target['pid']}"
        if target.get("domain"):
            title += f", domain {target['domain']} (type {target.get('domain_type')})"
        elif target.get("name"):
            title += f" ({target['name']})"
    else:
        title = f"host {target.get('host')} (Linux {target.get('kernel')})"
    per_nic = any(c.nic for c in report.checks)
    rows = [
        ["CHECK", "NIC", "QUEUE", "STATUS", "MESSAGE"]
        if per_nic
        else ["CHECK", "STATUS", "MESSAGE"]
    ]
    for c in report.checks:
        queue = "-" if c.queue is None else str(c.queue)
        where = [c.nic or "-", queue] if per_nic else []
        rows.append([c.id, *where, c.status, c.message])
    counts = {s: sum(1 for c in report.checks if c.status == s) for s in _STATUSES}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    verdict = "OK" if report.ok(strict) else "FAILED"
    return f"{title}\n{_table(rows)}\n{verdict}: {summary}"


_STATUSES = ("fail", "warn", "unknown", "pass")


def _check_reports(args: Parsed) -> list[Any]:
    from vhostorch.check import targets

    return targets.reports(
        pid=args.number("pid"),
        domain=args.text("domain"),
        qmp=args.text("qmp"),
        every=args.flag("all"),
        uri=args.text("connect"),
        ask_monitor=args.flag("monitor"),
    )


def _print_reports(reports: list[Any], args: Parsed) -> bool:
    strict = args.flag("strict")
    ok = all(r.ok(strict) for r in reports)
    if args.flag("json"):
        if args.command.path == ("check",) and args.flag("all"):
            data: Any = {"ok": ok, "reports": [r.to_json(strict) for r in reports]}
        else:
            data = reports[0].to_json(strict)
        _emit(data, True, "")
    else:
        texts = [_report_text(r, strict) for r in reports]
        print("\n\n".join(texts) if texts else "no QEMU processes")
    return ok


def _cmd_check(args: Parsed) -> int:
    watch = args.number("watch")
    if watch is not None and watch < 1:
        raise InvalidSpec("check: --watch needs at least 1 second")
    reports = _check_reports(args)
    ok = _print_reports(reports, args)
    if watch is None:
        return EXIT_OK if ok else EXIT_FAILED
    import time

    def key(report: Any) -> dict[tuple[object, ...], str]:
        return {(report.target.get("pid"), c.id, c.nic, c.queue): c.status for c in report.checks}

    seen = {k: v for r in reports for k, v in key(r).items()}
    while True:
        try:
            time.sleep(watch)
        except KeyboardInterrupt:
            return EXIT_OK if ok else EXIT_FAILED  # stopping a watch is not an error
        reports = _check_reports(args)
        ok = all(r.ok(args.flag("strict")) for r in reports)
        now = {k: v for r in reports for k, v in key(r).items()}
        stamp = time.strftime("%H:%M:%S")
        for k in sorted(set(seen) | set(now), key=str):
            if seen.get(k) != now.get(k):
                pid, cid, nic, queue = k
                where = f"pid {pid} {cid}" + (f" {nic}" if nic else "")
                where += f" queue {queue}" if queue is not None else ""
                print(f"{stamp} {where}: {seen.get(k, 'absent')} -> {now.get(k, 'gone')}",
                      flush=True)  # fmt: skip
        seen = now


def _cmd_doctor(args: Parsed) -> int:
    from vhostorch.check import doctor

    ok = _print_reports([doctor.doctor()], args)
    return EXIT_OK if ok else EXIT_FAILED


def _cmd_trace(args: Parsed) -> int:
    from vhostorch.check import wiring

    verb = args.command.path[1]
    if verb == "arm":
        changed = wiring.arm()
        text = "wiring trace armed" if changed else "wiring trace was already armed"
    elif verb == "disarm":
        wiring.disarm()
        changed, text = True, "wiring trace disarmed"
    else:
        changed = False
        text = "wiring trace is " + ("armed" if wiring.armed() else "not armed")
    _emit({"ok": True, "armed": wiring.armed(), "changed": changed}, args.flag("json"), text)
    return EXIT_OK


def _outcome(outcome: Any, args: Parsed, what: str) -> int:
    state, report = outcome.state, outcome.report
    strict = args.flag("strict")
    where = f"pid {state.pid}" + (f", QMP {state.qmp}" if state.qmp else "")
    if not any(n.vhost_on for n in state.nics):
        waited = "no NIC uses vhost, so nothing to wait for"
    elif outcome.driver_up:
        waited = f"the guest driver started vhost after {outcome.waited:.1f} s"
    else:
        waited = f"the guest driver did not start vhost within {outcome.waited:.0f} s"
    _emit(
        {
            "ok": report.ok(strict),
            "vm": state.asdict(),
            "waited": round(outcome.waited, 2),
            "driver_up": outcome.driver_up,
            "check": report.to_json(strict),
        },
        args.flag("json"),
        f"{state.name}: {what} ({state.backend} backend, {where}); {waited}\n"
        + _report_text(report, strict),
    )
    return EXIT_OK if report.ok(strict) else EXIT_FAILED


def _wait(args: Parsed) -> float:
    from vhostorch import orchestrate

    wait = args.number("wait")
    if wait is not None and wait < 0:
        raise InvalidSpec("--wait must be 0 or more seconds")
    return orchestrate.WAIT_DRIVER if wait is None else float(wait)


def _cmd_up(args: Parsed) -> int:
    from vhostorch import orchestrate
    from vhostorch.libvirt import connection as virt
    from vhostorch.vm import spec as vmspec

    spec = vmspec.load(args.texts("SPEC")[0])
    backend = args.text("backend") or "qmp"
    if args.text("connect") and backend != "libvirt":
        raise InvalidSpec("up: --connect goes with --backend libvirt")
    outcome = orchestrate.up(
        spec, backend, uri=args.text("connect") or virt.SYSTEM_URI, wait=_wait(args)
    )
    return _outcome(outcome, args, "up")


def _vm_name(given: str) -> str:
    """A VM name, or the name in a spec file (``down spec.toml`` as well as ``down vm1``)."""
    from vhostorch.vm import spec as vmspec

    if given.endswith(".toml") or os.sep in given:
        return vmspec.load(given).name
    return vmspec.check_vm_name(given)


def _cmd_down(args: Parsed) -> int:
    from vhostorch import orchestrate

    state = orchestrate.down(_vm_name(args.texts("VM")[0]))
    removed = [n.tap for n in state.nics if n.tap_created]
    text = f"{state.name}: down (pid {state.pid} stopped"
    text += f"; taps removed: {', '.join(removed)})" if removed else "; no tap to remove)"
    _emit({"ok": True, "vm": state.asdict(), "taps_removed": removed}, args.flag("json"), text)
    return EXIT_OK


def _cmd_nic(args: Parsed) -> int:
    from vhostorch import orchestrate
    from vhostorch.vm import spec as vmspec
    from vhostorch.vm import state as vmstate

    if args.command.path[1] == "del":
        name, tap = args.texts("VM TAP")
        state = orchestrate.nic_del(_vm_name(name), tap)
        _emit(
            {"ok": True, "vm": state.asdict()}, args.flag("json"), f"{state.name}: {tap} unplugged"
        )
        return EXIT_OK
    name = _vm_name(args.texts("VM")[0])
    current = vmstate.load(name)
    nics = current.nics if current else ()
    taken = {n.tap for n in nics} | {n.mac for n in nics}
    # The first NIC index whose default tap name and MAC are both free.
    index = next(
        i
        for i in range(len(nics), len(nics) + len(taken) + 1)
        if {vmspec.default_tap(name, i), vmspec.default_mac(name, i)}.isdisjoint(taken)
    )
    entry = {
        "tap": args.text("tap"), "queues": args.number("queues"), "vhost": args.text("vhost"),
        "mac": args.text("mac"), "bridge": args.text("bridge"), "mtu": args.number("mtu"),
        "owner": args.text("owner"), "group": args.text("group"),
        "rx_queue_size": args.number("rx_queue_size"),
        "tx_queue_size": args.number("tx_queue_size"),
    }  # fmt: skip
    nic = vmspec.nic_from_mapping(name, index, {k: v for k, v in entry.items() if v is not None})
    outcome = orchestrate.nic_add(name, nic, wait=_wait(args))
    return _outcome(outcome, args, f"{nic.tap.name} plugged in")


def _cmd_hook(args: Parsed) -> int:
    from vhostorch.hook import install as hookfile

    name = args.text("name") or hookfile.DEFAULT_NAME
    hooks_dir = args.text("hooks_dir") or hookfile.HOOKS_DIR
    if args.command.path[1] == "install":
        done = hookfile.install(name, hooks_dir)
        restart = "restart libvirtd (or virtqemud) so that it runs the hook"
    else:
        done = hookfile.uninstall(name, hooks_dir)
        restart = "restart libvirtd (or virtqemud) so that it stops looking for it"
    text = f"{done.path}: {done.action}"
    if done.action in ("installed", "removed"):
        text += f"; {restart}"
    if done.other_hooks:
        text += f"\nother qemu hooks, left as they are: {', '.join(done.other_hooks)}"
    _emit({"ok": True, **done.asdict()}, args.flag("json"), text)
    return EXIT_OK


HANDLERS = {
    "tap": _cmd_tap,
    "lab": _cmd_lab,
    "check": _cmd_check,
    "doctor": _cmd_doctor,
    "trace": _cmd_trace,
    "up": _cmd_up,
    "down": _cmd_down,
    "nic": _cmd_nic,
    "hook": _cmd_hook,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return its exit code (errors go to stderr as one line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in argv
    try:
        args = parse(COMMANDS, argv, EXIT_CODES)
        return HANDLERS[args.command.path[0]](args)
    except HelpRequested as text:
        print(text)
        return EXIT_OK
    except VhostorchError as err:
        return _fail(str(err), err.exit_code, as_json)
    except KeyboardInterrupt:
        return _fail("interrupted", 130, as_json)
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, as other command-line tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as err:
        if os.environ.get("VHOSTORCH_DEBUG"):
            raise
        return _fail(
            f"internal error: {type(err).__name__}: {err} (VHOSTORCH_DEBUG=1 shows the traceback)",
            EXIT_FAILED,
            as_json,
        )


def _fail(message: str, code: int, as_json: bool) -> int:
    line = " ".join(message.split())
    print(f"vhostorch: error: {line}", file=sys.stderr)
    if as_json:
        import json

        print(json.dumps({"ok": False, "error": line, "exit_code": code}))
    return code


if __name__ == "__main__":
    raise SystemExit(main())

__all__ = ["COMMANDS", "main"]
