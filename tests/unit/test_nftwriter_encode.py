"""SetElemWriter's nf_tables messages, byte for byte, without a kernel (what the kernel makes of
them: tests/kernel/test_nftwriter.py)."""

from __future__ import annotations

import ipaddress
import struct

from nftsync.netlink.nftwriter import encode_add, encode_adds, key_length


def mark(v: int) -> bytes:
    return struct.pack("=I", v)


def v4(a: str) -> bytes:
    return ipaddress.IPv4Address(a).packed


def test_key_length() -> None:
    assert key_length(["ipv4_addr"]) == 4
    assert key_length(["inet_service"]) == 2
    assert key_length(["ipv4_addr", "inet_service"]) == 8
    assert key_length(["ipv6_addr", "inet_proto", "inet_service"]) == 24
    assert key_length(["ifname"]) is None


def test_encode_add_layout() -> None:
    raw = encode_add(v4("1.2.3.4"), mark(7), None, 1000)
    # LIST_ELEM(nested) { KEY(nested) { VALUE 4 bytes }, DATA(nested) { VALUE }, EXPIRATION }
    assert struct.unpack_from("=HH", raw, 0) == (len(raw), 0x8001)
    assert raw[-8:] == (1000).to_bytes(8, "big")


def test_encode_adds_matches_encode_add() -> None:
    """The shape-cached encoder must produce the same bytes as the plain one for every shape
    (key lengths with and without padding, data or none, timeout and/or expiration)."""
    cases = [(bytes(range(kl)), d, t, x)
             for kl in (1, 2, 4, 6, 8, 16, 24) for d in (None, mark(0x200), b"\1\2\3\4\5\6")
             for t in (None, 5000) for x in (None, 7000)]
    assert encode_adds(cases) == [encode_add(*c) for c in cases]
