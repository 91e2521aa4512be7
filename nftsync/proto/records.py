"""Replication records (inside SNAPSHOT_CHUNK and UPDATES): SessionRecord and ConntrackRecord,
their codecs and their ranges, pure bytes in and out (docs/protocol.md "Records").

Decoding is defensive: every length and count is bounded before it is used, and malformed input
raises `ProtocolError`, for the whole frame: nothing of it is applied.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from nftsync.proto.wire import (
    MAX_CT_ENTRY,
    MAX_KEY,
    MAX_MAP_ID,
    MAX_PAYLOAD,
    MAX_REMAINING_MS,
    U32_MAX,
    U64_MAX,
    ProtocolError,
    encode_name,
)


class RecordType:
    SESSION = 1
    CONNTRACK = 2


OP_ADD = 1  # SessionRecord
OP_DELETE = 2  # both record types
OP_UPSERT = 1  # ConntrackRecord (same value as ADD)

#: record type(u8) body length(u16)
REC_HDR = struct.Struct(">BH")
# Session body fixed part: op u8, mark u32, remaining_ms u32, updated_ms u64, origin u32,
# map_id length u8, key length u8; then map_id bytes, key bytes.
_SESS_FIXED = struct.Struct(">BIIQIBB")
# Record header + session fixed part in one pack call (the hot path).
_SESS_FULL = struct.Struct(">BHBIIQIBB")
_SESS_FIXED_LEN = _SESS_FIXED.size  # 23
# Conntrack body fixed part: op u8, origin u32, updated_ms u64; then entry (rest of the body).
_CT_FULL = struct.Struct(">BHBIQ")
_CT_FIXED_LEN = 1 + 4 + 8  # 13


@dataclass(slots=True)
class SessionRecord:
    """One nft map element (client key -> backend mark) as replicated between peers.

    `key` is the map key in nft's fixed-size big-endian concatenation, opaque here. `updated_ms`
    is the origin's wall clock at the last refresh: conflicts keep the newest, then the highest
    origin node id (docs/protocol.md "Replication semantics").
    """

    op: int
    map_id: str
    key: bytes
    mark: int
    remaining_ms: int
    updated_ms: int
    origin: int

    TYPE: ClassVar[int] = RecordType.SESSION

    def encode(self) -> bytes:
        return encode_records((self,))

    @classmethod
    def decode(cls, data: bytes | memoryview) -> SessionRecord:
        """Decode one complete record (header included)."""
        recs = decode_records(memoryview(data), 1)
        if len(recs) != 1 or not isinstance(recs[0], SessionRecord):
            raise ProtocolError("not a session record")
        return recs[0]


@dataclass(slots=True)
class ConntrackRecord:
    """One conntrack entry as replicated; `entry` is its body, `encode_ct(ct)`, opaque here
    (the layout is `nftsync.proto.conntrack`'s: frames only carry and bound it)."""

    op: int
    origin: int
    updated_ms: int
    entry: bytes

    TYPE: ClassVar[int] = RecordType.CONNTRACK

    def encode(self) -> bytes:
        return encode_records((self,))

    @classmethod
    def decode(cls, data: bytes | memoryview) -> ConntrackRecord:
        recs = decode_records(memoryview(data), 1)
        if len(recs) != 1 or not isinstance(recs[0], ConntrackRecord):
            raise ProtocolError("not a conntrack record")
        return recs[0]


Record = SessionRecord | ConntrackRecord


def _encode_session(r: SessionRecord, pack: Callable[..., bytes] = _SESS_FULL.pack,
                    cache: dict[str, bytes] | None = None) -> bytes:
    mid = cache.get(r.map_id) if cache is not None else None
    if mid is None:
        mid = encode_name(r.map_id, "map_id", MAX_MAP_ID)
        if cache is not None and len(cache) < 256:
            cache[r.map_id] = mid
    key = r.key
    klen = len(key)
    if not 0 < klen <= MAX_KEY:
        raise ValueError(f"session key must be 1..{MAX_KEY} bytes, got {klen}")
    if r.op != OP_ADD and r.op != OP_DELETE:
        raise ValueError(f"session op must be {OP_ADD} (add) or {OP_DELETE} (delete)")
    mlen = len(mid)
    return pack(RecordType.SESSION, _SESS_FIXED_LEN + mlen + klen, r.op, r.mark,
                r.remaining_ms, r.updated_ms, r.origin, mlen, klen) + mid + bytes(key)


def _encode_ct(r: ConntrackRecord) -> bytes:
    elen = len(r.entry)
    if not 0 < elen <= MAX_CT_ENTRY:
        raise ValueError(f"conntrack entry must be 1..{MAX_CT_ENTRY} bytes, got {elen}")
    if r.op != OP_UPSERT and r.op != OP_DELETE:
        raise ValueError(f"conntrack op must be {OP_UPSERT} (upsert) or {OP_DELETE} (delete)")
    return _CT_FULL.pack(RecordType.CONNTRACK, _CT_FIXED_LEN + elen, r.op, r.origin,
                         r.updated_ms) + bytes(r.entry)


def encode_records(records: Iterable[Record]) -> bytes:
    """Concatenate encoded records. Raises ValueError on a record we would refuse to decode."""
    parts: list[bytes] = []
    append = parts.append
    pack = _SESS_FULL.pack
    cache: dict[str, bytes] = {}
    try:
        for r in records:
            if type(r) is SessionRecord:
                append(_encode_session(r, pack, cache))
            elif type(r) is ConntrackRecord:
                append(_encode_ct(r))
            else:
                raise TypeError(f"not a record: {type(r).__name__}")
    except struct.error as exc:
        # Only on the error path: name the field, so the log says what a caller must clamp.
        raise ValueError(f"record field out of range: {_out_of_range(r)} ({exc})") from exc
    return b"".join(parts)


_SESSION_RANGES = (("mark", U32_MAX), ("remaining_ms", MAX_REMAINING_MS),
                   ("updated_ms", U64_MAX), ("origin", U32_MAX))
_CONNTRACK_RANGES = (("origin", U32_MAX), ("updated_ms", U64_MAX))


def _out_of_range(r: Record) -> str:
    """Which integer field of `r` does not fit its wire width, as `Type.field=value (0..max)`."""
    ranges = _SESSION_RANGES if type(r) is SessionRecord else _CONNTRACK_RANGES
    for name, top in ranges:
        value = getattr(r, name)
        if type(value) is not int or not 0 <= value <= top:
            return f"{type(r).__name__}.{name}={value!r} (must be an integer 0..{top})"
    return f"{type(r).__name__}"


# bytes -> str for map ids: a daemon replicates a handful of maps, so decoding each name once per
# batch instead of once per record is a measurable win. Bounded so hostile input cannot grow it.
_MAP_ID_CACHE: dict[bytes, str] = {}
_MAP_ID_CACHE_MAX = 1024


def decode_records(mv: memoryview, count: int) -> list[Record]:
    """Decode exactly `count` records filling `mv` completely.

    Records of an unknown type are skipped (their length says how far), but still count; the
    returned list holds only known records. Raises ProtocolError on anything malformed.
    """
    end = len(mv)
    if count * REC_HDR.size > end:
        raise ProtocolError(f"record count {count} cannot fit in {end} bytes")
    out: list[Record] = []
    append = out.append
    unpack_hdr = REC_HDR.unpack_from
    unpack_sess = _SESS_FIXED.unpack_from
    unpack_ct = _CT_FULL.unpack_from
    cache = _MAP_ID_CACHE
    new_sess = SessionRecord
    new_ct = ConntrackRecord
    off = 0
    for _ in range(count):
        if off + 3 > end:
            raise ProtocolError("truncated record header")
        rtype, blen = unpack_hdr(mv, off)
        body = off + 3
        nxt = body + blen
        if nxt > end:
            raise ProtocolError("record body runs past the end of the frame")
        if rtype == 1:
            if blen < _SESS_FIXED_LEN:
                raise ProtocolError("session record too short")
            op, mark, remaining, updated, origin, mlen, klen = unpack_sess(mv, body)
            if _SESS_FIXED_LEN + mlen + klen != blen:
                raise ProtocolError("session record length mismatch")
            if (op != 1 and op != 2) or not 0 < mlen <= MAX_MAP_ID or not 0 < klen <= MAX_KEY:
                raise ProtocolError("session record field out of range")
            p = body + _SESS_FIXED_LEN
            raw = mv[p:p + mlen].tobytes()
            mid = cache.get(raw)
            if mid is None:
                try:
                    mid = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise ProtocolError("map_id is not valid UTF-8") from exc
                if len(cache) < _MAP_ID_CACHE_MAX:
                    cache[raw] = mid
            p += mlen
            append(new_sess(op, mid, mv[p:nxt].tobytes(), mark, remaining, updated, origin))
        elif rtype == 2:
            elen = blen - _CT_FIXED_LEN
            if not 0 < elen <= MAX_CT_ENTRY:
                raise ProtocolError("conntrack record entry length out of range")
            _t, _l, op, origin, updated = unpack_ct(mv, off)
            if op != 1 and op != 2:
                raise ProtocolError("conntrack record op out of range")
            append(new_ct(op, origin, updated, mv[body + _CT_FIXED_LEN:nxt].tobytes()))
        # any other record type: skipped by design (forward compatibility)
        off = nxt
    if off != end:
        raise ProtocolError(f"{end - off} trailing bytes after {count} records")
    return out


def split_records(records: Sequence[Record], budget: int = MAX_PAYLOAD - 64) -> list[list[Record]]:
    """Cut a record list into chunks whose encoding fits in one frame, for snapshots/updates.

    Uses each record's worst-case size, so no chunk is ever encoded twice.
    """
    chunks: list[list[Record]] = []
    cur: list[Record] = []
    used = 0
    for r in records:
        if type(r) is SessionRecord:
            # str.isascii() is O(1) in CPython; ASCII map ids encode to len() bytes
            mlen = len(r.map_id) if r.map_id.isascii() else MAX_MAP_ID
            size = 3 + _SESS_FIXED_LEN + mlen + len(r.key)
        else:
            size = 3 + _CT_FIXED_LEN + len(r.entry)
        if used + size > budget and cur:
            chunks.append(cur)
            cur, used = [], 0
        cur.append(r)
        used += size
    if cur:
        chunks.append(cur)
    return chunks
