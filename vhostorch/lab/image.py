"""The test host's boot files: a stock Debian kernel and two small initramfs images, cached.

The kernel is Debian's linux-image-amd64 by default, or the newest package of a
chosen series (``6.12``: what ``linux-image-6.12-amd64`` depends on), fetched
with `apt-get download`, unpacked with `dpkg -x`, never installed. The cache is
keyed by kernel version; each initramfs is rebuilt only when one of its inputs
(init script, busybox, module list) changes.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import shutil
import struct
import subprocess
import tempfile

# The error raised here, also importable from here (the tree is in vhostorch.errors).
from vhostorch.errors import InvalidSpec
from vhostorch.errors import LabError as LabError
from vhostorch.record import Record

CACHE = os.environ.get("VHOSTORCH_CACHE", "/var/cache/vhostorch")
FILES = os.path.join(os.path.dirname(__file__), "files")
BUSYBOX = "/bin/busybox"
META_PACKAGE = "linux-image-amd64"
# The kernel a test host boots when none is chosen: whatever META_PACKAGE depends on.
DEFAULT_KERNEL = "default"
# What the test host needs before it can reach this machine's root.
HOST_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
GUEST_MODULES = ("virtio_pci", "virtio_net")
IMAGE_ENV = "VHOSTORCH_LAB_IMAGE"
# Kernel command line for guests started inside the test host. Under nested
# KVM on TCG every port I/O exit is dear: pci=noearly and iommu=noaperture
# skip early PCI and AMD GART scans (3 s), cryptomgr.notests the self-tests.
GUEST_APPEND = "console=ttyS0 quiet panic=-1 cryptomgr.notests pci=noearly iommu=noaperture"


class Image(Record):
    """Everything needed to boot the test host and the guests inside it."""

    kver: str
    root: str
    kernel: str
    host_initrd: str
    guest_initrd: str


def _run(cmd: list[str], what: str) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise LabError(f"{what}: {cmd[0]} is not installed") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise LabError(f"{what}: {detail[-1] if detail else f'exit {done.returncode}'}")
    return done.stdout


def kernel_series(value: str) -> str:
    """``value`` checked as a kernel choice: DEFAULT_KERNEL or a series such as ``6.12``.

    Raises InvalidSpec.
    """
    major, dot, minor = value.partition(".")
    ok = dot and all(p.isascii() and p.isdigit() and len(p) <= 4 for p in (major, minor))
    if value != DEFAULT_KERNEL and not ok:
        raise InvalidSpec(
            f"lab: --kernel takes a series such as 6.12 or {DEFAULT_KERNEL!r}, not {value!r}"
        )
    return value


def _depends(meta: str) -> str | None:
    """The versioned linux-image package ``meta`` depends on, if apt knows ``meta``."""
    try:
        out = subprocess.run(
            ["apt-cache", "depends", meta], capture_output=True, text=True, check=False
        ).stdout
    except FileNotFoundError:
        return None
    for line in out.splitlines():
        parts = line.split()
        if (
            len(parts) == 2
            and parts[0] == "Depends:"
            and parts[1][len("linux-image-") :][:1].isdigit()
        ):
            return parts[1]
    return None


def _in_series(kver: str, series: str) -> bool:
    return series == DEFAULT_KERNEL or kver.startswith(f"{series}.")


def _kernel_package(series: str) -> str | None:
    """The package to fetch: the default meta package's kernel when it is of ``series``
    (Debian 12 has no linux-image-6.1-amd64: 6.1 is its default), else the newest of
    the series as its own meta package names it (linux-image-6.12-amd64 depends on
    linux-image-6.12.N+deb12-amd64)."""
    package = _depends(META_PACKAGE)
    if package is not None and _in_series(package.removeprefix("linux-image-"), series):
        return package
    if series == DEFAULT_KERNEL:
        return None
    return _depends(f"linux-image-{series}-amd64")


def _cached_kernels(base: str) -> list[str]:
    if not os.path.isdir(base):
        return []
    return sorted(k for k in os.listdir(base) if os.path.exists(os.path.join(base, k, ".complete")))


def _fetch_kernel(base: str, log: object, series: str = DEFAULT_KERNEL) -> str:
    """Return the kernel version, fetching and unpacking its package if it is not cached."""
    package = _kernel_package(series)
    if package is None and _depends(META_PACKAGE) is None:
        # apt's lists are missing (a fresh machine): a series apt does know of is simply
        # not in the archive, and asking again after an update would not change that.
        _run(["apt-get", "update", "-qq"], "apt-get update")
        package = _kernel_package(series)
    if package is None:
        if series == DEFAULT_KERNEL:
            # Not the newest cached: with 6.12 fetched too, that would be another default.
            remembered = _read_first_line(os.path.join(base, "default"))
            cached = [k for k in _cached_kernels(base) if k == remembered]
        else:
            cached = [k for k in _cached_kernels(base) if _in_series(k, series)]
        if cached:
            return cached[-1]
        if series == DEFAULT_KERNEL:
            raise LabError(f"kernel package not obtainable: apt knows no {META_PACKAGE}")
        raise LabError(
            f"kernel package not obtainable: apt knows no Linux {series} "
            f"(neither {META_PACKAGE} nor linux-image-{series}-amd64 gives one)"
        )
    kver = package.removeprefix("linux-image-")
    final = os.path.join(base, kver)
    if os.path.exists(os.path.join(final, ".complete")):
        return kver
    os.makedirs(base, exist_ok=True)
    _say(log, f"fetching {package} (once per kernel version)")
    work = tempfile.mkdtemp(prefix=f"{kver}.", dir=base)
    try:
        _download(package, work)
        debs = [f for f in os.listdir(work) if f.endswith(".deb")]
        if not debs:
            raise LabError(
                f"kernel package not obtainable: apt-get download {package} gave no file"
            )
        root = os.path.join(work, "root")
        _run(["dpkg-deb", "-x", os.path.join(work, debs[0]), root], "unpacking the kernel")
        # Debian 13's kernel packages hold their modules in /usr/lib/modules (merged /usr)
        # where kmod (34 there, 30 in Debian 12) reads ROOT/lib/modules: lib is made the
        # link a merged-/usr system has.
        lib = os.path.join(root, "lib")
        if not os.path.lexists(lib) and os.path.isdir(os.path.join(root, "usr", "lib", "modules")):
            os.symlink("usr/lib", lib)
        _run(["depmod", "-b", root, kver], "depmod")
        os.unlink(os.path.join(work, debs[0]))
        open(os.path.join(work, ".complete"), "w").close()
        shutil.rmtree(final, ignore_errors=True)
        os.rename(work, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return kver


def _remember_default(base: str, kver: str) -> None:
    path = os.path.join(base, "default")
    if _read_first_line(path) != kver:
        with open(path + ".part", "w") as f:
            f.write(kver + "\n")
        os.replace(path + ".part", path)


def _read_first_line(path: str) -> str:
    try:
        with open(path) as f:
            return f.readline().strip()
    except OSError:
        return ""


def _download(package: str, into: str) -> None:
    """apt-get download writes into its working directory."""
    done = subprocess.run(
        ["apt-get", "download", package], cwd=into, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise LabError(f"kernel package not obtainable ({package}): {lines[-1] if lines else ''}")


def _modules(root: str, kver: str, names: tuple[str, ...]) -> list[str]:
    """Module files to insmod, dependencies first, as kmod resolves them."""
    out = _run(
        ["modprobe", "-a", "--show-depends", "-d", root, "-S", kver, *names],
        "resolving kernel modules",
    )
    found: list[str] = []
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] == "insmod" and parts[1] not in found:
            found.append(parts[1])
    return found


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


# Part of each initramfs's name: changed when the way it is built changes (modules unpacked).
_FORMAT = b"2"


def initramfs(
    root: str, kver: str, init: str, modules: tuple[str, ...], out_dir: str, stem: str, log: object
) -> str:
    """Build (or reuse) a gzip'd newc cpio with busybox, ``init`` and ``modules``."""
    with open(os.path.join(FILES, init), "rb") as f:
        init_text = f.read()
    with open(BUSYBOX, "rb") as f:
        busybox = f.read()
    files = _modules(root, kver, modules)
    key = _digest(init_text, busybox, "\n".join(files).encode(), kver.encode(), _FORMAT)
    target = os.path.join(out_dir, f"{stem}-{key}.cpio.gz")
    if os.path.exists(target):
        return target
    _say(log, f"building {stem} initramfs")
    stage = tempfile.mkdtemp(prefix=f"{stem}.", dir=out_dir)
    try:
        os.makedirs(os.path.join(stage, "bin"))
        os.makedirs(os.path.join(stage, "modules"))
        shutil.copy2(BUSYBOX, os.path.join(stage, "bin", "busybox"))
        with open(os.path.join(stage, "init"), "wb") as f:
            f.write(init_text)
        os.chmod(os.path.join(stage, "init"), 0o755)
        inside = []
        for path in files:
            name = os.path.basename(path)
            if name.endswith(".ko.xz"):
                # Debian's 6.12 ships its modules xz-compressed (6.1's are plain .ko).
                # busybox insmod first hands the file as it is to init_module, which logs
                # "Invalid ELF header magic" for each, and only then unpacks it itself.
                name = name.removesuffix(".xz")
                with lzma.open(path) as src, open(os.path.join(stage, "modules", name), "wb") as d:
                    shutil.copyfileobj(src, d)
            else:
                shutil.copy2(path, os.path.join(stage, "modules", name))
            inside.append(f"/modules/{name}")
        with open(os.path.join(stage, "modules.list"), "w") as f:
            f.write("\n".join(inside) + "\n")
        names = []
        for dirpath, dirnames, filenames in os.walk(stage):
            rel = os.path.relpath(dirpath, stage)
            names += [os.path.normpath(os.path.join(rel, n)) for n in dirnames + filenames]
        archive = subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet", "-R", "0:0"],
            cwd=stage,
            input="\n".join(names).encode(),
            capture_output=True,
            check=False,
        )
        if archive.returncode != 0:
            raise LabError(f"building the {stem} initramfs: {archive.stderr.decode().strip()}")
        partial = target + ".part"
        with gzip.open(partial, "wb", compresslevel=1) as f:
            f.write(archive.stdout)
        os.rename(partial, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return target


# The x86 boot protocol's header (Documentation/arch/x86/boot.rst): setup_sects at
# 0x1f1 (0 means 4), payload_offset and payload_length at 0x248, counted from the
# protected-mode code, which follows the setup sectors and the boot sector.
_SETUP_SECTS, _PAYLOAD = 0x1F1, 0x248
_XZ, _ZSTD = b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd"


def _payload(bzimage: bytes) -> bytes:
    """The compressed kernel inside a bzImage (empty when the header does not say)."""
    if len(bzimage) < _PAYLOAD + 8:
        return b""
    offset, length = struct.unpack_from("<II", bzimage, _PAYLOAD)
    start = ((bzimage[_SETUP_SECTS] or 4) + 1) * 512 + offset
    return bzimage[start : start + length]


def _decompress(payload: bytes) -> bytes:
    """The ELF kernel in ``payload`` (empty when it cannot be had here)."""
    if payload.startswith(_XZ):  # Debian's 6.1
        try:
            return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
        except lzma.LZMAError:
            return b""
    if payload.startswith(_ZSTD) and shutil.which("zstd"):
        # Debian's 6.12 is zstd, which the stdlib lacks before Python 3.14. The payload
        # ends with the 4-byte decompressed size the kernel's build appends (size_append),
        # which zstd would take for a second, unknown frame.
        done = subprocess.run(
            ["zstd", "-dcq"], input=payload[:-4], capture_output=True, check=False
        )
        return done.stdout if done.returncode == 0 else b""
    return b""


def _vmlinux(bzimage: str, kdir: str) -> str:
    """The uncompressed ELF kernel, booted through its PVH entry point.

    Under TCG, SeaBIOS plus decompressing Debian's xz bzImage took about 6 s of
    a 15 s boot; QEMU loads an ELF vmlinux with a PVH note directly. Falls back
    to the bzImage when its payload is neither xz nor zstd with the zstd program
    installed.
    """
    target = os.path.join(kdir, "vmlinux")
    if os.path.exists(target):
        return target
    with open(bzimage, "rb") as f:
        elf = _decompress(_payload(f.read()))
    if not elf.startswith(b"\x7fELF"):
        return bzimage
    with open(target + ".part", "wb") as f:
        f.write(elf)
    os.rename(target + ".part", target)
    return target


def _say(log: object, message: str) -> None:
    if callable(log):
        log(f"vhostorch lab: {message}")


def ensure_image(cache: str = CACHE, log: object = None, kernel: str = DEFAULT_KERNEL) -> Image:
    """Fetch and build what is missing for ``kernel`` (a series such as ``6.12``, or
    DEFAULT_KERNEL); return the paths. Raises LabError, InvalidSpec."""
    kernel_series(kernel)
    given = os.environ.get(IMAGE_ENV)
    if given:
        # Inside the test host: the image it booted from (asking apt over 9p takes seconds).
        import json

        image = Image(**json.loads(given))
        files = (image.kernel, image.host_initrd, image.guest_initrd)
        if _in_series(image.kver, kernel) and all(os.path.exists(p) for p in files):
            return image
    for tool, package in (("cpio", "cpio"), ("depmod", "kmod"), (BUSYBOX, "busybox-static")):
        if shutil.which(tool) is None and not os.path.exists(tool):
            raise LabError(f"{tool} is missing: install the Debian package {package}")
    base = os.path.join(cache, "lab")
    kver = _fetch_kernel(base, log, kernel)
    if kernel == DEFAULT_KERNEL:
        _remember_default(base, kver)
    kdir = os.path.join(base, kver)
    os.chmod(kdir, 0o755)  # mkdtemp made it 0700; QEMU run by libvirt (libvirt-qemu) reads it
    root = os.path.join(kdir, "root")
    kernel = _vmlinux(os.path.join(root, "boot", f"vmlinuz-{kver}"), kdir)
    host = initramfs(root, kver, "host-init", HOST_MODULES, kdir, "host", log)
    guest = initramfs(root, kver, "guest-init", GUEST_MODULES, kdir, "guest", log)
    return Image(kver, root, kernel, host, guest)
