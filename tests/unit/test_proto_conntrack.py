"""The replicated conntrack entry's layout, pinned byte for byte (no root, no kernel).

Peers of the previous version must keep reading what we send, so these golden strings were
taken from the layout as it was before it moved to nftsync.proto.conntrack and must never
change; a new layout needs a new entry version (docs/protocol.md, "ConntrackRecord (type 2)").
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from nftsync.conntrack import (
    AF_INET,
    AF_INET6,
    IPPROTO_UDP,
    IPS_ASSURED,
    IPS_DST_NAT,
    IPS_SEEN_REPLY,
    MAX_TIMEOUT,
    CtEntry,
)
from nftsync.proto.conntrack import (
    CT_ENTRY_FIELDS,
    CT_ENTRY_SIZE,
    CtFormatError,
    ct_body,
    ct_entry,
    ct_key,
    ct_record_key,
    ct_state_bytes,
    ct_with_timeout,
    decode_ct,
    encode_ct,
)

V4_TCP = CtEntry.make("10.10.1.7", 40000, "10.0.0.100", 80, "10.20.0.11", 8080, mark=0x201,
                      timeout=431, zone=7, status=IPS_ASSURED | IPS_SEEN_REPLY | IPS_DST_NAT)
V4_TCP_WIRE = bytes.fromhex(
    "01020603" "00000026" "00000201" "000001af" "0007" "0000"
    "0a0a0107" "000000000000000000000000"
    "0a000064" "000000000000000000000000" "9c40" "0050"
    "0a14000b" "000000000000000000000000"
    "0a0a0107" "000000000000000000000000" "1f90" "9c40"
)
V6_UDP = CtEntry.make("2001:db8::7", 5353, "2001:db8::100", 53, "2001:db8:1::11", 53,
                      l4proto=IPPROTO_UDP, mark=0x200, timeout=29)
V6_UDP_WIRE = bytes.fromhex(
    "010a11ff" "00000006" "00000200" "0000001d" "0000" "0000"
    "20010db8000000000000000000000007"
    "20010db8000000000000000000000100" "14e9" "0035"
    "20010db8000100000000000000000011"
    "20010db8000000000000000000000007" "0035" "14e9"
)
GOLDEN = [(V4_TCP, V4_TCP_WIRE), (V6_UDP, V6_UDP_WIRE)]


def old_record_key(entry: bytes) -> bytes:
    """The key nftsync/daemon/peer.py `record_key` sliced by hand before the layout had names."""
    return entry[1:3] + entry[16:18] + entry[20:56]


@pytest.mark.parametrize(("entry", "wire"), GOLDEN, ids=["ipv4-tcp", "ipv6-udp"])
def test_golden_bytes(entry: CtEntry, wire: bytes) -> None:
    assert len(wire) == CT_ENTRY_SIZE == 92
    assert encode_ct(entry) == wire
    assert decode_ct(wire) == entry
    assert decode_ct(memoryview(wire)) == entry
    entry_with_id = CtEntry.make("10.10.1.7", 40000, "10.0.0.100", 80, "10.20.0.11", 8080)
    entry_with_id.ct_id = 99  # host-local: never on the wire
    assert encode_ct(entry_with_id) == encode_ct(decode_ct(encode_ct(entry_with_id)))


@pytest.mark.parametrize(("entry", "wire"), GOLDEN, ids=["ipv4-tcp", "ipv6-udp"])
def test_record_key_is_the_old_key(entry: CtEntry, wire: bytes) -> None:
    assert ct_record_key(wire) == old_record_key(wire)
    moved = decode_ct(wire)
    moved.reply_sport, moved.mark, moved.timeout, moved.tcp_state = 1, 2, 3, None
    assert ct_record_key(encode_ct(moved)) == ct_record_key(wire)  # the value does not count
    moved.zone = 8
    assert ct_record_key(encode_ct(moved)) != ct_record_key(wire)  # the identity does


def random_entries(n: int) -> list[CtEntry]:
    rng = random.Random(11)
    out = []
    for i in range(n):
        size = 4 if i % 2 else 16
        addr = [rng.randbytes(size) for _ in range(4)]
        proto = rng.choice((6, 17))
        out.append(CtEntry(AF_INET if size == 4 else AF_INET6, proto, *addr[:2],
                           rng.randrange(65536), rng.randrange(65536), *addr[2:],
                           rng.randrange(65536), rng.randrange(65536), rng.randrange(2**32),
                           rng.randrange(2**32), rng.randrange(MAX_TIMEOUT),
                           rng.choice((None, 3)) if proto == 6 else None,
                           zone=rng.randrange(65536)))
    return out


@pytest.mark.parametrize("entry", [*random_entries(400), V4_TCP, V6_UDP])
def test_the_replica_form_gives_the_entry_back(entry: CtEntry) -> None:
    """The replica keeps an entry as its key and `ct_body` (structs written apart from the
    layout): both must give back exactly the wire bytes, and the key is `ct_key` too."""
    wire = encode_ct(entry)
    key = ct_record_key(wire)
    assert ct_key(entry) == key
    body = ct_body(wire)
    assert len(body) == (28 if entry.family == AF_INET else 52)
    assert ct_entry(key, body) == wire
    assert decode_ct(ct_with_timeout(wire, 5)).timeout == 5
    assert ct_state_bytes(ct_with_timeout(wire, 5)) == ct_state_bytes(wire)


def test_record_key_of_hostile_bytes_as_before() -> None:
    """The send path keys what it queues without decoding: short bytes give short keys."""
    for n in (0, 1, 2, 3, 17, 18, 19, 20, 55, 56, 91, 92, 128):
        data = bytes(range(n))
        assert ct_record_key(data) == old_record_key(data)


def test_field_offsets() -> None:
    spans = {name: (s.start, s.stop - s.start) for name, s in CT_ENTRY_FIELDS.items()}
    assert spans == {
        "version": (0, 1), "family": (1, 1), "l4proto": (2, 1), "tcp_state": (3, 1),
        "status": (4, 4), "mark": (8, 4), "timeout": (12, 4), "zone": (16, 2),
        "reserved": (18, 2), "orig_src": (20, 16), "orig_dst": (36, 16), "orig_sport": (52, 2),
        "orig_dport": (54, 2), "reply_src": (56, 16), "reply_dst": (72, 16),
        "reply_sport": (88, 2), "reply_dport": (90, 2),
    }


def test_docs_table_matches_layout() -> None:
    """docs/protocol.md documents the same offsets and sizes as the code declares."""
    doc = (Path(__file__).parents[2] / "docs" / "protocol.md").read_text()
    section = doc.split("### ConntrackRecord (type 2)", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d+) +\| (\d+) +\| (\w+) +\|", section, re.MULTILINE)
    documented = {name: (int(off), int(size)) for off, size, name in rows
                  if name in CT_ENTRY_FIELDS}
    assert documented == {name: (s.start, s.stop - s.start)
                          for name, s in CT_ENTRY_FIELDS.items()}


def test_hostile_bytes_raise_ct_format_error() -> None:
    for bad in (b"", V4_TCP_WIRE[:-1], V4_TCP_WIRE + b"\0"):
        with pytest.raises(CtFormatError):
            decode_ct(bad)
    for pos, val in ((0, 2), (1, 7), (2, 99), (3, 42), (24, 1), (12, 0x7F)):
        bad = bytearray(V4_TCP_WIRE)
        bad[pos] = val
        with pytest.raises(CtFormatError):
            decode_ct(bad)
    udp_with_state = bytearray(V6_UDP_WIRE)
    udp_with_state[3] = 3
    with pytest.raises(CtFormatError):
        decode_ct(udp_with_state)
