"""The package's shape: one-way dependencies, and a start-up path free of slow imports."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pathlib
import re
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "vhostorch"
# The areas in dependency order: a module may import the areas listed before its own, and the
# modules of its own area listed before it (and the stdlib). A package's __init__ is its
# facade, last in its own list.
ORDER: list[tuple[str, tuple[str, ...]]] = [
    ("errors", ()), ("record", ()), ("signals", ()), ("lockfile", ()), ("files", ()),
    ("rundir", ()), ("claims", ()), ("pins", ()), ("inputs", ()), ("rootcode", ()),
    ("kernel", ("rtnl", "tun", "netns", "procfs", "cpus", "btf", "bpf", "vhoststate", "__init__")),
    ("taps", ("spec", "plan", "apply", "teardown", "__init__")),
    ("vm", ("spec", "state", "__init__")),
    ("qemu", ("args", "monitor", "__init__")),
    ("libvirt", ("domxml", "qemuconf", "connection", "__init__")),
    ("check", ("ids", "report", "wiring", "observe", "applicable", "nics", "machine", "request",
               "fds", "running", "live", "vrings", "reasons", "placement", "verify", "metrics",
               "targets", "rewire", "__init__")),
    ("host", ("bootunit", "doctor", "__init__")),
    ("backends", ("contract", "process", "qmp", "libvirt", "__init__")),
    ("orchestrate", ("decision", "settle", "pinning", "__init__")),
    ("hook", ("metadata", "state", "program", "__init__", "install")),
    ("lab", ("image", "userland", "watch", "run", "__init__")),
    ("cli", ("argv", "output", "taps", "check", "vm", "pin", "hook", "lab", "__init__")),
    ("__main__", ()),
]  # fmt: skip
AREAS = [area for area, _ in ORDER]
# Third-party packages, and the one module allowed to import each (inside its functions).
THIRD_PARTY = {
    "pyroute2": "",
    "libvirt": "libvirt.connection",
    "libvirt_qemu": "libvirt.connection",
    "qemu": "qemu.monitor",
    "prometheus_client": "check.metrics",
}


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        found[".".join(("vhostorch", *rel.parts))] = path
    return found


def _imports(path: pathlib.Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = {f"{node.module}.{alias.name}" for alias in node.names}
            submodules = names & set(_modules())
            # `from vhostorch.area import module` depends on that module, not the facade.
            found |= submodules or {node.module}
            if node.module.startswith("vhostorch"):
                found |= names
    return found


def _position(dotted: str) -> tuple[int, int] | None:
    """(area, module) rank of a vhostorch module name; None for a name inside a module."""
    parts = dotted.split(".")[1:]
    if not parts or parts[0] not in AREAS:
        return None
    area = AREAS.index(parts[0])
    modules = ORDER[area][1]
    if not modules:
        return (area, 0) if len(parts) == 1 else None
    if len(parts) == 1:
        return area, modules.index("__init__")
    return (area, modules.index(parts[1])) if parts[1] in modules else None


def test_every_module_has_a_place() -> None:
    placed = set()
    for area, modules in ORDER:
        placed |= {f"vhostorch.{area}.{m}" for m in modules} or {f"vhostorch.{area}"}
    assert set(_modules()) - {"vhostorch.__init__"} <= placed, "place new modules in ORDER"


def test_dependencies_point_one_way() -> None:
    for name, path in _modules().items():
        if name == "vhostorch.__init__":
            continue
        here = _position(name)
        assert here is not None, name
        for imported in _imports(path):
            top, _, rest = imported.partition(".")
            if top == "vhostorch" and rest:
                there = _position(imported)
                if there is None:
                    continue  # a name imported from a module, checked as that module
                same_area = there[0] == here[0]
                assert there[0] < here[0] or (same_area and there[1] < here[1]), (
                    f"{name} imports {imported}"
                )
            owner = THIRD_PARTY.get(top)
            if owner is not None:
                assert name == f"vhostorch.{owner}", f"{name} imports {imported}"


def test_every_name_in_all_exists() -> None:
    """`from module import *` works: ``__all__`` lists no name that exists only for type
    checkers (under TYPE_CHECKING)."""
    for name in sorted(_modules()):
        dotted = name.removesuffix(".__init__")
        if dotted == "vhostorch.__main__":
            continue  # importing it runs the CLI
        module = importlib.import_module(dotted)
        missing = [n for n in getattr(module, "__all__", ()) if not hasattr(module, n)]
        assert not missing, f"{dotted}.__all__ lists {missing}, which it does not define"


def test_star_import_of_taps() -> None:
    names: dict[str, object] = {}
    exec("from vhostorch.taps import *", names)
    assert {"ensure", "create", "delete", "show", "apply", "plan_ensure", "TapResult"} <= set(names)


def test_provisioning_path_imports_nothing_slow() -> None:
    """What the hook and `tap create` load: no dataclasses/typing/socket/inspect/pyroute2."""
    code = (
        "import sys, vhostorch.cli, vhostorch.taps;"
        "print(' '.join(sorted(m for m in ('dataclasses', 'typing', 'socket', 'inspect',"
        " 'pyroute2', 'contextlib', 'json', 'argparse', 're', 'prometheus_client')"
        " if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_hook_path_imports_nothing_slow() -> None:
    """What the installed hook loads for prepare and release (libvirt waits for it on every
    start): no xml.etree, json, re, socket or typing; nothing of libvirt or QEMU's QMP."""
    slow = ("dataclasses", "typing", "socket", "inspect", "pyroute2", "contextlib", "json",
            "argparse", "re", "xml.etree", "asyncio", "libvirt", "qemu",
            "vhostorch.libvirt.connection", "vhostorch.qemu.monitor", "vhostorch.check.verify",
            "vhostorch.check.observe", "prometheus_client",
            "vhostorch.check.metrics")  # fmt: skip
    xml = (
        "<domain><name>d</name><metadata><v:vm xmlns:v='http://vhostorch.org/xmlns/libvirt/1'>"
        "<v:tap dev='t'/></v:vm></metadata><devices><interface type='ethernet'>"
        "<target dev='t' managed='no'/></interface></devices></domain>"
    )
    code = (
        "import sys; from vhostorch.hook import program;"
        "program.metadata.parse(sys.stdin.read());"
        f"print(' '.join(sorted(m for m in {slow!r} if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-IS", "-c", f"import sys; sys.path.insert(0, "
                          f"{str(PACKAGE.parent)!r}); {code}"], input=xml, capture_output=True,
                         text=True, check=True)  # fmt: skip
    assert out.stdout.strip() == "", out.stdout


# Aliases that do not lie, with the reason: the alias is the module type checkers should see.
ALIASES_KEPT = {
    # signals.py imports the C module `_signal` at run time (signal's enum costs the hook's
    # budget) and shows type checkers signal's stubs under the name it runs with.
    ("signals.py", "signal", "_signal"),
    # The standard library's own documentation spells ElementTree this way.
    ("libvirt/domxml.py", "xml.etree.ElementTree", "ET"),
    ("tests/unit/orchestrate/test_orchestrate.py", "xml.etree.ElementTree", "ET"),
}
# Hypothesis's documentation imports its strategies so, everywhere.
ALIASES_EVERYWHERE = {("hypothesis.strategies", "st")}


def _module_aliases(path: pathlib.Path) -> list[tuple[str, str]]:
    """(module, alias) for every import in ``path`` that binds a module to another name."""
    found = []
    modules = set(_modules())
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, a.asname) for a in node.names if a.asname]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                dotted = f"{node.module}.{a.name}"
                is_module = dotted in modules or (
                    not node.module.startswith("vhostorch") and _is_submodule(dotted)
                )
                if a.asname and is_module:
                    found.append((dotted, a.asname))
    return [(m, alias) for m, alias in found if alias != m.rpartition(".")[2]]


def _is_submodule(dotted: str) -> bool:
    try:
        return importlib.util.find_spec(dotted) is not None
    except ModuleNotFoundError:
        return False


def test_no_module_is_imported_under_another_name() -> None:
    """`from vhostorch.check import observe as inspect` made a reader look for the stdlib's
    inspect (issue 20): a module is called by its own name; a clashing local is renamed.
    In the package, its tests and the Ansible collection's plugins (a test brought that very
    alias back when only the package was read)."""
    found = []
    for base in (PACKAGE, PACKAGE.parent / "tests", PACKAGE.parent / "ansible"):
        for path in sorted(base.rglob("*.py")):
            rel = str(path.relative_to(PACKAGE if base == PACKAGE else PACKAGE.parent))
            found += [
                f"{rel}: {module} as {alias}"
                for module, alias in _module_aliases(path)
                if (rel, module, alias) not in ALIASES_KEPT
                and (module, alias) not in ALIASES_EVERYWHERE
            ]
    assert not found, "\n".join(found)


def test_no_test_module_imports_another() -> None:
    """Shared helpers and tables live in tests/support; a test module imported by another
    runs its tests' collection twice and hides what the other depends on."""
    tests = PACKAGE.parent / "tests"
    found = []
    for path in sorted(tests.rglob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            found += [
                f"{path.relative_to(tests)}: {n}"
                for n in names
                if n.startswith("tests.") and n.rpartition(".")[2].startswith("test_")
            ]
    assert not found, "\n".join(found)


def test_aliases_test_sees_an_alias(tmp_path: pathlib.Path) -> None:
    source = tmp_path / "m.py"
    source.write_text(
        "from vhostorch.check import observe as inspect\nimport errno as errno_mod\n"
        "from vhostorch.files import stem as file_stem\nfrom vhostorch.qemu import args\n"
        "from hypothesis import strategies as st\n"
    )
    assert _module_aliases(source) == [
        ("vhostorch.check.observe", "inspect"),
        ("errno", "errno_mod"),
        ("hypothesis.strategies", "st"),
    ]


def _design_map() -> list[tuple[str, tuple[str, ...]]]:
    """The package map in docs/design.md's first code block, as (area, modules) in order:
    ``a → b → area/ (m1, m2, __init__: what it holds)  note``; a note after a closing
    parenthesis, and anything after ``:`` or ``;`` inside one, is prose."""
    text = (PACKAGE.parent / "docs" / "design.md").read_text()
    block = text.split("```\n", 2)[1]
    found = []
    for part in block.split("→"):
        m = re.match(r"\s*([\w]+)(/\s*\(([^)]*)\))?", part)
        assert m, f"docs/design.md's map: cannot read {part!r}"
        inside = re.split(r"[:;]", m[3])[0] if m[3] else ""
        found.append((m[1], tuple(n.strip() for n in inside.split(",") if n.strip())))
    return found


def test_design_map_is_order() -> None:
    """docs/design.md's map was copied by hand from ORDER and went stale (issue 20)."""
    assert _design_map() == ORDER
