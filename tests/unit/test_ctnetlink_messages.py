"""ctnetlink messages without a kernel: the decoder on captured and crafted datagrams, the
message builders and walkers, and fuzzing (hostile bytes never escape as anything but the
documented errors). The same codec against the real kernel: tests/kernel/test_ctnetlink.py."""

from __future__ import annotations

import contextlib
import struct

import pytest
from builders import make_entries
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nftsync.conntrack import (
    IPPROTO_UDP,
    CtEntry,
)
from nftsync.netlink.core import NetlinkError, nfgenmsg, nlmsg
from nftsync.netlink.ctnetlink import (
    CT_DELETE,
    CT_NEW,
    NLM_F_CREATE,
    NLM_F_EXCL,
    CtEvent,
    CtStats,
    build_create,
    parse_messages,
)
from nftsync.proto.conntrack import CT_ENTRY_SIZE, CtFormatError, decode_ct, encode_ct


# --- pure codec ----------------------------------------------------------------------------------
def test_wire_round_trip() -> None:
    for e in make_entries(20) + make_entries(20, v6=True):
        e.ct_id = 1234
        raw = encode_ct(e)
        assert len(raw) == CT_ENTRY_SIZE
        back = decode_ct(raw)
        assert back == e and back.ct_id is None
    udp = CtEntry.make("10.0.0.1", 5, "10.0.0.2", 53, "10.0.0.3", 53, l4proto=IPPROTO_UDP)
    assert decode_ct(encode_ct(udp)) == udp and udp.tcp_state is None


def test_wire_rejects_bad_input() -> None:
    raw = bytearray(encode_ct(make_entries(1)[0]))
    with pytest.raises(CtFormatError):
        decode_ct(raw[:-1])
    with pytest.raises(CtFormatError):
        decode_ct(raw + b"\0")
    for pos, val in ((0, 2), (1, 7), (2, 99), (3, 42), (24, 1)):
        bad = bytearray(raw)
        bad[pos] = val
        with pytest.raises(CtFormatError):
            decode_ct(bad)
    assert issubclass(CtFormatError, ValueError)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=CT_ENTRY_SIZE + 8))
def test_decode_ct_fuzz(data: bytes) -> None:
    with contextlib.suppress(CtFormatError):
        decode_ct(data)


def _seed_messages() -> list[bytes]:
    out = []
    for e in make_entries(2) + make_entries(2, v6=True):
        out.append(nlmsg(CT_NEW, NLM_F_CREATE | NLM_F_EXCL, 0, nfgenmsg(e.family) +
                         build_create(e)))
        out.append(nlmsg(CT_DELETE, 0, 0, nfgenmsg(e.family) + build_create(e)))
    return out


def test_decoder_reads_seed_messages() -> None:
    out: list = []
    stats = CtStats()
    buf = b"".join(_seed_messages())
    parse_messages(buf, len(buf), stats, out)
    assert stats.malformed == 0 and len(out) == 8
    assert [ev for ev, _ in out[:2]] == [CtEvent.NEW, CtEvent.DESTROY]


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 7), st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)),
                                   max_size=8), st.integers(0, 400), st.binary(max_size=64))
def test_decoder_fuzz(which: int, flips: list, cut: int, junk: bytes) -> None:
    msg = bytearray(_seed_messages()[which])
    for pos, val in flips:
        if pos < len(msg):
            msg[pos] = val
    data = bytes(msg[: max(cut, 0)] if cut < len(msg) else msg) + junk
    stats = CtStats()
    out: list = []
    # A well-formed NLMSG_ERROR with an errno raises NetlinkError: the documented error.
    with contextlib.suppress(NetlinkError):
        parse_messages(data, len(data), stats, out)
    for item in out:
        _ev, ct = item
        assert isinstance(ct, CtEntry)


def test_random_bytes_into_decoder() -> None:
    import random

    rng = random.Random(7)
    for _ in range(3000):
        n = rng.randrange(0, 300)
        data = bytes(rng.randrange(256) for _ in range(n))
        # Give it a plausible header often, so the attribute walkers get exercised.
        if n >= 20 and rng.random() < 0.7:
            data = struct.pack("=IHHII", n, CT_NEW, 0, 0, 0) + data[16:]
        with contextlib.suppress(NetlinkError):
            parse_messages(data, len(data), CtStats(), [])


# --- generic netlink helpers (nftsync.netlink.core), which the nf_tables decoder reuses ---------
def test_core_walkers_and_builders() -> None:
    from nftsync.netlink.core import iter_attrs, iter_messages, nla, nla_be32, nla_nested

    body = nla_nested(1, nla(2, b"abc"), nla_be32(3, 7)) + nla(4, b"")
    msgs = nlmsg(CT_NEW, 0, 5, nfgenmsg(2) + body) + nlmsg(CT_NEW, 0, 6, b"x")
    got = list(iter_messages(msgs))
    assert [(t, s) for t, _f, s, _p, _pl in got] == [(CT_NEW, 5), (CT_NEW, 6)]
    attrs = list(iter_attrs(got[0][4][4:]))
    assert [(t, nested) for t, nested, _ in attrs] == [(1, True), (4, False)]
    inner = list(iter_attrs(attrs[0][2]))
    assert [(t, bytes(p)) for t, _n, p in inner] == [(2, b"abc"), (3, b"\0\0\0\x07")]
    errors: list[str] = []
    assert list(iter_messages(msgs[:-5], errors.append))[1:] == [] and errors


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_core_walkers_never_raise(data: bytes) -> None:
    from nftsync.netlink.core import iter_attrs, iter_messages

    for _t, _f, _s, _p, payload in iter_messages(data, lambda reason: None):
        assert len(payload) <= len(data)
        for _a, _n, p in iter_attrs(payload, lambda reason: None):
            assert len(p) <= len(payload)
