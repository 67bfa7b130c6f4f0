"""What the README's set-up installed works: libvirt-python against the running libvirtd,
qemu.qmp, and QEMU itself."""

from __future__ import annotations

import asyncio
import pathlib
import shutil
import subprocess
import time


def test_libvirt_python_talks_to_libvirtd(libvirtd: str) -> None:
    import libvirt

    conn = libvirt.open(libvirtd)
    try:
        caps = conn.getCapabilities()
    finally:
        conn.close()
    assert "<arch name='x86_64'>" in caps
    assert "<domain type='qemu'" in caps


def test_qmp_library_talks_to_this_qemu(tmp_path: pathlib.Path) -> None:
    """QEMU with no machine, asked its version over QMP by qemu.qmp, then told to quit."""
    from qemu.qmp import QMPClient

    qemu = shutil.which("qemu-system-x86_64")
    assert qemu is not None
    banner = subprocess.run([qemu, "-version"], capture_output=True, text=True, check=True).stdout
    sock = tmp_path / "qmp.sock"
    proc = subprocess.Popen(
        [
            qemu,
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-qmp",
            f"unix:{sock},server=on,wait=off",
        ]
    )
    try:
        deadline = time.monotonic() + 20
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)

        async def ask() -> dict[str, object]:
            client = QMPClient("install-test")
            await client.connect(str(sock))
            try:
                version = await client.execute("query-version")
                try:
                    await client.execute("quit")
                except EOFError:
                    pass  # QEMU may close the socket before its reply to quit is read
            finally:
                try:
                    await client.disconnect()
                except EOFError:
                    pass  # the same race, reported again by disconnect
            assert isinstance(version, dict)
            return version

        version = asyncio.run(ask())
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()  # our own child
            proc.wait()
    q = version["qemu"]
    assert isinstance(q, dict)
    assert f"version {q['major']}.{q['minor']}.{q['micro']}" in banner
