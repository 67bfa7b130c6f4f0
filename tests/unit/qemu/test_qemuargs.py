"""Reading QEMU command lines: libvirt's JSON form and the key=value form people type."""

from __future__ import annotations

from vhostorch.qemu import args

# As libvirt 9.0 starts a type='kvm' domain with <driver name='vhost' queues='4'/> (seen in the
# test host, tests/testhost/test_testhost.py), trimmed to the options that matter here.
LIBVIRT = [
    "/usr/bin/qemu-system-x86_64",
    "-name", "guest=vm1,debug-threads=on",
    "-machine", "pc-i440fx-7.2,usb=off,dump-guest-core=off,memory-backend=pc.ram",
    "-accel", "kvm",
    "-chardev", "socket,id=charmonitor,fd=29,server=on,wait=off",
    "-mon", "chardev=charmonitor,id=monitor,mode=control",
    "-netdev",
    '{"type":"tap","fds":"31:33:34:35","vhost":true,"vhostfds":"36:37:38:39","id":"hostnet0"}',
    "-device",
    '{"driver":"virtio-net-pci","mq":true,"vectors":10,"netdev":"hostnet0","id":"net0",'
    '"mac":"52:54:00:12:34:56","bus":"pci.0","addr":"0x3"}',
]  # fmt: skip


def test_libvirt_json_netdev_and_device() -> None:
    parsed = args.parse(LIBVIRT)
    assert parsed.name == "vm1"
    assert parsed.accel == ("kvm",)
    (netdev,) = parsed.netdevs
    assert netdev.id == "hostnet0" and netdev.type == "tap"
    assert netdev.fds == (31, 33, 34, 35) and netdev.vhostfds == (36, 37, 38, 39)
    assert netdev.vhost is True and netdev.wants_vhost and netdev.queue_pairs == 4
    device = parsed.device_for("hostnet0")
    assert device is not None
    assert (device.id, device.mq, device.vectors, device.mac) == (
        "net0",
        True,
        10,
        "52:54:00:12:34:56",
    )
    assert parsed.qmp is None  # libvirt's monitor is a passed fd, not a path


def test_key_value_form_with_escaped_commas_and_monitor_path() -> None:
    parsed = args.parse([
        "qemu-system-x86_64", "-enable-kvm",
        "-netdev", "tap,id=n0,ifname=vt0,script=no,downscript=no,vhost=on,queues=4",
        "-device", "virtio-net-pci,netdev=n0,mq=on,vectors=10",
        "-netdev", "user,id=u0,hostfwd=tcp::2222-:22",
        "-device", "e1000,netdev=u0",
        "-name", "odd,,name",
        "-qmp", "unix:/run/vm.qmp,server=on,wait=off",
    ])  # fmt: skip
    assert parsed.accel == ("kvm",)
    assert parsed.name == "odd,name"
    assert [n.id for n in parsed.netdevs] == ["n0", "u0"]
    n0 = parsed.netdevs[0]
    assert n0.ifname == "vt0" and n0.vhost is True and n0.queue_pairs == 4 and n0.fds == ()
    assert [d.driver for d in parsed.devices] == ["virtio-net-pci"]  # e1000 is not virtio-net
    assert parsed.qmp == "/run/vm.qmp"


def test_vhost_off_missing_and_forced() -> None:
    def netdev(opts: str) -> args.NetdevArg:
        return args.parse(["qemu-system-x86_64", "-netdev", opts]).netdevs[0]

    assert netdev("tap,id=a,ifname=t").vhost is None
    assert not netdev("tap,id=a,ifname=t").wants_vhost
    assert netdev("tap,id=a,ifname=t,vhost=off").vhost is False
    assert netdev("tap,id=a,ifname=t,vhostforce=on").wants_vhost
    assert netdev("tap,id=a,fd=5,vhostfd=6").wants_vhost  # a vhost fd given means vhost
    assert netdev("tap,id=a,fds=fdname0:fdname1").fds == ()  # names from getfd, not numbers


def test_nic_shorthand_and_machine_accel() -> None:
    parsed = args.parse([
        "qemu-system-x86_64", "-M", "q35,accel=kvm:tcg",
        "-nic", "tap,ifname=vt1,model=virtio-net-pci,vhost=on",
        "-chardev", "socket,id=mon0,path=/tmp/m.sock,server=on,wait=off",
        "-mon", "chardev=mon0,mode=control",
    ])  # fmt: skip
    assert parsed.accel == ("kvm", "tcg")
    (netdev,) = parsed.netdevs
    assert netdev.ifname == "vt1" and netdev.wants_vhost
    device = parsed.device_for(netdev.id)
    assert device is not None and device.driver == "virtio-net-pci"
    assert parsed.qmp == "/tmp/m.sock"


def test_garbage_is_ignored_not_raised() -> None:
    parsed = args.parse(["qemu-system-x86_64", "-netdev", "{not json", "-device", "-name"])
    assert parsed.devices == ()
    assert [n.type for n in parsed.netdevs] == [""]
