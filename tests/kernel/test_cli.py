"""The installed `vhostorch` command: exit codes, one-line errors, JSON, against the real kernel."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess

import pytest

from tests.support.kernel import EXE, link, links, run, vhostorch


def _one_line_error(proc: object, code: int, *phrases: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)  # type: ignore[attr-defined]
    err = proc.stderr  # type: ignore[attr-defined]
    assert err.count("\n") == 1 and err.startswith("vhostorch: error: "), err
    assert "Traceback" not in err
    for phrase in phrases:
        assert phrase in err, err


@pytest.mark.kernel
def test_create_show_delete_round_trip_with_json(ns: str) -> None:
    created = vhostorch(
        "tap",
        "create",
        "c0",
        "c1",
        "--queues",
        "4",
        "--mtu",
        "9000",
        "--bridge",
        "cbr",
        "--create-bridge",
        "--owner",
        "libvirt-qemu",
        "--netns",
        ns,
        "--json",
    )
    assert created.returncode == 0, created.stderr
    body = json.loads(created.stdout)
    assert body["ok"] is True
    assert [(t["name"], t["action"]) for t in body["taps"]] == [
        ("c0", "created"),
        ("c1", "created"),
    ]
    assert link(ns, "c1")["master"] == "cbr"

    again = vhostorch(
        "tap",
        "create",
        "c0",
        "c1",
        "--queues",
        "4",
        "--mtu",
        "9000",
        "--bridge",
        "cbr",
        "--netns",
        ns,
    )
    assert again.returncode == 0
    assert again.stdout.splitlines() == ["c0: unchanged", "c1: unchanged"]

    shown = json.loads(vhostorch("tap", "show", "c0", "--netns", ns, "--json").stdout)
    [tap] = shown["taps"]
    assert (tap["queue_mode"], tap["mtu"], tap["bridge"], tap["managed"]) == (
        "multi",
        9000,
        "cbr",
        True,
    )
    table = vhostorch("tap", "show", "--netns", ns).stdout
    assert table.splitlines()[0].split()[:3] == ["NAME", "QUEUES", "VNET_HDR"]
    assert {line.split()[0] for line in table.splitlines()[1:]} == {"c0", "c1"}

    gone = vhostorch("tap", "delete", "c0", "c1", "--bridge", "cbr", "--netns", ns)
    assert gone.returncode == 0 and gone.stdout.splitlines() == ["c0: deleted", "c1: deleted"]
    assert set(links(ns)) == {"lo"}


@pytest.mark.kernel
@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["tap", "create", "name/with/slash"], "contains '/'"),
        (["tap", "create", "sixteen-bytes-xx"], "at most 15"),
        (["tap", "create", "a b"], "contains ' '"),
        (["tap", "create", "tap%d"], "contains '%'"),
        (["tap", "create", "t0", "--queues", "0"], "queues 0 is out of range"),
        (["tap", "create", "t0", "--queues", "257"], "out of range 1..256"),
        (["tap", "create", "t0", "--queues", "many"], "needs a whole number"),
        (["tap", "create", "t0", "--mtu", "67"], "--mtu 67 is out of range 68..65521"),
        (["tap", "create", "t0", "--mac", "01:00:5e:00:00:01"], "multicast"),
        (["tap", "create", "t0", "--mac", "zz"], "six hex octets"),
        (["tap", "create", "t0", "--owner", "no-such-user-x"], "'no-such-user-x' does not exist"),
        (["tap", "create", "t0", "--group", "bad name"], "neither a numeric id"),
        (["tap", "create", "t0", "--create-bridge"], "needs a bridge name"),
        (["tap", "create", "t0", "t1", "--mac", "52:54:00:00:00:01"], "one tap"),
        (["tap", "create", "t0", "t0"], "more than once"),
        (["tap", "frobnicate"], "unknown command 'tap frobnicate'"),
        (["tap", "create"], "NAME is required"),
        (["tap", "show", "a", "b"], "unexpected argument 'b'"),
        (["tap", "create", "t0", "--mtu"], "--mtu needs a value"),
        (["tap", "create", "t0", "--json=yes"], "--json takes no value"),
        (["tap", "create", "t0", "--bogus"], "unknown option '--bogus'"),
        (["tap", "create", "t0", "-x"], "unknown option '-x'"),
        ([], "a command is required"),
    ],
)
def test_bad_input_is_exit_2_one_line_and_touches_nothing(
    ns: str, args: list[str], phrase: str
) -> None:
    before = set(links(ns))
    _one_line_error(vhostorch(*args, "--netns", ns) if args else vhostorch(), 2, phrase)
    assert set(links(ns)) == before


@pytest.mark.kernel
def test_host_refusals_are_exit_1(ns: str) -> None:
    _one_line_error(
        vhostorch("tap", "create", "t0", "--bridge", "nobr", "--netns", ns),
        1,
        "bridge 'nobr' does not exist",
    )
    _one_line_error(vhostorch("tap", "show", "t0", "--netns", ns), 1, "tap t0 does not exist")
    _one_line_error(
        vhostorch("tap", "create", "t0", "--netns", "vho-none-such"),
        1,
        "namespace 'vho-none-such' does not exist",
    )
    run("ip", "-n", ns, "tuntap", "add", "dev", "own0", "mode", "tap")
    _one_line_error(
        vhostorch("tap", "delete", "own0", "--netns", ns), 1, "not created by vhostorch"
    )
    assert "own0" in links(ns)
    failed = vhostorch("tap", "create", "own0", "--queues", "2", "--netns", ns, "--json")
    assert failed.returncode == 1
    assert json.loads(failed.stdout) == {
        "ok": False,
        "error": failed.stderr.strip()[18:],
        "exit_code": 1,
    }


@pytest.mark.kernel
def test_help_lists_exit_codes() -> None:
    out = vhostorch("tap", "create", "--help")
    assert out.returncode == 0
    assert "2  bad usage or invalid input" in out.stdout
    assert "--no-vnet-hdr" in out.stdout and "--queues QUEUES" in out.stdout
    top = vhostorch("--help")
    assert top.returncode == 0 and "tap create" in top.stdout and "tap show" in top.stdout


def test_version_prints_the_package_version() -> None:
    from vhostorch import __version__

    for flag in ("--version", "-V"):
        done = vhostorch(flag)
        assert (done.returncode, done.stdout, done.stderr) == (0, f"vhostorch {__version__}\n", "")
    _one_line_error(vhostorch("--version", "tap"), 2, "--version takes no arguments")
    assert "usage: vhostorch [--version] COMMAND" in vhostorch("--help").stdout


def test_a_path_of_bytes_that_are_not_utf8_is_printed_escaped(tmp_path: pathlib.Path) -> None:
    """A unit directory whose name is not UTF-8 works, and stdout gives its bytes back, under
    any UTF-8 locale (PYTHONIOENCODING=utf-8 makes stdout strict, as en_US.UTF-8 does: it was
    an UnicodeEncodeError after the unit was written, exit 1, "internal error")."""
    where = os.path.join(os.fsencode(tmp_path), b"caf\xe9")
    done = subprocess.run(
        [os.fsencode(EXE), b"trace", b"install-unit", b"--unit-dir", where],
        capture_output=True,
        env={"PYTHONIOENCODING": "utf-8", "PATH": os.environ["PATH"]},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == where + b"/vhostorch-trace.service: installed, enabled\n"
    assert os.path.isfile(os.path.join(where, b"vhostorch-trace.service"))
