"""HaproxyPeer against Debian's HAProxy 2.6 in a namespace of its own: HAProxy dials the peer,
pushes what its requests store, takes what the peer pushes (server and remaining expiry), asks
the peer for a resync when it starts, and keeps the entries over a master-worker reload.

Everything runs in one throw-away namespace (lo only): two tiny HTTP backends answering their
name, HAProxy (`-W`, master-worker, as Debian's unit runs it), and the peer's event loop in a
thread that entered the namespace. HAProxy is stopped by pid and the namespace deleted after.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import netns
import pytest
from haproxy_lab import (
    PEER_PORT,
    HaproxyNode,
    check_config,
    haproxy_config,
    start_backends,
    stop_pid,
    wait_for,
)

from nftsync.l7.haproxy import HaproxyPeer, StickTable, StickUpdate

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None,
                                reason="haproxy not installed (scripts/setup.sh)")

SERVERS = {"be1": 1, "be2": 2}
OTHER = {"be1": "be2", "be2": "be1"}


class PeerThread:
    """The peer on an event loop of its own, in a thread that entered the namespace (so its
    listening socket is the namespace's 127.0.0.1)."""

    def __init__(self, ns: str) -> None:
        self.ns = ns
        self.lock = threading.Lock()
        self.updates: list[StickUpdate] = []
        self.held: dict[str, list[StickUpdate]] = {}  # what snapshot() serves
        self.snapshots: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.peer: HaproxyPeer | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        if not self.ready.wait(10) or self.error is not None:
            raise RuntimeError(f"peer did not start: {self.error!r}")

    def _on_update(self, upd: StickUpdate) -> None:
        with self.lock:
            self.updates.append(upd)

    def _snapshot(self, table: str) -> list[StickUpdate]:
        with self.lock:
            self.snapshots.append(table)
            return list(self.held.get(table, []))

    def _run(self) -> None:
        try:
            with netns.entered(self.ns):
                asyncio.set_event_loop(self.loop)
                self.peer = HaproxyPeer("127.0.0.1", PEER_PORT, "nftsync", "lb1",
                                        self._on_update, self._snapshot)
                self.loop.run_until_complete(self.peer.start())
        except OSError as exc:  # reported to the constructor, which raises it
            self.error = exc
            self.ready.set()
            return
        self.ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.peer.close())
        self.loop.close()

    def push(self, updates: list[StickUpdate]) -> None:
        assert self.peer is not None
        self.loop.call_soon_threadsafe(self.peer.push, updates)

    def stats(self) -> dict:
        assert self.peer is not None

        async def get() -> dict:
            return self.peer.stats()

        return asyncio.run_coroutine_threadsafe(get(), self.loop).result(5)

    def tables(self) -> dict[str, StickTable]:
        return dict(self.peer.tables) if self.peer else {}

    def received(self, table: str, key: bytes) -> list[StickUpdate]:
        with self.lock:
            return [u for u in self.updates if u.table == table and u.key == key]

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@dataclass
class Lab(HaproxyNode):
    """The namespace's HAProxy (peer lb1) and the peer it dials."""

    peer: PeerThread
    procs: list[subprocess.Popen] = field(default_factory=list)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    ns = netns.create("nsl7")
    tmp = Path(tempfile.mkdtemp(prefix="nsl7-"))
    procs: list[subprocess.Popen] = []
    the_lab: Lab | None = None
    try:
        cfg = tmp / "haproxy.cfg"
        cfg.write_text(haproxy_config(tmp, peers="lab"))
        check_config(ns, cfg)
        procs += start_backends(ns, tmp)
        the_lab = Lab(ns, "lb1", tmp, PeerThread(ns), procs=procs)
        the_lab.start_haproxy()
        wait_for("HAProxy's session with the peer", lambda: the_lab.peer.stats()["connected"])
        yield the_lab
    finally:
        if the_lab is not None:
            the_lab.stop_haproxy()
            the_lab.peer.stop()
        for proc in procs:
            stop_pid(proc)
        netns.delete(ns)
        shutil.rmtree(tmp, ignore_errors=True)


def test_requests_reach_on_update(lab: Lab) -> None:
    """Requests from several clients: each client's key arrives with the server it got."""
    chosen = {}
    for i in range(50, 54):
        src = f"127.0.0.{i}"
        chosen[src] = lab.get(8080, src)
    assert set(chosen.values()) == {"be1", "be2"}  # round robin spread them
    for src, server in chosen.items():
        key = socket.inet_aton(src)
        got = wait_for(f"update for {src}", lambda key=key: lab.peer.received("web", key))
        assert got[-1].server_name == server and got[-1].server_id == SERVERS[server], got
        assert got[-1].expire_ms is None  # live updates carry no expiry
    assert lab.peer.tables()["web"] == StickTable("web", "ip", 4, 1_800_000)
    stats = wait_for("acks", lambda: (s := lab.peer.stats())["acks_sent"] and s)
    assert stats["updates_received"] >= 4 and stats["bad_messages"] == 0


def test_push_moves_a_client_with_its_expiry(lab: Lab) -> None:
    src = "127.0.0.60"
    first = lab.get(8080, src)
    key = socket.inet_aton(src)
    wait_for("first update", lambda: lab.peer.received("web", key))
    other = OTHER[first]
    before = len(lab.peer.received("web", key))
    lab.peer.push([StickUpdate("web", key, SERVERS[other], other, 45_000)])
    entry = wait_for("pushed entry in show table",
                     lambda: (e := lab.show_table("web").get(src)) and
                     e[1].get("server_key") == other and e)
    exp, data = entry
    assert 40_000 < exp <= 45_000 and data["server_id"] == str(SERVERS[other])
    time.sleep(0.5)
    assert len(lab.peer.received("web", key)) == before  # HAProxy does not echo our push
    assert lab.get(8080, src) == other
    assert lab.get(8080, src) == other
    stats = lab.peer.stats()
    assert stats["updates_pushed"] >= 1 and stats["acks_received"] >= 1


def test_string_table(lab: Lab) -> None:
    """A header-keyed table (type string len 64): key bytes as sent, both ways."""
    session = "sess 42;x"
    server = lab.get(8082, "127.0.0.70", {"X-Session": session})
    got = wait_for("string key update", lambda: lab.peer.received("web_hdr", session.encode()))
    assert got[-1].server_name == server
    assert lab.peer.tables()["web_hdr"] == StickTable("web_hdr", "string", 65, 1_800_000)
    other = OTHER[server]
    lab.peer.push([StickUpdate("web_hdr", session.encode(), SERVERS[other], other, 45_000),
                   StickUpdate("web_hdr", b"pushed-only", 2, "be2", None)])
    wait_for("pushed string entries",
             lambda: (t := lab.show_table("web_hdr")).get(session, (0, {}))[1].get(
                 "server_key") == other and "pushed-only" in t)
    assert lab.show_table("web_hdr")["pushed-only"][0] > 1_700_000  # None: the table's expire
    assert lab.get(8082, "127.0.0.71", {"X-Session": session}) == other
    assert lab.get(8082, "127.0.0.72", {"X-Session": "pushed-only"}) == "be2"


def test_restart_asks_for_resync_and_reload_keeps_entries(lab: Lab) -> None:
    held = [StickUpdate("web", socket.inet_aton(f"10.77.0.{i}"), 2, "be2", 50_000)
            for i in range(1, 21)]
    with lab.peer.lock:
        lab.peer.held["web"] = held
        lab.peer.held["web_hdr"] = [StickUpdate("web_hdr", b"held-session", 1, "be1", 50_000)]
    served = lab.peer.stats()["resyncs_served"]
    connects = lab.peer.stats()["connects"]
    lab.stop_haproxy()
    lab.start_haproxy()
    wait_for("resync served to the new HAProxy",
             lambda: lab.peer.stats()["resyncs_served"] > served)
    table = wait_for("held entries in the new HAProxy",
                     lambda: (t := lab.show_table("web")) and
                     sum(k.startswith("10.77.0.") for k in t) == 20 and t)
    for i in range(1, 21):
        exp, data = table[f"10.77.0.{i}"]
        assert exp <= 50_000 and data["server_key"] == "be2" and data["server_id"] == "2"
    assert lab.show_table("web_hdr")["held-session"][1]["server_key"] == "be1"
    assert lab.peer.stats()["connects"] > connects

    pid = re.search(r"Pid: (\d+)", lab.cli("show info")).group(1)
    connects = lab.peer.stats()["connects"]
    lab.haproxy.send_signal(signal.SIGUSR2)
    wait_for("a new worker", lambda: (m := re.search(r"Pid: (\d+)", lab.cli("show info")))
             and m.group(1) != pid, 15)
    wait_for("the new worker's session", lambda: lab.peer.stats()["connects"] > connects, 15)
    table = wait_for("entries in the new worker",
                     lambda: (t := lab.show_table("web")) and
                     sum(k.startswith("10.77.0.") for k in t) == 20 and t, 15)
    assert all(table[f"10.77.0.{i}"][1]["server_key"] == "be2" for i in range(1, 21))
