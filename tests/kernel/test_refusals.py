"""Refusals never stall other work (issue 9, reproduction 3).

A session map on the receiving node is full, missing, or holds other values: the kernel refuses
some elements. Checked here against the real kernel (`nft -j list map`, `conntrack -L`):
a refusal costs about what an acceptance costs (a few transactions per batch, never one per
element), refused elements are not counted as applied, are counted per cause and kept for a
retry that writes them once the cause is gone, conntrack entries never wait behind session
writes, and in the lab pair a full map on lb2 neither delays lb1's conntrack entries nor
drops the link.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import threading
import time

import netns
import pytest
from daemons import DaemonProc, daemon_pair, wait_for
from helpers import RULESETS, map_elements

from nftsync.conntrack import CtEntry
from nftsync.daemon.ctsink import CtSink
from nftsync.daemon.farms import ReplicatedMap
from nftsync.daemon.nftsink import NftSink
from nftsync.daemon.writer import KernelWriter
from nftsync.model import MapRef, Role, SessionMap
from nftsync.replication import ElementOp

RULESET = """table ip t {
    map m {
        type ipv4_addr : mark
        flags timeout
        timeout 120s
        size 10
    }
    map big {
        type ipv4_addr : mark
        flags timeout
        timeout 120s
        size 2500
    }
}
"""


def v4(i: int) -> bytes:
    return ipaddress.IPv4Address(f"10.1.{i >> 8}.{i & 255}").packed


def text(i: int) -> str:
    return f"10.1.{i >> 8}.{i & 255}"


def rmap_of(table: str, name: str, size: int | None) -> ReplicatedMap:
    smap = SessionMap(MapRef("ip", table, name), Role.SESSIONS, "f", ("ipv4_addr",), "mark",
                      timeout=120, size=size)
    return ReplicatedMap(smap, None)


def kernel_map(ns: str, table: str, name: str) -> dict[str, int]:
    """key text -> mark, from `nft -j list map`."""
    out = json.loads(netns.run(ns, "nft", "-j", "list", "map", "ip", table, name).stdout)
    elems = next(o["map"] for o in out["nftables"] if "map" in o).get("elem", [])
    res = {}
    for key, value in elems:
        if isinstance(key, dict) and "elem" in key:
            key = key["elem"]["val"]
        res[str(key)] = value
    return res


def adds(first: int, n: int, mark: int = 0x200) -> list[ElementOp]:
    return [ElementOp(v4(i), mark, 60_000, None) for i in range(first, first + n)]


def retried(sink: NftSink, timeout: float = 15.0) -> int:
    """Call `retry_refused` until a map is due (it probes each map at most once a second)."""
    return wait_for(sink.retry_refused, timeout, "a retry of the refused elements", 0.05)


@pytest.fixture
def sink_ns(ns):
    netns.run(ns, "nft", "-f", "-", input=RULESET)
    with netns.entered(ns):
        sink = NftSink()
    try:
        yield ns, sink
    finally:
        sink.close()


def test_full_map_refuses_in_few_transactions_and_retries_when_room(sink_ns) -> None:
    ns, sink = sink_ns
    rmap = rmap_of("t", "m", 10)
    assert sink.elem_writer is not None
    sink.apply(rmap, adds(1, 30))
    # One refused transaction, then the same without what cannot fit: not 20 round trips.
    assert sink.elem_writer.transactions <= 3
    held = kernel_map(ns, "t", "m")
    assert set(held) == {text(i) for i in range(1, 11)}
    assert sink.stats.applied == 10
    assert sink.stats.refused == {"map_full": 20}
    assert sink.stats.waiting == 20 and sink.stats.failed == 0
    assert sink.problems() == ["map ip t m is full (10 of 10): 20 session(s) waiting"]
    assert "full" in sink.stats.last_error and "open files" not in sink.stats.last_error

    # Full and nothing changed: the probe (one element) is refused again, nothing recounted.
    assert retried(sink) == 20
    assert sink.stats.refused == {"map_full": 20} and sink.stats.waiting == 20

    # A newer op for a waiting key replaces it (a new change: refused and counted as such,
    # the map is still full); a delete of a waiting key cancels it.
    sink.apply(rmap, [ElementOp(v4(11), 0x201, 60_000, 0x200), ElementOp(v4(12), None, 0, 0x200)])
    assert sink.stats.waiting == 19 and sink.stats.refused == {"map_full": 21}

    # Room for five: the retry writes the five oldest waiting elements, the rest wait.
    netns.run(ns, "nft", "delete", "element", "ip", "t", "m",
              "{ " + ", ".join(text(i) for i in range(1, 6)) + " }")
    assert retried(sink) == 19
    held = kernel_map(ns, "t", "m")
    assert set(held) == {text(i) for i in (*range(6, 11), *range(13, 18))}
    assert sink.stats.waiting == 14 and sink.stats.recovered == 5
    assert sink.problems() == ["map ip t m is full (10 of 10): 14 session(s) waiting"]

    # Room again: the next ten, then the last four (the replaced key with its newest value).
    netns.run(ns, "nft", "flush", "map", "ip", "t", "m")
    retried(sink)
    assert set(kernel_map(ns, "t", "m")) == {text(i) for i in range(18, 28)}
    assert sink.stats.waiting == 4
    netns.run(ns, "nft", "flush", "map", "ip", "t", "m")
    retried(sink)
    held = kernel_map(ns, "t", "m")
    assert held == {text(28): 0x200, text(29): 0x200, text(30): 0x200, text(11): 0x201}
    assert text(12) not in held  # its delete cancelled it
    assert sink.stats.waiting == 0 and sink.problems() == []
    assert sink.stats.applied == 10 + 5 + 10 + 4 and sink.stats.recovered == 19
    assert sink.stats.refused == {"map_full": 21}


def test_full_in_a_later_message_and_mixed_batch(sink_ns) -> None:
    """The refused element sits in the batch's second netlink message; the same batch holds
    a replacement and a delete, which need no new slot and must still land."""
    ns, sink = sink_ns
    rmap = rmap_of("t", "big", None)  # size unknown to the ruleset: read from the kernel
    sink.apply(rmap, adds(0, 2000))
    ops = adds(2000, 1000) + [ElementOp(v4(5), 0x202, 60_000, 0x200),
                              ElementOp(v4(6), None, 0, 0x200)]
    before = sink.elem_writer.transactions
    sink.apply(rmap, ops)
    assert sink.elem_writer.transactions - before <= 3
    held = kernel_map(ns, "t", "big")
    assert len(held) == 2500
    assert held[text(5)] == 0x202 and text(6) not in held
    assert text(2500) in held and text(2501) not in held  # 501 new slots after the delete
    assert sink.stats.refused == {"map_full": 499}
    assert sink.problems() == ["map ip t big is full (2500 of 2500): 499 session(s) waiting"]


def test_missing_table_and_map_are_named_and_retried(sink_ns) -> None:
    ns, sink = sink_ns
    sink.apply(rmap_of("t", "nosuch", None), adds(1, 3))
    sink.apply(rmap_of("nosuch", "m", None), adds(1, 2))
    assert sink.stats.refused == {"no_such_map": 3, "no_such_table": 2}
    assert sink.stats.applied == 0
    assert sorted(sink.problems()) == [
        "map ip t nosuch does not exist: 3 session(s) waiting",
        "table ip nosuch does not exist (map m): 2 session(s) waiting"]
    netns.run(ns, "nft", "add", "map", "ip", "t", "nosuch", "{ type ipv4_addr : mark; "
              "flags timeout; timeout 120s; }")
    retried(sink)
    assert set(kernel_map(ns, "t", "nosuch")) == {text(1), text(2), text(3)}
    assert sink.problems() == ["table ip nosuch does not exist (map m): 2 session(s) waiting"]


def test_mirror_surprises_are_corrected_not_refused(sink_ns) -> None:
    """A key the mirror thinks absent holds another value (the packet path added it), a key it
    thinks present is gone (the kernel expired it): both are written, nothing is refused."""
    ns, sink = sink_ns
    rmap = rmap_of("t", "big", 2500)
    netns.run(ns, "nft", "add", "element", "ip", "t", "big", "{ 10.1.0.1 : 0x300 }")
    sink.apply(rmap, [ElementOp(v4(1), 0x201, 60_000, None),  # exists, another value
                      ElementOp(v4(2), 0x201, 60_000, 0x200),  # "replace": it is not there
                      ElementOp(v4(3), None, 0, 0x200),  # delete of what expired
                      *adds(10, 5)])
    held = kernel_map(ns, "t", "big")
    assert held == {text(1): 0x201, text(2): 0x201, **{text(i): 0x200 for i in range(10, 15)}}
    assert sink.stats.refused == {} and sink.stats.failed == 0 and sink.problems() == []


def test_text_path_full_map(ns) -> None:
    """The libnftables path (maps the netlink encoder does not cover) refuses a full map's
    elements by bisection, with the same counting and words."""
    netns.run(ns, "nft", "-f", "-", input=RULESET)
    with netns.entered(ns):
        sink = NftSink(netlink=False)
    try:
        rmap = rmap_of("t", "m", 10)
        sink.apply(rmap, adds(1, 16))
        assert len(kernel_map(ns, "t", "m")) == 10
        assert sink.stats.applied == 10 and sink.stats.refused == {"map_full": 6}
        assert sink.problems() == ["map ip t m is full (10 of 10): 6 session(s) waiting"]
    finally:
        sink.close()


def test_conntrack_writes_do_not_wait_behind_session_writes(ns) -> None:
    """The session lane is held up (a job that waits for the test): conntrack entries submitted
    after it still reach the kernel."""
    netns.run(ns, "nft", "-f", "-", input=RULESET)
    loop = asyncio.new_event_loop()
    writer = KernelWriter(loop)
    release = threading.Event()
    with netns.entered(ns):
        ct = CtSink(writer)
    try:
        writer.submit(release.wait, 1, 60.0, lane="nft")
        entries = [CtEntry.make(f"10.9.0.{i}", 40000, "10.0.0.100", 80, "10.0.1.1", 8080,
                                mark=0x200, timeout=600) for i in range(1, 51)]
        ct.apply([("upsert", e) for e in entries])
        wait_for(lambda: len(netns.run(ns, "conntrack", "-L").stdout.splitlines()) == 50, 30,
                 "50 conntrack entries while the session lane is blocked")
        assert not release.is_set() and writer.queued >= 1
    finally:
        release.set()
        writer.close()
        ct.close()
        loop.close()


# --- the lab pair: reproduction 3 --------------------------------------------------------------
TABLE, MAP = "nftsync_web", "web_sessions"
N_CLIENTS = 3000
SIZE = 1000


@pytest.fixture
def small_farm(tmp_path):
    """rulesets/farm.nft with a session map of 1000 elements."""
    path = tmp_path / "farm-small.nft"
    text = (RULESETS / "farm.nft").read_text()
    assert "size 65535" in text
    path.write_text(text.replace("size 65535", f"size {SIZE}"))
    return path


@pytest.fixture
def pair(lab, tmp_path, small_farm):
    with daemon_pair(lab, tmp_path, small_farm) as daemons:
        yield daemons


def client(i: int) -> str:
    return f"10.12.{i >> 8}.{i & 255}"


def ct_load(path, n: int) -> None:
    """`conntrack -R` lines: n DNATed connections of distinct clients with the farm's marks."""
    lines = []
    for i in range(n):
        mark, backend = ("0x200", "10.20.0.11") if i % 2 else ("0x201", "10.20.0.12")
        src = client(i)
        lines.append(f"-A -t 600 -u SEEN_REPLY,ASSURED -s {src} -d 10.10.0.100 -r {backend} "
                     f"-q {src} -p tcp --sport 40000 --dport 60 --reply-port-src 80 "
                     f"--reply-port-dst 40000 --state ESTABLISHED -m {mark}")
    path.write_text("\n".join(lines) + "\n")


def farm_conntrack(lab, node: str) -> int:
    out = lab.exec(node, "conntrack", "-L", "-p", "tcp", "--orig-port-dst", "60",
                   check=False).stdout
    return sum(1 for ln in out.splitlines() if re.search(r"src=10\.12\.", ln))


def connects(d: DaemonProc) -> int:
    """How many times the daemon's peer link was (re)established."""
    return sum(p["connects"] for p in d.ctl("peers"))


def test_full_map_on_the_peer_stalls_nothing(lab, pair, tmp_path):
    """lb2 holds 400 sessions of its own; lb1 learns 3000 clients. lb2's replication core admits
    at most the map's size (1000) per origin, so its kernel map has room for 600 of them: 400
    are refused by the kernel (map full). The conntrack entries all arrive anyway, the link
    stays up, the refusals are counted and said in words, and freed room is refilled."""
    d1, d2 = pair["lb1"], pair["lb2"]
    links1, links2 = connects(d1), connects(d2)
    own = [f"10.13.0.{i}" for i in range(1, 201)] + [f"10.13.1.{i}" for i in range(1, 201)]
    lab.exec("lb2", "nft", "add", "element", "ip", TABLE, MAP,
             "{ " + ", ".join(f"{a} timeout 600s expires 600s : 0x200" for a in own) + " }")
    wait_for(lambda: d1.ctl("stats")["sessions"].get("web/sessions") == len(own), 60,
             "lb2's own sessions known on lb1", interval=0.5)
    load = tmp_path / "clients.txt"
    ct_load(load, N_CLIENTS)
    started = time.monotonic()
    lab.exec("lb1", "conntrack", "-R", str(load), timeout=120)

    # Every conntrack entry reaches lb2's kernel, although its session map refuses sessions.
    wait_for(lambda: farm_conntrack(lab, "lb2") == N_CLIENTS, 120,
             "3000 conntrack entries on lb2", interval=0.2)
    print(f"\n3000 conntrack entries on lb2 after {time.monotonic() - started:.1f}s")
    waiting = len(own)  # lb1's 1000 admitted by lb2's core, of which 1000 - 400 fit
    seen: list[dict] = []

    def settled() -> dict | None:
        kernel = d2.ctl("stats")["kernel"]
        seen[:] = [kernel]
        done = kernel["queued"] == 0 and kernel["nft"]["waiting"] == waiting
        return kernel["nft"] if done else None

    try:
        nft = wait_for(settled, 120, f"lb2's writer idle with {waiting} sessions waiting", 0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; lb2's kernel stats: {seen}") from None
    print(f"lb2's session writes settled after {time.monotonic() - started:.1f}s")
    held = map_elements(lab, "lb2", "ip", TABLE, MAP)
    assert len(held) == SIZE and set(own) <= set(held)
    assert nft["refused"] == {"map_full": waiting}, nft
    assert nft["applied"] == SIZE - len(own), nft  # only what the kernel accepted
    words = f"map ip {TABLE} {MAP} is full ({SIZE} of {SIZE}): {waiting} session(s) waiting"
    status = d2.ctl("status")
    assert status["health"] == "degraded" and words in status["reasons"], status
    for d in (d1, d2):
        peers = d.ctl("peers")
        assert len(peers) == 1 and peers[0]["state"] == "up", peers
    assert connects(d1) == links1 and connects(d2) == links2  # the link never reconnected

    # Make room on lb2 (an admin delete of 300 of lb1's clients): waiting sessions refill it.
    gone = sorted(set(held) - set(own))[:300]
    lab.exec("lb2", "nft", "delete", "element", "ip", TABLE, MAP, "{ " + ", ".join(gone) + " }")
    after = wait_for(lambda: len(m := map_elements(lab, "lb2", "ip", TABLE, MAP)) == SIZE and
                     not set(gone) & set(m) and m, 60, "the freed room refilled from waiting",
                     interval=0.5)
    assert len(set(after) - set(held)) == 300
    words = f"map ip {TABLE} {MAP} is full ({SIZE} of {SIZE}): {waiting - 300} session(s) waiting"
    wait_for(lambda: words in d2.ctl("status")["reasons"], 30, f"{waiting - 300} still waiting")
    nft = d2.ctl("stats")["kernel"]["nft"]
    assert nft["recovered"] == 300 and nft["refused"] == {"map_full": waiting}, nft
    assert farm_conntrack(lab, "lb2") == N_CLIENTS
    assert connects(d1) == links1 and connects(d2) == links2  # still the first connection
