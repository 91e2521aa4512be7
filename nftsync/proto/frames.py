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
from dataclasses import dataclass
from typing import ClassVar

from nftsync.proto.records import Record, decode_records, encode_records
from nftsync.proto.wire import (
    HEADER,
    HEADER_LEN,
    KNOWN_FLAGS,
    MAGIC,
    MAX_NAME,
    MAX_PAYLOAD,
    MAX_TEXT,
    NONCE_LEN,
    PROOF_LEN,
    PROTOCOL_VERSION,
    TAG_LEN,
    ProtocolError,
    decode_text,
    encode_name,
)

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
    NODE_INFO = 23  # optional in v1: always sent with FLAG_IGNORABLE


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

#: What a v2 HELLO puts in v1's identity fields (node id 0, names "-"): a HELLO goes to whoever
#: connects, before any proof, so it names nothing; the fields stay so that a v1 node can still
#: parse it and refuse with BAD_VERSION instead of PROTOCOL_ERROR.
HELLO_NO_NODE_ID = 0
HELLO_NO_NAME = "-"


@dataclass(slots=True)
class Hello(Message):
    """First frame each way. Its layout is frozen for all versions so any two nodes can read it.

    Since v2 it carries only versions, nonce and capabilities: `cluster`, `node_id` and
    `node_name` are v1's fields, sent as HELLO_NO_NAME / HELLO_NO_NODE_ID and ignored.
    """

    version_min: int
    version_max: int
    cluster: str
    node_id: int
    node_name: str
    nonce: bytes
    capabilities: int = CAP_DEFAULT

    TYPE: ClassVar[int] = MsgType.HELLO

    def encode_payload(self) -> bytes:
        cl = encode_name(self.cluster, "cluster name", MAX_NAME)
        nm = encode_name(self.node_name, "node name", MAX_NAME)
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
        cluster = decode_text(mv[p:p + clen], "cluster name")
        name = decode_text(mv[p + clen:p + clen + nlen], "node name")
        return cls(vmin, vmax, cluster, node_id, name, nonce, caps)


@dataclass(slots=True)
class Auth(Message):
    """Proof of holding the key for the cluster: HMAC-SHA256(cluster key, label | transcript).

    The initiator's AUTH also carries `key_check`, a proof keyed with the PSK alone, so that a
    responder can log "right key, wrong cluster" (auth.py); the responder's has none.
    """

    proof: bytes
    key_check: bytes = b""

    TYPE: ClassVar[int] = MsgType.AUTH

    def encode_payload(self) -> bytes:
        if len(self.proof) != PROOF_LEN or len(self.key_check) not in (0, PROOF_LEN):
            raise ValueError(f"proof and key check must be {PROOF_LEN} bytes")
        return bytes(self.proof) + bytes(self.key_check)

    @classmethod
    def decode_payload(cls, mv: memoryview) -> Auth:
        if len(mv) not in (PROOF_LEN, 2 * PROOF_LEN):
            raise ProtocolError("AUTH proof has the wrong length")
        return cls(mv[:PROOF_LEN].tobytes(), mv[PROOF_LEN:].tobytes())


_AUTH_OK = struct.Struct(">IB")  # node_id, name_len; the node name follows


@dataclass(slots=True)
class AuthOk(Message):
    """The first tagged frame each way: it proves the session key, and tells who the sender is
    (node id and name), which only now reaches a peer that proved the key. Bytes after the
    name are fields of later versions: ignored."""

    node_id: int
    node_name: str

    TYPE: ClassVar[int] = MsgType.AUTH_OK

    def encode_payload(self) -> bytes:
        name = encode_name(self.node_name, "node name", MAX_NAME)
        return _AUTH_OK.pack(self.node_id, len(name)) + name

    @classmethod
    def decode_payload(cls, mv: memoryview) -> AuthOk:
        if len(mv) < _AUTH_OK.size:
            raise ProtocolError("AUTH_OK too short")
        node_id, n = _AUTH_OK.unpack_from(mv, 0)
        if not 0 < n <= MAX_NAME or _AUTH_OK.size + n > len(mv):
            raise ProtocolError("AUTH_OK node name length out of range")
        return cls(node_id, decode_text(mv[_AUTH_OK.size:_AUTH_OK.size + n], "node name"))


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
    return code, decode_text(mv[_CODE_TEXT.size:], f"{what} text")


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


_NODE_INFO = struct.Struct(">B")  # software_len; the software version string follows
MAX_SOFTWARE = 64


@dataclass(slots=True)
class NodeInfo(Message):
    """What the sender runs (its software version, e.g. "0.1.0"), for `nftsync ctl peers`.

    Never in HELLO: a HELLO goes to whoever connects, before anyone proved the key, and nothing
    about the node may be told before that. NODE_INFO is a tagged frame after the handshake, so
    only a peer that proved the key reads it. It is optional in protocol v1 and always sent with
    FLAG_IGNORABLE: a v1 node that does not know type 23 skips it (docs/protocol.md). Bytes
    after the version string are fields of later versions: ignored, like HELLO's extension.
    """

    software: str

    TYPE: ClassVar[int] = MsgType.NODE_INFO

    def encode_payload(self) -> bytes:
        raw = encode_name(self.software, "software version", MAX_SOFTWARE)
        return _NODE_INFO.pack(len(raw)) + raw

    @classmethod
    def decode_payload(cls, mv: memoryview) -> NodeInfo:
        if len(mv) < _NODE_INFO.size:
            raise ProtocolError("NODE_INFO too short")
        (n,) = _NODE_INFO.unpack_from(mv, 0)
        if not 0 < n <= MAX_SOFTWARE or _NODE_INFO.size + n > len(mv):
            raise ProtocolError("NODE_INFO software length out of range")
        software = decode_text(mv[_NODE_INFO.size:_NODE_INFO.size + n], "software version")
        if not software.isprintable():
            raise ProtocolError("NODE_INFO software version is not printable")
        return cls(software)


MESSAGE_CLASSES: dict[int, type[Message]] = {
    c.TYPE: c
    for c in (Hello, Auth, AuthOk, Refuse, SnapshotBegin, SnapshotChunk, SnapshotEnd, Updates,
              Ack, ResyncRequest, Heartbeat, NodeInfo)
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
        if data[0] == 0x16 and data[1] == 0x03:  # a TLS handshake record: a ClientHello
            raise ProtocolError("bad frame magic: the peer speaks TLS (is tls_* set there but "
                                "not here?)")
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
