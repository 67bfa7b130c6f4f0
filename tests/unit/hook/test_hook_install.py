"""`vhostorch hook install|uninstall` against hostile things at the hook's path and in its
interpreter's: a FIFO (the read hung), a symlink, an empty directory option, an interpreter
path a "#!" line cannot hold. Each through the installed command, cut off after 20 s."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.kernel import EXE
from vhostorch.errors import InvalidSpec
from vhostorch.hook import install
from vhostorch.host import bootunit


def hook(verb: str, hooks_dir: Path | str, python: str = EXE) -> subprocess.CompletedProcess[str]:
    argv = [EXE] if python == EXE else [python, "-m", "vhostorch"]
    return subprocess.run(
        [*argv, "hook", verb, "--hooks-dir", str(hooks_dir)],
        capture_output=True, text=True, timeout=20, cwd="/",
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["fifo", "symlink", "directory"])
def test_what_is_not_a_regular_file_at_the_hook_path_is_refused_unopened(
    tmp_path: Path, kind: str
) -> None:
    # A FIFO at qemu.d/vhostorch hung install and uninstall for ever (the boot unit already
    # refused one); a symlink was read through (and its target's text trusted).
    path = tmp_path / "qemu.d" / "vhostorch"
    path.parent.mkdir()
    secret = tmp_path / "secret"
    secret.write_text(install.installed_program())  # what a planted link would point at
    {"fifo": lambda: os.mkfifo(path), "symlink": lambda: path.symlink_to(secret),
     "directory": path.mkdir}[kind]()  # fmt: skip
    what = {"fifo": "is a FIFO", "symlink": "is a symlink", "directory": "is a directory"}[kind]
    for verb in ("install", "uninstall"):
        done = hook(verb, tmp_path)
        assert done.returncode == 1, (verb, done.stderr)
        assert done.stderr.count("\n") == 1 and what in done.stderr, done.stderr
        assert "not a hook vhostorch installed; not replacing it" in done.stderr
    mode = os.lstat(path).st_mode
    assert {"fifo": stat.S_ISFIFO, "symlink": stat.S_ISLNK, "directory": stat.S_ISDIR}[kind](mode)
    assert secret.read_text() == install.installed_program()


def test_an_empty_directory_is_refused_never_the_real_one() -> None:
    # `--hooks-dir ""` installed into /etc/libvirt/hooks and `--unit-dir ""` into
    # /etc/systemd/system (the parser refuses both now; the library too, for other callers).
    for verb in (install.install, install.uninstall):
        with pytest.raises(InvalidSpec, match="hooks directory must be a path"):
            verb("vhostorch", "")
    for unit_verb in (bootunit.install, bootunit.uninstall, bootunit.state):
        with pytest.raises(InvalidSpec, match="unit directory must be a path"):
            unit_verb("")  # the same for the boot unit's --unit-dir


def test_an_interpreter_path_a_shebang_cannot_hold_is_refused(tmp_path: Path) -> None:
    """A "#!" line has no quoting (the kernel splits it at the first blank) and is cut at 255
    bytes: the hook would run some other program. Refused, nothing written."""
    assert install.refusal("/opt/my python/bin/python3")
    assert "blank" in (install.refusal("/opt/my python/bin/python3") or "")
    assert "too long" in (install.refusal("/" + "p" * 250) or "")
    venv = tmp_path / "venv with blank"
    (venv / "bin").mkdir(parents=True)
    real = Path(sys.prefix)
    (venv / "bin" / "python3").symlink_to(os.path.realpath(sys.executable))
    (venv / "pyvenv.cfg").write_text((real / "pyvenv.cfg").read_text())
    (venv / "lib").symlink_to(real / "lib")
    hooks = tmp_path / "hooks"
    done = hook("install", hooks, python=str(venv / "bin" / "python3"))
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "has a blank, which a #! line cannot hold" in done.stderr
    assert not hooks.exists()
