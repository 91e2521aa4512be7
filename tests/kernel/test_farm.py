"""Farms in the netns lab: real clients through lb1 to real backends, checked in the kernel.

Each test starts with an empty ruleset on lb1 and loads a farm with `nftsync apply`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from helpers import RULESETS, map_elements, nftsync, nftsync_json, reset_node
from lab import VIP6, client4, client6

MARK = {"be1": 0x200, "be2": 0x201}
BACKEND = {v: k for k, v in MARK.items()}


@pytest.fixture(autouse=True)
def clean_lb1(lab):
    reset_node(lab, "lb1")
    yield


def apply(lab, path: Path | str, *extra: str) -> dict:
    return nftsync_json(lab, "lb1", "apply", str(path), *extra)


def sessions(lab, table="nftsync_http", name="http_sessions", family="ip") -> dict[str, dict]:
    return map_elements(lab, "lb1", family, table, name)


def clients(n: int, start: int = 1) -> list[str]:
    return [client4(i) for i in range(start, start + n)]


def write_farm(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_round_robin_spreads_and_sticks(lab):
    apply(lab, RULESETS / "farm-http.nft")
    seen = lab.request(port=80, sources=clients(20), repeat=3)
    assert len(seen) == 20
    for src, backends in seen.items():
        assert backends[0] is not None, f"{src} got no answer"
        assert backends == [backends[0]] * 3, f"{src} moved between backends: {backends}"
    spread = Counter(b[0] for b in seen.values())
    assert spread == {"be1": 10, "be2": 10}, spread
    # Every client has a session in the kernel map, pointing where its traffic went.
    elems = sessions(lab)
    for src, backends in seen.items():
        assert elems[src]["mark"] == MARK[backends[0]]
        assert 55 <= elems[src]["expires"] <= 60
    # The CLI shows the same thing.
    rows = {r["client"]: r for r in nftsync_json(lab, "lb1", "sessions", "list")}
    assert {src: BACKEND[int(r["backend"], 16)] for src, r in rows.items()} == \
        {src: b[0] for src, b in seen.items()}


def test_port_60_farm_from_the_seed(lab):
    apply(lab, RULESETS / "farm.nft")
    seen = lab.request(port=60, sources=clients(4), repeat=2)
    assert all(b[0] in ("be1", "be2") and b[0] == b[1] for b in seen.values()), seen
    assert set(sessions(lab, "nftsync_web", "web_sessions")) == set(seen)


def test_weighted_scheduler(lab):
    apply(lab, RULESETS / "weighted.nft")
    seen = lab.request(port=80, sources=clients(50))
    spread = Counter(b[0] for b in seen.values())
    assert set(spread) == {"be1", "be2"}
    assert spread["be1"] > spread["be2"], f"70/30 weights gave {spread}"


def test_hash_scheduler_is_a_function_of_the_client(lab):
    apply(lab, RULESETS / "hash.nft")
    first = lab.request(port=80, sources=clients(30))
    assert set(Counter(b[0] for b in first.values())) == {"be1", "be2"}
    # Forget every session: the hash alone must send each client to the same backend again.
    nftsync(lab, "lb1", "sessions", "flush", "--farm", "hash")
    assert sessions(lab, "nftsync_hash", "hash_sessions") == {}
    again = lab.request(port=80, sources=clients(30))
    assert again == first


def test_multiport_udp_and_ipv6(lab):
    apply(lab, RULESETS / "multiport.nft")
    for port in (80, 443, 8080):
        seen = lab.request(port=port, sources=clients(4))
        assert all(b[0] in ("be1", "be2") for b in seen.values()), (port, seen)
    # One session per client across the three ports.
    assert len(sessions(lab, "nftsync_multiport", "multi_sessions")) == 4

    reset_node(lab, "lb1")
    apply(lab, RULESETS / "udp.nft")
    seen = lab.request(port=5353, proto="udp", sources=clients(6), repeat=2)
    assert all(b[0] is not None and b[0] == b[1] for b in seen.values()), seen
    assert len(sessions(lab, "nftsync_udp", "dns_sessions")) == 6

    reset_node(lab, "lb1")
    apply(lab, RULESETS / "inet-ipv6.nft")
    v6 = [client6(i) for i in range(1, 7)]
    seen = lab.request(port=80, vip=VIP6, sources=v6, repeat=2)
    assert all(b[0] is not None and b[0] == b[1] for b in seen.values()), seen
    assert set(Counter(b[0] for b in seen.values())) == {"be1", "be2"}
    elems = sessions(lab, "nftsync_dual", "v6_sessions", family="inet")
    assert set(elems) == set(v6)


def test_persistence_keys(lab):
    # Source network /24: every lab client is in 10.10.1.0/24, so all share one backend.
    # (Sequential: first connections of two clients of one key that race on two CPUs may both be
    # scheduled before either `update` lands; the first one recorded wins from then on.)
    apply(lab, RULESETS / "key-network.nft")
    seen = lab.request(port=80, sources=clients(10), parallel=1)
    assert len({b[0] for b in seen.values()}) == 1
    assert set(sessions(lab, "nftsync_net", "net_sessions")) == {"10.10.1.0"}

    # Source address . source port (UDP): the key holds both parts.
    reset_node(lab, "lb1")
    apply(lab, RULESETS / "key-srcport.nft")
    seen = lab.request(port=60, proto="udp", sources=clients(3))
    assert all(b[0] for b in seen.values())
    keys = sessions(lab, "nftsync_srcport", "sp_sessions")
    assert len(keys) == 3 and all(" . " in k for k in keys), keys

    # Destination address: the VIP itself is the key.
    reset_node(lab, "lb1")
    apply(lab, RULESETS / "key-daddr.nft")
    seen = lab.request(port=80, sources=clients(8), parallel=1)
    assert len({b[0] for b in seen.values()}) == 1
    assert set(sessions(lab, "nftsync_dst", "dst_sessions")) == {"10.10.0.100"}


def test_persistence_expires_and_rebalances(lab, tmp_path):
    text = (RULESETS / "farm-http.nft").read_text().replace("timeout 60s", "timeout 2s")
    apply(lab, write_farm(tmp_path, "short.nft", text))
    src = client4(1)
    first = lab.request(port=80, sources=[src])[src][0]
    assert first == "be1"  # numgen inc starts at 0 -> 0x200
    assert lab.request(port=80, sources=[src])[src][0] == "be1"  # within the timeout: sticks
    deadline = time.monotonic() + 10
    while sessions(lab) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert sessions(lab) == {}, "the session did not expire"
    # Scheduled afresh: the round robin has moved on, so the client lands on the other backend.
    assert lab.request(port=80, sources=[src])[src][0] == "be2"
    assert sessions(lab)[src]["mark"] == MARK["be2"]


def test_static_sessions_win(lab):
    apply(lab, RULESETS / "static.nft")
    pinned = clients(3)
    # Even a timed session pointing elsewhere does not beat a pin.
    nftsync(lab, "lb1", "sessions", "add", pinned[0], "0x200")
    seen = lab.request(port=80, sources=clients(6), repeat=2)
    for src in pinned:
        assert seen[src] == ["be2", "be2"], (src, seen[src])
    rows = nftsync_json(lab, "lb1", "sessions", "list", "--static")
    assert {r["client"] for r in rows} == set(pinned)
    assert all(r["expires"] is None for r in rows)
    # A pin added at run time works at once.
    nftsync(lab, "lb1", "sessions", "add", "--static", client4(6), "10.20.0.11")
    assert lab.request(port=80, sources=[client4(6)], repeat=2)[client4(6)] == ["be1", "be1"]


def test_drain_and_down(lab):
    apply(lab, RULESETS / "farm-http.nft")
    before = lab.request(port=80, sources=clients(10))
    on_be2 = [s for s, b in before.items() if b[0] == "be2"]
    assert len(on_be2) == 5

    out = nftsync_json(lab, "lb1", "backend", "set", "0x201", "drain")
    assert out["state"] == "drain"
    # Drain: old clients of be2 stay there, every new client goes to be1.
    assert all(b == ["be2"] for s, b in lab.request(port=80, sources=on_be2).items())
    new = lab.request(port=80, sources=clients(10, start=11))
    assert {b[0] for b in new.values()} == {"be1"}, new
    rows = {r["backend"]: r["state"] for r in nftsync_json(lab, "lb1", "backend", "list")}
    assert rows == {"0x200": "up", "0x201": "drain"}

    out = nftsync_json(lab, "lb1", "backend", "set", "10.20.0.12", "down")
    assert out["sessions_removed"] == 5
    elems = sessions(lab)
    assert all(e["mark"] == MARK["be1"] for e in elems.values())
    # Down: be2's former clients re-balance to be1.
    assert all(b == ["be1"] for b in lab.request(port=80, sources=on_be2).values())

    # The state survives a re-apply of the farm (and a changed one).
    apply(lab, RULESETS / "farm-http.nft", "--force")
    rows = {r["backend"]: r["state"] for r in nftsync_json(lab, "lb1", "backend", "list")}
    assert rows == {"0x200": "up", "0x201": "down"}

    nftsync(lab, "lb1", "backend", "set", "0x201", "up")
    fresh = lab.request(port=80, sources=clients(10, start=31))
    assert set(Counter(b[0] for b in fresh.values())) == {"be1", "be2"}


BROKEN = {
    "syntax.nft": ("table ip nftsync_http {\n chain c {\n  tcp dport 80 bogus\n }\n}\n",
                   "syntax.nft:3:"),
    "kernel.nft": ("table ip nftsync_http {\n chain c {\n  ip saddr @nosuchset accept\n }\n}\n",
                   "kernel.nft:3:12-21: No such file or directory (at '@nosuchset')"),
    "convention.nft": ("table ip nftsync_http {\n map m { type ipv4_addr : mark; "
                       "comment \"nftsync:sessions farm=x\"; }\n}\n",
                       "needs 'flags dynamic,timeout'"),
    "role.nft": ("table ip nftsync_http {\n map m { type ipv4_addr : mark; "
                 "comment \"nftsync:session farm=x\"; }\n}\n", "unknown role"),
    "flush.nft": ("flush ruleset\n" + (RULESETS / "farm-http.nft").read_text(),
                  "flush.nft:1: 'flush ruleset' would drop every live session"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_file_changes_nothing(lab, tmp_path, name):
    apply(lab, RULESETS / "farm-http.nft")
    lab.request(port=80, sources=clients(4))
    before = lab.nft("lb1", "list", "ruleset")
    text, expected = BROKEN[name]
    p = nftsync(lab, "lb1", "apply", str(write_farm(tmp_path, name, text)), check=False)
    assert p.returncode != 0
    assert expected in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr  # one clear line
    after = lab.nft("lb1", "list", "ruleset")
    assert _without_expiry(after) == _without_expiry(before)


def _without_expiry(text: str) -> str:
    import re

    return re.sub(r"expires \S+", "expires X", text)


def test_missing_file_and_not_root(lab, tmp_path):
    p = nftsync(lab, "lb1", "apply", str(tmp_path / "nope.nft"), check=False)
    assert p.returncode != 0 and "no such file" in p.stderr
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    p = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        sys.executable, "-m", "nftsync", "sessions", "list"],
                       capture_output=True, text=True, env=env)
    assert p.returncode != 0
    assert p.stderr.strip() == "nftsync: error: must run as root (nftables and conntrack are " \
                               "changed over netlink)"


def test_reapply_keeps_sessions(lab, tmp_path):
    farm = RULESETS / "farm-http.nft"
    apply(lab, farm)
    lab.request(port=80, sources=clients(12))
    nftsync(lab, "lb1", "sessions", "add", client4(40), "0x201", "--expires", "25")
    before = sessions(lab)
    t_before = time.monotonic()
    assert len(before) == 13

    # Same file again: nothing to do, nothing touched.
    out = apply(lab, farm)
    assert out["changed"] is False and out["applied"] is False
    assert sessions(lab).keys() == before.keys()

    # --dry-run of a changed file changes nothing.
    longer = write_farm(tmp_path, "longer.nft", farm.read_text().replace("timeout 60s",
                                                                          "timeout 90s"))
    out = apply(lab, longer, "--dry-run")
    assert out["applied"] is False and out["changed"] is True
    assert any(c["action"] == "redefine" and c["name"].endswith("http_sessions")
               for c in out["changes"])
    assert lab.nft_json("lb1", "list", "map", "ip", "nftsync_http", "http_sessions")[1]["map"][
        "timeout"] == 60

    # New timeout: the map is re-created and every session carried over with its expiry.
    out = apply(lab, longer)
    assert out["applied"] and out["restored"] == {"ip nftsync_http http_sessions": 13}
    after = sessions(lab)
    elapsed = time.monotonic() - t_before
    assert after.keys() == before.keys()
    for key, e in after.items():
        assert e["mark"] == before[key]["mark"]
        # The expiry went on ticking while the commands ran (slow in a TCG VM), nothing else.
        assert before[key]["expires"] - elapsed - 2 <= e["expires"] <= before[key]["expires"] \
            + 1, (key, e, before[key], elapsed)

    # New scheduler (hash instead of round robin), same maps: sessions untouched, not dumped.
    hashed = write_farm(tmp_path, "hashed.nft", longer.read_text().replace(
        "numgen inc mod 2", "jhash ip saddr mod 2"))
    out = apply(lab, hashed)
    assert out["applied"] and out["restored"] == {}
    assert sessions(lab).keys() == before.keys()
    # And the clients still reach the backend they were stuck to.
    seen = lab.request(port=80, sources=clients(12))
    assert all(MARK[b[0]] == before[s]["mark"] for s, b in seen.items())

    # A removed backend: its sessions are dropped and reported, the others stay.
    one = write_farm(tmp_path, "one.nft", hashed.read_text()
                     .replace(", 0x201 : 10.20.0.12", "")
                     .replace("jhash ip saddr mod 2 map { 0 : 0x200, 1 : 0x201 }",
                              "jhash ip saddr mod 1 map { 0 : 0x200 }"))
    out = apply(lab, one)
    gone = {k for k, e in before.items() if e["mark"] == MARK["be2"]}
    assert {d["key"] for d in out["dropped"]} == gone
    assert set(sessions(lab)) == set(before) - gone


def test_sessions_cli_round_trip(lab):
    apply(lab, RULESETS / "farm-http.nft")
    row = nftsync_json(lab, "lb1", "sessions", "add", "10.10.1.50", "0x201", "--expires", "40s")
    assert row["replaced"] is False and row["backend"] == "0x201"
    elems = sessions(lab)
    assert elems["10.10.1.50"]["mark"] == 0x201 and 38 <= elems["10.10.1.50"]["expires"] <= 40
    # Traffic follows the session that was added by hand.
    assert lab.request(port=80, sources=["10.10.1.50"])["10.10.1.50"] == ["be2"]

    row = nftsync_json(lab, "lb1", "sessions", "add", "10.10.1.50", "10.20.0.11")
    assert row["replaced"] is True
    assert sessions(lab)["10.10.1.50"]["mark"] == 0x200

    listed = nftsync_json(lab, "lb1", "sessions", "list", "--farm", "http")
    assert [(r["client"], r["backend"], r["address"]) for r in listed] == \
        [("10.10.1.50", "0x200", "10.20.0.11")]

    nftsync(lab, "lb1", "sessions", "del", "10.10.1.50")
    assert sessions(lab) == {}

    for args, message in [
        (("add", "10.10.1.999", "0x200"), "not a valid ipv4_addr"),
        (("add", "fd00::1", "0x200"), "not a valid ipv4_addr"),
        (("add", "10.10.1.5", "0x2ff"), "has no backend '0x2ff'"),
        (("add", "10.10.1.5", "0x200", "--expires", "soon"), "not a duration"),
        (("del", "10.10.1.77"), "has no session for 10.10.1.77"),
        (("list", "--farm", "nope"), "no farm 'nope' is loaded"),
    ]:
        p = nftsync(lab, "lb1", "sessions", *args, check=False)
        assert p.returncode == 2, (args, p.stderr)
        assert message in p.stderr, (args, p.stderr)
    assert sessions(lab) == {}

    lab.request(port=80, sources=clients(5))
    assert len(sessions(lab)) == 5
    nftsync(lab, "lb1", "sessions", "flush")
    assert sessions(lab) == {}
