"""nf_tables event decoding against the real kernel, in a namespace of its own.

Every test opens an NftEventSocket inside the `ns` namespace, changes the ruleset there with the
nft tool, and checks both the decoded events and what the kernel then holds (`nft -j list`).
"""

from __future__ import annotations

import ipaddress
import json
import select
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator

import netns
import nftables
import pytest

from nftsync.datatypes import datatype_names, format_value, join_concat, split_concat
from nftsync.netlink.nftables import (
    GenEvent,
    NftEventSocket,
    Overrun,
    SetElemEvent,
    SetEvent,
    TableEvent,
    Transaction,
    TransactionAssembler,
)

MARK = struct.Struct("=I")  # nft marks are host byte order

SESSION_MAPS = """
table ip lb {
    map sessions {
        type ipv4_addr : mark
        flags dynamic,timeout
        timeout 120s
        comment "nftsync:sessions farm=web key=saddr"
    }
    map static {
        type ipv4_addr : mark
    }
}
"""


def nft(ns: str, script: str) -> None:
    r = netns.run(ns, "nft", "-f", "-", input=script, check=False)
    assert r.returncode == 0, f"nft failed: {r.stderr}"


def map_elements(ns: str, family: str, table: str, name: str) -> list:
    out = netns.run(ns, "nft", "-j", "list", "map", family, table, name).stdout
    for obj in json.loads(out)["nftables"]:
        if "map" in obj:
            return obj["map"].get("elem", [])
    raise AssertionError(f"map {name} not listed")


def listed_key(pair: list) -> object:
    """The key of a listed map element: `[key, value]` or `[{"elem": {"val": key, ...}}, value]`."""
    key = pair[0]
    return key["elem"]["val"] if isinstance(key, dict) and "elem" in key else key


def collect(sock: NftEventSocket, gens: int = 1, timeout: float = 10.0) -> list:
    """Read events until `gens` transactions have been closed by NEWGEN (or time runs out)."""
    events: list = []
    seen = 0
    deadline = time.monotonic() + timeout
    while seen < gens and time.monotonic() < deadline:
        select.select([sock], [], [], 0.2)
        for ev in sock.read():
            events.append(ev)
            seen += isinstance(ev, GenEvent)
    return events


def elem_events(events: list) -> list[SetElemEvent]:
    return [e for e in events if isinstance(e, SetElemEvent)]


@pytest.fixture
def events(ns: str) -> Iterator[NftEventSocket]:
    with netns.entered(ns):
        sock = NftEventSocket()
    try:
        yield sock
    finally:
        sock.close()


@pytest.fixture
def lb(ns: str, events: NftEventSocket) -> str:
    """`ns` with table ip lb holding a session map and a static map; their events consumed."""
    nft(ns, SESSION_MAPS)
    evs = collect(events)
    sets = {e.name: e for e in evs if isinstance(e, SetEvent)}
    assert sets["sessions"].comment == "nftsync:sessions farm=web key=saddr"
    assert sets["sessions"].timeout_ms == 120_000
    assert datatype_names(sets["sessions"].key_type) == ["ipv4_addr"]
    assert datatype_names(sets["static"].data_type) == ["mark"]
    return ns


def test_add_element_with_timeout_and_expires(lb: str, events: NftEventSocket) -> None:
    nft(lb, 'add element ip lb sessions { 10.0.0.1 timeout 60s expires 30s comment "c1" : 0x200 }')
    evs = elem_events(collect(events))
    assert len(evs) == 1
    ev = evs[0]
    assert (ev.op, ev.family, ev.table, ev.set) == ("add", "ip", "lb", "sessions")
    assert len(ev.elements) == 1
    el = ev.elements[0]
    assert el.key == ipaddress.IPv4Address("10.0.0.1").packed
    assert el.data == MARK.pack(0x200)
    assert el.timeout_ms == 60_000
    assert 29_000 <= el.expiration_ms <= 30_000
    assert el.comment == "c1"
    assert el.verdict is None
    # and the kernel really holds it that way
    (listed,) = map_elements(lb, "ip", "lb", "sessions")
    assert listed[0]["elem"]["val"] == "10.0.0.1"
    assert listed[0]["elem"]["timeout"] == 60
    assert listed[1] == 0x200


def test_static_map_element_has_no_times(lb: str, events: NftEventSocket) -> None:
    nft(lb, "add element ip lb static { 192.0.2.7 : 0x1234 }")
    (ev,) = elem_events(collect(events))
    (el,) = ev.elements
    assert ev.set == "static"
    assert split_concat(el.key, ["ipv4_addr"]) == (ipaddress.IPv4Address("192.0.2.7"),)
    assert split_concat(el.data, ["mark"]) == (0x1234,)
    assert el.timeout_ms is None and el.expiration_ms is None and el.comment is None
    assert map_elements(lb, "ip", "lb", "static") == [["192.0.2.7", 0x1234]]


def test_default_timeout_element_carries_expiration_only(lb: str, events: NftEventSocket) -> None:
    nft(lb, "add element ip lb sessions { 10.0.0.9 : 0x201 }")
    (ev,) = elem_events(collect(events))
    (el,) = ev.elements
    assert el.timeout_ms is None
    assert 119_000 <= el.expiration_ms <= 120_000


def test_delete_element(lb: str, events: NftEventSocket) -> None:
    nft(lb, "add element ip lb sessions { 10.0.0.1 : 0x200, 10.0.0.2 : 0x201 }")
    collect(events)
    nft(lb, "delete element ip lb sessions { 10.0.0.1 }")
    evs = elem_events(collect(events))
    assert [(e.op, e.set) for e in evs] == [("delete", "sessions")]
    (el,) = evs[0].elements
    assert el.key == socket.inet_aton("10.0.0.1")
    assert el.data == MARK.pack(0x200)  # a delete carries the element as it was
    assert [listed_key(e) for e in map_elements(lb, "ip", "lb", "sessions")] == ["10.0.0.2"]


def test_flush_map_is_one_delete_per_element(lb: str, events: NftEventSocket) -> None:
    """The kernel has no "flush" notification: it sends a DELSETELEM for every element."""
    keys = [f"10.0.1.{i}" for i in range(1, 21)]
    nft(lb, "add element ip lb sessions { " + ", ".join(f"{k} : 0x200" for k in keys) + " }")
    collect(events)
    nft(lb, "flush map ip lb sessions")
    evs = collect(events)
    dels = elem_events(evs)
    assert all(e.op == "delete" and e.set == "sessions" for e in dels)
    got = sorted(str(split_concat(el.key, ["ipv4_addr"])[0]) for e in dels for el in e.elements)
    assert got == sorted(keys)
    assert map_elements(lb, "ip", "lb", "sessions") == []
    # flushing an empty map changes nothing: no element event and not even a NEWGEN. A marker
    # transaction after it bounds the wait: only the marker's events may arrive.
    nft(lb, "flush map ip lb sessions")
    nft(lb, "add element ip lb static { 10.7.7.7 : 0x7 }")
    evs = collect(events)
    assert [(e.op, e.set) for e in elem_events(evs)] == [("add", "static")]
    assert sum(isinstance(e, GenEvent) for e in evs) == 1


def test_thousand_elements_in_one_transaction(lb: str, events: NftEventSocket) -> None:
    n = 1000
    keys = [ipaddress.IPv4Address(0x0A000000 + i) for i in range(1, n + 1)]
    body = ",\n".join(f"{k} : {0x200 + i % 7:#x}" for i, k in enumerate(keys))
    nft(lb, f"add element ip lb sessions {{ {body} }}")
    evs = collect(events)
    assert sum(isinstance(e, GenEvent) for e in evs) == 1
    got = {el.key: el.data for e in elem_events(evs) if e.op == "add" for el in e.elements}
    assert len(got) == n
    assert got == {k.packed: MARK.pack(0x200 + i % 7) for i, k in enumerate(keys)}
    assert events.stats.malformed == 0 and events.stats.overruns == 0
    assert len(map_elements(lb, "ip", "lb", "sessions")) == n


def test_newgen_names_the_committing_process(lb: str, events: NftEventSocket) -> None:
    # `ip netns exec` execs nft in the same process, so the Popen pid is nft's pid
    proc = subprocess.Popen(["ip", "netns", "exec", lb, "nft", "add element ip lb static "
                             "{ 10.9.9.9 : 0x9 }"])
    assert proc.wait(timeout=30) == 0
    evs = collect(events)
    (gen,) = [e for e in evs if isinstance(e, GenEvent)]
    assert gen.pid == proc.pid
    assert gen.name == "nft"
    assert gen.genid > 0
    (ev,) = elem_events(evs)
    # nft autobinds its netlink socket: port id == its pid, which identifies the committer
    assert ev.portid == proc.pid
    assert ev.portid != events.portid


def test_refresh_and_readd(lb: str, events: NftEventSocket) -> None:
    """Kernel >= 6.12: re-adding an element with `expires` refreshes it and notifies an add;
    re-adding it identically without `expires` changes nothing and notifies nothing."""
    nft(lb, "add element ip lb sessions { 10.0.0.1 : 0x200 }")
    collect(events)
    nft(lb, "add element ip lb sessions { 10.0.0.1 : 0x200 }")  # no-op
    nft(lb, "add element ip lb sessions { 10.0.0.1 expires 50s : 0x200 }")  # refresh
    evs = collect(events, gens=1)
    (ev,) = elem_events(evs)
    (el,) = ev.elements
    assert ev.op == "add" and el.key == socket.inet_aton("10.0.0.1")
    assert 49_000 <= el.expiration_ms <= 50_000
    (listed,) = map_elements(lb, "ip", "lb", "sessions")
    assert 48 <= listed[0]["elem"]["expires"] <= 50
    # changing the value takes delete + add in one transaction: both are notified, in order
    nft(lb, "delete element ip lb sessions { 10.0.0.1 }\n"
            "add element ip lb sessions { 10.0.0.1 : 0x202 }")
    evs = elem_events(collect(events))
    assert [(e.op, e.elements[0].data) for e in evs] == [
        ("delete", MARK.pack(0x200)), ("add", MARK.pack(0x202))]


def test_libnftables_commit_is_attributed_to_our_thread(ns: str, events: NftEventSocket) -> None:
    """The daemon writes through libnftables in-process: NEWGEN names our thread, and the
    assembler attributes the transaction's element events to it."""
    with netns.entered(ns):
        ctx = nftables.Nftables()
        rc, _, err = ctx.cmd("add table ip u; add map ip u m { type ipv4_addr : mark; }; "
                             "add element ip u m { 1.2.3.4 : 0x1, 1.2.3.5 : 0x2 }")
    assert rc == 0, err
    txs = TransactionAssembler().feed(collect(events))
    (tx,) = txs
    assert isinstance(tx, Transaction) and tx.complete
    assert tx.pid == threading.get_native_id()
    with open("/proc/thread-self/comm") as f:
        assert tx.name == f.read().strip()
    keys = sorted(el.key for e in elem_events(tx.events) for el in e.elements)
    assert keys == [socket.inet_aton("1.2.3.4"), socket.inet_aton("1.2.3.5")]
    assert {e.portid for e in tx.events} == {tx.portid}
    assert [type(e).__name__ for e in tx.events][:2] == ["TableEvent", "SetEvent"]


def test_concatenated_key_map(ns: str, events: NftEventSocket) -> None:
    nft(ns, "table inet t { map c { type ipv4_addr . inet_service : mark; flags timeout; }; }")
    sets = [e for e in collect(events) if isinstance(e, SetEvent)]
    types = datatype_names(sets[0].key_type)
    assert types == ["ipv4_addr", "inet_service"]
    nft(ns, "add element inet t c { 10.0.0.1 . 80 timeout 10s : 0x200 }")
    (ev,) = elem_events(collect(events))
    (el,) = ev.elements
    assert ev.family == "inet"
    assert len(el.key) == 8  # each component padded to 4 bytes
    assert split_concat(el.key, types) == (ipaddress.IPv4Address("10.0.0.1"), 80)
    assert format_value(el.key, types) == "10.0.0.1 . 80"
    assert join_concat(("10.0.0.1", 80), types) == el.key
    assert format_value(el.data, ["mark"]) == "0x00000200"
    (listed,) = map_elements(ns, "inet", "t", "c")
    assert listed[0]["elem"]["val"]["concat"] == ["10.0.0.1", 80]


def test_concat_layouts_match_kernel(ns: str, events: NftEventSocket) -> None:
    """ether_addr pads to 8 in a concatenation, inet_proto to 4, mark is host order; NAT-style
    concatenated data (`ipv4_addr . inet_service`) has the same layout as keys."""
    nft(ns, "table ip t {\n"
            "map a { type ether_addr . ipv4_addr . inet_proto : ipv4_addr . inet_service; }\n"
            "map b { type mark . ipv4_addr : inet_service; }; }")
    types = {e.name: (datatype_names(e.key_type), datatype_names(e.data_type))
             for e in collect(events) if isinstance(e, SetEvent)}
    assert types["a"] == (["ether_addr", "ipv4_addr", "inet_proto"], ["ipv4_addr", "inet_service"])
    nft(ns, "add element ip t a { 02:00:00:00:00:01 . 10.0.0.1 . tcp : 10.0.1.1 . 80 }\n"
            "add element ip t b { 0x10 . 1.1.1.1 : 443 }")
    got = {e.set: e.elements[0] for e in elem_events(collect(events))}
    ka, da = types["a"]
    assert got["a"].key == join_concat(("02:00:00:00:00:01", "10.0.0.1", "tcp"), ka)
    assert len(got["a"].key) == 16
    assert format_value(got["a"].key, ka) == "02:00:00:00:00:01 . 10.0.0.1 . tcp"
    assert got["a"].data == join_concat(("10.0.1.1", 80), da)
    assert format_value(got["a"].data, da) == "10.0.1.1 . 80"
    kb, db = types["b"]
    assert got["b"].key == MARK.pack(0x10) + socket.inet_aton("1.1.1.1")
    assert split_concat(got["b"].key, kb) == (0x10, ipaddress.IPv4Address("1.1.1.1"))
    assert format_value(got["b"].data, db) == "443"


def test_ipv6_and_ether_map(ns: str, events: NftEventSocket) -> None:
    nft(ns, "table ip6 t { map s6 { type ipv6_addr : ether_addr; }; }")
    collect(events)
    nft(ns, "add element ip6 t s6 { 2001:db8::1 : 02:00:00:00:00:01 }")
    (ev,) = elem_events(collect(events))
    (el,) = ev.elements
    assert ev.family == "ip6"
    assert el.key == ipaddress.IPv6Address("2001:db8::1").packed
    assert format_value(el.key, ["ipv6_addr"]) == "2001:db8::1"
    assert format_value(el.data, ["ether_addr"]) == "02:00:00:00:00:01"
    assert map_elements(ns, "ip6", "t", "s6") == [["2001:db8::1", "02:00:00:00:00:01"]]


def test_single_service_key_and_verdict_map(ns: str, events: NftEventSocket) -> None:
    nft(ns, "table inet t { map p { type inet_proto . ipv4_addr . inet_service : verdict; }\n"
            "map s { type inet_service : mark; }; }")
    collect(events)
    nft(ns, "add element inet t p { tcp . 10.1.2.3 . 443 : accept, udp . 10.1.2.3 . 53 : drop }\n"
            "add element inet t s { 8080 : 0x5 }")
    evs = elem_events(collect(events))
    types = ["inet_proto", "ipv4_addr", "inet_service"]
    got = {format_value(el.key, types): el.verdict
           for e in evs if e.set == "p" for el in e.elements}
    assert got == {"tcp . 10.1.2.3 . 443": "accept", "udp . 10.1.2.3 . 53": "drop"}
    (svc,) = [el for e in evs if e.set == "s" for el in e.elements]
    assert svc.key == (8080).to_bytes(2, "big")  # a lone inet_service is not padded
    assert split_concat(svc.key, ["inet_service"]) == (8080,)


def test_catchall_element(ns: str, events: NftEventSocket) -> None:
    nft(ns, "table ip t { map m { type ipv4_addr : mark; }; }")
    collect(events)
    nft(ns, "add element ip t m { * : 0x1 }")
    (ev,) = elem_events(collect(events))
    (el,) = ev.elements
    assert el.catchall and el.key == b"" and el.data == MARK.pack(1)


def test_map_recreated_and_table_deleted(lb: str, events: NftEventSocket) -> None:
    nft(lb, "add element ip lb sessions { 10.0.0.1 : 0x200 }")
    collect(events)
    nft(lb, "delete map ip lb sessions\n"
            "add map ip lb sessions { type ipv4_addr : mark; flags dynamic,timeout; "
            'timeout 60s; comment "nftsync:sessions farm=web key=saddr"; }')
    evs = collect(events)
    # deleting a populated map notifies the set only, not its elements
    assert elem_events(evs) == []
    sets = [(e.op, e.name, e.comment) for e in evs if isinstance(e, SetEvent)]
    assert sets[0][:2] == ("delete", "sessions")
    assert sets[-1] == ("add", "sessions", "nftsync:sessions farm=web key=saddr")
    assert map_elements(lb, "ip", "lb", "sessions") == []
    nft(lb, "add element ip lb static { 10.0.0.3 : 0x3 }")
    collect(events)
    nft(lb, "delete table ip lb")
    evs = collect(events)
    tables = [(e.op, e.family, e.name) for e in evs if isinstance(e, TableEvent)]
    assert tables == [("delete", "ip", "lb")]
    # each map of the table gets a DELSET (before the DELTABLE); no element is notified
    assert sorted(e.name for e in evs if isinstance(e, SetEvent)) == ["sessions", "static"]
    assert all(e.op == "delete" for e in evs if isinstance(e, SetEvent))
    assert elem_events(evs) == []
    assert netns.run(lb, "nft", "list", "tables").stdout.strip() == ""


def test_packet_path_update_sends_no_event(ns: str, events: NftEventSocket) -> None:
    """Kernel fact the daemon's design rests on: `update @map` from the packet path is silent."""
    nft(ns, """
table ip t {
    map m { type ipv4_addr : mark; flags dynamic,timeout; timeout 60s; }
    chain out {
        type filter hook output priority 0;
        udp dport 9 update @m { ip daddr : 0x1 }
    }
}
""")
    collect(events)
    with netns.entered(ns):
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for _ in range(3):
            tx.sendto(b"x", ("127.0.0.1", 9))
    finally:
        tx.close()
    # the map was updated by the packets...
    listed = map_elements(ns, "ip", "t", "m")
    assert [listed_key(e) for e in listed] == ["127.0.0.1"]
    # ...and nothing was notified. A control-plane add right after proves the socket listens:
    nft(ns, "add element ip t m { 10.0.0.5 : 0x2 }")
    evs = collect(events)
    keys = [el.key for e in elem_events(evs) for el in e.elements]
    assert keys == [socket.inet_aton("10.0.0.5")]


def test_overrun_is_reported_not_raised(ns: str) -> None:
    with netns.entered(ns):
        small = NftEventSocket(rcvbuf=4096)
    try:
        nft(ns, "table ip t { map m { type ipv4_addr : mark; }; }")
        body = ", ".join(f"{ipaddress.IPv4Address(0x0A000000 + i)} : 0x1" for i in range(2000))
        nft(ns, f"add element ip t m {{ {body} }}")
        evs: list = []
        for _ in range(100):
            batch = small.read()
            if not batch:
                break
            evs += batch
        assert any(isinstance(e, Overrun) for e in evs)
        assert small.stats.overruns >= 1
        assert len(map_elements(ns, "ip", "t", "m")) == 2000
    finally:
        small.close()
