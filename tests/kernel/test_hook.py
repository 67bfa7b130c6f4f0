"""The libvirt hook against the kernel, in throwaway namespaces (libvirtd: test_hook_libvirt).

Calls go through ``run_hook`` in this process (inside the namespace) with the hook's
files in a temporary directory, or through the hooks/qemu program as libvirt runs
it. No test leaves a tap, a claim or a state file.
"""

from __future__ import annotations

import io
import os
import pwd
import subprocess
import tempfile
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support import kernel
from tests.support.hook import HOOK, domain
from vhostorch import taps
from vhostorch.hook import install
from vhostorch.hook.program import qemu_user, run_hook
from vhostorch.hook.state import Places
from vhostorch.kernel import netns
from vhostorch.taps import TapSpec


@pytest.fixture
def places() -> Iterator[Places]:
    root = tempfile.mkdtemp(prefix="vho-hook-")
    yield Places(root)
    subprocess.run(["rm", "-rf", root], check=False)


def hook(ns: str, places: Places, *argv: str, xml: str = "") -> tuple[int, str]:
    err = io.StringIO()
    with netns.entered(ns):
        code = run_hook(list(argv), io.BytesIO(xml.encode()), err, places)
    return code, err.getvalue()


def leftovers(places: Places) -> list[str]:
    found = []
    for directory, _, files in os.walk(places.run):
        found += [os.path.join(directory, f) for f in files]
    return found


def tap_names(ns: str) -> set[str]:
    return {t.name for t in taps.show(netns=ns)}


def test_prepare_makes_the_declared_taps_and_release_deletes_them(ns: str, places: Places) -> None:
    kernel.run("ip", "-n", ns, "link", "add", "vbr", "type", "bridge")
    xml = domain(
        "d1", [("va", 4), ("vb", 1), ("other", 1)],
        "<vhostorch:tap dev='va' bridge='vbr' mtu='9000' owner='nobody'/><vhostorch:tap dev='vb'/>",
    )  # fmt: skip
    for _ in range(2):  # a rerun changes nothing
        assert hook(ns, places, "d1", "prepare", "begin", "-", xml=xml) == (0, "")
        made = {t.name: t for t in taps.show(netns=ns)}
        assert set(made) == {"va", "vb"}  # "other" is not declared: not vhostorch's business
        va, vb = made["va"], made["vb"]
        nobody = pwd.getpwnam("nobody").pw_uid
        assert (va.queue_mode, va.mtu, va.bridge, va.owner) == ("multi", 9000, "vbr", nobody)
        # The default owner is the user libvirt runs QEMU as (qemu.conf, else libvirt-qemu).
        assert vb.queue_mode == "single" and vb.owner == pwd.getpwnam(str(qemu_user())).pw_uid
        assert va.managed and vb.managed and va.vnet_hdr
    assert hook(ns, places, "d1", "release", "end", "-") == (0, "")
    assert tap_names(ns) == set() and leftovers(places) == []
    assert hook(ns, places, "d1", "release", "end", "-") == (0, "")


def test_a_tap_vhostorch_did_not_make_is_refused_and_nothing_is_made(
    ns: str, places: Places
) -> None:
    kernel.run("ip", "-n", ns, "tuntap", "add", "dev", "vb", "mode", "tap")
    xml = domain("d1", [("va", 1), ("vb", 1)], "<vhostorch:tap dev='va'/><vhostorch:tap dev='vb'/>")
    code, err = hook(ns, places, "d1", "prepare", "begin", "-", xml=xml)
    assert code == 1 and err.count("\n") == 1
    assert "tap vb exists and vhostorch did not create it; not taking it over" in err
    assert tap_names(ns) == {"vb"} and leftovers(places) == []
    assert hook(ns, places, "d1", "release", "end", "-") == (0, "")
    assert tap_names(ns) == {"vb"}  # still there, untouched


def test_two_domains_cannot_hold_one_tap(ns: str, places: Places) -> None:
    one = domain("d1", [("va", 1)], "<vhostorch:tap dev='va'/>")
    two = domain("d2", [("vb", 1), ("va", 1)], "<vhostorch:tap dev='vb'/><vhostorch:tap dev='va'/>")
    assert hook(ns, places, "d1", "prepare", "begin", "-", xml=one) == (0, "")
    code, err = hook(ns, places, "d2", "prepare", "begin", "-", xml=two)
    assert code == 1 and "tap va is declared by domain 'd1' too, which holds it" in err
    assert tap_names(ns) == {"va"}  # d2's vb was never made
    assert hook(ns, places, "d2", "release", "end", "-") == (0, "")
    assert tap_names(ns) == {"va"}
    assert hook(ns, places, "d1", "release", "end", "-") == (0, "")
    assert hook(ns, places, "d2", "prepare", "begin", "-", xml=two) == (0, "")
    assert tap_names(ns) == {"va", "vb"}
    assert hook(ns, places, "d2", "release", "end", "-") == (0, "")
    assert tap_names(ns) == set() and leftovers(places) == []


def test_a_tap_vhostorch_made_before_is_borrowed_and_left_at_release(
    ns: str, places: Places
) -> None:
    with netns.entered(ns):
        taps.create([TapSpec("va", owner="libvirt-qemu")])
    xml = domain("d1", [("va", 1)], "<vhostorch:tap dev='va'/>")
    assert hook(ns, places, "d1", "prepare", "begin", "-", xml=xml) == (0, "")
    assert hook(ns, places, "d1", "release", "end", "-") == (0, "")
    assert tap_names(ns) == {"va"} and leftovers(places) == []


BAD = {
    "verify='sometimes'": ("<vhostorch:tap dev='va'/>", "verify='sometimes'"),
    "no such interface": ("<vhostorch:tap dev='vz'/>", ""),
    "unknown attribute": ("<vhostorch:tap dev='va' colour='red'/>", ""),
    "bad mtu": ("<vhostorch:tap dev='va' mtu='big'/>", ""),
    "no such user": ("<vhostorch:tap dev='va' owner='no-such-user-here'/>", ""),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_metadata_is_refused_in_one_line_and_nothing_is_made(
    case: str, ns: str, places: Places
) -> None:
    meta, vm = BAD[case]
    code, err = hook(ns, places, "d1", "prepare", "begin", "-",
                     xml=domain("d1", [("va", 1)], meta, vm))  # fmt: skip
    assert code == 2 and err.startswith("vhostorch hook: ") and err.count("\n") == 1, err
    assert tap_names(ns) == set() and leftovers(places) == []


@pytest.mark.parametrize(
    ("argv", "xml", "message"),
    [
        (["d1", "prepare", "begin", "-"], "<domain><name>d1", "domain XML does not parse"),
        (["d2", "prepare", "begin", "-"], domain("d1", [], ""), "is domain 'd1', not 'd2'"),
        (["d1", "prepare", "begin", "-"], "<!DOCTYPE domain><domain/>", "has a DTD"),
        (["d1", "prepare"], "", "usage: qemu DOMAIN OPERATION SUB-OPERATION"),
    ],
)
def test_bad_arguments_and_xml_are_refused(
    argv: list[str], xml: str, message: str, ns: str, places: Places
) -> None:
    code, err = hook(ns, places, *argv, xml=xml)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert leftovers(places) == []


def test_every_other_operation_exits_at_once_and_prints_nothing() -> None:
    # For migrate and restore, whatever a hook prints replaces the domain XML.
    for op, sub in [("start", "begin"), ("stopped", "end"), ("migrate", "begin"),
                    ("restore", "begin"), ("reconnect", "begin"), ("attach", "begin"),
                    ("prepare", "end"), ("release", "begin"), ("started", "end")]:  # fmt: skip
        done = subprocess.run([HOOK, "d1", op, sub, "-"], input=b"<not xml", capture_output=True)
        assert (done.returncode, done.stdout, done.stderr) == (0, b"", b""), (op, sub)


def test_hooks_qemu_is_the_program_vhostorch_installs() -> None:
    with open(HOOK) as f:
        assert f.read() == install.program("/usr/bin/env python3", None)
    assert os.access(HOOK, os.X_OK)


NAMES = st.sampled_from(["d1", "d2", "", "..", "a/b", "dé", "x" * 300])
OPS = st.sampled_from(["prepare", "started", "release", "migrate", "restore", "bogus", ""])
SUBS = st.sampled_from(["begin", "end", "-", ""])
VALUES = st.one_of(
    st.sampled_from(
        [
            "va",
            "vb",
            "vbr",
            "1",
            "0",
            "65536",
            "9000",
            "warn",
            "enforce",
            "nobody",
            "root",
            "-1",
            "",
            "' bad",
            "&amp;",
            "libvirt-qemu",
        ]
    ),
    st.text(max_size=12),
)
ATTRS = st.sampled_from(["dev", "bridge", "mtu", "owner", "group", "verify", "queues", "x"])


@st.composite
def xmls(draw: st.DrawFn) -> str:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.text(max_size=80))
    nics = draw(st.lists(st.tuples(st.sampled_from(["va", "vb", "vc"]), st.integers(0, 9)),
                         max_size=3))  # fmt: skip
    tags = []
    for _ in range(draw(st.integers(0, 3))):
        attrs = draw(st.dictionaries(ATTRS, VALUES, max_size=4))
        text = " ".join(f"{k}={v!r}".replace("'", '"') for k, v in attrs.items())
        tags.append(f"<vhostorch:tap {text}/>")
    meta = None if draw(st.booleans()) and not tags else "".join(tags)
    vm = draw(st.sampled_from(["", "verify='warn'", "verify='enforce'", "verify='no'"]))
    xml = domain(draw(NAMES), nics, meta, vm)
    if draw(st.integers(0, 5)) == 0:
        cut = draw(st.integers(0, len(xml)))
        xml = xml[:cut]
    return xml


@settings(max_examples=150)
@given(name=NAMES, op=OPS, sub=SUBS, xml=xmls())
def test_fuzzed_hook_input_never_tracebacks_or_leaks(
    name: str, op: str, sub: str, xml: str
) -> None:
    with kernel.namespace() as ns:
        places = Places(tempfile.mkdtemp(prefix="vho-hook-"))
        try:
            code, err = hook(ns, places, name, op, sub, "-", xml=xml)
            assert code in (0, 1, 2)
            assert err.count("\n") == (0 if code == 0 else 1), err
            assert "Traceback" not in err and "internal error" not in err, err
            # Whatever prepare made, release takes back.
            code, err = hook(ns, places, name, "release", "end", "-")
            assert code in (0, 2) and "internal error" not in err, err
            assert tap_names(ns) == set()
            assert [f for f in leftovers(places) if "/hook/" in f] == []
        finally:
            subprocess.run(["rm", "-rf", places.run], check=False)


def test_fifty_concurrent_prepare_release_pairs(ns: str) -> None:
    # The real program and its real files (/run/vhostorch/hook), as libvirt would run it.
    names = [kernel.unique("vho-d") for _ in range(50)]
    xmls_ = {n: domain(n, [(f"{n[-8:]}a", 2), (f"{n[-8:]}b", 1)],
                       f"<vhostorch:tap dev='{n[-8:]}a'/><vhostorch:tap dev='{n[-8:]}b'/>")
             for n in names}  # fmt: skip

    def wave(op: str, sub: str) -> None:
        procs = {
            n: subprocess.Popen(
                ["ip", "netns", "exec", ns, HOOK, n, op, sub, "-"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for n in names
        }
        for n, p in procs.items():
            out, err = p.communicate(xmls_[n].encode(), timeout=120)
            assert (p.returncode, out, err) == (0, b"", b""), (n, op, err)

    try:
        wave("prepare", "begin")
        assert len(tap_names(ns)) == 100
        wave("release", "end")
        assert tap_names(ns) == set()
    finally:
        for n in names:  # nothing of these domains is left, whatever happened
            subprocess.run(["ip", "netns", "exec", ns, HOOK, n, "release", "end", "-"],
                           capture_output=True, check=False)  # fmt: skip
    left = [f for f in os.listdir(Places().state) if any(f.startswith(n) for n in names)]
    left += [f for f in os.listdir(Places().claims) if any(f.startswith(n[-8:]) for n in names)]
    assert left == []


def test_started_reports_what_it_cannot_prove_and_enforce_refuses_it(
    ns: str, places: Places
) -> None:
    import json
    import socket

    os.makedirs(places.run, exist_ok=True)
    places.syslog = os.path.join(places.run, "log")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as log:
        log.bind(places.syslog)
        log.settimeout(5)
        for policy, code, priority in (("warn", 0, 30), ("enforce", 1, 28)):  # daemon.info/warning
            xml = domain(
                "d1", [("va", 1)], "<vhostorch:tap dev='va'/>", f"verify='{policy}' worker-cpus='0'"
            )
            got, err = hook(ns, places, "d1", "started", "begin", "-", xml=xml)
            assert got == code, err
            with open(places.result("d1")) as f:
                result = json.load(f)
            # No QEMU runs for d1: nothing is proved, so the one verdict is unknown, with why.
            [check] = result["check"]["checks"]
            assert (check["id"], check["status"]) == ("vm.inspect", "unknown")
            assert "no QEMU process found for domain 'd1'" in check["message"]
            # Its worker-cpus could not be applied either: said so, never as pinned.
            assert result["worker_cpus"] == {"cpus": "0", "pinned": False, "errors": []}
            line = log.recv(4096).decode()
            assert line.startswith(f"<{priority}>vhostorch-hook[") and "domain d1" in line, line
            if policy == "enforce":
                assert result["enforced_failures"] == [f"cannot check: {check['message'][9:]}"]
                assert err.startswith("vhostorch hook: domain d1: vhost check failed")
            else:
                assert result["enforced_failures"] == [] and err == ""
    assert hook(ns, places, "d1", "release", "end", "-") == (0, "")
    assert not os.path.exists(places.result("d1"))


def test_qemu_user_follows_libvirts_configuration() -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".conf") as conf:
        conf.write('# user = "ignored"\nuser = "+0"\ngroup = "kvm"\n')
        conf.flush()
        assert qemu_user(conf.name) == "0"  # "+0": a numeric uid
        conf.seek(0)
        conf.truncate()
        conf.write('user = "nobody"\n')
        conf.flush()
        assert qemu_user(conf.name) == "nobody"
    assert qemu_user("/nonexistent/qemu.conf") == "libvirt-qemu"  # Debian's build default


def test_install_writes_only_its_own_file_and_leaves_other_hooks_alone() -> None:
    hooks = tempfile.mkdtemp(prefix="vho-hooks-")
    try:
        with open(os.path.join(hooks, "qemu"), "w") as f:
            f.write("#!/bin/sh\nexit 0\n")
        done = kernel.vhostorch("hook", "install", "--hooks-dir", hooks)
        assert done.returncode == 0 and "installed; restart libvirtd" in done.stdout
        assert f"left as they are: {hooks}/qemu" in done.stdout
        path = os.path.join(hooks, "qemu.d", "vhostorch")
        assert os.access(path, os.X_OK)
        with open(path) as f:
            assert f.read() == install.installed_program()
        # The installed program works as libvirt runs it: an ignored operation, nothing printed.
        ran = subprocess.run([path, "d1", "migrate", "begin", "-"], input=b"", capture_output=True)
        assert (ran.returncode, ran.stdout, ran.stderr) == (0, b"", b"")
        again = kernel.vhostorch("hook", "install", "--hooks-dir", hooks)
        assert again.returncode == 0 and "unchanged" in again.stdout
        with open(os.path.join(hooks, "qemu.d", "mine"), "w") as f:
            f.write("#!/bin/sh\nexit 0\n")
        refused = kernel.vhostorch("hook", "install", "--hooks-dir", hooks, "--name", "mine")
        assert refused.returncode == 1 and "vhostorch did not install it" in refused.stderr
        refused = kernel.vhostorch("hook", "uninstall", "--hooks-dir", hooks, "--name", "mine")
        assert refused.returncode == 1
        bad = kernel.vhostorch("hook", "install", "--hooks-dir", hooks, "--name", "../x")
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1
        gone = kernel.vhostorch("hook", "uninstall", "--hooks-dir", hooks)
        assert gone.returncode == 0 and "removed" in gone.stdout
        assert sorted(os.listdir(os.path.join(hooks, "qemu.d"))) == ["mine"]
        with open(os.path.join(hooks, "qemu")) as f:
            assert f.read() == "#!/bin/sh\nexit 0\n"
    finally:
        subprocess.run(["rm", "-rf", hooks], check=False)
