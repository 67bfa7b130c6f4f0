"""Fixtures of the tests that start VMs on this machine: a directory for their specs and the
names of the VMs a test started, each cleaned up after the test whatever it left."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator

import pytest

from tests.support.kernel import EXE
from tests.support.vms import state_of


@pytest.fixture
def specs() -> Iterator[str]:
    """A directory for a test's spec files, readable by the QEMU user (removed afterwards)."""
    path = tempfile.mkdtemp(prefix="vho-specs-")
    os.chmod(path, 0o755)
    yield path
    subprocess.run(["rm", "-rf", path], check=False)


@pytest.fixture
def names() -> Iterator[list[str]]:
    """VM names a test used: whatever they left is taken down at the end."""
    used: list[str] = []
    yield used
    for name in used:
        if state_of(name) is not None:
            subprocess.run([EXE, "down", name], capture_output=True)
