"""The Debian userland's package list against scripts/setup.sh's, and the choice's checks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vhostorch.errors import InvalidSpec
from vhostorch.lab import userland

SETUP = Path(__file__).resolve().parents[3] / "scripts" / "setup.sh"


def test_a_debian_userland_installs_what_setup_sh_installs() -> None:
    block = re.search(r"^packages=\((.*?)^\)", SETUP.read_text(), re.M | re.S)
    assert block is not None
    words = re.sub(r"#.*", "", block.group(1)).split()
    # setup.sh's debootstrap makes the userland; ca-certificates is for pip inside it.
    assert set(userland.PACKAGES) == {*words, "ca-certificates"} - {"debootstrap"}


def test_the_userland_choice_and_its_default_kernel() -> None:
    assert userland.userland_name("trixie") == "trixie"
    assert userland.default_kernel("trixie") == "6.12"
    assert userland.default_kernel(userland.DEFAULT_USERLAND) == "default"
    with pytest.raises(InvalidSpec, match=r"--userland takes one of default, trixie, not 'sid'"):
        userland.userland_name("sid")
    default = userland.ensure_userland()
    assert (default.root, default.venv) == ("/", "")
