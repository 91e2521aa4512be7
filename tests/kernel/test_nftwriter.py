"""SetElemWriter against the real kernel: what it writes is what `nft -j list map` shows."""

from __future__ import annotations

import ipaddress
import json
import struct

import netns
import pytest

from nftsync.daemon.echo import attach_echo_filter
from nftsync.netlink.core import NetlinkError
from nftsync.netlink.nftables import NftEventSocket, SetElemEvent
from nftsync.netlink.nftwriter import SetElemWriter

RULESET = """table ip t {
    map m { type ipv4_addr : mark; flags timeout; timeout 120s; }
    map s { type ipv4_addr : mark; }
    map c { type ipv4_addr . inet_service : mark; flags timeout; timeout 1h; }
}
table ip6 t6 {
    map m { type ipv6_addr : mark; flags timeout; timeout 120s; }
}
"""


def mark(v: int) -> bytes:
    return struct.pack("=I", v)


def v4(a: str) -> bytes:
    return ipaddress.IPv4Address(a).packed


def listed(ns: str, family: str, table: str, name: str) -> dict:
    """key text -> (mark, timeout s or None, expires s or None), from `nft -j list map`."""
    out = json.loads(netns.run(ns, "nft", "-j", "list", "map", family, table, name).stdout)
    elems = next(o["map"] for o in out["nftables"] if "map" in o).get("elem", [])
    res = {}
    for key, value in elems:
        timeout = expires = None
        if isinstance(key, dict) and "elem" in key:
            timeout, expires = key["elem"].get("timeout"), key["elem"].get("expires")
            key = key["elem"]["val"]
        if isinstance(key, dict) and "concat" in key:
            key = " . ".join(str(k) for k in key["concat"])
        res[str(key)] = (value, timeout, expires)
    return res


@pytest.fixture
def nsw(ns):
    netns.run(ns, "nft", "-f", "-", input=RULESET)
    with netns.entered(ns):
        w = SetElemWriter()
    try:
        yield ns, w
    finally:
        w.close()


def test_add_with_expires_and_timeout(nsw) -> None:
    ns, w = nsw
    w.apply("ip", "t", "m", [], [(v4("10.0.0.1"), mark(0x200), None, 60_000),
                                 (v4("10.0.0.2"), mark(0x201), 300_000, 250_000)])
    got = listed(ns, "ip", "t", "m")
    assert set(got) == {"10.0.0.1", "10.0.0.2"}
    value, timeout, expires = got["10.0.0.1"]
    assert value == 0x200 and timeout is None and abs(expires - 60) <= 1
    value, timeout, expires = got["10.0.0.2"]
    assert value == 0x201 and timeout == 300 and abs(expires - 250) <= 1


def test_static_map_delete_and_replace(nsw) -> None:
    ns, w = nsw
    keys = [v4(f"10.1.{i >> 8}.{i & 255}") for i in range(3000)]  # several messages per batch
    w.apply("ip", "t", "s", [], [(k, mark(0x300), None, None) for k in keys])
    got = listed(ns, "ip", "t", "s")
    assert len(got) == 3000 and got["10.1.0.0"] == (0x300, None, None)
    # delete some, replace others by delete + add with another value, in one transaction
    w.apply("ip", "t", "s", keys[:10] + keys[10:20],
            [(k, mark(0x301), None, None) for k in keys[10:20]])
    got = listed(ns, "ip", "t", "s")
    assert len(got) == 2990
    assert "10.1.0.0" not in got and "10.1.0.9" not in got
    assert got["10.1.0.10"] == (0x301, None, None) and got["10.1.0.20"] == (0x300, None, None)


def test_concat_and_ipv6_keys(nsw) -> None:
    ns, w = nsw
    key = v4("10.0.0.7") + (443).to_bytes(2, "big") + b"\0\0"
    w.apply("ip", "t", "c", [], [(key, mark(0x202), None, 30_000)])
    value, _timeout, expires = listed(ns, "ip", "t", "c")["10.0.0.7 . 443"]
    assert value == 0x202 and abs(expires - 30) <= 1
    a6 = ipaddress.IPv6Address("2001:db8::5")
    w.apply("ip6", "t6", "m", [], [(a6.packed, mark(0x203), None, 90_000)])
    value, _timeout, expires = listed(ns, "ip6", "t6", "m")["2001:db8::5"]
    assert value == 0x203 and abs(expires - 90) <= 1
    w.apply("ip6", "t6", "m", [a6.packed], [])
    assert listed(ns, "ip6", "t6", "m") == {}


def test_failing_batch_changes_nothing(nsw) -> None:
    ns, w = nsw
    w.apply("ip", "t", "s", [], [(v4("10.0.0.1"), mark(0x200), None, None)])
    # the same key with another value is refused; the whole transaction is aborted
    with pytest.raises(NetlinkError) as info:
        w.apply("ip", "t", "s", [],
                [(v4("10.0.0.2"), mark(0x201), None, None),
                 (v4("10.0.0.1"), mark(0x999), None, None)])
    assert info.value.errno in (17, 16)  # EEXIST (EBUSY on some kernels)
    assert listed(ns, "ip", "t", "s") == {"10.0.0.1": (0x200, None, None)}
    # deleting an absent key: ENOENT, and the add in the same transaction did not happen
    with pytest.raises(NetlinkError) as info:
        w.apply("ip", "t", "s", [v4("10.9.9.9")], [(v4("10.0.0.3"), mark(1), None, None)])
    assert info.value.errno == 2
    assert listed(ns, "ip", "t", "s") == {"10.0.0.1": (0x200, None, None)}
    # the socket is still usable after a failure
    w.apply("ip", "t", "s", [v4("10.0.0.1")], [(v4("10.0.0.1"), mark(0x204), None, None)])
    assert listed(ns, "ip", "t", "s") == {"10.0.0.1": (0x204, None, None)}


def test_unknown_map_fails(nsw) -> None:
    _ns, w = nsw
    with pytest.raises(NetlinkError) as info:
        w.apply("ip", "t", "nosuch", [], [(v4("10.0.0.1"), mark(1), None, None)])
    assert info.value.errno == 2


def test_events_carry_our_portid_and_are_filtered(nsw) -> None:
    """The daemon drops its own writes' echo by port id in the kernel (BPF): our socket's
    events must carry its port id, and a filter listing it (among others) must drop them
    while letting other writers' events through."""
    ns, w = nsw
    with netns.entered(ns):
        plain, filtered = NftEventSocket(), NftEventSocket()
    try:
        keep = attach_echo_filter(filtered.fileno(), {w.portid, 123456})
        w.apply("ip", "t", "s", [], [(v4("10.0.0.1"), mark(0x200), None, None)])
        netns.run(ns, "nft", "add", "element", "ip", "t", "s", "{ 10.0.0.2 : 0x201 }")
        mine = [e for e in plain.read() if isinstance(e, SetElemEvent)]
        assert [e.portid for e in mine][:1] == [w.portid] and len(mine) == 2
        seen = [e for e in filtered.read() if isinstance(e, SetElemEvent)]
        assert len(seen) == 1 and seen[0].portid != w.portid
        assert bytes(seen[0].elements[0].key) == v4("10.0.0.2")
        del keep
    finally:
        plain.close()
        filtered.close()


def test_add_same_value_refreshes_expiry(nsw) -> None:
    """Like nft's `add element` (NLM_F_CREATE without NLM_F_EXCL): re-adding a key with the
    same value is no error, and on kernels >= 6.12 its explicit expiration refreshes it."""
    from nftsync.tables.nftmap import kernel_refreshes_expiry

    ns, w = nsw
    w.apply("ip", "t", "m", [], [(v4("10.0.0.1"), mark(0x200), None, 10_000)])
    w.apply("ip", "t", "m", [], [(v4("10.0.0.1"), mark(0x200), None, 100_000)])
    value, _timeout, expires = listed(ns, "ip", "t", "m")["10.0.0.1"]
    assert value == 0x200
    if kernel_refreshes_expiry():
        assert abs(expires - 100) <= 1


def test_sink_netlink_path_and_fallback(nsw) -> None:
    """NftSink writes through its SetElemWriter; when the mirror is wrong about the kernel (a
    key it thinks absent exists with another value) the batch fails as a whole and is retried
    element by element, so every change lands."""
    from nftsync.daemon.farms import ReplicatedMap
    from nftsync.daemon.nftsink import NftSink
    from nftsync.model import MapRef, Role, SessionMap
    from nftsync.replication import ElementOp

    ns, _w = nsw
    smap = SessionMap(MapRef("ip", "t", "m"), Role.SESSIONS, "f", ("ipv4_addr",), "mark",
                      timeout=120)
    rmap = ReplicatedMap(smap, None)
    with netns.entered(ns):
        sink = NftSink()
    try:
        assert sink.elem_writer is not None and sink.portid == sink.elem_writer.portid
        assert sink.echo_filter_valid()
        sink.apply(rmap, [ElementOp(v4(f"10.0.0.{i}"), 0x200, 60_000, None) for i in range(1, 6)])
        tx = sink.elem_writer.transactions
        assert tx == 1 and sink.stats.applied == 5
        netns.run(ns, "nft", "add", "element", "ip", "t", "m", "{ 10.0.0.9 : 0x300 }")
        sink.apply(rmap, [ElementOp(v4("10.0.0.1"), 0x201, 200_000, 0x200),  # replace
                          ElementOp(v4("10.0.0.2"), None, 0, 0x200),  # delete
                          ElementOp(v4("10.0.0.9"), 0x201, 30_000, None)])  # mirror is wrong
        assert sink.stats.retries == 1 and sink.stats.failed == 0
        got = listed(ns, "ip", "t", "m")
        assert set(got) == {"10.0.0.1", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.9"}
        value, timeout, expires = got["10.0.0.1"]
        assert value == 0x201 and timeout == 200 and abs(expires - 200) <= 1
        value, _timeout, expires = got["10.0.0.9"]
        assert value == 0x201 and abs(expires - 30) <= 1
    finally:
        sink.close()
