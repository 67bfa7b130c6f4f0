"""The hook program under faults and hostile input (issue 16, items 3, 4, 7, 8, 11).

Every test runs the real hooks/qemu program as libvirt does (a child process, the
domain XML on stdin, its files in /run/vhostorch/hook), in a throwaway network
namespace, and sends real signals to it. Domain and tap names are unique, and each
test removes what it made.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

from tests.support import kernel
from tests.support.hook import HOOK, PLACES, domain, left_of, tap_xml
from vhostorch.hook import install
from vhostorch.hook.state import file_stem
from vhostorch.kernel import netns


def run(ns: str | None, *argv: str, xml: bytes | None = b"", umask: int | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[bytes]:  # fmt: skip
    """The hook program in ``ns``; ``xml`` None: stdin closed (``0<&-``)."""
    cmd = [HOOK, *argv]
    if xml is None:
        cmd = ["bash", "-c", 'exec "$0" "$@" 0<&-', *cmd]

    def child() -> None:
        if umask is not None:
            os.umask(umask)

    with netns.entered(ns):
        return subprocess.run(cmd, input=xml, capture_output=True, timeout=timeout,
                              preexec_fn=child)  # fmt: skip


@pytest.fixture
def released() -> Iterator[list[str]]:
    """Domains a test prepared: released at the end (in the namespace they were made in)."""
    done: list[str] = []
    yield done
    for entry in done:
        ns, name = entry.split(" ", 1)
        run(ns, name, "release", "end", "-")


# --- item 3: a signal during prepare -------------------------------------------------------


def _first_claim(taps: list[str]) -> bool:
    return os.path.exists(PLACES.claim(taps[0]))


def _first_tap(taps: list[str]) -> bool:
    try:
        socket.if_nametoindex(taps[0])  # asks the namespace this thread is in
    except OSError:
        return False
    return True


@pytest.mark.parametrize("moment", ["claim", "tap"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGKILL])
def test_a_signal_during_prepare_leaves_nothing_that_release_cannot_clean(
    signum: int, moment: str, ns: str, released: list[str]
) -> None:
    name = kernel.unique("vho-sig")
    taps = [f"s{name[-6:]}n{i:02d}" for i in range(50)]
    xml = tap_xml(name, taps)
    released.append(f"{ns} {name}")
    reached = _first_claim if moment == "claim" else _first_tap
    with netns.entered(ns):  # the child makes its taps here; _first_tap looks here
        proc = subprocess.Popen([HOOK, name, "prepare", "begin", "-"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        assert proc.stdin is not None
        proc.stdin.write(xml)
        proc.stdin.close()
        proc.stdin = None  # written and closed: communicate() only reads
        deadline = time.monotonic() + 30
        while not reached(taps) and proc.poll() is None and time.monotonic() < deadline:
            pass
        assert proc.poll() is None, "prepare finished before the signal could be sent"
        proc.send_signal(signum)  # our own child, by its pid
        out, err = proc.communicate(timeout=60)
    if signum == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        # Nothing could be rolled back; what is left is recorded, and release cleans it.
        done = run(ns, name, "release", "end", "-")
        assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")
    else:
        assert proc.returncode == 1, (proc.returncode, err)
        assert out == b"" and err.count(b"\n") == 1 and err.startswith(b"vhostorch hook: "), err
        assert b"Traceback" not in err
    assert [t for t in taps if t in kernel.links(ns)] == []
    assert left_of(name, taps) == []
    # The taps are free: another domain declaring them starts.
    other = kernel.unique("vho-sig")
    released.append(f"{ns} {other}")
    done = run(ns, other, "prepare", "begin", "-", xml=tap_xml(other, taps[:3]))
    assert done.returncode == 0, done.stderr
    assert run(ns, other, "release", "end", "-").returncode == 0
    assert left_of(other, taps) == [] and [t for t in taps if t in kernel.links(ns)] == []


# --- item 4: input cost ---------------------------------------------------------------------


def test_a_large_description_is_read_in_linear_time(ns: str) -> None:
    name = kernel.unique("vho-big")
    xml = domain(name, [], None).replace("<metadata>", "<description>" + "x\n" * 400_000
                                         + "</description><metadata>")  # fmt: skip
    for op, sub in (("prepare", "begin"), ("started", "begin")):
        began = time.monotonic()
        done = run(ns, name, op, sub, "-", xml=xml.encode(), timeout=30)
        took = time.monotonic() - began
        assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")
        assert took < 2, f"{op}: {took:.1f} s for a 0.8 MB description"
    # Text in many small pieces (a character reference each) is no slower.
    xml = xml.replace("x\n" * 400_000, "&#120;" * 200_000)
    began = time.monotonic()
    done = run(ns, name, "prepare", "begin", "-", xml=xml.encode(), timeout=30)
    assert done.returncode == 0 and time.monotonic() - began < 2


LAUGHS = (
    '<?xml version="1.0"?><!DOCTYPE domain [<!ENTITY l0 "ha">'
    + "".join(f'<!ENTITY l{i} "{("&l" + str(i - 1) + ";") * 10}">' for i in range(1, 10))
    + "]><domain><name>NAME</name><description>&l9;</description></domain>"
)


@pytest.mark.parametrize(
    ("what", "xml", "message"),
    [
        ("billion laughs", LAUGHS, "a DTD"),
        ("an external entity", '<!DOCTYPE domain [<!ENTITY e SYSTEM "/etc/shadow">]>'
         "<domain><name>NAME</name><description>&e;</description></domain>", "a DTD"),
        ("a bare DOCTYPE", "<!DOCTYPE domain><domain><name>NAME</name></domain>", "a DTD"),
        ("too large", "<domain><name>NAME</name><description>" + "y" * (17 << 20)
         + "</description></domain>", "larger than"),
    ],
)  # fmt: skip
def test_hostile_xml_fails_fast_in_one_line(what: str, xml: str, message: str, ns: str) -> None:
    name = kernel.unique("vho-x")
    began = time.monotonic()
    done = run(ns, name, "prepare", "begin", "-", xml=xml.replace("NAME", name).encode())
    took = time.monotonic() - began
    assert done.returncode == 2 and done.stdout == b"", (what, done.stderr)
    assert done.stderr.count(b"\n") == 1 and message.encode() in done.stderr, done.stderr
    assert took < 2, f"{what}: {took:.1f} s"
    assert left_of(name, []) == []


# --- item 7: any name libvirt allows ---------------------------------------------------------

NAMES = {
    "tab": "vm\tone",
    "zero-width space": "vm\u200bone",
    "230 bytes": "v" * 230,
    "230 bytes, another": "v" * 229 + "w",
    "multibyte, 240 bytes": "é" * 120,
    "dots": "..",
    "percent": "a%2Fb",
    "slash-like": "a\u2215b",
    "newline": "vm\nx",
}


@pytest.mark.parametrize("case", sorted(NAMES))
def test_a_domain_without_metadata_is_never_refused(case: str, ns: str) -> None:
    name = NAMES[case]
    xml = domain(name.replace("\n", "&#10;").replace("\t", "&#9;"), [("t0", 1)], None).encode()
    for op, sub in (("prepare", "begin"), ("started", "begin"), ("release", "end")):
        done = run(ns, name, op, sub, "-", xml=xml)
        assert (done.returncode, done.stdout, done.stderr) == (0, b"", b""), (op, done.stderr)
    assert left_of(name, []) == []


def test_unusual_names_get_their_own_files_and_their_own_taps(ns: str, released: list[str]) -> None:
    stems = {file_stem(n) for n in NAMES.values()}
    assert len(stems) == len(NAMES)  # no two names share a file
    assert all(len((s + ".taps.tmp").encode()) <= 255 and "/" not in s for s in stems)
    made = {}
    for case, name in sorted(NAMES.items()):
        tap = kernel.unique("u")
        made[name] = tap
        released.append(f"{ns} {name}")
        xml = tap_xml(name.replace("\n", "&#10;").replace("\t", "&#9;"), [tap])
        done = run(ns, name, "prepare", "begin", "-", xml=xml)
        assert (done.returncode, done.stderr) == (0, b""), case
        assert os.path.exists(PLACES.held(name))
    assert set(made.values()) <= set(kernel.links(ns))
    for name, tap in made.items():
        assert run(ns, name, "release", "end", "-").returncode == 0
        assert tap not in kernel.links(ns) and left_of(name, [tap]) == [], repr(name)
    assert set(made.values()) & set(kernel.links(ns)) == set()


# --- item 8: stdin closed ----------------------------------------------------------------


def test_a_closed_stdin_is_one_line_and_exit_2(ns: str) -> None:
    name = kernel.unique("vho-c")
    for op, sub in (("prepare", "begin"), ("started", "begin")):
        done = run(ns, name, op, sub, "-", xml=None)
        assert done.returncode == 2, done.stderr
        assert done.stderr.count(b"\n") == 1 and b"stdin" in done.stderr, done.stderr
        assert b"Traceback" not in done.stderr
    for op, sub in (("release", "end"), ("migrate", "begin")):
        done = run(ns, name, op, sub, "-", xml=None)
        assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")


# --- item 11 (and 6, for the hook's files): modes and symlinks ------------------------------


def test_the_hooks_files_are_not_world_writable_under_umask_000(
    ns: str, released: list[str]
) -> None:
    name = kernel.unique("vho-m")
    tap = kernel.unique("m")
    released.append(f"{ns} {name}")
    xml = tap_xml(name, [tap])
    assert run(ns, name, "prepare", "begin", "-", xml=xml, umask=0).returncode == 0
    done = run(ns, name, "started", "begin", "-", xml=xml, umask=0)
    assert done.returncode == 0, done.stderr
    for path in (PLACES.held(name), PLACES.claim(tap), PLACES.result(name)):
        mode = stat.S_IMODE(os.lstat(path).st_mode)
        assert mode & 0o022 == 0, f"{path}: {oct(mode)}"
    assert run(ns, name, "release", "end", "-", umask=0).returncode == 0
    assert left_of(name, [tap]) == []


def test_install_does_not_follow_a_symlink_at_a_temporary_name() -> None:
    hooks = tempfile.mkdtemp(prefix="vho-hooks-")
    try:
        secret = os.path.join(hooks, "secret")
        with open(secret, "w") as f:
            f.write("root only\n")
        os.chmod(secret, 0o600)
        os.makedirs(os.path.join(hooks, "qemu.d"))
        # The old fixed name, and a few others an attacker could guess.
        for bait in (".vhostorch.tmp", ".vhostorch.new", "vhostorch.tmp"):
            os.symlink(secret, os.path.join(hooks, "qemu.d", bait))
        old = os.umask(0)
        try:
            done = install.install(hooks_dir=hooks)
        finally:
            os.umask(old)
        with open(secret) as f:
            assert f.read() == "root only\n"
        assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
        st = os.lstat(done.path)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755
        with open(done.path) as f:
            assert f.read() == install.installed_program()
        leftover = sorted(os.listdir(os.path.join(hooks, "qemu.d")))
        assert leftover == [".vhostorch.new", ".vhostorch.tmp", "vhostorch", "vhostorch.tmp"]
        # An update replaces the file atomically, never writing through a symlink at its path.
        os.unlink(done.path)
        os.symlink(secret, done.path)
        with pytest.raises(Exception, match="is a symlink, not a hook vhostorch installed"):
            install.install(hooks_dir=hooks)
        with open(secret) as f:
            assert f.read() == "root only\n"
    finally:
        subprocess.run(["rm", "-rf", hooks], check=False)


# --- issue 19, item 4: release spares a tap someone made under a name prepare was making ---


def test_release_after_a_killed_prepare_spares_a_tap_someone_made_under_its_name(
    ns: str, released: list[str]
) -> None:
    name = kernel.unique("vho-rep")
    taps = [f"r{name[-6:]}n{i:02d}" for i in range(50)]
    released.append(f"{ns} {name}")
    with netns.entered(ns):
        proc = subprocess.Popen([HOOK, name, "prepare", "begin", "-"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        assert proc.stdin is not None
        proc.stdin.write(tap_xml(name, taps))
        proc.stdin.close()
        proc.stdin = None
        deadline = time.monotonic() + 30
        # The second tap begun: the first is made for good (a tap lives only as long as the
        # fd that made it until TUNSETPERSIST, so a kill before takes it along).
        while not _first_tap(taps[1:]) and proc.poll() is None and time.monotonic() < deadline:
            pass
        assert proc.poll() is None, "prepare finished before the signal could be sent"
        proc.kill()  # our own child, by its pid
        proc.communicate(timeout=60)
    mine = kernel.links(ns)[taps[0]].get("ifalias", "")
    ip = ["ip", "-n", ns]
    subprocess.run([*ip, "link", "delete", taps[0]], check=True)
    subprocess.run([*ip, "tuntap", "add", "dev", taps[0], "mode", "tap"], check=True)
    subprocess.run([*ip, "link", "set", taps[0], "alias", "someone-else"], check=True)
    done = run(ns, name, "release", "end", "-")
    assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")
    links = kernel.links(ns)
    assert taps[0] in links, "release deleted a tap someone made under a name it had made"
    assert links[taps[0]].get("ifalias") == "someone-else"  # not the hook's: left alone
    assert mine.startswith("vhostorch:"), mine  # marked before it could outlive the hook
    assert [t for t in taps[1:] if t in links] == []
    assert left_of(name, taps) == []
