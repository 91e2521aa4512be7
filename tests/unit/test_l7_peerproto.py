"""The HAProxy peers codec (nftsync/l7/peerproto.py): round trips of every message nftsync
handles, bytes captured from Debian's HAProxy 2.6, and malformed input (only ProtocolError)."""

from __future__ import annotations

import contextlib
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nftsync.l7 import peerproto as pp

# --- captured from HAProxy 2.6.12 (Debian 12) on the peers link, docs/l7.md -------------------

# DEFINE of `web` (stick-table type ip size 200k expire 30m store server_id; stick on src).
CAP_DEFINE_WEB = bytes.fromhex("0a820f" "01" "03") + b"web" + bytes.fromhex(
    "04" "04" "f1f1fe00" "f0e5ed05")
# A live update: id 1, key 127.0.0.50, server_id 1, server_key "be1" with cache id 1.
CAP_UPDATE_WEB = bytes.fromhex("0a800f" "00000001" "7f000032" "01" "05" "01" "03") + b"be1"
# HAProxy's ack of our update 2 of our table 1.
CAP_ACK = bytes.fromhex("0a8405" "01" "00000002")
# Captured in tests/kernel/test_l7_haproxy_peer.py's namespace (HAProxy -> peer, raw stream):
# two requests from 127.0.0.50 (DEFINE web, update with the name, two with the cached id);
CAP_LIVE_IP = bytes.fromhex(
    "0a820f01037765620404f1f1fe00f0e5ed05" "0a800f000000017f00003201050103626531"
    "0a800b000000027f000032010101" "0a800b000000037f000032010101")
# then a request with `X-Session: sess 42;x` (string len 64 -> 65; the name cache is shared by
# the tables of one connection: id 1 alone is still "be1");
CAP_LIVE_STRING = bytes.fromhex(
    "0a821302077765625f6864720641f1f1fe00f0e5ed05" "0a80110000000109736573732034323b78010101")
# and a restarted HAProxy: RESYNCREQ, its (empty) lesson to us: both DEFINEs then
# RESYNCPARTIAL (a new process is not up to date itself), RESYNCCONFIRM of our lesson, a
# DEFINE again and a live update of 127.0.0.51.
CAP_RESTART = bytes.fromhex(
    "0000" "0a820f01037765620404f1f1fe00f0e5ed05"
    "0a821302077765625f6864720641f1f1fe00f0e5ed05" "0002" "0003"
    "0a820f01037765620404f1f1fe00f0e5ed05" "0a800f000000017f00003301050103626531")


def frames(data: bytes) -> list[pp.Message]:
    dec = pp.FrameDecoder()
    out = dec.feed(data)
    assert dec.buffered == 0
    return out


def test_captured_define_and_live_updates() -> None:
    (define,) = frames(CAP_DEFINE_WEB)
    assert (define.cls, define.type) == (pp.CLASS_STICKTABLE, pp.STKT_DEFINE)
    d = pp.decode_define(define.payload)
    assert d == pp.TableDef(1, "web", pp.KEY_IPV4, 4, 0x80001, 1_800_000, ())
    assert d.key_type_name == "ip" and d.parseable
    cache = pp.RxDictCache()
    (msg,) = frames(CAP_UPDATE_WEB)
    u = pp.decode_update(msg.type, msg.payload, d, cache, 0)
    assert u == pp.Update(1, socket.inet_aton("127.0.0.50"), None, 1, "be1")
    # The same name later comes as its cache id alone; an incremental update is id + 1.
    again = struct.pack("!I", 0x7F000033) + b"\x02" + b"\x01\x01"
    u2 = pp.decode_update(pp.STKT_INCUPDATE, again, d, cache, u.update_id)
    assert u2 == pp.Update(2, socket.inet_aton("127.0.0.51"), None, 2, "be1")
    # Encoding the same DEFINE gives HAProxy's bytes back.
    assert pp.encode_define(d) == CAP_DEFINE_WEB


def test_captured_ack() -> None:
    (msg,) = frames(CAP_ACK)
    assert msg.type == pp.STKT_ACK
    assert pp.decode_ack(msg.payload) == (1, 2)
    assert pp.encode_ack(1, 2) == CAP_ACK


def decode_stream(data: bytes) -> list[tuple[str, object]]:
    """A captured stream as HAProxy's receiver reads it: (kind, decoded) per message."""
    dec = pp.FrameDecoder()
    cache = pp.RxDictCache()
    tables: dict[int, pp.TableDef] = {}
    current = None
    last: dict[int, int] = {}
    out: list[tuple[str, object]] = []
    for msg in dec.feed(data):
        if msg.cls == pp.CLASS_CONTROL:
            out.append(("control", msg.type))
        elif msg.type == pp.STKT_DEFINE:
            current = pp.decode_define(msg.payload)
            tables[current.table_id] = current
            out.append(("define", current))
        elif msg.type in pp.UPDATE_TYPES:
            assert current is not None
            u = pp.decode_update(msg.type, msg.payload, current, cache,
                                 last.get(current.table_id, 0))
            last[current.table_id] = u.update_id
            out.append((current.name, u))
    assert dec.buffered == 0
    return out


def test_captured_live_updates() -> None:
    ip = decode_stream(CAP_LIVE_IP)
    key = socket.inet_aton("127.0.0.50")
    assert ip[1:] == [("web", pp.Update(n, key, None, 1, "be1")) for n in (1, 2, 3)]
    string = decode_stream(CAP_LIVE_IP + CAP_LIVE_STRING)[4:]
    web_hdr = pp.TableDef(2, "web_hdr", pp.KEY_STR, 65, 0x80001, 1_800_000)
    assert string == [("define", web_hdr), ("web_hdr", pp.Update(1, b"sess 42;x", None, 1, "be1"))]


def test_captured_restart() -> None:
    kinds = decode_stream(CAP_RESTART)
    assert kinds[0] == ("control", pp.CTRL_RESYNCREQ)
    assert [k for k, _ in kinds[1:3]] == ["define", "define"]
    assert kinds[3:5] == [("control", pp.CTRL_RESYNCPARTIAL), ("control", pp.CTRL_RESYNCCONFIRM)]
    assert kinds[-1] == ("web", pp.Update(1, socket.inet_aton("127.0.0.51"), None, 1, "be1"))


def test_timed_update_we_sent_and_haproxy_applied() -> None:
    """The bytes of the measured push (45 s left, 127.0.0.50 -> be2) are what encode gives."""
    ours = pp.TableDef(1, "web", pp.KEY_IPV4, 4, 0x80001, 1_800_000)
    data = pp.encode_update(ours, 2, socket.inet_aton("127.0.0.50"), expire_ms=45_000,
                            server_id=2, server_key="be2", cache=pp.TxDictCache())
    assert data == bytes.fromhex("0a8513" "00000002" "0000afc8" "7f000032" "02" "05" "01"
                                 "03") + b"be2"


# --- integers and framing --------------------------------------------------------------------

@pytest.mark.parametrize("value,wire", [
    (0, "00"), (239, "ef"), (240, "f000"), (1_800_000, "f0e5ed05"), (0x80001, "f1f1fe00"),
])
def test_varint_known(value: int, wire: str) -> None:
    assert pp.encode_varint(value).hex() == wire
    assert pp.decode_varint(bytes.fromhex(wire), 0) == (value, len(wire) // 2)


@given(st.integers(min_value=0, max_value=(1 << 64) - 1))
def test_varint_round_trip(value: int) -> None:
    wire = pp.encode_varint(value)
    assert len(wire) <= pp.MAX_VARINT_BYTES
    assert pp.decode_varint(wire, 0) == (value, len(wire))


def test_varint_too_wide_or_truncated() -> None:
    with pytest.raises(pp.ProtocolError):
        pp.decode_varint(b"\xff" * 12, 0)
    with pytest.raises(pp.ProtocolError):
        pp.decode_varint(b"\xf0", 0)
    with pytest.raises(pp.ProtocolError):
        pp.decode_varint(b"", 0)


def test_frames_split_anywhere() -> None:
    stream = (pp.control(pp.CTRL_HEARTBEAT) + CAP_DEFINE_WEB + CAP_UPDATE_WEB
              + pp.control(pp.CTRL_RESYNCFINISHED) + CAP_ACK)
    whole = frames(stream)
    assert [(m.cls, m.type) for m in whole] == [
        (0, pp.CTRL_HEARTBEAT), (10, pp.STKT_DEFINE), (10, pp.STKT_UPDATE),
        (0, pp.CTRL_RESYNCFINISHED), (10, pp.STKT_ACK)]
    dec = pp.FrameDecoder()
    byte_by_byte = [m for i in range(len(stream)) for m in dec.feed(stream[i:i + 1])]
    assert byte_by_byte == whole


def test_frame_too_long_is_refused() -> None:
    dec = pp.FrameDecoder(max_payload=100)
    with pytest.raises(pp.ProtocolError):
        dec.feed(b"\x0a\x80" + pp.encode_varint(101))


def test_control_messages() -> None:
    for typ in (pp.CTRL_RESYNCREQ, pp.CTRL_RESYNCFINISHED, pp.CTRL_RESYNCPARTIAL,
                pp.CTRL_RESYNCCONFIRM, pp.CTRL_HEARTBEAT):
        assert frames(pp.control(typ)) == [pp.Message(pp.CLASS_CONTROL, typ)]
    with pytest.raises(ValueError):
        pp.encode_message(0, 1, b"x")


# --- handshake -------------------------------------------------------------------------------

def test_hello_round_trip_and_haproxy_text() -> None:
    wire = b"HAProxyS 2.1\nnftsync\nlb1 9486 1\n"
    hello = pp.decode_hello(wire.split(b"\n")[:3])
    assert hello == pp.Hello("2.1", "nftsync", "lb1", 9486, 1)
    assert pp.encode_hello(hello) == wire
    assert pp.version_supported("2.1") and not pp.version_supported("2.0")
    assert pp.encode_status(pp.STATUS_OK) == b"200\n"


@pytest.mark.parametrize("lines", [
    [b"HTTP/1.1 200", b"x", b"y 1 1"], [b"HAProxyS", b"x", b"y"], [b"HAProxyS 2.1", b"x"],
    [b"HAProxyS 2.1", b"x", b""], [b"HAProxyS 2.1", b"x", b"y notapid 1"],
    [b"HAProxyS 2.1", b"\xff", b"y 1 1"], [b"HAProxyS 2.1", b"x" * 300, b"y 1 1"],
])
def test_hello_malformed(lines: list[bytes]) -> None:
    with pytest.raises(pp.ProtocolError):
        pp.decode_hello(lines)


# --- definitions with counters and arrays; updates skip them ---------------------------------

COUNTERS = pp.TableDef(
    7, "rated", pp.KEY_STR, 65,
    (1 << 0) | (1 << 2) | (1 << 10) | (1 << 13) | (1 << 19) | (1 << 23) | (1 << 24),
    600_000, ((10, None, 10_000), (23, 3, None), (24, 2, 1000)))


def test_define_with_counters_round_trip() -> None:
    (msg,) = frames(pp.encode_define(COUNTERS))
    assert pp.decode_define(msg.payload) == COUNTERS


def test_update_skips_counters_and_arrays() -> None:
    wire = pp.encode_update(COUNTERS, 9, b"sess with space;x", expire_ms=None, server_id=3,
                            server_key="be3", cache=pp.TxDictCache())
    (msg,) = frames(wire)
    u = pp.decode_update(msg.type, msg.payload, COUNTERS, pp.RxDictCache(), 0)
    assert u == pp.Update(9, b"sess with space;x", None, 3, "be3")


@pytest.mark.parametrize("key_type,key_len,key", [
    (pp.KEY_IPV4, 4, socket.inet_aton("10.1.2.3")),
    (pp.KEY_IPV6, 16, socket.inet_pton(socket.AF_INET6, "2001:db8::1")),
    (pp.KEY_SINT, 4, struct.pack("!I", 4242)),
    (pp.KEY_STR, 65, b"abc"),
    (pp.KEY_STR, 65, b""),
    (pp.KEY_BIN, 8, b"\x00\x01\x02\x03\x04\x05\x06\x07"),
])
@pytest.mark.parametrize("timed", [False, True])
@pytest.mark.parametrize("incremental", [False, True])
def test_update_round_trip_per_key_type(key_type: int, key_len: int, key: bytes, timed: bool,
                                        incremental: bool) -> None:
    table = pp.TableDef(1, "t", key_type, key_len, 0x80001, 30_000)
    tx, rx = pp.TxDictCache(), pp.RxDictCache()
    first = pp.encode_update(table, 41, key, expire_ms=25_000 if timed else None,
                             server_id=-1, server_key="srv", cache=tx)
    second = pp.encode_update(table, 42, key, expire_ms=25_000 if timed else None,
                              server_id=2, server_key="srv", cache=tx, incremental=incremental)
    assert len(second) < len(first)  # the name is cached after its first use
    m1, m2 = frames(first + second)
    u1 = pp.decode_update(m1.type, m1.payload, table, rx, 0)
    u2 = pp.decode_update(m2.type, m2.payload, table, rx, u1.update_id)
    exp = 25_000 if timed else None
    assert u1 == pp.Update(41, key, exp, -1, "srv")
    assert u2 == pp.Update(42, key, exp, 2, "srv")
    if key_type != pp.KEY_STR:  # fixed-length keys of another length are the caller's bug
        with pytest.raises(ValueError):
            pp.encode_update(table, 1, key + b"x", expire_ms=None, server_id=1, server_key=None,
                             cache=tx)


def test_no_server_key_and_unknown_cache_id() -> None:
    table = pp.TableDef(1, "t", pp.KEY_IPV4, 4, 0x80001, 0)
    wire = pp.encode_update(table, 1, b"\x01\x02\x03\x04", expire_ms=None, server_id=5,
                            server_key=None, cache=pp.TxDictCache())
    (m,) = frames(wire)
    assert pp.decode_update(m.type, m.payload, table, pp.RxDictCache(), 0).server_key is None
    # An id never given a name on this connection: no name (HAProxy too stores none).
    payload = struct.pack("!I", 1) + b"\x01\x02\x03\x04" + b"\x05" + b"\x01\x07"
    assert pp.decode_update(pp.STKT_UPDATE, payload, table, pp.RxDictCache(), 0).server_key is None


@pytest.mark.parametrize("dict_value", [b"\x01\x00", b"\x01\x81", b"\x03\x01\x05ab",
                                        b"\x04\x01\x01ab", b"\x09\x01"])
def test_bad_dictionary_values(dict_value: bytes) -> None:
    table = pp.TableDef(1, "t", pp.KEY_IPV4, 4, 0x80001, 0)
    payload = struct.pack("!I", 1) + b"\x01\x02\x03\x04" + b"\x05" + dict_value
    with pytest.raises(pp.ProtocolError):
        pp.decode_update(pp.STKT_UPDATE, payload, table, pp.RxDictCache(), 0)


def test_tx_cache_reuses_slots_after_128_names() -> None:
    tx, rx = pp.TxDictCache(), pp.RxDictCache()
    table = pp.TableDef(1, "t", pp.KEY_IPV4, 4, 0x80001, 0)
    names = [f"s{i}" for i in range(200)] + ["s199", "s0", "s199"]
    for i, name in enumerate(names):
        (m,) = frames(pp.encode_update(table, i + 1, b"\x00\x00\x00\x01", expire_ms=None,
                                       server_id=1, server_key=name, cache=tx))
        assert pp.decode_update(m.type, m.payload, table, rx, i).server_key == name


def test_unknown_data_types_are_not_parseable() -> None:
    future = pp.TableDef(1, "t", pp.KEY_IPV4, 4, (1 << 30) | 1, 0)
    assert not future.parseable
    with pytest.raises(pp.ProtocolError):
        pp.decode_update(pp.STKT_UPDATE, b"\x00" * 10, future, pp.RxDictCache(), 0)
    assert pp.update_id_of(pp.STKT_UPDATE, b"\x00\x00\x00\x07rest", 3) == 7
    assert pp.update_id_of(pp.STKT_INCUPDATE, b"rest", 3) == 4


def test_switch_round_trip() -> None:
    (m,) = frames(pp.encode_switch(300))
    assert m.type == pp.STKT_SWITCH and pp.decode_switch(m.payload) == 300


def test_every_truncation_of_an_update_is_a_protocol_error() -> None:
    (m,) = frames(CAP_UPDATE_WEB)
    d = pp.decode_define(frames(CAP_DEFINE_WEB)[0].payload)
    for cut in range(len(m.payload)):
        with pytest.raises(pp.ProtocolError):
            pp.decode_update(m.type, m.payload[:cut], d, pp.RxDictCache(), 0)
    with pytest.raises(pp.ProtocolError):
        pp.decode_update(m.type, m.payload + b"\x00", d, pp.RxDictCache(), 0)


def test_every_truncation_of_a_define_is_a_protocol_error_or_shorter() -> None:
    payload = frames(pp.encode_define(COUNTERS))[0].payload
    for cut in range(len(payload)):
        try:
            d = pp.decode_define(payload[:cut])
        except pp.ProtocolError:
            continue
        assert d.expire_ms is None  # only cutting before the expire leaves a valid definition


# --- fuzz: nothing but ProtocolError ---------------------------------------------------------

TABLES = [pp.TableDef(1, "web", pp.KEY_IPV4, 4, 0x80001, 1_800_000), COUNTERS,
          pp.TableDef(2, "i", pp.KEY_SINT, 4, 1, 0), pp.TableDef(3, "b", pp.KEY_BIN, 9, 0, 0)]


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(sorted(pp.UPDATE_TYPES)),
       st.sampled_from(TABLES))
def test_fuzz_update(payload: bytes, typ: int, table: pp.TableDef) -> None:
    with contextlib.suppress(pp.ProtocolError):
        pp.decode_update(typ, payload, table, pp.RxDictCache(), 0)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_define_ack_switch(payload: bytes) -> None:
    for fn in (pp.decode_define, pp.decode_ack, pp.decode_switch):
        with contextlib.suppress(pp.ProtocolError):
            fn(payload)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=80), max_size=6))
def test_fuzz_frames(chunks: list[bytes]) -> None:
    dec = pp.FrameDecoder(max_payload=1000)
    try:
        for chunk in chunks:
            for m in dec.feed(chunk):
                assert len(m.payload) <= 1000
    except pp.ProtocolError:
        return
    assert dec.buffered <= 2 + pp.MAX_VARINT_BYTES + 1000


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=300), min_size=0, max_size=4))
def test_fuzz_hello(lines: list[bytes]) -> None:
    with contextlib.suppress(pp.ProtocolError):
        pp.decode_hello(lines)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=60), st.integers(min_value=0, max_value=59))
def test_fuzz_mutated_capture(noise: bytes, at: int) -> None:
    """Real HAProxy bytes with a stretch overwritten: decoded or refused, never a crash."""
    stream = bytearray(CAP_LIVE_IP + CAP_LIVE_STRING + CAP_ACK)
    at = at % len(stream)
    stream[at:at + len(noise)] = noise
    dec = pp.FrameDecoder()
    cache = pp.RxDictCache()
    table = None
    try:
        for m in dec.feed(bytes(stream)):
            if m.cls != pp.CLASS_STICKTABLE:
                continue
            if m.type == pp.STKT_DEFINE:
                table = pp.decode_define(m.payload)
            elif m.type in pp.UPDATE_TYPES and table is not None and table.parseable:
                pp.decode_update(m.type, m.payload, table, cache, 0)
            elif m.type == pp.STKT_ACK:
                pp.decode_ack(m.payload)
    except pp.ProtocolError:
        pass
