"""HaproxyPeer against Debian's HAProxy 2.6 in a namespace of its own: HAProxy dials the peer,
pushes what its requests store, takes what the peer pushes (server and remaining expiry), asks
the peer for a resync when it starts, and keeps the entries over a master-worker reload.

Everything runs in one throw-away namespace (lo only): two tiny HTTP backends answering their
name, HAProxy (`-W`, master-worker, as Debian's unit runs it), and the peer's event loop in a
thread that entered the namespace. HAProxy is stopped by pid and the namespace deleted after.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import netns
import pytest

from nftsync.l7.haproxy import HaproxyPeer, StickTable, StickUpdate

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None,
                                reason="haproxy not installed (scripts/setup.sh)")

PEER_PORT = 10001
CONFIG = """\
global
    stats socket {tmp}/admin.sock mode 600 level admin
    stats timeout 2m

defaults
    mode http
    timeout connect 2s
    timeout client 10s
    timeout server 10s

peers lab
    peer lb1 127.0.0.1:10000
    peer nftsync 127.0.0.1:{peer_port}

frontend fe_src
    bind 127.0.0.1:8080
    default_backend web

frontend fe_hdr
    bind 127.0.0.1:8082
    default_backend web_hdr

backend web
    balance roundrobin
    stick-table type ip size 200k expire 30m store server_id peers lab
    stick on src
    server be1 127.0.0.11:8001 id 1
    server be2 127.0.0.12:8002 id 2

backend web_hdr
    balance roundrobin
    stick-table type string len 64 size 200k expire 30m peers lab
    stick on req.hdr(X-Session)
    server be1 127.0.0.11:8001 id 1
    server be2 127.0.0.12:8002 id 2
"""

BACKEND = """\
import http.server, sys
name, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = name.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer((addr, port), H).serve_forever()
"""
SERVERS = {"be1": 1, "be2": 2}
OTHER = {"be1": "be2", "be2": "be1"}


def wait_for(what: str, check: Callable[[], object], seconds: float = 10.0) -> object:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            got = check()
            if got:
                return got
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {seconds:.0f} s")


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
class Lab:
    ns: str
    tmp: Path
    peer: PeerThread
    haproxy: subprocess.Popen | None = None
    procs: list[subprocess.Popen] = field(default_factory=list)

    def start_haproxy(self) -> None:
        log = open(self.tmp / "haproxy.log", "a")  # noqa: SIM115 (HAProxy keeps it)
        # `ip netns exec` execs HAProxy: this pid is the master's.
        self.haproxy = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, "haproxy", "-W", "-db", "-L", "lb1", "-f",
             str(self.tmp / "haproxy.cfg")], stdout=subprocess.DEVNULL, stderr=log)
        log.close()
        wait_for("HAProxy's admin socket", lambda: "Name: HAProxy" in self.cli("show info"))

    def stop_haproxy(self) -> None:
        if self.haproxy is not None and self.haproxy.poll() is None:
            self.haproxy.send_signal(signal.SIGTERM)
            try:
                self.haproxy.wait(10)
            except subprocess.TimeoutExpired:
                self.haproxy.kill()
                self.haproxy.wait(5)
        self.haproxy = None

    def cli(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(self.tmp / "admin.sock"))
            s.sendall(line.encode() + b"\n")
            chunks = []
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                data = s.recv(65536)
                if not data:
                    break
                chunks.append(data)
            return b"".join(chunks).decode()

    def show_table(self, table: str) -> dict[str, tuple[int, dict[str, str]]]:
        """key -> (exp ms, data) from `show table` (keys unescaped)."""
        out = {}
        for m in re.finditer(r"key=((?:\\.|\S)+) use=\d+ exp=(\d+)(.*)", self.cli(
                f"show table {table}")):
            key = re.sub(r"\\(.)", r"\1", m.group(1))
            out[key] = (int(m.group(2)), dict(kv.split("=", 1) for kv in m.group(3).split()))
        return out

    def get(self, port: int, src: str, headers: dict[str, str] | None = None) -> str:
        """One HTTP request from `src` (a 127/8 address of the namespace): the server's name."""
        with netns.entered(self.ns):
            s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(src, 0))
        with s:
            extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
            s.sendall(f"GET / HTTP/1.0\r\nHost: lab\r\n{extra}\r\n".encode())
            data = b""
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and (chunk := s.recv(4096)):
                data += chunk
        return data.split(b"\r\n\r\n", 1)[1].decode()


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    ns = netns.create("nsl7")
    tmp = Path(tempfile.mkdtemp(prefix="nsl7-"))
    procs: list[subprocess.Popen] = []
    the_lab: Lab | None = None
    try:
        cfg = tmp / "haproxy.cfg"
        cfg.write_text(CONFIG.format(tmp=tmp, peer_port=PEER_PORT))
        check = netns.run(ns, "haproxy", "-c", "-q", "-f", str(cfg), check=False)
        assert check.returncode == 0, check.stderr or check.stdout
        (tmp / "backend.py").write_text(BACKEND)
        for name, addr, port in (("be1", "127.0.0.11", "8001"), ("be2", "127.0.0.12", "8002")):
            procs.append(subprocess.Popen(["ip", "netns", "exec", ns, sys.executable,
                                           str(tmp / "backend.py"), name, addr, port]))
        the_lab = Lab(ns, tmp, PeerThread(ns), procs=procs)
        the_lab.start_haproxy()
        wait_for("HAProxy's session with the peer", lambda: the_lab.peer.stats()["connected"])
        yield the_lab
    finally:
        if the_lab is not None:
            the_lab.stop_haproxy()
            the_lab.peer.stop()
        for proc in procs:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
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
