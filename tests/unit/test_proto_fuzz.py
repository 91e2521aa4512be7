"""Property tests for the peer protocol: hostile bytes never escape as anything but ProtocolError,
valid messages round-trip, and a listening peer survives garbage connections on loopback.

Example counts are kept moderate so the whole file runs in well under 20 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nftsync.proto import frames
from nftsync.proto.auth import KeyFileError, parse_key_text
from nftsync.proto.channel import Channel, Identity
from nftsync.proto.frames import (
    MESSAGE_CLASSES,
    Ack,
    Auth,
    AuthOk,
    Heartbeat,
    Hello,
    NodeInfo,
    Refuse,
    ResyncRequest,
    SnapshotBegin,
    SnapshotChunk,
    SnapshotEnd,
    Updates,
    decode_payload,
    encode_frame,
)
from nftsync.proto.records import ConntrackRecord, SessionRecord, decode_records
from nftsync.proto.wire import HEADER, MAGIC, MAX_PAYLOAD, ConnectionClosed, ProtocolError

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
    st.builds(Auth, st.binary(min_size=32, max_size=32),
              st.sampled_from([32, 0]).flatmap(lambda n: st.binary(min_size=n, max_size=n))),
    st.builds(AuthOk, u32, names),
    st.builds(Refuse, u16, utf8_limited(256)),
    st.builds(SnapshotBegin, u64, u32),
    st.builds(SnapshotChunk, u64, records),
    st.builds(SnapshotEnd, u64, u32, u64),
    st.builds(Updates, u64, records),
    st.builds(Ack, u64),
    st.builds(ResyncRequest, u16, utf8_limited(256)),
    st.builds(Heartbeat, u64, u64),
    st.builds(NodeInfo, utf8_limited(64, 1).filter(str.isprintable)),
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

_good_hello = encode_frame(Hello(2, 2, "-", 0, "-", bytes(32)), 0, None, version=1)
_proof = st.binary(min_size=32, max_size=32)
garbage_blobs = st.one_of(
    st.binary(max_size=300),
    # a plausible header with a random length and counter, then a few bytes of body
    st.builds(lambda t, ln, c, tail: HEADER.pack(MAGIC, 1, t, 0, ln, c) + tail,
              u8, u32, u64, st.binary(max_size=40)),
    # a truncated valid HELLO, and a valid HELLO followed by garbage instead of AUTH
    st.integers(0, len(_good_hello) - 1).map(lambda n: _good_hello[:n]),
    st.binary(max_size=80).map(lambda tail: _good_hello + tail),
    # the v2 messages after a good HELLO: an AUTH with random proofs (with and without its key
    # check, or cut short), then maybe an AUTH_OK tagged with a random key or not tagged at all
    st.builds(lambda p, c, cut, ok, tag: (
        _good_hello + encode_frame(Auth(p, c), 1, None, version=1)[:cut] +
        (encode_frame(AuthOk(*ok), 2, tag, version=2) if ok else b"")),
        _proof, st.one_of(st.just(b""), _proof), st.integers(20, 84),
        st.one_of(st.none(), st.tuples(u32, names)), st.one_of(st.none(), _proof)),
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


# ----------------------------------------------------------------------------- boundary values
# Every integer field of both record types at 0, 1, max and max+1 (and -1), map_id / key lengths
# at 0, 1, 64, 65 bytes, conntrack entries at 0, 1, 128, 129: exhaustively, not sampled, because
# the bugs live exactly at these edges (issue 9: a 100-day expiry made every later UPDATES frame
# fail to encode and the link reconnect forever).

U32_EDGES = (-1, 0, 1, 0xFFFFFFFF, 0x1_0000_0000)
U64_EDGES = (-1, 0, 1, 2**64 - 1, 2**64)
LEN_EDGES = (0, 1, 64, 65)
CT_LEN_EDGES = (0, 1, 128, 129)
SESSION_OPS = (0, 1, 2, 3)


def _fits(value: int, top: int) -> bool:
    return 0 <= value <= top


def _map_id(n: int) -> str:
    """A map id of exactly n UTF-8 bytes, with multi-byte characters where n allows (so a check
    that counted characters instead of bytes would let 65 bytes through)."""
    return "é" * (n // 2) + "m" * (n % 2)


def _check_round_trip(rec: SessionRecord | ConntrackRecord) -> None:
    """Encode, decode alone and inside both record-carrying messages: equal, field by field."""
    raw = rec.encode()
    assert type(rec).decode(raw) == rec
    for msg in (Updates(1, [rec, rec]), SnapshotChunk(2**64 - 1, [rec])):
        assert decode_payload(msg.TYPE, msg.encode_payload()) == msg
    # every truncation of a valid record is refused with ProtocolError, never another exception
    for cut in range(len(raw)):
        with contextlib.suppress(ProtocolError):
            decode_records(memoryview(raw[:cut]), 1)
            raise AssertionError(f"a record cut at {cut} of {len(raw)} bytes was accepted")


def test_session_record_boundaries_round_trip_or_raise_value_error() -> None:
    from nftsync.proto import MAX_REMAINING_MS

    assert MAX_REMAINING_MS == 2**32 - 1
    ok = refused = 0
    for op, mark, remaining, updated, origin, mlen, klen in itertools.product(
            SESSION_OPS, U32_EDGES, U32_EDGES, U64_EDGES, U32_EDGES, LEN_EDGES, LEN_EDGES):
        rec = SessionRecord(op, _map_id(mlen), bytes(range(klen)), mark, remaining, updated,
                            origin)
        valid = (op in (1, 2) and _fits(mark, 0xFFFFFFFF) and _fits(remaining, MAX_REMAINING_MS)
                 and _fits(updated, 2**64 - 1) and _fits(origin, 0xFFFFFFFF)
                 and 0 < mlen <= 64 and 0 < klen <= 64)
        if not valid:
            try:
                rec.encode()
            except ValueError:
                refused += 1
                continue
            raise AssertionError(f"out-of-range record was encoded: {rec}")
        ok += 1
        if mark in (0, 0xFFFFFFFF) and mlen in (1, 64) and klen in (1, 64):
            _check_round_trip(rec)  # the slow part (truncations) on a representative subset
        else:
            assert SessionRecord.decode(rec.encode()) == rec
    assert ok and refused


def test_conntrack_record_boundaries_round_trip_or_raise_value_error() -> None:
    for op, origin, updated, elen in itertools.product(
            SESSION_OPS, U32_EDGES, U64_EDGES, CT_LEN_EDGES):
        rec = ConntrackRecord(op, origin, updated, bytes([0xA5]) * elen)
        valid = (op in (1, 2) and _fits(origin, 0xFFFFFFFF) and _fits(updated, 2**64 - 1)
                 and 0 < elen <= 128)
        if valid:
            _check_round_trip(rec)
            continue
        try:
            rec.encode()
        except ValueError:
            continue
        raise AssertionError(f"out-of-range record was encoded: {rec}")


def test_out_of_range_field_is_named_in_the_error() -> None:
    """A whole frame is refused, and the ValueError says which field a sender must clamp."""
    good = SessionRecord(1, "web/sessions", b"\x0a\x00\x00\x01", 0x200, 1000, 1, 1)
    bad = SessionRecord(1, "web/sessions", b"\x0a\x00\x00\x02", 0x200, 100 * 86400 * 1000, 1, 1)
    try:
        encode_frame(Updates(1, [good, bad]), 5, KEY)
    except ValueError as exc:
        assert "remaining_ms" in str(exc) and "4294967295" in str(exc)
    else:
        raise AssertionError("a 100-day remaining_ms was encoded")


_SESS_HDR = struct.Struct(">BHBIIQIBB")
_CT_HDR = struct.Struct(">BHBIQ")


def _raw_session(op: int, mlen: int, klen: int, *, mark: int = 0xFFFFFFFF,
                 remaining: int = 0xFFFFFFFF, updated: int = 2**64 - 1, origin: int = 0xFFFFFFFF,
                 body_extra: int = 0) -> bytes:
    """A session record built byte by byte, so lengths the encoder refuses can be sent anyway."""
    body_len = 23 + mlen + klen + body_extra
    return _SESS_HDR.pack(1, body_len, op, mark, remaining, updated, origin, mlen, klen) + \
        b"m" * mlen + b"\x01" * klen + b"\x00" * max(body_extra, 0)


def test_hostile_session_lengths_and_ops_decode_only_to_protocol_error() -> None:
    for op, mlen, klen, extra in itertools.product(range(0, 5), (0, 1, 64, 65, 255),
                                                   (0, 1, 64, 65, 255), (-1, 0, 1)):
        raw = _raw_session(op, mlen, klen, body_extra=extra)
        valid = op in (1, 2) and 0 < mlen <= 64 and 0 < klen <= 64 and extra == 0
        if valid:
            rec = SessionRecord.decode(raw)
            # the maximum of every integer field comes back exactly (no sign or width slip)
            assert (rec.mark, rec.remaining_ms, rec.updated_ms, rec.origin) == \
                (0xFFFFFFFF, 0xFFFFFFFF, 2**64 - 1, 0xFFFFFFFF)
            assert rec.encode() == raw
            continue
        with contextlib.suppress(ProtocolError):
            decode_records(memoryview(raw), 1)
            raise AssertionError(f"accepted op={op} map_len={mlen} key_len={klen} extra={extra}")
        for mtype in (Updates.TYPE, SnapshotChunk.TYPE):
            payload = (8 * b"\xff") + (1).to_bytes(4, "big") + raw
            decode_or_protocol_error(strict_decode, mtype, payload)


def test_hostile_conntrack_lengths_and_ops_decode_only_to_protocol_error() -> None:
    for op, elen in itertools.product(range(0, 5), (0, 1, 128, 129, 0xFFFF - 13)):
        raw = _CT_HDR.pack(2, 13 + elen, op, 0xFFFFFFFF, 2**64 - 1) + b"\x5a" * elen
        valid = op in (1, 2) and 0 < elen <= 128
        if valid:
            rec = ConntrackRecord.decode(raw)
            assert (rec.origin, rec.updated_ms, len(rec.entry)) == (0xFFFFFFFF, 2**64 - 1, elen)
            assert rec.encode() == raw
            continue
        with contextlib.suppress(ProtocolError):
            decode_records(memoryview(raw), 1)
            raise AssertionError(f"accepted conntrack op={op} entry of {elen} bytes")


@FAST
@given(st.sampled_from(SESSION_OPS), st.sampled_from(U32_EDGES), st.sampled_from(U32_EDGES),
       st.sampled_from(U64_EDGES), st.sampled_from(U32_EDGES), st.sampled_from(LEN_EDGES),
       st.sampled_from(LEN_EDGES), st.data())
def test_boundary_records_mutated_only_raise_protocol_error(op, mark, remaining, updated, origin,
                                                            mlen, klen, data) -> None:
    """Edge-valued records with flipped bits: the decoder's range checks at their limits."""
    rec = SessionRecord(op, _map_id(mlen), b"\x07" * klen, mark, remaining, updated, origin)
    try:
        raw = bytearray(rec.encode())
    except ValueError:
        return
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= 1 << data.draw(st.integers(0, 7))
    decode_or_protocol_error(decode_records, memoryview(bytes(raw)), 1)
