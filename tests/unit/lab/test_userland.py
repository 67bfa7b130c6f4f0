"""The Debian userland's package list against scripts/setup.sh's, and the choice's checks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vhostorch.errors import InvalidSpec
from vhostorch.lab import userland

SETUP = Path(__file__).resolve().parents[3] / "scripts" / "setup.sh"


def test_a_debian_userland_installs_what_setup_sh_installs() -> None:
    # packages=(...) and services=(...), the ones installed with their services kept stopped.
    text = SETUP.read_text()
    block = re.search(r"^packages=\((.*?)^\)", text, re.M | re.S)
    services = re.search(r"^services=\((.*)\)$", text, re.M)
    assert block is not None and services is not None
    words = re.sub(r"#.*", "", block.group(1)).split() + services.group(1).split()
    # ca-certificates is for pip inside it. The root is a Debian 13 machine too: setup.sh
    # there finds every package it wants (debootstrap included) already installed.
    assert set(userland.PACKAGES) == {*words, "ca-certificates"}


def test_the_userland_choice_and_its_default_kernel() -> None:
    assert userland.userland_name("trixie") == "trixie"
    assert userland.default_kernel("trixie") == "6.12"
    assert userland.default_kernel(userland.DEFAULT_USERLAND) == "default"
    with pytest.raises(InvalidSpec, match=r"--userland takes one of default, trixie, not 'sid'"):
        userland.userland_name("sid")
    default = userland.ensure_userland()
    assert (default.root, default.venv) == ("/", "")


@pytest.mark.parametrize(
    ("codename", "sessions"),
    [
        ('"bookworm"', "6.1 6.12 6.12@trixie"),
        ("trixie", "6.12"),
        ("noble", "default"),
        ("", "default"),
    ],
)
def test_the_default_sessions_follow_this_machines_release(
    tmp_path: Path, codename: str, sessions: str
) -> None:
    """A Debian 13 machine's archive has no 6.1 kernel and its root is Debian 13's already."""
    from tests.support.testhost import default_kernels

    release = tmp_path / "os-release"
    release.write_text(f'PRETTY_NAME="Debian"\nVERSION_CODENAME={codename}\nID=debian\n')
    assert default_kernels(str(release)) == sessions
    assert default_kernels(str(tmp_path / "missing")) == "default"
