"""The test host's boot files: a stock Debian kernel and two small initramfs images, cached.

The kernel is Debian's linux-image-amd64 (fetched with `apt-get download`,
unpacked with `dpkg -x`, never installed). The cache is keyed by kernel
version; each initramfs is rebuilt only when one of its inputs (init script,
busybox, module list) changes.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import shutil
import subprocess
import tempfile

# The error raised here, also importable from here (the tree is in vhostorch.errors).
from vhostorch.errors import LabError as LabError
from vhostorch.record import Record

CACHE = os.environ.get("VHOSTORCH_CACHE", "/var/cache/vhostorch")
FILES = os.path.join(os.path.dirname(__file__), "files")
BUSYBOX = "/bin/busybox"
META_PACKAGE = "linux-image-amd64"
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


def _kernel_package() -> str | None:
    try:
        out = subprocess.run(
            ["apt-cache", "depends", META_PACKAGE], capture_output=True, text=True, check=False
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


def _cached_kernels(base: str) -> list[str]:
    if not os.path.isdir(base):
        return []
    return sorted(k for k in os.listdir(base) if os.path.exists(os.path.join(base, k, ".complete")))


def _fetch_kernel(base: str, log: object) -> str:
    """Return the kernel version, fetching and unpacking its package if it is not cached."""
    package = _kernel_package()
    if package is None:
        _run(["apt-get", "update", "-qq"], "apt-get update")
        package = _kernel_package()
    if package is None:
        cached = _cached_kernels(base)
        if cached:
            return cached[-1]
        raise LabError(f"kernel package not obtainable: apt knows no {META_PACKAGE}")
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
        _run(["depmod", "-b", root, kver], "depmod")
        os.unlink(os.path.join(work, debs[0]))
        open(os.path.join(work, ".complete"), "w").close()
        shutil.rmtree(final, ignore_errors=True)
        os.rename(work, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return kver


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


def initramfs(
    root: str, kver: str, init: str, modules: tuple[str, ...], out_dir: str, stem: str, log: object
) -> str:
    """Build (or reuse) a gzip'd newc cpio with busybox, ``init`` and ``modules``."""
    with open(os.path.join(FILES, init), "rb") as f:
        init_text = f.read()
    with open(BUSYBOX, "rb") as f:
        busybox = f.read()
    files = _modules(root, kver, modules)
    key = _digest(init_text, busybox, "\n".join(files).encode(), kver.encode())
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


def _vmlinux(bzimage: str, kdir: str) -> str:
    """The uncompressed ELF kernel, booted through its PVH entry point.

    Under TCG, SeaBIOS plus decompressing Debian's xz bzImage took about 6 s of
    a 15 s boot; QEMU loads an ELF vmlinux with a PVH note directly. Falls back
    to the bzImage when its payload is not xz (the stdlib has no zstd).
    """
    target = os.path.join(kdir, "vmlinux")
    if os.path.exists(target):
        return target
    with open(bzimage, "rb") as f:
        data = f.read()
    start = data.find(b"\xfd7zXZ\x00")
    if start < 0:
        return bzimage
    try:
        elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[start:])
    except lzma.LZMAError:
        return bzimage
    if not elf.startswith(b"\x7fELF"):
        return bzimage
    with open(target + ".part", "wb") as f:
        f.write(elf)
    os.rename(target + ".part", target)
    return target


def _say(log: object, message: str) -> None:
    if callable(log):
        log(f"vhostorch lab: {message}")


def ensure_image(cache: str = CACHE, log: object = None) -> Image:
    """Fetch and build what is missing; return the paths. Raises LabError."""
    given = os.environ.get(IMAGE_ENV)
    if given:
        # Inside the test host: the image it booted from (asking apt over 9p takes seconds).
        import json

        image = Image(**json.loads(given))
        if all(os.path.exists(p) for p in (image.kernel, image.host_initrd, image.guest_initrd)):
            return image
    for tool, package in (("cpio", "cpio"), ("depmod", "kmod"), (BUSYBOX, "busybox-static")):
        if shutil.which(tool) is None and not os.path.exists(tool):
            raise LabError(f"{tool} is missing: install the Debian package {package}")
    base = os.path.join(cache, "lab")
    kver = _fetch_kernel(base, log)
    kdir = os.path.join(base, kver)
    os.chmod(kdir, 0o755)  # mkdtemp made it 0700; QEMU run by libvirt (libvirt-qemu) reads it
    root = os.path.join(kdir, "root")
    kernel = _vmlinux(os.path.join(root, "boot", f"vmlinuz-{kver}"), kdir)
    host = initramfs(root, kver, "host-init", HOST_MODULES, kdir, "host", log)
    guest = initramfs(root, kver, "guest-init", GUEST_MODULES, kdir, "guest", log)
    return Image(kver, root, kernel, host, guest)
