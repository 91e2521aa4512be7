"""Follow nf_tables ruleset changes (NFNLGRP_NFTABLES) and decode them by hand.

Why: session maps change in two ways. The packet path (`update @map`) sends no netlink event at
all, and control-plane transactions (`nft add/delete element`, libnftables, another nftsync)
raise one NFT_MSG_NEWSETELEM / NFT_MSG_DELSETELEM per element, then one NFT_MSG_NEWGEN that
closes the transaction and names the committing process. The daemon must see the second kind to
replicate what an admin changed, and notice maps that were re-created or deleted.

Facts measured on kernel 6.18 (tests/kernel/test_nft_events.py checks them):
- every element arrives in a message of its own (the list attribute holds one element), even
  when one `nft -f` transaction adds thousands;
- `flush map` has no special form: the kernel notifies one DELSETELEM per element that was in
  the map (flushing an empty map notifies nothing but the NEWGEN);
- DELSETELEM carries the element as it was (data, timeout, remaining expiration, comment);
- deleting a populated map or table notifies DELSET (per map) and DELTABLE, never its elements;
- an element added without `timeout` to a map with a default timeout carries only an expiration;
- re-adding an element identically changes nothing and notifies nothing; re-adding it with
  `expires` refreshes it (kernel >= 6.12) and notifies an "add" for a key already known;
- an empty transaction (e.g. flushing an empty map) sends nothing, not even NEWGEN;
- nlmsg_pid of every event is the netlink port id of the socket that sent the transaction
  (for `nft` it is the pid of the nft process); NEWGEN also names that process.

Decoding walks attributes with struct on a `bytes` copy of each datagram: for a 100k-element
transaction that is 100k messages, so the element path is one tight loop rather than the generic
`core.iter_attrs` generator (which the rarer table/set/chain/rule messages use).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

# Key/data values stay raw bytes in events; their codec is nftsync.datatypes.
from nftsync.datatypes import NFPROTO_NAMES
from nftsync.netlink.core import (
    NETLINK_NETFILTER,
    NFNL_SUBSYS_NFTABLES,
    NLMSG_HDR,
    NetlinkOverrun,
    NetlinkSocket,
)

NFNLGRP_NFTABLES = 7

# enum nf_tables_msg_types (uapi nf_tables.h)
NFT_MSG_NEWTABLE = 0
NFT_MSG_DELTABLE = 2
NFT_MSG_NEWCHAIN = 3
NFT_MSG_DELCHAIN = 5
NFT_MSG_NEWRULE = 6
NFT_MSG_DELRULE = 8
NFT_MSG_NEWSET = 9
NFT_MSG_DELSET = 11
NFT_MSG_NEWSETELEM = 12
NFT_MSG_DELSETELEM = 14
NFT_MSG_NEWGEN = 15
NFT_MSG_TRACE = 17
NFT_MSG_NEWOBJ = 18
NFT_MSG_DELOBJ = 20
NFT_MSG_NEWFLOWTABLE = 22
NFT_MSG_DELFLOWTABLE = 24
NFT_MSG_DESTROYTABLE = 26
NFT_MSG_DESTROYCHAIN = 27
NFT_MSG_DESTROYRULE = 28
NFT_MSG_DESTROYSET = 29
NFT_MSG_DESTROYSETELEM = 30
NFT_MSG_DESTROYOBJ = 31
NFT_MSG_DESTROYFLOWTABLE = 32

# Objects and flowtables are known but of no interest to session maps: skipped, counted apart.
_IGNORED_MSGS = frozenset({
    NFT_MSG_TRACE, NFT_MSG_NEWOBJ, NFT_MSG_DELOBJ, NFT_MSG_NEWFLOWTABLE, NFT_MSG_DELFLOWTABLE,
    NFT_MSG_DESTROYOBJ, NFT_MSG_DESTROYFLOWTABLE,
})

# attribute numbers
NFTA_TABLE_NAME, NFTA_TABLE_FLAGS, NFTA_TABLE_HANDLE = 1, 2, 4
NFTA_CHAIN_TABLE, NFTA_CHAIN_HANDLE, NFTA_CHAIN_NAME = 1, 2, 3
NFTA_RULE_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_HANDLE = 1, 2, 3
NFTA_SET_TABLE, NFTA_SET_NAME, NFTA_SET_FLAGS = 1, 2, 3
NFTA_SET_KEY_TYPE, NFTA_SET_KEY_LEN, NFTA_SET_DATA_TYPE, NFTA_SET_DATA_LEN = 4, 5, 6, 7
NFTA_SET_TIMEOUT, NFTA_SET_USERDATA, NFTA_SET_HANDLE = 11, 13, 16
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_DATA, NFTA_SET_ELEM_FLAGS = 1, 2, 3
NFTA_SET_ELEM_TIMEOUT, NFTA_SET_ELEM_EXPIRATION, NFTA_SET_ELEM_USERDATA = 4, 5, 6
NFTA_SET_ELEM_OBJREF, NFTA_SET_ELEM_KEY_END = 9, 10
NFTA_DATA_VALUE, NFTA_DATA_VERDICT = 1, 2
NFTA_VERDICT_CODE, NFTA_VERDICT_CHAIN = 1, 2
NFTA_GEN_ID, NFTA_GEN_PROC_PID, NFTA_GEN_PROC_NAME = 1, 2, 3

NFT_SET_ELEM_INTERVAL_END = 0x1
NFT_SET_ELEM_CATCHALL = 0x2

# libnftnl's userdata TLVs (type u8, len u8, value): comments live there, not in the kernel.
NFTNL_UDATA_SET_ELEM_COMMENT = 0
NFTNL_UDATA_SET_COMMENT = 7

NFT_DATA_VALUE_MAXLEN = 64  # the kernel refuses longer keys/data (16 registers of 4 bytes)
NFT_NAME_MAXLEN = 256
NFT_USERDATA_MAXLEN = 256

_FAMILY_NAMES = tuple(NFPROTO_NAMES.get(i, str(i)) for i in range(256))

_VERDICTS = {0: "drop", 1: "accept", 2: "stolen", 3: "queue", 4: "repeat", 5: "stop",
             -1: "continue", -2: "break", -5: "return"}
_JUMPS = {-3: "jump", -4: "goto"}

_NLA = struct.Struct("=HH").unpack_from
_BE32 = struct.Struct(">I").unpack_from
_BE32S = struct.Struct(">i").unpack_from
_BE64 = struct.Struct(">Q").unpack_from
_NFGEN = struct.Struct("=BBH").unpack_from
_NLHDR = NLMSG_HDR.unpack_from


class _Malformed(Exception):
    """Internal: a message violates the netlink/nf_tables layout; it is skipped and counted."""


# --- events --------------------------------------------------------------------------------------
@dataclass(slots=True)
class Element:
    """One set/map element as the kernel carries it.

    `key`/`data` are the raw NFTA_DATA_VALUE bytes (see `nftsync.datatypes`); `key` is b"" for
    the catch-all element (flags & NFT_SET_ELEM_CATCHALL). `verdict` is nft's text ("accept",
    "jump chain") for verdict maps. Times are milliseconds; `expiration_ms` is what was left.
    """

    key: bytes
    data: bytes | None = None
    verdict: str | None = None
    timeout_ms: int | None = None
    expiration_ms: int | None = None
    comment: str | None = None
    flags: int = 0
    key_end: bytes | None = None
    objref: str | None = None

    @property
    def catchall(self) -> bool:
        return bool(self.flags & NFT_SET_ELEM_CATCHALL)


@dataclass(slots=True)
class SetElemEvent:
    """NFT_MSG_NEWSETELEM (op "add") or NFT_MSG_DELSETELEM/DESTROYSETELEM (op "delete").

    `portid` is the nlmsg_pid: the netlink port of the socket that committed the transaction
    (nftsync recognises its own writes by it). A `flush map` is a run of "delete" events, one
    per element that was in the map: the kernel sends nothing that tells it from a delete.
    """

    op: str
    family: str
    table: str
    set: str
    elements: list[Element]
    portid: int = 0


@dataclass(slots=True)
class GenEvent:
    """NFT_MSG_NEWGEN: a transaction was committed; the new generation and who committed it."""

    genid: int
    pid: int | None
    name: str | None
    portid: int = 0


@dataclass(slots=True)
class TableEvent:
    op: str
    family: str
    name: str
    portid: int = 0
    handle: int | None = None
    flags: int | None = None


@dataclass(slots=True)
class ChainEvent:
    op: str
    family: str
    table: str
    name: str
    portid: int = 0
    handle: int | None = None


@dataclass(slots=True)
class RuleEvent:
    op: str
    family: str
    table: str
    chain: str
    portid: int = 0
    handle: int | None = None


@dataclass(slots=True)
class SetEvent:
    """NFT_MSG_NEWSET/DELSET. `key_type`/`data_type` are nft datatype ids (`datatype_names`);
    `comment` is the set's comment, where nftsync keeps its "nftsync:sessions ..." marker."""

    op: str
    family: str
    table: str
    name: str
    portid: int = 0
    handle: int | None = None
    flags: int | None = None
    key_type: int | None = None
    key_len: int | None = None
    data_type: int | None = None
    data_len: int | None = None
    timeout_ms: int | None = None
    comment: str | None = None


@dataclass(slots=True)
class Overrun:
    """The kernel dropped events (ENOBUFS): whatever the daemon knows may be stale; reconcile."""

    count: int


NftEvent = SetElemEvent | GenEvent | TableEvent | ChainEvent | RuleEvent | SetEvent | Overrun


@dataclass(slots=True)
class DecodeStats:
    """Counters kept across reads: what was decoded, skipped, or lost."""

    events: int = 0
    elements: int = 0
    unknown: int = 0   # message types we do not know (a newer kernel), or other subsystems
    ignored: int = 0   # known but irrelevant here (objects, flowtables, traces)
    malformed: int = 0
    overruns: int = 0
    last_error: str = field(default="")


# --- decoding ------------------------------------------------------------------------------------
def _str(buf: bytes, a: int, b: int) -> str:
    if b - a > NFT_NAME_MAXLEN:
        raise _Malformed("string too long")
    return buf[a:b].split(b"\0", 1)[0].decode("utf-8", "replace")


def _u32(buf: bytes, a: int, b: int) -> int:
    if b - a != 4:
        raise _Malformed("u32 attribute of wrong size")
    return _BE32(buf, a)[0]


def _u64(buf: bytes, a: int, b: int) -> int:
    if b - a != 8:
        raise _Malformed("u64 attribute of wrong size")
    return _BE64(buf, a)[0]


def _attrs(buf: bytes, off: int, end: int) -> list[tuple[int, int, int]]:
    """(type, start, end) of each attribute in buf[off:end]; raises _Malformed on bad lengths."""
    out = []
    while end - off >= 4:
        alen, atype = _NLA(buf, off)
        if alen < 4 or alen > end - off:
            raise _Malformed(f"bad attribute length {alen}")
        out.append((atype & 0x3FFF, off + 4, off + alen))
        off += (alen + 3) & ~3
    return out


def _udata_item(buf: bytes, a: int, b: int, want: int) -> str | None:
    """Find libnftnl userdata item `want` (a NUL-terminated string) in buf[a:b]."""
    if b - a > NFT_USERDATA_MAXLEN:
        raise _Malformed("userdata too long")
    while b - a >= 2:
        t, ln = buf[a], buf[a + 1]
        if a + 2 + ln > b:
            return None  # userdata is opaque to the kernel: a bad TLV is not a bad message
        if t == want:
            return buf[a + 2 : a + 2 + ln].split(b"\0", 1)[0].decode("utf-8", "replace")
        a += 2 + ln
    return None


def _value(buf: bytes, a: int, b: int) -> tuple[bytes | None, str | None]:
    """Decode a nested nft_data: (NFTA_DATA_VALUE bytes, None) or (None, verdict text)."""
    value: bytes | None = None
    verdict: str | None = None
    for t, x, y in _attrs(buf, a, b):
        if t == NFTA_DATA_VALUE:
            if y - x > NFT_DATA_VALUE_MAXLEN:
                raise _Malformed("data value too long")
            value = buf[x:y]
        elif t == NFTA_DATA_VERDICT:
            code: int | None = None
            chain = ""
            for vt, vx, vy in _attrs(buf, x, y):
                if vt == NFTA_VERDICT_CODE:
                    if vy - vx != 4:
                        raise _Malformed("verdict code of wrong size")
                    code = _BE32S(buf, vx)[0]
                elif vt == NFTA_VERDICT_CHAIN:
                    chain = _str(buf, vx, vy)
            if code is None:
                raise _Malformed("verdict without code")
            if code in _JUMPS:
                verdict = f"{_JUMPS[code]} {chain}"
            else:
                verdict = _VERDICTS.get(code, str(code))
    return value, verdict


def _element(buf: bytes, off: int, end: int) -> Element:
    """Decode one NFTA_LIST_ELEM (the hot path: one call per element event)."""
    key = b""
    data = verdict = comment = key_end = objref = None
    timeout = expiration = None
    flags = 0
    nla = _NLA
    while end - off >= 4:
        alen, t = nla(buf, off)
        if alen < 4 or alen > end - off:
            raise _Malformed(f"bad element attribute length {alen}")
        a = off + 4
        b = off + alen
        t &= 0x3FFF
        if t == NFTA_SET_ELEM_KEY:
            # fast path: KEY holds exactly one NFTA_DATA_VALUE
            klen, kt = nla(buf, a) if b - a >= 4 else (0, 0)
            if (kt & 0x3FFF) == NFTA_DATA_VALUE and klen == b - a and klen <= 68:
                key = buf[a + 4 : b]
            else:
                key = _value(buf, a, b)[0] or b""
        elif t == NFTA_SET_ELEM_DATA:
            dlen, dt = nla(buf, a) if b - a >= 4 else (0, 0)
            if (dt & 0x3FFF) == NFTA_DATA_VALUE and dlen == b - a and dlen <= 68:
                data = buf[a + 4 : b]
            else:
                data, verdict = _value(buf, a, b)
        elif t == NFTA_SET_ELEM_TIMEOUT:
            if alen != 12:
                raise _Malformed("element timeout of wrong size")
            timeout = _BE64(buf, a)[0]
        elif t == NFTA_SET_ELEM_EXPIRATION:
            if alen != 12:
                raise _Malformed("element expiration of wrong size")
            expiration = _BE64(buf, a)[0]
        elif t == NFTA_SET_ELEM_FLAGS:
            flags = _u32(buf, a, b)
        elif t == NFTA_SET_ELEM_USERDATA:
            comment = _udata_item(buf, a, b, NFTNL_UDATA_SET_ELEM_COMMENT)
        elif t == NFTA_SET_ELEM_KEY_END:
            key_end = _value(buf, a, b)[0]
        elif t == NFTA_SET_ELEM_OBJREF:
            objref = _str(buf, a, b)
        off += (alen + 3) & ~3
    return Element(key, data, verdict, timeout, expiration, comment, flags, key_end, objref)


# Table and set names repeat in every element event: decode each distinct name once.
_NAME_CACHE: dict[bytes, str] = {}
_NAME_CACHE_MAX = 4096


def _name(buf: bytes, a: int, b: int) -> str:
    raw = buf[a:b]
    name = _NAME_CACHE.get(raw)
    if name is None:
        name = _str(buf, a, b)
        if len(_NAME_CACHE) < _NAME_CACHE_MAX:
            _NAME_CACHE[raw] = name
    return name


def _setelem(op: str, family: str, buf: bytes, off: int, end: int, portid: int) -> SetElemEvent:
    table = set_name = ""
    elements: list[Element] = []
    nla = _NLA
    while end - off >= 4:
        alen, t = nla(buf, off)
        if alen < 4 or alen > end - off:
            raise _Malformed(f"bad attribute length {alen}")
        t &= 0x3FFF
        if t == NFTA_SET_ELEM_LIST_TABLE:
            table = _name(buf, off + 4, off + alen)
        elif t == NFTA_SET_ELEM_LIST_SET:
            set_name = _name(buf, off + 4, off + alen)
        elif t == NFTA_SET_ELEM_LIST_ELEMENTS:
            x = off + 4
            lend = off + alen
            while lend - x >= 4:
                llen, lt = nla(buf, x)
                if llen < 4 or llen > lend - x:
                    raise _Malformed(f"bad list attribute length {llen}")
                if lt & 0x3FFF == NFTA_LIST_ELEM:
                    elements.append(_element(buf, x + 4, x + llen))
                x += (llen + 3) & ~3
        off += (alen + 3) & ~3
    return SetElemEvent(op, family, table, set_name, elements, portid)


def _set(op: str, family: str, buf: bytes, off: int, end: int, portid: int) -> SetEvent:
    ev = SetEvent(op, family, "", "", portid)
    for t, a, b in _attrs(buf, off, end):
        if t == NFTA_SET_TABLE:
            ev.table = _str(buf, a, b)
        elif t == NFTA_SET_NAME:
            ev.name = _str(buf, a, b)
        elif t == NFTA_SET_FLAGS:
            ev.flags = _u32(buf, a, b)
        elif t == NFTA_SET_KEY_TYPE:
            ev.key_type = _u32(buf, a, b)
        elif t == NFTA_SET_KEY_LEN:
            ev.key_len = _u32(buf, a, b)
        elif t == NFTA_SET_DATA_TYPE:
            ev.data_type = _u32(buf, a, b)
        elif t == NFTA_SET_DATA_LEN:
            ev.data_len = _u32(buf, a, b)
        elif t == NFTA_SET_TIMEOUT:
            ev.timeout_ms = _u64(buf, a, b)
        elif t == NFTA_SET_HANDLE:
            ev.handle = _u64(buf, a, b)
        elif t == NFTA_SET_USERDATA:
            ev.comment = _udata_item(buf, a, b, NFTNL_UDATA_SET_COMMENT)
    return ev


def _table(op: str, family: str, buf: bytes, off: int, end: int, portid: int) -> TableEvent:
    ev = TableEvent(op, family, "", portid)
    for t, a, b in _attrs(buf, off, end):
        if t == NFTA_TABLE_NAME:
            ev.name = _str(buf, a, b)
        elif t == NFTA_TABLE_FLAGS:
            ev.flags = _u32(buf, a, b)
        elif t == NFTA_TABLE_HANDLE:
            ev.handle = _u64(buf, a, b)
    return ev


def _chain(op: str, family: str, buf: bytes, off: int, end: int, portid: int) -> ChainEvent:
    ev = ChainEvent(op, family, "", "", portid)
    for t, a, b in _attrs(buf, off, end):
        if t == NFTA_CHAIN_TABLE:
            ev.table = _str(buf, a, b)
        elif t == NFTA_CHAIN_NAME:
            ev.name = _str(buf, a, b)
        elif t == NFTA_CHAIN_HANDLE:
            ev.handle = _u64(buf, a, b)
    return ev


def _rule(op: str, family: str, buf: bytes, off: int, end: int, portid: int) -> RuleEvent:
    ev = RuleEvent(op, family, "", "", portid)
    for t, a, b in _attrs(buf, off, end):
        if t == NFTA_RULE_TABLE:
            ev.table = _str(buf, a, b)
        elif t == NFTA_RULE_CHAIN:
            ev.chain = _str(buf, a, b)
        elif t == NFTA_RULE_HANDLE:
            ev.handle = _u64(buf, a, b)
    return ev


def _gen(buf: bytes, off: int, end: int, portid: int) -> GenEvent:
    ev = GenEvent(0, None, None, portid)
    for t, a, b in _attrs(buf, off, end):
        if t == NFTA_GEN_ID:
            ev.genid = _u32(buf, a, b)
        elif t == NFTA_GEN_PROC_PID:
            ev.pid = _u32(buf, a, b)
        elif t == NFTA_GEN_PROC_NAME:
            ev.name = _str(buf, a, b)
    return ev


_DECODERS = {
    NFT_MSG_NEWSETELEM: ("add", _setelem),
    NFT_MSG_DELSETELEM: ("delete", _setelem),
    NFT_MSG_DESTROYSETELEM: ("delete", _setelem),
    NFT_MSG_NEWSET: ("add", _set),
    NFT_MSG_DELSET: ("delete", _set),
    NFT_MSG_DESTROYSET: ("delete", _set),
    NFT_MSG_NEWTABLE: ("add", _table),
    NFT_MSG_DELTABLE: ("delete", _table),
    NFT_MSG_DESTROYTABLE: ("delete", _table),
    NFT_MSG_NEWCHAIN: ("add", _chain),
    NFT_MSG_DELCHAIN: ("delete", _chain),
    NFT_MSG_DESTROYCHAIN: ("delete", _chain),
    NFT_MSG_NEWRULE: ("add", _rule),
    NFT_MSG_DELRULE: ("delete", _rule),
    NFT_MSG_DESTROYRULE: ("delete", _rule),
}


def _decode(
    msg_type: int, portid: int, buf: bytes, off: int, end: int, stats: DecodeStats
) -> NftEvent | None:
    """Decode the nf_tables message whose payload (nfgenmsg + attributes) is buf[off:end]."""
    if msg_type >> 8 != NFNL_SUBSYS_NFTABLES:
        stats.unknown += 1
        return None
    msg = msg_type & 0xFF
    try:
        if end - off < 4:
            raise _Malformed("payload shorter than nfgenmsg")
        if msg == NFT_MSG_NEWGEN:
            ev: NftEvent = _gen(buf, off + 4, end, portid)
        else:
            entry = _DECODERS.get(msg)
            if entry is None:
                if msg in _IGNORED_MSGS:
                    stats.ignored += 1
                else:
                    stats.unknown += 1
                return None
            family = _FAMILY_NAMES[buf[off]]
            op, fn = entry
            ev = fn(op, family, buf, off + 4, end, portid)
            if isinstance(ev, SetElemEvent):
                stats.elements += len(ev.elements)
    except (_Malformed, struct.error, IndexError) as e:
        stats.malformed += 1
        stats.last_error = f"nf_tables message {msg}: {e}"
        return None
    stats.events += 1
    return ev


def decode_message(
    msg_type: int,
    flags: int,
    portid: int,
    payload: memoryview | bytes,
    stats: DecodeStats | None = None,
) -> NftEvent | None:
    """Decode one nf_tables notification (payload = bytes after the 16-byte nlmsghdr).

    `msg_type` is the full nlmsg_type ((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_*). Returns None for
    unknown, irrelevant or malformed messages (counted in `stats` when given); never raises.
    `flags` (nlmsg_flags) carries nothing the events need; it is accepted so that captured
    messages can be fed back exactly as received.
    """
    del flags
    buf = bytes(payload)
    if stats is None:
        stats = DecodeStats()
    return _decode(msg_type, portid, buf, 0, len(buf), stats)


_SETELEM_OPS = {(NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM: "add",
                (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_DELSETELEM: "delete",
                (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_DESTROYSETELEM: "delete"}


def decode_datagram(data: bytes, stats: DecodeStats, out: list[NftEvent]) -> None:
    """Decode every netlink message in one received datagram, appending events to `out`."""
    end = len(data)
    off = 0
    decode = _decode
    setelem_ops = _SETELEM_OPS
    append = out.append
    while end - off >= 16:
        length, mtype, _flags, _seq, pid = _NLHDR(data, off)
        if length < 16 or length > end - off:
            stats.malformed += 1
            stats.last_error = f"bad nlmsg length {length}"
            return
        op = setelem_ops.get(mtype)
        if op is not None and length >= 20:
            # hot path, inlined from _decode: one message per element
            try:
                ev = _setelem(op, _FAMILY_NAMES[data[off + 16]], data, off + 20, off + length, pid)
            except (_Malformed, struct.error, IndexError) as e:
                stats.malformed += 1
                stats.last_error = f"nf_tables set element message: {e}"
            else:
                stats.events += 1
                stats.elements += len(ev.elements)
                append(ev)
        elif mtype >= 0x100:  # NLMSG_NOOP/ERROR/DONE are not events
            ev = decode(mtype, pid, data, off + 16, off + length, stats)
            if ev is not None:
                append(ev)
        off += (length + 3) & ~3


# --- socket --------------------------------------------------------------------------------------
class NftEventSocket:
    """A non-blocking NETLINK_NETFILTER socket joined to NFNLGRP_NFTABLES.

    Open it inside the namespace to watch (see tests/kernel/netns.py `entered`). Register `fileno()`
    with asyncio's `add_reader` and call `read()` when readable. The 16 MiB receive buffer
    (SO_RCVBUFFORCE; the kernel accounts 32 MiB) holds ~145k unread element events (measured:
    100k fit, 200k overran); beyond that the kernel drops events and `read()` reports an
    `Overrun`. A reader that keeps up decodes ~250k element events/s.
    """

    def __init__(self, rcvbuf: int = 16 << 20, max_datagrams: int = 256) -> None:
        self._sock = NetlinkSocket(NETLINK_NETFILTER, rcvbuf=rcvbuf)
        try:
            self._sock.add_membership(NFNLGRP_NFTABLES)
        except OSError:
            self._sock.close()
            raise
        self.max_datagrams = max_datagrams
        self.stats = DecodeStats()

    @property
    def portid(self) -> int:
        """Our own port id (events we caused carry the port of the socket that sent them)."""
        return self._sock.pid

    def fileno(self) -> int:
        return self._sock.fileno()

    def read(self) -> list[NftEvent]:
        """Drain up to `max_datagrams` queued datagrams and return their events, in order.

        Never blocks, never raises for what the kernel sends: malformed messages are skipped and
        counted in `stats`; ENOBUFS becomes an `Overrun` event at the point of the loss.
        """
        out: list[NftEvent] = []
        stats = self.stats
        recv = self._sock.recv
        for _ in range(self.max_datagrams):
            try:
                mv = recv()
            except NetlinkOverrun:
                stats.overruns += 1
                out.append(Overrun(stats.overruns))
                continue
            if mv is None:
                break
            decode_datagram(bytes(mv), stats, out)
        return out

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> NftEventSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- transactions --------------------------------------------------------------------------------
@dataclass(slots=True)
class Transaction:
    """The events of one committed transaction, closed by its NEWGEN.

    `pid`/`name` are the committing task (its thread id: `threading.get_native_id()` for a
    thread of ours using libnftables, the process pid for the nft tool) and `portid` the
    netlink port it sent from. `complete` is False for a chunk cut off by `max_pending` (the
    rest of that transaction follows in later chunks); such chunks have genid/pid/name None.
    """

    genid: int | None
    pid: int | None
    name: str | None
    portid: int
    events: list[NftEvent]
    complete: bool = True


class TransactionAssembler:
    """Group an event stream into transactions, so each change can be attributed to its committer.

    Why: the kernel names the committing process only in NEWGEN, which comes after the
    transaction's element/set/table events (commits are serialised per namespace, so the
    events of two transactions never interleave). After an `Overrun` the pending events are
    dropped (their transaction is incomplete) and the Overrun is passed on: reconcile.
    """

    def __init__(self, max_pending: int = 100_000) -> None:
        self.max_pending = max_pending
        self._pending: list[NftEvent] = []

    def feed(self, events: list[NftEvent]) -> list[Transaction | Overrun]:
        out: list[Transaction | Overrun] = []
        pending = self._pending
        for ev in events:
            if isinstance(ev, GenEvent):
                out.append(Transaction(ev.genid, ev.pid, ev.name, ev.portid, pending))
                pending = self._pending = []
            elif isinstance(ev, Overrun):
                pending.clear()
                out.append(ev)
            else:
                pending.append(ev)
                if len(pending) >= self.max_pending:
                    portid = getattr(pending[0], "portid", 0)
                    out.append(Transaction(None, None, None, portid, pending, complete=False))
                    pending = self._pending = []
        return out

