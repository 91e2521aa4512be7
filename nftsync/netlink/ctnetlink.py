"""ctnetlink messages: conntrack entries to and from the kernel's attributes, hand-coded for speed.

The daemon learns client→backend sessions from conntrack events (ct mark = backend mark, reply
tuple = DNAT target) and replicates entries between load-balancer peers. Rates of 25k+/s rule
out a generic netlink parser and one-ACK-per-entry writes. Like pyroute2, messages are declared
apart from sockets: this module only translates between ctnetlink messages and `CtEntry`
(`nftsync.conntrack`); `ctsocket` holds the event socket, the dump and the batched writer. It

* decodes events straight out of the receive buffer with `struct.unpack_from` at absolute offsets
  (no slicing), with a fast path for the fixed layout the kernel emits for IPv4/IPv6 TCP/UDP
  tuples and a defensive generic walk for everything else;
* can drop events by ct mark and by originating netlink port id before decoding tuples;
* builds the create/update/delete/dump messages (`ctsocket.CtWriter` sends many per `sendmsg`).

The peer-protocol form of an entry is not here: it belongs to `nftsync.proto.conntrack`, so a
change to a kernel decoder cannot change the protocol.

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
import struct
from dataclasses import dataclass

from nftsync.conntrack import (
    AF_INET,
    AF_INET6,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPS_ASSURED,
    IPS_CONFIRMED,
    IPS_DST_NAT,
    IPS_DST_NAT_DONE,
    IPS_DYING,
    IPS_EXPECTED,
    IPS_FIXED_TIMEOUT,
    IPS_HELPER,
    IPS_HW_OFFLOAD,
    IPS_NAT_MASK,
    IPS_OFFLOAD,
    IPS_SEEN_REPLY,
    IPS_SEQ_ADJUST,
    IPS_SRC_NAT,
    IPS_SRC_NAT_DONE,
    IPS_TEMPLATE,
    MAX_TIMEOUT,
    TCP_CONNTRACK_ESTABLISHED,
    TCP_CONNTRACK_MAX,
    TCP_CONNTRACK_STATES,
    CtEntry,
)
from nftsync.netlink.core import (
    NFNL_SUBSYS_CTNETLINK,
    NLA_F_NESTED,
    NLM_F_CREATE,
    NLM_F_EXCL,
    NLMSG_DONE,
    NLMSG_ERROR,
    NetlinkError,
    NetlinkOverrun,
    nfnl_type,
    nla,
    nla_be16,
    nla_nested,
    nla_u8,
)

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
ALL_EVENTS = (1 << (NFNLGRP_CONNTRACK_NEW - 1)) | (1 << (NFNLGRP_CONNTRACK_UPDATE - 1)) \
    | (1 << (NFNLGRP_CONNTRACK_DESTROY - 1))
EV_NEW = 1 << (NFNLGRP_CONNTRACK_NEW - 1)
EV_UPDATE = 1 << (NFNLGRP_CONNTRACK_UPDATE - 1)
EV_DESTROY = 1 << (NFNLGRP_CONNTRACK_DESTROY - 1)

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

# Bits the kernel ignores or refuses in CTA_STATUS; we never send them (CONFIRMED is added).
_IPS_NOT_SETTABLE = (
    IPS_EXPECTED | IPS_CONFIRMED | IPS_NAT_MASK | IPS_SEQ_ADJUST | IPS_SRC_NAT_DONE
    | IPS_DST_NAT_DONE | IPS_DYING | IPS_TEMPLATE | IPS_HELPER | IPS_OFFLOAD | IPS_HW_OFFLOAD
)


class CtEvent(enum.IntEnum):
    """What a ctnetlink event message reports (see the module docstring for how it is told)."""

    NEW = 1
    UPDATE = 2
    DESTROY = 3


# --- decoding ------------------------------------------------------------------------------------
class _Malformed(Exception):
    """Internal: a kernel message does not parse; the message is skipped and counted."""


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


# --- building ------------------------------------------------------------------------------------
_NLA_HDR = struct.Struct("=HH").pack


def _nla_be32_pack(length: int, atype: int, value: int) -> bytes:
    return _NLA_HDR(length, atype) + value.to_bytes(4, "big")


def build_dump(mark: int | None = None, mask: int | None = None) -> bytes:
    """Attributes of an IPCTNL_MSG_CT_GET dump request: none, or a CTA_MARK/CTA_MARK_MASK filter
    (the kernel keeps `(ct mark & mask) == mark`; mask defaults to all bits)."""
    if mask is not None and mark is None:
        raise ValueError("dump: a mask needs a mark")
    if mark is None:
        return b""
    m = mask if mask is not None else 0xFFFFFFFF
    return _nla_be32_pack(8, CTA_MARK, mark & m) + _nla_be32_pack(8, CTA_MARK_MASK, m)


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


# Names that moved to `ctsocket` (sockets) or to the peer protocol, still importable from here:
# name -> (module, name there). Resolved on first use, because `ctsocket` imports this module.
__all__ = [
    "AF_INET", "AF_INET6", "ALL_EVENTS", "EV_DESTROY", "EV_NEW", "EV_UPDATE", "IPPROTO_ICMP",
    "IPPROTO_ICMPV6", "IPPROTO_TCP", "IPPROTO_UDP", "IPS_ASSURED", "IPS_CONFIRMED",
    "IPS_DST_NAT", "IPS_DST_NAT_DONE", "IPS_DYING", "IPS_EXPECTED", "IPS_FIXED_TIMEOUT",
    "IPS_HELPER", "IPS_HW_OFFLOAD", "IPS_NAT_MASK", "IPS_OFFLOAD", "IPS_SEEN_REPLY",
    "IPS_SEQ_ADJUST", "IPS_SRC_NAT", "IPS_SRC_NAT_DONE", "IPS_TEMPLATE", "MAX_TIMEOUT",
    "TCP_CONNTRACK_ESTABLISHED", "TCP_CONNTRACK_MAX", "TCP_CONNTRACK_STATES",
    "CtEvent", "CtStats", "NetlinkOverrun", "build_create", "build_delete", "build_dump",
    "build_update", "decode_entry", "parse_messages",
]
