"""The peer protocol's basic vocabulary: magic, versions, limits, integer ranges and errors,
shared by the record codecs (records.py), the frames and messages (frames.py), the handshake
(auth.py) and the connection (channel.py). docs/protocol.md has the byte layouts."""

from __future__ import annotations

import struct

from nftsync.errors import NftsyncError

MAGIC = b"NFSY"
PROTOCOL_VERSION = 2
# Versions this implementation can speak; HELLO advertises the range and both sides pick the max
# common one (see docs/protocol.md "Versioning"). Version 1 is not spoken any more: its HELLO
# told the cluster name, node id and node name to whoever connected, before any proof.
VERSION_MIN = 2
VERSION_MAX = 2

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


def decode_text(mv: memoryview, what: str) -> str:
    try:
        return str(mv, "utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{what} is not valid UTF-8") from exc


def encode_name(value: str, what: str, limit: int, allow_empty: bool = False) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) > limit or (not raw and not allow_empty):
        raise ValueError(f"{what} must be 1..{limit} UTF-8 bytes, got {len(raw)}")
    return raw
