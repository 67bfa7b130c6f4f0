"""Root runs the hook and the boot unit: installing them is refused, and doctor warns, when a
user other than root can change what they run (vhostorch.rootcode).

The package is copied to a directory of the test's, one file or directory of it is then given
to nobody (uid 65534) or made writable by nogroup, and the copy's own `python -m vhostorch`
is asked to install (PYTHONPATH puts the copy first; the installed hook would run it, and the
check reads the package it is in). Before the check, both installs went ahead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vhostorch import rootcode
from vhostorch.host import bootunit

pytestmark = pytest.mark.kernel  # root: chown to nobody, root-owned copies

NOBODY = 65534  # nobody and nogroup on Debian


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """A root-only copy of the vhostorch package; returns the directory holding it."""
    holder = tmp_path / "site"
    shutil.copytree(rootcode.PACKAGE, holder / "vhostorch")
    for top, dirs, names in os.walk(tmp_path):
        for name in [*dirs, *names]:
            os.chmod(os.path.join(top, name), 0o755 if name in dirs else 0o644)
    os.chmod(tmp_path, 0o755)
    return holder


def run(holder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": str(holder), "PATH": os.environ["PATH"]}
    return subprocess.run(
        [sys.executable, "-m", "vhostorch", *args],
        capture_output=True, text=True, env=env, cwd="/", timeout=60,
    )  # fmt: skip


def installs(holder: Path, where: Path) -> tuple[subprocess.CompletedProcess[str], ...]:
    return (
        run(holder, "hook", "install", "--hooks-dir", str(where / "hooks")),
        run(holder, "trace", "install-unit", "--unit-dir", str(where / "units")),
    )


def test_a_root_only_copy_installs(copy: Path, tmp_path: Path) -> None:
    hook, unit = installs(copy, tmp_path)
    assert hook.returncode == 0 and unit.returncode == 0, hook.stderr + unit.stderr
    with open(tmp_path / "hooks" / "qemu.d" / "vhostorch") as f:
        assert repr(str(copy)) in f.read()  # the hook runs the copy


@pytest.mark.parametrize("how", ["file owned by nobody", "directory writable by nogroup",
                                 "file writable by everyone"])  # fmt: skip
def test_install_is_refused_when_others_can_change_the_code_root_runs(
    copy: Path, tmp_path: Path, how: str
) -> None:
    target = copy / "vhostorch" / ("cli" if how.startswith("directory") else "cli/__init__.py")
    if how == "file owned by nobody":
        os.chown(target, NOBODY, NOBODY)
        why = f"{target} belongs to uid {NOBODY}, not root"
    elif how == "directory writable by nogroup":
        os.chown(target, 0, NOBODY)
        os.chmod(target, 0o775)
        why = f"{target} is writable by group {NOBODY} (mode 0775)"
    else:
        os.chmod(target, 0o646)
        why = f"{target} is writable by everyone (mode 0646)"
    for done in installs(copy, tmp_path):
        assert done.returncode == 1, done.stderr
        assert done.stderr.count("\n") == 1 and "not installing" in done.stderr, done.stderr
        assert f"root would run code others can change: {why}" in done.stderr, done.stderr
    assert not (tmp_path / "hooks").exists() and not (tmp_path / "units").exists()
    doctor = json.loads(run(copy, "doctor", "--json").stdout)
    (check,) = [c for c in doctor["checks"] if c["id"] == "host.root-code"]
    assert check["status"] == "warn" and why in check["message"], check
    assert check["evidence"]["findings"] == [why]


def test_what_counts_as_others_can_change(tmp_path: Path) -> None:
    """The rules, on real files: root's and not writable by group or others passes; a sticky
    directory (/tmp) and a root-group write pass; anything else is named."""
    os.chmod(tmp_path, 0o755)
    f = tmp_path / "f"
    f.write_text("")
    cases = {
        (0, 0, 0o644): None,
        (0, 0, 0o664): None,  # root's group
        (0, NOBODY, 0o664): "writable by group 65534",
        (0, 0, 0o666): "writable by everyone",
        (NOBODY, 0, 0o644): "belongs to uid 65534",
    }
    for (uid, gid, mode), expected in cases.items():
        os.chown(f, uid, gid)
        os.chmod(f, mode)
        why = rootcode._why(str(f), os.stat(f))
        assert (why is None) if expected is None else (why and expected in why), (mode, why)
    assert rootcode._why("/tmp", os.stat("/tmp")) is None  # 1777: sticky
    os.chmod(tmp_path, 0o777)
    assert "writable by everyone" in (rootcode._why(str(tmp_path), os.stat(tmp_path)) or "")
    # This checkout, as the tests run it, is root's alone: nothing to report.
    assert rootcode.findings(sys.executable, rootcode.UNIT_FLAGS) == []
    assert rootcode.findings(sys.executable, rootcode.HOOK_FLAGS) == []
    assert bootunit.command("arm").endswith(f"{rootcode.UNIT_FLAGS} -m vhostorch trace arm")
