"""Property tests for the peer protocol: hostile bytes never escape as anything but ProtocolError,
valid messages round-trip, and a listening peer survives garbage connections on loopback.

Example counts are kept moderate so the whole file runs in well under 20 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nftsync.proto import frames
from nftsync.proto.auth import KeyFileError, parse_key_text
from nftsync.proto.channel import Channel, Identity
from nftsync.proto.frames import (
    HEADER,
    MAGIC,
    MAX_PAYLOAD,
    MESSAGE_CLASSES,
    Ack,
    Auth,
    AuthOk,
    ConnectionClosed,
    ConntrackRecord,
    Heartbeat,
    Hello,
    ProtocolError,
    Refuse,
    ResyncRequest,
    SessionRecord,
    SnapshotBegin,
    SnapshotChunk,
    SnapshotEnd,
    Updates,
    decode_payload,
    decode_records,
    encode_frame,
)

KEY = bytes.fromhex("5a" * 32)
FAST = settings(max_examples=300, deadline=None)

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 2**64 - 1)


def utf8_limited(max_bytes: int, min_size: int = 0) -> st.SearchStrategy[str]:
    return st.text(min_size=min_size, max_size=max_bytes).filter(
        lambda s: len(s.encode()) <= max_bytes)


names = utf8_limited(64, 1)
sessions = st.builds(SessionRecord, st.sampled_from([1, 2]), names, st.binary(min_size=1,
                     max_size=64), u32, u32, u64, u32)
conntracks = st.builds(ConntrackRecord, st.sampled_from([1, 2]), u32, u64,
                       st.binary(min_size=1, max_size=128))
records = st.lists(st.one_of(sessions, conntracks), max_size=40)

messages = st.one_of(
    st.builds(Hello, u8, u8, names, u32, names, st.binary(min_size=32, max_size=32), u32),
    st.builds(Auth, st.binary(min_size=32, max_size=32)),
    st.just(AuthOk()),
    st.builds(Refuse, u16, utf8_limited(256)),
    st.builds(SnapshotBegin, u64, u32),
    st.builds(SnapshotChunk, u64, records),
    st.builds(SnapshotEnd, u64, u32, u64),
    st.builds(Updates, u64, records),
    st.builds(Ack, u64),
    st.builds(ResyncRequest, u16, utf8_limited(256)),
    st.builds(Heartbeat, u64, u64),
)


def strict_decode(mtype: int, data: bytes) -> None:
    """The class decoder itself, without decode_payload's struct.error safety net, so a missing
    bounds check shows up here instead of being masked."""
    MESSAGE_CLASSES[mtype].decode_payload(memoryview(data))


def decode_or_protocol_error(fn, *args) -> None:
    """Call a decoder on hostile input: success or ProtocolError are the only allowed outcomes."""
    with contextlib.suppress(ProtocolError):  # anything else propagates and fails the test
        fn(*args)


@FAST
@given(st.sampled_from(sorted(MESSAGE_CLASSES)), st.binary(max_size=600))
def test_random_payloads_only_raise_protocol_error(mtype: int, data: bytes) -> None:
    decode_or_protocol_error(decode_payload, mtype, data)
    decode_or_protocol_error(strict_decode, mtype, data)


@FAST
@given(st.integers(0, 0xFFFF), st.binary(max_size=600))
def test_random_records_only_raise_protocol_error(count: int, data: bytes) -> None:
    decode_or_protocol_error(decode_records, memoryview(data), count)
    decode_or_protocol_error(SessionRecord.decode, data)
    decode_or_protocol_error(ConntrackRecord.decode, data)


@FAST
@given(st.binary(min_size=20, max_size=20))
def test_random_headers_only_raise_protocol_error(data: bytes) -> None:
    try:
        hdr = frames.parse_header(data)
    except ProtocolError:
        return
    assert hdr.length <= MAX_PAYLOAD


@FAST
@given(messages, st.data())
def test_mutated_valid_payloads_only_raise_protocol_error(msg, data) -> None:
    """Bit flips and truncations of real encodings reach deeper code than random bytes."""
    raw = bytearray(msg.encode_payload())
    if raw:
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
        cut = data.draw(st.integers(0, len(raw)))
        decode_or_protocol_error(strict_decode, msg.TYPE, bytes(raw[:cut]))
    decode_or_protocol_error(strict_decode, msg.TYPE, bytes(raw))


@FAST
@given(records, st.data())
def test_mutated_record_streams_only_raise_protocol_error(recs, data) -> None:
    """Edit real record encodings where it hurts: type bytes, length fields, truncation."""
    blobs = [bytearray(r.encode()) for r in recs]
    for b in blobs:
        edit = data.draw(st.sampled_from(["none", "type", "len", "flip", "cut"]))
        if edit == "type":
            b[0] = data.draw(u8)
        elif edit == "len":
            b[1:3] = data.draw(u16).to_bytes(2, "big")
        elif edit == "flip":
            b[data.draw(st.integers(0, len(b) - 1))] ^= 1 << data.draw(st.integers(0, 7))
        elif edit == "cut":
            del b[data.draw(st.integers(0, len(b) - 1)):]
    blob = b"".join(blobs)
    count = len(recs) + data.draw(st.integers(-1, 1))
    decode_or_protocol_error(decode_records, memoryview(blob), max(count, 0))
    for b in blobs:
        decode_or_protocol_error(SessionRecord.decode, bytes(b))
        decode_or_protocol_error(ConntrackRecord.decode, bytes(b))


@FAST
@given(messages, u64)
def test_valid_messages_round_trip(msg, counter: int) -> None:
    assert decode_payload(msg.TYPE, msg.encode_payload()) == msg
    frame = encode_frame(msg, counter, KEY)
    hdr = frames.parse_header(frame[:20])
    assert hdr.counter == counter and hdr.type == msg.TYPE
    frames.verify_tag(KEY, frame[:20], frame[20:20 + hdr.length], frame[20 + hdr.length:])


@FAST
@given(st.text(max_size=200))
def test_key_text_parser_only_raises_key_file_error(text: str) -> None:
    try:
        key = parse_key_text(text)
    except KeyFileError:
        return
    assert len(key) >= 32


# ----------------------------------------------------------------------------- live server

A = Identity("fuzz", 1, "client")
B = Identity("fuzz", 2, "server")

_good_hello = encode_frame(Hello(1, 1, "fuzz", 7, "x", bytes(32)), 0, None)
garbage_blobs = st.one_of(
    st.binary(max_size=300),
    # a plausible header with a random length and counter, then a few bytes of body
    st.builds(lambda t, ln, c, tail: HEADER.pack(MAGIC, 1, t, 0, ln, c) + tail,
              u8, u32, u64, st.binary(max_size=40)),
    # a truncated valid HELLO, and a valid HELLO followed by garbage instead of AUTH
    st.integers(0, len(_good_hello) - 1).map(lambda n: _good_hello[:n]),
    st.binary(max_size=80).map(lambda tail: _good_hello + tail),
)


async def _send_garbage(port: int, blob: bytes) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(blob)
    with contextlib.suppress(ConnectionError):
        await writer.drain()
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def _good_peer(port: int) -> None:
    client = await Channel.connect("127.0.0.1", port, A, KEY, timeout=5)
    try:
        await client.send(Updates(3, [SessionRecord(1, "m", b"k", 1, 0, 0, 1)]))
        assert await client.recv() == Ack(3)
    finally:
        client.close()


async def _garbage_then_good(blobs: list[bytes], concurrent: bool = False) -> None:
    outcomes: list[BaseException | Channel] = []
    accepted = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            ch = await Channel.accept(reader, writer, B, KEY, timeout=2.0)
        except (ProtocolError, ConnectionClosed) as exc:
            outcomes.append(exc)
        else:
            outcomes.append(ch)
            try:
                msg = await ch.recv()
                await ch.send(Ack(msg.seq if isinstance(msg, Updates) else 0))
            finally:
                ch.close()
        if len(outcomes) == len(blobs) + 1:
            accepted.set()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    async with srv:
        if concurrent:
            await asyncio.gather(_good_peer(port), *(_send_garbage(port, b) for b in blobs))
        else:
            for blob in blobs:
                await _send_garbage(port, blob)
            await _good_peer(port)  # after all that, a real peer still gets in and is served
        await asyncio.wait_for(accepted.wait(), 10)
    assert sum(isinstance(o, Channel) for o in outcomes) == 1
    # the only channel is the real peer's; every garbage connection failed with our errors
    assert all(isinstance(o, (ProtocolError, ConnectionClosed, Channel)) for o in outcomes)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(garbage_blobs, min_size=1, max_size=6))
def test_server_survives_garbage_and_truncated_frames(blobs: list[bytes]) -> None:
    asyncio.run(asyncio.wait_for(_garbage_then_good(blobs), 30))


def test_server_survives_random_connections_concurrently() -> None:
    """Garbage and good peers interleaved at the same time on one listening socket."""
    async def main() -> None:
        blobs = [os.urandom(n) for n in (0, 1, 19, 20, 21, 500)] + [_good_hello[:30]]
        await _garbage_then_good(blobs, concurrent=True)

    asyncio.run(asyncio.wait_for(main(), 30))
