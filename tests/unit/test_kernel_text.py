"""The one key codec, the one element-text builder and the kernel target interface, without a
kernel: every path that turns a session key into bytes or nft text must agree."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from nftsync.conntrack import CtEntry
from nftsync.daemon.farms import KeyRecipe, ReplicatedMap
from nftsync.daemon.nftsink import NftMapTarget, NftSink
from nftsync.daemon.target import KernelTarget, SinkStats
from nftsync.datatypes import (
    ADDRESS_LENGTHS,
    NFPROTO_NAMES,
    NFPROTO_NUMBERS,
    DatatypeError,
    format_value,
    join_concat,
    key_length,
    split_concat,
)
from nftsync.errors import SessionError
from nftsync.model import MapRef, Role, Session, SessionMap, parse_key
from nftsync.replication import ElementOp
from nftsync.tables.nftmap import element_commands, element_text, session_text


def test_families_once() -> None:
    assert NFPROTO_NUMBERS["ip"] == 2 and NFPROTO_NUMBERS["ip6"] == 10
    assert NFPROTO_NUMBERS["inet"] == 1 and NFPROTO_NAMES[1] == "inet"
    assert ADDRESS_LENGTHS == {socket.AF_INET: 4, socket.AF_INET6: 16}


@pytest.mark.parametrize(("types", "text", "raw"), [
    (["ipv4_addr"], ("10.0.0.1",), bytes([10, 0, 0, 1])),
    (["inet_service"], ("80",), b"\x00\x50"),
    (["ipv4_addr", "inet_service"], ("10.0.0.1", "80"), bytes([10, 0, 0, 1, 0, 0x50, 0, 0])),
    (["ipv6_addr", "inet_proto", "inet_service"], ("2001:db8::1", "tcp", "443"),
     ipaddress.IPv6Address("2001:db8::1").packed + b"\x06\0\0\0" + b"\x01\xbb\0\0"),
    (["ether_addr"], ("02:00:00:00:00:01",), bytes([2, 0, 0, 0, 0, 1])),
])
def test_codec_round_trip(types: list[str], text: tuple, raw: bytes) -> None:
    assert join_concat(text, types) == raw
    assert len(raw) == key_length(types)
    assert join_concat(split_concat(raw, types), types) == raw
    assert join_concat(format_value(raw, types).split(" . "), types) == raw


def test_mark_is_host_order() -> None:
    raw = join_concat((0x200,), ["mark"])
    assert int.from_bytes(raw, "little" if socket.htons(1) != 1 else "big") == 0x200
    assert format_value(raw, ["mark"]) == "0x00000200"


def test_codec_refuses_in_one_line() -> None:
    with pytest.raises(DatatypeError, match="not a valid inet_service"):
        join_concat(("10.0.0.1", 70000), ["ipv4_addr", "inet_service"])
    with pytest.raises(DatatypeError, match="not a valid mark"):
        join_concat((1 << 32,), ["mark"])
    with pytest.raises(DatatypeError, match="unsupported"):
        split_concat(b"abcd", ["ct_state"])


def test_parse_key_normalises_as_nft_lists() -> None:
    kt = ("ipv4_addr", "inet_proto", "inet_service", "mark", "ether_addr")
    assert parse_key("10.0.0.1 . tcp . 0x50 . 0x200 . 02:AA:00:00:00:01", kt) == \
        ("10.0.0.1", "6", "80", "512", "02:aa:00:00:00:01")
    assert parse_key("10.0.0.1,80", ("ipv4_addr", "inet_service")) == ("10.0.0.1", "80")
    with pytest.raises(SessionError, match="'70000' is not a valid inet_service"):
        parse_key("10.0.0.1,70000", ("ipv4_addr", "inet_service"))
    with pytest.raises(SessionError, match="not supported by nftsync"):
        parse_key("x", ("ifname",))
    # What the user typed is what the kernel gets (the daemon's key bytes).
    key = parse_key("10.0.0.1 . 80", ("ipv4_addr", "inet_service"))
    assert join_concat(key, ["ipv4_addr", "inet_service"]) == bytes([10, 0, 0, 1, 0, 80, 0, 0])


def test_element_text() -> None:
    assert element_text("10.0.0.1", "0x200") == "10.0.0.1 : 0x200"
    # an expiry within the map's timeout inherits it; a longer one gets its own timeout
    assert element_text("k", "0x1", map_timeout_ms=120_000, expires_ms=59_234) == \
        "k expires 59234ms : 0x1"
    assert element_text("k", "0x1", map_timeout_ms=120_000, expires_ms=200_000) == \
        "k timeout 200s expires 200s : 0x1"
    assert element_text("0x200", "0x201", comment='dr"ain') == \
        "0x200 comment \"dr'ain\" : 0x201"
    s = Session(("10.0.0.1", "80"), 0x201, expires=0, timeout=30)
    assert session_text(s, 120) == "10.0.0.1 . 80 timeout 30s expires 1s : 0x201"
    assert element_commands("ip t m", delete=["a"], add=["b : 0x1", "c : 0x1"], chunk=1) == [
        "delete element ip t m { a }", "add element ip t m { b : 0x1 }",
        "add element ip t m { c : 0x1 }"]


def _recipe_keys(spec: str, key_type: tuple[str, ...], ct: CtEntry) -> tuple[bytes, bytes]:
    recipe = KeyRecipe.parse(spec, key_type)
    return recipe._direct_key(ct), recipe._concat_key(ct, key_type)


@pytest.mark.parametrize(("spec", "key_type"), [
    ("saddr", ("ipv4_addr",)),
    ("saddr/24", ("ipv4_addr",)),
    ("saddr,sport", ("ipv4_addr", "inet_service")),
    ("daddr,dport", ("ipv4_addr", "inet_service")),
    ("saddr,l4proto,dport", ("ipv4_addr", "inet_proto", "inet_service")),
])
def test_key_recipe_fast_path_is_the_codec(spec: str, key_type: tuple[str, ...]) -> None:
    ct = CtEntry.make("10.10.1.7", 40000, "10.0.0.100", 80, "10.20.0.11", 8080, mark=0x200)
    recipe = KeyRecipe.parse(spec, key_type)
    assert recipe.direct
    direct, general = _recipe_keys(spec, key_type, ct)
    assert direct == general and len(direct) == key_length(key_type)


def test_replicated_map_key_text() -> None:
    smap = SessionMap(MapRef("ip", "t", "m"), Role.SESSIONS, "web", ("ipv4_addr",), "mark", 60)
    rmap = ReplicatedMap(smap, None)
    assert rmap.addr_len == 4 and rmap.key_text(bytes([10, 0, 0, 1])) == "10.0.0.1"
    assert not rmap.key_valid(b"\x01\x02")


class _FakeSink:
    """What NftMapTarget needs of NftSink, without sockets."""

    def __init__(self) -> None:
        self.stats = SinkStats()
        self.writes: list[tuple[ReplicatedMap, list[ElementOp]]] = []

    def apply(self, rmap: ReplicatedMap, ops: list[ElementOp]) -> None:
        self.writes.append((rmap, ops))

    def problems(self, ref: MapRef | None = None) -> list[str]:
        return [f"map {ref} is full: 1 session(s) waiting"]


def test_nft_map_is_a_kernel_target() -> None:
    smap = SessionMap(MapRef("ip", "t", "m"), Role.SESSIONS, "web", ("ipv4_addr",), "mark", 60)
    rmap = ReplicatedMap(smap, None)
    sink = _FakeSink()
    target: KernelTarget[ElementOp] = NftSink.target(sink, rmap)  # type: ignore[arg-type]
    assert target == NftMapTarget(sink, rmap)  # type: ignore[arg-type]
    op = ElementOp(bytes([10, 0, 0, 1]), 0x200, 5000, None)
    target.apply([op])
    assert sink.writes == [(rmap, [op])]
    assert target.stats is sink.stats
    assert target.problems() == ["map ip t m is full: 1 session(s) waiting"]
