"""The set-element dump's parsing without a kernel (nftsync.netlink.setdump): elements out of
dump datagrams, the end of a dump, its errors and flags, and hostile bytes (nothing raises).
Against the real kernel and libnftables: tests/kernel/test_setdump.py."""

from __future__ import annotations

import errno
import struct
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from nftsync.netlink.core import (
    NFNL_SUBSYS_NFTABLES,
    NLM_F_DUMP_INTR,
    NLM_F_MULTI,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSG_HDR,
    nfgenmsg,
    nfnl_type,
    nla,
    nla_nested,
    nla_str,
    nlmsg,
)
from nftsync.netlink.nftables import (
    NFT_MSG_NEWSETELEM,
    NFTA_DATA_VALUE,
    NFTA_LIST_ELEM,
    NFTA_SET_ELEM_DATA,
    NFTA_SET_ELEM_EXPIRATION,
    NFTA_SET_ELEM_KEY,
    NFTA_SET_ELEM_LIST_ELEMENTS,
    NFTA_SET_ELEM_LIST_SET,
    NFTA_SET_ELEM_LIST_TABLE,
    NFTA_SET_ELEM_TIMEOUT,
)
from nftsync.netlink.setdump import iter_elements, request, scan

SEQ = 7
NEWSETELEM = nfnl_type(NFNL_SUBSYS_NFTABLES, NFT_MSG_NEWSETELEM)


def element(key: bytes, mark: int, timeout_ms: int | None = None,
            expiration_ms: int | None = None) -> bytes:
    parts = [nla_nested(NFTA_SET_ELEM_KEY, nla(NFTA_DATA_VALUE, key)),
             nla_nested(NFTA_SET_ELEM_DATA, nla(NFTA_DATA_VALUE,
                                                mark.to_bytes(4, sys.byteorder)))]
    if timeout_ms is not None:
        parts.append(nla(NFTA_SET_ELEM_TIMEOUT, timeout_ms.to_bytes(8, "big")))
    if expiration_ms is not None:
        parts.append(nla(NFTA_SET_ELEM_EXPIRATION, expiration_ms.to_bytes(8, "big")))
    return nla_nested(NFTA_LIST_ELEM, *parts)


def message(elements: list[bytes], seq: int = SEQ, flags: int = NLM_F_MULTI) -> bytes:
    body = nfgenmsg(2) + nla_str(NFTA_SET_ELEM_LIST_TABLE, "t") + \
        nla_str(NFTA_SET_ELEM_LIST_SET, "m") + nla_nested(NFTA_SET_ELEM_LIST_ELEMENTS, *elements)
    return nlmsg(NEWSETELEM, flags, seq, body)


def done(seq: int = SEQ, code: int = 0, flags: int = NLM_F_MULTI) -> bytes:
    return nlmsg(NLMSG_DONE, flags, seq, struct.pack("=i", code))


def error(err: int, seq: int = SEQ) -> bytes:
    return nlmsg(NLMSG_ERROR, 0, seq, struct.pack("=i", -err) +
                 NLMSG_HDR.pack(16, 0, 0, seq, 0))


ONE = message([element(b"\x0a\0\0\x01", 0x200, None, 30_000),
               element(b"\x0a\0\0\x02", 0x201, 900_000, 800_000),
               element(b"\x0a\0\0\x03", 0x202)])
TWO = message([element(b"\x0a\0\0\x04" + b"\x00\x50\0\0", 0x200, None, 5)])


def test_elements_of_a_datagram_in_order() -> None:
    els = list(iter_elements(ONE + TWO + done()))
    assert [(e.key, int.from_bytes(e.data, sys.byteorder), e.timeout_ms, e.expiration_ms)
            for e in els] == [
        (b"\x0a\0\0\x01", 0x200, None, 30_000), (b"\x0a\0\0\x02", 0x201, 900_000, 800_000),
        (b"\x0a\0\0\x03", 0x202, None, None), (b"\x0a\0\0\x04\x00\x50\0\0", 0x200, None, 5)]


def test_scan_counts_ends_and_flags() -> None:
    assert scan(ONE + TWO, SEQ) == (2, 0, False, 0)
    assert scan(ONE + done(), SEQ) == (1, 0, True, 0)
    flagged = message([element(b"\x0a\0\0\x09", 0x200)], flags=NLM_F_MULTI | NLM_F_DUMP_INTR)
    assert scan(flagged + done(flags=NLM_F_MULTI | NLM_F_DUMP_INTR), SEQ) == (1, 2, True, 0)
    assert scan(message([], seq=SEQ + 1) + done(seq=SEQ + 1), SEQ) == (0, 0, False, 0)


def test_scan_errors() -> None:
    assert scan(error(errno.ENOENT), SEQ) == (0, 0, True, errno.ENOENT)
    assert scan(ONE + done(code=-errno.EINTR), SEQ) == (1, 0, True, errno.EINTR)
    assert scan(nlmsg(NLMSG_ERROR, 0, SEQ, b"\xfe\xff\xff\xff"), SEQ)[2:] == (True,
                                                                              errno.EPROTO)


def test_request_names_the_set() -> None:
    req = request(2, "nftsync_big", "big_sessions", 5)
    length, mtype, flags, seq, _ = NLMSG_HDR.unpack_from(req)
    assert (length, mtype & 0xFF, flags & 0x300, seq) == (len(req), 13, 0x300, 5)
    assert b"nftsync_big\0" in req and b"big_sessions\0" in req


def test_malformed_element_is_reported_and_the_rest_decoded() -> None:
    bad_elem = nla_nested(NFTA_LIST_ELEM, nla(NFTA_SET_ELEM_TIMEOUT, b"\0\0\0"))  # 3 bytes
    broken = message([element(b"\x0a\0\0\x05", 0x200), bad_elem,
                      element(b"\x0a\0\0\x06", 0x201)])
    bad: list[str] = []
    keys = [e.key for e in iter_elements(broken + TWO, bad)]
    assert keys == [b"\x0a\0\0\x05", b"\x0a\0\0\x06", b"\x0a\0\0\x04\x00\x50\0\0"]
    assert len(bad) == 1 and "timeout" in bad[0]
    bad.clear()
    assert [e.key for e in iter_elements(ONE[:-9], bad)] == []  # truncated: the header lies
    assert bad and "nlmsg length" in bad[0]


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_hostile_bytes_never_raise(data: st.DataObject) -> None:
    sample = bytearray(ONE + TWO + done())
    for _ in range(data.draw(st.integers(0, 8))):
        i = data.draw(st.integers(0, len(sample) - 1))
        sample[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(sample)))
    blob = bytes(sample[:cut]) + data.draw(st.binary(max_size=64))
    list(iter_elements(blob, []))
    scan(blob, SEQ)
