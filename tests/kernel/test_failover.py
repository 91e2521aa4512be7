"""The promise, end to end: when the active load balancer dies, no client notices.

Real keepalived (netns-lab/ha.sh) decides who holds the VIP; real `nftsync daemon`s on lb1 and lb2
replicate sessions and conntrack entries over the sync link and are promoted/demoted by
keepalived's notify script; real clients send real traffic through the VIP. Every check reads the
kernel (`nft -j list map`, `conntrack -L`, `ip -j addr`) or the packets the clients got.

One lab per module (prefix "fo…", 250 client addresses). Each test gets a fresh cluster from the
`cluster` fixture: the farm (tcp/80 and the stream port 7000) re-applied on empty kernels, both
daemons started as `backup` (keepalived's notify promotes lb1), keepalived up. Teardown stops the
daemons and keepalived by pid, whatever the test did.

Traffic can be sent to a given node, VIP or not, by pinning the client's neighbour entry for the
VIP and the backends' entry for their gateway to that node's MAC (`steer`): the farm DNATs in
prerouting, so a node that does not hold the VIP forwards it all the same. That is how the split
brain and the partitioned backup get traffic of their own.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import netns
import pytest
from daemons import SYNC4, DaemonProc, make_key, wait_for
from ha import Ha
from helpers import RULESETS, map_elements, nftsync, reset_node
from lab import GW4, STREAM_PORT, VIP4, Lab, LabError, client4, lab_sh

NODES = ("lb1", "lb2")
PEER = {"lb1": "lb2", "lb2": "lb1"}
NODE_ID = {"lb1": 1, "lb2": 2}
MARKS = {"be1": 0x200, "be2": 0x201}
BACKENDS = set(MARKS)
TABLE, SESSIONS = "nftsync_http", "http_sessions"
CLIENTS = 250


def lab_prefix() -> str:
    """"fo…": this module's labs, told apart from other suites' at a glance."""
    return "fo" + uuid.uuid4().hex[:6]


def clients(lo: int, hi: int) -> list[str]:
    """Client addresses lo..hi (inclusive)."""
    return [client4(i) for i in range(lo, hi + 1)]


@pytest.fixture(scope="module")
def fo_lab() -> Iterator[Lab]:
    running = Lab.up(prefix=lab_prefix(), clients=CLIENTS, backends=2)
    try:
        farm = running.state_dir / "failover-farm.nft"
        farm.write_text((RULESETS / "farm-http.nft").read_text()
                        .replace("tcp dport 80 jump", f"tcp dport {{ 80, {STREAM_PORT} }} jump"))
        yield running
    finally:
        running.down()


# --- the cluster: farm + daemons + keepalived ---------------------------------------------------
@dataclass
class Cluster:
    lab: Lab
    ha: Ha
    key: Path
    daemons: dict[str, DaemonProc] = field(default_factory=dict)

    def daemon(self, node: str, role: str = "backup") -> DaemonProc:
        """A daemon for `node` whose control socket is where ha.sh's notify script looks."""
        return DaemonProc(self.lab.ns(node), node, NODE_ID[node], SYNC4[node], [SYNC4[PEER[node]]],
                          self.key, self.lab.state_dir, role=role)

    def start_daemon(self, node: str, role: str = "backup") -> DaemonProc:
        """Start (or restart after a crash) `node`'s daemon and wait until it answers as itself.

        After a crash the old control socket is still on disk: `DaemonProc.start` sees a file at
        once, so wait for *this* process's pid in `ctl status`."""
        old = self.daemons.get(node)
        if old is not None:
            old.stop()  # reaps a SIGKILLed one; stops a live one
        d = self.daemon(node, role)
        self.daemons[node] = d
        d.start()
        d.wait(lambda: (ctl_status(d) or {}).get("pid") == d.proc.pid, 15,
               "ctl status from the new daemon")
        return d

    def role(self, node: str) -> str:
        return self.daemons[node].ctl("status")["role"]

    def wait_role(self, node: str, role: str, timeout: float = 10) -> None:
        wait_for(lambda: self.role(node) == role, timeout, f"{node}'s daemon {role}")

    def wait_peers(self, timeout: float = 20) -> None:
        for node in NODES:
            d = self.daemons[node]
            d.wait(lambda d=d: d.peers_up() >= 1, timeout, "peer connected")

    def stop(self) -> None:
        for d in self.daemons.values():
            d.stop()


def ctl_status(d: DaemonProc) -> dict | None:
    """`nftsync ctl status --json`, or None while no daemon answers on the socket (exit 3)."""
    p = subprocess.run([sys.executable, "-m", "nftsync", "ctl", "--socket", str(d.socket),
                        "status", "--json"], capture_output=True, text=True, timeout=30,
                       check=False)
    if p.returncode == 3 or not p.stdout.strip():
        return None
    return json.loads(p.stdout)


def calls(ha: Ha, node: str, state: str) -> int:
    """How many times keepalived has run `node`'s notify script with `state` (since `up`)."""
    return sum(c.state == state for c in ha.notify_calls(node))


def keep_logs(lab: Lab, into: Path) -> None:
    """Copy keepalived's, the notify script's and the daemons' logs out of the lab's state dir
    (which `down` deletes) into the test's tmp_path, for a post-mortem."""
    into.mkdir(exist_ok=True)
    for f in [*lab.state_dir.glob("lb?.log"), *(lab.state_dir / "ha").glob("*.log")]:
        (into / f"{f.parent.name}-{f.name}").write_bytes(f.read_bytes())


@pytest.fixture
def cluster(fo_lab: Lab, tmp_path: Path) -> Iterator[Cluster]:
    lab = fo_lab
    farm = lab.state_dir / "failover-farm.nft"
    for node in NODES:
        reset_node(lab, node)
        nftsync(lab, node, "apply", str(farm))
    unsteer(lab)
    c = Cluster(lab, Ha(lab), make_key(lab.state_dir))
    try:
        for node in NODES:
            c.start_daemon(node, "backup")
        c.wait_peers()
        c.ha.up()
        # keepalived, not the test, makes lb1 active: BACKUP (demote) then MASTER (promote).
        c.ha.wait_notified("lb1", "MASTER")
        c.ha.wait_notified("lb2", "BACKUP")
        c.wait_role("lb1", "active")
        assert c.role("lb2") == "backup"
        assert c.ha.notify_calls("lb1")[-1].outcome.startswith("ok"), c.ha.notify_calls("lb1")
        yield c
    finally:
        tear_down(c, lab, tmp_path)


def tear_down(c: Cluster, lab: Lab, tmp_path: Path) -> None:
    """Keep the logs, stop the daemons and keepalived, give the lab back its routes and link,
    whatever fails on the way."""
    try:
        keep_logs(lab, tmp_path / "logs")
        c.stop()
    finally:
        try:
            c.ha.down()
        finally:
            unsteer(lab)
            lab.restore_sync()


# --- kernel views -------------------------------------------------------------------------------
def sessions(lab: Lab, node: str) -> dict[str, int]:
    """Client -> mark, from the node's kernel session map."""
    return {k: v["mark"] for k, v in map_elements(lab, node, "ip", TABLE, SESSIONS).items()}


def converged(lab: Lab) -> dict[str, int] | None:
    """lb1's session map when lb2's holds the same keys with the same marks, else None."""
    a, b = sessions(lab, "lb1"), sessions(lab, "lb2")
    return a if a == b and a else None


def stream_entries(lab: Lab, node: str, sources: list[str]) -> set[str]:
    """Sources of ESTABLISHED port-7000 conntrack entries in the node's kernel."""
    out = lab.exec(node, "conntrack", "-L", "-p", "tcp", "--dport", str(STREAM_PORT),
                   check=False).stdout
    return {src for src in sources for ln in out.splitlines()
            if "ESTABLISHED" in ln and f"src={src} " in ln}


def served(lab: Lab, sources: list[str]) -> dict[str, str | None]:
    """Each source's backend for one new connection through the VIP (None: it failed)."""
    return {src: b[0] for src, b in lab.request(port=80, sources=sources, parallel=32).items()}


def assert_all_served(got: dict[str, str | None], sources: list[str]) -> None:
    failed = {s: b for s, b in got.items() if b not in BACKENDS}
    assert set(got) == set(sources) and not failed, f"failed: {failed}"


def assert_same_backend(before: dict[str, str | None], after: dict[str, str | None]) -> None:
    moved = {s: (before[s], after.get(s)) for s in before if after.get(s) != before[s]}
    kept = len(before) - len(moved)
    print(f"clients on the same backend: {kept}/{len(before)}")
    assert not moved, f"{len(moved)} clients changed backend (before, after): {moved}"


# --- steering traffic to one node (L2), for split brain and the partitioned backup -------------
def mac(lab: Lab, node: str, dev: str) -> str:
    return json.loads(lab.exec(node, "ip", "-j", "link", "show", "dev", dev).stdout)[0]["address"]


def steer(lab: Lab, node: str) -> None:
    """Send the client's VIP traffic and the backends' replies through `node`, whatever keepalived
    says: permanent neighbour entries (gratuitous ARP cannot override them)."""
    lab.exec("client", "ip", "neigh", "replace", VIP4, "lladdr", mac(lab, node, "front"),
             "dev", "front", "nud", "permanent")
    for be in lab.backend_names:
        lab.exec(be, "ip", "neigh", "replace", GW4, "lladdr", mac(lab, node, "back"),
                 "dev", "back", "nud", "permanent")


def unsteer(lab: Lab) -> None:
    """Drop every neighbour entry for the VIP / gateway (pinned or learnt): re-resolved on the next
    packet, so only the node that holds the address now answers."""
    lab.exec("client", "ip", "neigh", "flush", "to", VIP4, "dev", "front", "nud", "all",
             check=False)
    for be in lab.backend_names:
        lab.exec(be, "ip", "neigh", "flush", "to", GW4, "dev", "back", "nud", "all", check=False)


# --- a stream read by the test itself -----------------------------------------------------------
class LineStream:
    """A connection to the backends' line server (port 7000) opened in the client namespace, read
    by the test, so it can prove lines keep coming *after* a failover and none is missing."""

    def __init__(self, lab: Lab, source: str):
        with netns.entered(lab.ns("client")):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.source = source
        self.sock.bind((source, 0))
        self.sock.settimeout(5)
        self.sock.connect((VIP4, STREAM_PORT))
        self.buf = b""
        self.backends: set[str] = set()
        self.numbers: list[int] = []

    def read_lines(self, count: int, timeout: float = 15) -> int:
        """Read at least `count` more lines (bounded); reset/EOF raise. Returns lines read."""
        deadline = time.monotonic() + timeout
        got = 0
        while got < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"stream {self.source}: only {got}/{count} lines in "
                                     f"{timeout} s (last number {self.numbers[-1:]})")
            self.sock.settimeout(min(left, 1.0))
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                raise AssertionError(f"stream {self.source}: closed by the peer (EOF)")
            self.buf += chunk
            *lines, self.buf = self.buf.split(b"\n")
            for ln in lines:
                name, n = ln.decode().split()
                self.backends.add(name)
                self.numbers.append(int(n))
                got += 1
        return got

    def check(self) -> None:
        """One backend, numbers consecutive from the first: nothing missing, nothing repeated."""
        first = self.numbers[0]
        assert self.numbers == list(range(first, first + len(self.numbers))), \
            f"stream {self.source}: gaps or disorder in {self.numbers}"
        assert len(self.backends) == 1, f"stream {self.source}: backends {self.backends}"

    def close(self) -> None:
        self.sock.close()


# --- 1. many sticky clients across a crash -------------------------------------------------------
def test_200_clients_keep_their_backend_when_the_active_node_crashes(cluster: Cluster):
    lab, ha = cluster.lab, cluster.ha
    sources = clients(1, 200)
    before = served(lab, sources)
    assert_all_served(before, sources)
    assert set(before.values()) == BACKENDS, "the scheduler used one backend only"
    assert set(sessions(lab, "lb1")) >= set(sources), "traffic did not go through lb1"
    want = {s: MARKS[b] for s, b in before.items()}
    wait_for(lambda: all(sessions(lab, "lb2").get(s) == m for s, m in want.items()), 20,
             "200 sessions replicated into lb2's kernel map")

    took = ha.timed_move("kill", "lb1")
    # timed_move includes ha.sh kill's reaping (lb1 lists the VIP until then); the network-side
    # move time is what benchmarks/bench_failover.py measures.
    print(f"\nVIP on lb2 alone {took * 1000:.0f} ms after `ha.sh kill lb1` started")
    assert ha.owner() == "lb2"
    # keepalived told lb2's daemon it is the active node now.
    ha.wait_notified("lb2", "MASTER")
    last = ha.notify_calls("lb2")[-1]
    assert (last.action, last.outcome[:2]) == ("promote", "ok"), ha.notify_calls("lb2")
    assert cluster.role("lb2") == "active"

    after = served(lab, sources)
    assert_same_backend(before, after)
    assert all(sessions(lab, "lb2")[s] == m for s, m in want.items())


# --- 2. established connections across a crash --------------------------------------------------
def test_established_connections_survive_the_crash(cluster: Cluster):
    lab, ha = cluster.lab, cluster.ha
    sources = clients(241, 243)
    summary = lab.stream(source=client4(244), seconds=10)
    streams = [LineStream(lab, s) for s in sources]
    try:
        for st in streams:
            st.read_lines(10)
        wait_for(lambda: stream_entries(lab, "lb2", [*sources, client4(244)])
                 == {*sources, client4(244)}, 15, "the streams' conntrack entries on lb2")
        took = ha.timed_move("kill", "lb1")
        print(f"\nVIP move after the crash of lb1: {took * 1000:.0f} ms")
        ha.wait_notified("lb2", "MASTER")
        # Lines numbered after the crash arrive through lb2, on the same connections.
        for st in streams:
            st.read_lines(100)
            st.check()
        print("streams: " + ", ".join(f"{st.source} {len(st.numbers)} lines from "
                                      f"{st.backends}" for st in streams))
    finally:
        for st in streams:
            st.close()
    rep = summary.result(timeout=30)
    print(f"client.py stream across the crash: {rep}")
    assert rep["error"] is None and not rep["reset"] and not rep["eof"], rep
    assert rep["missing"] == 0 and rep["out_of_order"] == 0 and rep["bad_lines"] == 0, rep
    assert len(rep["backends_seen"]) == 1, rep
    assert cluster.role("lb2") == "active"


# --- 3. failback ----------------------------------------------------------------------------------
def links_up(lab: Lab, node: str) -> None:
    """A node coming back: its network first (as at boot), before any service starts."""
    for dev in ("front", "back", "sync"):
        lab.exec(node, "ip", "link", "set", dev, "up")
    wait_for(lambda: all(json.loads(lab.exec(node, "ip", "-j", "link", "show", "dev", dev).stdout)
                         [0]["operstate"] == "UP" for dev in ("front", "back", "sync")),
             5, f"{node}'s links up")


@pytest.mark.parametrize("comeback", ["crashed", "rebooted"])
def test_failback_keeps_the_sessions_made_on_the_backup(cluster: Cluster, comeback: str):
    """lb1 dies, lb2 serves old and new clients, lb1 comes back (its daemon first, as `backup`,
    then keepalived, which keeps it BACKUP: nopreempt), the daemons resynchronise, and the VIP is
    moved back by hand (stop keepalived on lb2, the documented failback). Nobody changes backend,
    and a connection opened through lb2 survives the failback too.

    `crashed`: lb1's kernel tables are as the kill left them (stale sessions, old conntrack
    entries). `rebooted`: empty kernel, the farm applied again at boot before the daemon starts.
    """
    lab, ha = cluster.lab, cluster.ha
    old, new = clients(1, 100), clients(101, 200)
    before = served(lab, old)
    assert_all_served(before, old)
    wait_for(lambda: set(sessions(lab, "lb2")) >= set(old), 20, "old sessions on lb2")
    ha.timed_move("kill", "lb1")
    ha.wait_notified("lb2", "MASTER")
    cluster.wait_role("lb2", "active")

    # lb2 alone: the old clients stay, the new ones get sessions there.
    before.update(served(lab, new))
    assert_all_served(before, old + new)
    assert_same_backend({s: before[s] for s in old}, served(lab, old))
    assert set(sessions(lab, "lb2")) >= set(new)
    stream = LineStream(lab, client4(245))
    try:
        stream.read_lines(10)
        links_up(lab, "lb1")
        if comeback == "rebooted":
            reset_node(lab, "lb1")
            assert sessions_or_none(lab, "lb1") is None
            nftsync(lab, "lb1", "apply", str(lab.state_dir / "failover-farm.nft"))
        else:
            assert not set(new) & set(sessions(lab, "lb1")), "lb1 learnt sessions while dead?"
        cluster.start_daemon("lb1", "backup")
        cluster.wait_peers()
        want = {s: MARKS[b] for s, b in before.items()}
        wait_for(lambda: all(sessions(lab, "lb1").get(s) == m for s, m in want.items()), 20,
                 "lb1 resynchronised from lb2 (old and new clients)")
        wait_for(lambda: converged(lab), 20, "identical session maps on lb1 and lb2")
        wait_for(lambda: stream_entries(lab, "lb1", [stream.source]), 20,
                 "the stream's conntrack entry on lb1")
        backups, masters = calls(ha, "lb1", "BACKUP"), calls(ha, "lb1", "MASTER")
        ha.start("lb1")
        assert ha.state("lb1") == "BACKUP" and ha.owner() == "lb2"
        ha.wait_notified("lb1", "BACKUP", count=backups + 1)
        assert cluster.role("lb1") == "backup" and cluster.role("lb2") == "active"

        took = ha.timed_move("stop", "lb2")
        print(f"\nfailback ({comeback}): VIP on lb1 {took * 1000:.0f} ms after stopping lb2")
        ha.wait_notified("lb1", "MASTER", count=masters + 1)
        cluster.wait_role("lb1", "active")
        # lb2's STOP notification must demote its daemon. Not checked through the notify log:
        # keepalived kills notify scripts still running ~1 s after its shutdown began, and
        # `nftsync ctl` (a Python start-up) can take that long on a busy host, so the script may
        # die after the demote reached the daemon but before it logged. The daemon's role is what
        # matters; if the script is killed before its demote arrives, this fails (a real bug).
        cluster.wait_role("lb2", "backup")
        ha.start("lb2")  # back in the pair, as BACKUP
        assert ha.state("lb2") == "BACKUP" and ha.owner() == "lb1"

        after = served(lab, old + new)
        assert_same_backend(before, after)
        assert set(sessions(lab, "lb1")) >= set(old + new)
        stream.read_lines(100)
        stream.check()
    finally:
        stream.close()


def sessions_or_none(lab: Lab, node: str) -> dict[str, int] | None:
    """The session map, or None when the farm's table is not loaded."""
    try:
        return sessions(lab, node)
    except LabError:
        return None


# --- 4. split brain -------------------------------------------------------------------------------
@pytest.fixture
def vrrp_cut(cluster: Cluster) -> Iterator[callable]:
    """`cut()` drops VRRP (IP protocol 112) on both nodes: each stops hearing the other's adverts
    and both become MASTER. Returned `heal()` removes it. Always healed at teardown."""
    lab = cluster.lab
    rules = ("table inet fo_vrrpcut {\n  chain input {\n"
             "    type filter hook input priority -300; policy accept;\n"
             "    ip protocol 112 drop\n  }\n}\n")

    def cut() -> None:
        for node in NODES:
            lab.nft(node, "-f", "-", input=rules)

    def heal() -> None:
        for node in NODES:
            lab.nft(node, "delete", "table", "inet", "fo_vrrpcut")

    yield cut, heal
    for node in NODES:
        lab.exec(node, "nft", "delete", "table", "inet", "fo_vrrpcut", check=False)


@pytest.mark.parametrize("sync", ["sync link up", "sync link cut"])
def test_split_brain_converges_when_healed(cluster: Cluster, vrrp_cut, sync: str):
    lab, ha = cluster.lab, cluster.ha
    cut, heal = vrrp_cut
    first = served(lab, clients(1, 50))  # before the split, through lb1
    assert_all_served(first, clients(1, 50))
    wait_for(lambda: set(sessions(lab, "lb2")) >= set(first), 20, "sessions on lb2")

    if sync == "sync link cut":
        lab.cut_sync()
        for node in NODES:
            d = cluster.daemons[node]
            d.wait(lambda d=d: d.peers_up() == 0, 20, "peer seen down")
    cut()
    wait_for(lambda: ha.state("lb2") == "MASTER", 10, "lb2 MASTER while lb1 is MASTER too")
    assert ha.state("lb1") == "MASTER"
    assert ha.holders(VIP4, "front") == ["lb1", "lb2"]
    ha.wait_notified("lb2", "MASTER")
    cluster.wait_role("lb2", "active")
    assert cluster.role("lb1") == "active"

    # Both nodes serve: different clients on each, and one client pinned differently on both
    # (the later change must win everywhere).
    steer(lab, "lb2")
    on_lb2 = served(lab, clients(51, 100))
    steer(lab, "lb1")
    on_lb1 = served(lab, clients(101, 150))
    assert_all_served(on_lb2, clients(51, 100))
    assert_all_served(on_lb1, clients(101, 150))
    conflict = client4(151)
    nftsync(lab, "lb1", "sessions", "add", conflict, "0x200")
    time.sleep(0.05)  # a later updated_ms on lb2's change, whatever the clock granularity
    nftsync(lab, "lb2", "sessions", "add", conflict, "0x201")
    if sync == "sync link cut":
        # Really apart: each kernel has only its own side's new clients.
        assert not set(on_lb2) & set(sessions(lab, "lb1"))
        assert not set(on_lb1) & set(sessions(lab, "lb2"))

    backups = calls(ha, "lb2", "BACKUP")
    heal()
    lab.restore_sync()
    unsteer(lab)
    wait_for(lambda: ha.state("lb2") == "BACKUP", 10, "lb2 back to BACKUP")
    assert ha.state("lb1") == "MASTER"
    wait_for(lambda: ha.owner() == "lb1", 5, "lb1 alone holding the VIP")
    ha.wait_notified("lb2", "BACKUP", count=backups + 1)
    cluster.wait_role("lb2", "backup")
    assert cluster.role("lb1") == "active"
    cluster.wait_peers()

    everyone = {**first, **on_lb2, **on_lb1}
    want = {s: MARKS[b] for s, b in everyone.items()} | {conflict: 0x201}
    merged = wait_for(lambda: converged(lab), 30, "identical session maps after the heal")
    lost = {s: (m, merged.get(s)) for s, m in want.items() if merged.get(s) != m}
    assert not lost, f"sessions lost or changed (wanted, got): {lost}"
    after = served(lab, list(everyone))
    assert_same_backend(everyone, after)


# --- 5. a session made on the partitioned backup -------------------------------------------------
def test_session_made_on_the_backup_during_a_sync_cut_reaches_the_active(cluster: Cluster):
    lab, ha = cluster.lab, cluster.ha
    served(lab, clients(1, 10))
    wait_for(lambda: set(sessions(lab, "lb2")) >= set(clients(1, 10)), 20, "sessions on lb2")
    lab.cut_sync()
    try:
        for node in NODES:
            d = cluster.daemons[node]
            d.wait(lambda d=d: d.peers_up() == 0, 20, "peer seen down")
        assert ha.owner() == "lb1", "the sync cut moved the VIP"
        # On lb2 (backup): one admin session, ten from traffic steered to it.
        nftsync(lab, "lb2", "sessions", "add", client4(230), "0x201")
        steer(lab, "lb2")
        on_lb2 = served(lab, clients(231, 240))
        unsteer(lab)
        assert_all_served(on_lb2, clients(231, 240))
        # On lb1 (active): new clients through the VIP.
        on_lb1 = served(lab, clients(11, 20))
        assert_all_served(on_lb1, clients(11, 20))
        assert not {client4(230), *on_lb2} & set(sessions(lab, "lb1")), "the link was not down"
        assert not set(on_lb1) & set(sessions(lab, "lb2"))
    finally:
        lab.restore_sync()
    cluster.wait_peers(30)
    want = {s: MARKS[b] for s, b in {**on_lb2, **on_lb1}.items()} | {client4(230): 0x201}
    wait_for(lambda: all(sessions(lab, "lb1").get(s) == m for s, m in want.items()), 30,
             "lb2's sessions merged into lb1 (and lb1's into lb2)")
    merged = wait_for(lambda: converged(lab), 30, "identical session maps")
    assert all(merged[s] == m for s, m in want.items())
    # Roles untouched by the partition: keepalived never moved.
    assert cluster.role("lb1") == "active" and cluster.role("lb2") == "backup"
    # Through the VIP (lb1), the clients that lb2 had served keep their backend.
    assert_same_backend(on_lb2, served(lab, clients(231, 240)))


# --- lab.sh and keepalived --------------------------------------------------------------------
def test_lab_vip_refuses_while_keepalived_owns_it_and_status_shows_it(cluster: Cluster):
    lab, ha = cluster.lab, cluster.ha
    with pytest.raises(LabError, match="keepalived runs on lb1"):
        lab_sh(lab.prefix, "vip", "lb2")
    assert ha.owner() == "lb1"
    status = lab.status()
    assert "VIP owner: lb1" in status and "MASTER" in status, status
    ha.kill("lb1")
    with pytest.raises(LabError, match="keepalived runs on lb2"):
        lab.move_vip("none")
    ha.down()
    lab.move_vip("lb1")  # keepalived gone: manual mode again
    assert ha.owner() == "lb1"
