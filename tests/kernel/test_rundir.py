"""The run directory's modes, whichever command makes it first (issue 19, item 2).

A fresh boot is a private mount namespace with an empty tmpfs on /run, inside a throwaway
network namespace: there the hook (the installed program, as libvirt runs it), `up` (a real
QEMU under TCG, as libvirt's QEMU user) and `tap create`/`tap delete` run as on a host,
under umask 077 and 000, and the directories they leave are listed with `find`. Nothing
outlives the namespace but what each script takes down itself.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support import kernel
from tests.support.guests import tcg_spec
from tests.support.hook import HOOK, domain
from tests.support.kernel import EXE
from vhostorch import taps

pytestmark = pytest.mark.kernel


# --- item 2: one mode per run directory, whichever command makes it first ------------------

# The one mode of each (vhostorch.rundir), written out: the test's own oracle.
MODES = {
    "/run/vhostorch": 0o755,
    "/run/vhostorch/vms": 0o711,
    "/run/vhostorch/hook": 0o755,
    "/run/vhostorch/hook/taps": 0o700,
    "/run/vhostorch/hook/taps/.claims-being-made": 0o700,
    "/run/vhostorch/taps": 0o700,
}


def fresh_boot(ns: str, script: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``script`` (sh -e) in network namespace ``ns`` with an empty /run of its own, as on
    a fresh boot; it ends with every directory under /run/vhostorch listed (mode, owner)."""
    body = f"mount -t tmpfs -o mode=0755 vho-priv-run /run\n{script}\n" + (
        "find /run/vhostorch -type d -printf '%m %u %p\\n' > \"$LISTING\"\n"
        if "LISTING" in env
        else ""
    )
    return subprocess.run(
        ["ip", "netns", "exec", ns, "unshare", "--mount", "--propagation", "private",
         "sh", "-ec", body],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, **env},
    )  # fmt: skip


def _listing(path: str) -> dict[str, tuple[str, str]]:
    with open(path) as f:
        return {p: (m, u) for m, u, p in (line.split(" ", 2) for line in f.read().splitlines())}


# What each command does first (under the umask tried) and undoes at the end.
MAKE = {
    "hook": '"$HOOK" "$DOMAIN" prepare begin - < "$XML"',
    "up": '"$EXE" up "$SPEC" --wait 0 > /dev/null',
    "tap": '"$EXE" tap create "$TAP3" > /dev/null && "$EXE" tap delete "$TAP3" > /dev/null',
}
UNDO = {
    "hook": '"$HOOK" "$DOMAIN" release end - < /dev/null',
    "up": '"$EXE" down "$NAME" > /dev/null',
    "tap": "true",
}


@pytest.mark.parametrize("umask", ["077", "000"])
@pytest.mark.parametrize("first", ["hook", "up", "tap"])
def test_every_run_directory_has_its_mode_whichever_command_makes_it_first(
    first: str, umask: str, ns: str, specs: str
) -> None:
    """On a fresh boot, the hook's prepare under umask 077 made /run/vhostorch 0700 and every
    `up` after it failed (QEMU's user could not reach its work directory); under umask 000,
    hook/ and hook/taps/ came out 0777 (anyone could plant or delete claims)."""
    name, tap, tap2, tap3 = (kernel.unique(p) for p in ("vho-rd", "vra", "vrb", "vrc"))
    dom = kernel.unique("vho-dom")
    xml = os.path.join(specs, "domain.xml")
    with open(xml, "w") as f:
        f.write(domain(dom, [(tap2, 1)], f"<vhostorch:tap dev='{tap2}'/>"))
    order = [first, *(c for c in MAKE if c != first)]
    script = "\n".join(
        [f"umask {umask}", MAKE[first], "umask 022", *(MAKE[c] for c in order[1:]),
         *(UNDO[c] for c in reversed(order))]
    )  # fmt: skip
    listing = os.path.join(specs, "listing")
    done = fresh_boot(
        ns, script, EXE=EXE, HOOK=HOOK, SPEC=tcg_spec(specs, name, tap), NAME=name, DOMAIN=dom,
        XML=xml, TAP3=tap3, LISTING=listing,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    found = _listing(listing)
    assert found == {p: (f"{m:o}", "root") for p, m in MODES.items()}, found
    assert {t.name for t in taps.show(netns=ns)} == set()


# The levels added since (issues 22, 23), made first by what makes them: `pin` records a pin,
# `check` caches the live reader's offsets. Python's calls, as `pin` needs a QEMU with vhost
# workers and the cache a kernel with BTF and vhost; the directory code is what is proved.
FIRST_LEVEL = {
    "pins": "from vhostorch import pins; pins.save(pins.Pin(1, 1, '0', 'vhostorch pin', None))",
    "btf": "from vhostorch.kernel import btf; assert btf._own_directory(btf.CACHE_DIR)",
}


@pytest.mark.parametrize("umask", ["077", "000"])
@pytest.mark.parametrize("level", sorted(FIRST_LEVEL))
def test_the_later_run_directories_have_their_mode_when_made_first(
    level: str, umask: str, ns: str, specs: str
) -> None:
    """/run/vhostorch/pins and /run/vhostorch/btf made first on a fresh boot, under umask 077
    and 000: each 0700, root's, and /run/vhostorch 0755 (QEMU's user must still reach vms/)."""
    listing = os.path.join(specs, "listing")
    code = FIRST_LEVEL[level]
    done = fresh_boot(ns, f'umask {umask}\n"$PY" -c "{code}"', PY=sys.executable, LISTING=listing)
    assert done.returncode == 0, done.stderr
    assert _listing(listing) == {
        "/run/vhostorch": ("755", "root"),
        f"/run/vhostorch/{level}": ("700", "root"),
    }


REFUSED = {
    "symlink": ('ln -s "$TARGET" /run/vhostorch', "/run/vhostorch is a symlink"),
    "other's": (
        "mkdir /run/vhostorch && chown nobody /run/vhostorch",
        "/run/vhostorch is owned by uid 65534",
    ),
    "writable": ("mkdir -p -m 777 /run/vhostorch/vms", "/run/vhostorch/vms can be written by"),
    "hook writable": (
        "mkdir -p /run/vhostorch/hook/taps && chmod 777 /run/vhostorch/hook/taps",
        "/run/vhostorch/hook/taps can be written by",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_run_directory_others_can_change_is_refused_in_one_line(
    case: str, ns: str, specs: str
) -> None:
    plant, message = REFUSED[case]
    dom, tap = kernel.unique("vho-dom"), kernel.unique("vrf")
    xml = os.path.join(specs, "domain.xml")
    with open(xml, "w") as f:
        f.write(domain(dom, [(tap, 1)], f"<vhostorch:tap dev='{tap}'/>"))
    command = (
        '"$HOOK" "$DOMAIN" prepare begin - < "$XML"' if case == "hook writable"
        else '"$EXE" down vho-nothing'
    )  # fmt: skip
    script = f'{plant}\nset +e\n{command} 2> "$ERR"\necho $? > "$CODE"'
    err, code, target = (os.path.join(specs, n) for n in ("err", "code", "target"))
    os.mkdir(target)
    done = fresh_boot(
        ns, script, EXE=EXE, HOOK=HOOK, DOMAIN=dom, XML=xml, ERR=err, CODE=code, TARGET=target
    )
    assert done.returncode == 0, done.stderr
    with open(err) as f:
        said = f.read()
    with open(code) as f:
        assert f.read().strip() == "1", said
    assert said.count("\n") == 1 and message in said and "refusing" in said, said
    assert os.listdir(target) == []  # nothing made through the link
    assert {t.name for t in taps.show(netns=ns)} == set()


def test_a_run_directory_an_older_version_made_0700_is_given_its_mode(ns: str, specs: str) -> None:
    name, tap = kernel.unique("vho-hl"), kernel.unique("vhl")
    script = (
        "mkdir -m 700 /run/vhostorch\n"
        '"$EXE" up "$SPEC" --wait 0 > /dev/null\n"$EXE" down "$NAME" > /dev/null'
    )
    listing = os.path.join(specs, "listing")
    done = fresh_boot(
        ns, script, EXE=EXE, SPEC=tcg_spec(specs, name, tap), NAME=name, LISTING=listing
    )
    assert done.returncode == 0, done.stderr
    found = _listing(listing)
    assert found["/run/vhostorch"] == ("755", "root")
    assert found["/run/vhostorch/vms"] == ("711", "root")


@pytest.mark.parametrize("command", ["down", "hook prepare"])
def test_a_fifo_planted_in_a_claims_directory_others_could_write_hangs_nothing(
    command: str, ns: str, specs: str
) -> None:
    """An older version under umask 000 left hook/taps/ writable by all: any user could put a
    FIFO at a claim's name, and `down` (releasing its VM's claim) or the hook's prepare
    (asking who holds a declared tap) blocked for ever opening it."""
    name, tap, tap2 = kernel.unique("vho-ff"), kernel.unique("vfa"), kernel.unique("vfb")
    dom = kernel.unique("vho-dom")
    xml = os.path.join(specs, "domain.xml")
    with open(xml, "w") as f:
        f.write(domain(dom, [(tap2, 1)], f"<vhostorch:tap dev='{tap2}'/>"))
    fifo = tap if command == "down" else tap2
    run = (
        'timeout 20 "$EXE" down "$NAME"' if command == "down"
        else 'timeout 20 "$HOOK" "$DOMAIN" prepare begin - < "$XML"'
    )  # fmt: skip
    script = "\n".join([
        '"$EXE" up "$SPEC" --wait 0 > /dev/null',
        "chmod 777 /run/vhostorch/hook/taps",  # as the older version made it
        "setpriv --reuid=nobody --regid=nogroup --clear-groups sh -ec"
        f' "cd /run/vhostorch/hook/taps; rm -f {fifo}; mkfifo {fifo}"',
        "set +e", f'{run} 2> "$ERR"; echo $? > "$CODE"', "set -e",
        "chmod 700 /run/vhostorch/hook/taps", f"rm -f /run/vhostorch/hook/taps/{fifo}",
        '"$EXE" down "$NAME" > /dev/null', '"$HOOK" "$DOMAIN" release end - < /dev/null',
    ])  # fmt: skip
    err, code = os.path.join(specs, "err"), os.path.join(specs, "code")
    done = fresh_boot(
        ns, script, EXE=EXE, HOOK=HOOK, SPEC=tcg_spec(specs, name, tap), NAME=name, DOMAIN=dom,
        XML=xml, ERR=err, CODE=code,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    with open(err) as f:
        said = f.read()
    with open(code) as f:
        assert f.read().strip() == "1", said  # 124: it hung until `timeout` killed it
    assert said.count("\n") == 1 and "can be written by others" in said, said
    assert {t.name for t in taps.show(netns=ns)} == set()


# --- rundir.ensure itself, in a directory of the test's own ---------------------------------


@pytest.mark.parametrize("umask", [0o077, 0o000, 0o022])
def test_ensure_gives_each_level_its_mode_whatever_the_umask(umask: int, specs: str) -> None:
    from vhostorch import rundir

    claims = os.path.join(specs, "run", "hook", "taps")
    old = os.umask(umask)
    try:
        rundir.ensure(claims, 0o700, 0o755, 0o711)
    finally:
        os.umask(old)
    modes = {p: os.stat(os.path.join(specs, p)).st_mode & 0o7777 for p in
             ("run", "run/hook", "run/hook/taps")}  # fmt: skip
    assert modes == {"run": 0o711, "run/hook": 0o755, "run/hook/taps": 0o700}


def test_ensure_refuses_what_others_can_change_and_heals_a_mode_of_its_own(specs: str) -> None:
    import pwd

    from vhostorch import rundir
    from vhostorch.errors import OperationFailed

    run = os.path.join(specs, "run")
    os.mkdir(run, 0o700)
    rundir.ensure(run, 0o755)  # root's, another mode: given its own
    assert os.stat(run).st_mode & 0o7777 == 0o755
    nobody = pwd.getpwnam("nobody")
    os.chown(run, nobody.pw_uid, nobody.pw_gid)
    with pytest.raises(OperationFailed, match=f"{run} is owned by uid {nobody.pw_uid}"):
        rundir.ensure(os.path.join(run, "vms"), 0o711, 0o755)
    assert not os.path.exists(os.path.join(run, "vms"))  # nothing made in it
    os.chown(run, 0, 0)
    os.chmod(run, 0o1777)  # sticky does not make a level of the run directory safe
    with pytest.raises(OperationFailed, match="can be written by others"):
        rundir.ensure(run, 0o755)
    os.chmod(run, 0o755)
    os.symlink(run, os.path.join(specs, "link"))
    with pytest.raises(OperationFailed, match="is a symlink or not a directory"):
        rundir.ensure(os.path.join(specs, "link", "vms"), 0o711, 0o755)
    # Above the levels, a sticky directory writable by all (/tmp) is fine.
    sticky = os.path.join(specs, "tmp")
    os.mkdir(sticky)
    os.chmod(sticky, 0o1777)
    rundir.ensure(os.path.join(sticky, "run"), 0o755)
