"""The streamed set-element dump (nftsync.netlink.setdump) against the real kernel and against
what libnftables lists (`nft -j list map`), in a namespace of its own (`sdump-<id>`).

Each map holds 20k elements, so one dump takes a few dozen datagrams (~800 elements each): an
element lost or decoded wrongly across datagram boundaries makes the comparison fail.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator

import netns
import pytest

from nftsync.datatypes import join_concat
from nftsync.model import key_from_json
from nftsync.netlink.setdump import DumpThread, SetElemDump, SetGone, iter_elements

N = 20_000
MARKS = (0x200, 0x201, 0x202)


@pytest.fixture
def ns() -> Iterator[str]:
    name = netns.create("sdump")
    try:
        yield name
    finally:
        netns.delete(name)


def v4(i: int) -> str:
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


def v6(i: int) -> str:
    return f"2001:db8:{i >> 16:x}::{i & 0xFFFF:x}"


def concat(i: int) -> str:
    return f"{v4(i // 4)} . {1024 + i % 4}"


# name: (family, key type, map flags/timeout lines, key of element i, timed)
MAPS = {
    "ipv4_timed": ("ip", "ipv4_addr", "flags timeout\n timeout 600s", v4, True),
    "ipv6_timed": ("ip6", "ipv6_addr", "flags timeout\n timeout 300s", v6, True),
    "concat_timed": ("inet", "ipv4_addr . inet_service", "flags timeout\n timeout 600s", concat,
                     True),
    "ipv4_static": ("ip", "ipv4_addr", "", v4, False),
    "concat_static": ("inet", "ipv4_addr . inet_service", "", concat, False),
}


def element(key: str, i: int, timed: bool) -> str:
    mark = f"{MARKS[i % 3]:#x}"
    if not timed:
        return f"{key} : {mark}"
    if i % 7 == 0:  # an element with its own timeout (longer than the map's)
        return f"{key} timeout 900s expires {700 + i % 150}s : {mark}"
    if i % 7 == 1:  # the map's timeout, the whole of it left
        return f"{key} : {mark}"
    return f"{key} expires {100 + i % 150}s : {mark}"


def make_map(ns: str, name: str, n: int = N) -> tuple[str, str, list[str]]:
    family, ktype, extra, key_of, timed = MAPS[name]
    netns.run(ns, "nft", "-f", "-", input=f"table {family} t {{\n map {name} {{\n type {ktype} "
              f": mark\n {extra}\n size 100000\n }}\n}}\n")
    lines = []
    for s in range(0, n, 5000):
        elems = ", ".join(element(key_of(i), i, timed) for i in range(s, min(n, s + 5000)))
        lines.append(f"add element {family} t {name} {{ {elems} }}\n")
    netns.run(ns, "nft", "-f", "-", input="".join(lines), timeout=120)
    return family, ktype, [t.strip() for t in ktype.split(".")]


def listed(ns: str, family: str, name: str, types: list[str]) -> tuple[dict, int | None]:
    """key bytes -> (mark, expires s or None, timeout s or None) from `nft -j list map`, and
    the map's timeout."""
    out = json.loads(netns.run(ns, "nft", "-j", "list", "map", family, "t", name).stdout)
    obj = next(o["map"] for o in out["nftables"] if "map" in o)
    default = obj.get("timeout")
    got = {}
    for key, value in obj.get("elem", []):
        attrs = {}
        if isinstance(key, dict) and "elem" in key:
            attrs = key["elem"]
            key = attrs["val"]
        raw = join_concat(list(key_from_json(key)), types)
        got[raw] = (int(value), attrs.get("expires"), attrs.get("timeout", default))
    return got, default


@pytest.mark.parametrize("name", sorted(MAPS))
def test_dump_matches_libnftables(ns: str, name: str) -> None:
    family, _ktype, types = make_map(ns, name)
    t0 = time.monotonic()
    want, default = listed(ns, family, name, types)
    t1 = time.monotonic()
    with netns.entered(ns):
        dump = SetElemDump(family, "t", name)
    got: dict[bytes, tuple[int, float | None, int | None]] = {}
    datagrams = 0
    for data, mono, _wall in dump.datagrams():
        datagrams += 1
        for el in iter_elements(data):
            assert el.key not in got, "an element came twice from a dump of a set at rest"
            mark = int.from_bytes(el.data, sys.byteorder)
            expiry = None if el.expiration_ms is None else mono + el.expiration_ms / 1000
            timeout = el.timeout_ms // 1000 if el.timeout_ms is not None else default
            got[el.key] = (mark, expiry, timeout)
    assert dump.done and dump.messages >= 10, (dump.messages, datagrams)
    assert len(want) == N
    assert got.keys() == want.keys()
    for key, (mark, expires, timeout) in want.items():
        g_mark, g_expiry, g_timeout = got[key]
        assert (g_mark, g_timeout) == (mark, timeout), key
        if expires is None:
            assert g_expiry is None, key
        else:
            # nft prints whole seconds (rounded down) of what was left when it listed, between
            # t0 and t1: the same point in time within a second, jiffies aside.
            assert t0 + expires - 0.1 <= g_expiry <= t1 + expires + 1.1, (key, expires,
                                                                          g_expiry - t0)


def test_missing_map_is_set_gone(ns: str) -> None:
    netns.run(ns, "nft", "add", "table", "ip", "t")
    for table, name in (("t", "nothere"), ("nothere", "m")):
        with netns.entered(ns):
            dump = SetElemDump("ip", table, name)
        with pytest.raises(SetGone):
            list(dump.batches())


def test_dump_goes_on_through_changes(ns: str) -> None:
    """Elements added by transactions during the dump: the dump ends normally and every
    element that was there throughout comes (an insert can only make one come twice)."""
    family, _ktype, types = make_map(ns, "ipv4_static")
    with netns.entered(ns):
        dump = SetElemDump(family, "t", "ipv4_static")
    seen: set[bytes] = set()
    for n, batch in enumerate(dump.batches()):
        seen.update(el.key for el in batch)
        if n in (2, 5, 8):
            extra = ", ".join(f"10.99.{n}.{i} : 0x200" for i in range(200))
            netns.run(ns, "nft", "add", "element", family, "t", "ipv4_static", f"{{ {extra} }}")
    assert dump.done
    assert {join_concat([v4(i)], types) for i in range(N)} <= seen
    print(f"datagrams flagged NLM_F_DUMP_INTR: {dump.interrupted} (of {dump.messages})")


def test_dump_thread_bounds_what_the_loop_holds(ns: str) -> None:
    """A slow reader: the thread never has more than `window` datagrams out and not yet
    released, hands them over in order and ends each dump once (an error, too)."""
    make_map(ns, "ipv4_timed")
    window = 2
    thread = DumpThread(window=window)
    with netns.entered(ns):
        # The thread opens dumps in its own (the process's) namespace: open them here.
        dumps = {"map": SetElemDump("ip", "t", "ipv4_timed"),
                 "gone": SetElemDump("ip", "t", "nothere")}
    thread.submit("map", lambda: dumps["map"])
    thread.submit("gone", lambda: dumps["gone"])
    most = elements = 0
    out = 0  # taken and not released
    ends: list[tuple[str, BaseException | None]] = []
    deadline = time.monotonic() + 120
    try:
        while len(ends) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)  # slow: the thread waits for room meanwhile
            for job, data, _mono, error in thread.take():
                if data is None:
                    ends.append((job, error))
                    continue
                assert job == "map" and not ends
                out += 1
                most = max(most, out)
                elements += sum(1 for _ in iter_elements(data))
            while out:
                thread.release()
                out -= 1
    finally:
        thread.close()
    assert most <= window
    assert elements == N
    assert [j for j, _ in ends] == ["map", "gone"]
    assert ends[0][1] is None and isinstance(ends[1][1], SetGone)
    assert not [t for t in threading.enumerate() if t.name == "nftsync-setdump"]
