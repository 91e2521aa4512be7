"""The L7 promise behind keepalived: HAProxy's sticky clients keep their server across a failover.

The lab cluster of test_failover.py (real keepalived, lb1 active, lb2 backup, VIP 10.10.0.100)
with, on both load balancers, Debian's HAProxy in HTTP mode on the VIP's ports 8080 (`stick on
src`, table `web`) and 8082 (`stick on req.hdr(X-Session)`, table `web_hdr`), servers be1/be2
(the lab's backends, port 80) with the same names and ids on both nodes, and a `peers` section
listing only HAProxy itself and its local nftsync. The nftsync daemons declare that HAProxy
(`[[haproxy]]`): the two HAProxies never talk to each other, nftsync carries their tables over
the sync link. The L4 farm (ports 80 and 7000) is left as the cluster fixture installs it.

Checks read HAProxy's own tables (`show table` on its admin socket) and the server each client
reaches through the VIP. HAProxy is stopped by pid (its master), also on failure.
"""

from __future__ import annotations

import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import netns
import pytest
from daemons import DaemonProc, make_key, wait_for
from ha import Ha
from haproxy_lab import HDR, SRC, check_config, haproxy_config, nftsync_config
from helpers import nftsync, reset_node
from lab import VIP4, Lab
from test_failover import (
    NODES,
    Cluster,
    assert_same_backend,
    clients,
    fo_lab,  # noqa: F401 (the module's lab, a fixture)
    links_up,
    tear_down,
    unsteer,
)
from test_l7_replication import Side

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None,
                                reason="haproxy not installed (scripts/setup.sh)")

SRC_PORT, HDR_PORT = SRC.port, HDR.port
LAB_SERVERS = (("be1", "10.20.0.11", 80), ("be2", "10.20.0.12", 80))  # the lab's backends
BACKENDS = {"be1", "be2"}
SESSIONS = [f"user-{i:03d}" for i in range(1, 41)]  # X-Session values (table web_hdr)


def lab_haproxy_cfg(tmp: Path, lb: str) -> str:
    """The L7 tests' HAProxy configuration (haproxy_lab) moved onto the lab: listening on every
    address (the VIP comes and goes), the lab's backends on port 80."""
    return haproxy_config(tmp, lb, bind="", servers=LAB_SERVERS)


@dataclass
class L7Cluster(Cluster):
    """The keepalived cluster whose daemons also replicate their HAProxy's tables."""

    tmp: Path = Path()
    haproxy: dict[str, Side] = field(default_factory=dict)

    def daemon(self, node: str, role: str = "backup") -> DaemonProc:
        d = super().daemon(node, role)
        d.extra = ("--config", str(self.tmp / node / "nftsync.toml"))
        d.start_timeout = 30.0
        return d

    def start_daemon(self, node: str, role: str = "backup") -> DaemonProc:
        d = super().start_daemon(node, role)
        if node in self.haproxy:
            self.haproxy[node].daemon = d  # Side.haproxy_status asks the current daemon
        return d

    def table_has(self, node: str, table: str, want: dict[str, str]) -> bool:
        """`node`'s HAProxy holds every key of `want` with that server (by name)."""
        got = self.haproxy[node].table(table)
        return all(k in got and got[k][2] == srv for k, srv in want.items())

    def wait_connected(self, node: str) -> None:
        side = self.haproxy[node]
        wait_for(lambda: side.haproxy_status()["connected"], 20,
                 f"{node}: HAProxy connected to nftsync")


def served(lab: Lab, sources: list[str]) -> dict[str, str | None]:
    """Each source's server for one request to VIP:8080 (through HAProxy; None: it failed)."""
    return {s: b[0] for s, b in lab.request(port=SRC_PORT, sources=sources, parallel=32).items()}


def hdr_get(lab: Lab, session: str, src: str) -> str | None:
    """One request to VIP:8082 from the client namespace with `X-Session: session`: the
    server's name (None when it failed)."""
    try:
        with netns.entered(lab.ns("client")):
            s = socket.create_connection((VIP4, HDR_PORT), timeout=3, source_address=(src, 0))
        with s:
            s.sendall(f"GET / HTTP/1.0\r\nHost: lab\r\nX-Session: {session}\r\n\r\n".encode())
            data = b""
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and (chunk := s.recv(4096)):
                data += chunk
    except OSError:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    return body.decode().strip() if b" 200 " in head.split(b"\r\n")[0] else None


def served_hdr(lab: Lab, src: str, reverse: bool = False) -> dict[str, str | None]:
    """Each X-Session value's server. `reverse` asks in the other order: a fresh round robin
    asked in the same order would give the same answers without any replication."""
    order = reversed(SESSIONS) if reverse else SESSIONS
    return {sess: hdr_get(lab, sess, src) for sess in order}


def assert_all(got: dict[str, str | None], keys: list[str]) -> None:
    failed = {k: v for k, v in got.items() if v not in BACKENDS}
    assert set(got) == set(keys) and not failed, f"failed: {failed}"
    assert set(got.values()) == BACKENDS, "HAProxy used one server only: the test proves nothing"


@pytest.fixture
def l7(fo_lab: Lab, tmp_path: Path) -> Iterator[L7Cluster]:  # noqa: F811
    lab = fo_lab
    farm = lab.state_dir / "failover-farm.nft"
    for node in NODES:
        reset_node(lab, node)
        nftsync(lab, node, "apply", str(farm))
    unsteer(lab)
    tmp = Path(tempfile.mkdtemp(prefix="l7fo-"))  # short: the admin socket's path
    c = L7Cluster(lab, Ha(lab), make_key(lab.state_dir), tmp=tmp)
    try:
        for node in NODES:
            (tmp / node).mkdir()
            (tmp / node / "haproxy.cfg").write_text(lab_haproxy_cfg(tmp / node, node))
            check_config(lab.ns(node), tmp / node / "haproxy.cfg")
            (tmp / node / "nftsync.toml").write_text(nftsync_config(tmp / node, node, c.key))
        for node in NODES:
            d = c.start_daemon(node, "backup")
            c.haproxy[node] = Side(lab.ns(node), node, tmp / node, d)
        c.wait_peers()
        for node in NODES:
            c.haproxy[node].start_haproxy()
        for node in NODES:
            c.wait_connected(node)
        c.ha.up()
        c.ha.wait_notified("lb1", "MASTER")
        c.ha.wait_notified("lb2", "BACKUP")
        c.wait_role("lb1", "active")
        yield c
    finally:
        try:
            for side in c.haproxy.values():
                side.stop_haproxy()
            for node in NODES:
                log = tmp / node / "haproxy.log"
                if log.exists():
                    (tmp_path / f"{node}-haproxy.log").write_bytes(log.read_bytes())
        finally:
            tear_down(c, lab, tmp_path)
            shutil.rmtree(tmp, ignore_errors=True)


def fill_and_replicate(c: L7Cluster, sources: list[str]) -> tuple[dict, dict]:
    """Traffic through the VIP (lb1) for both frontends; wait until lb2's HAProxy holds every
    entry with the same server. Returns what each client and session got."""
    before = served(c.lab, sources)
    assert_all(before, sources)
    hdr = served_hdr(c.lab, sources[0])
    assert_all(hdr, SESSIONS)
    assert c.table_has("lb1", "web", before), "the requests did not go through lb1's HAProxy"
    wait_for(lambda: c.table_has("lb2", "web", before), 20,
             f"{len(before)} src entries in lb2's HAProxy, same servers")
    wait_for(lambda: c.table_has("lb2", "web_hdr", hdr), 20,
             f"{len(hdr)} header entries in lb2's HAProxy, same servers")
    return before, hdr


# --- (a) a crash of the active node ---------------------------------------------------------
def test_100_clients_keep_their_server_when_the_active_node_crashes(l7: L7Cluster) -> None:
    sources = clients(1, 100)
    before, hdr = fill_and_replicate(l7, sources)
    took = l7.ha.timed_move("kill", "lb1")  # every process of lb1 SIGKILLed, HAProxy included
    print(f"\nVIP on lb2 alone {took * 1000:.0f} ms after `ha.sh kill lb1` started")
    l7.ha.wait_notified("lb2", "MASTER")
    after = served(l7.lab, sources[::-1])
    assert_same_backend(before, after)
    hdr_after = served_hdr(l7.lab, sources[-1], reverse=True)
    assert_same_backend(hdr, hdr_after)


# --- (b) a reload on the active node -------------------------------------------------------
def test_reload_on_the_active_node_keeps_its_sessions(l7: L7Cluster) -> None:
    sources = clients(101, 160)
    before, hdr = fill_and_replicate(l7, sources)
    side = l7.haproxy["lb1"]
    count = {t: len(side.table(t)) for t in ("web", "web_hdr")}
    pid = side.haproxy_status().get("haproxy_pid")
    assert side.haproxy is not None
    side.haproxy.send_signal(signal.SIGUSR2)  # master-worker reload
    wait_for(lambda: (st := side.haproxy_status())["connected"] and st.get("haproxy_pid") != pid,
             20, "lb1's new worker connected to nftsync")
    after_count = {t: len(side.table(t)) for t in ("web", "web_hdr")}
    print(f"\nlb1's tables before/after the reload: {count} / {after_count}")
    assert after_count == count
    assert_same_backend(before, served(l7.lab, sources[::-1]))
    assert_same_backend(hdr, served_hdr(l7.lab, sources[1], reverse=True))
    # The new worker's session with nftsync replicates: new clients reach lb2's HAProxy.
    fresh = served(l7.lab, clients(241, 250))
    wait_for(lambda: l7.table_has("lb2", "web", fresh), 20,
             "clients made after the reload in lb2's HAProxy")


# --- (c) failback -----------------------------------------------------------------------------
def test_failback_keeps_the_sessions_made_on_the_backup(l7: L7Cluster) -> None:
    lab, ha = l7.lab, l7.ha
    old, new = clients(161, 200), clients(201, 240)
    before, hdr = fill_and_replicate(l7, old)
    ha.timed_move("kill", "lb1")
    ha.wait_notified("lb2", "MASTER")
    l7.wait_role("lb2", "active")
    l7.haproxy["lb1"].stop_haproxy()  # reaps the killed master
    # lb2 alone: new clients get servers there (in lb2's HAProxy and its nftsync only).
    got = served(lab, new)
    assert_all(got, new)
    before.update(got)
    assert_same_backend({s: before[s] for s in old}, served(lab, old[::-1]))

    # lb1 comes back: network, nftsync (resyncs from lb2), an empty HAProxy (asks nftsync).
    links_up(lab, "lb1")
    l7.start_daemon("lb1", "backup")
    l7.wait_peers()
    l7.haproxy["lb1"].start_haproxy()
    l7.wait_connected("lb1")
    wait_for(lambda: l7.table_has("lb1", "web", before), 30,
             "old and new clients in lb1's restarted HAProxy")
    wait_for(lambda: l7.table_has("lb1", "web_hdr", hdr), 30, "header entries in lb1's HAProxy")
    masters = sum(c.state == "MASTER" for c in ha.notify_calls("lb1"))
    ha.start("lb1")
    took = ha.timed_move("stop", "lb2")
    print(f"\nfailback: VIP on lb1 {took * 1000:.0f} ms after stopping keepalived on lb2")
    ha.wait_notified("lb1", "MASTER", count=masters + 1)
    assert_same_backend(before, served(lab, (old + new)[::-1]))
    assert_same_backend(hdr, served_hdr(lab, old[0], reverse=True))

