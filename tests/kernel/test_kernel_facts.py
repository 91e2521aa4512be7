"""Kernel facts of docs/kernels.md that no other test asserts, each against the real kernel.

The design rests on them (the daemon keeps its own mirror because expiry is silent; `apply` flushes
tables, not maps; farms declare `size`), so a kernel that changes one of them fails here, by name,
rather than somewhere deep in a daemon test. The packet-path silence and the in-place refresh are
asserted in test_nft_events.py; the quadratic dump is measured by benchmarks, not tested (seconds).
"""

from __future__ import annotations

import json
import socket
import time

import netns

from nftsync.netlink.nftables import GenEvent, NftEventSocket, SetElemEvent


def nft(ns: str, script: str, check: bool = True) -> str:
    """Run an nft script in `ns`; return its stderr (empty on success)."""
    r = netns.run(ns, "nft", "-f", "-", input=script, check=False)
    if check:
        assert r.returncode == 0, f"nft failed: {r.stderr}"
    return r.stderr


def listed_map(ns: str, table: str, name: str) -> dict:
    out = netns.run(ns, "nft", "-j", "list", "map", "ip", table, name).stdout
    return next(obj["map"] for obj in json.loads(out)["nftables"] if "map" in obj)


def drain(sock: NftEventSocket, wait: float) -> list:
    """Every event that arrives within `wait` seconds."""
    events: list = []
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        time.sleep(0.1)
        events.extend(sock.read())
    return events


def test_expiry_sends_no_event(ns: str) -> None:
    """An element removed by the kernel's garbage collection on expiry notifies nothing: a
    replica must expire its copy on its own clock (nftsync/replication/table.py)."""
    with netns.entered(ns):
        events = NftEventSocket()
    try:
        nft(ns, "add table ip t\n"
                "add map ip t m { type ipv4_addr : mark; flags timeout; timeout 60s; }\n"
                "add element ip t m { 10.0.0.1 expires 1s : 0x1 }")
        drain(events, 0.5)
        deadline = time.monotonic() + 30  # GC runs about every timeout/4 (bounded; busy host)
        while listed_map(ns, "t", "m").get("elem") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not listed_map(ns, "t", "m").get("elem"), "element did not expire within 30 s"
        silent = drain(events, 1.0)
        assert [e for e in silent if isinstance(e, SetElemEvent)] == []
        # the socket was listening: a control-plane add right after is notified
        nft(ns, "add element ip t m { 10.0.0.2 : 0x2 }")
        seen = drain(events, 1.0)
        keys = [el.key for e in seen if isinstance(e, SetElemEvent) for el in e.elements]
        assert keys == [socket.inet_aton("10.0.0.2")]
        assert any(isinstance(e, GenEvent) for e in seen)
    finally:
        events.close()


def test_flush_table_keeps_map_elements(ns: str) -> None:
    """`flush table` removes rules only; `flush map` empties the map (nftsync/apply.py relies on
    the first to reload a farm's rules without touching its sessions)."""
    nft(ns, "add table ip t\n"
            "add map ip t m { type ipv4_addr : mark; flags timeout; timeout 60s; }\n"
            "add chain ip t c\n"
            "add rule ip t c ip saddr 10.0.0.9 accept\n"
            "add element ip t m { 10.0.0.1 : 0x1 }")
    nft(ns, "flush table ip t")
    assert len(listed_map(ns, "t", "m")["elem"]) == 1
    assert "10.0.0.9" not in netns.run(ns, "nft", "list", "chain", "ip", "t", "c").stdout
    nft(ns, "flush map ip t m")
    assert not listed_map(ns, "t", "m").get("elem")


def test_listing_forms(ns: str) -> None:
    """JSON listings give `[key, value]` for plain elements and `[{"elem": {...}}, value]` for
    elements with an expiry, in whole seconds; marks are integers (nftsync.model.key_from_json
    and NftSessionMap.list accept both forms)."""
    nft(ns, "add table ip t\n"
            "add map ip t s { type ipv4_addr : mark; }\n"
            "add map ip t m { type ipv4_addr : mark; flags timeout; timeout 60s; }\n"
            "add element ip t s { 10.0.0.1 : 0x200 }\n"
            "add element ip t m { 10.0.0.1 expires 30s : 0x200 }")
    assert listed_map(ns, "t", "s")["elem"] == [["10.0.0.1", 0x200]]
    ((elem, mark),) = listed_map(ns, "t", "m")["elem"]
    assert mark == 0x200 and elem["elem"]["val"] == "10.0.0.1"
    assert isinstance(elem["elem"]["expires"], int) and 28 <= elem["elem"]["expires"] <= 30


def test_dynamic_map_default_size_and_full_map(ns: str) -> None:
    """A dynamic map used by a packet-path `update` and declared without `size` holds 65535
    elements; a control-plane add beyond that fails with ENFILE (what the sink counts as
    `map_full`), and the packet path stops adding, silently (so farms declare `size`)."""
    nft(ns, """
table ip t {
    map m { type ipv4_addr : mark; flags dynamic,timeout; timeout 60s; }
    chain out { type filter hook output priority 0; udp dport 9 update @m { ip daddr : 0x1 }; }
}
""")
    assert listed_map(ns, "t", "m")["size"] == 65535
    elems = ", ".join(f"10.1.{i >> 8}.{i & 255} : 0x2" for i in range(65535))
    nft(ns, f"add element ip t m {{ {elems} }}")
    err = nft(ns, "add element ip t m { 10.2.0.1 : 0x2 }", check=False)
    assert "Too many open files in system" in err  # ENFILE
    with netns.entered(ns):
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        tx.sendto(b"x", ("127.0.0.1", 9))  # the packet itself passes; only the update is dropped
    finally:
        tx.close()
    keys = {e[0]["elem"]["val"] if isinstance(e[0], dict) else e[0]
            for e in listed_map(ns, "t", "m")["elem"]}
    assert len(keys) == 65535 and "127.0.0.1" not in keys
