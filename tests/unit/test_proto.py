"""Peer protocol: codecs, handshake over real loopback TCP, tamper/replay/size checks, key files.

Traffic goes only to 127.0.0.1 on ephemeral ports. Every await is bounded by `run()` so a bug
that makes a side wait forever fails the test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import struct
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from nftsync.errors import NftsyncError
from nftsync.proto import auth, frames, wire
from nftsync.proto.auth import AuthError, KeyFileError, load_key
from nftsync.proto.channel import Channel, Identity, PeerRefused
from nftsync.proto.frames import (
    Ack,
    Auth,
    AuthOk,
    Heartbeat,
    Hello,
    Message,
    Refuse,
    RefuseReason,
    ResyncRequest,
    SnapshotBegin,
    SnapshotChunk,
    SnapshotEnd,
    Updates,
    decode_payload,
    encode_frame,
)
from nftsync.proto.records import (
    OP_ADD,
    OP_DELETE,
    ConntrackRecord,
    SessionRecord,
    decode_records,
    encode_records,
    split_records,
)
from nftsync.proto.wire import HEADER, MAGIC, MAX_PAYLOAD, ConnectionClosed, ProtocolError

KEY = bytes.fromhex("8f" * 4 + "1c2d3e4f5a6b7c8d9eafb0c1d2e3f405162738495a6b7c8d9eafb0c1")
OTHER_KEY = bytes(reversed(KEY))
A = Identity("lab", 1, "lb1")
B = Identity("lab", 2, "lb2")
BOUND = 20.0  # seconds; only a hang guard, never asserted as a duration


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, BOUND))


SESS = SessionRecord(OP_ADD, "web/sessions", bytes([10, 0, 0, 7, 0, 0, 0x1f, 0x90]), 0x2a,
                     30_000, 1_700_000_000_123, 1)
SESS_DEL = SessionRecord(OP_DELETE, "é/ünïcode", b"\xff" * 64, 0xFFFFFFFF, 0, 2**64 - 1,
                         0xFFFFFFFF)
CT = ConntrackRecord(OP_ADD, 3, 1_700_000_000_999, bytes(range(128)))
CT_DEL = ConntrackRecord(OP_DELETE, 3, 5, b"\x01")

MESSAGES: list[Message] = [
    Hello(2, 2, "-", 0, "-", bytes(range(32)), 3),
    Auth(bytes(range(32)), bytes(range(32, 64))),
    AuthOk(7, "lb7"),
    Refuse(RefuseReason.AUTH_FAILED, "authentication failed"),
    Refuse(RefuseReason.SHUTDOWN, ""),
    SnapshotBegin(2**64 - 1, 9),
    SnapshotChunk(4, [SESS, CT, SESS_DEL, CT_DEL]),
    SnapshotChunk(4, []),
    SnapshotEnd(4, 9, 123456789),
    Updates(17, [SESS, SESS_DEL, CT, CT_DEL]),
    Updates(0, []),
    Ack(17),
    ResyncRequest(RefuseReason.SEQ_GAP, "expected seq 18, got 20"),
    Heartbeat(1_700_000_000_000, 17),
]


# ----------------------------------------------------------------------------- codecs

@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_message_round_trip(msg: Message) -> None:
    assert decode_payload(msg.TYPE, msg.encode_payload()) == msg
    frame = encode_frame(msg, 42, KEY)
    hdr = frames.parse_header(frame[:wire.HEADER_LEN])
    assert (hdr.type, hdr.counter, hdr.length) == (msg.TYPE, 42, len(frame) - 20 - 16)
    frames.verify_tag(KEY, frame[:20], frame[20:-16], frame[-16:])


@pytest.mark.parametrize("rec", [SESS, SESS_DEL, CT, CT_DEL], ids=repr)
def test_record_round_trip(rec) -> None:
    assert type(rec).decode(rec.encode()) == rec


def test_unknown_record_type_is_skipped_but_counted() -> None:
    unknown = struct.pack(">BH", 99, 5) + b"\x00" * 5
    blob = SESS.encode() + unknown + CT.encode()
    assert decode_records(memoryview(blob), 3) == [SESS, CT]
    with pytest.raises(ProtocolError):  # the count must match what is there
        decode_records(memoryview(blob), 2)


@pytest.mark.parametrize("blob,count", [
    (SESS.encode()[:-1], 1),  # truncated
    (SESS.encode() + b"\x00", 1),  # trailing garbage
    (b"\x01\x00\x05abcde", 1),  # session body too short
    (CT.encode()[:3] + b"\x03" + CT.encode()[4:], 1),  # bad op
    (b"", 1),  # count larger than data
    (b"", 2**32 - 1),
])
def test_malformed_records_raise_protocol_error(blob: bytes, count: int) -> None:
    with pytest.raises(ProtocolError):
        decode_records(memoryview(blob), count)


def test_session_record_length_fields_are_cross_checked() -> None:
    raw = bytearray(SESS.encode())
    raw[3 + 21] += 1  # map_id length byte no longer matches the record length
    with pytest.raises(ProtocolError):
        SessionRecord.decode(bytes(raw))
    raw = bytearray(SESS.encode())
    raw[3 + 23] = 0xFF  # invalid UTF-8 in map_id
    with pytest.raises(ProtocolError):
        SessionRecord.decode(bytes(raw))


@pytest.mark.parametrize("bad", [
    SessionRecord(OP_ADD, "m" * 65, b"k", 1, 0, 0, 1),
    SessionRecord(OP_ADD, "m", b"k" * 65, 1, 0, 0, 1),
    SessionRecord(OP_ADD, "m", b"", 1, 0, 0, 1),
    SessionRecord(3, "m", b"k", 1, 0, 0, 1),
    SessionRecord(OP_ADD, "m", b"k", 2**32, 0, 0, 1),
    ConntrackRecord(OP_ADD, 1, 0, b"e" * 129),
    ConntrackRecord(OP_ADD, 1, -1, b"e"),
])
def test_encoding_refuses_what_decoding_would_refuse(bad) -> None:
    with pytest.raises(ValueError):
        encode_records([bad])


def test_split_records_fits_frames() -> None:
    recs = [SessionRecord(OP_ADD, "web/sessions", i.to_bytes(8, "big"), 1, 0, i, 1)
            for i in range(60_000)] + [CT] * 10_000
    chunks = split_records(recs)
    assert len(chunks) > 1 and sum(map(len, chunks)) == len(recs)
    for i, c in enumerate(chunks):
        frame = encode_frame(Updates(i, c), i, KEY)
        assert len(frame) - 36 <= MAX_PAYLOAD
    with pytest.raises(ValueError):
        encode_frame(Updates(0, recs), 0, KEY)


def test_header_checks() -> None:
    good = HEADER.pack(MAGIC, 1, 19, 0, 10, 0)
    assert frames.parse_header(good).length == 10
    for bad in (HEADER.pack(b"HTTP", 1, 19, 0, 10, 0), HEADER.pack(MAGIC, 1, 19, 0x8000, 10, 0),
                HEADER.pack(MAGIC, 1, 19, 0, MAX_PAYLOAD + 1, 0), good[:-1]):
        with pytest.raises(ProtocolError):
            frames.parse_header(bad)


# ----------------------------------------------------------------------------- loopback helpers

@contextlib.asynccontextmanager
async def server(identity: Identity = B, key: bytes = KEY, timeout: float = 5.0,
                 ssl_context: ssl.SSLContext | None = None,
                 ) -> AsyncIterator[tuple[int, asyncio.Queue]]:
    """A listening peer on 127.0.0.1:<ephemeral>; each accept's Channel or error goes to a queue."""
    results: asyncio.Queue = asyncio.Queue()
    accepted: list[Channel] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            ch = await Channel.accept(reader, writer, identity, key, timeout)
        except (ProtocolError, ConnectionClosed) as exc:
            await results.put(exc)
            return
        accepted.append(ch)
        await results.put(ch)

    srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ssl_context)
    port = srv.sockets[0].getsockname()[1]
    try:
        yield port, results
    finally:
        srv.close()
        for ch in accepted:
            ch.close()
        await srv.wait_closed()


async def pair() -> tuple[Channel, Channel, contextlib.AsyncExitStack]:
    stack = contextlib.AsyncExitStack()
    port, results = await stack.enter_async_context(server())
    client = await Channel.connect("127.0.0.1", port, A, KEY, timeout=5)
    stack.push_async_callback(client.wait_closed)
    stack.callback(client.close)
    srv_ch = await results.get()
    assert isinstance(srv_ch, Channel)
    return client, srv_ch, stack


async def raw_client(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def read_frame_raw(reader: asyncio.StreamReader) -> tuple[frames.FrameHeader, bytes]:
    hdr = frames.parse_header(await reader.readexactly(20))
    return hdr, await reader.readexactly(hdr.length)


# ----------------------------------------------------------------------------- handshake

def test_handshake_and_exchange_over_loopback() -> None:
    async def main() -> None:
        client, srv, stack = await pair()
        async with stack:
            assert (client.peer.node_id, client.peer.node_name, client.peer.cluster) == (2, "lb2",
                                                                                         "lab")
            assert (srv.peer.node_id, srv.peer.node_name) == (1, "lb1")
            assert client.peer.we_initiated and not srv.peer.we_initiated
            assert client.version == srv.version == 2
            assert srv.peer.address is not None and srv.peer.address[0] == "127.0.0.1"
            for m in MESSAGES[5:]:  # past HELLO..REFUSE (handshake-only or closing)
                await client.send(m)
                assert await srv.recv() == m
                await srv.send(m)
                assert await client.recv() == m
            await client.send_many([Ack(1), Ack(2), Heartbeat(3, 2)])
            assert [await srv.recv() for _ in range(3)] == [Ack(1), Ack(2), Heartbeat(3, 2)]
            with pytest.raises(ValueError):
                await client.send(Hello(2, 2, "-", 0, "-", bytes(32)))
            with pytest.raises(ValueError):
                await client.send(AuthOk(1, "lb1"))
            bad = SessionRecord(OP_ADD, "m", b"k" * 65, 1, 0, 0, 1)
            with pytest.raises(ValueError):  # a batch that fails to encode sends nothing ...
                await client.send_many([Ack(1), Updates(2, [bad])])
            await client.send(Ack(3))  # ... and leaves the counters in step
            assert await srv.recv() == Ack(3)
            for bad_identity in [("lab", 0, "x"), ("lab", 2**32, "x"), ("", 1, "x"),
                                 ("lab", 1, "n" * 65), ("lab", 1, "x", -1)]:
                with pytest.raises(ValueError):
                    Identity(*bad_identity)

    run(main())


def _both_fail(client_identity: Identity, server_identity: Identity, client_key: bytes,
               server_key: bytes) -> tuple[AuthError, AuthError]:
    async def main() -> tuple[AuthError, AuthError]:
        async with server(server_identity, server_key) as (port, results):
            with pytest.raises(AuthError) as cerr:
                await Channel.connect("127.0.0.1", port, client_identity, client_key, timeout=5)
            serr = await results.get()
            assert isinstance(serr, AuthError), serr
            return cerr.value, serr

    return run(main())


def test_wrong_key_fails_on_both_sides() -> None:
    cerr, serr = _both_fail(A, B, OTHER_KEY, KEY)
    assert serr.reason == RefuseReason.AUTH_FAILED and not serr.remote
    assert cerr.reason == RefuseReason.AUTH_FAILED and cerr.remote
    assert KEY.hex() not in str(cerr) and OTHER_KEY.hex() not in str(serr)


def test_wrong_cluster_refused_like_a_wrong_key() -> None:
    """Outside, a wrong cluster is a wrong key (AUTH_FAILED); our own error says which."""
    cerr, serr = _both_fail(Identity("other", 1, "lb1"), B, KEY, KEY)
    assert serr.reason == RefuseReason.WRONG_CLUSTER and not serr.remote
    assert "wrong cluster" in str(serr)
    assert cerr.reason == RefuseReason.AUTH_FAILED and cerr.remote
    assert "lab" not in str(cerr)  # an unauthenticated peer does not learn our cluster name


def test_same_node_id_refused() -> None:
    cerr, serr = _both_fail(Identity("lab", 2, "impostor"), B, KEY, KEY)
    assert cerr.reason == serr.reason == RefuseReason.SAME_NODE_ID
    assert cerr.remote and not serr.remote


@pytest.mark.parametrize("vmin,vmax,hdr_version", [
    (1, 1, 1),  # a node of protocol v1 (nftsync before issue 13)
    (3, 3, 1),  # a node that no longer speaks v2
    (0, 0, 1), (3, 2, 1),
    (2, 2, 2),  # a HELLO's header always says 1
])
def test_unsupported_version_refused(vmin: int, vmax: int, hdr_version: int) -> None:
    async def main() -> None:
        async with server() as (port, results):
            reader, writer = await raw_client(port)
            hello = Hello(vmin, vmax, "lab", 5, "future", os.urandom(32))
            writer.write(encode_frame(hello, 0, None, version=hdr_version))
            hdr, payload = await read_frame_raw(reader)
            refuse = decode_payload(hdr.type, payload)
            assert refuse == Refuse(RefuseReason.BAD_VERSION, refuse.text)
            assert await reader.read() == b""  # and the server closed the connection
            serr = await results.get()
            assert isinstance(serr, AuthError) and serr.reason == RefuseReason.BAD_VERSION
            if (vmin, vmax) == (1, 1):
                assert str(serr) == ("peer speaks handshake v1..1, we speak v2..2: upgrade "
                                     "nftsync on the peer")
                assert refuse.text == ("unsupported protocol version: we speak v2..2, you "
                                       "v1..1; upgrade nftsync on the older node")
            writer.close()

    run(main())


def test_newer_initiator_is_served_at_our_version() -> None:
    """A v3 node advertising 2..3 with extra HELLO fields is spoken to in v2 (docs: Versioning).

    The initiator side is written by hand from the spec, which also checks docs/protocol.md's
    key schedule against the implementation.
    """
    async def main() -> None:
        async with server() as (port, results):
            reader, writer = await raw_client(port)
            nonce = os.urandom(32)
            payload = Hello(2, 3, "-", 0, "-", nonce, 0x80000003).encode_payload()
            payload += b"\x01\x02future-field"
            my_hello = HEADER.pack(MAGIC, 1, Hello.TYPE, 0, len(payload), 0) + payload
            writer.write(my_hello)
            hdr, peer_payload = await read_frame_raw(reader)
            peer = decode_payload(hdr.type, peer_payload)
            assert isinstance(peer, Hello) and (peer.node_id, peer.cluster) == (0, "-")
            assert (peer.version_min, peer.version_max) == (2, 2)
            transcript = auth.transcript_hash(my_hello, HEADER.pack(*_fields(hdr)) + peer_payload)
            ck = auth.cluster_key(KEY, "lab")
            writer.write(encode_frame(Auth(auth.proof(ck, transcript, True),
                                           auth.key_check_proof(auth.check_key(KEY),
                                                                transcript)), 1, None,
                                      version=1))
            hdr, proof = await read_frame_raw(reader)
            assert hdr.type == Auth.TYPE and auth.check_proof(ck, transcript, False, proof)
            k_i2r, k_r2i = auth.session_keys(ck, nonce, peer.nonce, transcript)
            ok = AuthOk(5, "v3node").encode_payload() + b"future"
            writer.write(HEADER.pack(MAGIC, 2, AuthOk.TYPE, 0, len(ok), 2) + ok +
                         frames.compute_tag(k_i2r, HEADER.pack(MAGIC, 2, AuthOk.TYPE, 0,
                                                               len(ok), 2), ok))
            hdr, their_ok = await read_frame_raw(reader)
            frames.verify_tag(k_r2i, HEADER.pack(*_fields(hdr)), their_ok,
                              await reader.readexactly(16))
            assert decode_payload(hdr.type, their_ok) == AuthOk(2, "lb2")
            assert (hdr.version, hdr.counter) == (2, 2)
            writer.write(encode_frame(Ack(77), 3, k_i2r, version=2))
            srv = await results.get()
            assert isinstance(srv, Channel), srv
            assert srv.version == 2 and srv.peer.capabilities == 0x80000003
            assert (srv.peer.node_id, srv.peer.node_name, srv.peer.cluster) == (5, "v3node",
                                                                                "lab")
            assert await srv.recv() == Ack(77)
            await srv.send(Heartbeat(1, 77))
            raw = await reader.readexactly(20 + 16 + 16)
            frames.verify_tag(k_r2i, raw[:20], raw[20:36], raw[36:])
            assert decode_payload(raw[5], raw[20:36]) == Heartbeat(1, 77)
            writer.close()

    run(main())


def _fields(hdr: frames.FrameHeader) -> tuple:
    return (MAGIC, hdr.version, hdr.type, hdr.flags, hdr.length, hdr.counter)


def test_tls_pass_through(tmp_path: Path) -> None:
    """Optional TLS underneath: same handshake and frames inside a TLS stream on loopback."""
    cert, keyf = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(keyf), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=nftsync-test",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=30)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, keyf)
    client_ctx = ssl.create_default_context(cafile=str(cert))

    async def main() -> None:
        async with server(ssl_context=server_ctx) as (port, results):
            client = await Channel.connect("127.0.0.1", port, A, KEY, timeout=5,
                                           ssl_context=client_ctx)
            srv = await results.get()
            assert isinstance(srv, Channel)
            assert srv._writer.get_extra_info("ssl_object") is not None
            await client.send(Updates(1, [SESS, CT]))
            assert await srv.recv() == Updates(1, [SESS, CT])
            client.close()
            await client.wait_closed()
            with pytest.raises(ConnectionClosed):
                await srv.recv()

    run(main())


def test_reflected_proof_is_rejected() -> None:
    """A fake responder without the key sends the initiator's own proof back to it."""
    async def main() -> None:
        got_refuse: asyncio.Future = asyncio.get_running_loop().create_future()

        async def fake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            _hdr, _ = await read_frame_raw(reader)  # initiator's HELLO
            writer.write(encode_frame(Hello(2, 2, "-", 0, "-", os.urandom(32)), 0, None,
                                      version=1))
            hdr, payload = await read_frame_raw(reader)
            their_proof = decode_payload(hdr.type, payload)
            assert isinstance(their_proof, Auth)
            writer.write(encode_frame(Auth(their_proof.proof), 1, None, version=1))
            hdr, payload = await read_frame_raw(reader)
            got_refuse.set_result(decode_payload(hdr.type, payload))
            writer.close()

        srv = await asyncio.start_server(fake, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        async with srv:
            with pytest.raises(AuthError) as err:
                await Channel.connect("127.0.0.1", port, A, KEY, timeout=5)
            assert err.value.reason == RefuseReason.AUTH_FAILED and not err.value.remote
            assert (await got_refuse).reason == RefuseReason.AUTH_FAILED

    run(main())


def test_proofs_are_bound_to_direction_and_transcript() -> None:
    t1 = auth.transcript_hash(b"hello-i", b"hello-r")
    t2 = auth.transcript_hash(b"hello-r", b"hello-i")
    p = auth.proof(KEY, t1, initiator=True)
    assert auth.check_proof(KEY, t1, True, p)
    assert not auth.check_proof(KEY, t1, False, p)  # reflected
    assert not auth.check_proof(KEY, t2, True, p)  # roles swapped
    assert not auth.check_proof(OTHER_KEY, t1, True, p)
    ki, kr = auth.session_keys(KEY, b"a" * 32, b"b" * 32, t1)
    assert ki != kr and len(ki) == 32
    assert auth.session_keys(KEY, b"c" * 32, b"b" * 32, t1)[0] != ki  # fresh nonce, fresh key


def test_handshake_timeout() -> None:
    async def main() -> None:
        async with server(timeout=0.3) as (port, results):
            reader, writer = await raw_client(port)  # says nothing
            serr = await results.get()
            assert isinstance(serr, AuthError) and serr.reason == RefuseReason.TIMEOUT
            assert await reader.read() == b""
            writer.close()

    run(main())


# ----------------------------------------------------------------------------- frame integrity

@pytest.mark.parametrize("where", ["header", "payload", "tag", "counter"])
def test_tampered_frame_is_rejected(where: str) -> None:
    async def main() -> None:
        client, srv, stack = await pair()
        async with stack:
            frame = bytearray(client._frame(Updates(1, [SESS]), 0))
            pos = {"header": 5, "payload": 30, "tag": len(frame) - 1, "counter": 19}[where]
            frame[pos] ^= 0x01
            client._writer.write(bytes(frame))
            with pytest.raises(ProtocolError):
                await srv.recv()
            assert srv.closed
            with pytest.raises(PeerRefused) as ref:  # the receiver told the sender why
                await client.recv()
            assert ref.value.reason == RefuseReason.PROTOCOL_ERROR

    run(main())


def test_replayed_frame_is_detected() -> None:
    async def main() -> None:
        client, srv, stack = await pair()
        async with stack:
            frame = client._frame(Updates(1, [SESS]), 0)
            client._writer.write(frame)
            assert await srv.recv() == Updates(1, [SESS])
            client._writer.write(frame)  # same bytes again
            with pytest.raises(ProtocolError, match="replayed"):
                await srv.recv()

    run(main())


def test_reordered_frames_are_detected() -> None:
    async def main() -> None:
        client, srv, stack = await pair()
        async with stack:
            first = client._frame(Ack(1), 0)
            second = client._frame(Ack(2), 0)
            client._writer.write(second + first)
            with pytest.raises(ProtocolError, match="counter"):
                await srv.recv()

    run(main())


def test_frame_reflected_to_its_sender_fails() -> None:
    """A frame the server sent, echoed back to it, fails: each direction has its own key."""
    async def main() -> None:
        client, srv, stack = await pair()
        async with stack:
            # both sent 3 handshake frames (HELLO, AUTH, AUTH_OK): counters are aligned
            assert srv._send_counter == srv._recv_counter == 3
            frame = srv._frame(Ack(5), 0)
            srv._writer.write(frame)
            assert await client.recv() == Ack(5)
            # same counter the server expects next: only the direction key tells them apart
            assert frames.parse_header(frame[:20]).counter == srv._recv_counter
            client._writer.write(frame)
            with pytest.raises(ProtocolError, match="tag"):
                await srv.recv()

    run(main())


def test_oversized_length_closes_before_reading_body() -> None:
    async def main() -> None:
        client, srv, stack = await pair()
        async with stack:
            header = HEADER.pack(MAGIC, 1, Updates.TYPE, 0, MAX_PAYLOAD + 1,
                                 client._send_counter)
            client._writer.write(header)  # and no body at all: reading it would block forever
            await client._writer.drain()
            with pytest.raises(ProtocolError, match="exceeds"):
                await srv.recv()
            with pytest.raises(PeerRefused):
                await client.recv()

    run(main())


@pytest.mark.parametrize("length", [0xFFFFFFFF, MAX_PAYLOAD + 1, wire.MAX_HANDSHAKE_PAYLOAD + 1])
def test_oversized_length_during_handshake(length: int) -> None:
    """Before authentication even the 1 MiB frame limit is too generous: 4 KiB is the cap."""
    async def main() -> None:
        async with server() as (port, results):
            reader, writer = await raw_client(port)
            writer.write(HEADER.pack(MAGIC, 1, Hello.TYPE, 0, length, 0))
            serr = await results.get()
            assert isinstance(serr, ProtocolError) and "exceeds" in str(serr)
            hdr, payload = await read_frame_raw(reader)
            assert decode_payload(hdr.type, payload).reason == RefuseReason.PROTOCOL_ERROR
            assert await reader.read() == b""
            writer.close()

    run(main())


def test_truncated_frame_raises_connection_closed() -> None:
    async def main() -> None:
        client, srv, stack = await pair()
        async with stack:
            frame = client._frame(Updates(1, [SESS, CT]), 0)
            client._writer.write(frame[: len(frame) // 2])
            await client._writer.drain()
            client.close()
            with pytest.raises(ConnectionClosed, match="middle"):
                await srv.recv()
            with pytest.raises(ConnectionClosed):
                await srv.recv()

    run(main())


def test_clean_close_and_refuse() -> None:
    async def main() -> None:
        client, srv, stack = await pair()
        async with stack:
            await srv.refuse(RefuseReason.SHUTDOWN, "bye")
            with pytest.raises(PeerRefused) as ref:
                await client.recv()
            assert (ref.value.reason, ref.value.text) == (RefuseReason.SHUTDOWN, "bye")
            assert isinstance(ref.value, ConnectionClosed)
            with pytest.raises(ConnectionClosed):
                await client.send(Ack(1))

    run(main())


@dataclass(slots=True)
class _Future(Message):
    """A message type from a later protocol version."""

    blob: bytes
    TYPE: ClassVar[int] = 200

    def encode_payload(self) -> bytes:
        return self.blob


def test_unknown_message_types() -> None:
    async def main() -> None:
        client, srv, stack = await pair()
        async with stack:
            await client.send(_Future(b"skip me"), flags=wire.FLAG_IGNORABLE)
            await client.send(Ack(9))
            assert await srv.recv() == Ack(9)
            await client.send(_Future(b"must understand"))
            with pytest.raises(ProtocolError, match="unknown message type"):
                await srv.recv()

    run(main())


# ----------------------------------------------------------------------------- key files

HEX_KEY = "3f" * 4 + "0123456789abcdef" * 3 + "deadbeef" * 1


def _keyfile(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    p = tmp_path / "psk"
    p.write_text(text)
    p.chmod(mode)
    return p


def test_key_file_good_hex(tmp_path: Path) -> None:
    assert len(HEX_KEY) == 64
    assert load_key(_keyfile(tmp_path, HEX_KEY + "\n")) == bytes.fromhex(HEX_KEY)
    assert load_key(_keyfile(tmp_path, HEX_KEY, 0o400)) == bytes.fromhex(HEX_KEY)


def test_key_file_good_text(tmp_path: Path) -> None:
    secret = "correct horse battery staple 2026!"
    assert load_key(_keyfile(tmp_path, f"  {secret}\n")) == secret.encode()


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o602])
def test_key_file_too_open(tmp_path: Path, mode: int) -> None:
    with pytest.raises(KeyFileError, match="too open"):
        load_key(_keyfile(tmp_path, HEX_KEY, mode))


@pytest.mark.parametrize("text,match", [
    ("short-secret-123", "at least 32"),
    ("abcdefgh12345678abcdefgh1234567", "at least 32"),  # 31 characters
    ("a" * 64, "distinct"),
    ("", "empty"),
    ("line one of the secret 12345678\nline two", "non-printable"),
])
def test_key_file_bad_content(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(KeyFileError, match=match):
        load_key(_keyfile(tmp_path, text))


@pytest.mark.parametrize("text", [
    "0123456789abcdef" * 2,  # 32 hex digits: what `openssl rand -hex 16` makes
    "0123456789ABCDEF" * 3 + "0123456789abcde",  # 63 digits
    "0123456789abcdef" * 4 + "0",  # 65: an odd count is no byte string
    "12345678901234567890123456789012",  # decimal digits are hex digits too
])
def test_key_file_short_or_odd_hex_is_refused_not_taken_as_text(tmp_path: Path,
                                                                 text: str) -> None:
    """docs/daemon.md "The key file": a secret of hex digits only is hex and needs 64 of them.
    Read as text, 32 hex digits would be a 16-byte secret accepted as if it were 32."""
    with pytest.raises(KeyFileError, match="looks like hex") as err:
        load_key(_keyfile(tmp_path, text + "\n"))
    assert f"has {len(text)} digits" in str(err.value)
    assert "at least 64 digits (32 bytes)" in str(err.value)
    assert "openssl rand -hex 32" in str(err.value)
    assert str(err.value).startswith(f"key file {tmp_path / 'psk'}: ")


def test_key_file_hex_of_more_than_64_digits_is_decoded(tmp_path: Path) -> None:
    long_hex = HEX_KEY + "a1b2c3d4"
    assert load_key(_keyfile(tmp_path, long_hex)) == bytes.fromhex(long_hex)


def test_key_file_missing_or_not_regular(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot open"):
        load_key(tmp_path / "nope")
    with pytest.raises(KeyFileError):
        load_key(tmp_path)
    assert issubclass(KeyFileError, NftsyncError) and issubclass(AuthError, NftsyncError)


def test_connect_to_closed_port_is_connection_closed() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: the kernel answers with RST

        with pytest.raises(ConnectionClosed, match="cannot connect"):
            run(Channel.connect("127.0.0.1", port, A, KEY, timeout=5))


def test_recv_cancelled_mid_frame_keeps_stream_position() -> None:
    """wait_for(recv()) timing out between header and body must not desynchronise the stream."""
    async def main() -> None:
        client, srv, stack = await pair()
        async with stack:
            frame = client._frame(Updates(1, [SESS]), 0)
            client._writer.write(frame[:25])  # header and a little of the body
            await client._writer.drain()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(srv.recv(), 0.2)
            client._writer.write(frame[25:])
            assert await srv.recv() == Updates(1, [SESS])
            await client.send(Ack(1))
            assert await srv.recv() == Ack(1)

    run(main())


def test_full_size_frames_cross_the_channel() -> None:
    """1 MiB payloads (the limit) pass through StreamReader's buffer limits intact."""
    async def main() -> None:
        client, srv, stack = await pair()
        async with stack:
            recs = [SessionRecord(OP_ADD, "web/sessions", i.to_bytes(8, "big"), i % 7, 0, i, 1)
                    for i in range(40_000)]
            chunks = split_records(recs)
            sizes = [len(Updates(0, c).encode_payload()) for c in chunks]
            assert max(sizes) > MAX_PAYLOAD // 2
            for i, c in enumerate(chunks):
                await client.send(Updates(i, c))
            got = []
            for _ in chunks:
                got.extend((await srv.recv()).records)
            assert got == recs

    run(main())


def test_a_tls_client_hello_on_a_plain_link_is_named_as_such():
    from nftsync.proto.frames import HEADER_LEN, parse_header

    hello = bytes([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xFC, 0x03, 0x03])
    with pytest.raises(ProtocolError, match="the peer speaks TLS"):
        parse_header(hello.ljust(HEADER_LEN, b"\0"))
    with pytest.raises(ProtocolError, match=r"not an nftsync peer\?"):
        parse_header(b"GET / HTTP/1.1\r\n\r\n\0\0")
