"""vhostorch.kernel.bpf: the assembler's encodings (as the UAPI gives them), its refusals, and
a program the running kernel's verifier refuses, reported by the verifier's own verdict."""

from __future__ import annotations

import os

import pytest

from vhostorch import errors
from vhostorch.kernel import bpf, btf
from vhostorch.kernel.bpf import DW, FP, JEQ, R0, R1, Program

needs_btf = pytest.mark.skipif(
    not os.path.exists("/sys/kernel/btf/vmlinux") or os.geteuid() != 0,
    reason="needs root and the kernel's BTF",
)


def test_assembler_encodes_as_the_uapi_says() -> None:
    p = Program()
    p.mov(R0, 0)  # BPF_ALU64 | BPF_MOV | BPF_K = 0xb7
    p.jump(JEQ, R1, 7, "end")  # BPF_JMP | BPF_JEQ | BPF_K = 0x15, off 1
    p.load(DW, R1, FP, -8)  # BPF_LDX | BPF_DW | BPF_MEM = 0x79, dst 1, src 10
    p.label("end")
    p.ld_imm64(R1, 0x1122334455667788)  # BPF_LD | BPF_DW | BPF_IMM = 0x18, two slots
    p.exit()  # BPF_JMP | BPF_EXIT = 0x95
    assert p.assemble().hex(" ", 8).split() == [
        "b700000000000000", "1501010007000000", "79a1f8ff00000000",
        "1801000088776655", "0000000044332211", "9500000000000000",
    ]  # fmt: skip


def test_assembler_refuses_loops_and_bad_operands() -> None:
    p = Program()
    p.label("top")
    p.goto("top")
    with pytest.raises(ValueError, match="no loops"):
        p.assemble()
    p = Program()
    p.goto("nowhere")
    with pytest.raises(ValueError, match="never placed"):
        p.assemble()
    with pytest.raises(ValueError, match="32 bits"):
        Program().mov(R0, 1 << 32)
    with pytest.raises(ValueError, match="placed twice"):
        q = Program()
        q.label("a")
        q.label("a")


@needs_btf
def test_a_refused_program_says_the_verifiers_verdict() -> None:
    func = btf.load(btf.VMLINUX).named("bpf_iter_task_file", (btf.FUNC,))
    assert func
    p = Program()
    p.exit()  # R0 never set
    with pytest.raises(errors.BpfRefused) as caught:
        bpf.load(p, func)
    assert str(caught.value) == "BPF program refused: R0 !read_ok"
    assert caught.value.errno == 13 and "R0 !read_ok" in caught.value.log


def test_verdict_skips_the_trace_and_the_statistics() -> None:
    log = (
        "func#0 @0\n0: R1=ctx() R10=fp0\n0: (79) r1 = *(u64 *)(r1 +0)\n"
        "R1 invalid mem access 'scalar'\nprocessed 3 insns (limit 1000000)\n"
    )
    assert bpf.verdict(log) == "R1 invalid mem access 'scalar'"
    assert bpf.verdict("") == ""
