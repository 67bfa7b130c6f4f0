"""BPF iterators from Python: a small assembler, and bpf(2) through ctypes, stdlib only.

What it does: assemble a program (`Program`: named instructions, symbolic labels), load it as a
``BPF_PROG_TYPE_TRACING`` program attached to a BPF iterator (``BPF_TRACE_ITER``, the iterator
named by the BTF id of its ``bpf_iter_<name>`` function), create the link and the iterator,
read what the program wrote with ``bpf_seq_write``, and close it all (`run`). Nothing stays
attached: a BPF iterator runs only while its fd is read, and the program, link and iterator
are released with their fds. No clang, libbpf, bcc or kernel headers; the encodings and the
numbers below are the kernel's UAPI (``include/uapi/linux/bpf.h``, ``bpf_common.h``).

Programs have no loops: `Program` has no backward jump (the assembler refuses one), so a walk
over a kernel list is written out a bounded number of times. The kernel's verifier checks
every program anyway; one it refuses raises `BpfRefused` whose message is the verifier's
verdict line and whose ``log`` is the whole log.
"""

from __future__ import annotations

import ctypes
import os
import struct

# The errors raised here, also importable from here (the tree is in vhostorch.errors).
from vhostorch.errors import BpfRefused as BpfRefused
from vhostorch.errors import LiveUnavailable as LiveUnavailable
from vhostorch.record import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

_SYS_BPF = 321  # x86_64's syscall number (arch/x86/entry/syscalls/syscall_64.tbl)
# enum bpf_cmd
_PROG_LOAD = 5
_LINK_CREATE = 28
_ITER_CREATE = 33
PROG_TYPE_TRACING = 26  # enum bpf_prog_type
TRACE_ITER = 28  # enum bpf_attach_type
_LOG_LEVEL_FAILURE = 1  # the path that failed, not every state
_LOG_SIZE = 4 << 20
_READ_LIMIT = 64 << 20  # an iterator's output larger than this is a bug, not data
OBJ_NAME_LEN = 16

# Helper function ids (enum bpf_func_id: the order of __BPF_FUNC_MAPPER).
PROBE_READ_KERNEL = 113  # (dst, size, unsafe_ptr): a fault zeroes dst and returns < 0
PROBE_READ_KERNEL_STR = 115
SEQ_WRITE = 127  # (seq_file, data, len), iterator programs only

# Registers: R0 return value, R1-R5 arguments (clobbered by calls), R6-R9 kept across calls,
# R10 the read-only frame pointer.
R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 = range(11)
FP = R10
STACK_SIZE = 512

# Instruction classes, sizes, modes and sources (bpf_common.h, bpf.h).
_LD, _LDX, _ST, _STX, _JMP, _ALU64 = 0x00, 0x01, 0x02, 0x03, 0x05, 0x07
B, H, W, DW = 0x10, 0x08, 0x00, 0x18  # 1, 2, 4, 8 bytes
_SIZE_BYTES = {B: 1, H: 2, W: 4, DW: 8}
_IMM, _MEM = 0x00, 0x60
_K, _X = 0x00, 0x08
# ALU operations
ADD, SUB, MUL, OR, AND, LSH, RSH, XOR, MOV = 0x00, 0x10, 0x20, 0x40, 0x50, 0x60, 0x70, 0xA0, 0xB0
# Jump operations (unsigned comparisons unless S)
_JA, JEQ, JGT, JGE, JSET, JNE, JSGT, JSGE = 0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70
_CALL, _EXIT, JLT, JLE = 0x80, 0x90, 0xA0, 0xB0
_INSN = struct.Struct("<BBhi")
_IMM32 = range(-(1 << 31), 1 << 31)


def size_code(size: int) -> int:
    """The size code (B, H, W, DW) of a load or store of ``size`` bytes."""
    for code, nbytes in _SIZE_BYTES.items():
        if nbytes == size:
            return code
    raise ValueError(f"no load or store of {size} bytes")


class Program:
    """A program under construction: one method per instruction, jumps to named labels.

    Labels may only be placed ahead of the jumps to them (no loop can be written), each once.
    """

    def __init__(self) -> None:
        # (code, dst, src, off, imm, label a jump goes to)
        self._insns: list[tuple[int, int, int, int, int, str | None]] = []
        self._labels: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._insns)

    def _emit(
        self, code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0,
        target: str | None = None,
    ) -> None:  # fmt: skip
        if not (0 <= dst <= R10 and 0 <= src <= R10 and -(1 << 15) <= off < 1 << 15):
            raise ValueError(f"bad operands: dst {dst}, src {src}, off {off}")
        if imm not in _IMM32:
            raise ValueError(f"immediate {imm} does not fit 32 bits (use ld_imm64)")
        self._insns.append((code, dst, src, off, imm, target))

    def alu(self, op: int, dst: int, imm: int) -> None:
        """dst = dst OP imm (64-bit)."""
        self._emit(_ALU64 | op | _K, dst, imm=imm)

    def alu_reg(self, op: int, dst: int, src: int) -> None:
        """dst = dst OP src (64-bit)."""
        self._emit(_ALU64 | op | _X, dst, src)

    def mov(self, dst: int, imm: int) -> None:
        self.alu(MOV, dst, imm)

    def mov_reg(self, dst: int, src: int) -> None:
        self.alu_reg(MOV, dst, src)

    def ld_imm64(self, dst: int, value: int) -> None:
        """dst = a 64-bit constant (two instruction slots)."""
        value &= (1 << 64) - 1
        low, high = value & 0xFFFFFFFF, value >> 32
        self._emit(_LD | DW | _IMM, dst, imm=low - (1 << 32) if low >> 31 else low)
        self._emit(0, imm=high - (1 << 32) if high >> 31 else high)

    def load(self, size: int, dst: int, src: int, off: int) -> None:
        """dst = *(size *)(src + off)."""
        self._emit(_LDX | size | _MEM, dst, src, off)

    def store(self, size: int, dst: int, off: int, src: int) -> None:
        """*(size *)(dst + off) = src."""
        self._emit(_STX | size | _MEM, dst, src, off)

    def store_imm(self, size: int, dst: int, off: int, imm: int) -> None:
        """*(size *)(dst + off) = imm."""
        self._emit(_ST | size | _MEM, dst, off=off, imm=imm)

    def jump(self, op: int, dst: int, imm: int, label: str) -> None:
        """if dst OP imm: go to label."""
        self._emit(_JMP | op | _K, dst, imm=imm, target=label)

    def jump_reg(self, op: int, dst: int, src: int, label: str) -> None:
        """if dst OP src: go to label."""
        self._emit(_JMP | op | _X, dst, src, target=label)

    def goto(self, label: str) -> None:
        self._emit(_JMP | _JA, target=label)

    def call(self, helper: int) -> None:
        self._emit(_JMP | _CALL, imm=helper)

    def exit(self) -> None:
        self._emit(_JMP | _EXIT)

    def label(self, name: str) -> None:
        if name in self._labels:
            raise ValueError(f"label {name} placed twice")
        self._labels[name] = len(self._insns)

    def assemble(self) -> bytes:
        """The instructions as the kernel takes them.

        :raises ValueError: a jump to a label never placed, not ahead of the jump, or
            farther than a jump's 16-bit offset reaches.
        """
        out = bytearray()
        for at, (code, dst, src, off, imm, target) in enumerate(self._insns):
            if target is not None:
                if target not in self._labels:
                    raise ValueError(f"jump to label {target}, never placed")
                off = self._labels[target] - at - 1
                if off < 0:
                    raise ValueError(f"jump back to label {target}: programs have no loops")
                if off >= 1 << 15:
                    raise ValueError(f"jump to label {target} spans {off} instructions: too far")
            out += _INSN.pack(code, (src << 4) | dst, off, imm)
        return bytes(out)


class _ProgLoad(ctypes.Structure):
    _fields_ = [
        ("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32),
        ("insns", ctypes.c_uint64), ("license", ctypes.c_uint64),
        ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32), ("prog_name", ctypes.c_char * OBJ_NAME_LEN),
        ("prog_ifindex", ctypes.c_uint32), ("expected_attach_type", ctypes.c_uint32),
        ("prog_btf_fd", ctypes.c_uint32), ("func_info_rec_size", ctypes.c_uint32),
        ("func_info", ctypes.c_uint64), ("func_info_cnt", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32), ("line_info", ctypes.c_uint64),
        ("line_info_cnt", ctypes.c_uint32), ("attach_btf_id", ctypes.c_uint32),
        ("attach_prog_fd", ctypes.c_uint32),
    ]  # fmt: skip


class _LinkCreate(ctypes.Structure):
    _fields_ = [
        ("prog_fd", ctypes.c_uint32), ("target_fd", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32), ("flags", ctypes.c_uint32),
        ("iter_info", ctypes.c_uint64), ("iter_info_len", ctypes.c_uint32),
    ]  # fmt: skip


class _IterCreate(ctypes.Structure):
    _fields_ = [("link_fd", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class _TaskIterInfo(ctypes.Structure):
    """union bpf_iter_link_info's task member: one process's tasks (Linux >= 6.1; older
    kernels ignore it and visit every task, so programs must filter too)."""

    _fields_ = [("tid", ctypes.c_uint32), ("pid", ctypes.c_uint32), ("pid_fd", ctypes.c_uint32)]


_LIBC: list[ctypes.CDLL] = []


def _bpf(cmd: int, attr: ctypes.Structure, what: str, log: str = "") -> int:
    """bpf(2); the new fd. :raises BpfRefused: the kernel's errno, and the verifier's
    verdict for a refused program."""
    if not _LIBC:
        _LIBC.append(ctypes.CDLL(None, use_errno=True))
    syscall = _LIBC[0].syscall
    syscall.restype = ctypes.c_long
    fd = int(syscall(_SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr)))
    if fd < 0:
        code = ctypes.get_errno()
        why = verdict(log) or os.strerror(code)
        raise BpfRefused(f"{what}: {why}", code, log)
    return fd


def verdict(log: str) -> str:
    """The verifier's meaningful line: the last one that is neither its statistics nor the
    trace that leads to it (instructions ``12: (79) ...``, register states ``R1=ctx()``,
    ``from 4 to 7: ...``, ``func#0 @0``, source comments ``; ...``)."""
    for line in reversed(log.splitlines()):
        text = line.strip()
        first = text.split(" ", 1)[0]
        if (
            not text
            or text.startswith(("processed ", "verification time", "stack depth", "from "))
            or text.startswith((";", "func#"))
            or first.rstrip(":").isdigit()
            or (first.startswith("R") and "=" in first)  # R1=ctx() R10=fp0
        ):
            continue
        return text
    return ""


def load(program: Program, attach_btf_id: int, name: str = "vhostorch") -> int:
    """Load ``program`` for the iterator whose ``bpf_iter_*`` function has ``attach_btf_id``
    in vmlinux's BTF; the program's fd (the caller closes it).

    Loaded first without a log (a log that overflows fails a good program on kernels before
    6.4); refused, loaded again with one to say why.

    :raises BpfRefused: the verifier refused it (message: its verdict) or bpf(2) failed.
    """
    code = program.assemble()
    insns = ctypes.create_string_buffer(code, len(code))
    license_ = ctypes.create_string_buffer(b"GPL")  # the helpers used are GPL-only
    attr = _ProgLoad(
        prog_type=PROG_TYPE_TRACING, insn_cnt=len(code) // _INSN.size,
        insns=ctypes.addressof(insns), license=ctypes.addressof(license_),
        prog_name=name.encode()[: OBJ_NAME_LEN - 1], expected_attach_type=TRACE_ITER,
        attach_btf_id=attach_btf_id,
    )  # fmt: skip
    try:
        return _bpf(_PROG_LOAD, attr, "BPF program refused")
    except BpfRefused:
        pass
    buf = ctypes.create_string_buffer(_LOG_SIZE)
    attr.log_level, attr.log_size, attr.log_buf = (
        _LOG_LEVEL_FAILURE,
        _LOG_SIZE,
        ctypes.addressof(buf),
    )
    try:
        fd = _bpf(_PROG_LOAD, attr, "BPF program refused", "")
    except BpfRefused as err:
        log = buf.value.decode(errors="replace")
        why = verdict(log) or os.strerror(err.errno)
        raise BpfRefused(f"BPF program refused: {why}", err.errno, log) from None
    return fd  # accepted the second time: a transient refusal (memory); keep it


def run(program_fd: int, pid: int | None = None) -> bytes:
    """Create an iterator link for ``program_fd`` (limited to process ``pid`` where the
    kernel can), read the iterator to its end, close the link and iterator; the bytes the
    program wrote.

    :raises BpfRefused: the link or iterator could not be made, or reading it failed.
    """
    info = _TaskIterInfo(pid=pid or 0)
    link_attr = _LinkCreate(prog_fd=program_fd, attach_type=TRACE_ITER)
    if pid:
        link_attr.iter_info = ctypes.addressof(info)
        link_attr.iter_info_len = ctypes.sizeof(info)
    link = _bpf(_LINK_CREATE, link_attr, "BPF iterator link refused")
    try:
        iterator = _bpf(_ITER_CREATE, _IterCreate(link_fd=link), "BPF iterator refused")
        try:
            chunks, total = [], 0
            while chunk := os.read(iterator, 1 << 16):
                chunks.append(chunk)
                total += len(chunk)
                if total > _READ_LIMIT:
                    raise BpfRefused(f"BPF iterator wrote more than {_READ_LIMIT} bytes", 0)
            return b"".join(chunks)
        except OSError as err:
            raise BpfRefused(f"reading the BPF iterator: {err.strerror}", err.errno or 0) from err
        finally:
            os.close(iterator)
    finally:
        os.close(link)


def iterate(
    program: Program, attach_btf_id: int, pids: Sequence[int | None] = (None,)
) -> list[bytes]:
    """Load ``program``, run it once per entry of ``pids`` (None: unfiltered), close it all;
    what each run wrote.

    :raises BpfRefused: as `load` and `run`.
    """
    fd = load(program, attach_btf_id)
    try:
        return [run(fd, pid) for pid in pids]
    finally:
        os.close(fd)
