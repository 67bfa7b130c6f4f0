"""Numbers from every way in (command line, TOML, domain metadata): ASCII digits, bounded,
refused in one line with exit 2; and uids/gids over the kernel's whole range on real taps.

int() and str.isdigit() take '²' (int('²') then raises ValueError), Arabic-Indic digits,
' 1_0 ' and '+5', and int() raises ValueError beyond 4300 digits: each of those was an
"internal error" (exit 1) or a silently different number. fcntl.ioctl passes an int as a
C int, so a uid or gid from 2**31 up was an OverflowError.
"""

from __future__ import annotations

import grp
import io
import json
import pathlib
import pwd
import tempfile
from collections.abc import Callable
from typing import Any

import pytest

from tests.support.kernel import link, links, run, sysfs, vhostorch
from vhostorch import taps
from vhostorch.errors import InvalidSpec
from vhostorch.hook import metadata
from vhostorch.hook.metadata import NAMESPACE
from vhostorch.hook.program import run_hook
from vhostorch.hook.state import Places
from vhostorch.inputs import MAX_ID, parse_number, shown
from vhostorch.kernel import netns
from vhostorch.taps import TapSpec
from vhostorch.vm import spec

LONG = "1" * 5000  # past int()'s 4300-digit limit
NOT_NUMBERS = ["²", "٣", "\uff11", " 1", "1 ", "1_0", "+5", "-5", "", "0x10", "1" * 21, LONG]
# The kernel's whole id range: (uid_t)-1 is "no owner", so 0xFFFFFFFE is the largest id.
IDS = [0, 2**31 - 1, 2**31, 2**32 - 2]


def _id(value: object) -> str:
    """A short test id (pytest's own str() of a 5000-digit int is a ValueError)."""
    return shown(value)[:40]


def _one_line(err: str, prefix: str = "vhostorch: error: ") -> None:
    assert err.count("\n") == 1 and err.startswith(prefix), err
    assert "internal error" not in err and "Traceback" not in err, err
    assert len(err) < 300, err


@pytest.mark.parametrize("text", NOT_NUMBERS, ids=_id)
def test_only_short_ascii_digits_are_numbers(text: str) -> None:
    with pytest.raises(InvalidSpec, match="ASCII digits"):
        parse_number(text, "n")


def test_ascii_numbers_parse() -> None:
    assert parse_number("0", "n") == 0
    assert parse_number("4294967294", "n") == MAX_ID
    assert parse_number("9" * 20, "n") == 10**20 - 1


@pytest.mark.parametrize("owner", ["4294967295", "99999999999", LONG, 10**5000], ids=_id)
def test_out_of_range_or_huge_ids_are_refused_in_one_line(owner: object) -> None:
    with pytest.raises(InvalidSpec) as err:
        TapSpec("t0", owner=owner)
    _one_line(f"{err.value}\n", "owner ")


@pytest.mark.parametrize("value", [10**5000, -(10**5000), "x" * 5000], ids=_id)
def test_a_huge_value_is_named_by_its_size_not_printed(value: object) -> None:
    with pytest.raises(InvalidSpec) as err:
        TapSpec("t0", mtu=value)  # type: ignore[arg-type]
    _one_line(f"{err.value}\n", "MTU ")


@pytest.mark.kernel
@pytest.mark.parametrize("option", ["--queues", "--mtu", "--owner", "--group"])
@pytest.mark.parametrize("text", ["²", "٣", LONG, " 4", "1_0"], ids=_id)
def test_bad_numbers_on_the_command_line_are_exit_2(ns: str, option: str, text: str) -> None:
    proc = vhostorch("tap", "create", "t0", option, text, "--netns", ns)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    _one_line(proc.stderr)
    assert "t0" not in links(ns)


def test_bad_numbers_for_other_commands_are_exit_2() -> None:
    for args in (["check", "--pid", "²"], ["check", "--pid", " 1_0"], ["check", "--pid", LONG]):
        proc = vhostorch(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        _one_line(proc.stderr)


def _toml(tmp: pathlib.Path, nic: str) -> str:
    path = tmp / "vm.toml"
    path.write_text(f'name = "vm1"\naccel = "tcg"\n[boot]\nkernel = "/k"\n[[nic]]\n{nic}\n')
    return str(path)


@pytest.mark.parametrize(
    "nic",
    [
        f"mtu = {LONG}",
        f"queues = {LONG}",
        f"mtu = 0x{'f' * 5000}",
        f"tap = 0x{'f' * 5000}",
        f"mac = 0x{'f' * 5000}",
        f"rx_queue_size = 0x{'f' * 5000}",
        f"vhost = 0x{'f' * 5000}",
        'owner = "²"',
        f'owner = "{LONG}"',
        "owner = 4294967295",
    ],
    ids=_id,
)
def test_bad_numbers_in_a_vm_spec_are_one_invalid_spec(tmp_path: pathlib.Path, nic: str) -> None:
    path = _toml(tmp_path, nic)
    with pytest.raises(InvalidSpec) as err:
        spec.load(path)
    _one_line(f"{err.value}\n", path)
    proc = vhostorch("up", path)
    assert proc.returncode == 2, proc.stderr
    _one_line(proc.stderr)


def test_full_range_ids_in_a_vm_spec(tmp_path: pathlib.Path) -> None:
    loaded = spec.load(_toml(tmp_path, "owner = 4294967294\ngroup = '2147483648'"))
    assert (loaded.nics[0].tap.owner, loaded.nics[0].tap.group) == (MAX_ID, 2**31)


def _domain(tap_attrs: str, queues: str = "1") -> str:
    return (
        f"<domain type='kvm'><name>d1</name><metadata><vhostorch:vm xmlns:vhostorch='{NAMESPACE}'>"
        f"<vhostorch:tap dev='vn0' {tap_attrs}/></vhostorch:vm></metadata><devices>"
        "<interface type='ethernet'><target dev='vn0' managed='no'/><model type='virtio'/>"
        f"<driver name='vhost' queues='{queues}'/></interface></devices></domain>"
    )


@pytest.mark.parametrize(
    ("attrs", "queues"),
    [
        ("mtu='²'", "1"),
        ("mtu='٣'", "1"),
        (f"mtu='{LONG}'", "1"),
        (f"owner='{LONG}'", "1"),
        ("owner='4294967295'", "1"),
        ("", LONG),
    ],
    ids=_id,
)
def test_bad_numbers_in_metadata_are_one_invalid_spec(attrs: str, queues: str) -> None:
    with pytest.raises(InvalidSpec) as err:
        metadata.parse(_domain(attrs, queues))
    _one_line(f"{err.value}\n", "")


@pytest.mark.kernel
@pytest.mark.parametrize("attrs", ["mtu='²'", f"mtu='{LONG}'", f"owner='{LONG}'"], ids=_id)
def test_the_hook_refuses_bad_numbers_with_exit_2(ns: str, attrs: str) -> None:
    places = Places(tempfile.mkdtemp(prefix="vho-num-"))
    err = io.StringIO()
    try:
        with netns.entered(ns):
            code = run_hook(
                ["d1", "prepare", "begin", "-"], io.BytesIO(_domain(attrs).encode()), err, places
            )
    finally:
        run("rm", "-rf", places.run)
    assert code == 2, err.getvalue()
    _one_line(err.getvalue(), "vhostorch hook: ")
    assert "vn0" not in links(ns)


def _kernel_ids(ns: str, tap: str) -> tuple[int, int]:
    """(owner, group) read by sysfs, after checking that `ip -j -d link` says the same
    (iproute2 shows a name instead of the number for an id that has one)."""
    info = link(ns, tap)["linkinfo"]["info_data"]
    owner, group = int(sysfs(ns, tap, "owner")), int(sysfs(ns, tap, "group"))
    assert info.get("user") in (owner, _name(pwd.getpwuid, owner)), info
    assert info.get("group") in (group, _name(grp.getgrgid, group)), info
    return owner, group


def _name(lookup: Callable[[int], Any], number: int) -> str | None:
    try:
        return str(lookup(number)[0])
    except KeyError:
        return None


@pytest.mark.kernel
@pytest.mark.parametrize("uid", IDS)
def test_tap_create_takes_the_kernels_whole_id_range(ns: str, uid: int) -> None:
    gid = MAX_ID - uid
    proc = vhostorch(
        "tap", "create", "t0", "--owner", str(uid), "--group", str(gid), "--netns", ns, "--json"
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["taps"][0]["action"] == "created"
    assert _kernel_ids(ns, "t0") == (uid, gid)
    # ensure compares what the kernel reports with what was asked: nothing to change.
    [again] = taps.ensure([TapSpec("t0", owner=uid, group=gid, netns=ns)])
    assert again.action == "unchanged", again
    # Changed in place (TUNSETOWNER on an existing tap) over the same range.
    [moved] = taps.ensure([TapSpec("t0", owner=gid, group=uid, netns=ns)])
    assert moved.action != "created"
    assert _kernel_ids(ns, "t0") == (gid, uid)


@pytest.mark.kernel
def test_no_owner_is_not_an_id(ns: str) -> None:
    proc = vhostorch("tap", "create", "t0", "--owner", "4294967295", "--netns", ns)
    assert proc.returncode == 2, proc.stderr
    _one_line(proc.stderr)
    assert "t0" not in links(ns)


@pytest.mark.kernel
def test_the_hook_makes_a_tap_for_the_largest_ids(ns: str) -> None:
    places = Places(tempfile.mkdtemp(prefix="vho-num-"))
    xml = _domain(f"owner='{MAX_ID}' group='{2**31}'")
    try:
        with netns.entered(ns):
            err = io.StringIO()
            code = run_hook(["d1", "prepare", "begin", "-"], io.BytesIO(xml.encode()), err, places)
            assert code == 0, err.getvalue()
            assert _kernel_ids(ns, "vn0") == (MAX_ID, 2**31)
            code = run_hook(["d1", "release", "end", "-"], io.BytesIO(b""), err, places)
            assert code == 0, err.getvalue()
        assert "vn0" not in links(ns)
    finally:
        run("rm", "-rf", places.run)
