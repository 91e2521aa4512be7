"""Peer protocol framing and message codecs (layout documented byte by byte in docs/protocol.md).

Everything here is pure bytes-in/bytes-out so it can be fuzzed and benchmarked without sockets.
Decoding is defensive: every length and count is bounded before it is used, and any malformed
input raises `ProtocolError` (never IndexError/struct.error/UnicodeDecodeError), because the
bytes come from the network and the caller's only sane reaction is to close that connection.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from nftsync.errors import NftsyncError

MAGIC = b"NFSY"
PROTOCOL_VERSION = 1
# Versions this implementation can speak; HELLO advertises the range and both sides pick the max
# common one (see docs/protocol.md "Versioning").
VERSION_MIN = 1
VERSION_MAX = 1

#: magic(4) version(u8) type(u8) flags(u16) payload length(u32) frame counter(u64), big-endian.
HEADER = struct.Struct(">4sBBHIQ")
HEADER_LEN = HEADER.size  # 20
#: HMAC-SHA256 truncated to 128 bits; docs/protocol.md explains why 16 bytes are enough.
TAG_LEN = 16
#: Hard bound on a payload. Checked on the header before a single payload byte is read.
MAX_PAYLOAD = 1 << 20

#: Bound on handshake payloads: a peer that has not authenticated cannot make us buffer 1 MiB.
MAX_HANDSHAKE_PAYLOAD = 4096

#: Flag: a receiver that does not know this message type may skip the frame instead of failing.
FLAG_IGNORABLE = 0x0001
KNOWN_FLAGS = FLAG_IGNORABLE

MAX_NAME = 64  # cluster and node names, UTF-8 bytes
MAX_MAP_ID = 64
MAX_KEY = 64
MAX_CT_ENTRY = 128
MAX_TEXT = 256  # REFUSE / RESYNC_REQUEST human-readable text
NONCE_LEN = 32
PROOF_LEN = 32

U32_MAX = 0xFFFFFFFF
U64_MAX = 0xFFFFFFFFFFFFFFFF

#: Longest time left a SessionRecord can carry: `remaining_ms` is a u32 of milliseconds
#: (~49.7 days). `nftsync apply` and `nftsync sessions add` refuse timeouts above it, so that
#: every session the kernel holds can be replicated; docs/protocol.md "Field ranges".
MAX_REMAINING_MS = U32_MAX


class ProtocolError(NftsyncError):
    """A peer sent bytes that break the protocol (malformed, tampered, replayed, out of order).

    The connection it came from must be closed; nothing in the frame may be trusted.
    """


class ConnectionClosed(NftsyncError):  # noqa: N818 - it names an event, like asyncio's errors
    """The peer closed the TCP connection (cleanly or in the middle of a frame)."""


# --------------------------------------------------------------------------------------------
# Message types
# --------------------------------------------------------------------------------------------

class MsgType:
    """Message type byte values (header field `type`). Never renumber: they are on the wire."""

    HELLO = 1
    AUTH = 2
    AUTH_OK = 3
    REFUSE = 4
    SNAPSHOT_BEGIN = 16
    SNAPSHOT_CHUNK = 17
    SNAPSHOT_END = 18
    UPDATES = 19
    ACK = 20
    RESYNC_REQUEST = 21
    HEARTBEAT = 22


class RefuseReason:
    """REFUSE / RESYNC_REQUEST reason codes (u16)."""

    UNSPECIFIED = 0
    BAD_VERSION = 1
    WRONG_CLUSTER = 2
    AUTH_FAILED = 3
    SAME_NODE_ID = 4
    PROTOCOL_ERROR = 5
    DUPLICATE_PEER = 6
    SHUTDOWN = 7
    TIMEOUT = 8
    # RESYNC_REQUEST reasons
    SEQ_GAP = 32
    EPOCH_CHANGED = 33
    STARTUP = 34
    OPERATOR = 35

    NAMES: ClassVar[dict[int, str]] = {}


RefuseReason.NAMES = {
    v: k.lower() for k, v in vars(RefuseReason).items() if k.isupper() and isinstance(v, int)
}

# Capability bits in HELLO (u32). Unknown bits are ignored: they only advertise.
CAP_SESSIONS = 0x1
CAP_CONNTRACK = 0x2
CAP_DEFAULT = CAP_SESSIONS | CAP_CONNTRACK


def _text(mv: memoryview, what: str) -> str:
    try:
        return str(mv, "utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{what} is not valid UTF-8") from exc


def _enc_name(value: str, what: str, limit: int, allow_empty: bool = False) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) > limit or (not raw and not allow_empty):
        raise ValueError(f"{what} must be 1..{limit} UTF-8 bytes, got {len(raw)}")
    return raw


# --------------------------------------------------------------------------------------------
# Records (inside SNAPSHOT_CHUNK and UPDATES)
# --------------------------------------------------------------------------------------------

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
        mid = _enc_name(r.map_id, "map_id", MAX_MAP_ID)
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


# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------

class Message:
    """Base of all messages: `TYPE` is the header type byte, payloads encode/decode themselves."""

    __slots__ = ()
    TYPE: ClassVar[int]

    def encode_payload(self) -> bytes:
        raise NotImplementedError

    @classmethod
    def decode_payload(cls, mv: memoryview) -> Message:
        raise NotImplementedError


_HELLO_FIXED = struct.Struct(">BBII32sBB")  # vmin vmax caps node_id nonce cluster_len name_len


@dataclass(slots=True)
class Hello(Message):
    """First frame each way. Its layout is frozen for all versions so any two nodes can read it."""

    version_min: int
    version_max: int
    cluster: str
    node_id: int
    node_name: str
    nonce: bytes
    capabilities: int = CAP_DEFAULT

    TYPE: ClassVar[int] = MsgType.HELLO

    def encode_payload(self) -> bytes:
        cl = _enc_name(self.cluster, "cluster name", MAX_NAME)
        nm = _enc_name(self.node_name, "node name", MAX_NAME)
        if len(self.nonce) != NONCE_LEN:
            raise ValueError(f"nonce must be {NONCE_LEN} bytes")
        return _HELLO_FIXED.pack(self.version_min, self.version_max, self.capabilities,
                                 self.node_id, self.nonce, len(cl), len(nm)) + cl + nm

    @classmethod
    def decode_payload(cls, mv: memoryview) -> Hello:
        if len(mv) < _HELLO_FIXED.size:
            raise ProtocolError("HELLO too short")
        vmin, vmax, caps, node_id, nonce, clen, nlen = _HELLO_FIXED.unpack_from(mv, 0)
        # Later versions may append fields after the names; v1 ignores them (they are still
        # covered by the handshake transcript, which hashes the HELLO frames as sent).
        if _HELLO_FIXED.size + clen + nlen > len(mv):
            raise ProtocolError("HELLO length mismatch")
        if not 0 < clen <= MAX_NAME or not 0 < nlen <= MAX_NAME:
            raise ProtocolError("HELLO name length out of range")
        p = _HELLO_FIXED.size
        cluster = _text(mv[p:p + clen], "cluster name")
        name = _text(mv[p + clen:p + clen + nlen], "node name")
        return cls(vmin, vmax, cluster, node_id, name, nonce, caps)


@dataclass(slots=True)
class Auth(Message):
    """Proof of key possession: HMAC-SHA256(PSK, label | transcript hash), see auth.py."""

    proof: bytes

    TYPE: ClassVar[int] = MsgType.AUTH

    def encode_payload(self) -> bytes:
        if len(self.proof) != PROOF_LEN:
            raise ValueError(f"proof must be {PROOF_LEN} bytes")
        return bytes(self.proof)

    @classmethod
    def decode_payload(cls, mv: memoryview) -> Auth:
        if len(mv) != PROOF_LEN:
            raise ProtocolError("AUTH proof has the wrong length")
        return cls(mv.tobytes())


@dataclass(slots=True)
class AuthOk(Message):
    """Initiator's confirmation; the first MAC-tagged frame, so it also proves the session key."""

    TYPE: ClassVar[int] = MsgType.AUTH_OK

    def encode_payload(self) -> bytes:
        return b""

    @classmethod
    def decode_payload(cls, mv: memoryview) -> AuthOk:
        if len(mv):
            raise ProtocolError("AUTH_OK carries no payload")
        return cls()


_CODE_TEXT = struct.Struct(">HH")


def _enc_code_text(code: int, text: str) -> bytes:
    raw = text.encode("utf-8")[:MAX_TEXT]
    # cutting may split a multi-byte character; drop the broken tail rather than send bad UTF-8
    raw = raw.decode("utf-8", "ignore").encode("utf-8")
    return _CODE_TEXT.pack(code, len(raw)) + raw


def _dec_code_text(mv: memoryview, what: str) -> tuple[int, str]:
    if len(mv) < _CODE_TEXT.size:
        raise ProtocolError(f"{what} too short")
    code, tlen = _CODE_TEXT.unpack_from(mv, 0)
    if tlen > MAX_TEXT or _CODE_TEXT.size + tlen != len(mv):
        raise ProtocolError(f"{what} text length mismatch")
    return code, _text(mv[_CODE_TEXT.size:], f"{what} text")


@dataclass(slots=True)
class Refuse(Message):
    """The sender is closing the connection for `reason` (a RefuseReason code)."""

    reason: int
    text: str = ""

    TYPE: ClassVar[int] = MsgType.REFUSE

    def encode_payload(self) -> bytes:
        return _enc_code_text(self.reason, self.text)

    @classmethod
    def decode_payload(cls, mv: memoryview) -> Refuse:
        return cls(*_dec_code_text(mv, "REFUSE"))


_SNAP_BEGIN = struct.Struct(">QI")
_SNAP_END = struct.Struct(">QIQ")
_SEQ_COUNT = struct.Struct(">QI")
_EPOCH_COUNT = struct.Struct(">QI")
_U64 = struct.Struct(">Q")
_HEARTBEAT = struct.Struct(">QQ")


@dataclass(slots=True)
class SnapshotBegin(Message):
    """Start of a full snapshot of everything `origin` originated, as of `epoch`."""

    epoch: int
    origin: int

    TYPE: ClassVar[int] = MsgType.SNAPSHOT_BEGIN

    def encode_payload(self) -> bytes:
        return _SNAP_BEGIN.pack(self.epoch, self.origin)

    @classmethod
    def decode_payload(cls, mv: memoryview) -> SnapshotBegin:
        if len(mv) != _SNAP_BEGIN.size:
            raise ProtocolError("SNAPSHOT_BEGIN has the wrong length")
        return cls(*_SNAP_BEGIN.unpack_from(mv, 0))


@dataclass(slots=True)
class SnapshotChunk(Message):
    """Records of the snapshot `epoch`; as many chunks as needed between BEGIN and END."""

    epoch: int
    records: list[Record]

    TYPE: ClassVar[int] = MsgType.SNAPSHOT_CHUNK

    def encode_payload(self) -> bytes:
        return _EPOCH_COUNT.pack(self.epoch, len(self.records)) + encode_records(self.records)

    @classmethod
    def decode_payload(cls, mv: memoryview) -> SnapshotChunk:
        if len(mv) < _EPOCH_COUNT.size:
            raise ProtocolError("SNAPSHOT_CHUNK too short")
        epoch, count = _EPOCH_COUNT.unpack_from(mv, 0)
        return cls(epoch, decode_records(mv[_EPOCH_COUNT.size:], count))


@dataclass(slots=True)
class SnapshotEnd(Message):
    """End of snapshot `epoch`; `count` is the number of records sent in its chunks."""

    epoch: int
    origin: int
    count: int

    TYPE: ClassVar[int] = MsgType.SNAPSHOT_END

    def encode_payload(self) -> bytes:
        return _SNAP_END.pack(self.epoch, self.origin, self.count)

    @classmethod
    def decode_payload(cls, mv: memoryview) -> SnapshotEnd:
        if len(mv) != _SNAP_END.size:
            raise ProtocolError("SNAPSHOT_END has the wrong length")
        return cls(*_SNAP_END.unpack_from(mv, 0))


@dataclass(slots=True)
class Updates(Message):
    """A batch of incremental records; `seq` increases by one per UPDATES frame sent."""

    seq: int
    records: list[Record]

    TYPE: ClassVar[int] = MsgType.UPDATES

    def encode_payload(self) -> bytes:
        return _SEQ_COUNT.pack(self.seq, len(self.records)) + encode_records(self.records)

    @classmethod
    def decode_payload(cls, mv: memoryview) -> Updates:
        if len(mv) < _SEQ_COUNT.size:
            raise ProtocolError("UPDATES too short")
        seq, count = _SEQ_COUNT.unpack_from(mv, 0)
        return cls(seq, decode_records(mv[_SEQ_COUNT.size:], count))


@dataclass(slots=True)
class Ack(Message):
    """Cumulative acknowledgement: every UPDATES up to and including `seq` was applied."""

    seq: int

    TYPE: ClassVar[int] = MsgType.ACK

    def encode_payload(self) -> bytes:
        return _U64.pack(self.seq)

    @classmethod
    def decode_payload(cls, mv: memoryview) -> Ack:
        if len(mv) != _U64.size:
            raise ProtocolError("ACK has the wrong length")
        return cls(_U64.unpack_from(mv, 0)[0])


@dataclass(slots=True)
class ResyncRequest(Message):
    """Ask the peer for a fresh snapshot (e.g. after a seq gap); reason is a RefuseReason code."""

    reason: int
    text: str = ""

    TYPE: ClassVar[int] = MsgType.RESYNC_REQUEST

    def encode_payload(self) -> bytes:
        return _enc_code_text(self.reason, self.text)

    @classmethod
    def decode_payload(cls, mv: memoryview) -> ResyncRequest:
        return cls(*_dec_code_text(mv, "RESYNC_REQUEST"))


@dataclass(slots=True)
class Heartbeat(Message):
    """Liveness and progress: sender's wall clock (ms) and the last UPDATES seq it received."""

    sent_ms: int
    last_seq: int

    TYPE: ClassVar[int] = MsgType.HEARTBEAT

    def encode_payload(self) -> bytes:
        return _HEARTBEAT.pack(self.sent_ms, self.last_seq)

    @classmethod
    def decode_payload(cls, mv: memoryview) -> Heartbeat:
        if len(mv) != _HEARTBEAT.size:
            raise ProtocolError("HEARTBEAT has the wrong length")
        return cls(*_HEARTBEAT.unpack_from(mv, 0))


MESSAGE_CLASSES: dict[int, type[Message]] = {
    c.TYPE: c
    for c in (Hello, Auth, AuthOk, Refuse, SnapshotBegin, SnapshotChunk, SnapshotEnd, Updates,
              Ack, ResyncRequest, Heartbeat)
}


def decode_payload(mtype: int, payload: bytes | memoryview) -> Message:
    """Decode a payload of a known message type; ProtocolError for unknown types or bad bytes."""
    cls = MESSAGE_CLASSES.get(mtype)
    if cls is None:
        raise ProtocolError(f"unknown message type {mtype}")
    try:
        return cls.decode_payload(memoryview(payload))
    except struct.error as exc:  # belt and braces: every length is checked before unpacking
        raise ProtocolError(f"malformed {cls.__name__}: {exc}") from exc


# --------------------------------------------------------------------------------------------
# Frames
# --------------------------------------------------------------------------------------------

@dataclass(slots=True, frozen=True)
class FrameHeader:
    version: int
    type: int
    flags: int
    length: int
    counter: int


def parse_header(data: bytes | memoryview) -> FrameHeader:
    """Validate a 20-byte header. The length is checked here, before any payload is read."""
    if len(data) != HEADER_LEN:
        raise ProtocolError("frame header has the wrong size")
    magic, version, mtype, flags, length, counter = HEADER.unpack(data)
    if magic != MAGIC:
        raise ProtocolError("bad frame magic (not an nftsync peer?)")
    if length > MAX_PAYLOAD:
        raise ProtocolError(f"frame payload of {length} bytes exceeds the {MAX_PAYLOAD} limit")
    if flags & ~KNOWN_FLAGS:
        raise ProtocolError(f"unknown frame flags 0x{flags:04x}")
    return FrameHeader(version, mtype, flags, length, counter)


def compute_tag(key: bytes, header: bytes | memoryview, payload: bytes | memoryview) -> bytes:
    """HMAC-SHA256 over header+payload, truncated to TAG_LEN. The header holds the counter."""
    mac = hmac.new(key, header, hashlib.sha256)
    mac.update(payload)
    return mac.digest()[:TAG_LEN]


def encode_frame(message: Message, counter: int, key: bytes | None,
                 version: int = PROTOCOL_VERSION, flags: int = 0) -> bytes:
    """Build one frame. With `key` (every frame after the handshake) a tag is appended."""
    try:
        payload = message.encode_payload()
    except struct.error as exc:
        raise ValueError(f"{type(message).__name__} field out of range: {exc}") from exc
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"{type(message).__name__} payload of {len(payload)} bytes exceeds "
                         f"{MAX_PAYLOAD}; split the records over several frames")
    header = HEADER.pack(MAGIC, version, message.TYPE, flags, len(payload), counter)
    if key is None:
        return header + payload
    return header + payload + compute_tag(key, header, payload)


def verify_tag(key: bytes, header: bytes | memoryview, payload: bytes | memoryview,
               tag: bytes | memoryview) -> None:
    if not hmac.compare_digest(compute_tag(key, header, payload), bytes(tag)):
        raise ProtocolError("frame authentication tag mismatch (tampered, replayed or wrong key)")


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
