"""The running kernel's type layouts, read from its BTF: where a member sits in a structure, and
the type id of a function, with the standard library only.

The kernel describes its own types in ``/sys/kernel/btf/vmlinux`` (``CONFIG_DEBUG_INFO_BTF``)
and each loaded module's in ``/sys/kernel/btf/<module>`` (``_MODULES``): split BTF, whose type
ids and string offsets continue vmlinux's, so a module's member may be of a vmlinux type. The
format is the kernel's ``include/uapi/linux/btf.h``: a header, then a type section of
variable-length records (kind, name, size or type, then per-kind entries) and a string section.

Offsets are never constants: they differ between kernels (``struct file``'s ``private_data``
moved between 6.1 and 6.12, ``struct kvm_kernel_irqfd`` changed, vhost's worker moved from the
device to each virtqueue in 6.5). `layout` answers a fixed set of questions (member paths such
as ``vhost_net.vqs[0].vq.kick``, function names), each None where this kernel has no such
thing, and keeps the answers per boot in a root-owned cache: parsing vmlinux's BTF in Python
takes 2-5 s under TCG (measured in the test host), and the BTF files do not change while the
kernel runs except when a module is loaded again. The key is the boot id and each file's
identity (size, modification time, inode), so a reloaded module or another boot misses.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct

from vhostorch import files, rundir

# The error raised here, also importable from here (the tree is in vhostorch.errors).
from vhostorch.errors import LiveUnavailable as LiveUnavailable
from vhostorch.errors import OperationFailed
from vhostorch.record import TYPE_CHECKING, Record

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

BTF_ROOT = "/sys/kernel/btf"
VMLINUX = "vmlinux"
BOOT_ID = "/proc/sys/kernel/random/boot_id"
CACHE_DIR = rundir.BTF
# Bump when what a cache file holds, or how a path is resolved, changes.
_CACHE_FORMAT = 1
_CACHE_LIMIT = 1 << 20

_MAGIC = 0xEB9F
_HEADER = struct.Struct("<HBBIIIII")  # magic, version, flags, hdr_len, type/str off and len
_TYPE = struct.Struct("<III")  # name_off, info, size or type
_MEMBER = struct.Struct("<III")  # name_off, type, offset (bits; bitfield size above 24 bits)
_ARRAY = struct.Struct("<III")  # element type, index type, number of elements

# Kinds (BTF_KIND_*), and how many bytes of entries follow a type of each, per entry or once.
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF = 1, 2, 3, 4, 5, 6, 7, 8
VOLATILE, CONST, RESTRICT, FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT = 9, 10, 11, 12, 13, 14, 15, 16
DECL_TAG, TYPE_TAG, ENUM64 = 17, 18, 19
_PER_ENTRY = {STRUCT: 12, UNION: 12, ENUM: 8, FUNC_PROTO: 8, DATASEC: 12, ENUM64: 12}
_ONCE = {INT: 4, ARRAY: 12, VAR: 4, DECL_TAG: 4}
_KNOWN = set(range(INT, ENUM64 + 1))
_QUALIFIERS = {TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG}
_SIZED = {INT, STRUCT, UNION, ENUM, ENUM64, FLOAT}
_POINTER_SIZE = 8  # x86_64, the only architecture vhostorch runs on


class Field(Record):
    """Where a member sits: ``offset`` bytes from the start of the outermost structure named
    in its path, ``size`` bytes long."""

    offset: int
    size: int


class Layout(Record):
    """Answers to `layout`'s questions: ``members`` by member path, ``funcs`` (function type
    ids in vmlinux) by name; None where this kernel has no such member or function."""

    members: dict[str, Field | None]
    funcs: dict[str, int | None]


class Btf:
    """One BTF file, on top of ``base`` (vmlinux) when it is a module's split BTF."""

    def __init__(self, data: bytes, name: str, base: Btf | None = None) -> None:
        if len(data) < _HEADER.size:
            raise LiveUnavailable(f"BTF {name}: {len(data)} bytes, shorter than its header")
        magic, _version, _flags, hdr_len, type_off, type_len, str_off, str_len = (
            _HEADER.unpack_from(data)
        )
        if magic != _MAGIC:
            raise LiveUnavailable(
                f"BTF {name}: magic {magic:#x}, not {_MAGIC:#x} (another byte order?)"
            )
        start = hdr_len  # the sections' offsets count from the end of the header
        if start + max(type_off + type_len, str_off + str_len) > len(data):
            raise LiveUnavailable(f"BTF {name}: sections run past the end of the file")
        self.name = name
        self.base = base
        self._data = data
        self._strings: tuple[int, int] = (start + str_off, start + str_off + str_len)
        self._str_base: int = base.str_end if base else 0
        self.first_id = base.next_id if base else 1  # type id 0 is void
        self._types: list[int] = []  # position of each own type's record in _data
        self._names: dict[int, list[int]] = {}  # name offset -> ids (structs, unions, funcs)
        pos, end = start + type_off, start + type_off + type_len
        named = (STRUCT, UNION, FUNC)
        while pos < end:
            name_off, info, _ = _TYPE.unpack_from(data, pos)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            if kind not in _KNOWN:
                raise LiveUnavailable(f"BTF {name}: unknown kind {kind} at type {self.next_id}")
            if kind in named:
                self._names.setdefault(name_off, []).append(self.first_id + len(self._types))
            self._types.append(pos)
            pos += _TYPE.size + _PER_ENTRY.get(kind, 0) * vlen + _ONCE.get(kind, 0)
        if pos != end:
            raise LiveUnavailable(f"BTF {name}: the type section does not end on a type")

    @property
    def next_id(self) -> int:
        return self.first_id + len(self._types)

    @property
    def str_end(self) -> int:
        """The string offset one past this file's strings (split BTF's start there)."""
        return self._str_base + self._strings[1] - self._strings[0]

    def _owner(self, type_id: int) -> Btf:
        btf: Btf | None = self
        while btf is not None and type_id < btf.first_id:
            btf = btf.base
        if btf is None or type_id >= btf.next_id:
            raise LiveUnavailable(f"BTF {self.name}: no type id {type_id}")
        return btf

    def _record(self, type_id: int) -> tuple[Btf, int, int, int, int]:
        """(file, position, name offset, info, size-or-type) of a type."""
        btf = self._owner(type_id)
        pos = btf._types[type_id - btf.first_id]
        name_off, info, size_or_type = _TYPE.unpack_from(btf._data, pos)
        return btf, pos, name_off, info, size_or_type

    def string(self, offset: int) -> str:
        btf: Btf = self
        while offset < btf._str_base and btf.base is not None:
            btf = btf.base
        begin = btf._strings[0] + offset - btf._str_base
        return btf._data[begin : btf._data.index(b"\0", begin)].decode()

    def _name_offsets(self, name: str) -> list[int]:
        """String offsets (in this file's numbering) holding exactly ``name``: strings are
        NUL-separated, so a search for NUL name NUL finds each without decoding them all."""
        found = []
        low, high = self._strings
        needle = b"\0" + name.encode() + b"\0"
        at = self._data.find(needle, low, high)
        while at >= 0:
            found.append(at + 1 - low + self._str_base)
            at = self._data.find(needle, at + 1, high)
        return found

    def named(self, name: str, kinds: Iterable[int]) -> int | None:
        """The id of the first own type (struct, union or func) of ``kinds`` called ``name``,
        this file first, then its base."""
        wanted = set(kinds)
        for offset in self._name_offsets(name):
            for type_id in self._names.get(offset, ()):
                if self._kind(type_id) in wanted:
                    return type_id
        return self.base.named(name, wanted) if self.base else None

    def _kind(self, type_id: int) -> int:
        return (self._record(type_id)[3] >> 24) & 0x1F

    def _strip(self, type_id: int) -> int:
        """The type under typedefs and qualifiers (bounded: BTF may not loop, but trust no file)."""
        for _ in range(64):
            if type_id == 0 or self._kind(type_id) not in _QUALIFIERS:
                return type_id
            type_id = self._record(type_id)[4]
        raise LiveUnavailable(f"BTF {self.name}: typedefs nested too deep at type {type_id}")

    def size(self, type_id: int) -> int:
        type_id = self._strip(type_id)
        btf, pos, _, info, size = self._record(type_id)
        kind = (info >> 24) & 0x1F
        if kind in _SIZED:
            return int(size)
        if kind == PTR:
            return _POINTER_SIZE
        if kind == ARRAY:
            element, _, count = _ARRAY.unpack_from(btf._data, pos + _TYPE.size)
            return int(count) * self.size(element)
        raise LiveUnavailable(f"BTF {self.name}: type {type_id} (kind {kind}) has no size")

    def _member(self, type_id: int, name: str) -> tuple[int, int] | None:
        """(bit offset, type) of member ``name`` of struct or union ``type_id``, looking into
        its anonymous structs and unions as C does."""
        btf, pos, _, info, _ = self._record(type_id)
        bitfields = bool(info >> 31)
        for i in range(info & 0xFFFF):
            name_off, member_type, offset = _MEMBER.unpack_from(
                btf._data, pos + _TYPE.size + i * _MEMBER.size
            )
            bits, bit_offset = (offset >> 24, offset & 0xFFFFFF) if bitfields else (0, offset)
            if name_off == 0:
                inner = self._strip(member_type)
                if self._kind(inner) in (STRUCT, UNION):
                    found = self._member(inner, name)
                    if found is not None:
                        return bit_offset + found[0], found[1]
                continue
            if self.string(name_off) == name:
                if bits:
                    raise LiveUnavailable(f"{name} is a bitfield ({bits} bits): no byte offset")
                return bit_offset, member_type
        return None

    def field(self, path: str) -> Field | None:
        """Where ``path`` (``struct.member[index].member...``) lies in its outermost struct,
        None when the struct or a member does not exist in this kernel.

        :raises LiveUnavailable: the path is malformed, indexes past an array or reaches a bitfield.
        """
        first, *steps = _split(path)
        if first[1]:
            raise LiveUnavailable(f"{path}: the first name is a struct, not an array")
        type_id = self.named(first[0], (STRUCT, UNION))
        if type_id is None:
            return None
        bits = 0
        for member, indexes in steps:
            inner = self._strip(type_id)
            if self._kind(inner) not in (STRUCT, UNION):
                raise LiveUnavailable(f"{path}: {member} is a member of something not a struct")
            found = self._member(inner, member)
            if found is None:
                return None
            bits, type_id = bits + found[0], found[1]
            for index in indexes:
                array = self._strip(type_id)
                btf, pos, _, info, _ = self._record(array)
                if (info >> 24) & 0x1F != ARRAY:
                    raise LiveUnavailable(f"{path}: {member} is not an array")
                element, _, count = _ARRAY.unpack_from(btf._data, pos + _TYPE.size)
                if not 0 <= index < count:
                    raise LiveUnavailable(f"{path}: index {index} past {member}'s {count} elements")
                bits += index * self.size(element) * 8
                type_id = element
        if bits % 8:
            raise LiveUnavailable(f"{path}: not on a byte boundary")
        return Field(bits // 8, self.size(type_id))


def _split(path: str) -> list[tuple[str, list[int]]]:
    """``a.b[1][2].c`` -> [("a", []), ("b", [1, 2]), ("c", [])]."""
    steps = []
    for part in path.split("."):
        name, _, rest = part.partition("[")
        indexes = []
        while rest:
            index, sep, rest = rest.partition("]")
            if not sep or not index.isdigit() or (rest and not rest.startswith("[")):
                raise LiveUnavailable(f"{path}: malformed index in {part!r}")
            indexes.append(int(index))
            rest = rest[1:]
        if not name.isidentifier():
            raise LiveUnavailable(f"{path}: {name!r} is not a C name")
        steps.append((name, indexes))
    return steps


def load(name: str, root: str = BTF_ROOT, base: Btf | None = None) -> Btf:
    """The BTF of ``name`` (``vmlinux``, or a module on top of ``base``) under ``root``.

    :raises LiveUnavailable: the file is missing (no ``CONFIG_DEBUG_INFO_BTF``, module not loaded)
        or malformed.
    """
    path = os.path.join(root, name)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise LiveUnavailable(f"cannot read {path}: {err.strerror}") from err
    return Btf(data, name, base)


def _identity(root: str, names: Sequence[str]) -> list[object]:
    """What makes a cache entry valid: the boot, and each BTF file as it is now."""
    try:
        with open(BOOT_ID) as f:
            boot: object = f.read().strip()
    except OSError:
        boot = None
    found: list[object] = [_CACHE_FORMAT, boot]
    for name in names:
        try:
            st = os.stat(os.path.join(root, name))
        except OSError:
            found.append([name, None])
            continue
        found.append([name, st.st_size, st.st_mtime_ns, st.st_ino])
    return found


def _read_cache(path: str, key: list[object]) -> Layout | None:
    """The cached answers, when the file is ours (root's, written by no one else) and its key
    is this one; anything else is a miss, never an error."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if (
            not stat.S_ISREG(st.st_mode)
            or st.st_uid != os.geteuid()
            or st.st_mode & 0o022
            or st.st_size > _CACHE_LIMIT
        ):
            return None
        data = os.read(fd, _CACHE_LIMIT)
    finally:
        os.close(fd)
    try:
        saved = json.loads(data)
        if saved["key"] != key:
            return None
        fields = {k: (Field(*v) if v is not None else None) for k, v in saved["fields"].items()}
        funcs = {k: (int(v) if v is not None else None) for k, v in saved["funcs"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return Layout(fields, funcs)


def _own_directory(path: str) -> bool:
    """Whether ``path`` is (made if missing) a directory only we can change: in one another
    user may write, a file of ours could be renamed in beside the real cache or replace it."""
    # The run directory's own level, made with its one mode (rundir): a cache made first
    # must not leave /run/vhostorch 0700, which QEMU's user could then not enter.
    modes = (rundir.BTF_MODE, rundir.RUN_MODE) if path == rundir.BTF else (rundir.BTF_MODE,)
    try:
        rundir.ensure(path, *modes)
    except (OSError, OperationFailed):
        return False
    return True


def _write_cache(path: str, key: list[object], found: Layout) -> None:
    fields = {k: ([v.offset, v.size] if v else None) for k, v in found.members.items()}
    data = json.dumps({"key": key, "fields": fields, "funcs": found.funcs}).encode()
    try:
        files.replace(path, data, 0o600)
    except OSError:
        pass  # a cache that cannot be written costs time, not correctness


def resolve(
    paths: Sequence[str],
    funcs: Sequence[str] = (),
    modules: Sequence[str] = (),
    root: str = BTF_ROOT,
) -> Layout:
    """Answer the questions from the BTF files themselves (no cache).

    A struct is looked up in vmlinux, then in each of ``modules`` that is loaded, in order;
    a module not loaded answers None for its structs.

    :raises LiveUnavailable: vmlinux's BTF is missing or malformed, or a path is malformed.
    """
    vmlinux = load(VMLINUX, root)
    loaded = [
        load(module, root, vmlinux)
        for module in modules
        if os.path.exists(os.path.join(root, module))
    ]
    fields: dict[str, Field | None] = {}
    for path in paths:
        found = None
        for btf in [vmlinux, *loaded]:
            found = btf.field(path)
            if found is not None:
                break
        fields[path] = found
    return Layout(fields, {name: vmlinux.named(name, (FUNC,)) for name in funcs})


def layout(
    paths: Sequence[str],
    funcs: Sequence[str] = (),
    modules: Sequence[str] = (),
    root: str = BTF_ROOT,
    cache_dir: str | None = CACHE_DIR,
) -> Layout:
    """`resolve`, through the per-boot cache in ``cache_dir`` (None: no cache; nor is one
    used in a directory that is not ours alone).

    :raises LiveUnavailable: as `resolve`.
    """
    if cache_dir is None or not _own_directory(cache_dir):
        return resolve(paths, funcs, modules, root)
    key: list[object] = [
        *_identity(root, [VMLINUX, *modules]),
        os.path.abspath(root),
        list(paths),
        list(funcs),
    ]
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32]
    path = os.path.join(cache_dir, f"{digest}.json")
    cached = _read_cache(path, key)
    if cached is not None:
        return cached
    found = resolve(paths, funcs, modules, root)
    _write_cache(path, key, found)
    return found
