"""The package's shape: one-way dependencies, and a start-up path free of slow imports."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "vhostorch"
# Each module may import only modules listed before it (and the stdlib).
ORDER = [
    *("errors", "record", "lockfile", "model", "vmspec", "vmstate", "argv", "rtnl", "tun"),
    *("netns", "taps", "procfs", "qemuargs", "domxml", "metadata", "checks", "monitor"),
    *("wiring", "qmpvm", "inspect", "verify", "virt"),
    *("doctor", "targets", "orchestrate", "hook", "hookfile"),
    *("labimage", "labwatch", "lab", "cli", "__main__"),
]
# Third-party packages, and the one module allowed to import each (inside its functions).
THIRD_PARTY = {"pyroute2": "", "libvirt": "virt", "libvirt_qemu": "virt", "qemu": "monitor"}


def _imports(path: pathlib.Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            if node.module == "vhostorch":
                found |= {f"vhostorch.{alias.name}" for alias in node.names}
    return found


def test_dependencies_point_one_way() -> None:
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules <= set(ORDER), f"place new modules in ORDER: {modules - set(ORDER)}"
    for name in modules:
        allowed = set(ORDER[: ORDER.index(name)])
        for imported in _imports(PACKAGE / f"{name}.py"):
            top, _, rest = imported.partition(".")
            if top == "vhostorch" and rest:
                assert rest.split(".")[0] in allowed, f"{name} imports {imported}"
            assert THIRD_PARTY.get(top, name) == name, f"{name} imports {imported}"


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
            "argparse", "re", "xml.etree", "asyncio", "libvirt", "qemu", "vhostorch.virt",
            "vhostorch.monitor", "vhostorch.verify", "vhostorch.inspect")  # fmt: skip
    xml = (
        "<domain><name>d</name><metadata><v:vm xmlns:v='http://vhostorch.org/xmlns/libvirt/1'>"
        "<v:tap dev='t'/></v:vm></metadata><devices><interface type='ethernet'>"
        "<target dev='t' managed='no'/></interface></devices></domain>"
    )
    code = (
        "import sys, vhostorch.hook as h;"
        "h.metadata.parse(sys.stdin.read());"
        f"print(' '.join(sorted(m for m in {slow!r} if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-IS", "-c", f"import sys; sys.path.insert(0, "
                          f"{str(PACKAGE.parent)!r}); {code}"], input=xml, capture_output=True,
                         text=True, check=True)  # fmt: skip
    assert out.stdout.strip() == "", out.stdout
