"""The Python versions vhostorch declares, each run: this machine's (Debian 12: 3.11) runs the
whole suite; Debian 13's (3.13) runs the test-host suite in its session and, here, every unit
test, in a throwaway copy of that release's root (chroot, this machine's kernel: seconds, where
the test host's TCG takes minutes). No Debian release ships 3.12 (12 has 3.11, 13 has 3.13),
so it is declared from the two ends, not run."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from vhostorch.lab import userland

# Root (chroot, mounts); slow the first time (debootstrap of Debian 13's root, minutes).
pytestmark = [pytest.mark.kernel, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def _declared() -> set[str]:
    with open(REPO / "pyproject.toml", "rb") as f:
        meta = tomllib.load(f)["project"]
    prefix = "Programming Language :: Python :: "
    return {c[len(prefix) :] for c in meta["classifiers"] if c.startswith(prefix + "3.")}


def test_the_declared_versions_are_the_ones_run() -> None:
    """pyproject.toml declares 3.11 to 3.13 and requires 3.11; ruff and mypy check the oldest."""
    with open(REPO / "pyproject.toml", "rb") as f:
        meta = tomllib.load(f)
    assert _declared() == {"3.11", "3.12", "3.13"}
    assert meta["project"]["requires-python"] == ">=3.11"
    assert meta["tool"]["ruff"]["target-version"] == "py311"
    assert meta["tool"]["mypy"]["python_version"] == "3.11"


def test_every_unit_test_passes_on_debian_13s_python() -> None:
    if userland.codename() == "trixie":  # the whole suite runs on this Python already
        assert sys.version_info[:2] == (3, 13)
        return
    land = userland.ensure_userland("trixie", log=print)
    probe = ".venv/bin/python -c 'import sys; print(\"%d.%d\" % sys.version_info[:2])'"
    done = subprocess.run(
        userland.chrooted(land, "sh", "-c", probe), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    version = done.stdout.strip()
    assert version in _declared() and version != "3.11", version
    done = subprocess.run(
        userland.chrooted(
            land, ".venv/bin/python", "-m", "pytest", "-q", "-p", "no:cacheprovider",
            "--color=no", "tests/unit",
        ),
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    print(f"\nunit tests on Python {version} (Debian 13's root): {done.stdout.splitlines()[-1]}")
