"""A fuzz of the libvirt hook: 10,000 generated calls, none may traceback, say "internal
error", exit other than 0, 1 or 2, print more than one line, or leave a tap or a file.

A seeded generator (the same inputs every run; FUZZ_SEED picks others) makes the argv
(names libvirt allows and names it does not, operations, missing arguments), the stdin
(closed, unreadable, empty, not UTF-8, over the bound) and the domain XML (vhostorch
metadata good and bad, truncated, DTDs, garbage). Most calls go through ``run_hook``, the
function the installed program calls, in this process, in one throwaway namespace, each
followed by the release libvirt would send; a sample goes through the installed program
itself as libvirt runs it (a child process, real /run/vhostorch/hook files, unique taps).
"""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
import tempfile
import time
from typing import BinaryIO
from xml.sax.saxutils import escape, quoteattr

from tests.support import kernel
from vhostorch import taps
from vhostorch.hook import install
from vhostorch.hook.metadata import NAMESPACE
from vhostorch.hook.program import MAX_XML, run_hook
from vhostorch.hook.state import Places, file_stem
from vhostorch.kernel import netns

IN_PROCESS = int(os.environ.get("FUZZ_N", "10000"))
PROGRAM = int(os.environ.get("FUZZ_PROGRAM", "300"))
SEED = int(os.environ.get("FUZZ_SEED", "16"))
BUDGET = 900  # seconds: the test fails rather than run on

NAMES = ["d1", "d2", "", ".", "..", "a/b", "vm\tone", "vm\u200bone", "vm\none", "dé", "%41",
         "~x", ".hidden", "v" * 230, "v" * 229 + "w", "é" * 120, "x" * 300, "\udcff\udcfe",
         "a b", "<&>", "'\"", "\u2028"]  # fmt: skip
OPS = ["prepare", "started", "release", "migrate", "restore", "stopped", "bogus", ""]
SUBS = ["begin", "end", "-", ""]
VALUES = ["1", "0", "4", "65536", "9000", "68", "-1", "", " 9000", "²", "9" * 40, "warn",
          "enforce", "nobody", "root", "0", "4294967294", "no-such-user", "' bad", "&amp;",
          "libvirt-qemu", "vbr"]  # fmt: skip
CONTROL = {0: None, 1: None}  # not XML characters: text() puts them in the garbage only
ATTRS = ["dev", "bridge", "mtu", "owner", "group", "verify", "queues", "x"]


class Unreadable(io.RawIOBase):
    def readable(self) -> bool:
        return True

    def readinto(self, buffer: object) -> int:
        raise OSError(5, "Input/output error")


def text(rng: random.Random) -> str:
    alphabet = "ab<>&'\"=/ \t\n;#x\u00e9\u200b\x00\x01"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))


def xml_for(rng: random.Random, name: str, pool: list[str]) -> str:
    kind = rng.random()
    if kind < 0.05:
        return text(rng)
    if kind < 0.08:
        return f'<!DOCTYPE domain [<!ENTITY a "{"x" * 50}">]><domain><name>&a;</name></domain>'
    nics = [(rng.choice(pool), rng.randint(0, 9)) for _ in range(rng.randint(0, 3))]
    ifaces = "".join(
        f"<interface type='{rng.choice(['ethernet', 'ethernet', 'network'])}'>"
        f"<target dev={quoteattr(dev)} managed='{rng.choice(['no', 'no', 'yes'])}'/>"
        f"<model type='virtio'/><driver name='vhost' queues='{queues}'/></interface>"
        for dev, queues in nics
    )
    tags = []
    good = rng.random() < 0.5  # half declare taps well, so prepare gets to make them
    if good:
        declared = list(
            dict.fromkeys(dev for dev, _ in nics if dev.startswith(("fz", "q")) and "%" not in dev)
        )
        ifaces = "".join(
            f"<interface type='ethernet'><target dev={quoteattr(dev)} managed='no'/>"
            f"<driver name='vhost' queues='{rng.choice([1, 1, 2, 4])}'/></interface>"
            for dev in declared
        )
        tags = [f"<vhostorch:tap dev={quoteattr(dev)} owner='nobody'/>" for dev in declared]
    for _ in range(0 if good else rng.randint(0, 3)):
        attrs = {a: rng.choice([*VALUES, *pool, text(rng)]) for a in rng.sample(ATTRS, 3)}
        if rng.random() < 0.7:
            attrs["dev"] = rng.choice(pool)
        tags.append("<vhostorch:tap " + " ".join(f"{k}={quoteattr(v)}" for k, v in attrs.items())
                    + "/>")  # fmt: skip
    meta = ""
    if good or rng.random() < 0.8:
        vm = rng.choice(["", "verify='warn'", "verify='enforce'", "verify='no'", "x='1'"])
        meta = f"<vhostorch:vm xmlns:vhostorch='{NAMESPACE}' {vm}>{''.join(tags)}</vhostorch:vm>"
        if rng.random() < 0.05:
            meta += meta  # two <vhostorch:vm>
    shown = name if rng.random() < 0.9 else rng.choice(NAMES)
    shown = shown.encode(errors="surrogateescape").decode(errors="replace")
    xml = (
        f"<domain type='kvm'><name>{escape(shown, {chr(9): '&#9;', chr(10): '&#10;'})}</name>"
        f"<description>{escape(text(rng).translate(CONTROL))}</description><metadata>{meta}</metadata>"
        f"<devices>{ifaces}</devices></domain>"
    )
    if rng.random() < 0.1:
        xml = xml[: rng.randint(0, len(xml))]
    return xml


def call(rng: random.Random, pool: list[str], prefix: str = "") -> tuple[list[str], object]:
    """One generated call: argv, and stdin (bytes, None for closed, or a reader)."""
    name = (prefix + rng.choice(NAMES))[:240]
    jobs = [("prepare", "begin")] * 4 + [("started", "begin")] * 2 + [("release", "end")]
    op, sub = rng.choice([*jobs, (rng.choice(OPS), rng.choice(SUBS))])
    argv = [name, op, sub, "-"][: rng.choice([4] * 8 + [3, 2, 1, 0])]
    state = rng.random()
    stdin: object
    if state < 0.03:
        stdin = None
    elif state < 0.05:
        stdin = "unreadable"
    elif state < 0.07:
        stdin = b"\xff\xfe<domain/>"
    elif state < 0.0705:
        stdin = b" " * (MAX_XML + 1)
    else:
        stdin = xml_for(rng, name, pool).encode(errors="surrogateescape")
    return argv, stdin


def check_output(code: int, out: bytes, err: str, what: object) -> None:
    assert code in (0, 1, 2), (code, err, what)
    assert out == b"", (out, what)
    assert err.count("\n") == (0 if code == 0 else 1), (err, what)
    assert err == "" or err.startswith("vhostorch hook: "), (err, what)
    assert "Traceback" not in err and "internal error" not in err, (err, what)


def files_under(root: str) -> list[str]:
    return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files]


def test_ten_thousand_generated_hook_calls_leave_nothing(ns: str) -> None:
    rng = random.Random(SEED)
    root = tempfile.mkdtemp(prefix="vho-fuzz-")
    places = Places(root, syslog=os.path.join(root, "no-syslog"))
    pool = ["fz0", "fz1", "fz2", "fz0", "x" * 16, "a b", "fz%d"]
    began = time.monotonic()
    codes = {0: 0, 1: 0, 2: 0}
    made = 0  # calls that made taps (then released)
    try:
        with netns.entered(ns):
            for i in range(IN_PROCESS):
                assert time.monotonic() - began < BUDGET, f"over {BUDGET} s at input {i}"
                argv, data = call(rng, pool)
                stdin: BinaryIO | None = None
                if data == "unreadable":
                    stdin = io.BufferedReader(Unreadable())
                elif isinstance(data, bytes):
                    stdin = io.BytesIO(data)
                err = io.StringIO()
                code = run_hook(argv, stdin, err, places)
                check_output(code, b"", err.getvalue(), (i, argv, data))
                codes[code] += 1
                if argv:  # what libvirt sends when the domain goes (or never started)
                    made += bool(taps.show())
                    err = io.StringIO()
                    code = run_hook([argv[0], "release", "end", "-"], io.BytesIO(b""), err, places)
                    assert (code, err.getvalue()) == (0, ""), (i, argv, err.getvalue())
                    left = [t.name for t in taps.show()]
                    assert left == [], (i, argv, data, left)
                    assert files_under(places.state) == [], (i, argv, data)
    finally:
        with netns.entered(ns):
            for name in NAMES:
                run_hook([name, "release", "end", "-"], None, io.StringIO(), places)
        subprocess.run(["rm", "-rf", root], check=False)
    took = time.monotonic() - began
    assert made > IN_PROCESS // 50  # the inputs reach the kernel, not only the parser
    print(
        f"\nhook fuzz, in process (run_hook + release): {IN_PROCESS} inputs, {took:.0f} s, "
        f"exit codes {codes}, {made} made taps; 0 tracebacks, 0 internal errors, 0 leaks"
    )


def test_a_sample_through_the_installed_program_leaves_nothing(ns: str) -> None:
    """The same generator through the installed program (python -IS, real files)."""
    rng = random.Random(SEED + 1)
    workdir = tempfile.mkdtemp(prefix="vho-fuzz-prog-")
    program = os.path.join(workdir, "vhostorch")
    with open(program, "w") as f:
        f.write(install.installed_program())
    os.chmod(program, 0o755)
    tag = kernel.unique("")[:5]
    pool = [f"q{tag}{i}" for i in range(3)] + ["x" * 16, "a b"]
    places = Places()
    began = time.monotonic()
    codes = {0: 0, 1: 0, 2: 0}
    used: set[str] = set()

    def run(argv: list[str], data: object) -> tuple[int, bytes, str]:
        closed = data is None or data == "unreadable"

        def child() -> None:
            if data is None:
                os.close(0)
            elif data == "unreadable":
                # read() on a write-only fd: EBADF. (A directory is refused by the Python
                # interpreter itself, before any hook code runs: libvirt passes a pipe.)
                os.dup2(os.open("/dev/null", os.O_WRONLY), 0)

        with netns.entered(ns):
            done = subprocess.run([program, *argv], input=data if isinstance(data, bytes) else None,
                                  capture_output=True, timeout=60,
                                  preexec_fn=child if closed else None)  # fmt: skip
        return done.returncode, done.stdout, done.stderr.decode(errors="replace")

    try:
        for i in range(PROGRAM):
            assert time.monotonic() - began < BUDGET, f"over {BUDGET} s at input {i}"
            argv, data = call(rng, pool, f"fz-{tag}-")  # not any real domain's files
            if argv:
                used.add(argv[0])
            code, out, err = run(argv, data)
            check_output(code, out, err, (i, argv, data))
            codes[code] += 1
            if argv:
                code, out, err = run([argv[0], "release", "end", "-"], b"")
                assert (code, out, err) == (0, b"", ""), (i, argv, err)
                assert [t for t in pool if t in kernel.links(ns)] == []
                stem = file_stem(argv[0])
                left = [f for f in files_under(places.run) if os.path.basename(f).startswith(stem)]
                left += [t for t in pool if os.path.lexists(places.claim(t))]
                assert left == [], (i, argv, data, left)
    finally:
        for name in used:
            run([name, "release", "end", "-"], b"")
        subprocess.run(["rm", "-rf", workdir], check=False)
    took = time.monotonic() - began
    print(f"\nhook fuzz, installed program: {PROGRAM} inputs, {took:.0f} s "
          f"({took / PROGRAM * 1000:.0f} ms per call and its release), exit codes {codes}; "
          "0 tracebacks, 0 internal errors, 0 leaks")  # fmt: skip


if __name__ == "__main__":  # a look at the generated inputs
    generator = random.Random(SEED)
    for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 5):
        print(call(generator, ["fz0", "fz1"]))
