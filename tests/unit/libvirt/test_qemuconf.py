"""libvirt's qemu.conf read as libvirtd reads it (src/util/virconf.c), from real-looking files."""

from __future__ import annotations

import pathlib
import pwd

import pytest

from vhostorch.libvirt import qemuconf

# Debian's /etc/libvirt/qemu.conf (libvirt-daemon-driver-qemu 9.0), the parts near the
# settings vhostorch reads: every setting is commented out.
DEBIAN = """\
# Master configuration file for the QEMU driver.
# All settings described here are optional - if omitted, sensible
# defaults are used.

#security_require_confined = 1

# The user for QEMU processes run by the system instance. It can be
# specified as a user name or as a user id. The qemu driver will try to
# parse this value first as a name and then, if the name doesn't exist,
# as a user id.
#
# Some examples of valid values are:
#
#       user = "qemu"   # A user named "qemu"
#       user = "+0"     # Super user (uid=0)
#       user = "100"    # A user named "100" or a user with uid=100
#
#user = "libvirt-qemu"

# The group for QEMU processes run by the system instance. It can be
# specified in a similar way to user.
#group = "libvirt-qemu"

#cgroup_controllers = [ "cpu", "devices", "memory", "blkio", "cpuset", "cpuacct" ]

#cgroup_device_acl = [
#    "/dev/null", "/dev/full", "/dev/zero",
#    "/dev/random", "/dev/urandom",
#    "/dev/ptmx", "/dev/kvm"
#]
#
# RDMA migration requires the following extra files to be added to the list:
#   "/dev/infiniband/rdma_cm",
"""

# The same file as an operator edits it: settings uncommented, with trailing comments,
# a list over several lines, single quotes, numbers and two statements on one line.
EDITED = """\
# Master configuration file for the QEMU driver.
user = "qemu"   # A user named "qemu"
group = 'kvm'
dynamic_ownership = 0
max_files = +32768 ; max_processes = 4096
cgroup_controllers = [ "cpu", "devices", "memory" ]
cgroup_device_acl = [
    "/dev/null", "/dev/full", "/dev/zero",
    "/dev/random", "/dev/urandom",   # comments inside a list are skipped
    "/dev/ptmx", "/dev/kvm",
    "/dev/vhost-net",
]
security_driver = [ ]
nvram = [ \"\"\"/usr/share/OVMF/OVMF_CODE.fd:
/usr/share/OVMF/OVMF_VARS.fd\"\"\" ]
user = "root"   # a second setting: libvirt keeps the first
"""


def test_debians_default_file_sets_nothing() -> None:
    assert qemuconf.parse(DEBIAN) == {}
    assert qemuconf.device_acl({}) is None and qemuconf.configured_user({}) is None


def test_an_edited_file_reads_as_libvirt_reads_it() -> None:
    settings = qemuconf.parse(EDITED)
    assert settings == {
        "user": "qemu",
        "group": "kvm",
        "dynamic_ownership": 0,
        "max_files": 32768,
        "max_processes": 4096,
        "cgroup_controllers": ("cpu", "devices", "memory"),
        "cgroup_device_acl": (
            "/dev/null", "/dev/full", "/dev/zero", "/dev/random", "/dev/urandom",
            "/dev/ptmx", "/dev/kvm", "/dev/vhost-net",
        ),
        "security_driver": (),
        "nvram": ("/usr/share/OVMF/OVMF_CODE.fd:\n/usr/share/OVMF/OVMF_VARS.fd",),
    }  # fmt: skip
    assert qemuconf.configured_user(settings) == "qemu"
    assert qemuconf.device_acl(settings) == settings["cgroup_device_acl"]


@pytest.mark.parametrize(
    ("line", "user"),
    [
        ('user = "+0"     # Super user (uid=0)', "0"),
        ('user = "100"', "100"),
        ("  user='nobody'", "nobody"),
        ('user = "a#b"', "a#b"),  # '#' inside a string is not a comment
        ("user = 0", None),  # a number, not the string libvirt wants: not a user
        ('user = ""', None),
    ],
)
def test_the_user_setting(line: str, user: str | None) -> None:
    assert qemuconf.configured_user(qemuconf.parse(f"# qemu.conf\n{line}\n")) == user


@pytest.mark.parametrize(
    "text",
    [
        'user = "unterminated\ngroup = "kvm"\n',
        'cgroup_device_acl = [ "/dev/null" "/dev/kvm" ]\ngroup = "kvm"\n',
        "cgroup_device_acl = [ /dev/null ]\ngroup = 'kvm'\n",
        '= "x"\n42 = 1\ngroup = "kvm"\n',
        'group = "kvm"\nuser = \n',
        f'max_files = {"9" * 5000}\ngroup = "kvm"\n',  # no 64-bit value: int() refuses it too
    ],
)
def test_what_libvirt_would_refuse_is_skipped_to_the_end_of_its_line(text: str) -> None:
    assert qemuconf.parse(text) == {"group": "kvm"}


def test_a_list_that_is_not_closed_is_not_a_setting() -> None:
    settings = qemuconf.parse(
        'cgroup_device_acl = [\n  "/dev/null",\n  "/dev/kvm"\ngroup = "kvm"\n'
    )
    assert "cgroup_device_acl" not in settings


def test_a_single_string_acl_is_a_list_of_one() -> None:
    assert qemuconf.device_acl({"cgroup_device_acl": "/dev/kvm"}) == ("/dev/kvm",)


def test_read(tmp_path: pathlib.Path) -> None:
    conf = tmp_path / "qemu.conf"
    assert qemuconf.read(str(conf)) is None  # no file: libvirt is not installed
    conf.write_text(EDITED)
    assert qemuconf.read(str(conf)) == qemuconf.parse(EDITED)


def test_without_a_user_setting_the_distributions_default_that_exists_is_taken() -> None:
    expected = None
    for name in qemuconf.DEFAULT_USERS:
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        expected = name
        break
    assert qemuconf.qemu_user({}) == expected
    assert qemuconf.qemu_user({"user": "+0"}) == "0"
