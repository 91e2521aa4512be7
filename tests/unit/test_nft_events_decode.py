"""nf_tables event decoding without a kernel: a captured datagram, the transaction assembler,
truncation, and fuzzing (no input raises). Against the real kernel:
tests/kernel/test_nft_events.py."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nftsync.datatypes import DatatypeError, join_concat, split_concat
from nftsync.netlink.nftables import (
    DecodeStats,
    GenEvent,
    Overrun,
    SetElemEvent,
    TransactionAssembler,
    decode_datagram,
    decode_message,
)


def test_datatype_errors_are_one_line() -> None:
    with pytest.raises(DatatypeError, match="does not match"):
        split_concat(b"\x0a\0\0\x01\0\x50", ["ipv4_addr"])
    with pytest.raises(DatatypeError, match="too short"):
        split_concat(b"\x0a\0\0", ["ipv4_addr"])
    with pytest.raises(DatatypeError, match="unsupported"):
        split_concat(b"abcd", ["ct_state"])
    with pytest.raises(DatatypeError, match="not a valid inet_service"):
        join_concat(("10.0.0.1", 70000), ["ipv4_addr", "inet_service"])
    with pytest.raises(DatatypeError, match="not a valid ipv4_addr"):
        join_concat(("10.0.0.300",), ["ipv4_addr"])


def test_assembler_chunks_and_overrun() -> None:
    el = SetElemEvent("add", "ip", "t", "m", [], 5)
    asm = TransactionAssembler(max_pending=2)
    out = asm.feed([el, el, el, GenEvent(3, 42, "nft", 5)])
    assert [(t.complete, len(t.events), t.pid) for t in out] == [(False, 2, None), (True, 1, 42)]
    out = asm.feed([el, Overrun(1), el, GenEvent(4, 43, "nft", 5)])
    assert isinstance(out[0], Overrun) and len(out[1].events) == 1 and out[1].genid == 4


# --- decoding untrusted bytes ---------------------------------------------------------------------
# A real NEWSETELEM (concatenated key, timeout, expiration, comment) to mutate.
SAMPLE = bytes.fromhex(
    "020000040600010074000000060002006d00000044000300400001000c000100080001000a0000010c000200"
    "08000100000200000c000400000000000000ea600c0005000000000000007530090006000003686900000000"
)


def test_sample_decodes() -> None:
    ev = decode_message(0x0A0C, 0x400, 77, memoryview(SAMPLE))
    assert isinstance(ev, SetElemEvent) and ev.portid == 77
    (el,) = ev.elements
    assert (el.timeout_ms, el.expiration_ms, el.comment) == (60_000, 30_000, "hi")


def test_truncated_messages_are_counted() -> None:
    stats = DecodeStats()
    for cut in range(len(SAMPLE)):
        decode_message(0x0A0C, 0, 1, SAMPLE[:cut], stats)
    assert stats.malformed > 0
    assert stats.malformed + stats.events == len(SAMPLE)


MSG_TYPES = st.one_of(st.integers(0, 0xFFFF), st.sampled_from([0x0A00 + m for m in range(34)]))


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(MSG_TYPES, st.binary(max_size=512))
def test_random_bytes_never_raise(msg_type: int, payload: bytes) -> None:
    stats = DecodeStats()
    decode_message(msg_type, 0, 0, payload, stats)
    assert stats.events + stats.malformed + stats.unknown + stats.ignored == 1


@settings(max_examples=1500, deadline=None)
@given(st.sampled_from([0x0A0C, 0x0A0E, 0x0A09, 0x0A0F]),
       st.lists(st.tuples(st.integers(0, len(SAMPLE) - 1), st.integers(0, 255)), max_size=8))
def test_mutated_messages_never_raise(msg_type: int, flips: list[tuple[int, int]]) -> None:
    buf = bytearray(SAMPLE)
    for pos, val in flips:
        buf[pos] = val
    decode_message(msg_type, 0, 0, bytes(buf))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=2048))
def test_random_datagrams_never_raise(data: bytes) -> None:
    out: list = []
    decode_datagram(data, DecodeStats(), out)


def _nlmsg(msg_type: int, payload: bytes) -> bytes:
    msg = struct.pack("=IHHII", 16 + len(payload), msg_type, 0, 0, 1) + payload
    return msg + b"\0" * (-len(msg) % 4)


@settings(max_examples=800, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0x0A0C, 0x0A0E, 0x0A1E, 0x0A09, 0x0A00, 0x0A0F, 2]),
                          st.one_of(st.binary(max_size=300),
                                    st.builds(lambda cut: SAMPLE[:cut],
                                              st.integers(0, len(SAMPLE))))),
                max_size=6))
def test_well_framed_datagrams_never_raise(msgs: list[tuple[int, bytes]]) -> None:
    """Valid netlink framing around random payloads reaches the set-element fast path."""
    stats = DecodeStats()
    out: list = []
    decode_datagram(b"".join(_nlmsg(t, p) for t, p in msgs), stats, out)
    assert len(out) == stats.events
