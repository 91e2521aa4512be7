"""Replicated state is never lost (issue 9, reproduction 1 and its relatives), on the real kernel.

The promise: a node that crashes, reboots or restarts its daemon never makes its peers delete
anything, and gets back what it lost; a delete seen live does not come back when a node returns.
Each test builds the state through the kernel (`nft add element`, `conntrack -R`, real clients
through keepalived's VIP), breaks one node the way a reboot or a kill -9 does, and then reads the
kernels of *every* node (`nft -j list map`, `conntrack -L`), several times over a few seconds,
because a sweep that wipes the serving node happens a moment after the rejoin, not at once.

Sessions are made with explicit `expires` far below the maps' timeouts (600 s), so nothing here
can disappear by expiry during a test, however slow the machine.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import netns
import pytest
from daemons import SYNC4, DaemonProc, make_key, wait_for
from ha import Ha
from helpers import RULESETS, nftsync, reset_node
from lab import STREAM_PORT, Lab, client4
from test_failover import (
    Cluster,
    LineStream,
    assert_all_served,
    assert_same_backend,
    links_up,
    served,
    stream_entries,
    tear_down,
    unsteer,
)

from nftsync.daemon import control

BIG_TABLE, BIG_MAP = "nftsync_big", "big_sessions"  # rulesets/large.nft: 1M sessions, 600 s
HTTP_TABLE, HTTP_MAP = "nftsync_http", "http_sessions"  # farm-http.nft, made to last 600 s
MARKS = (0x200, 0x201)
BACKEND_OF = {0x200: "10.20.0.11", 0x201: "10.20.0.12"}
CLIENTS = 60  # the lab's client addresses: 50 sticky clients and the stream's
STABLE_CHECKS = 6  # the serving node is read this many times after a rejoin...
STABLE_GAP_S = 1.0  # ...this far apart


# --- state made through the kernel ---------------------------------------------------------------
def addresses(second: int, n: int, first: int = 1) -> list[str]:
    """n client addresses 10.<second>.x.y (x.y counting from `first`), outside the lab's 10.10/16,
    so they never meet a real client of the lab."""
    return [f"10.{second + (i >> 16)}.{(i >> 8) & 255}.{i & 255}" for i in range(first, first + n)]


def mark_of(i: int) -> int:
    return MARKS[i % 2]


def add_sessions(run_nft: Callable[[str], None], table: str, smap: str,
                 sessions: dict[str, int], chunk: int = 10_000) -> None:
    """Add sessions with `nft add element ... expires 500s`, `chunk` per nft command (a handful of
    transactions, as an admin's script would do, not one process per client)."""
    items = list(sessions.items())
    for start in range(0, len(items), chunk):
        elems = ", ".join(f"{k} expires 500s : {m:#x}" for k, m in items[start:start + chunk])
        run_nft(f"add element ip {table} {smap} {{ {elems} }}\n")


def conntrack_file(path: Path, clients: dict[str, int]) -> Path:
    """`conntrack -R` input: one established, DNATed TCP connection per client to the VIP's port
    80, with the farm's mark of its backend (what the farm's rules would have made)."""
    lines = [f"-A -t 600 -u SEEN_REPLY,ASSURED -s {src} -d 10.10.0.100 -r {BACKEND_OF[m]} "
             f"-q {src} -p tcp --sport 40000 --dport 80 --reply-port-src 80 "
             f"--reply-port-dst 40000 --state ESTABLISHED -m {m:#x}" for src, m in clients.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def parse_map(nft_json_text: str) -> dict[str, int]:
    """Client -> mark from `nft -j list map` output."""
    out: dict[str, int] = {}
    for obj in json.loads(nft_json_text)["nftables"]:
        for key, value in obj.get("map", {}).get("elem", []):
            if isinstance(key, dict):
                key = key["elem"]["val"]
            out[str(key)] = value
    return out


CT_LINE = re.compile(r"src=(\S+) .*?dport=80 .*\bmark=(\d+)")


def parse_conntrack(text: str) -> dict[str, int]:
    """Client -> mark of the port-80 connections in `conntrack -L` output."""
    out = {}
    for ln in text.splitlines():
        m = CT_LINE.search(ln)
        if m:
            out[m.group(1)] = int(m.group(2))
    return out


def missing(want: dict[str, int], have: dict[str, int]) -> dict[str, tuple[int, int | None]]:
    """What of `want` is absent from `have` or has another backend: key -> (wanted, found)."""
    return {k: (m, have.get(k)) for k, m in want.items() if have.get(k) != m}


def summary(what: str, want: dict[str, int], have: dict[str, int]) -> str:
    lost = missing(want, have)
    sample = dict(list(lost.items())[:5])
    return f"{what}: {len(want) - len(lost)} of {len(want)} held (e.g. missing/wrong: {sample})"


# --- the pair (lb1 active, lb2 backup) on the big farm --------------------------------------------
@dataclass
class Pair:
    """Daemons on lb1/lb2 of the lab, each restartable in a role of our choice."""

    lab: Lab
    key: Path
    workdir: Path
    daemons: dict[str, DaemonProc] = field(default_factory=dict)

    def start(self, node: str, role: str) -> DaemonProc:
        """(Re)start `node`'s daemon; a previous one is reaped (stopped if it still runs)."""
        old = self.daemons.get(node)
        if old is not None:
            old.stop()
        peer = "lb2" if node == "lb1" else "lb1"
        d = DaemonProc(self.lab.ns(node), node, 1 if node == "lb1" else 2, SYNC4[node],
                       [SYNC4[peer]], self.key, self.workdir, role=role)
        self.daemons[node] = d
        return d.start()

    def kill(self, node: str) -> None:
        """kill -9, as a crash or a power loss does to the daemon."""
        self.daemons[node].stop(signal.SIGKILL)

    def sessions(self, node: str) -> dict[str, int]:
        return parse_map(self.lab.nft(node, "-j", "list", "map", "ip", BIG_TABLE, BIG_MAP))

    def conntrack(self, node: str) -> dict[str, int]:
        return parse_conntrack(self.lab.exec(node, "conntrack", "-L", "-p", "tcp", "--dport",
                                             "80", check=False).stdout)

    def nft_input(self, node: str) -> Callable[[str], None]:
        return lambda text: self.lab.exec(node, "nft", "-f", "-", input=text)

    def reboot_kernel(self, node: str) -> None:
        """What a reboot leaves of the node's state: an empty session map, no connections."""
        self.lab.nft(node, "flush", "map", "ip", BIG_TABLE, BIG_MAP)
        self.lab.exec(node, "conntrack", "-F")

    def health(self, node: str) -> str:
        return self.daemons[node].ctl("status")["health"]


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """This module's lab: 60 clients (50 sticky ones and a stream in the keepalived test)."""
    running = Lab.up(clients=CLIENTS, backends=2)
    try:
        yield running
    finally:
        running.down()


@pytest.fixture
def pair(lab: Lab, tmp_path: Path) -> Iterator[Pair]:
    """rulesets/large.nft on both load balancers, lb1's daemon active, lb2's backup, connected."""
    lab.move_vip("lb1")
    for node in ("lb1", "lb2"):
        reset_node(lab, node)
        nftsync(lab, node, "apply", str(RULESETS / "large.nft"))
    p = Pair(lab, make_key(tmp_path), tmp_path)
    try:
        p.start("lb1", "active")
        p.start("lb2", "backup")
        for node in ("lb1", "lb2"):
            d = p.daemons[node]
            d.wait(lambda d=d: d.peers_up() >= 1, 20, "the peer connected")
        yield p
    finally:
        for d in p.daemons.values():
            d.stop()
        lab.restore_sync()


def wait_converged(what: str, have_all: Callable[[], bool], keeps: Callable[[], None],
                   timeout: float, state: Callable[[], str] | None = None) -> None:
    """Wait (bounded, polling) until `have_all()`; `keeps()` asserts at every poll that the nodes
    that must not lose anything still hold everything, so a wipe fails at once, by name.
    `state()` describes the kernels in the timeout's message."""
    deadline = time.monotonic() + timeout
    while True:
        keeps()
        if have_all():
            return
        if time.monotonic() > deadline:
            seen = f": {state()}" if state is not None else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{seen}")
        time.sleep(0.5)


def stays(keeps: Callable[[], None], checks: int = STABLE_CHECKS,
          gap: float = STABLE_GAP_S) -> None:
    """`keeps()` holds on every one of `checks` reads, `gap` seconds apart (bounded)."""
    for i in range(checks):
        keeps()
        if i + 1 < checks:
            time.sleep(gap)


# --- 1. reproduction 1: the failback wipes the serving node ---------------------------------------
def test_rebooted_active_rejoins_without_wiping_the_serving_node(pair: Pair, tmp_path: Path):
    lab = pair.lab
    admin = {a: mark_of(i) for i, a in enumerate(addresses(11, 5000))}
    conns = {a: mark_of(i) for i, a in enumerate(addresses(12, 2000))}
    add_sessions(pair.nft_input("lb1"), BIG_TABLE, BIG_MAP, admin)
    lab.exec("lb1", "conntrack", "-R", str(conntrack_file(tmp_path / "ct.txt", conns)),
             timeout=120)
    # A farm's connection makes its client's session: 7,000 sessions in all.
    everything = admin | conns
    wait_for(lambda: not missing(everything, pair.sessions("lb2")), 120,
             "lb2 holding the 7,000 sessions", interval=0.5)
    wait_for(lambda: not missing(conns, pair.conntrack("lb2")), 120,
             "lb2 holding the 2,000 connections", interval=0.5)

    # lb1 reboots: the daemon dies with the machine, the kernel comes back empty.
    pair.kill("lb1")
    pair.reboot_kernel("lb1")
    assert pair.sessions("lb1") == {} and pair.conntrack("lb1") == {}
    pair.daemons["lb2"].ctl("promote")
    lab.move_vip("lb2")
    d1 = pair.start("lb1", "backup")
    d1.wait(lambda: d1.peers_up() >= 1, 30, "lb1's link to lb2 up again")

    def lb2_keeps() -> None:
        s, c = pair.sessions("lb2"), pair.conntrack("lb2")
        assert not missing(everything, s) and not missing(conns, c), (
            "the serving node lost state after lb1 rejoined: "
            f"{summary('sessions', everything, s)}; {summary('connections', conns, c)}")

    wait_converged("lb1 to hold every session and connection again",
                   lambda: not missing(everything, pair.sessions("lb1"))
                   and not missing(conns, pair.conntrack("lb1")), lb2_keeps, 120)
    stays(lb2_keeps)
    for node in ("lb1", "lb2"):
        wait_for(lambda node=node: pair.health(node) == "ok", 30, f"health ok on {node}")


# --- 3. a flush made while the daemon was stopped -------------------------------------------------
def test_restart_after_an_offline_flush_loses_nothing(pair: Pair):
    on1 = {a: mark_of(i) for i, a in enumerate(addresses(11, 300))}
    on2 = {a: mark_of(i + 1) for i, a in enumerate(addresses(13, 300))}
    # Sessions of both origins: lb1's, and lb2's (made on the backup, they replicate too).
    add_sessions(pair.nft_input("lb1"), BIG_TABLE, BIG_MAP, on1)
    add_sessions(pair.nft_input("lb2"), BIG_TABLE, BIG_MAP, on2)
    everything = on1 | on2
    for node in ("lb1", "lb2"):
        wait_for(lambda node=node: not missing(everything, pair.sessions(node)), 60,
                 f"{node} holding all 600 sessions", interval=0.5)

    pair.daemons["lb2"].stop()
    nftsync(pair.lab, "lb2", "sessions", "flush")  # no daemon sees it: it cannot travel
    assert pair.sessions("lb2") == {}
    d2 = pair.start("lb2", "backup")
    d2.wait(lambda: d2.peers_up() >= 1, 30, "lb2's link to lb1 up again")

    def lb1_keeps() -> None:
        s = pair.sessions("lb1")
        assert not missing(everything, s), \
            f"lb1 lost sessions when lb2's daemon came back: {summary('lb1', everything, s)}"

    wait_converged("lb2 to get its sessions back",
                   lambda: not missing(everything, pair.sessions("lb2")), lb1_keeps, 60)
    stays(lb1_keeps)
    s2 = pair.sessions("lb2")
    assert not missing(everything, s2), summary("lb2", everything, s2)


# --- 4. kill -9 while a snapshot streams ----------------------------------------------------------
@pytest.mark.slow
def test_kill_during_a_resync_loses_nothing(pair: Pair):
    """lb2 asks for a resync of 100k sessions; lb1's daemon is SIGKILLed while it streams them and
    starts again as `backup`, the role every daemon starts with under keepalived. Its kernel kept
    everything: neither node may lose a session."""
    n = 100_000
    everything = {a: mark_of(i) for i, a in enumerate(addresses(11, n))}
    add_sessions(pair.nft_input("lb1"), BIG_TABLE, BIG_MAP, everything)
    wait_for(lambda: len(pair.sessions("lb2")) >= n, 240, "lb2 holding 100k sessions",
             interval=2)
    assert not missing(everything, pair.sessions("lb2"))

    d1, d2 = pair.daemons["lb1"], pair.daemons["lb2"]
    base = control.call(str(d2.socket), "peers")[0]["received"]
    control.call(str(d2.socket), "resync")
    # In-process control calls (no interpreter start-up per poll): kill as soon as lb2 has
    # received the first chunk of the new snapshot, i.e. while the rest still streams.
    got = wait_for(lambda: control.call(str(d2.socket), "peers")[0]["received"] - base, 60,
                   "the resync snapshot to start arriving on lb2", interval=0.005)
    pair.kill("lb1")
    print(f"\nlb1 killed after lb2 received {got} of the resync's {n} records")
    d1 = pair.start("lb1", "backup")
    d1.wait(lambda: d1.peers_up() >= 1, 30, "lb1's link to lb2 up again")
    d2.wait(lambda: d2.peers_up() >= 1, 30, "lb2's link to lb1 up again")

    def both_keep() -> None:
        for node in ("lb1", "lb2"):
            s = pair.sessions(node)
            assert not missing(everything, s), \
                f"lost after the kill during the resync: {summary(node, everything, s)}"

    # The restarted daemon reads its 100k-element map; give the exchange time to finish, then
    # read both kernels over several seconds (a sweep comes at the end of a snapshot).
    wait_for(lambda: all(p["snapshots_received"] >= 1 for p in d1.ctl("peers")), 120,
             "lb1's daemon to receive lb2's snapshot", interval=1)
    stays(both_keep, checks=10)


# --- 6. a live delete is not resurrected ----------------------------------------------------------
@pytest.mark.parametrize("role", ["backup", "active"])
def test_live_delete_is_not_resurrected_by_a_returning_node(pair: Pair, role: str):
    """lb2's daemon is stopped (its kernel keeps the map); on lb1 a client is deleted with
    `nftsync sessions del`, which lb1's daemon sees live; lb2's daemon starts again (as backup,
    or as active as in an active-active pair): the client is gone on both and stays gone, also
    after a resync both ways."""
    kept = {a: mark_of(i) for i, a in enumerate(addresses(11, 20))}
    gone = "10.11.0.21"
    add_sessions(pair.nft_input("lb1"), BIG_TABLE, BIG_MAP, kept | {gone: 0x201})
    wait_for(lambda: not missing(kept | {gone: 0x201}, pair.sessions("lb2")), 30,
             "lb2 holding the 21 sessions")
    pair.daemons["lb2"].stop()
    nftsync(pair.lab, "lb1", "sessions", "del", gone)
    assert gone not in pair.sessions("lb1") and gone in pair.sessions("lb2")
    d2 = pair.start("lb2", role)
    d2.wait(lambda: d2.peers_up() >= 1, 30, "lb2's link to lb1 up again")
    d1 = pair.daemons["lb1"]
    d1.wait(lambda: d1.peers_up() >= 1, 30, "lb1's link to lb2 up again")

    def keeps() -> None:
        for node in ("lb1", "lb2"):
            s = pair.sessions(node)
            assert not missing(kept, s), summary(node, kept, s)

    def holders() -> list[str]:
        return [node for node in ("lb1", "lb2") if gone in pair.sessions(node)]

    def still_gone() -> None:
        keeps()
        assert not holders(), f"{gone}, deleted live on lb1, is back on {holders()}"

    wait_converged(f"{gone} gone on both nodes", lambda: not holders(), keeps, 30,
                   lambda: f"{gone} still (or again) in the kernel map of {holders()}")
    stays(still_gone)
    d1.ctl("resync")
    d2.ctl("resync")
    stays(still_gone)


# --- 5. one node of a three-node mesh reboots -----------------------------------------------------
MESH = {"n1": "10.40.0.1", "n2": "10.40.0.2", "n3": "10.40.0.3"}


@dataclass
class Mesh:
    spaces: dict[str, str]
    key: Path
    workdir: Path
    farm: Path
    daemons: dict[str, DaemonProc] = field(default_factory=dict)

    def start(self, node: str) -> DaemonProc:
        """(Re)start `node`'s daemon, active like every node of an active-active mesh."""
        old = self.daemons.get(node)
        if old is not None:
            old.stop()
        others = [a for n, a in MESH.items() if n != node]
        d = DaemonProc(self.spaces[node], node, list(MESH).index(node) + 1, MESH[node], others,
                       self.key, self.workdir, role="active")
        self.daemons[node] = d
        return d.start()

    def sessions(self, node: str) -> dict[str, int]:
        return parse_map(netns.run(self.spaces[node], "nft", "-j", "list", "map", "ip",
                                   HTTP_TABLE, HTTP_MAP).stdout)

    def conntrack(self, node: str) -> dict[str, int]:
        return parse_conntrack(netns.run(self.spaces[node], "conntrack", "-L", "-p", "tcp",
                                         "--dport", "80", check=False).stdout)

    def nft_input(self, node: str) -> Callable[[str], None]:
        def run(text: str) -> None:
            netns.run(self.spaces[node], "nft", "-f", "-", input=text)
        return run


def http_farm(path: Path, ports: str = "80") -> Path:
    """farm-http.nft whose sessions last 600 s (so nothing expires during a test), on `ports`."""
    path.write_text((RULESETS / "farm-http.nft").read_text()
                    .replace("tcp dport 80 jump", f"tcp dport {{ {ports} }} jump")
                    .replace("timeout 60s", "timeout 600s"))
    return path


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    """Three namespaces on a bridge of a fourth, the 600 s http farm and an active daemon each,
    all connected to each other. Namespaces and daemons are removed whatever happens."""
    made: list[str] = []
    m = Mesh({}, make_key(tmp_path), tmp_path, http_farm(tmp_path / "farm.nft"))
    try:
        sw = netns.create("ksw")
        made.append(sw)
        sh("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", sw, "link", "set", "br0", "up")
        for i, (node, addr) in enumerate(MESH.items(), 1):
            space = netns.create(f"k{node}")
            made.append(space)
            m.spaces[node] = space
            sh("ip", "link", "add", "eth0", "netns", space, "type", "veth", "peer", "name",
               f"p{i}", "netns", sw)
            sh("ip", "-n", sw, "link", "set", f"p{i}", "master", "br0", "up")
            sh("ip", "-n", space, "addr", "add", f"{addr}/24", "dev", "eth0")
            sh("ip", "-n", space, "link", "set", "eth0", "up")
            netns.run(space, "nft", "-f", str(m.farm))
        for node in MESH:
            m.start(node)
        for d in m.daemons.values():
            d.wait(lambda d=d: d.peers_up() == 2, 30, "two peers up")
        yield m
    finally:
        for d in m.daemons.values():
            d.stop()
        for space in made:
            netns.delete(space)


def test_mesh_node_reboot_loses_nothing_and_gets_everything_back(mesh: Mesh, tmp_path: Path):
    admin: dict[str, int] = {}
    conns: dict[str, dict[str, int]] = {}
    for k, node in enumerate(MESH, 1):
        mine = {a: mark_of(i) for i, a in enumerate(addresses(10 + 2 * k, 300))}
        add_sessions(mesh.nft_input(node), HTTP_TABLE, HTTP_MAP, mine)
        admin |= mine
        conns[node] = {a: mark_of(i) for i, a in enumerate(addresses(11 + 2 * k, 100))}
        load = conntrack_file(tmp_path / f"ct-{node}.txt", conns[node])
        netns.run(mesh.spaces[node], "conntrack", "-R", str(load), timeout=60)
    every_conn = {a: m for c in conns.values() for a, m in c.items()}

    def want_sessions(node: str) -> dict[str, int]:
        # A node's own loaded connections ran no packet through `update @map`, so their
        # sessions exist on the other nodes (learned from the replicated entry) only.
        return admin | {a: m for n, c in conns.items() if n != node for a, m in c.items()}

    def holds(node: str) -> bool:
        return (not missing(want_sessions(node), mesh.sessions(node))
                and not missing(every_conn, mesh.conntrack(node)))

    for node in MESH:
        wait_for(lambda node=node: holds(node), 60, f"{node} holding everything", interval=0.5)

    # n2 reboots: daemon killed, kernel state gone, daemon back (active, as in the mesh).
    mesh.daemons["n2"].stop(signal.SIGKILL)
    netns.run(mesh.spaces["n2"], "nft", "flush", "map", "ip", HTTP_TABLE, HTTP_MAP)
    netns.run(mesh.spaces["n2"], "conntrack", "-F")
    d2 = mesh.start("n2")
    d2.wait(lambda: d2.peers_up() == 2, 30, "n2's links to n1 and n3 up again")

    def others_keep() -> None:
        for node in ("n1", "n3"):
            s, c = mesh.sessions(node), mesh.conntrack(node)
            want = want_sessions(node)
            assert not missing(want, s) and not missing(every_conn, c), (
                f"{node} lost state when n2 rejoined: {summary('sessions', want, s)}; "
                f"{summary('connections', every_conn, c)}")

    # n2 also gets back its own connections' sessions (held by the others): ask for the union
    # of what n1 and n3 should hold, minus nothing.
    everything = admin | {a: m for c in conns.values() for a, m in c.items()}
    wait_converged("n2 to hold every session and connection again",
                   lambda: not missing(everything, mesh.sessions("n2"))
                   and not missing(every_conn, mesh.conntrack("n2")), others_keep, 90)
    stays(others_keep)


# --- 2. reproduction 1 with real traffic through keepalived ---------------------------------------
@pytest.fixture
def cluster(lab: Lab, tmp_path: Path) -> Iterator[Cluster]:
    """keepalived on both load balancers (lb1 MASTER), a daemon each started as backup and set by
    keepalived's notify script, and farm-http on ports 80 and 7000 with 600 s sessions."""
    farm = http_farm(lab.state_dir / "kept-farm.nft", f"80, {STREAM_PORT}")
    lab.move_vip("lb1")
    for node in ("lb1", "lb2"):
        reset_node(lab, node)
        nftsync(lab, node, "apply", str(farm))
    unsteer(lab)
    c = Cluster(lab, Ha(lab), make_key(lab.state_dir))
    try:
        for node in ("lb1", "lb2"):
            c.start_daemon(node, "backup")
        c.wait_peers(30)
        c.ha.up()
        c.ha.wait_notified("lb1", "MASTER", timeout=15)
        c.wait_role("lb1", "active", 15)
        yield c
    finally:
        try:
            tear_down(c, lab, tmp_path)
        finally:
            lab.move_vip("lb1")


def test_failback_keeps_idle_clients_and_a_stream_through_keepalived(cluster: Cluster):
    lab, ha = cluster.lab, cluster.ha
    sticky = [client4(i) for i in range(1, 51)]
    before = served(lab, sticky)
    assert_all_served(before, sticky)
    stream = LineStream(lab, client4(CLIENTS))
    try:
        stream.read_lines(20)

        def fo_sessions(node: str) -> dict[str, int]:
            return parse_map(lab.nft(node, "-j", "list", "map", "ip", HTTP_TABLE, HTTP_MAP))

        want = {s: 0x200 if b == "be1" else 0x201 for s, b in before.items()}
        wait_for(lambda: not missing(want, fo_sessions("lb2")), 30,
                 "the 50 sessions in lb2's kernel")
        wait_for(lambda: stream_entries(lab, "lb2", [stream.source]), 30,
                 "the stream's conntrack entry in lb2's kernel")

        # lb1 crashes (links down, every process killed); keepalived moves the VIP to lb2.
        ha.timed_move("kill", "lb1", timeout=15)
        ha.wait_notified("lb2", "MASTER", timeout=15)
        cluster.wait_role("lb2", "active", 15)
        stream.read_lines(50)
        # lb1 boots: empty kernel, the farm loaded at boot, its daemon (backup), keepalived,
        # which stays BACKUP (nopreempt).
        reset_node(lab, "lb1")
        links_up(lab, "lb1")
        nftsync(lab, "lb1", "apply", str(lab.state_dir / "kept-farm.nft"))
        cluster.start_daemon("lb1", "backup")
        cluster.wait_peers(30)
        ha.start("lb1")
        assert ha.owner() == "lb2"

        def lb2_keeps() -> None:
            s = fo_sessions("lb2")
            entry = stream_entries(lab, "lb2", [stream.source])
            assert not missing(want, s) and entry, (
                f"lb2, serving, lost state after lb1 rejoined: {summary('sessions', want, s)}; "
                f"the stream's conntrack entry {'kept' if entry else 'gone'}")

        wait_converged("lb1 to hold the 50 sessions and the stream's entry again",
                       lambda: not missing(want, fo_sessions("lb1"))
                       and bool(stream_entries(lab, "lb1", [stream.source])), lb2_keeps, 60)
        stays(lb2_keeps)
        assert_same_backend(before, served(lab, sticky))
        # Lines made after the rejoin arrive on the same connection, none missing: the first
        # read takes what queued up meanwhile (one recv of up to 64 KiB), the next are new.
        stream.read_lines(1)
        stream.read_lines(150)
        stream.check()
        lb2_keeps()
    finally:
        stream.close()
