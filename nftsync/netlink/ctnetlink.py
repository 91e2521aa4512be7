"""ctnetlink: conntrack events, dumps and batched writes, hand-coded for speed.

The daemon learns client→backend sessions from conntrack events (ct mark = backend mark, reply
tuple = DNAT target) and replicates entries between load-balancer peers. Rates of 25k+/s rule
out a generic netlink parser and one-ACK-per-entry writes, so this module:

* decodes events straight out of the receive buffer with `struct.unpack_from` at absolute offsets
  (no slicing), with a fast path for the fixed layout the kernel emits for IPv4/IPv6 TCP/UDP
  tuples and a defensive generic walk for everything else;
* can drop events by ct mark and by originating netlink port id before decoding tuples;
* writes entries as many messages per `sendmsg`, no ACK per message (only failures come back as
  NLMSG_ERROR, matched to entries by sequence number), one ACKed barrier per datagram.

Kernel behaviour relied upon (net/netfilter/nf_conntrack_netlink.c, verified on 6.18):
* Events: DESTROY → IPCTNL_MSG_CT_DELETE; NEW (and RELATED) → IPCTNL_MSG_CT_NEW with
  NLM_F_CREATE|NLM_F_EXCL; anything else → IPCTNL_MSG_CT_NEW without them (UPDATE). The event's
  nlmsg_pid is the port id of the netlink socket whose request caused it (0 for packet-driven
  events): that is how the daemon recognises the echo of its own writes.
* IPCTNL_MSG_CT_NEW on an existing tuple with NLM_F_EXCL → EEXIST; without EXCL the entry is
  changed, but NAT attributes are then refused (EOPNOTSUPP): NAT can only be set at creation.
* Creation needs both tuples and CTA_TIMEOUT. CTA_STATUS must keep IPS_CONFIRMED (set by the
  kernel before it applies the status) and can never clear ASSURED/SEEN_REPLY (EBUSY). NAT bits
  cannot be set through CTA_STATUS; they are set by nf_nat_setup_info() only if the NAT range
  *changes* the reply tuple. So, like conntrackd (NFCT_SOPT_SETUP_REPLY), we send the reply tuple
  as the inverse of the original and let CTA_NAT_DST/CTA_NAT_SRC rewrite it: packets of the
  inserted entry are then really translated.
* conntrackd sets IP_CT_TCP_FLAG_BE_LIBERAL (flags and mask) in both directions of an injected
  TCP entry, since the window state of a connection taken over mid-stream is unknown. So do we.
"""

from __future__ import annotations

import enum
import errno as _errno
import ipaddress
import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from nftsync.errors import NftsyncError
from nftsync.netlink.core import (
    NETLINK_NETFILTER,
    NFNL_SUBSYS_CTNETLINK,
    NLA_F_NESTED,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    NetlinkError,
    NetlinkOverrun,
    NetlinkSocket,
    nfnl_type,
    nla,
    nla_be16,
    nla_nested,
    nla_u8,
)

AF_INET = socket.AF_INET  # 2
AF_INET6 = socket.AF_INET6  # 10
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ICMPV6 = 58

# nfnetlink_conntrack.h -----------------------------------------------------------------------
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_GET = 1
IPCTNL_MSG_CT_DELETE = 2
CT_NEW = nfnl_type(NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_NEW)
CT_GET = nfnl_type(NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_GET)
CT_DELETE = nfnl_type(NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_DELETE)

NFNLGRP_CONNTRACK_NEW = 1
NFNLGRP_CONNTRACK_UPDATE = 2
NFNLGRP_CONNTRACK_DESTROY = 3

CTA_TUPLE_ORIG = 1
CTA_TUPLE_REPLY = 2
CTA_STATUS = 3
CTA_PROTOINFO = 4
CTA_NAT_SRC = 6
CTA_TIMEOUT = 7
CTA_MARK = 8
CTA_ID = 12
CTA_NAT_DST = 13
CTA_ZONE = 18
CTA_MARK_MASK = 21

CTA_TUPLE_IP = 1
CTA_TUPLE_PROTO = 2
CTA_TUPLE_ZONE = 3
CTA_IP_V4_SRC = 1
CTA_IP_V4_DST = 2
CTA_IP_V6_SRC = 3
CTA_IP_V6_DST = 4
CTA_PROTO_NUM = 1
CTA_PROTO_SRC_PORT = 2
CTA_PROTO_DST_PORT = 3
CTA_PROTO_ICMP_ID = 4
CTA_PROTO_ICMP_TYPE = 5
CTA_PROTO_ICMP_CODE = 6
CTA_PROTO_ICMPV6_ID = 7
CTA_PROTO_ICMPV6_TYPE = 8
CTA_PROTO_ICMPV6_CODE = 9

CTA_PROTOINFO_TCP = 1
CTA_PROTOINFO_TCP_STATE = 1
CTA_PROTOINFO_TCP_FLAGS_ORIGINAL = 4
CTA_PROTOINFO_TCP_FLAGS_REPLY = 5
IP_CT_TCP_FLAG_BE_LIBERAL = 0x08

CTA_NAT_V4_MINIP = 1
CTA_NAT_V4_MAXIP = 2
CTA_NAT_PROTO = 3
CTA_NAT_V6_MINIP = 4
CTA_NAT_V6_MAXIP = 5
CTA_PROTONAT_PORT_MIN = 1
CTA_PROTONAT_PORT_MAX = 2

# ip_conntrack_status bits
IPS_EXPECTED = 1 << 0
IPS_SEEN_REPLY = 1 << 1
IPS_ASSURED = 1 << 2
IPS_CONFIRMED = 1 << 3
IPS_SRC_NAT = 1 << 4
IPS_DST_NAT = 1 << 5
IPS_NAT_MASK = IPS_SRC_NAT | IPS_DST_NAT
IPS_SEQ_ADJUST = 1 << 6
IPS_SRC_NAT_DONE = 1 << 7
IPS_DST_NAT_DONE = 1 << 8
IPS_DYING = 1 << 9
IPS_FIXED_TIMEOUT = 1 << 10
IPS_TEMPLATE = 1 << 11
IPS_HELPER = 1 << 13
IPS_OFFLOAD = 1 << 14
IPS_HW_OFFLOAD = 1 << 15
# Bits the kernel ignores or refuses in CTA_STATUS; we never send them (CONFIRMED is added).
_IPS_NOT_SETTABLE = (
    IPS_EXPECTED | IPS_CONFIRMED | IPS_NAT_MASK | IPS_SEQ_ADJUST | IPS_SRC_NAT_DONE
    | IPS_DST_NAT_DONE | IPS_DYING | IPS_TEMPLATE | IPS_HELPER | IPS_OFFLOAD | IPS_HW_OFFLOAD
)

TCP_CONNTRACK_STATES = (
    "NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT", "LAST_ACK",
    "TIME_WAIT", "CLOSE", "SYN_SENT2",
)
TCP_CONNTRACK_ESTABLISHED = 3
TCP_CONNTRACK_MAX = len(TCP_CONNTRACK_STATES)

MAX_TIMEOUT = 0x7FFFFFFF // 1000  # the kernel caps jiffies at INT_MAX; keep well inside


class CtEvent(enum.IntEnum):
    NEW = 1
    UPDATE = 2
    DESTROY = 3


class CtFormatError(NftsyncError, ValueError):
    """Bytes handed to `CtEntry.from_bytes` are not a valid peer-protocol entry."""


# --- entry ---------------------------------------------------------------------------------------
WIRE_VERSION = 1
# version, family, l4proto, tcp_state (255 = none), status, mark, timeout, zone, reserved,
# orig src/dst (16 bytes each, IPv4 in the first 4), orig sport/dport, reply src/dst, ports.
_WIRE = struct.Struct(">BBBBIIIHH16s16sHH16s16sHH")
WIRE_SIZE = _WIRE.size  # 92
_NO_STATE = 0xFF
_ZERO12 = bytes(12)


@dataclass(slots=True)
class CtEntry:
    """One conntrack entry, as the kernel reports it (reply tuple already NATed).

    Addresses are packed `bytes` (4 for IPv4, 16 for IPv6). For ICMP/ICMPv6 the "ports" carry
    the echo id (sport) and `type << 8 | code` (dport) of that direction.
    `timeout` is seconds remaining. `ct_id` is the kernel's id: host-local, never sent to peers.
    """

    family: int
    l4proto: int
    orig_src: bytes
    orig_dst: bytes
    orig_sport: int
    orig_dport: int
    reply_src: bytes
    reply_dst: bytes
    reply_sport: int
    reply_dport: int
    mark: int = 0
    status: int = 0
    timeout: int = 0
    tcp_state: int | None = None
    zone: int = 0
    ct_id: int | None = field(default=None, compare=False)

    # -- views --
    @property
    def is_dnat(self) -> bool:
        """The reply comes from somewhere else than the original destination (DNAT/LB).

        Ports count only for TCP/UDP (ICMP "ports" are id and type/code, which differ anyway).
        """
        if self.reply_src != self.orig_dst:
            return True
        return self.l4proto in _PORT_PROTOS and self.reply_sport != self.orig_dport

    @property
    def is_snat(self) -> bool:
        if self.reply_dst != self.orig_src:
            return True
        return self.l4proto in _PORT_PROTOS and self.reply_dport != self.orig_sport

    @property
    def backend(self) -> tuple[str, int] | None:
        """(address, port) the connection was DNATed to, or None if it was not DNATed."""
        if not self.is_dnat:
            return None
        return _ntop(self.family, self.reply_src), self.reply_sport

    @property
    def key(self) -> tuple[int, int, bytes, bytes, int, int, int]:
        """Identity of the entry on any node: original tuple and zone."""
        return (self.family, self.l4proto, self.orig_src, self.orig_dst, self.orig_sport,
                self.orig_dport, self.zone)

    @property
    def state_name(self) -> str | None:
        if self.tcp_state is None:
            return None
        return TCP_CONNTRACK_STATES[self.tcp_state] if self.tcp_state < TCP_CONNTRACK_MAX else "?"

    def __str__(self) -> str:
        f = self.family
        return (f"{self.l4proto} {_ntop(f, self.orig_src)}:{self.orig_sport}->"
                f"{_ntop(f, self.orig_dst)}:{self.orig_dport} reply "
                f"{_ntop(f, self.reply_src)}:{self.reply_sport}->"
                f"{_ntop(f, self.reply_dst)}:{self.reply_dport} mark={self.mark:#x} "
                f"timeout={self.timeout} state={self.state_name}")

    # -- peer wire form --
    def to_bytes(self) -> bytes:
        """Fixed 92-byte, versioned form for the peer protocol (no host-local fields)."""
        pad = _ZERO12 if self.family == AF_INET else b""
        return _WIRE.pack(
            WIRE_VERSION, self.family, self.l4proto,
            _NO_STATE if self.tcp_state is None else self.tcp_state,
            self.status & 0xFFFFFFFF, self.mark & 0xFFFFFFFF,
            min(max(self.timeout, 0), MAX_TIMEOUT),
            self.zone, 0,
            self.orig_src + pad, self.orig_dst + pad, self.orig_sport, self.orig_dport,
            self.reply_src + pad, self.reply_dst + pad, self.reply_sport, self.reply_dport,
        )

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> CtEntry:
        """Parse `to_bytes()` output; anything else raises `CtFormatError`."""
        if len(data) != WIRE_SIZE:
            raise CtFormatError(f"conntrack entry: {len(data)} bytes, expected {WIRE_SIZE}")
        return cls.unpack_from(data, 0)

    @classmethod
    def unpack_from(cls, data: bytes | bytearray | memoryview, offset: int = 0) -> CtEntry:
        """Parse one wire entry at `offset` of a larger buffer (raises `CtFormatError`)."""
        if offset < 0 or len(data) - offset < WIRE_SIZE:
            raise CtFormatError("conntrack entry: truncated")
        (ver, fam, proto, state, status, mark, timeout, zone, _res, osrc, odst, osp, odp,
         rsrc, rdst, rsp, rdp) = _WIRE.unpack_from(data, offset)
        if ver != WIRE_VERSION:
            raise CtFormatError(f"conntrack entry: unsupported version {ver}")
        if fam == AF_INET:
            if osrc[4:] != _ZERO12 or odst[4:] != _ZERO12 or rsrc[4:] != _ZERO12 \
                    or rdst[4:] != _ZERO12:
                raise CtFormatError("conntrack entry: IPv4 address with nonzero padding")
            osrc, odst, rsrc, rdst = osrc[:4], odst[:4], rsrc[:4], rdst[:4]
        elif fam != AF_INET6:
            raise CtFormatError(f"conntrack entry: bad family {fam}")
        if proto not in _WIRE_PROTOS:
            raise CtFormatError(f"conntrack entry: unsupported protocol {proto}")
        if state == _NO_STATE:
            tcp_state = None
        elif state < TCP_CONNTRACK_MAX and proto == IPPROTO_TCP:
            tcp_state = state
        else:
            raise CtFormatError(f"conntrack entry: bad TCP state {state}")
        if timeout > MAX_TIMEOUT:
            raise CtFormatError(f"conntrack entry: timeout {timeout} out of range")
        return cls(fam, proto, osrc, odst, osp, odp, rsrc, rdst, rsp, rdp, mark, status,
                   timeout, tcp_state, zone)

    @classmethod
    def make(cls, client: str, client_port: int, vip: str, vip_port: int, backend: str,
             backend_port: int, *, l4proto: int = IPPROTO_TCP, mark: int = 0,
             timeout: int = 600, tcp_state: int | None = TCP_CONNTRACK_ESTABLISHED,
             status: int = IPS_ASSURED | IPS_SEEN_REPLY, zone: int = 0) -> CtEntry:
        """A DNATed entry client→vip whose reply comes from backend (for tests and tools)."""
        c, v, b = (ipaddress.ip_address(a) for a in (client, vip, backend))
        if not c.version == v.version == b.version:
            raise ValueError("client, vip and backend must be the same address family")
        fam = AF_INET if c.version == 4 else AF_INET6
        if l4proto != IPPROTO_TCP:
            tcp_state = None
        return cls(fam, l4proto, c.packed, v.packed, client_port, vip_port, b.packed, c.packed,
                   backend_port, client_port, mark, status, timeout, tcp_state, zone)


_PORT_PROTOS = frozenset((IPPROTO_TCP, IPPROTO_UDP))
_WIRE_PROTOS = frozenset((IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP, IPPROTO_ICMPV6))


def _ntop(family: int, addr: bytes) -> str:
    try:
        return socket.inet_ntop(family, addr)
    except (ValueError, OSError):
        return addr.hex()


# --- decoding ------------------------------------------------------------------------------------
class _Malformed(Exception):
    """Internal: a kernel message does not parse; the message is skipped and counted."""


_U16 = struct.Struct("<H").unpack_from  # host order (x86/arm little endian), for nla headers
_NLA = struct.Struct("=HH").unpack_from
_NLMSG = struct.Struct("=IHHII").unpack_from
_BE16 = struct.Struct(">H").unpack_from
_BE32 = struct.Struct(">I").unpack_from
_ERR = struct.Struct("=i").unpack_from

# Fast path: the exact layout nf_conntrack_netlink emits for an IPv4 TCP/UDP tuple nest's body
# (CTA_TUPLE_IP{V4_SRC,V4_DST} CTA_TUPLE_PROTO{NUM,SRC_PORT,DST_PORT}, 48 bytes). Headers are
# unpacked and compared against the expected ones in one tuple comparison; values separately.
_T4_HDRS = struct.Struct("=HHHH4xHH4xHHHH4xHH4xHH4x").unpack_from
_T4_VALS = struct.Struct(">8x4s4x4s8xB3x4xH2x4xH2x").unpack_from
_T6_HDRS = struct.Struct("=HHHH16xHH16xHHHH4xHH4xHH4x").unpack_from
_T6_VALS = struct.Struct(">8x16s4x16s8xB3x4xH2x4xH2x").unpack_from
_N = NLA_F_NESTED
_T4_EXPECT = (20, CTA_TUPLE_IP | _N, 8, CTA_IP_V4_SRC, 8, CTA_IP_V4_DST,
              28, CTA_TUPLE_PROTO | _N, 5, CTA_PROTO_NUM, 6, CTA_PROTO_SRC_PORT,
              6, CTA_PROTO_DST_PORT)
_T6_EXPECT = (44, CTA_TUPLE_IP | _N, 20, CTA_IP_V6_SRC, 20, CTA_IP_V6_DST,
              28, CTA_TUPLE_PROTO | _N, 5, CTA_PROTO_NUM, 6, CTA_PROTO_SRC_PORT,
              6, CTA_PROTO_DST_PORT)
_T4_LEN = 48
_T6_LEN = 72
_TMASK = 0x3FFF


def _decode_tuple(buf, off: int, end: int) -> tuple[bytes, bytes, int, int, int, int]:
    """Decode a CTA_TUPLE_* body in buf[off:end] → (src, dst, proto, sport, dport, zone)."""
    n = end - off
    if n == _T4_LEN and _T4_HDRS(buf, off) == _T4_EXPECT:
        src, dst, proto, sport, dport = _T4_VALS(buf, off)
        return src, dst, proto, sport, dport, 0
    if n == _T6_LEN and _T6_HDRS(buf, off) == _T6_EXPECT:
        src, dst, proto, sport, dport = _T6_VALS(buf, off)
        return src, dst, proto, sport, dport, 0
    src = dst = b""
    proto = -1
    sport = dport = zone = 0
    icmp_id = icmp_type = icmp_code = 0
    while end - off >= 4:
        alen, atype = _NLA(buf, off)
        if alen < 4 or alen > end - off:
            raise _Malformed("tuple attribute length")
        atype &= _TMASK
        p, q = off + 4, off + alen
        if atype == CTA_TUPLE_IP:
            while q - p >= 4:
                blen, btype = _NLA(buf, p)
                if blen < 4 or blen > q - p:
                    raise _Malformed("ip attribute length")
                btype &= _TMASK
                size = blen - 4
                if btype in (CTA_IP_V4_SRC, CTA_IP_V6_SRC) and size in (4, 16):
                    src = bytes(buf[p + 4 : p + blen])
                elif btype in (CTA_IP_V4_DST, CTA_IP_V6_DST) and size in (4, 16):
                    dst = bytes(buf[p + 4 : p + blen])
                p += (blen + 3) & ~3
        elif atype == CTA_TUPLE_PROTO:
            while q - p >= 4:
                blen, btype = _NLA(buf, p)
                if blen < 4 or blen > q - p:
                    raise _Malformed("proto attribute length")
                btype &= _TMASK
                size = blen - 4
                if btype == CTA_PROTO_NUM and size >= 1:
                    proto = buf[p + 4]
                elif size >= 2 and btype in (CTA_PROTO_SRC_PORT, CTA_PROTO_ICMP_ID,
                                             CTA_PROTO_ICMPV6_ID):
                    v = _BE16(buf, p + 4)[0]
                    if btype == CTA_PROTO_SRC_PORT:
                        sport = v
                    else:
                        icmp_id = v
                elif btype == CTA_PROTO_DST_PORT and size >= 2:
                    dport = _BE16(buf, p + 4)[0]
                elif btype in (CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMPV6_TYPE) and size >= 1:
                    icmp_type = buf[p + 4]
                elif btype in (CTA_PROTO_ICMP_CODE, CTA_PROTO_ICMPV6_CODE) and size >= 1:
                    icmp_code = buf[p + 4]
                p += (blen + 3) & ~3
        elif atype == CTA_TUPLE_ZONE and alen >= 6:
            zone = _BE16(buf, off + 4)[0]
        off += (alen + 3) & ~3
    if proto < 0 or not src or len(src) != len(dst):
        raise _Malformed("incomplete tuple")
    if proto in (IPPROTO_ICMP, IPPROTO_ICMPV6):
        sport, dport = icmp_id, (icmp_type << 8) | icmp_code
    return src, dst, proto, sport, dport, zone


def _decode_protoinfo(buf, off: int, end: int) -> int | None:
    while end - off >= 4:
        alen, atype = _NLA(buf, off)
        if alen < 4 or alen > end - off:
            raise _Malformed("protoinfo length")
        if atype & _TMASK == CTA_PROTOINFO_TCP:
            p, q = off + 4, off + alen
            while q - p >= 4:
                blen, btype = _NLA(buf, p)
                if blen < 4 or blen > q - p:
                    raise _Malformed("tcp protoinfo length")
                if btype & _TMASK == CTA_PROTOINFO_TCP_STATE and blen >= 5:
                    return buf[p + 4]
                p += (blen + 3) & ~3
        off += (alen + 3) & ~3
    return None


def _scan(buf, off: int, end: int) -> tuple[int, int, int, int, int, int, int, int, int, int,
                                             int | None]:
    """One pass over the top-level attributes of a ctnetlink message.

    Returns (orig_off, orig_end, reply_off, reply_end, status, timeout, mark, zone,
    protoinfo_off, protoinfo_end, ct_id); tuple offsets are -1 when absent. Cheap: only the
    scalars are decoded, so the mark filter can run before the tuples are.
    """
    o_off = o_end = r_off = r_end = p_off = p_end = -1
    status = timeout = mark = zone = 0
    ct_id = None
    while end - off >= 4:
        alen, atype = _NLA(buf, off)
        if alen < 4 or alen > end - off:
            raise _Malformed("attribute length")
        atype &= _TMASK
        if atype == CTA_TUPLE_ORIG:
            o_off, o_end = off + 4, off + alen
        elif atype == CTA_TUPLE_REPLY:
            r_off, r_end = off + 4, off + alen
        elif alen == 8:
            if atype == CTA_MARK:
                mark = _BE32(buf, off + 4)[0]
            elif atype == CTA_STATUS:
                status = _BE32(buf, off + 4)[0]
            elif atype == CTA_TIMEOUT:
                timeout = _BE32(buf, off + 4)[0]
            elif atype == CTA_ID:
                ct_id = _BE32(buf, off + 4)[0]
        elif atype == CTA_PROTOINFO:
            p_off, p_end = off + 4, off + alen
        elif atype == CTA_ZONE and alen >= 6:
            zone = _BE16(buf, off + 4)[0]
        off += (alen + 3) & ~3
    return o_off, o_end, r_off, r_end, status, timeout, mark, zone, p_off, p_end, ct_id


def decode_entry(buf, off: int, end: int, family: int,
                 marks: frozenset[int] | None = None, mark_mask: int = 0xFFFFFFFF
                 ) -> CtEntry | None:
    """Decode the attributes of one ctnetlink message (after nfgenmsg) at buf[off:end].

    Returns None if `marks` is given and `(mark & mark_mask)` is not in it. Raises `_Malformed`
    (internal) for anything that does not parse; callers count and skip.
    """
    (o_off, o_end, r_off, r_end, status, timeout, mark, zone, p_off, p_end,
     ct_id) = _scan(buf, off, end)
    if marks is not None and (mark & mark_mask) not in marks:
        return None
    if o_off < 0 or r_off < 0:
        raise _Malformed("missing tuple")
    osrc, odst, oproto, osport, odport, ozone = _decode_tuple(buf, o_off, o_end)
    rsrc, rdst, rproto, rsport, rdport, _rz = _decode_tuple(buf, r_off, r_end)
    if oproto != rproto or len(osrc) != len(rsrc):
        raise _Malformed("tuples disagree")
    if len(osrc) != (4 if family == AF_INET else 16 if family == AF_INET6 else -1):
        raise _Malformed("address length does not match family")
    tcp_state = _decode_protoinfo(buf, p_off, p_end) if p_off >= 0 else None
    return CtEntry(family, oproto, osrc, odst, osport, odport, rsrc, rdst, rsport, rdport,
                   mark, status, timeout, tcp_state, zone or ozone, ct_id)


@dataclass(slots=True)
class CtStats:
    """Counters of a ctnetlink socket (monotonic; read them, don't reset them)."""

    messages: int = 0  # netlink messages seen
    events: int = 0  # entries returned
    filtered: int = 0  # dropped by the mark filter or port-id filter before decoding
    malformed: int = 0  # truncated/undecodable messages, skipped
    overruns: int = 0  # ENOBUFS seen: events were lost, reconcile by dump
    errors: int = 0  # NLMSG_ERROR or unexpected message types


class CtEvents(list):
    """The list `CtEventSocket.read()` returns, plus `overrun`: True if ENOBUFS was hit.

    On overrun the events before and after the loss are still returned; the caller must
    reconcile its view with a `dump()` because some events in between are gone.
    """

    __slots__ = ("overrun",)

    def __init__(self) -> None:
        super().__init__()
        self.overrun = False


def parse_messages(buf, end: int, stats: CtStats, out: list,
                   marks: frozenset[int] | None = None, mark_mask: int = 0xFFFFFFFF,
                   ignore_portids: frozenset[int] = frozenset(), with_event: bool = True) -> bool:
    """Decode every ctnetlink message in buf[:end] into `out`; never raises on bad input.

    Appends `(CtEvent, CtEntry)` (or bare `CtEntry` if not `with_event`). Returns True if an
    NLMSG_DONE was seen (end of a dump). NLMSG_ERROR payloads raise `NetlinkError` only when
    they carry an errno, which is the kernel refusing our own request, not malformed input.
    """
    off = 0
    done = False
    while end - off >= 16:
        mlen, mtype, mflags, _seq, mpid = _NLMSG(buf, off)
        if mlen < 16 or mlen > end - off:
            stats.malformed += 1
            return done
        stats.messages += 1
        nxt = off + ((mlen + 3) & ~3)
        if mtype in (CT_NEW, CT_DELETE):
            if mpid in ignore_portids:
                stats.filtered += 1
            elif mlen < 20:
                stats.malformed += 1
            else:
                try:
                    ct = decode_entry(buf, off + 20, off + mlen, buf[off + 16], marks, mark_mask)
                except (_Malformed, struct.error, IndexError):
                    stats.malformed += 1
                    ct = None
                else:
                    if ct is None:
                        stats.filtered += 1
                if ct is not None:
                    stats.events += 1
                    if not with_event:
                        out.append(ct)
                    elif mtype == CT_DELETE:
                        out.append((CtEvent.DESTROY, ct))
                    elif mflags & (NLM_F_CREATE | NLM_F_EXCL) == NLM_F_CREATE | NLM_F_EXCL:
                        out.append((CtEvent.NEW, ct))
                    else:
                        out.append((CtEvent.UPDATE, ct))
        elif mtype == NLMSG_DONE:
            done = True
        elif mtype == NLMSG_ERROR:
            stats.errors += 1
            if mlen >= 20:
                err = -_ERR(buf, off + 16)[0]
                if err:
                    raise NetlinkError(err, "ctnetlink request")
                done = True
        else:
            stats.errors += 1
        off = nxt
    return done


# --- event socket --------------------------------------------------------------------------------
ALL_EVENTS = (1 << (NFNLGRP_CONNTRACK_NEW - 1)) | (1 << (NFNLGRP_CONNTRACK_UPDATE - 1)) \
    | (1 << (NFNLGRP_CONNTRACK_DESTROY - 1))
EV_NEW = 1 << (NFNLGRP_CONNTRACK_NEW - 1)
EV_UPDATE = 1 << (NFNLGRP_CONNTRACK_UPDATE - 1)
EV_DESTROY = 1 << (NFNLGRP_CONNTRACK_DESTROY - 1)


class CtEventSocket:
    """Non-blocking subscriber to conntrack events (NEW/UPDATE/DESTROY groups).

    Use `fileno()` with `loop.add_reader`, then `read()` until it returns an empty list.
    The receive buffer is forced with SO_RCVBUFFORCE (64 MiB by default; net.core.rmem_max does
    not cap it), so bursts of ~100k events are absorbed.

    `marks`/`mark_mask`: keep only entries with `(ct mark & mark_mask) in marks`; tested before
    the tuples are decoded. `ignore_portids`: drop events caused by these netlink sockets
    (e.g. `{writer.portid}`, the echo of our own inserts).
    """

    def __init__(self, groups: int = ALL_EVENTS, rcvbuf: int = 64 << 20,
                 marks: Iterable[int] | None = None, mark_mask: int = 0xFFFFFFFF,
                 ignore_portids: Iterable[int] = (), max_events: int = 4096) -> None:
        self.sock = NetlinkSocket(NETLINK_NETFILTER, groups=groups, rcvbuf=rcvbuf,
                                  recv_buffer=1 << 16)
        self.marks = frozenset(marks) if marks is not None else None
        self.mark_mask = mark_mask
        self.ignore_portids = frozenset(ignore_portids)
        self.max_events = max_events
        self.stats = CtStats()

    @property
    def portid(self) -> int:
        return self.sock.pid

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self, max_events: int | None = None) -> CtEvents:
        """Drain queued events (at most about `max_events`, default from the constructor).

        Never raises for malformed kernel messages (they are counted in `stats.malformed`).
        ENOBUFS sets `.overrun` on the result and counts `stats.overruns`; the socket keeps
        working.
        """
        limit = self.max_events if max_events is None else max_events
        out = CtEvents()
        recv_into = self.sock.sock.recv_into
        buf = self.sock._buf
        stats = self.stats
        marks, mask, ign = self.marks, self.mark_mask, self.ignore_portids
        while len(out) < limit:
            try:
                n = recv_into(buf)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno != _errno.ENOBUFS:
                    raise
                stats.overruns += 1
                out.overrun = True
                continue
            try:
                parse_messages(buf, n, stats, out, marks, mask, ign)
            except NetlinkError:
                stats.errors += 1
        return out

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> CtEventSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- dump ----------------------------------------------------------------------------------------
def dump(mark: int | None = None, mask: int | None = None, family: int = 0,
         timeout: float = 10.0) -> Iterator[CtEntry]:
    """Iterate over the conntrack table of the calling thread's network namespace.

    With `mark` (and optionally `mask`) the kernel filters on `(ct mark & mask) == mark`
    (CTA_MARK/CTA_MARK_MASK). `family` 0 = IPv4 and IPv6. The socket is opened at call time
    (in the caller's namespace) and closed when the iterator ends or is closed.
    """
    sock = NetlinkSocket(NETLINK_NETFILTER, rcvbuf=8 << 20)
    try:
        attrs = b""
        if mask is not None and mark is None:
            raise ValueError("dump: a mask needs a mark")
        if mark is not None:
            m = mask if mask is not None else 0xFFFFFFFF
            attrs = _nla_be32_pack(8, CTA_MARK, mark & m) + _nla_be32_pack(8, CTA_MARK_MASK, m)
        seq = sock.next_seq()
        body = _NFGEN(family, 0, 0) + attrs
        sock.send(_NLMSGHDR.pack(16 + len(body), CT_GET, NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
                  + body)
    except BaseException:
        sock.close()
        raise
    return _dump_iter(sock, timeout)


def _dump_iter(sock: NetlinkSocket, timeout: float) -> Iterator[CtEntry]:
    stats = CtStats()
    try:
        while True:
            mv = sock.recv_blocking(timeout)
            if mv is None:
                raise NetlinkError(_errno.ETIMEDOUT, "conntrack dump")
            out: list[CtEntry] = []
            done = parse_messages(sock._buf, len(mv), stats, out, with_event=False)
            yield from out
            if done:
                return
    finally:
        sock.close()


# --- writer --------------------------------------------------------------------------------------
_NLMSGHDR = struct.Struct("=IHHII")
_NFGEN = struct.Struct("=BBH").pack
_NLA_HDR = struct.Struct("=HH").pack


def _nla_be32_pack(length: int, atype: int, value: int) -> bytes:
    return _NLA_HDR(length, atype) + value.to_bytes(4, "big")

# Tuple bodies (host-order headers, network-order values). Ports are passed byte-swapped so a
# single little-endian pack can build the whole nest.
_TUP4 = struct.Struct("<HHHH HH4s HH4s HH HHB3x HHH2x HHH2x".replace(" ", "")).pack
_TUP6 = struct.Struct("<HHHH HH16s HH16s HH HHB3x HHH2x HHH2x".replace(" ", "")).pack
_SCALARS = struct.Struct(">HHI HHI HHI".replace(" ", "")).pack  # pre-swapped headers
_TCPINFO = struct.Struct("<HH HH HHB3x HHBB2x HHBB2x".replace(" ", "")).pack
_ZONE = struct.Struct("<HHH2x").pack


def _sw16(x: int) -> int:
    return ((x & 0xFF) << 8) | (x >> 8)


_SCALAR_HDRS = (_sw16(8), _sw16(CTA_STATUS), _sw16(8), _sw16(CTA_TIMEOUT), _sw16(8),
                _sw16(CTA_MARK))


def _tuple_nest(nest: int, family: int, proto: int, src: bytes, dst: bytes, sport: int,
                dport: int) -> bytes:
    """A CTA_TUPLE_ORIG/REPLY nest. Zones go in top-level CTA_ZONE (both directions), never
    in CTA_TUPLE_ZONE, which the kernel reads as a zone for that direction only."""
    if proto in (IPPROTO_TCP, IPPROTO_UDP):
        sp = ((sport & 0xFF) << 8) | (sport >> 8)
        dp = ((dport & 0xFF) << 8) | (dport >> 8)
        if family == AF_INET:
            return _TUP4(52, nest | _N, 20, CTA_TUPLE_IP | _N, 8, CTA_IP_V4_SRC, src,
                         8, CTA_IP_V4_DST, dst, 28, CTA_TUPLE_PROTO | _N, 5, CTA_PROTO_NUM,
                         proto, 6, CTA_PROTO_SRC_PORT, sp, 6, CTA_PROTO_DST_PORT, dp)
        return _TUP6(76, nest | _N, 44, CTA_TUPLE_IP | _N, 20, CTA_IP_V6_SRC, src,
                     20, CTA_IP_V6_DST, dst, 28, CTA_TUPLE_PROTO | _N, 5, CTA_PROTO_NUM,
                     proto, 6, CTA_PROTO_SRC_PORT, sp, 6, CTA_PROTO_DST_PORT, dp)
    if family == AF_INET:
        ip = nla_nested(CTA_TUPLE_IP, nla(CTA_IP_V4_SRC, src), nla(CTA_IP_V4_DST, dst))
    else:
        ip = nla_nested(CTA_TUPLE_IP, nla(CTA_IP_V6_SRC, src), nla(CTA_IP_V6_DST, dst))
    parts = [nla_u8(CTA_PROTO_NUM, proto)]
    if proto in (IPPROTO_ICMP, IPPROTO_ICMPV6):
        v6 = proto == IPPROTO_ICMPV6
        parts += [
            nla_be16(CTA_PROTO_ICMPV6_ID if v6 else CTA_PROTO_ICMP_ID, sport),
            nla_u8(CTA_PROTO_ICMPV6_TYPE if v6 else CTA_PROTO_ICMP_TYPE, dport >> 8),
            nla_u8(CTA_PROTO_ICMPV6_CODE if v6 else CTA_PROTO_ICMP_CODE, dport & 0xFF),
        ]
    return nla_nested(nest, ip, nla_nested(CTA_TUPLE_PROTO, *parts))


def _nat_nest(nest: int, family: int, addr: bytes, port: int | None) -> bytes:
    if family == AF_INET:
        parts = [nla(CTA_NAT_V4_MINIP, addr), nla(CTA_NAT_V4_MAXIP, addr)]
    else:
        parts = [nla(CTA_NAT_V6_MINIP, addr), nla(CTA_NAT_V6_MAXIP, addr)]
    if port is not None:
        parts.append(nla_nested(CTA_NAT_PROTO, nla_be16(CTA_PROTONAT_PORT_MIN, port),
                                nla_be16(CTA_PROTONAT_PORT_MAX, port)))
    return nla_nested(nest, *parts)


def _tcp_protoinfo(state: int) -> bytes:
    # CTA_PROTOINFO{ CTA_PROTOINFO_TCP{ STATE, FLAGS_ORIGINAL, FLAGS_REPLY } } = 4+4+8+8+8
    lib = IP_CT_TCP_FLAG_BE_LIBERAL
    return _TCPINFO(32, CTA_PROTOINFO | _N, 28, CTA_PROTOINFO_TCP | _N,
                    5, CTA_PROTOINFO_TCP_STATE, state,
                    6, CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, lib, lib,
                    6, CTA_PROTOINFO_TCP_FLAGS_REPLY, lib, lib)


def build_create(ct: CtEntry) -> bytes:
    """Attributes (after nfgenmsg) of an IPCTNL_MSG_CT_NEW that creates `ct` with its NAT."""
    fam, proto = ct.family, ct.l4proto
    parts = [_tuple_nest(CTA_TUPLE_ORIG, fam, proto, ct.orig_src, ct.orig_dst, ct.orig_sport,
                         ct.orig_dport)]
    if proto in (IPPROTO_TCP, IPPROTO_UDP):
        # Reply = inverse of the original; CTA_NAT_* make the kernel NAT it (and set the
        # IPS_*_NAT bits, so packets are translated).
        parts.append(_tuple_nest(CTA_TUPLE_REPLY, fam, proto, ct.orig_dst, ct.orig_src,
                                 ct.orig_dport, ct.orig_sport))
    else:
        parts.append(_tuple_nest(CTA_TUPLE_REPLY, fam, proto, ct.reply_src, ct.reply_dst,
                                 ct.reply_sport, ct.reply_dport))
    parts.append(_SCALARS(*_SCALAR_HDRS[:2], (ct.status & ~_IPS_NOT_SETTABLE) | IPS_CONFIRMED,
                          *_SCALAR_HDRS[2:4], min(max(ct.timeout, 1), MAX_TIMEOUT),
                          *_SCALAR_HDRS[4:], ct.mark & 0xFFFFFFFF))
    if proto == IPPROTO_TCP and ct.tcp_state is not None:
        parts.append(_tcp_protoinfo(ct.tcp_state))
    if proto in (IPPROTO_TCP, IPPROTO_UDP):
        if ct.reply_src != ct.orig_dst or ct.reply_sport != ct.orig_dport:
            parts.append(_nat_nest(CTA_NAT_DST, fam, ct.reply_src,
                                   ct.reply_sport if ct.reply_sport != ct.orig_dport else None))
        if ct.reply_dst != ct.orig_src or ct.reply_dport != ct.orig_sport:
            parts.append(_nat_nest(CTA_NAT_SRC, fam, ct.reply_dst,
                                   ct.reply_dport if ct.reply_dport != ct.orig_sport else None))
    if ct.zone:
        parts.append(_ZONE(6, CTA_ZONE, _sw16(ct.zone)))
    return b"".join(parts)


def build_update(ct: CtEntry) -> bytes:
    """Attributes of an IPCTNL_MSG_CT_NEW (no CREATE) that refreshes an existing entry.

    No NAT (refused on existing entries) and no reply tuple (lookup is by the original).
    CTA_STATUS is sent only if the entry is ASSURED: the kernel refuses to clear ASSURED or
    SEEN_REPLY, and an entry we know less about must not fail for that.
    """
    parts = [_tuple_nest(CTA_TUPLE_ORIG, ct.family, ct.l4proto, ct.orig_src, ct.orig_dst,
                         ct.orig_sport, ct.orig_dport)]
    timeout = min(max(ct.timeout, 1), MAX_TIMEOUT)
    if ct.status & IPS_ASSURED:
        parts.append(_SCALARS(*_SCALAR_HDRS[:2],
                              (ct.status & ~_IPS_NOT_SETTABLE) | IPS_CONFIRMED | IPS_SEEN_REPLY,
                              *_SCALAR_HDRS[2:4], timeout, *_SCALAR_HDRS[4:],
                              ct.mark & 0xFFFFFFFF))
    else:
        parts.append(_nla_be32_pack(8, CTA_TIMEOUT, timeout))
        parts.append(_nla_be32_pack(8, CTA_MARK, ct.mark & 0xFFFFFFFF))
    if ct.l4proto == IPPROTO_TCP and ct.tcp_state is not None:
        parts.append(_tcp_protoinfo(ct.tcp_state))
    if ct.zone:
        parts.append(_ZONE(6, CTA_ZONE, _sw16(ct.zone)))
    return b"".join(parts)


def build_delete(ct: CtEntry) -> bytes:
    """Attributes of an IPCTNL_MSG_CT_DELETE by original tuple (and zone)."""
    t = _tuple_nest(CTA_TUPLE_ORIG, ct.family, ct.l4proto, ct.orig_src, ct.orig_dst,
                    ct.orig_sport, ct.orig_dport)
    return t + _ZONE(6, CTA_ZONE, _sw16(ct.zone)) if ct.zone else t


@dataclass(slots=True)
class ApplyResult:
    """Outcome of `CtWriter.apply`: counts, and each failure as (op, entry, errno)."""

    applied: int = 0  # created, updated or deleted
    created: int = 0
    updated: int = 0
    deleted: int = 0
    absent: int = 0  # deletes of entries that were not there (ENOENT): not failures
    failed: list[tuple[str, CtEntry, int]] = field(default_factory=list)


class CtWriter:
    """Batched conntrack writer: many messages per sendmsg, errors only, one ACK per datagram.

    `apply([("upsert", ct), ("delete", ct), ...])`:
    * upsert = NEW with NLM_F_CREATE|NLM_F_EXCL and the full entry (tuples, timeout, status,
      mark, TCP state with BE_LIBERAL, NAT); the entries that answer EEXIST are then sent again
      as updates (NEW without CREATE: timeout, status, mark, TCP state; NAT cannot change).
    * delete = DELETE by original tuple; ENOENT counts as `absent`, not as a failure.

    The kernel handles a datagram to itself synchronously, so after each sendmsg all replies are
    queued; the last message of each datagram carries NLM_F_ACK as a barrier, then replies are
    drained before the next datagram (error replies never pile up past the receive buffer).
    """

    def __init__(self, batch_bytes: int = 64 << 10, rcvbuf: int = 16 << 20) -> None:
        self.batch_bytes = batch_bytes
        self.sock = NetlinkSocket(NETLINK_NETFILTER, rcvbuf=rcvbuf,
                                  sndbuf=max(4 * batch_bytes, 1 << 20))
        self.portid = self.sock.pid

    def fileno(self) -> int:
        return self.sock.fileno()

    def apply(self, ops: Iterable[tuple[str, CtEntry]]) -> ApplyResult:
        res = ApplyResult()
        retry: list[CtEntry] = []
        batch: list[bytes] = []
        meta: list[tuple[str, CtEntry]] = []
        size = 0
        limit = self.batch_bytes
        hdr = _NLMSGHDR.pack
        for op, ct in ops:
            if op == "upsert":
                body = build_create(ct)
                mtype, flags = CT_NEW, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL
            elif op == "delete":
                body = build_delete(ct)
                mtype, flags = CT_DELETE, NLM_F_REQUEST
            else:
                raise ValueError(f"CtWriter.apply: unknown op {op!r} (want 'upsert' or 'delete')")
            n = 20 + len(body)
            if size + n > limit and batch:
                self._flush(batch, meta, res, retry)
                batch, meta, size = [], [], 0
            batch.append(hdr(n, mtype, flags, 0, 0) + _NFGEN(ct.family, 0, 0) + body)
            meta.append((op, ct))
            size += n
        if batch:
            self._flush(batch, meta, res, retry)
        # Second pass: entries that already existed get an update.
        batch, meta, size = [], [], 0
        for ct in retry:
            body = build_update(ct)
            n = 20 + len(body)
            if size + n > limit and batch:
                self._flush(batch, meta, res, None)
                batch, meta, size = [], [], 0
            batch.append(hdr(n, CT_NEW, NLM_F_REQUEST, 0, 0) + _NFGEN(ct.family, 0, 0) + body)
            meta.append(("update", ct))
            size += n
        if batch:
            self._flush(batch, meta, res, None)
        return res

    def _flush(self, msgs: list[bytes], meta: list[tuple[str, CtEntry]], res: ApplyResult,
               retry: list[CtEntry] | None) -> None:
        """Number the messages, ACK the last, send as one datagram, collect errors by seq."""
        count = len(msgs)
        first = self.sock.next_seq(count)
        set_seq = _SEQ.pack_into
        data = bytearray(b"".join(msgs))
        off = 0
        for i, m in enumerate(msgs):
            set_seq(data, off + 8, first + i)
            off += len(m)
        last_off = off - len(msgs[-1])
        flags = _U16(data, last_off + 6)[0]
        _FLAGS.pack_into(data, last_off + 6, flags | NLM_F_ACK)
        self.sock.send(data)
        failed: dict[int, int] = {}
        last = first + count - 1
        finished = False
        while not finished:
            mv = self.sock.recv_blocking(10.0)
            if mv is None:
                raise NetlinkError(_errno.ETIMEDOUT, "conntrack write: no ACK")
            buf, end, off = self.sock._buf, len(mv), 0
            while end - off >= 16:
                mlen, mtype, _f, seq, _pid = _NLMSG(buf, off)
                if mlen < 16 or mlen > end - off:
                    break
                if mtype == NLMSG_ERROR and mlen >= 20 and first <= seq <= last:
                    err = -_ERR(buf, off + 16)[0]
                    if err:
                        failed[seq - first] = err
                    if seq == last:
                        finished = True
                off += (mlen + 3) & ~3
        for i, (op, ct) in enumerate(meta):
            err = failed.get(i, 0)
            if not err:
                res.applied += 1
                if op == "upsert":
                    res.created += 1
                elif op == "update":
                    res.updated += 1
                else:
                    res.deleted += 1
            elif op == "upsert" and err == _errno.EEXIST and retry is not None:
                retry.append(ct)
            elif op == "delete" and err == _errno.ENOENT:
                res.absent += 1
            else:
                res.failed.append((op, ct, err))

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> CtWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_SEQ = struct.Struct("=I")
_FLAGS = struct.Struct("=H")

__all__ = [
    "ALL_EVENTS", "EV_DESTROY", "EV_NEW", "EV_UPDATE", "ApplyResult", "CtEntry", "CtEvent",
    "CtEventSocket", "CtEvents", "CtFormatError", "CtStats", "CtWriter", "NetlinkOverrun",
    "WIRE_SIZE", "build_create", "build_delete", "build_update", "decode_entry", "dump",
    "parse_messages",
]
