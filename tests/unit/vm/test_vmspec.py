"""VM specs from TOML: what loads, what is refused (one line, naming the field), and defaults."""

from __future__ import annotations

import os
import pathlib
import re
import signal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vhostorch.errors import InvalidSpec
from vhostorch.vm import spec

FULL = """
name = "vm1"
memory = 1024
cpus = 2
machine = "q35"
accel = "kvm"

[boot]
kernel = "/srv/vm1/vmlinuz"
initrd = "/srv/vm1/initrd.img"
cmdline = "console=ttyS0 quiet"

[[nic]]
tap = "vm1-net0"
queues = 4
vhost = "required"
mac = "52:54:00:AB:cd:01"
bridge = "br0"
mtu = 9000
owner = "libvirt-qemu"
rx_queue_size = 1024
tx_queue_size = 256

[[nic]]
vhost = "preferred"
"""


def write(tmp_path: pathlib.Path, text: str) -> str:
    path = tmp_path / "vm.toml"
    path.write_text(text)
    return str(path)


def test_full_spec_loads_with_defaults_filled_in(tmp_path: pathlib.Path) -> None:
    loaded = spec.load(write(tmp_path, FULL))
    assert (loaded.name, loaded.memory, loaded.cpus, loaded.machine, loaded.accel) == (
        "vm1", 1024, 2, "q35", "kvm"
    )  # fmt: skip
    assert loaded.kernel == "/srv/vm1/vmlinuz" and loaded.disk is None
    first, second = loaded.nics
    assert first.tap.name == "vm1-net0" and first.tap.multi_queue and first.queues == 4
    assert first.vectors == 10  # 2 per queue pair, control queue, config
    assert first.mac == "52:54:00:ab:cd:01"  # normalised
    assert (first.tap.bridge, first.tap.mtu, first.tap.owner) == ("br0", 9000, "libvirt-qemu")
    assert (first.rx_queue_size, first.tx_queue_size) == (1024, 256)
    assert second.tap.name == "vm1-n1" and second.queues == 1 and second.vhost == "preferred"
    # A default MAC is stable for a VM and NIC index, and unicast and local to QEMU's OUI.
    assert second.mac == spec.default_mac("vm1", 1) == spec.load(write(tmp_path, FULL)).nics[1].mac
    assert second.mac.startswith("52:54:00:")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("queues = 4", "queues = 0"), "nic[0]: queues 0 is out of range 1..256"),
        (('vhost = "required"', 'vhost = "yes"'), "nic[0]: vhost must be one of required"),
        (("tx_queue_size = 256", "tx_queue_size = 1024"), "caps it at 256 with kernel vhost-net"),
        (("rx_queue_size = 1024", "rx_queue_size = 300"), "rx_queue_size must be one of"),
        (('tap = "vm1-net0"', 'tap = "has space"'), "contains ' '"),
        (('mac = "52:54:00:AB:cd:01"', 'mac = "01:00:5e:00:00:01"'), "multicast"),
        (("mtu = 9000", "mtu = 70000"), "MTU 70000 is out of range"),
        (('name = "vm1"', 'name = "../etc"'), "name '../etc' must be"),
        (("memory = 1024", "memory = 8"), "memory (MiB) 8 is out of range"),
        (('accel = "kvm"', 'accel = "hvf"'), "accel must be one of kvm, tcg"),
        (('kernel = "/srv/vm1/vmlinuz"', 'kernel = "vmlinuz"'), "kernel must be an absolute path"),
        (("cpus = 2", "cpus = 2\ncolour = 3"), "vm: unknown key 'colour'"),
        (("mtu = 9000", "mtu = 9000\nqueue = 2"), "nic[0]: unknown key 'queue'"),
        (('initrd = "/srv/vm1/initrd.img"', 'disk = "/srv/vm1/d.qcow2"'), "exactly one of kernel"),
        (("cpus = 2", 'cpus = 2\nworker_cpus = "0-"'), "worker_cpus: '0-' is not a CPU list"),
        (("cpus = 2", "cpus = 2\nworker_cpus = 3"), "worker_cpus must be a CPU list"),
    ],
)
def test_bad_specs_are_refused_in_one_line_naming_the_field(
    tmp_path: pathlib.Path, change: tuple[str, str], message: str
) -> None:
    assert change[0] in FULL
    path = write(tmp_path, FULL.replace(change[0], change[1], 1))
    with pytest.raises(InvalidSpec) as err:
        spec.load(path)
    text = str(err.value)
    assert message in text and text.startswith(path) and "\n" not in text


def test_duplicates_between_nics_are_refused(tmp_path: pathlib.Path) -> None:
    same_tap = FULL.replace('vhost = "preferred"', 'vhost = "preferred"\ntap = "vm1-net0"')
    with pytest.raises(InvalidSpec, match="given more than once"):
        spec.load(write(tmp_path, same_tap))
    same_mac = FULL.replace('vhost = "preferred"', 'vhost = "preferred"\nmac = "52:54:00:ab:cd:01"')
    with pytest.raises(InvalidSpec, match="same MAC"):
        spec.load(write(tmp_path, same_mac))


def test_unreadable_and_malformed_files(tmp_path: pathlib.Path) -> None:
    with pytest.raises(InvalidSpec, match="No such file"):
        spec.load(str(tmp_path / "missing.toml"))
    with pytest.raises(InvalidSpec, match="not valid TOML"):
        spec.load(write(tmp_path, "name = \n"))
    with pytest.raises(InvalidSpec, match="at least one nic"):
        spec.load(write(tmp_path, 'name = "x"\n[boot]\ndisk = "/d.img"\n'))


@given(
    st.dictionaries(
        st.sampled_from(sorted(spec._VM_KEYS | {"other"})),
        st.none()
        | st.integers()
        | st.text(max_size=5)
        | st.lists(st.dictionaries(st.text(max_size=4), st.integers()), max_size=2),
        max_size=6,
    )
)
def test_any_mapping_is_a_spec_or_one_invalid_spec_error(data: dict[str, object]) -> None:
    try:
        loaded = spec.from_mapping(data)
    except InvalidSpec as err:
        assert str(err) and "\n" not in str(err)
    else:
        assert loaded.nics


def test_next_nic_index_takes_the_first_index_whose_defaults_are_free() -> None:
    from types import SimpleNamespace

    def nic(i: int) -> SimpleNamespace:
        return SimpleNamespace(tap=spec.default_tap("vm1", i), mac=spec.default_mac("vm1", i))

    assert spec.next_nic_index("vm1", []) == 0
    assert spec.next_nic_index("vm1", [nic(0), nic(1)]) == 2
    # nic 1 was unplugged: the next index is past the count, and skips nic 2's defaults.
    assert spec.next_nic_index("vm1", [nic(0), nic(2)]) == 3
    # A NIC added with its own tap name but nic 1's default MAC still takes index 1.
    own = SimpleNamespace(tap="mine", mac=spec.default_mac("vm1", 1))
    assert spec.next_nic_index("vm1", [own]) == 2


def test_only_a_regular_file_of_bounded_size_is_read_as_a_spec(tmp_path: pathlib.Path) -> None:
    """A FIFO hung `up` (the read waits for a writer), /dev/zero read until memory ran out,
    nesting past tomllib's recursion and bytes that are not UTF-8 were internal errors, and
    a symlink to a spec still loads. Each bad one is one InvalidSpec naming the file."""
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    deep = write(tmp_path, "a = " + "[" * 100_000)
    latin = tmp_path / "latin1.toml"
    latin.write_bytes(b'name = "caf\xe9"\n')
    long = tmp_path / "long.toml"
    long.write_bytes(b"#" * (spec.MAX_SPEC_BYTES + 1))
    refused = {
        str(fifo): "is a FIFO, not a spec file",
        "/dev/zero": "is a character device, not a spec file",
        str(tmp_path): "is a directory, not a spec file",
        deep: "arrays or tables nested too deeply",
        str(latin): "not UTF-8 text (byte 11)",
        str(long): f"longer than {spec.MAX_SPEC_BYTES} bytes",
    }
    signal.alarm(20)  # a hang fails here, not the whole run
    try:
        for path, why in refused.items():
            with pytest.raises(InvalidSpec, match=f"^{re.escape(f'{path}: {why}')}"):
                spec.load(path)
    finally:
        signal.alarm(0)
    link = tmp_path / "link.toml"
    link.symlink_to(write(tmp_path, FULL))
    assert spec.load(str(link)).name == "vm1"
    ok = tmp_path / "ok.toml"
    ok.write_text(FULL + "#" * (spec.MAX_SPEC_BYTES - len(FULL.encode())))
    assert spec.load(str(ok)).name == "vm1"  # exactly the bound: still a spec


def test_worker_cpus_are_kept_in_the_kernels_list_form(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, FULL.replace("cpus = 2", 'cpus = 2\nworker_cpus = "5,2-3,4"', 1))
    assert spec.load(path).worker_cpus == "2-5"
    assert spec.load(write(tmp_path, FULL)).worker_cpus is None
