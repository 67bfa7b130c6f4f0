"""The package's shape: one-way dependencies, and a start-up path free of slow imports."""

from __future__ import annotations

import ast
import importlib
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "vhostorch"
# The areas in dependency order: a module may import the areas listed before its own, and the
# modules of its own area listed before it (and the stdlib). A package's __init__ is its
# facade, last in its own list.
ORDER: list[tuple[str, tuple[str, ...]]] = [
    ("errors", ()), ("record", ()), ("signals", ()), ("lockfile", ()), ("files", ()),
    ("rundir", ()), ("claims", ()), ("inputs", ()), ("rootcode", ()),
    ("kernel", ("rtnl", "tun", "netns", "procfs", "btf", "bpf", "vhoststate", "__init__")),
    ("taps", ("spec", "plan", "apply", "teardown", "__init__")),
    ("vm", ("spec", "state", "__init__")),
    ("qemu", ("args", "monitor", "__init__")),
    ("libvirt", ("domxml", "qemuconf", "connection", "__init__")),
    ("check", ("ids", "report", "wiring", "observe", "applicable", "nics", "machine", "request",
               "fds", "running", "live", "vrings", "reasons", "verify", "metrics", "targets",
               "rewire", "bootunit", "doctor", "__init__")),
    ("backends", ("contract", "process", "qmp", "libvirt", "__init__")),
    ("orchestrate", ("decision", "settle", "__init__")),
    ("hook", ("metadata", "state", "program", "__init__", "install")),
    ("lab", ("image", "watch", "run", "__init__")),
    ("cli", ("argv", "output", "taps", "check", "vm", "hook", "lab", "__init__")),
    ("__main__", ()),
]  # fmt: skip
AREAS = [area for area, _ in ORDER]
# Third-party packages, and the one module allowed to import each (inside its functions).
THIRD_PARTY = {
    "pyroute2": "",
    "libvirt": "libvirt.connection",
    "libvirt_qemu": "libvirt.connection",
    "qemu": "qemu.monitor",
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
        " 'pyroute2', 'contextlib', 'json', 'argparse', 're') if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_hook_path_imports_nothing_slow() -> None:
    """What the installed hook loads for prepare and release (libvirt waits for it on every
    start): no xml.etree, json, re, socket or typing; nothing of libvirt or QEMU's QMP."""
    slow = ("dataclasses", "typing", "socket", "inspect", "pyroute2", "contextlib", "json",
            "argparse", "re", "xml.etree", "asyncio", "libvirt", "qemu",
            "vhostorch.libvirt.connection", "vhostorch.qemu.monitor", "vhostorch.check.verify",
            "vhostorch.check.observe")  # fmt: skip
    xml = (
        "<domain><name>d</name><metadata><v:vm xmlns:v='http://vhostorch.org/xmlns/libvirt/1'>"
        "<v:tap dev='t'/></v:vm></metadata><devices><interface type='ethernet'>"
        "<target dev='t' managed='no'/></interface></devices></domain>"
    )
    code = (
        "import sys, vhostorch.hook.program as h;"
        "h.metadata.parse(sys.stdin.read());"
        f"print(' '.join(sorted(m for m in {slow!r} if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-IS", "-c", f"import sys; sys.path.insert(0, "
                          f"{str(PACKAGE.parent)!r}); {code}"], input=xml, capture_output=True,
                         text=True, check=True)  # fmt: skip
    assert out.stdout.strip() == "", out.stdout
