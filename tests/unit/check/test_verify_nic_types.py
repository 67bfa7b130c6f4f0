"""libvirt interface types other than type='ethernet', as recorded in the test host
(tests/support/record_observation.py: ``direct-1q``, ``direct-4q``, ``bridge-1q``, each a
type='kvm' domain with ``<driver name='vhost'/>`` and its live XML).

The macvtap facts they pin (Linux 6.1, libvirt 9.0, QEMU 7.2):

- libvirt's type='direct' hands QEMU ``/dev/tap<ifindex>`` character devices, one
  open per queue, all of the same macvtap (one inode), next to the vhost-net fds;
- their fdinfo has no ``iff:`` line (drivers/net/tap.c has no show_fdinfo): the
  link is known by the ifindex in the device's name alone;
- the macvtap link has no tun info over netlink (no ``tun_flags``, no queue mode):
  each open is one more queue, so 4 queue pairs are 4 fds on one macvtap.

type='bridge': a plain tun fd (``iff: vnetN``) on a tap enslaved to the bridge.
"""

from __future__ import annotations

import pathlib

import pytest

from tests.support import observations
from vhostorch.check import nics, verify
from vhostorch.check.report import FAIL, PASS, UNKNOWN
from vhostorch.kernel import procfs
from vhostorch.libvirt import domxml

# (recording, queue pairs): libvirt 9.0 and QEMU 7.2 on 6.1; libvirt 11.3 and QEMU 10.0 on 6.12.
DIRECT = [("direct-1q", 1), ("direct-4q", 4), ("direct-1q-linux-6.12-trixie", 1)]
BRIDGE = ["bridge-1q", "bridge-1q-linux-6.12-trixie"]


def _fds(rec: observations.Recording, prefix: str) -> dict[int, str]:
    pid = rec["pid"]
    return {
        int(rel.rsplit("/", 1)[1]): target
        for rel, target in rec["symlinks"].items()
        if rel.startswith(f"{pid}/fd/") and target.startswith(prefix)
    }


@pytest.mark.parametrize(("name", "queues"), DIRECT)
def test_macvtap_queues_are_dev_tap_ifindex_fds_without_iff(name: str, queues: int) -> None:
    rec = observations.load(name)
    assert rec["about"]["kernel"].startswith("6.12." if "6.12" in name else "6.1.")
    (iface,) = domxml.parse(rec["domain_xml"]).interfaces
    assert iface.type == "direct" and iface.target is not None
    link = rec["taps"][iface.target]
    assert link is not None and link["kind"] == "macvtap" and link["tun"] is None
    taps = _fds(rec, procfs.MACVTAP_PREFIX)
    assert set(taps.values()) == {f"/dev/tap{link['index']}"} and len(taps) == queues
    assert _fds(rec, procfs.TUN) == {}
    assert len(_fds(rec, procfs.VHOST_NET)) == queues
    infos = [rec["files"][f"{rec['pid']}/fdinfo/{num}"] for num in taps]
    assert all("iff:" not in info for info in infos)
    # One macvtap device: every queue's fd is on the same inode.
    assert len({procfs.parse_fdinfo(info)["ino"] for info in infos}) == 1


@pytest.mark.parametrize(("name", "queues"), DIRECT)
@pytest.mark.parametrize("monitor", [True, False], ids=["monitor", "no-monitor"])
def test_direct_replayed_passes_strict_as_it_did_live(
    name: str, queues: int, monitor: bool, tmp_path: pathlib.Path
) -> None:
    rec = observations.load(name)
    obs = observations.observed(name, tmp_path, monitor=monitor)
    report = verify.verify(obs)
    bad = [c for c in report.checks if c.status != PASS]
    assert report.ok(strict=True) and not bad, bad
    live = {(c["id"], c["nic"], c["queue"], c["status"]) for c in rec["report"]["checks"]}  # type: ignore[attr-defined,index]
    assert {(c.id, c.nic, c.queue, c.status) for c in report.checks} == live
    (nic,) = nics.find(obs)
    assert [fd.tap for fd in nic.tap_fds] == [None] * queues  # no iff: to name it
    (tap_fds,) = [c for c in report.checks if c.id == "nic.tap.fds"]
    assert tap_fds.evidence["kind"] == "macvtap"
    assert tap_fds.evidence["taps"] == [obs.domain.interfaces[0].target]  # type: ignore[union-attr]
    assert f"{queues} fd(s) on macvtap" in tap_fds.message


def test_a_macvtap_whose_link_is_gone_fails(tmp_path: pathlib.Path) -> None:
    # The same fds, but netlink no longer has the macvtap the domain names (deleted while
    # QEMU kept its queues): the fds are on no link, which must not pass.
    rec = observations.load("direct-4q")
    ifindex = next(link["index"] for link in rec["taps"].values() if link)  # type: ignore[index]
    rec["taps"] = {name: None for name in rec["taps"]}
    report = verify.verify(observations.replay(rec, tmp_path))
    (tap_fds,) = [c for c in report.checks if c.id == "nic.tap.fds"]
    assert tap_fds.status == FAIL and f"macvtap ifindex {ifindex}" in tap_fds.message, tap_fds
    assert not report.ok(strict=False)


def test_a_macvtap_whose_link_could_not_be_read_is_unknown(tmp_path: pathlib.Path) -> None:
    obs = observations.observed("direct-1q", tmp_path)
    obs = obs.replace(taps={}, taps_seen="netlink refused")
    (tap_fds,) = [c for c in verify.verify(obs).checks if c.id == "nic.tap.fds"]
    assert tap_fds.status == UNKNOWN and "netlink refused" in tap_fds.message, tap_fds


def test_a_macvtap_seen_without_its_domain_is_unknown_not_failed(tmp_path: pathlib.Path) -> None:
    # check --pid on libvirt's QEMU: the command line passes fds only and /dev/tapN has no
    # iff:, so nothing names the macvtap to read it by.
    rec = observations.load("direct-4q")
    del rec["domain_xml"]
    report = verify.verify(observations.replay(rec, tmp_path))
    (tap_fds,) = [c for c in report.checks if c.id == "nic.tap.fds"]
    assert tap_fds.status == UNKNOWN and "check --domain" in tap_fds.message, tap_fds
    assert report.ok(strict=False) and not report.ok(strict=True)


@pytest.mark.parametrize("name", BRIDGE)
@pytest.mark.parametrize("monitor", [True, False], ids=["monitor", "no-monitor"])
def test_bridge_is_a_tun_tap_on_the_bridge_and_passes_strict(
    name: str, monitor: bool, tmp_path: pathlib.Path
) -> None:
    rec = observations.load(name)
    (iface,) = domxml.parse(rec["domain_xml"]).interfaces
    assert iface.type == "bridge" and iface.target is not None
    (info,) = [rec["files"][f"{rec['pid']}/fdinfo/{num}"] for num in _fds(rec, procfs.TUN)]
    assert procfs.parse_fdinfo(info)["iff"] == iface.target
    link = rec["taps"][iface.target]
    assert link is not None and link["kind"] == "tun" and link["master"] is not None
    report = verify.verify(observations.observed(name, tmp_path, monitor=monitor))
    bad = [c for c in report.checks if c.status != PASS]
    assert report.ok(strict=True) and not bad, bad
