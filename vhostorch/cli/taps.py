"""`vhostorch tap create|delete|show`, and the tap options `nic add` shares."""

from __future__ import annotations

from vhostorch.cli.argv import APPEND, FLAG, INT, NEGATE, VALUE, Command, Option, Parsed
from vhostorch.cli.output import EXIT_CODES, JSON, emit, results_text, table
from vhostorch.errors import EXIT_OK, InvalidSpec
from vhostorch.taps.spec import MAX_MTU, MAX_TAP_QUEUES, MIN_MTU

NETNS = Option("--netns", VALUE, "named network namespace (as in `ip netns`)")
# A tap's own settings, declared once: `nic add` makes a tap too, and describes them there
# for a NIC (Option.replace(help=...)). Each option's dest is the TapSpec attribute it sets
# (taps.spec.ATTRS), so `tap create` hands its options to taps.tap_from_mapping as they are.
QUEUES = Option(
    "--queues", INT, "queue pairs QEMU will open (default 1)", low=1, high=MAX_TAP_QUEUES
)
OWNER = Option("--owner", VALUE, "user (name or uid) allowed to open it, e.g. libvirt-qemu")
GROUP = Option("--group", VALUE, "group (name or gid) allowed to open it")
MTU = Option("--mtu", INT, "MTU of the tap", low=MIN_MTU, high=MAX_MTU)
BRIDGE = Option("--bridge", VALUE, "bridge to attach to; it must exist unless --create-bridge")

COMMANDS = (
    Command(
        ("tap", "create"),
        "create or update taps (idempotent; all or nothing)",
        "NAME",
        "+",
        (
            QUEUES,
            Option("--no-vnet-hdr", NEGATE, "create the tap without IFF_VNET_HDR", "vnet_hdr"),
            OWNER,
            GROUP,
            MTU,
            Option("--mac", VALUE, "MAC address of the tap itself (the host side)"),
            BRIDGE,
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
)

SHOW_COLUMNS = (
    "NAME", "QUEUES", "VNET_HDR", "OWNER", "GROUP", "MTU", "MAC", "BRIDGE", "STATE", "ATTACHED",
    "MANAGED",
)  # fmt: skip


def _tap(args: Parsed) -> int:
    from vhostorch import taps

    verb = args.command.path[1]
    names = args.texts("NAME")
    netns = args.text("netns")
    if verb == "create":
        mac = args.text("mac")
        if mac and len(names) > 1:
            raise InvalidSpec("--mac names one address, so give one tap with it")
        options = args.options()
        specs = [taps.tap_from_mapping(options, defaults={"name": name}) for name in names]
        from vhostorch import signals

        # All or nothing under a stopping signal too: it acts once ensure is done (as in the
        # hook). Its default action cut the batch short, and a SIGTERM as the taps were
        # being made left some of them and the bridge it had made, exit -15, not a word.
        with signals.Held():
            results = taps.ensure(specs, recreate=args.flag("recreate"))
        emit(
            {"ok": True, "taps": [r.asdict() for r in results]},
            args.flag("json"),
            results_text(results),
        )
    elif verb == "delete":
        from vhostorch import signals

        # A stopping signal stops the command as for `up`: never inside a batch (which holds
        # the signals until its taps are deleted or back in their groups), then Interrupted.
        with signals.RollBack():
            results = taps.delete(
                names, netns=netns, bridges=args.texts("bridge"), force=args.flag("force")
            )
        emit(
            {"ok": True, "taps": [r.asdict() for r in results]},
            args.flag("json"),
            results_text(results),
        )
    else:
        states = taps.show(names[0] if names else None, netns=netns)
        rows = [list(SHOW_COLUMNS)]
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
        emit(
            {"ok": True, "taps": [s.asdict() for s in states]},
            args.flag("json"),
            table(rows) if states else "no taps",
        )
    return EXIT_OK


HANDLERS = {"tap": _tap}
