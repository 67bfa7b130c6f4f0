"""`vhostorch lab build|run`: the disposable test host."""

from __future__ import annotations

import sys

from vhostorch.cli.argv import APPEND, INT, MAX_SECONDS, PATH, VALUE, Command, Option, Parsed
from vhostorch.cli.output import JSON, emit
from vhostorch.errors import EXIT_OK, InvalidSpec
from vhostorch.vm.spec import MAX_CPUS, MAX_MEMORY_MIB

LAB_EXIT_CODES = """COMMAND runs as root in the same working directory, on a copy-on-write
view of this machine's root; the test host has no network device. Its output
is streamed here.

exit codes:
  N    COMMAND's own exit status
  2    bad usage
  124  the timeout ran out (the test host was stopped)
  125  the test host could not be built or booted, or did not reach COMMAND"""

KERNEL = Option(
    "--kernel",
    VALUE,
    "kernel series to boot, e.g. 6.12: the newest Debian package of it "
    "(default: linux-image-amd64's; 6.12 with --userland trixie)",
)
USERLAND = Option(
    "--userland",
    VALUE,
    "root the test host boots: default (this machine's, shared read-only) or trixie "
    "(Debian 13's, made with debootstrap and cached; `lab build` remakes it when the archive "
    "has newer packages)",
)

COMMANDS = (
    Command(
        ("lab", "build"),
        "fetch the test host's kernel and build its boot files (cached; rebuilt on change)",
        "",
        "0",
        (KERNEL, USERLAND, JSON),
        LAB_EXIT_CODES,
    ),
    Command(
        ("lab", "run"),
        "boot the disposable test host (real vhost-net and KVM), run COMMAND in it, power off",
        "COMMAND",
        "...",
        (
            KERNEL,
            USERLAND,
            Option(
                "--timeout",
                INT,
                "seconds before everything is stopped (default 900)",
                low=1,
                high=MAX_SECONDS,
            ),
            Option(
                "--memory",
                INT,
                "MiB of memory for the test host (default 3072)",
                low=1,
                high=MAX_MEMORY_MIB,
            ),
            Option(
                "--cpus",
                INT,
                "virtual CPUs of the test host (default 1; 2 can freeze under TCG)",
                low=1,
                high=MAX_CPUS,
            ),
            Option("--env", APPEND, "KEY=VALUE to set for COMMAND (repeatable)"),
            Option("--results", PATH, "directory shared back read-write (default: a new one)"),
        ),
        LAB_EXIT_CODES,
    ),
)


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _lab(args: Parsed) -> int:
    from vhostorch.lab import image, run, userland

    land = userland.userland_name(args.text("userland") or userland.DEFAULT_USERLAND)
    kernel = image.kernel_series(args.text("kernel") or userland.default_kernel(land))
    if args.command.path[1] == "build":
        root = userland.ensure_userland(land, log=_log, refresh=True)
        built = image.ensure_image(log=_log, kernel=kernel)
        # What a VM started inside the test host boots (scripts/demo-vm.sh reads it here, so
        # that no script has to import vhostorch's modules).
        guest = {
            "kernel": built.kernel,
            "initrd": built.guest_initrd,
            "cmdline": image.GUEST_APPEND,
        }
        emit(
            {"ok": True, "image": built.asdict(), "guest": guest, "userland": root.asdict()},
            args.flag("json"),
            "\n".join(f"{k}: {v}" for k, v in built.asdict().items())
            + f"\nguest_cmdline: {image.GUEST_APPEND}"
            + "".join(f"\nuserland_{k}: {v}" for k, v in root.asdict().items() if v),
        )
        return EXIT_OK
    env = {}
    for item in args.texts("env"):
        key, eq, value = item.partition("=")
        if not eq or not key.isidentifier():
            raise InvalidSpec(f"lab run: --env needs KEY=VALUE, not {item!r}")
        env[key] = value
    outcome = run.run(
        args.texts("COMMAND"),
        env=env,
        timeout=args.number("timeout") or 900,
        memory_mib=args.number("memory") or 3072,
        cpus=args.number("cpus") or 1,
        results=args.text("results"),
        log=_log,
        kernel=kernel,
        userland=land,
    )
    boot = "?" if outcome.boot_seconds is None else f"{outcome.boot_seconds:.1f}"
    _log(
        f"vhostorch lab: exit {outcome.status}; booted in {boot} s, {outcome.seconds:.1f} s in "
        f"all; results in {outcome.results}"
    )
    return outcome.status


HANDLERS = {"lab": _lab}
