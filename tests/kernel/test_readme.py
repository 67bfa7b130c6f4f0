"""Everything the README shows exists in the code, as shown: a rename in the code (a command, an
option, a module, a path, a check id, a reason code) fails a test here.

The direction is README → code: each command usage, option, code block, table row and path
the README shows is looked up in (or run through) the real thing. What the code has and the
README does not show is not this file's business, except the reason codes, whose table is the
whole list. The main command itself (`bash scripts/demo.sh`) runs in
tests/testhost/test_demo.py, the collection README's plays in tests/testhost/test_ansible.py.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.support import kernel
from vhostorch import __version__, cli, errors
from vhostorch.check import ids, metrics, reasons
from vhostorch.check.report import Check, JudgedNic, QemuTarget, Reason, Report, Worker
from vhostorch.cli.argv import FLAG, NEGATE, Command, parse

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
COLLECTION_README = (ROOT / "ansible" / "README.md").read_text()
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.M | re.S)
# Top-level words of the command line (tap, check, doctor, trace, up, down, nic, hook, lab).
GROUPS = {c.path[0] for c in cli.COMMANDS}
# Usages of the program itself rather than of one of its commands.
GLOBAL_USAGES = ("vhostorch --help", "vhostorch COMMAND --help", "vhostorch --version")


def blocks(language: str, text: str = README) -> list[str]:
    return [body for lang, body in FENCE.findall(text) if lang == language]


def spans(text: str = README) -> list[str]:
    """The inline code of ``text``, outside its fenced blocks."""
    return re.findall(r"`([^`\n]+)`", FENCE.sub("", text))


def command(path: tuple[str, ...]) -> Command | None:
    return next((c for c in cli.COMMANDS if c.path == path), None)


# ----- command usages -------------------------------------------------------------------------


def usages() -> list[str]:
    """Every `vhostorch ...` usage the README shows: the lines of its sh blocks (comments off,
    continuation lines joined) and its inline code, also where the `vhostorch` is implied
    (`check --rewire`, `nic add`, `trace install-unit [--unit-dir DIR]`)."""
    found: list[str] = []
    for block in blocks("sh"):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*", "", line).rstrip(" \\")
            if line.startswith((" ", "\t")) and found and found[-1].startswith("vhostorch "):
                found[-1] += " " + line.strip()
            elif line.startswith("vhostorch "):
                found.append(line)
    for span in spans() + spans(COLLECTION_README):
        words = span.split()
        if span in GLOBAL_USAGES or (words[0] == "vhostorch" and words[1:2] == [__version__]):
            continue  # the program's own options and what --version prints: tested below
        if words[0] == "vhostorch" and len(words) > 1:
            found.append(span)
        elif words[0] in GROUPS and len(words) > 1 and re.fullmatch(r"[a-z-]+|--[a-z-]+", words[1]):
            found.append(f"vhostorch {span}")
    return found


def parse_usage(usage: str) -> tuple[list[tuple[str, ...]], list[str], list[str], list[str]]:
    """A usage's command paths (``trace arm | disarm | status`` names three), positional words
    shown right after the path, options and the ``a|b`` choices shown after each option."""
    words = usage.replace("[", " ").replace("]", " ").split()[1:]
    words = words[: words.index("--")] if "--" in words else words  # lab run's own COMMAND
    prefixes = {c.path[:n] for c in cli.COMMANDS for n in range(1, len(c.path) + 1)}
    path: tuple[str, ...] = ()
    while words and (*path, words[0]) in prefixes:
        path = (*path, words.pop(0))
    paths = [path]
    # `trace arm | disarm | status`, `hook install|uninstall`: alternatives of the last word.
    while words and words[0] == "|" and len(words) > 1 and (*path[:-1], words[1]) in prefixes:
        paths.append((*path[:-1], words[1]))
        del words[:2]
    if words and all((*path, w) in prefixes for w in words[0].split("|")):
        paths = [(*path, w) for w in words.pop(0).split("|")]
    positionals = []
    while words and not words[0].startswith("--") and words[0] != "|":
        positionals.append(words.pop(0))
    options, choices = [], []
    for i, word in enumerate(words):
        if word.startswith("--"):
            options.append(word.split("=")[0])
            after = words[i + 1] if i + 1 < len(words) else ""
            if re.fullmatch(r"[a-z]+(\|[a-z]+)+", after):
                choices.append(f"{options[-1]} {after}")
    return paths, positionals, options, choices


def test_every_usage_is_found() -> None:
    # The parser of usages above must find what the README shows, or the tests below prove
    # nothing: the synopsis of each section and the inline ones.
    shown = usages()
    for usage in (
        "vhostorch tap create NAME",
        "vhostorch check --pid PID",
        "vhostorch trace arm | disarm | status",
        "vhostorch up SPEC.toml",
        "vhostorch nic del VM TAP",
        "vhostorch lab run",
        "vhostorch hook install [--name NAME]",
        "vhostorch check --rewire",
    ):
        assert any(u.startswith(usage) for u in shown), usage
    assert len(shown) > 25


@pytest.mark.parametrize("usage", usages())
def test_each_usage_names_a_command_and_options_it_has(
    usage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    paths, positionals, options, choices = parse_usage(usage)
    assert paths[0], f"{usage!r} names no vhostorch command"
    for path in paths:
        found = command(path)
        if found is None:
            # A group (`vhostorch tap`, `vhostorch lab`) or an option of a command below it.
            below = [c for c in cli.COMMANDS if c.path[: len(path)] == path]
            assert below, f"{usage!r}: no command {' '.join(path)!r}"
            assert not positionals, f"{usage!r}: {' '.join(path)} has no command {positionals}"
            assert not options or len(below) == 1, usage
            continue
        # The real command line's help for it lists every option the README shows.
        assert cli.main([*path, "--help"]) == errors.EXIT_OK
        help_text = capsys.readouterr().out
        for option in options:
            assert re.search(rf"^  {re.escape(option)}\b", help_text, re.M), (
                f"{usage!r}: vhostorch {' '.join(path)} has no option {option}"
            )
        if positionals:
            assert found.arity != "0", f"{usage!r}: {' '.join(path)} takes no {positionals}"
        for shown in choices:
            option, words = shown.split()
            [declared] = [o for o in found.options if o.name == option]
            for word in words.split("|"):
                assert word in declared.help, f"{usage!r}: {option} {word} is not in its help"


def test_the_programs_own_options_shown_work(capsys: pytest.CaptureFixture[str]) -> None:
    shown = [s for s in spans() if s in GLOBAL_USAGES]
    assert "vhostorch --version" in shown and "vhostorch --help" in shown
    assert f"vhostorch {__version__}" in spans()  # what the README says --version prints
    for usage in shown:
        # COMMAND stands for any one of them: the first will do.
        argv = [w for word in usage.split()[1:]
                for w in (cli.COMMANDS[0].path if word == "COMMAND" else (word,))]  # fmt: skip
        assert cli.main(argv) == errors.EXIT_OK, usage
        out = capsys.readouterr().out
        if argv == ["--version"]:
            assert out == f"vhostorch {__version__}\n"
        elif argv == ["--help"]:
            assert all(" ".join(c.path) in out for c in cli.COMMANDS), out


def test_each_bare_option_shown_is_an_option_of_some_command() -> None:
    known = {o.name for c in cli.COMMANDS for o in c.options} | {"--help", "--version"}
    shown = {s.split()[0] for s in spans() if s.startswith("--")}
    assert shown and shown <= known, shown - known


def test_metric_format_choices_are_the_ones_check_takes() -> None:
    for form in ("prometheus", "openmetrics"):
        assert f"--format {form}" in spans() and form in metrics.FORMATS


def test_pytest_selections_shown_use_declared_markers_and_options(
    request: pytest.FixtureRequest,
) -> None:
    declared = {m.split(":")[0] for m in request.config.getini("markers")}
    for span in spans():
        if not span.startswith(".venv/bin/pytest") and not span.startswith("-m "):
            continue
        for expression in re.findall(r'-m (?:"([^"]+)"|(\S+))', span):
            words = set(" ".join(expression).split()) - {"not", "and", "or"}
            assert words <= declared, span
        for option in re.findall(r"--[\w-]+", span):
            request.config.getoption(option)  # ValueError when pytest has no such option


# ----- code blocks ----------------------------------------------------------------------------


def test_the_python_block_runs_as_shown_in_a_throwaway_namespace(ns: str) -> None:
    # The README's example as it is, statement by statement, in a namespace that has the br0 it
    # names; ip reads the kernel's state after each statement.
    [block] = blocks("python")
    kernel.run("ip", "-n", ns, "link", "add", "br0", "type", "bridge")
    runner = textwrap.dedent("""
        import ast, json, subprocess, sys
        tree, scope = ast.parse(sys.stdin.read()), {}
        for stmt in tree.body:
            value = None
            if isinstance(stmt, ast.Expr):
                value = eval(compile(ast.Expression(stmt.value), "README", "eval"), scope)
            else:
                exec(compile(ast.Module([stmt], []), "README", "exec"), scope)
            links = subprocess.run(["ip", "-j", "-d", "link", "show"], capture_output=True,
                                   text=True, check=True).stdout
            step = {"line": stmt.lineno, "value": repr(value), "links": json.loads(links)}
            print(json.dumps(step))
    """)
    done = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", runner],
        input=block,
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    steps = [json.loads(line) for line in done.stdout.splitlines()]
    lines = block.splitlines()
    after = {lines[s["line"] - 1].split("(")[0].strip(): s for s in steps}
    made = {link["ifname"]: link for link in after["taps.ensure"]["links"]}["vm0-net0"]
    tun = made["linkinfo"]["info_data"]
    assert (made["mtu"], made["master"]) == (9000, "br0")
    assert (tun["type"], tun["multi_queue"], tun["vnet_hdr"], tun["pi"]) == (
        "tap",
        True,
        True,
        False,
    )
    assert tun["user"] == "libvirt-qemu"
    assert after["taps.show"]["value"].startswith("[TapState(")
    assert "vm0-net0" in after["taps.show"]["value"]
    assert "vm0-net0" not in {link["ifname"] for link in after["taps.delete"]["links"]}


def test_the_spec_block_loads_through_the_spec_loader(tmp_path: Path) -> None:
    from vhostorch.vm import spec

    [block] = blocks("toml")
    path = tmp_path / "vm1.toml"
    path.write_text(block)
    loaded = spec.load(str(path))
    given = tomllib.loads(block)
    assert (loaded.name, loaded.accel, loaded.kernel) == (
        given["name"],
        "kvm",
        given["boot"]["kernel"],
    )
    assert loaded.spare_ports == given["spare_ports"] and loaded.pcie
    assert loaded.worker_cpus == given["worker_cpus"]
    [nic] = loaded.nics
    [shown] = given["nic"]
    tap = nic.tap
    assert (tap.name, tap.queues, nic.vhost, tap.bridge, tap.mtu) == (
        shown["tap"], shown["queues"], shown["vhost"], shown["bridge"], shown["mtu"]
    )  # fmt: skip
    # The keys its comments name exist too.
    comments = " ".join(re.findall(r"#(.*)", block))
    for key in ("memory", "cpus", "machine", "initrd", "cmdline", "disk", "mac", "owner",
                "group", "rx_queue_size", "tx_queue_size"):  # fmt: skip
        assert re.search(rf"\b{key}\b", comments) or key in given, key
        assert key in spec._VM_KEYS | spec._BOOT_KEYS | spec._NIC_KEYS, key
    for choice in ("kvm", "tcg"):
        assert spec.VmSpec("v", loaded.nics, accel=choice, kernel="/k").accel == choice
    for mode in ("required", "preferred", "off"):
        assert spec.nic_from_mapping("v", 0, {"vhost": mode}).vhost == mode
    assert spec.default_tap("vm1", 0) == "vm1-n0"  # "default NAME-nI"


def test_the_spec_classes_and_modules_named_exist() -> None:
    for span in spans():
        name = span.split("/")[0]
        if not re.fullmatch(r"vhostorch(\.\w+)+", name) or name.startswith("vhostorch.vhost"):
            continue
        module, _, attribute = name.rpartition(".")
        try:
            importlib.import_module(name)
        except ModuleNotFoundError:
            assert hasattr(importlib.import_module(module), attribute), span
    from vhostorch.vm import spec

    assert spec.NicSpec and errors.InvalidSpec  # `NicSpec`, `InvalidSpec` beside them


def test_the_hook_block_is_read_by_the_metadata_parser() -> None:
    from vhostorch.hook import metadata

    [block] = blocks("xml")
    declared = metadata.parse(f"<domain type='kvm'><name>vm1</name>{block}</domain>")
    assert (declared.domain, declared.verify) == ("vm1", "warn")
    [tap] = declared.taps
    spec = tap.spec
    assert (spec.name, spec.bridge, spec.mtu, spec.owner, tap.verify) == (
        "vm1-net0", "br0", 9000, "libvirt-qemu", "enforce"
    )  # fmt: skip
    assert spec.queues == 4  # from <driver queues='4'>
    assert metadata.NAMESPACE in block


def test_the_metric_samples_are_what_check_renders() -> None:
    [block] = [b for b in blocks("") if "vhostorch_check_status" in b]
    sample = re.compile(r"(\w+)\{(.*)\} (\S+)")
    for line in block.splitlines():
        name, labels_text, value = sample.fullmatch(line).groups()  # type: ignore[union-attr]
        labels = dict(re.findall(r'(\w+)="([^"]*)"', labels_text))
        target = QemuTarget(int(labels["pid"]), labels["vm"])
        nic = JudgedNic(labels["nic"], "n0", None, 1, True, None, ())
        checks: tuple[Check, ...] = ()
        if name == "vhostorch_check_status":
            status: Any = labels["status"]  # one of STATUSES, as the README shows it
            checks = (Check(labels["check"], status, "", nic=labels["nic"] or None),)
        elif name == "vhostorch_nic_vhost_reason":
            code: Any = labels["reason"]  # a reason code, as the README shows it
            nic = nic.replace(reason=Reason(code, "", {}))
        else:  # a worker's CPU time, or where it runs
            worker = Worker(int(labels["queue_pair"]), 3, int(labels["tid"]), float(value), "")
            if name == "vhostorch_vhost_worker_info":
                place = {k: labels[k] for k in ("model", "cgroup", "cpus")}
                worker = worker.replace(cpu_seconds=None, **place)
            nic = nic.replace(workers=(worker,))
        report = Report(target=target, nics=(nic,), checks=checks)
        assert line in metrics.render([report], 0.1, "prometheus").splitlines()
    alert = next(s for s in spans() if s.startswith("vhostorch_check_status{"))
    assert alert == 'vhostorch_check_status{status="fail"} == 1'


# ----- tables, codes, paths -------------------------------------------------------------------


def table_column(header: str) -> list[str]:
    """The first column of the README table whose header row starts with ``header``."""
    rows = re.findall(rf"^\| {header} \|.*\n\|[- |]+\n((?:\|.*\n)+)", README, re.M)
    assert len(rows) == 1, header
    return [re.match(r"\| `([^`]+)`", row).group(1) for row in rows[0].splitlines()]  # type: ignore[union-attr]


def known_check_ids() -> set[str]:
    return {v for k, v in vars(ids).items() if k.isupper() and isinstance(v, str)}


def test_the_check_table_rows_are_check_ids() -> None:
    shown = table_column("check")
    assert len(shown) >= 12 and set(shown) <= known_check_ids(), set(shown) - known_check_ids()


def test_every_check_id_in_the_text_exists() -> None:
    shown = {s for s in spans() if re.fullmatch(r"(host|vm|nic)\.[a-z.-]+", s)}
    assert shown and shown <= known_check_ids(), shown - known_check_ids()


def test_the_reason_code_table_is_the_codes_check_gives() -> None:
    assert table_column("code") == list(reasons.CODES)


def test_the_json_shapes_shown_are_the_ones_printed() -> None:
    report = Report(QemuTarget(1, None), (), (Check("vm.kvm", "pass", "m"),))
    shape = report.to_json()
    assert set(shape) == {"ok", "target", "nics", "checks"}
    assert {"id", "nic", "queue", "status", "message", "evidence"} <= set(shape["checks"][0])  # type: ignore[index]
    reason = reasons.Reason(reasons.UNEXPLAINED, "m", {})
    assert set(reason.asdict()) == {"code", "message", "evidence"}


def test_exit_codes_stated_are_the_errors_exit_codes() -> None:
    # "0 done ..., 1 the operation failed ..., 2 bad usage or invalid input"; "InvalidSpec is
    # exit 2, others 1"; lab: "124 timeout, ... 125 it could not be built or booted".
    assert (errors.EXIT_OK, errors.EXIT_FAILED, errors.EXIT_USAGE) == (0, 1, 2)
    assert errors.InvalidSpec("x").exit_code == 2 and errors.OperationFailed("x").exit_code == 1
    assert errors.CannotInspect("x").exit_code == 2  # check: "2 the target could not be inspected"
    assert errors.LabTimeout("x").exit_code == 124 and errors.LabError("x").exit_code == 125
    assert "Exit codes: **0** done or nothing to do, **1** the operation failed" in README
    assert "2 bad usage or spec" in README and "124 timeout" in README


def test_the_error_line_shown_is_what_tap_create_prints(ns: str) -> None:
    [shown] = [s for s in spans() if s.startswith("vhostorch: error: ")]
    done = kernel.vhostorch("tap", "create", "vm2", "--bridge", "br1", "--netns", ns)
    assert done.returncode == errors.EXIT_FAILED
    assert done.stderr.startswith(shown.removesuffix("...)")), done.stderr
    failed = kernel.vhostorch("tap", "create", "vm2", "--bridge", "br1", "--netns", ns, "--json")
    assert set(json.loads(failed.stdout)) == {"ok", "error", "exit_code"}
    made = kernel.vhostorch("tap", "create", "vm2", "--netns", ns, "--json")
    assert set(json.loads(made.stdout)) == {"ok", "taps"}
    deleted = kernel.vhostorch("tap", "delete", "vm2", "--netns", ns, "--json")
    assert deleted.returncode == 0 and "batched" in json.loads(deleted.stdout)["taps"][0]


def test_paths_shown_are_where_vhostorch_puts_things(tmp_path: Path) -> None:
    from vhostorch.hook import install
    from vhostorch.hook.state import RUN_DIR
    from vhostorch.host import bootunit
    from vhostorch.vm.state import STATE_DIR

    shown = set(spans())
    assert f"{STATE_DIR}/NAME.json" in shown
    assert f"{RUN_DIR}/DOMAIN.json" in shown
    assert f"{install.HOOKS_DIR}/qemu.d/NAME" in shown
    assert f"default `{install.DEFAULT_NAME}`" in README
    # `hook install [--hooks-dir DIR]` writes DIR/qemu.d/NAME, as it does under /etc/libvirt/hooks.
    done = kernel.vhostorch("hook", "install", "--hooks-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "qemu.d" / install.DEFAULT_NAME).is_file()
    assert kernel.vhostorch("hook", "uninstall", "--hooks-dir", str(tmp_path)).returncode == 0
    assert not (tmp_path / "qemu.d" / install.DEFAULT_NAME).exists()
    assert cli.check.UNIT == "vhostorch-trace.service" and cli.check.UNIT in shown
    assert bootunit  # the boot unit's module, which `trace install-unit` writes


def test_the_operate_block_installs_the_timer_and_rules_and_runs_promtool(tmp_path: Path) -> None:
    """The Operate section's commands, as shown, into ``tmp_path`` as the root: /etc/ is
    under it, and systemctl acts on it with --root. No systemd runs here: daemon-reload has
    nothing to tell and --now nothing to start (the kernel test runs the timer's command)."""
    [block] = [b for b in blocks("sh") if "vhostorch-metrics.timer" in b]
    units = tmp_path / "etc" / "systemd" / "system"
    units.mkdir(parents=True)  # as on any host with systemd
    shim = f"""set -euo pipefail
systemctl() {{
  case $1 in
    daemon-reload) ;;
    enable) shift; [[ $1 == --now ]] && shift; command systemctl --root={tmp_path} enable "$@" ;;
    *) echo "not shimmed: systemctl $*" >&2; exit 99 ;;
  esac
}}
"""
    done = subprocess.run(
        ["bash", "-c", shim + block.replace(" /etc/", f" {tmp_path}/etc/")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("SUCCESS") == 2, done.stdout  # promtool check, promtool test
    for name in ("vhostorch-metrics.service", "vhostorch-metrics.timer"):
        assert (units / name).read_bytes() == (ROOT / "deploy" / "systemd" / name).read_bytes()
    # Enabled: linked from the timer's WantedBy=, as the root's systemd will read it.
    link = units / "timers.target.wants" / "vhostorch-metrics.timer"
    assert os.readlink(link) == "/etc/systemd/system/vhostorch-metrics.timer"
    rules = tmp_path / "etc" / "prometheus" / "rules" / "vhostorch.rules.yml"
    assert (
        rules.read_bytes() == (ROOT / "deploy" / "prometheus" / "vhostorch.rules.yml").read_bytes()
    )
    # The configuration shown names the file installed.
    import yaml

    [config] = [yaml.safe_load(b) for b in blocks("yaml") if "rule_files" in b]
    assert config["rule_files"] == ["/etc/prometheus/rules/vhostorch.rules.yml"]


def test_files_and_links_shown_exist() -> None:
    for span in spans():
        if re.fullmatch(r"[a-z.][\w.-]*/[\w./-]*", span):
            assert (ROOT / span).exists(), span
    with open(ROOT / ".ci" / "run") as f:
        assert "bash scripts/test.sh" in f.read()  # "CI (`.ci/run`) runs it"
    for line in blocks("sh")[0].splitlines():  # the two commands
        assert (ROOT / line.split()[1]).is_file(), line
    for base, text in ((ROOT, README), (ROOT / "ansible", COLLECTION_README)):
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith("http"):
                continue
            file, _, anchor = target.partition("#")
            path = base / file if file else base / "README.md"
            assert path.exists(), target
            if anchor:
                assert anchor in slugs(path.read_text()), f"{target}: no such heading"


def slugs(markdown: str) -> set[str]:
    """GitHub's anchors for the headings of ``markdown``."""
    found = set()
    for heading in re.findall(r"^#+ (.*)$", FENCE.sub("", markdown), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        found.add(slug)
    return found


def test_ansible_content_named_exists() -> None:
    from vhostorch.vm import spec  # noqa: F401  (the modules drive the library)

    for span in spans() + spans(COLLECTION_README):
        name = span.split()[-1]
        if not name.startswith("vhostorch.vhost."):
            continue
        leaf = name.removeprefix("vhostorch.vhost.")
        found = (ROOT / "ansible" / "plugins" / "modules" / f"{leaf}.py").is_file() or (
            ROOT / "ansible" / "roles" / leaf
        ).is_dir()
        assert found, span


def test_the_collection_readme_play_uses_arguments_the_modules_document() -> None:
    import yaml

    # The first play (the inventory check and the sanity recipe run in
    # tests/testhost/test_ansible.py).
    play = yaml.safe_load(blocks("yaml", COLLECTION_README)[0])
    [entry] = play
    assert [r["role"] for r in entry["roles"]] == ["vhostorch.vhost.vhost_host"]
    assert (ROOT / "ansible" / "roles" / "vhost_host" / "tasks" / "main.yml").is_file()
    for task in entry["tasks"]:
        [name] = [k for k in task if k.startswith("vhostorch.vhost.")]
        documented = module_options(name.removeprefix("vhostorch.vhost."))
        for key, value in task[name].items():
            assert key in documented, f"{name}: no option {key}"
            for item in value if isinstance(value, list) else ():
                sub = documented[key].get("suboptions", {})
                assert set(item) <= set(sub), f"{name}: {key}: {set(item) - set(sub)}"


def module_options(module: str) -> dict[str, Any]:
    import yaml

    source = (ROOT / "ansible" / "plugins" / "modules" / f"{module}.py").read_text()
    found = re.search(r'DOCUMENTATION = r"""(.*?)"""', source, re.S)
    assert found, module
    options: dict[str, Any] = yaml.safe_load(found.group(1))["options"]
    return options


def test_each_usage_parses_as_written() -> None:
    # The real parser, not only the help text, takes every option a usage shows (with
    # placeholder values) and the positional words its command needs.
    for usage in usages():
        paths, _, options, _ = parse_usage(usage)
        for path in paths:
            found = command(path)
            if found is None:
                continue
            kinds = {o.name: o.kind for o in found.options}
            bounds = {o.name: max(o.low, 1) for o in found.options if o.high}
            argv: list[str] = [*found.path]
            for option in dict.fromkeys(options):
                value = str(bounds[option]) if option in bounds else "1"
                argv += [option] if kinds[option] in (FLAG, NEGATE) else [option, value]
            argv += {"0": [], "?": [], "2": ["x", "y"]}.get(found.arity, ["x"])
            parsed = parse(cli.COMMANDS, argv, "")
            assert parsed.command is found, usage


# Every fenced block of the README, by its language and a text it holds, and the test that
# runs or reads it (an sh block's `vhostorch` lines are also each parsed by the usage tests
# above). A block added without a test fails here, so the documented job cannot drift.
BLOCK_TESTS = {
    ("sh", "bash scripts/demo.sh"): "tests/testhost/test_demo.py::"
    "test_demo_runs_as_a_new_user_runs_it_and_leaves_nothing_behind",  # test.sh: CI itself
    (
        "sh",
        "vhostorch tap create NAME",
    ): "tests/kernel/test_readme.py::test_each_usage_parses_as_written",
    ("python", "from vhostorch import taps"): "tests/kernel/test_readme.py::"
    "test_the_python_block_runs_as_shown_in_a_throwaway_namespace",
    (
        "sh",
        "vhostorch doctor [--strict]",
    ): "tests/kernel/test_readme.py::test_each_usage_parses_as_written",
    ("sh", "vhostorch pin VM"): "tests/kernel/test_readme.py::test_each_usage_parses_as_written",
    ("", "vhostorch_check_status{"): "tests/kernel/test_readme.py::"
    "test_the_metric_samples_are_what_check_renders",
    ("sh", "install -m 0644"): "tests/kernel/test_readme.py::"
    "test_the_operate_block_installs_the_timer_and_rules_and_runs_promtool",
    ("yaml", "rule_files:"): "tests/kernel/test_readme.py::"
    "test_the_operate_block_installs_the_timer_and_rules_and_runs_promtool",
    ("json", '"alertname": "VhostorchNicNotOnVhost"'): "tests/kernel/test_prometheus.py::"
    "test_prometheus_scrapes_the_timers_file_and_alerts_on_a_nic_not_on_vhost",
    (
        "sh",
        "vhostorch up SPEC.toml",
    ): "tests/kernel/test_readme.py::test_each_usage_parses_as_written",
    ("toml", 'name = "vm1"'): "tests/kernel/test_readme.py::"
    "test_the_spec_block_loads_through_the_spec_loader",
    ("xml", "<metadata>"): "tests/kernel/test_readme.py::"
    "test_the_hook_block_is_read_by_the_metadata_parser",
    ("sh", "vhostorch lab build"): "tests/kernel/test_readme.py::test_each_usage_parses_as_written",
}


def test_every_fenced_block_is_one_a_test_runs() -> None:
    found = FENCE.findall(README)
    for lang, body in found:
        claims = [
            t for (language, holds), t in BLOCK_TESTS.items() if language == lang and holds in body
        ]
        assert len(claims) == 1, f"a ```{lang} block no test is named for: {body[:200]}"
    for (language, holds), test in BLOCK_TESTS.items():
        matching = [b for lang, b in found if lang == language and holds in b]
        assert len(matching) == 1, f"BLOCK_TESTS names a block the README no longer has: {holds}"
        path, _, name = test.partition("::")
        assert f"\ndef {name}(" in (ROOT / path).read_text(), test
    # An sh line that is not a vhostorch usage is run by its block's test (the demo, the
    # operate block): none other may appear unnoticed.
    other = {
        line.split("#")[0].strip()
        for body in blocks("sh")
        for line in body.splitlines()
        if line.strip() and not line.startswith((" ", "vhostorch ")) and not line.startswith("#")
    }
    assert other == {
        "bash scripts/demo.sh",
        "bash scripts/test.sh",
        "install -m 0644 -t /etc/systemd/system deploy/systemd/vhostorch-metrics.service "
        "deploy/systemd/vhostorch-metrics.timer",
        "systemctl daemon-reload",
        "systemctl enable --now vhostorch-metrics.timer",
        "install -m 0644 -D -t /etc/prometheus/rules deploy/prometheus/vhostorch.rules.yml",
        "promtool check rules /etc/prometheus/rules/vhostorch.rules.yml",
        "promtool test rules deploy/prometheus/vhostorch.rules.test.yml",
    }, other
