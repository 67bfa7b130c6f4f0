"""The command line's tables and parser, without running the command: each command declared
once with its handler, options typed and bounded, errors with their exit codes."""

from __future__ import annotations

import pytest

from vhostorch import cli
from vhostorch.cli.argv import parse
from vhostorch.cli.output import EXIT_CODES
from vhostorch.errors import LabTimeout


def test_a_misspelt_option_is_a_programming_error() -> None:
    args = parse(cli.COMMANDS, ["tap", "create", "t0", "--mtu", "9000"], EXIT_CODES)
    assert (args.number("mtu"), args.text("owner"), args.texts("NAME")) == (9000, None, ["t0"])
    with pytest.raises(KeyError, match="tap create has no option 'mut'"):
        args.number("mut")
    with pytest.raises(KeyError, match="no option 'force'"):
        args.flag("force")  # `tap delete`'s, not `tap create`'s
    with pytest.raises(TypeError, match=r"'mtu' .* is int, not value"):
        args.text("mtu")


def test_each_command_is_declared_once_and_has_its_handler() -> None:
    paths = [c.path for c in cli.COMMANDS]
    assert len(paths) == len(set(paths))
    assert {p[0] for p in paths} == set(cli.HANDLERS)


def test_nic_add_shares_the_tap_options_of_tap_create() -> None:
    by_path = {c.path: {o.name: o for o in c.options} for c in cli.COMMANDS}
    create, nic = by_path["tap", "create"], by_path["nic", "add"]
    for name in ("--queues", "--owner", "--group", "--mtu", "--bridge"):
        assert (nic[name].kind, nic[name].dest) == (create[name].kind, create[name].dest)


def test_an_error_exits_with_its_own_code_on_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def late(args: object) -> int:
        raise LabTimeout("lab run: the timeout ran out\n after 1 s")

    monkeypatch.setitem(cli.HANDLERS, "lab", late)
    assert cli.main(["lab", "run", "true"]) == 124
    assert capsys.readouterr().err == "vhostorch: error: lab run: the timeout ran out after 1 s\n"
    assert cli.main(["tap", "--help"]) == 0
    assert "tap create" in capsys.readouterr().out


def test_every_numeric_option_has_a_bound_and_no_value_is_ever_empty() -> None:
    """Declared in the tables: a number beyond its bound, or an empty value, is refused while
    parsing, naming the option (a 20-digit --watch reached time.sleep, an empty --unit-dir
    meant /etc/systemd/system)."""
    from vhostorch.cli.argv import INT, Option
    from vhostorch.errors import InvalidSpec

    with pytest.raises(ValueError, match="need one"):
        Option("--n", INT, "a number without a bound")
    for command in cli.COMMANDS:
        for opt in command.options:
            assert opt.kind != INT or 0 < opt.high < 10**20, opt
    with pytest.raises(InvalidSpec, match=r"check: --watch 86401 is out of range 1\.\.86400"):
        parse(cli.COMMANDS, ["check", "--all", "--watch", "86401"], EXIT_CODES)
    with pytest.raises(InvalidSpec, match="--unit-dir needs a value, not an empty string"):
        parse(cli.COMMANDS, ["trace", "install-unit", "--unit-dir="], EXIT_CODES)
    with pytest.raises(InvalidSpec, match=r"tap show: --netns is not valid UTF-8: b'\\xff'"):
        parse(cli.COMMANDS, ["tap", "show", "--netns", "\udcff"], EXIT_CODES)
    path = parse(cli.COMMANDS, ["hook", "install", "--hooks-dir", "/x/\udcff"], EXIT_CODES)
    assert path.text("hooks_dir") == "/x/\udcff"  # a path may hold any bytes
