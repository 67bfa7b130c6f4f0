"""Command-line parsing: commands declared as data, parsed without argparse.

Why not argparse: it costs ~20 ms to import and build (with re, enum, gettext,
locale), nearly as long as iproute2 takes to create a VM's taps, and this
parser runs in a fresh process on every VM start. Errors are one line.
"""

from __future__ import annotations

from vhostorch.errors import HelpRequested, InvalidSpec
from vhostorch.inputs import check_text, parse_number
from vhostorch.record import TYPE_CHECKING, Record

if TYPE_CHECKING:
    from collections.abc import Sequence

FLAG, NEGATE, VALUE, PATH, INT, APPEND = "flag", "negate", "value", "path", "int", "append"
_POSITIONAL = "positional"  # the kind of Command.positional's words, for Parsed
_TAKES_VALUE = (VALUE, PATH, INT, APPEND)
MAX_SECONDS = 86400  # a day: the most any option counting seconds takes


class Option(Record):
    """``--name``; ``kind`` is FLAG (sets True), NEGATE (sets False), VALUE, PATH, INT or APPEND.

    A value is never empty (an empty string is refused, never read as the default). VALUE and
    APPEND are text: bytes of argv that are not UTF-8 are refused. PATH is a file system
    path, which may hold any bytes. INT is a whole number from ``low`` to ``high``: every
    number has a bound, so that no value reaches a sleep, an allocation or a kernel call
    unchecked.
    """

    name: str
    kind: str
    help: str
    dest: str
    low: int
    high: int

    def __init__(
        self, name: str, kind: str, help: str, dest: str = "", low: int = 0, high: int = 0
    ) -> None:
        if (kind == INT) != (high > 0):
            raise ValueError(f"option {name}: a bound (high) is for INT options, and they need one")
        self._init(
            name=name, kind=kind, help=help, dest=dest or name[2:].replace("-", "_"), low=low,
            high=high,
        )  # fmt: skip


class Command(Record):
    """A command path (``("tap", "create")``) with its positional and options.

    ``arity`` of the positional is a count ("0", "1", "2": that many words, named in
    ``positional``), "?" or "+" (as argparse's nargs), or "..." for a command line of its
    own: everything from its first word on is taken as it is.
    """

    path: tuple[str, ...]
    summary: str
    positional: str
    arity: str
    options: tuple[Option, ...]
    epilog: str = ""

    def usage(self) -> str:
        shown = {
            "?": f"[{self.positional}]",
            "+": f"{self.positional} [{self.positional} ...]",
            "...": f"[--] {self.positional} [ARG ...]",
            "0": "",
        }
        operand = shown.get(self.arity, self.positional)
        return f"usage: vhostorch {' '.join(self.path)} [options] {operand}".rstrip()

    def help(self) -> str:
        lines = [self.usage(), "", self.summary, "", "options:"]
        for opt in self.options:
            arg = f" {opt.dest.upper()}" if opt.kind in _TAKES_VALUE else ""
            named = f"  {opt.name + arg}"
            # A name too long for the column gets its help on the next line, as argparse does.
            lines += (
                [named, f"{'':26}{opt.help}"] if len(named) >= 26 else [f"{named:<26}{opt.help}"]
            )
        return "\n".join(lines + (["", self.epilog] if self.epilog else []))


class Parsed:
    """The values of one parsed command line, read with typed getters.

    Each getter raises KeyError for a name the command does not declare, and TypeError
    for one of another kind: a misspelt option is a bug, never a silent None.
    """

    def __init__(self, command: Command, values: dict[str, object]) -> None:
        self.command = command
        self._values = values
        self._kinds = {o.dest: o.kind for o in command.options}
        self._kinds[command.positional] = _POSITIONAL

    def _get(self, dest: str, kinds: tuple[str, ...]) -> object:
        kind = self._kinds.get(dest)
        if kind is None:
            raise KeyError(f"vhostorch {' '.join(self.command.path)} has no option {dest!r}")
        if kind not in kinds:
            raise TypeError(f"option {dest!r} of vhostorch {' '.join(self.command.path)} "
                            f"is {kind}, not {' or '.join(kinds)}")  # fmt: skip
        return self._values.get(dest)

    def flag(self, dest: str) -> bool:
        return bool(self._get(dest, (FLAG, NEGATE)))

    def text(self, dest: str) -> str | None:
        value = self._get(dest, (VALUE, PATH))
        return value if isinstance(value, str) else None

    def number(self, dest: str) -> int | None:
        value = self._get(dest, (INT,))
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def options(self) -> dict[str, object]:
        """The options' values by dest (a flag's always, another's when given), for a command
        that hands them on as a mapping (`tap create` to taps.tap_from_mapping)."""
        return {
            o.dest: self._values[o.dest] for o in self.command.options if o.dest in self._values
        }

    def texts(self, dest: str) -> list[str]:
        """An APPEND option's values, or the positional words (``dest`` as in usage)."""
        value = self._get(dest, (APPEND, _POSITIONAL))
        return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _overview(commands: Sequence[Command], prefix: tuple[str, ...], epilog: str) -> str:
    lines = [
        f"usage: vhostorch {' '.join(prefix) + ' ' if prefix else '[--version] '}COMMAND ...",
        "",
        "commands:",
    ]
    for c in commands:
        if c.path[: len(prefix)] == prefix:
            lines.append(f"  {' '.join(c.path):<24}{c.summary}")
    return "\n".join([*lines, "", epilog])


def parse(commands: Sequence[Command], argv: Sequence[str], epilog: str) -> Parsed:
    """Find the command ``argv`` names and read its arguments.

    Raises InvalidSpec (one line) on bad usage and HelpRequested for ``--help``.
    """
    words: list[str] = []
    for arg in argv:
        if arg.startswith("-"):
            break
        words.append(arg)
    command = None
    for c in commands:
        if tuple(words[: len(c.path)]) == c.path:
            command = c
    if command is None:
        wants_help = any(a in ("-h", "--help") for a in argv)
        known = [w for w in words if any(w in c.path for c in commands)]
        if wants_help or not argv:
            if wants_help:
                raise HelpRequested(_overview(commands, tuple(known), epilog))
            raise InvalidSpec("a command is required (vhostorch --help lists them)")
        where = " ".join(known)
        raise InvalidSpec(
            f"unknown command {' '.join(words) or argv[0]!r}"
            f"{' after ' + repr(where) if where else ''} (vhostorch --help lists them)"
        )
    options = {o.name: o for o in command.options}
    values: dict[str, object] = {
        o.dest: ([] if o.kind == APPEND else o.kind == NEGATE)
        for o in command.options
        if o.kind in (FLAG, NEGATE, APPEND)
    }
    positionals: list[str] = []
    rest = list(argv[len(command.path) :])
    name = " ".join(command.path)
    while rest:
        arg = rest.pop(0)
        if command.arity == "..." and positionals:
            positionals += [arg, *rest]
            break
        if arg in ("-h", "--help"):
            raise HelpRequested(command.help())
        if arg == "--":
            positionals += rest
            break
        if not arg.startswith("--") or arg == "-":
            if arg.startswith("-") and arg != "-":
                raise InvalidSpec(f"{name}: unknown option {arg!r}")
            positionals.append(arg)
            continue
        key, eq, inline = arg.partition("=")
        opt = options.get(key)
        if opt is None:
            raise InvalidSpec(f"{name}: unknown option {key!r}")
        if opt.kind in (FLAG, NEGATE):
            if eq:
                raise InvalidSpec(f"{name}: {key} takes no value")
            values[opt.dest] = opt.kind == FLAG
            continue
        if not eq:
            # A following option is a forgotten value (write --key=--x to mean it).
            if not rest or rest[0].startswith("--"):
                raise InvalidSpec(f"{name}: {key} needs a value")
            inline = rest.pop(0)
        if not inline:
            raise InvalidSpec(f"{name}: {key} needs a value, not an empty string")
        if opt.kind == INT:
            number = parse_number(inline, f"{name}: {key}")
            if not opt.low <= number <= opt.high:
                raise InvalidSpec(f"{name}: {key} {inline} is out of range {opt.low}..{opt.high}")
            values[opt.dest] = number
            continue
        if opt.kind != PATH:
            check_text(inline, f"{name}: {key}")
        if opt.kind == APPEND:
            values.setdefault(opt.dest, [])
            list_value = values[opt.dest]
            assert isinstance(list_value, list)
            list_value.append(inline)
        else:
            values[opt.dest] = inline
    count = len(positionals)
    exact = int(command.arity) if command.arity.isdigit() else None
    if (command.arity in ("+", "...") and count < 1) or (exact and count < exact):
        raise InvalidSpec(f"{name}: {command.positional} is required")
    most = 1 if command.arity == "?" else exact
    if most is not None and count > most:
        raise InvalidSpec(f"{name}: unexpected argument {positionals[most]!r}")
    # A command line of its own ("...") may pass empty words to its program, not as the program.
    if "" in (positionals[:1] if command.arity == "..." else positionals):
        raise InvalidSpec(f"{name}: {command.positional} must not be an empty string")
    values[command.positional] = positionals
    return Parsed(command, values)
