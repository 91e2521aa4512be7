"""HAProxy stick tables replicated by two nftsync daemons (`[[haproxy]]`), with real HAProxies.

Two namespaces joined by a veth (the sync link). In each: two tiny HTTP backends answering
their name (be1, be2: the same names and ids on both sides), Debian's HAProxy in master-worker
mode (`-W`, as its unit runs it) whose `peers` section lists itself and nftsync on 127.0.0.1,
and an nftsync daemon with the HAProxy declared. Requests from client addresses of namespace A
go through A's HAProxy; the checks read B's HAProxy (`show table` on its admin socket) and send
the same clients through B: they must reach the server they had on A, every one of them. B's
HAProxy is then reloaded and restarted: its tables come back (from its old process, or from
nftsync). The second table sticks on a header (`type string len 64`).

Every process is stopped by pid and both namespaces deleted afterwards, also on failure.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import netns
import pytest
from daemons import DaemonProc, make_key

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None,
                                reason="haproxy not installed (scripts/setup.sh)")

ADDR = {"a": "10.236.0.1", "b": "10.236.0.2"}
LB = {"a": "lb1", "b": "lb2"}
NODE_ID = {"a": 1, "b": 2}
PEER_PORT = 10001
CLIENTS = [f"127.0.1.{i}" for i in range(1, 21)]  # in 127/8: on lo of each namespace
SESSIONS = [f"sess-{i:02d} x" for i in range(1, 13)]  # header keys (a space: any byte goes)
EXPIRE_MS = 1_800_000
FRESH_MS = EXPIRE_MS - 120_000  # "near the table's expire": less than 2 min gone
WAIT = 20.0

HAPROXY_CFG = """\
global
    stats socket {tmp}/admin.sock mode 600 level admin
    stats timeout 2m

defaults
    mode http
    timeout connect 2s
    timeout client 10s
    timeout server 10s

peers nftsync_peers
    peer {lb} 127.0.0.1:10000
    peer nftsync 127.0.0.1:{peer_port}

frontend fe_src
    bind 127.0.0.1:8080
    default_backend web

frontend fe_hdr
    bind 127.0.0.1:8082
    default_backend web_hdr

backend web
    balance roundrobin
    stick-table type ip size 200k expire 30m store server_id peers nftsync_peers
    stick on src
    server be1 127.0.0.11:8001 id 1
    server be2 127.0.0.12:8002 id 2

backend web_hdr
    balance roundrobin
    stick-table type string len 64 size 200k expire 30m peers nftsync_peers
    stick on req.hdr(X-Session)
    server be1 127.0.0.11:8001 id 1
    server be2 127.0.0.12:8002 id 2
"""

NFTSYNC_CFG = """\
key_file = "{key}"

[[haproxy]]
name = "{lb}-haproxy"
admin_socket = "{tmp}/admin.sock"
peer_listen = "127.0.0.1:{peer_port}"
local_peer = "nftsync"
haproxy_peer = "{lb}"
tables = ["web", "web_hdr"]
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


class Daemon(DaemonProc):
    port = 7798
    cluster = "l7"
    start_timeout = 30.0


def wait_for(what: str, check: Callable[[], object], seconds: float = WAIT) -> object:
    deadline = time.monotonic() + seconds
    last: object = None
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            last = check()
            if last:
                return last
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {seconds:.0f} s (last: {last!r})")


@dataclass
class Side:
    """One load balancer: its namespace, HAProxy (master pid) and nftsync daemon."""

    ns: str
    lb: str
    tmp: Path
    daemon: Daemon
    haproxy: subprocess.Popen | None = None
    procs: list[subprocess.Popen] = field(default_factory=list)

    def start_haproxy(self) -> None:
        log = open(self.tmp / "haproxy.log", "a")  # noqa: SIM115 (HAProxy keeps it)
        # `ip netns exec` execs HAProxy: this pid is the master's.
        self.haproxy = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, "haproxy", "-W", "-db", "-L", self.lb, "-f",
             str(self.tmp / "haproxy.cfg")], stdout=subprocess.DEVNULL, stderr=log)
        log.close()
        wait_for(f"{self.lb}: HAProxy's admin socket", lambda: "Name: HAProxy" in
                 self.cli("show info"))

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
            while time.monotonic() < deadline and (data := s.recv(65536)):
                chunks.append(data)
            return b"".join(chunks).decode()

    def table(self, name: str) -> dict[str, tuple[int, str, str]]:
        """HAProxy's own table: key -> (exp ms, server_id, server_key); keys unescaped."""
        out = {}
        for m in re.finditer(r"key=((?:\\.|\S)+) use=\d+ exp=(\d+) server_id=(\S+) "
                             r"server_key=(\S+)", self.cli(f"show table {name}")):
            out[re.sub(r"\\(.)", r"\1", m.group(1))] = (int(m.group(2)), m.group(3), m.group(4))
        return out

    def get(self, port: int, src: str, headers: dict[str, str] | None = None) -> str:
        """One HTTP request from `src` through this HAProxy: the name of the server."""
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

    def haproxy_status(self) -> dict:
        return self.daemon.ctl("status")["haproxy"][0]


@pytest.fixture(scope="module")
def sides() -> Iterator[dict[str, Side]]:
    tmp_root = Path(tempfile.mkdtemp(prefix="l7rep-"))
    made: dict[str, Side] = {}
    try:
        with netns.linked_pair("l7r", ADDR["a"], ADDR["b"]) as names:
            key = make_key(tmp_root)
            for side in ("a", "b"):
                tmp = tmp_root / side
                tmp.mkdir()
                lb = LB[side]
                (tmp / "haproxy.cfg").write_text(HAPROXY_CFG.format(tmp=tmp, lb=lb,
                                                                    peer_port=PEER_PORT))
                check = netns.run(names[side], "haproxy", "-c", "-q", "-f",
                                  str(tmp / "haproxy.cfg"), check=False)
                assert check.returncode == 0, check.stderr or check.stdout
                (tmp / "nftsync.toml").write_text(NFTSYNC_CFG.format(tmp=tmp, lb=lb, key=key,
                                                                     peer_port=PEER_PORT))
                (tmp / "backend.py").write_text(BACKEND)
                other = "b" if side == "a" else "a"
                d = Daemon(names[side], lb, NODE_ID[side], ADDR[side], [ADDR[other]], key, tmp,
                           role="active" if side == "a" else "backup",
                           extra=("--config", str(tmp / "nftsync.toml")))
                s = made[side] = Side(names[side], lb, tmp, d)
                for name, addr, port in (("be1", "127.0.0.11", "8001"),
                                         ("be2", "127.0.0.12", "8002")):
                    s.procs.append(subprocess.Popen(
                        ["ip", "netns", "exec", names[side], sys.executable,
                         str(tmp / "backend.py"), name, addr, port]))
            for s in made.values():
                s.daemon.start()  # listening for HAProxy before it starts
            for s in made.values():
                s.start_haproxy()
            for s in made.values():
                wait_for(f"{s.lb}: HAProxy connected to nftsync",
                         lambda s=s: s.haproxy_status()["connected"])
                wait_for(f"{s.lb}: peer up", lambda s=s: s.daemon.peers_up() >= 1)
            try:
                yield made
            finally:
                for s in made.values():
                    s.stop_haproxy()
                    s.daemon.stop()
                    for proc in s.procs:
                        proc.terminate()
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            proc.wait(5)
    finally:
        for s in made.values():  # when setting up failed half-way
            s.stop_haproxy()
            s.daemon.stop()
            for proc in s.procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(5)
        shutil.rmtree(tmp_root, ignore_errors=True)


def same_entries(src: dict, dst: dict, keys: list[str]) -> bool:
    """Every key of `keys` in `dst` with the server (id and name) it has in `src`, and an
    expiry near the table's (a copy, not a fresh full `expire` nor an old one)."""
    return all(k in dst and dst[k][1:] == src[k][1:] and dst[k][0] >= FRESH_MS for k in keys)


def test_src_table_replicates_and_routes_b_like_a(sides: dict[str, Side]) -> None:
    a, b = sides["a"], sides["b"]
    on_a = {src: a.get(8080, src) for src in CLIENTS}
    assert set(on_a.values()) == {"be1", "be2"}  # round robin spread them: a real test
    table_a = a.table("web")
    assert {k: v[2] for k, v in table_a.items() if k in on_a} == on_a
    wait_for("A's entries in B's HAProxy",
             lambda: same_entries(table_a, b.table("web"), CLIENTS))
    # The same clients through B: the server they had on A, every one (B's round robin alone
    # would send about half of them elsewhere).
    on_b = {src: b.get(8080, src) for src in CLIENTS}
    assert on_b == on_a
    shown = b.daemon.ctl("show", "--farm", "haproxy/web")
    rows = shown["farms"]["haproxy/web"]["stick table"]["entries"]
    assert {r["client"]: r["backend"] for r in rows if r["client"] in on_a} == on_a
    # `sessions list` reads HAProxy's own table (its admin socket, from [[haproxy]]).
    listed = json.loads(subprocess.run(
        [sys.executable, "-m", "nftsync", "sessions", "list", "--farm", "haproxy/web",
         "--config", str(b.tmp / "nftsync.toml"), "--json"], capture_output=True, text=True,
        check=True, timeout=30).stdout)
    assert {r["client"]: r["backend"] for r in listed if r["client"] in on_a} == on_a
    unknown = subprocess.run([sys.executable, "-m", "nftsync", "sessions", "list", "--farm",
                              "haproxy/nope", "--config", str(b.tmp / "nftsync.toml")],
                             capture_output=True, text=True, timeout=30)
    assert unknown.returncode == 2 and "haproxy/web" in unknown.stderr, unknown.stderr


def test_header_table_replicates(sides: dict[str, Side]) -> None:
    a, b = sides["a"], sides["b"]
    on_a = {sess: a.get(8082, CLIENTS[0], {"X-Session": sess}) for sess in SESSIONS}
    assert set(on_a.values()) == {"be1", "be2"}
    table_a = a.table("web_hdr")
    wait_for("A's header entries in B's HAProxy",
             lambda: same_entries(table_a, b.table("web_hdr"), SESSIONS))
    on_b = {sess: b.get(8082, CLIENTS[1], {"X-Session": sess}) for sess in SESSIONS}
    assert on_b == on_a


def test_reload_and_restart_of_b_keep_its_tables(sides: dict[str, Side]) -> None:
    a, b = sides["a"], sides["b"]
    on_a = {src: a.get(8080, src) for src in CLIENTS}
    hdr = {sess: a.get(8082, CLIENTS[2], {"X-Session": sess}) for sess in SESSIONS}
    wait_for("entries on B", lambda: same_entries(a.table("web"), b.table("web"), CLIENTS))
    wait_for("header entries on B",
             lambda: same_entries(a.table("web_hdr"), b.table("web_hdr"), SESSIONS))
    # A reload (master-worker, SIGUSR2): the new worker learns from the old one or nftsync.
    assert b.haproxy is not None
    pid_before = b.haproxy_status().get("haproxy_pid")
    b.haproxy.send_signal(signal.SIGUSR2)
    wait_for("B's new worker connected to nftsync",
             lambda: (st := b.haproxy_status())["connected"] and
             st.get("haproxy_pid") != pid_before)
    wait_for("B's table after the reload",
             lambda: same_entries(a.table("web"), b.table("web"), CLIENTS))
    # A restart: HAProxy starts empty (no old process to teach it): only nftsync has it all.
    before = b.daemon.ctl("stats")["haproxy"][f"{b.lb}-haproxy"]["counters"]["resync_entries"]
    b.stop_haproxy()
    b.start_haproxy()
    wait_for("B's table after the restart, from nftsync",
             lambda: same_entries(a.table("web"), b.table("web"), CLIENTS))
    wait_for("B's header table after the restart",
             lambda: same_entries(a.table("web_hdr"), b.table("web_hdr"), SESSIONS))
    assert {src: b.get(8080, src) for src in CLIENTS} == on_a
    assert {s: b.get(8082, CLIENTS[3], {"X-Session": s}) for s in SESSIONS} == hdr
    stats = b.daemon.ctl("stats")["haproxy"][f"{b.lb}-haproxy"]
    assert stats["counters"]["resync_entries"] - before >= len(CLIENTS) + len(SESSIONS)
    assert stats["peer"]["bad_messages"] == 0
