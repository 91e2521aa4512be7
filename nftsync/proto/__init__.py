"""nftsync peer protocol: authenticated, versioned, length-prefixed frames over TCP.

Pure bytes, fuzzable, no sockets: `wire` (magic, versions, limits, errors), `records` (the
replication records and their codecs), `conntrack` (the layout of a replicated conntrack entry,
the body of a ConntrackRecord), `frames` (framing, tags, the messages). With I/O: `auth` (the
pre-shared key file rules and handshake cryptography) and `channel` (the asyncio connection the
daemon uses). docs/protocol.md is the byte-by-byte specification.
"""

from __future__ import annotations

from nftsync.proto.auth import AuthError, KeyFileError, load_key
from nftsync.proto.channel import Channel, Identity, PeerInfo, PeerRefused
from nftsync.proto.conntrack import (
    CT_ENTRY_SIZE,
    CtFormatError,
    ct_record_key,
    decode_ct,
    encode_ct,
)
from nftsync.proto.frames import (
    CAP_CONNTRACK,
    CAP_DEFAULT,
    CAP_SESSIONS,
    Ack,
    Auth,
    AuthOk,
    Heartbeat,
    Hello,
    Message,
    MsgType,
    NodeInfo,
    Refuse,
    RefuseReason,
    ResyncRequest,
    SnapshotBegin,
    SnapshotChunk,
    SnapshotEnd,
    Updates,
)
from nftsync.proto.records import (
    OP_ADD,
    OP_DELETE,
    OP_UPSERT,
    ConntrackRecord,
    Record,
    SessionRecord,
    split_records,
)
from nftsync.proto.wire import (
    FLAG_IGNORABLE,
    MAX_PAYLOAD,
    MAX_REMAINING_MS,
    PROTOCOL_VERSION,
    ConnectionClosed,
    ProtocolError,
)

__all__ = [
    "CAP_CONNTRACK", "CAP_DEFAULT", "CAP_SESSIONS", "CT_ENTRY_SIZE", "FLAG_IGNORABLE",
    "MAX_PAYLOAD", "MAX_REMAINING_MS", "OP_ADD", "OP_DELETE", "OP_UPSERT", "PROTOCOL_VERSION",
    "Ack", "Auth", "AuthError", "AuthOk", "Channel", "ConnectionClosed", "ConntrackRecord",
    "CtFormatError", "Heartbeat", "Hello", "Identity", "KeyFileError", "Message", "MsgType",
    "NodeInfo", "PeerInfo", "PeerRefused", "ProtocolError", "Record", "Refuse", "RefuseReason",
    "ResyncRequest", "SessionRecord", "SnapshotBegin", "SnapshotChunk", "SnapshotEnd", "Updates",
    "ct_record_key", "decode_ct", "encode_ct", "load_key", "split_records",
]
