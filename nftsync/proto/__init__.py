"""nftsync peer protocol: authenticated, versioned, length-prefixed frames over TCP.

`frames` holds the wire format and message/record codecs (pure bytes, fuzzable), `auth` the
pre-shared key file rules and handshake cryptography, `channel` the asyncio connection that the
replication daemon uses. docs/protocol.md is the byte-by-byte specification.
"""

from __future__ import annotations

from nftsync.proto.auth import AuthError, KeyFileError, load_key
from nftsync.proto.channel import Channel, Identity, PeerInfo, PeerRefused
from nftsync.proto.frames import (
    CAP_CONNTRACK,
    CAP_DEFAULT,
    CAP_SESSIONS,
    FLAG_IGNORABLE,
    MAX_PAYLOAD,
    MAX_REMAINING_MS,
    OP_ADD,
    OP_DELETE,
    OP_UPSERT,
    PROTOCOL_VERSION,
    Ack,
    Auth,
    AuthOk,
    ConnectionClosed,
    ConntrackRecord,
    Heartbeat,
    Hello,
    Message,
    MsgType,
    ProtocolError,
    Record,
    Refuse,
    RefuseReason,
    ResyncRequest,
    SessionRecord,
    SnapshotBegin,
    SnapshotChunk,
    SnapshotEnd,
    Updates,
    split_records,
)

__all__ = [
    "CAP_CONNTRACK", "CAP_DEFAULT", "CAP_SESSIONS", "FLAG_IGNORABLE", "MAX_PAYLOAD",
    "MAX_REMAINING_MS", "OP_ADD", "OP_DELETE", "OP_UPSERT", "PROTOCOL_VERSION", "Ack", "Auth",
    "AuthError", "AuthOk", "Channel", "ConnectionClosed", "ConntrackRecord", "Heartbeat", "Hello",
    "Identity", "KeyFileError", "Message", "MsgType", "PeerInfo", "PeerRefused", "ProtocolError",
    "Record", "Refuse", "RefuseReason", "ResyncRequest", "SessionRecord", "SnapshotBegin",
    "SnapshotChunk", "SnapshotEnd", "Updates", "load_key", "split_records",
]
