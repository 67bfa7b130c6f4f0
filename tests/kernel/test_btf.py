"""vhostorch.kernel.btf on this machine's own kernel BTF (/sys/kernel/btf/vmlinux): member
paths, refusals, and the per-boot cache. Module BTF is tested in the test host
(tests/test_vhoststate_testhost.py), where vhost_net and kvm are loaded."""

from __future__ import annotations

import os
import pathlib
import time

import pytest

from vhostorch import errors
from vhostorch.kernel import btf

needs_btf = pytest.mark.skipif(
    not os.path.exists("/sys/kernel/btf/vmlinux") or os.geteuid() != 0,
    reason="needs root and the kernel's BTF",
)


@needs_btf
def test_btf_resolves_member_paths_of_the_running_kernel() -> None:
    vmlinux = btf.load(btf.VMLINUX)
    assert vmlinux.field("list_head.next") == btf.Field(0, 8)
    assert vmlinux.field("list_head.prev") == btf.Field(8, 8)
    # The iterator's context: pointers, then the u32 fd, then the file (bpf_iter.h's layout).
    assert vmlinux.field("bpf_iter__task_file.meta") == btf.Field(0, 8)
    assert vmlinux.field("bpf_iter__task_file.task") == btf.Field(8, 8)
    assert vmlinux.field("bpf_iter__task_file.fd") == btf.Field(16, 4)
    assert vmlinux.field("bpf_iter__task_file.file") == btf.Field(24, 8)
    # A member inside anonymous unions and structs, as C names it.
    assert vmlinux.field("sk_buff.next") == btf.Field(0, 8)
    # Arrays: each element one element's size further on.
    comm = vmlinux.field("task_struct.comm")
    assert comm is not None and comm.size == 16
    assert vmlinux.field("task_struct.comm[3]") == btf.Field(comm.offset + 3, 1)
    # Nested members add up.
    wqh, head = vmlinux.field("eventfd_ctx.wqh"), vmlinux.field("wait_queue_head.head")
    assert wqh is not None and head is not None
    assert vmlinux.field("eventfd_ctx.wqh.head") == btf.Field(wqh.offset + head.offset, 16)
    # What this kernel does not have is None, not an error.
    assert vmlinux.field("task_struct.no_such_member") is None
    assert vmlinux.field("no_such_struct.x") is None
    assert vmlinux.named("bpf_iter_task_file", (btf.FUNC,))


@needs_btf
@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("sk_buff.pkt_type", "pkt_type is a bitfield"),
        ("task_struct.comm[16]", "index 16 past comm's 16 elements"),
        ("task_struct.pid[0]", "pid is not an array"),
        ("task_struct.comm[x]", "malformed index"),
        ("task_struct.9x", "not a C name"),
        ("task_struct.pid.x", "x is a member of something not a struct"),
    ],
)
def test_btf_refuses_paths_that_name_no_byte_range(path: str, message: str) -> None:
    with pytest.raises(errors.LiveUnavailable, match=message):
        btf.load(btf.VMLINUX).field(path)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "shorter than its header"),
        (b"\x9f\xeb" + bytes(22), "sections run past"),  # header length 0 ...
        (b"\xeb\x9f\x01\x00\x18" + bytes(19), "magic 0x9feb"),
    ],
)
def test_btf_refuses_malformed_files(data: bytes, message: str) -> None:
    if message == "sections run past":
        # magic, version, flags, hdr_len 24, types at 0 (100 bytes), strings at 100 (0)
        data = b"\x9f\xeb\x01\x00" + (24).to_bytes(4, "little") + bytes(4)
        data += (100).to_bytes(4, "little") + (100).to_bytes(4, "little") + bytes(4)
    with pytest.raises(errors.LiveUnavailable, match=message):
        btf.Btf(data, "test")


def test_a_missing_btf_file_is_one_line(tmp_path: pathlib.Path) -> None:
    with pytest.raises(errors.LiveUnavailable, match=r"cannot read .*/vmlinux: No such file"):
        btf.resolve(["list_head.next"], root=str(tmp_path))


@needs_btf
def test_layout_is_cached_root_only_and_a_tampered_cache_is_not_believed(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "btf"
    paths, funcs = ["list_head.prev", "task_struct.pid"], ["bpf_iter_task_file"]
    found = btf.layout(paths, funcs, cache_dir=str(cache))
    assert found.members["list_head.prev"] == btf.Field(8, 8)
    assert found.funcs["bpf_iter_task_file"]
    (entry,) = cache.iterdir()
    assert (entry.stat().st_mode & 0o777, cache.stat().st_mode & 0o777) == (0o600, 0o700)
    calls = []
    real = btf.resolve

    def counting(*args: object, **kwargs: object) -> btf.Layout:
        calls.append(args)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(btf, "resolve", counting)
    started = time.perf_counter()
    assert btf.layout(paths, funcs, cache_dir=str(cache)) == found
    assert calls == [] and time.perf_counter() - started < 0.05
    # Another question is another entry.
    btf.layout(paths[:1], funcs, cache_dir=str(cache))
    assert len(calls) == 1 and len(list(cache.iterdir())) == 2
    # A cache file anyone could have written is not believed, nor garbage, nor a symlink.
    entry.write_text(
        entry.read_text().replace('"list_head.prev": [8, 8]', '"list_head.prev": [0, 8]')
    )
    entry.chmod(0o666)
    assert btf.layout(paths, funcs, cache_dir=str(cache)) == found
    assert len(calls) == 2 and entry.stat().st_mode & 0o777 == 0o600  # rewritten
    entry.write_bytes(b"{not json")
    assert btf.layout(paths, funcs, cache_dir=str(cache)) == found
    entry.unlink()
    entry.symlink_to(tmp_path / "elsewhere")
    assert btf.layout(paths, funcs, cache_dir=str(cache)) == found
    assert not (tmp_path / "elsewhere").exists()


@needs_btf
def test_a_cache_directory_another_user_can_write_is_not_used(tmp_path: pathlib.Path) -> None:
    """A directory the QEMU user (or anyone) can write is no place for root's cache: a
    root-owned file renamed in there with the right key and wrong offsets is not believed,
    and nothing is written there."""
    paths, funcs = ["list_head.prev"], ["bpf_iter_task_file"]
    own = tmp_path / "own"
    true = btf.layout(paths, funcs, cache_dir=str(own))
    (entry,) = own.iterdir()
    forged = entry.read_text().replace('"list_head.prev": [8, 8]', '"list_head.prev": [0, 8]')
    assert forged != entry.read_text()
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chown(shared, 65534, 65534)  # nobody's, as a QEMU user's directory would be
    planted = shared / entry.name
    planted.write_text(forged)
    planted.chmod(0o600)  # root's, mode as the real one: only the directory tells
    assert btf.layout(paths, funcs, cache_dir=str(shared)) == true
    assert [p.name for p in shared.iterdir()] == [entry.name]
    assert planted.read_text() == forged  # left alone, not rewritten either
