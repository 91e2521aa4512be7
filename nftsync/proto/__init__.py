"""nftsync peer protocol: authenticated, versioned, length-prefixed frames over TCP.

`frames` holds the wire format and message/record codecs (pure bytes, fuzzable), `conntrack`
the layout of a replicated conntrack entry (the body of a ConntrackRecord), `auth` the
pre-shared key file rules and handshake cryptography, `channel` the asyncio connection that the
replication daemon uses. docs/protocol.md is the byte-by-byte specification.
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
    "CAP_CONNTRACK", "CAP_DEFAULT", "CAP_SESSIONS", "CT_ENTRY_SIZE", "FLAG_IGNORABLE",
    "MAX_PAYLOAD", "MAX_REMAINING_MS", "OP_ADD", "OP_DELETE", "OP_UPSERT", "PROTOCOL_VERSION",
    "Ack", "Auth", "AuthError", "AuthOk", "Channel", "ConnectionClosed", "ConntrackRecord",
    "CtFormatError", "Heartbeat", "Hello", "Identity", "KeyFileError", "Message", "MsgType",
    "PeerInfo", "PeerRefused", "ProtocolError", "Record", "Refuse", "RefuseReason",
    "ResyncRequest", "SessionRecord", "SnapshotBegin", "SnapshotChunk", "SnapshotEnd", "Updates",
    "ct_record_key", "decode_ct", "encode_ct", "load_key", "split_records",
]
