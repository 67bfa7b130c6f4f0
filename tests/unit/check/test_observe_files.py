"""The files `check` reads by a path others may have a say in: libvirt's per-domain pid file
and log (named from a QEMU's -name, which any user's QEMU chooses) and libvirtd's log."""

from __future__ import annotations

import os
import pathlib

import pytest

from vhostorch.check import observe


@pytest.mark.parametrize("name", ["../../tmp/x", "a/b", "/abs", "", "nul\0byte"])
def test_a_name_no_libvirt_domain_can_have_names_no_file(name: str) -> None:
    assert observe.libvirt_file("/run/libvirt/qemu", name, ".pid") is None
    assert not observe.by_libvirt(os.getpid(), name)


def test_a_domain_name_names_its_file_there() -> None:
    found = observe.libvirt_file("/run/libvirt/qemu", "..web1", ".pid")
    assert found == "/run/libvirt/qemu/..web1.pid"  # dots alone leave the directory not


@pytest.mark.parametrize("kind", ["fifo", "symlink", "directory"])
def test_only_a_regular_file_is_read_and_a_fifo_is_not_waited_on(
    kind: str, tmp_path: pathlib.Path
) -> None:
    real = tmp_path / "real"
    real.write_text(f"{os.getpid()}\n")
    path = tmp_path / "web1.pid"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink":
        path.symlink_to(real)
    else:
        path.mkdir()
    assert not observe.by_libvirt(os.getpid(), "web1", str(tmp_path))  # returns at once
    with pytest.raises(OSError):
        observe.tail_lines(str(path))
    path.unlink() if kind != "directory" else path.rmdir()
    path.write_text(f"{os.getpid()}\n")
    assert observe.by_libvirt(os.getpid(), "web1", str(tmp_path))
