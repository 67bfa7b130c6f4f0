"""The error tree: every exception class in vhostorch.errors, drawn in its docstring, with the
exit code each adapter maps it to; causes and QMP's error class kept."""

from __future__ import annotations

import ast
import builtins
import importlib
import io
import json
import os
import pathlib
import pkgutil
import re
import socket
import threading

import pytest

import vhostorch
from vhostorch import errors
from vhostorch.errors import VhostorchError

PACKAGE = pathlib.Path(vhostorch.__file__).parent
EXCEPTION_NAMES = {
    n for n, v in vars(builtins).items() if isinstance(v, type) and issubclass(v, BaseException)
}


def _exception_classes() -> dict[str, type[BaseException]]:
    """Every exception class a vhostorch module defines or re-exports, by qualified name."""
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages([str(PACKAGE)], "vhostorch."):
        if info.name == "vhostorch.__main__":
            continue  # importing it runs the CLI
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, BaseException)
                and value.__module__.startswith("vhostorch")
            ):
                found[f"{value.__module__}.{value.__qualname__}"] = value
    return found


def _tree() -> dict[str, tuple[str | None, int | None]]:
    """The docstring's tree: class name -> (parent name, exit code shown on its line)."""
    assert errors.__doc__
    parents: list[tuple[int, str]] = []
    tree: dict[str, tuple[str | None, int | None]] = {}
    for line in errors.__doc__.splitlines():
        m = re.match(r"^    ((?:[ |]*\+-- )?)(\w+)\s", line)
        if not m:
            continue
        depth, name = len(m.group(1)), m.group(2)
        while parents and parents[-1][0] >= depth:
            parents.pop()
        shown = re.search(r"\(exit (\d+)\)$", line)
        tree[name] = (parents[-1][1] if parents else None, int(shown[1]) if shown else None)
        parents.append((depth, name))
    return tree


def test_every_exception_class_lives_in_errors_under_the_root() -> None:
    classes = _exception_classes()
    assert len(classes) >= 17
    for name, cls in classes.items():
        assert cls.__module__ == "vhostorch.errors", f"{name} belongs in vhostorch/errors.py"
        # Interrupted alone stands outside the root, as a KeyboardInterrupt: a signal must
        # not be taken by the `except Exception` of a clean-up.
        assert issubclass(cls, VhostorchError) or cls is errors.Interrupted, name


def test_no_module_but_errors_defines_an_exception_class() -> None:
    """Also classes defined inside functions, which importing would not find."""
    ours = {n for n, v in vars(errors).items() if isinstance(v, type)}
    for path in PACKAGE.rglob("*.py"):
        if path.name == "errors.py" and path.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {ast.unparse(b).rsplit(".", 1)[-1] for b in node.bases}
                assert not bases & (EXCEPTION_NAMES | ours), f"{path}: class {node.name}"


def test_the_docstring_draws_the_whole_tree_with_the_exit_codes() -> None:
    tree = _tree()
    defined = {n for n, v in vars(errors).items()
               if isinstance(v, type) and issubclass(v, BaseException)}  # fmt: skip
    assert set(tree) == defined | {"KeyboardInterrupt"}  # Python's, drawn as Interrupted's root
    for name, (parent, shown) in tree.items():
        if name == "KeyboardInterrupt":
            continue
        cls = getattr(errors, name)
        assert (cls.__bases__[0].__name__ if parent else None) == parent, name
        expected = shown if shown is not None else getattr(errors, parent or name).exit_code
        assert cls.exit_code == expected, name


def test_exit_codes_are_the_named_constants() -> None:
    named = {v for n, v in vars(errors).items() if n.startswith("EXIT_")}
    assert {errors.EXIT_OK, errors.EXIT_FAILED, errors.EXIT_USAGE} <= named
    for name in set(_tree()) - {"KeyboardInterrupt"}:
        assert getattr(errors, name).exit_code in named, name


def test_netlink_error_is_a_kernel_error_and_an_oserror() -> None:
    err = errors.NetlinkError(19, "no such bridge")
    assert isinstance(err, errors.KernelError) and isinstance(err, OSError)
    assert (err.errno, err.strerror, err.extack) == (19, os.strerror(19), "no such bridge")
    assert str(err) == f"{os.strerror(19)} (no such bridge)"
    assert str(errors.NetlinkError(1, None)) == os.strerror(1)


def test_monitor_error_keeps_the_cause_when_qmp_is_unreachable(tmp_path: pathlib.Path) -> None:
    from vhostorch.qemu import monitor

    with pytest.raises(errors.MonitorError, match="cannot reach QMP") as caught:
        monitor.peer_pid(str(tmp_path / "none.sock"))
    assert isinstance(caught.value.__cause__, FileNotFoundError)


def _fake_qmp(path: str) -> threading.Thread:
    """A QMP server that answers qmp_capabilities, then refuses one command."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            greeting = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0},
                                            "package": ""}, "capabilities": []}}  # fmt: skip
            conn.sendall(json.dumps(greeting).encode() + b"\n")
            refusal = {"class": "DeviceNotFound", "desc": "Device 'nic9' not found"}
            pending = ""
            for reply in ({"return": {}}, {"error": refusal}):
                # qemu.qmp reads lines, and writes bare JSON objects with no newline.
                while True:
                    try:
                        request, end = json.JSONDecoder().raw_decode(pending.lstrip())
                        pending = pending.lstrip()[end:]
                        break
                    except json.JSONDecodeError:
                        pending += conn.recv(4096).decode()
                conn.sendall(json.dumps({**reply, "id": request.get("id")}).encode() + b"\n")
            conn.recv(4096)  # until the client hangs up
        server.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_monitor_error_keeps_qmp_error_class_and_what_was_sent(tmp_path: pathlib.Path) -> None:
    from vhostorch.qemu import monitor

    path = str(tmp_path / "qmp.sock")
    thread = _fake_qmp(path)
    sock = monitor.QmpSocket(path, timeout=5.0)
    sock.open()
    try:
        with pytest.raises(errors.MonitorError) as caught:
            sock.execute("device_del", {"id": "nic9"})
    finally:
        sock.close()
    thread.join(5)
    err = caught.value
    assert str(err) == "QMP device_del: Device 'nic9' not found"
    assert err.error_class == "DeviceNotFound"
    assert err.sent == {"execute": "device_del", "arguments": {"id": "nic9"}}
    assert err.__cause__ is not None  # qemu.qmp's ExecuteError, with what came back


@pytest.mark.parametrize(
    ("err", "code", "line"),
    [
        (errors.InvalidSpec("bad"), 2, "vhostorch hook: bad"),
        (errors.CannotInspect("no process 1"), 2, "vhostorch hook: no process 1"),
        (errors.OperationFailed("refused:\n twice"), 1, "vhostorch hook: refused: twice"),
        (errors.LabTimeout("late"), 1, "vhostorch hook: late"),
        (KeyboardInterrupt(), 1, "vhostorch hook: interrupted"),
        (ValueError("x"), 1, "vhostorch hook: internal error: ValueError: x"),
    ],
)
def test_the_hook_maps_errors_to_1_or_2(err: Exception, code: int, line: str) -> None:
    from vhostorch.hook import program

    stderr = io.StringIO()
    assert program._fail(stderr, err) == code
    assert stderr.getvalue() == line + "\n"
