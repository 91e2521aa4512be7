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

import json
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import haproxy_lab
import netns
import pytest
from daemons import DaemonProc, make_key
from haproxy_lab import (
    ReplicaNode,
    start_backends,
    start_replicas,
    stop_pid,
    write_replica_files,
)

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

class Daemon(DaemonProc):
    port = 7798
    cluster = "l7"
    start_timeout = 30.0


def wait_for(what: str, check: Callable[[], object], seconds: float = WAIT) -> object:
    return haproxy_lab.wait_for(what, check, seconds, interval=0.1)


@dataclass
class Side(ReplicaNode):
    """One load balancer: its namespace, HAProxy (master pid) and nftsync daemon."""

    start_seconds: ClassVar[float] = WAIT

    def table(self, name: str) -> dict[str, tuple[int, str, str]]:
        """HAProxy's own table: key -> (exp ms, server_id, server_key); keys unescaped."""
        return {k: (exp, d["server_id"], d["server_key"])
                for k, (exp, d) in self.show_table(name).items()
                if "server_id" in d and "server_key" in d}


@pytest.fixture(scope="module")
def sides() -> Iterator[dict[str, Side]]:
    tmp_root = Path(tempfile.mkdtemp(prefix="l7rep-"))
    made: dict[str, Side] = {}
    try:
        with netns.linked_pair("l7r", ADDR["a"], ADDR["b"]) as names:
            key = make_key(tmp_root)
            for side in ("a", "b"):
                tmp, lb = tmp_root / side, LB[side]
                toml = write_replica_files(names[side], tmp, lb, key)
                other = "b" if side == "a" else "a"
                d = Daemon(names[side], lb, NODE_ID[side], ADDR[side], [ADDR[other]], key, tmp,
                           role="active" if side == "a" else "backup",
                           extra=("--config", str(toml)))
                s = made[side] = Side(names[side], lb, tmp, d)
                s.procs += start_backends(names[side], tmp)
            start_replicas(list(made.values()), WAIT, 0.1)
            try:
                yield made
            finally:
                for s in made.values():
                    s.stop_haproxy()
                    s.daemon.stop()
                    for proc in s.procs:
                        stop_pid(proc)
    finally:
        for s in made.values():  # when setting up failed half-way
            s.stop_haproxy()
            s.daemon.stop()
            for proc in s.procs:
                stop_pid(proc)
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
