"""Bad input in every argument position of every command, through the installed `vhostorch`.

Each case puts one bad value in one place and keeps the rest harmless; the command must answer
with one line on stderr and exit 2 (bad input, nothing touched; README's exit-code tables),
never a traceback or an "internal error". The cases are made from the CLI's own command tables
(``cli.COMMANDS``), so a new command or option is covered as soon as it is declared:

- argv bytes that are not UTF-8 in each command word, each positional word and each option
  value (a path option's value may hold any bytes: there 1 is allowed too, as a refusal from
  the host);
- an empty string for each positional word and each option value (never "the default");
- numbers of 20 digits and of 5000 digits, and a non-ASCII digit, for each numeric option;
- a value for each flag (``--json=<bytes>``);
- as a spec file: /dev/zero, a FIFO nobody writes, a directory, deeply nested TOML, a file of
  bytes that are not UTF-8, and one too long.

Harmless fillers: paths under /dev/null (nothing can be made there, not even by root), a
network namespace and a VM that do not exist, a lab cache that cannot exist; and each run has
its own mount namespace, with tmpfs over the directories vhostorch installs into. Every run is cut
off after CASE_TIMEOUT (a FIFO that hangs a read fails the case rather than the suite); the
cases of one command run on a few threads (each is its own process), so the whole file takes
seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.kernel import EXE
from vhostorch import cli
from vhostorch.cli.argv import APPEND, FLAG, INT, NEGATE, PATH, VALUE, Command, Option

pytestmark = pytest.mark.kernel  # root: a mount namespace and tmpfs per case

BAD = b"\xff\xfevho"  # not UTF-8: Python's argv holds it as lone surrogates (PEP 383)
NOWHERE = b"/dev/null/vhoinp"  # under a file: no directory can be made there
CASE_TIMEOUT = 20.0
# One filler per positional word (Command.positional's words), valid but naming nothing.
FILLERS = {"NAME": b"vhoinp0", "VM": b"vhoinp-none", "TAP": b"vhoinp0", "SPEC": NOWHERE + b".toml",
           "COMMAND": b"true"}  # fmt: skip
# Options given a harmless value in every case that does not fuzz them: nothing is looked up
# or written where it matters.
HARMLESS = {"--netns": b"vhoinp-none", "--unit-dir": NOWHERE, "--hooks-dir": NOWHERE,
            "--results": NOWHERE}  # fmt: skip
NUMBERS = (b"9" * 20, b"9" * 5000, "\u0663".encode())  # 20 digits, 5000, Arabic-Indic 3
# Each case also runs in a mount namespace of its own, with empty tmpfs over the directories a
# command would install into: should a case ever get past validation (a regression), it
# cannot touch the machine's own (an empty --unit-dir once meant /etc/systemd/system).
SANDBOX = [
    "unshare", "--mount", "--propagation", "private", "sh", "-c",
    "for d in /etc/systemd/system /etc/libvirt/hooks /run/vhostorch; do"
    ' if [ -d "$d" ]; then mount -t tmpfs tmpfs "$d" || exit 99; fi; done; exec "$@"', "sandbox",
]  # fmt: skip
ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "PYTHONIOENCODING": "utf-8",  # stdout strict, as under en_US.UTF-8: the harder case
    "VHOSTORCH_CACHE": "/dev/null/vhoinp-cache",  # lab build/run never reach the real cache
}


class Case:
    def __init__(self, what: str, argv: list[bytes], codes: tuple[int, ...], names: str = ""):
        self.what, self.argv, self.codes, self.names = what, argv, codes, names


def _words(command: Command) -> list[bytes]:
    """Fillers for the positional words the command needs (one for "?", "+" and "...")."""
    if command.arity == "0":
        return []
    names = command.positional.split()
    return [FILLERS[n] for n in names] if command.arity.isdigit() else [FILLERS[names[0]]]


def _harmless(command: Command, skip: str = "") -> list[bytes]:
    return [
        arg
        for o in command.options
        if o.name in HARMLESS and o.name != skip
        for arg in (o.name.encode(), HARMLESS[o.name])
    ]


def _line(
    command: Command, words: list[bytes], options: list[bytes], skip: str = ""
) -> list[bytes]:
    head = [p.encode() for p in command.path]
    # "--" first: a positional that starts with "-" is still a positional.
    return [*head, *options, *_harmless(command, skip), b"--", *words]


def _option_cases(command: Command, opt: Option) -> Iterator[Case]:
    name = opt.name.encode()
    where = f"{' '.join(command.path)} {opt.name}"
    words = _words(command)
    values: list[tuple[str, bytes, tuple[int, ...]]] = []
    if opt.kind in (FLAG, NEGATE):
        yield Case(f"{where}=<bytes>", _line(command, words, [name + b"=" + BAD]), (2,), opt.name)
        return
    values.append(("empty", b"", (2,)))
    if opt.kind in (VALUE, APPEND):
        values.append(("bytes", BAD, (2,)))
    elif opt.kind == PATH:
        values.append(("bytes", NOWHERE + b"/" + BAD, (1, 2)))
    elif opt.kind == INT:
        values += [(f"{len(n)}-byte number", n, (2,)) for n in NUMBERS]
    for label, value, codes in values:
        argv = _line(command, words, [name, value], skip=opt.name)
        yield Case(f"{where} {label}", argv, codes, opt.name if codes == (2,) else "")


def _positional_cases(command: Command) -> Iterator[Case]:
    if command.arity == "...":
        return  # its words are another program's command line, passed on as they are
    words = _words(command) or []
    for i in range(len(words)):
        for label, value in (("bytes", BAD), ("empty", b"")):
            changed = [*words[:i], value, *words[i + 1 :]]
            what = f"{' '.join(command.path)} {command.positional} word {i} {label}"
            yield Case(what, _line(command, changed, []), (2,))


def _spec_cases(command: Command, specs: dict[str, bytes]) -> Iterator[Case]:
    """Files that are no spec, where the command reads one (SPEC, or VM given as a file)."""
    if command.positional.split()[:1] not in (["SPEC"], ["VM"]):
        return
    rest = _words(command)[1:]
    for label, path in specs.items():
        what = f"{' '.join(command.path)} spec {label}"
        yield Case(what, _line(command, [path, *rest], []), (2,), os.fsdecode(path))


def cases(command: Command, specs: dict[str, bytes]) -> list[Case]:
    found = [
        Case(f"{' '.join(command.path)} word {i} bytes",
             [*(p.encode() for p in command.path[:i]), BAD], (2,))
        for i in range(len(command.path))
    ]  # fmt: skip
    found.append(Case(f"{' '.join(command.path)} unknown option",
                      _line(command, _words(command), [b"--" + BAD]), (2,)))  # fmt: skip
    for opt in command.options:
        found += _option_cases(command, opt)
    found += _positional_cases(command)
    found += _spec_cases(command, specs)
    return found


def run(case: Case) -> str | None:
    """What is wrong with how the command answered ``case``, or None."""
    proc = subprocess.Popen(
        [*(w.encode() for w in SANDBOX), EXE.encode(), *case.argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
        start_new_session=True,  # so that a hung case is stopped with all it started
    )
    try:
        _, err = proc.communicate(timeout=CASE_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return f"{case.what}: still running after {CASE_TIMEOUT:.0f} s"
    text = err.decode(errors="backslashreplace")
    wrong = []
    if proc.returncode not in case.codes:
        wrong.append(f"exit {proc.returncode}, not {' or '.join(map(str, case.codes))}")
    if text.count("\n") != 1 or not text.startswith("vhostorch: error: "):
        wrong.append("not one error line")
    if "internal error" in text or "Traceback" in text:
        wrong.append("an internal error")
    if case.names and case.names not in text:
        wrong.append(f"does not name {case.names}")
    return f"{case.what}: {', '.join(wrong)}: {text!r}"[:600] if wrong else None


@pytest.fixture(scope="module")
def specs() -> Iterator[dict[str, bytes]]:
    """Files that are not specs, in a directory of their own (removed afterwards)."""
    where = tempfile.mkdtemp(prefix="vhoinp-specs-")
    try:
        fifo = os.path.join(where, "fifo.toml")
        os.mkfifo(fifo)  # nobody writes it: opening it for reading would wait for ever
        deep = os.path.join(where, "deep.toml")
        with open(deep, "w") as f:
            f.write("a = " + "[" * 100_000)  # tomllib recurses once per bracket
        tables = os.path.join(where, "tables.toml")
        with open(tables, "w") as f:
            f.write("a = " + "{b = " * 5_000)
        latin = os.path.join(where, "latin1.toml")
        with open(latin, "wb") as f:
            f.write(b'name = "caf\xe9"\n')
        long = os.path.join(where, "long.toml")
        with open(long, "wb") as f:
            f.write(b"#" * (2 << 20))
        yield {
            "/dev/zero": b"/dev/zero",
            "fifo": os.fsencode(fifo),
            "directory": os.fsencode(where),
            "deep arrays": os.fsencode(deep),
            "deep tables": os.fsencode(tables),
            "not UTF-8": os.fsencode(latin),
            "too long": os.fsencode(long),
        }
    finally:
        subprocess.run(["rm", "-rf", where], check=False)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("command", cli.COMMANDS, ids=lambda c: "-".join(c.path))
def test_bad_input_is_one_line_exit_2_never_an_internal_error(
    command: Command, specs: dict[str, bytes]
) -> None:
    found = cases(command, specs)
    with ThreadPoolExecutor(max_workers=4) as pool:
        wrong = [w for w in pool.map(run, found) if w]
    assert not wrong, f"{len(wrong)} of {len(found)} cases:\n" + "\n".join(wrong)


def test_the_cases_cover_every_option_of_every_command() -> None:
    """Generated from the tables: every option and positional word of every command has its
    cases (a new kind of option must say here how it is fuzzed)."""
    empty: dict[str, bytes] = {}
    for command in cli.COMMANDS:
        made = cases(command, empty)
        for opt in command.options:
            assert opt.kind in (FLAG, NEGATE, VALUE, PATH, INT, APPEND), opt
            fuzzed = [c for c in made if c.what.startswith(f"{' '.join(command.path)} {opt.name}")]
            assert fuzzed, opt
        assert len(made) >= len(command.options) + len(command.path) + 1
