"""Link-level rtnetlink: read, change, create and delete links in the caller's namespace.

A small typed codec over a raw NETLINK_ROUTE socket (stdlib only). It exists
because provisioning runs in a fresh process on every VM start, where importing
a general netlink library costs more than the whole job (docs/design.md).
Every call is one request and one acknowledgement, except `batch`: many
independent requests per sendmsg, their acknowledgements read together.
"""

from __future__ import annotations

import _socket  # not `socket`: its enum set-up costs ~14 ms at import
import errno
import struct

# The error raised here, also importable from here (the tree is in vhostorch.errors).
from vhostorch.errors import NetlinkError as NetlinkError
from vhostorch.record import TYPE_CHECKING, Record

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from types import TracebackType

# linux/netlink.h
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_DUMP = 0x300
NLM_F_CAPPED = 0x100
NLM_F_ACK_TLVS = 0x200
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
NLMSGERR_ATTR_MSG = 1
SOL_NETLINK = 270
# linux/rtnetlink.h, linux/if_link.h
RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_GETLINK = 18
IFLA_ADDRESS = 1
IFLA_IFNAME = 3
IFLA_MTU = 4
IFLA_MASTER = 10
IFLA_LINKINFO = 18
IFLA_IFALIAS = 20
IFLA_GROUP = 27
IFLA_EXT_MASK = 29
IFLA_CARRIER = 33
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
RTEXT_FILTER_SKIP_STATS = 1 << 3
IFLA_TUN_OWNER = 1
IFLA_TUN_GROUP = 2
IFLA_TUN_TYPE = 3
IFLA_TUN_PI = 4
IFLA_TUN_VNET_HDR = 5
IFLA_TUN_PERSIST = 6
IFLA_TUN_MULTI_QUEUE = 7
IFLA_TUN_NUM_QUEUES = 8
IFLA_TUN_NUM_DISABLED_QUEUES = 9
IFF_UP = 0x1
AF_UNSPEC = 0
TUN_TYPE_TUN = 1  # IFF_TUN as reported in IFLA_TUN_TYPE
TUN_TYPE_TAP = 2
NO_ID = 0xFFFFFFFF  # (uid_t)-1: no owner/group set on the tap

_NLMSG = struct.Struct("=IHHII")
_IFINFO = struct.Struct("=BxHiII")
_NLA = struct.Struct("=HH")
_U32 = struct.Struct("=I")
_ERR = struct.Struct("=i")
_RECV = 1 << 16
# Requests per sendmsg in `batch`. The kernel queues one acknowledgement skb per
# request (~1 KiB of receive buffer each, truesize) and drops, with ENOBUFS, what
# does not fit the default 208 KiB rmem: 64 stay well inside it.
BATCH = 64


class TunInfo(Record):
    """What the tun driver reports about a tun/tap device (IFLA_INFO_DATA)."""

    tap: bool
    pi: bool
    vnet_hdr: bool
    multi_queue: bool
    persist: bool
    owner: int | None
    group: int | None
    attached_queues: int
    disabled_queues: int


class Link(Record):
    """One network device as RTM_NEWLINK describes it; ``master`` is an ifindex."""

    index: int
    name: str
    kind: str | None
    up: bool
    mtu: int
    mac: str | None
    master: int | None
    alias: str | None
    carrier: bool | None
    tun: TunInfo | None
    group: int = 0  # the link group (IFLA_GROUP); every device starts in group 0


class Request(Record):
    """One rtnetlink request of a `batch`: message type, flags and body (ifinfomsg + attributes)."""

    msgtype: int
    flags: int
    body: bytes


def _attr(kind: int, payload: bytes) -> bytes:
    size = _NLA.size + len(payload)
    return _NLA.pack(size, kind) + payload + b"\0" * (-size % 4)


def _str(kind: int, value: str) -> bytes:
    return _attr(kind, value.encode() + b"\0")


def _u32(kind: int, value: int) -> bytes:
    return _attr(kind, _U32.pack(value))


def _attrs(data: bytes | memoryview, start: int = 0) -> Iterator[tuple[int, memoryview]]:
    view = memoryview(data)
    pos = start
    while pos + _NLA.size <= len(view):
        size, kind = _NLA.unpack_from(view, pos)
        if size < _NLA.size:
            return
        yield kind & NLA_TYPE_MASK, view[pos + _NLA.size : pos + size]
        pos += (size + 3) & ~3


def _cstr(raw: memoryview) -> str:
    return bytes(raw).split(b"\0", 1)[0].decode(errors="replace")


def _u32v(raw: memoryview) -> int:
    return int(_U32.unpack_from(raw)[0])


def _tun_info(data: memoryview) -> TunInfo:
    a = {k: v for k, v in _attrs(data)}

    def flag(kind: int) -> bool:
        return kind in a and a[kind][0] != 0

    def ident(kind: int) -> int | None:
        value = _u32v(a[kind]) if kind in a else NO_ID
        return None if value == NO_ID else value

    return TunInfo(
        tap=IFLA_TUN_TYPE in a and a[IFLA_TUN_TYPE][0] == TUN_TYPE_TAP,
        pi=flag(IFLA_TUN_PI),
        vnet_hdr=flag(IFLA_TUN_VNET_HDR),
        multi_queue=flag(IFLA_TUN_MULTI_QUEUE),
        persist=flag(IFLA_TUN_PERSIST),
        owner=ident(IFLA_TUN_OWNER),
        group=ident(IFLA_TUN_GROUP),
        attached_queues=_u32v(a[IFLA_TUN_NUM_QUEUES]) if IFLA_TUN_NUM_QUEUES in a else 0,
        disabled_queues=(
            _u32v(a[IFLA_TUN_NUM_DISABLED_QUEUES]) if IFLA_TUN_NUM_DISABLED_QUEUES in a else 0
        ),
    )


def parse_link(body: memoryview) -> Link:
    """Decode one RTM_NEWLINK message body (ifinfomsg and attributes)."""
    _family, _type, index, flags, _change = _IFINFO.unpack_from(body)
    name, kind, mtu, mac, master, alias, carrier, tun = "", None, 0, None, None, None, None, None
    group = 0
    for attr, raw in _attrs(body, _IFINFO.size):
        if attr == IFLA_IFNAME:
            name = _cstr(raw)
        elif attr == IFLA_MTU:
            mtu = _u32v(raw)
        elif attr == IFLA_ADDRESS:
            mac = ":".join(f"{b:02x}" for b in bytes(raw))
        elif attr == IFLA_MASTER:
            master = _u32v(raw) or None
        elif attr == IFLA_IFALIAS:
            alias = _cstr(raw) or None
        elif attr == IFLA_CARRIER:
            carrier = raw[0] != 0
        elif attr == IFLA_GROUP:
            group = _u32v(raw)
        elif attr == IFLA_LINKINFO:
            info = {k: v for k, v in _attrs(raw)}
            if IFLA_INFO_KIND in info:
                kind = _cstr(info[IFLA_INFO_KIND])
            if kind == "tun" and IFLA_INFO_DATA in info:
                tun = _tun_info(info[IFLA_INFO_DATA])
    if tun is not None and not tun.multi_queue:
        # tun reports IFLA_TUN_NUM_QUEUES only for multi-queue devices (tun_fill_info).
        # Carrier on means the one queue is attached (tun turns it off at the last detach
        # and refuses to turn it on without a queue), but root can switch carrier off on
        # a held tap: off is a guess, which `Rtnl.tun_attached` asks the kernel about.
        tun = tun.replace(attached_queues=1 if carrier else 0)
    up = bool(flags & IFF_UP)
    return Link(index, name, kind, up, mtu, mac, master, alias, carrier, tun, group)


def set_link_request(
    name: str | None = None,
    *,
    index: int = 0,
    up: bool | None = None,
    mtu: int | None = None,
    mac: str | None = None,
    master: int | None = None,
    alias: str | None = None,
    group: int | None = None,
    carrier: bool | None = None,
) -> Request:
    """A change of the link called ``name`` (or numbered ``index``) in one request.

    ``master=0`` detaches it; None leaves a field alone. By index, the change
    reaches the device that was looked at even if it was renamed meanwhile.
    """
    flags = change = 0
    if up is not None:
        change = IFF_UP
        flags = IFF_UP if up else 0
    body = _IFINFO.pack(AF_UNSPEC, 0, index, flags, change)
    if name is not None:
        body += _str(IFLA_IFNAME, name)
    if mtu is not None:
        body += _u32(IFLA_MTU, mtu)
    if mac is not None:
        body += _attr(IFLA_ADDRESS, bytes.fromhex(mac.replace(":", "")))
    if master is not None:
        body += _u32(IFLA_MASTER, master)
    if alias is not None:
        body += _str(IFLA_IFALIAS, alias)
    if group is not None:
        body += _u32(IFLA_GROUP, group)
    if carrier is not None:
        body += _attr(IFLA_CARRIER, bytes([carrier]))
    return Request(RTM_NEWLINK, 0, body)


class Rtnl:
    """One NETLINK_ROUTE socket, bound to the namespace it was opened in."""

    def __init__(self) -> None:
        self._sock = _socket.socket(_socket.AF_NETLINK, _socket.SOCK_RAW, _socket.NETLINK_ROUTE)
        self._sock.bind((0, 0))
        # Extended acks carry the kernel's reason ("Invalid MTU"...) and capped
        # acks keep it from echoing each request back.
        for opt in (NETLINK_EXT_ACK, NETLINK_CAP_ACK):
            try:
                self._sock.setsockopt(SOL_NETLINK, opt, 1)
            except OSError:
                pass
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _message(self, msgtype: int, flags: int, body: bytes) -> bytes:
        self._seq += 1
        head = _NLMSG.pack(_NLMSG.size + len(body), msgtype, flags | NLM_F_REQUEST, self._seq, 0)
        return head + body

    def _send(self, msgtype: int, flags: int, body: bytes) -> int:
        self._sock.send(self._message(msgtype, flags, body))
        return self._seq

    def _received(self) -> Iterator[tuple[int, int, int, memoryview]]:
        """Receive one datagram; yield (type, flags, sequence number, body) of each message."""
        data = memoryview(self._sock.recv(_RECV))
        pos = 0
        while pos + _NLMSG.size <= len(data):
            size, msgtype, flags, seq, _pid = _NLMSG.unpack_from(data, pos)
            yield msgtype, flags, seq, data[pos + _NLMSG.size : pos + size]
            pos += (size + 3) & ~3

    def _replies(self, seq: int) -> Iterator[tuple[int, memoryview]]:
        """Yield (type, body) of each reply to ``seq`` until the ack or the end of a dump."""
        while True:
            for msgtype, flags, mseq, body in self._received():
                if mseq != seq:
                    continue
                if msgtype == NLMSG_DONE:
                    return
                if msgtype == NLMSG_ERROR:
                    code = -_ERR.unpack_from(body)[0]
                    if code:
                        raise NetlinkError(code, _extack(body, flags))
                    return
                yield msgtype, body
                if not flags & NLM_F_MULTI:
                    return

    def _call(self, msgtype: int, flags: int, body: bytes) -> None:
        for _ in self._replies(self._send(msgtype, flags | NLM_F_ACK, body)):
            pass

    def links(self) -> dict[str, Link]:
        """Every link in this namespace, by name."""
        body = _IFINFO.pack(AF_UNSPEC, 0, 0, 0, 0)
        body += _u32(IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS)
        found: dict[str, Link] = {}
        for msgtype, reply in self._replies(self._send(RTM_GETLINK, NLM_F_DUMP, body)):
            if msgtype == RTM_NEWLINK:
                link = parse_link(reply)
                found[link.name] = link
        return found

    def link(self, name: str) -> Link | None:
        """The link called ``name``, or None when there is none."""
        body = _IFINFO.pack(AF_UNSPEC, 0, 0, 0, 0) + _str(IFLA_IFNAME, name)
        body += _u32(IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS)
        try:
            for msgtype, reply in self._replies(self._send(RTM_GETLINK, 0, body)):
                if msgtype == RTM_NEWLINK:
                    return parse_link(reply)
        except NetlinkError as err:
            if err.errno == errno.ENODEV:
                return None
            raise
        return None

    def change(self, request: Request) -> None:
        """Send one request (a `set_link_request`) and wait for its acknowledgement."""
        self._call(request.msgtype, request.flags, request.body)

    def batch(self, requests: Sequence[Request]) -> list[NetlinkError | None]:
        """Send independent requests, BATCH per sendmsg; return each one's error, or None.

        The kernel runs every message of a sendmsg in turn and acknowledges each,
        going on after one it refused (netlink_rcv_skb), so a failure in the
        middle does not stop the others: the caller gets every outcome and undoes
        what it must.
        """
        outcomes: list[NetlinkError | None] = []
        for start in range(0, len(requests), BATCH):
            chunk = requests[start : start + BATCH]
            first = self._seq + 1
            self._sock.send(
                b"".join(self._message(r.msgtype, r.flags | NLM_F_ACK, r.body) for r in chunk)
            )
            last = self._seq
            answers: dict[int, NetlinkError | None] = {}
            while len(answers) < len(chunk):
                for msgtype, flags, mseq, body in self._received():
                    if msgtype == NLMSG_ERROR and first <= mseq <= last:
                        code = -_ERR.unpack_from(body)[0]
                        answers[mseq] = NetlinkError(code, _extack(body, flags)) if code else None
            outcomes += [answers[seq] for seq in range(first, last + 1)]
        return outcomes

    def tun_attached(self, links: Sequence[Link]) -> list[bool | None]:
        """Whether each single-queue tap of ``links`` has its queue attached (held open),
        asked of tun itself: True, False, or None when the kernel does not say.

        tun reports no queue count for a single-queue tap, and its carrier is no proof:
        root can switch it off (`ip link set TAP carrier off`) while the tap is held. But
        tun_net_change_carrier turns carrier on only while a queue is attached
        (tun->numqueues), and refuses with EPERM otherwise. So carrier on is asked for:
        EPERM is "not held" and nothing changed; accepted is "held", and carrier is put
        back off as it was. Another answer (a kernel without ndo_change_carrier for tun,
        before 5.0: EOPNOTSUPP) is None.
        """
        answers = self.batch([set_link_request(index=link.index, carrier=True) for link in links])
        held: list[bool | None] = []
        for answer in answers:
            if answer is None:
                held.append(True)
            elif answer.errno == errno.EPERM:
                held.append(False)
            else:
                held.append(None)
        back = [
            set_link_request(index=link.index, carrier=False)
            for link, on in zip(links, held, strict=True)
            if on
        ]
        if back:
            self.batch(back)  # a tap closed meanwhile is off already: any answer will do
        return held

    def add_link(self, name: str, kind: str, *, up: bool = True) -> None:
        """Create a link of a netlink-creatable kind (a bridge); fails if the name is taken."""
        info = _attr(IFLA_LINKINFO | NLA_F_NESTED, _str(IFLA_INFO_KIND, kind))
        body = _IFINFO.pack(AF_UNSPEC, 0, 0, IFF_UP if up else 0, IFF_UP)
        body += _str(IFLA_IFNAME, name) + info
        self._call(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body)

    def delete(self, name: str, index: int = 0) -> None:
        """Delete link ``name``, or the link numbered ``index`` when given (the name is then
        not sent: rtnl_dellink looks a device up by index first, so the request fails with
        ENODEV rather than reach another device of that name)."""
        body = _IFINFO.pack(AF_UNSPEC, 0, index, 0, 0)
        if not index:
            body += _str(IFLA_IFNAME, name)
        self._call(RTM_DELLINK, 0, body)

    def delete_group(self, group: int) -> None:
        """Delete every device of link ``group`` in one request, as `ip link delete group N`.

        rtnl_dellink (net/core/rtnetlink.c) takes the group only when the request
        names no device (ifi_index 0, no IFLA_IFNAME); rtnl_group_dellink then
        refuses group 0 (EPERM: every device is in it by default), a group
        holding any device without rtnl_link_ops->dellink (EOPNOTSUPP, e.g. lo)
        and an empty group (ENODEV), all before it deletes anything; otherwise,
        under the RTNL lock, it deletes every device of the group, of whatever
        kind (a veth takes its peer along), in one unregister_netdevice_many:
        one RCU grace period for all of them instead of one each.
        """
        if not 0 < group <= 0xFFFFFFFF:
            raise ValueError(f"link group {group} is not a group one may delete")
        body = _IFINFO.pack(AF_UNSPEC, 0, 0, 0, 0) + _u32(IFLA_GROUP, group)
        self._call(RTM_DELLINK, 0, body)


def _extack(body: memoryview, flags: int) -> str | None:
    if not flags & NLM_F_ACK_TLVS:
        return None
    # nlmsgerr is the error code and the request's header, plus its body unless capped.
    start = _ERR.size + _NLMSG.size
    if not flags & NLM_F_CAPPED:
        start = _ERR.size + _NLMSG.unpack_from(body, _ERR.size)[0]
    for kind, raw in _attrs(body, (start + 3) & ~3):
        if kind == NLMSGERR_ATTR_MSG:
            return _cstr(raw) or None
    return None
