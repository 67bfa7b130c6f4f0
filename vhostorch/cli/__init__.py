"""The `vhostorch` command: parsing, dispatch and the one mapping of errors to exit codes.

Each command group declares its commands beside its handler (taps, check, vm, hook, lab);
the work is in the library. Start-up cost matters (a libvirt hook runs `tap create` on
every VM start), so handlers import what they need inside, and parsing is
vhostorch.cli.argv.
"""

from __future__ import annotations

import os
import sys

from vhostorch import __version__
from vhostorch.cli import check, hook, lab, pin, taps, vm
from vhostorch.cli.argv import parse
from vhostorch.cli.output import EXIT_CODES
from vhostorch.errors import (
    EXIT_BROKEN_PIPE,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    HelpRequested,
    InvalidSpec,
    VhostorchError,
)
from vhostorch.record import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from vhostorch.cli.argv import Parsed

_GROUPS = (taps, check, vm, pin, hook, lab)
COMMANDS = tuple(c for group in _GROUPS for c in group.COMMANDS)
HANDLERS: dict[str, Callable[[Parsed], int]] = {
    word: handler for group in _GROUPS for word, handler in group.HANDLERS.items()
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return its exit code (errors go to stderr as one line).

    The one place where exceptions become exit codes: a VhostorchError's own
    ``exit_code`` (see vhostorch.errors), 130 when interrupted, 141 when the reader of
    stdout went away, 1 for anything else (an internal error).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in argv
    # A path of argv's undecodable bytes goes back to stdout as the bytes it was, as Python
    # does in the C locales; under another UTF-8 locale (errors="strict") printing it was an
    # UnicodeEncodeError after the work was done.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="surrogateescape")
    try:
        if argv[:1] in (["--version"], ["-V"]):
            if argv[1:]:
                raise InvalidSpec(f"{argv[0]} takes no arguments")
            print(f"vhostorch {__version__}")
            return EXIT_OK
        args = parse(COMMANDS, argv, EXIT_CODES)
        return HANDLERS[args.command.path[0]](args)
    except HelpRequested as text:
        try:
            print(text)
        except BrokenPipeError:
            return _reader_gone()
        return text.exit_code
    except VhostorchError as err:
        return _fail(str(err), err.exit_code, as_json)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED, as_json)
    except BrokenPipeError:
        return _reader_gone()
    except Exception as err:
        if os.environ.get("VHOSTORCH_DEBUG"):
            raise
        return _fail(
            f"internal error: {type(err).__name__}: {err} (VHOSTORCH_DEBUG=1 shows the traceback)",
            EXIT_FAILED,
            as_json,
        )


def _reader_gone() -> int:
    """The reader of stdout went away (`| head`): stop quietly, as other tools do (stdout
    goes to /dev/null so that the interpreter's last flush does not fail again)."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_BROKEN_PIPE


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
