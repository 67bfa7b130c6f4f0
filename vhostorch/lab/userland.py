"""The test host's userland: this machine's own root (the default), or a Debian release's root
made from Debian's archive, holding QEMU, libvirt, Python and a virtualenv of this checkout.

A release's root is made with ``debootstrap --variant=minbase``, then apt installs PACKAGES
(what scripts/setup.sh installs on a Debian machine). It is cached under the lab cache in a
directory named by the versions of every package installed in it; `lab build --userland`
asks the archive again (apt-get update in the root) and makes a new root when any package
has a newer version there. The virtualenv is made in the root's namespace at the checkout's
own path (its scripts and pyvenv.cfg name that path), vhostorch installed editable, so the
test host runs the checkout's code as it is; it is remade when pyproject.toml changes. In
the test host (files/stage2) that root is ``/``, and the working directory, the checkout
and the lab cache are this machine's, shown at their own paths, with the virtualenv as the
checkout's ``.venv``.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from vhostorch.errors import InvalidSpec, LabError
from vhostorch.lab.image import CACHE, DEFAULT_KERNEL, FILES, _digest, _read_first_line, _run, _say
from vhostorch.record import Record

# This machine's own root, shared read-only (what the test host boots when none is chosen).
DEFAULT_USERLAND = "default"
# Debian releases the test host can boot, each with the kernel series it boots by default:
# its own (Debian 13 ships Linux 6.12).
RELEASES = {"trixie": "6.12"}
# What scripts/setup.sh installs (tests/unit/lab/test_userland.py keeps the two lists alike),
# and ca-certificates, for pip. A root made with another list is made again.
PACKAGES = (
    "qemu-system-x86", "qemu-utils", "libvirt-daemon-system", "libvirt-dev", "pkg-config",
    "iproute2", "busybox-static", "cpio", "kmod", "strace", "python3", "python3-venv",
    "python3-dev", "python3-apt", "gcc", "debootstrap", "zstd", "xz-utils", "systemd", "git",
    "ca-certificates", "prometheus", "prometheus-node-exporter",
)  # fmt: skip
# The machine's CA bundle: pip in the root verifies TLS with it (the root's own bundle lacks
# whatever authority this machine adds), bound over the root's for the build only.
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
BUILD_SCRIPT = os.path.join(FILES, "userland-build")
_VENV_FORMAT = b"1"


class Userland(Record):
    """What the test host boots as its root, and the virtualenv it runs the checkout with."""

    name: str
    root: str  # "/" for this machine's own
    project: str = ""  # the checkout shown at its own path, its .venv being ``venv``
    venv: str = ""


def codename(os_release: str = "/etc/os-release") -> str:
    """This machine's release (VERSION_CODENAME: bookworm, trixie), "" when unknown."""
    try:
        with open(os_release) as f:
            fields = dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line)
    except OSError:
        return ""
    return fields.get("VERSION_CODENAME", "").strip('"')


def userland_name(value: str) -> str:
    """``value`` checked as a userland choice. Raises InvalidSpec."""
    if value != DEFAULT_USERLAND and value not in RELEASES:
        names = ", ".join([DEFAULT_USERLAND, *RELEASES])
        raise InvalidSpec(f"lab: --userland takes one of {names}, not {value!r}")
    return value


def default_kernel(name: str) -> str:
    """The kernel series a userland boots when none is chosen."""
    return RELEASES.get(name, DEFAULT_KERNEL)


def project() -> str:
    """The checkout this vhostorch runs from. Raises LabError when it runs from no checkout."""
    top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    top = os.path.dirname(top)
    if not os.path.exists(os.path.join(top, "pyproject.toml")):
        raise LabError(f"a Debian userland needs vhostorch run from its checkout: no "
                       f"pyproject.toml in {top}")  # fmt: skip
    # The path goes into overlay mount options (',' and ':' separate them) and shell words.
    if any(c.isspace() or c in ",:'\"\\" for c in top):
        raise LabError(f"the checkout's path {top!r} must not contain spaces, quotes, ',' or ':'")
    if top.split("/")[1] in ("proc", "sys", "dev"):
        raise LabError(f"the checkout's path {top!r} is under a kernel filesystem")
    return top


def _packages() -> str:
    return " ".join(sorted(set(PACKAGES)))


def _isolated(*args: str) -> list[str]:
    """The build script in its own mount namespace: what it mounts goes when it ends."""
    return ["unshare", "--mount", "--propagation", "private", "--fork", "--kill-child",
            "sh", BUILD_SCRIPT, *args]  # fmt: skip


def _versions(root: str) -> str:
    return _run(
        ["chroot", root, "dpkg-query", "-W", "-f", "${Package}=${Version}\\n"],
        "reading the userland's package versions",
    )


def _build_root(base: str, release: str, log: object) -> str:
    """Make a root of ``release``; return its key (a digest of its package versions)."""
    if shutil.which("debootstrap") is None:
        raise LabError("debootstrap is missing: install the Debian package debootstrap")
    os.makedirs(base, exist_ok=True)
    work = tempfile.mkdtemp(prefix="new.", dir=base)
    try:
        root = os.path.join(work, "root")
        _say(log, f"making a Debian {release} root with debootstrap (once per package versions)")
        _run(_isolated("root", release, root), f"debootstrap {release}")
        _say(log, f"installing {len(PACKAGES)} packages in the {release} root")
        _run(_isolated("packages", root, *PACKAGES), f"installing packages in the {release} root")
        # The list asked for is part of the key: a root of the same versions made from
        # another list (a package that came in as a dependency) is another root.
        key = _digest(_versions(root).encode(), _packages().encode())
        os.chmod(work, 0o755)  # mkdtemp made it 0700: the test host's QEMU reads it
        final = os.path.join(base, key)
        if not os.path.exists(os.path.join(final, ".complete")):
            with open(os.path.join(work, "packages"), "w") as f:
                f.write(_packages() + "\n")
            open(os.path.join(work, ".complete"), "w").close()
            shutil.rmtree(final, ignore_errors=True)
            os.rename(work, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return key


def _outdated(root: str, release: str) -> bool:
    """Whether the archive has a newer version of a package installed in ``root``."""
    _run(_isolated("update", root), f"apt-get update in the {release} root")
    plan = _run(
        ["chroot", root, "apt-get", "-s", "-o", "Debug::NoLocking=1", "dist-upgrade"],
        f"asking apt what is newer in the {release} root",
    )
    return any(line.startswith("Inst ") for line in plan.splitlines())


def _ensure_venv(keydir: str, checkout: str, release: str, log: object) -> str:
    with open(os.path.join(checkout, "pyproject.toml"), "rb") as f:
        key = _digest(f.read(), checkout.encode(), _VENV_FORMAT)
    venv = os.path.join(keydir, f"venv-{key}")
    if os.path.isdir(venv):
        return venv
    _say(log, f"making the {release} root's virtualenv of {checkout} (once per pyproject.toml)")
    work = tempfile.mkdtemp(prefix="venv.", dir=keydir)
    try:
        ca = CA_BUNDLE if os.path.exists(CA_BUNDLE) else ""
        _run(_isolated("venv", os.path.join(keydir, "root"), checkout, work, ca),
             f"making the virtualenv in the {release} root")  # fmt: skip
        os.chmod(work, 0o755)
        os.rename(work, venv)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return venv


def ensure_userland(
    name: str = DEFAULT_USERLAND, cache: str = CACHE, log: object = None, refresh: bool = False
) -> Userland:
    """The userland ``name``, made if it is not cached; with ``refresh``, made again when the
    archive has newer packages. Raises InvalidSpec, LabError."""
    userland_name(name)
    if name == DEFAULT_USERLAND:
        return Userland(name, "/")
    checkout = project()
    base = os.path.join(cache, "lab", "userland", name)
    current = os.path.join(base, "current")
    key = _read_first_line(current)
    keydir = os.path.join(base, key)
    if not key or not os.path.exists(os.path.join(keydir, ".complete")):
        key = ""
    elif _read_first_line(os.path.join(keydir, "packages")) != _packages():
        _say(log, f"the {name} root was made with another package list")
        key = ""
    elif refresh and _outdated(os.path.join(keydir, "root"), name):
        _say(log, f"the archive has newer packages for the {name} root")
        key = ""
    if not key:
        key = _build_root(base, name, log)
        with open(current + ".part", "w") as f:
            f.write(key + "\n")
        os.replace(current + ".part", current)
        keydir = os.path.join(base, key)
    venv = _ensure_venv(keydir, checkout, name, log)
    return Userland(name, os.path.join(keydir, "root"), checkout, venv)


def chrooted(userland: Userland, *argv: str) -> list[str]:
    """The command line that runs ``argv`` as root in the checkout, chrooted into a throwaway
    copy of ``userland``'s root on this machine's kernel: the release's Python, QEMU and
    libvirt without booting the test host (tests/kernel/test_userland_python.py,
    tests/testhost/test_demo.py). Its /var/cache/vhostorch is kept beside the release's roots,
    so that its own test host's kernel is fetched once."""
    if userland.root == "/":
        return list(argv)
    keydir = os.path.dirname(userland.root)
    cache = os.path.join(os.path.dirname(keydir), "machine-cache")
    return _isolated("run", userland.root, userland.project, userland.venv, cache, *argv)
