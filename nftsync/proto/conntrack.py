"""The body of a replicated conntrack entry: the `entry` bytes of a ConntrackRecord.

The layout is declared once, field by field, in `CT_ENTRY_FIELDS`; the codec and the coalescing
key are both derived from it, and docs/protocol.md ("ConntrackRecord (type 2)") documents the
same table. It is frozen: peers of every version 1 release read each other's entries, so a field
is never moved or resized (a new layout needs a new entry version or protocol version). The
kernel decoders in `nftsync.netlink` never touch these bytes; they only produce and consume
`CtEntry` values (`nftsync.conntrack`).

Pure bytes, like `frames`: no sockets, fuzzable. Hostile bytes raise `CtFormatError` only.
"""

from __future__ import annotations

import struct
from types import MappingProxyType

from nftsync.conntrack import (
    AF_INET,
    AF_INET6,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    MAX_TIMEOUT,
    TCP_CONNTRACK_MAX,
    CtEntry,
)
from nftsync.errors import NftsyncError


class CtFormatError(NftsyncError, ValueError):
    """Bytes handed to `decode_ct` are not a valid peer-protocol conntrack entry.

    Not a `ProtocolError`: the record around it is well formed, so the receiver refuses this one
    record (cause `bad_record`) and keeps the link up.
    """


CT_ENTRY_VERSION = 1

#: (field, struct code), in wire order; big-endian, no padding between fields.
CT_ENTRY_LAYOUT: tuple[tuple[str, str], ...] = (
    ("version", "B"),  # CT_ENTRY_VERSION
    ("family", "B"),  # AF_INET 2, AF_INET6 10
    ("l4proto", "B"),  # TCP 6, UDP 17, ICMP 1, ICMPv6 58
    ("tcp_state", "B"),  # enum tcp_conntrack, 255 = none (not TCP)
    ("status", "I"),  # ip_conntrack_status bits
    ("mark", "I"),  # ct mark (the farm's backend mark)
    ("timeout", "I"),  # seconds left, 0..MAX_TIMEOUT
    ("zone", "H"),  # conntrack zone
    ("reserved", "H"),  # 0
    ("orig_src", "16s"),  # IPv4 in the first 4 bytes, the other 12 zero
    ("orig_dst", "16s"),
    ("orig_sport", "H"),  # ICMP: echo id
    ("orig_dport", "H"),  # ICMP: type << 8 | code
    ("reply_src", "16s"),
    ("reply_dst", "16s"),
    ("reply_sport", "H"),
    ("reply_dport", "H"),
)

_WIRE = struct.Struct(">" + "".join(code for _, code in CT_ENTRY_LAYOUT))
CT_ENTRY_SIZE = _WIRE.size


def _field_slices() -> dict[str, slice]:
    out: dict[str, slice] = {}
    off = 0
    for name, code in CT_ENTRY_LAYOUT:
        size = struct.calcsize(">" + code)
        out[name] = slice(off, off + size)
        off += size
    return out


#: field name -> slice of the entry bytes, computed from the layout.
CT_ENTRY_FIELDS = MappingProxyType(_field_slices())

#: What identifies a connection on every node (as `CtEntry.key`), in wire order.
CT_KEY_FIELDS = ("family", "l4proto", "zone", "orig_src", "orig_dst", "orig_sport",
                 "orig_dport")


def _merged(names: tuple[str, ...]) -> tuple[slice, ...]:
    """The fields' slices, adjacent ones merged: fewer slices to join on the hot path."""
    spans: list[list[int]] = []
    for name in names:
        s = CT_ENTRY_FIELDS[name]
        if spans and spans[-1][1] == s.start:
            spans[-1][1] = s.stop
        else:
            spans.append([s.start, s.stop])
    return tuple(slice(a, b) for a, b in spans)


_KEY_SLICES = _merged(CT_KEY_FIELDS)
_NO_STATE = 0xFF
_ZERO12 = bytes(12)
_WIRE_PROTOS = frozenset((IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP, IPPROTO_ICMPV6))


def encode_ct(ct: CtEntry) -> bytes:
    """The fixed-size, versioned entry body for the peer protocol (no host-local fields).

    Never fails for a kernel-made entry: the timeout is clamped to 0..MAX_TIMEOUT and status and
    mark to 32 bits; `ct_id` is not sent.
    """
    pad = _ZERO12 if ct.family == AF_INET else b""
    return _WIRE.pack(
        CT_ENTRY_VERSION, ct.family, ct.l4proto,
        _NO_STATE if ct.tcp_state is None else ct.tcp_state,
        ct.status & 0xFFFFFFFF, ct.mark & 0xFFFFFFFF,
        min(max(ct.timeout, 0), MAX_TIMEOUT),
        ct.zone, 0,
        ct.orig_src + pad, ct.orig_dst + pad, ct.orig_sport, ct.orig_dport,
        ct.reply_src + pad, ct.reply_dst + pad, ct.reply_sport, ct.reply_dport,
    )


def decode_ct(data: bytes | bytearray | memoryview) -> CtEntry:
    """Parse `encode_ct()` output; anything else raises `CtFormatError`."""
    if len(data) != CT_ENTRY_SIZE:
        raise CtFormatError(f"conntrack entry: {len(data)} bytes, expected {CT_ENTRY_SIZE}")
    (ver, fam, proto, state, status, mark, timeout, zone, _res, osrc, odst, osp, odp,
     rsrc, rdst, rsp, rdp) = _WIRE.unpack(data)
    if ver != CT_ENTRY_VERSION:
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
    return CtEntry(fam, proto, osrc, odst, osp, odp, rsrc, rdst, rsp, rdp, mark, status,
                   timeout, tcp_state, zone)


_KEY = struct.Struct(">BBH16s16sHH")  # CT_KEY_FIELDS, packed straight from a CtEntry


def ct_key(ct: CtEntry) -> bytes:
    """`ct_record_key(encode_ct(ct))` without encoding the whole entry: the identity of a
    connection as the replica keys it (a destroy event needs nothing more)."""
    pad = _ZERO12 if ct.family == AF_INET else b""
    return _KEY.pack(ct.family, ct.l4proto, ct.zone, ct.orig_src + pad, ct.orig_dst + pad,
                     ct.orig_sport, ct.orig_dport)


CT_TIMEOUT = CT_ENTRY_FIELDS["timeout"]  # where the seconds left sit in the entry bytes


def ct_with_timeout(entry: bytes, timeout: int) -> bytes:
    """The entry bytes with another timeout (a snapshot sends the time left now)."""
    t = min(max(timeout, 0), MAX_TIMEOUT).to_bytes(4, "big")
    return entry[:CT_TIMEOUT.start] + t + entry[CT_TIMEOUT.stop:]


def ct_state_bytes(entry: bytes) -> bytes:
    """Everything of an entry but its timeout: what a peer must hear about when it changes
    (the timeout runs down by itself)."""
    return entry[:CT_TIMEOUT.start] + entry[CT_TIMEOUT.stop:]


# The rest of an entry once its key is known (`ct_body`): version, TCP state to timeout,
# reserved, and the reply tuple, whose IPv4 addresses lose their 12 zero bytes of padding. As
# structs over the layout above (slicing and joining cost 5x more): "x" skips a key field or
# padding, "s" keeps bytes. tests/unit/test_proto_conntrack.py checks them against the layout.
_BODY4 = struct.Struct(">1s2x13s2x2s36x4s12x4s12x4s")  # 28 bytes out of 92
_BODY6 = struct.Struct(">1s2x13s2x2s36x36s")  # 52 bytes
_KEY_PARTS = struct.Struct(">2s2s36s")  # ct_record_key: family and l4proto, zone, orig tuple
_ENTRY4 = struct.Struct(">1s2s13s2s2s36s4s12x4s12x4s")
_ENTRY6 = struct.Struct(">1s2s13s2s2s36s36s")
_B4_PARTS = struct.Struct(">1s13s2s4s4s4s")
_B6_PARTS = struct.Struct(">1s13s2s36s")


def ct_body(entry: bytes) -> bytes:
    """What `ct_entry` needs besides the key to give `entry` back: the replica stores this
    under the key instead of the whole entry (an IPv4 entry: 28 bytes instead of 92)."""
    return b"".join((_BODY4 if entry[1] == AF_INET else _BODY6).unpack(entry))


def ct_entry(key: bytes, body: bytes) -> bytes:
    """The entry bytes from its key (`ct_record_key`) and `ct_body`."""
    famproto, zone, orig = _KEY_PARTS.unpack(key)
    if key[0] == AF_INET:
        ver, mid, res, rsrc, rdst, ports = _B4_PARTS.unpack(body)
        return _ENTRY4.pack(ver, famproto, mid, zone, res, orig, rsrc, rdst, ports)
    ver, mid, res, reply = _B6_PARTS.unpack(body)
    return _ENTRY6.pack(ver, famproto, mid, zone, res, orig, reply)


def ct_record_key(entry: bytes) -> bytes:
    """Coalescing key of an entry body in a send queue: the `CT_KEY_FIELDS` bytes.

    Works on the bytes without decoding them (the send path never parses what it queues); bytes
    shorter than the layout give a shorter key, never an error.
    """
    return b"".join([entry[s] for s in _KEY_SLICES])


__all__ = [
    "CT_ENTRY_FIELDS", "CT_ENTRY_LAYOUT", "CT_ENTRY_SIZE", "CT_ENTRY_VERSION", "CT_KEY_FIELDS",
    "CT_TIMEOUT", "CtFormatError", "ct_body", "ct_entry", "ct_key", "ct_record_key",
    "ct_state_bytes",
    "ct_with_timeout", "decode_ct", "encode_ct",
]
