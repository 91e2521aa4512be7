"""`nftsync daemon` between lb1 and lb2 of the netns lab: real traffic, real kernel tables.

lb1 and lb2 load the same farm; their daemons talk over the lab's sync link (10.30.0.0/30).
Each test checks the kernel of the node that did *not* see the change (`nft -j list map`,
`conntrack -L`), never the daemon's own view alone.
"""

from __future__ import annotations

import re
import socket
import struct
import time

import pytest
from daemons import SYNC4, DaemonProc, daemon_pair, make_key, wait_for
from helpers import RULESETS, map_elements, nftsync
from lab import client4

FARM_TABLE, FARM_MAP = "nftsync_http", "http_sessions"


@pytest.fixture
def farm_file(tmp_path):
    """farm-http.nft, also balancing the lab's stream port 7000 (for connection survival), with
    room for the 100k-session test (a map without `size` holds 65535)."""
    path = tmp_path / "farm.nft"
    path.write_text((RULESETS / "farm-http.nft").read_text()
                    .replace("tcp dport 80 jump", "tcp dport { 80, 7000 } jump")
                    .replace("timeout 60s", "timeout 60s\n\t\tsize 262144"))
    return path


@pytest.fixture
def pair(lab, tmp_path, farm_file):
    """Both load balancers with the farm and a daemon each; lb1 active. Stopped by pid after."""
    with daemon_pair(lab, tmp_path, farm_file, connect_timeout=15) as daemons:
        yield daemons


def sessions(lab, node):
    return map_elements(lab, node, "ip", FARM_TABLE, FARM_MAP)


def conntrack(lab, node) -> list[str]:
    out = lab.exec(node, "conntrack", "-L", check=False).stdout
    return [ln for ln in out.splitlines() if "dport=" in ln]


def same_sessions(lab, tolerance: int = 2):
    """lb2's session map equals lb1's: keys, marks, and expiry within `tolerance` seconds."""
    a, b = sessions(lab, "lb1"), sessions(lab, "lb2")
    if a.keys() != b.keys():
        return False
    return all(a[k]["mark"] == b[k]["mark"] and
               abs((a[k]["expires"] or 0) - (b[k]["expires"] or 0)) <= tolerance for k in a)


def test_traffic_sessions_and_conntrack_replicate(lab, pair):
    seen = lab.request(port=80, sources=[client4(i) for i in range(1, 21)])
    assert all(b[0] for b in seen.values())
    wait_for(lambda: len(sessions(lab, "lb2")) == 20, 10, "20 sessions on lb2")
    assert wait_for(lambda: same_sessions(lab), 5, "identical session maps")
    marks = {"be1": 0x200, "be2": 0x201}
    lb2 = sessions(lab, "lb2")
    for src, backends in seen.items():
        assert lb2[src]["mark"] == marks[backends[0]]
    # Conntrack entries with the NAT (reply from the backend) and the backend's mark.
    entries = wait_for(lambda: [ln for ln in conntrack(lab, "lb2") if "dst=10.10.0.100" in ln
                                and "dport=80" in ln and len(conntrack(lab, "lb2")) >= 20],
                       10, "conntrack entries on lb2")
    for ln in entries:
        src = re.search(r"src=(\S+)", ln).group(1)
        backend = "10.20.0.11" if seen[src][0] == "be1" else "10.20.0.12"
        assert f"src={backend} dst={src}" in ln, ln
        assert f"mark={0x200 if backend.endswith('11') else 0x201}" in ln, ln


def test_clean_start_of_a_pair_logs_no_warning(lab, pair):
    """Both daemons dial; lb1 (started first) ends up serving lb2's connection and then its
    own, which replaces it on both sides (DUPLICATE_PEER): that is no failure, so no WARNING
    (issue 12). Addresses are ADDR:PORT, never a Python tuple."""
    d1, d2 = pair["lb1"], pair["lb2"]
    lb2 = f"{SYNC4['lb2']}:{d1.port}"
    # Settled: lb1 serves lb2 over the link it dials (the inbound one was replaced).
    wait_for(lambda: [(p["name"], p["state"]) for p in d1.ctl("peers")] == [(lb2, "up")] and
             d2.peers_up() == 1, 20, "lb1's own connection to lb2 kept, the other dropped")
    time.sleep(1.0)
    for d in (d1, d2):
        text = d.log.read_text(errors="replace")
        assert [ln for ln in text.splitlines() if " WARNING " in ln] == [], text
        assert "('" not in text, text


def test_admin_changes_and_deletes_propagate(lab, pair):
    d1, d2 = pair["lb1"], pair["lb2"]
    nftsync(lab, "lb1", "sessions", "add", "10.10.1.77", "0x201", "--expires", "45")
    got = wait_for(lambda: sessions(lab, "lb2").get("10.10.1.77"), 10, "admin add on lb2")
    assert got["mark"] == 0x201 and 42 <= got["expires"] <= 45
    nftsync(lab, "lb1", "sessions", "add", "--static", "10.10.1.78", "0x200")
    wait_for(lambda: "10.10.1.78" in map_elements(lab, "lb2", "ip", FARM_TABLE, "http_static"),
             10, "static pin on lb2")
    # Re-stick to another backend, then delete.
    nftsync(lab, "lb1", "sessions", "add", "10.10.1.77", "0x200")
    wait_for(lambda: sessions(lab, "lb2").get("10.10.1.77", {}).get("mark") == 0x200, 10,
             "changed backend on lb2")
    nftsync(lab, "lb1", "sessions", "del", "10.10.1.77")
    wait_for(lambda: "10.10.1.77" not in sessions(lab, "lb2"), 10, "delete on lb2")
    # Traffic-made sessions, then a flush on lb1 empties lb2 too.
    lab.request(port=80, sources=[client4(i) for i in range(1, 11)])
    wait_for(lambda: len(sessions(lab, "lb2")) == 10, 10, "10 sessions on lb2")
    nftsync(lab, "lb1", "sessions", "flush")
    wait_for(lambda: sessions(lab, "lb2") == {}, 10, "flush on lb2")
    # A change made on the backup goes the other way.
    nftsync(lab, "lb2", "sessions", "add", "10.10.1.90", "0x201")
    wait_for(lambda: "10.10.1.90" in sessions(lab, "lb1"), 10, "lb2's session on lb1")
    stats = d1.ctl("stats")
    assert stats["counters"]["admin_changes"] >= 4
    assert d2.ctl("status")["health"] == "ok"


def test_established_connection_survives_failover(lab, pair):
    stream = lab.stream(source=client4(30), seconds=6)
    wait_for(lambda: any("dport=7000" in ln and "ESTABLISHED" in ln
                         for ln in conntrack(lab, "lb2")), 10, "the stream's entry on lb2")
    before = lab.request(port=80, sources=[client4(i) for i in range(1, 11)])
    wait_for(lambda: len(sessions(lab, "lb2")) >= 11, 10, "sessions on lb2")
    pair["lb1"].stop()
    lab.move_vip("lb2")
    after = lab.request(port=80, sources=[client4(i) for i in range(1, 11)])
    assert after == before
    result = stream.result(timeout=20)
    assert result["error"] is None and not result["reset"], result
    assert result["missing"] == 0 and result["lines"] > 100, result


def test_backup_restart_resyncs_keeps_found_and_live_deletes(lab, pair, tmp_path):
    """A restarted daemon gets what it missed; live deletes made meanwhile stay deleted; what
    its kernel holds that nobody else knows (made while it was away) is kept and given to the
    peer: absence from a snapshot is never taken for a deletion (docs/protocol.md)."""
    d2 = pair["lb2"]
    lab.request(port=80, sources=[client4(i) for i in range(1, 11)])
    wait_for(lambda: len(sessions(lab, "lb2")) == 10, 10, "10 sessions on lb2")
    d2.stop()
    # While lb2's daemon is away: lb1 forgets two clients and learns five new ones, and lb2's
    # kernel gets an entry nobody else has.
    nftsync(lab, "lb1", "sessions", "del", client4(1))
    nftsync(lab, "lb1", "sessions", "del", client4(2))
    lab.request(port=80, sources=[client4(i) for i in range(11, 16)])
    nftsync(lab, "lb2", "sessions", "add", "10.10.1.200", "0x200")
    assert client4(1) in sessions(lab, "lb2")
    d2.start()
    assert wait_for(lambda: same_sessions(lab), 15, "lb2 equal to lb1 after the restart")
    both = sessions(lab, "lb1")
    assert "10.10.1.200" in both and both["10.10.1.200"]["mark"] == 0x200
    assert client4(1) not in both and client4(2) not in both
    assert all(client4(i) in both for i in range(3, 16))
    peer = d2.ctl("peers")[0]
    assert peer["snapshots_received"] >= 1


def test_link_cut_and_restore_converge(lab, pair):
    d1 = pair["lb1"]
    lab.request(port=80, sources=[client4(i) for i in range(1, 6)])
    wait_for(lambda: len(sessions(lab, "lb2")) == 5, 10, "5 sessions on lb2")
    lab.cut_sync()
    lab.request(port=80, sources=[client4(i) for i in range(6, 16)])
    nftsync(lab, "lb1", "sessions", "del", client4(3))
    nftsync(lab, "lb2", "sessions", "add", "10.10.1.150", "0x201")  # made on the backup
    # The cut is visible in lb1's health within the peer timeout.
    status = wait_for(lambda: (s := d1.ctl("status"))["health"] != "ok" and s, 20,
                      "lb1 unhealthy while the link is down")
    assert any("lb2" in r or "10.30.0.2" in r or "no peer" in r for r in status["reasons"])
    lab.restore_sync()
    wait_for(lambda: d1.peers_up() == 1, 30, "reconnection")
    a = wait_for(lambda: same_sessions(lab) and sessions(lab, "lb1"), 15, "convergence")
    assert client4(3) not in a
    assert {client4(i) for i in range(6, 16)} <= set(a)
    assert a["10.10.1.150"]["mark"] == 0x201
    assert d1.ctl("status")["health"] == "ok"


def test_wrong_key_is_refused(lab, pair, tmp_path):
    d2 = pair["lb2"]
    d2.stop()
    other = make_key(tmp_path, "other-key")
    bad = DaemonProc(lab.ns("lb2"), "lb2bad", 2, SYNC4["lb2"], [SYNC4["lb1"]], other, tmp_path)
    pair["lb2bad"] = bad
    bad.start()
    wait_for(lambda: pair["lb1"].ctl("stats")["counters"]["auth_failures"] >= 1, 15,
             "an authentication failure on lb1")
    lab.request(port=80, sources=[client4(i) for i in range(1, 4)])
    time.sleep(1.0)
    assert sessions(lab, "lb2") == {}
    assert bad.peers_up() == 0
    assert "authentication" in bad.log.read_text().lower() or \
        "refused" in bad.log.read_text().lower()


def test_garbage_frames_leave_daemon_and_tables_intact(lab, pair):
    import netns
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    d1 = pair["lb1"]
    lab.request(port=80, sources=[client4(i) for i in range(1, 6)])
    wait_for(lambda: len(sessions(lab, "lb2")) == 5, 10, "sessions on lb2")
    before = sessions(lab, "lb1")
    header = struct.Struct(">4sBBHIQ")

    def send(payload: bytes) -> None:
        with netns.entered(lab.ns("lb2")):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(2)
        try:
            s.connect((SYNC4["lb1"], 7777))
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            while s.recv(4096):
                pass
        except OSError:
            pass  # the daemon closing on us is the expected outcome
        finally:
            s.close()

    frames = st.one_of(
        st.binary(max_size=300),
        st.builds(lambda t, ln, body: header.pack(b"NFSY", 1, t, 0, ln, 0) + body,
                  st.integers(0, 255), st.integers(0, 2**32 - 1), st.binary(max_size=200)),
    )

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(frames)
    def fuzz(payload):
        send(payload)

    fuzz()
    send(header.pack(b"NFSY", 1, 1, 0, 1 << 30, 0))  # oversized: closed before any body
    assert d1.alive()
    assert d1.ctl("status")["health"] == "ok"
    assert sessions(lab, "lb1").keys() == before.keys()
    # The real peer still replicates.
    lab.request(port=80, sources=[client4(40)])
    wait_for(lambda: client4(40) in sessions(lab, "lb2"), 10, "replication after the fuzzing")


def test_health_turns_bad_when_the_peer_dies(lab, pair):
    d1 = pair["lb1"]
    assert d1.ctl("status")["health"] == "ok"
    pair["lb2"].stop()
    status = wait_for(lambda: (s := d1.ctl("status"))["health"] != "ok" and s, 20,
                      "bad health on lb1")
    assert status["health"] == "failing"
    assert status["reasons"]
    peers = d1.ctl("peers")
    assert peers[0]["state"] != "up" and peers[0]["last_error"]


@pytest.mark.slow
def test_100k_entries_replicate(lab, pair, tmp_path):
    """100,000 DNATed connections appear on lb1 at once (`conntrack -R`): lb2 gets every
    conntrack entry and every client's session (distinct sources, so 100k sessions)."""
    n = 100_000
    load = tmp_path / "load.txt"
    conntrack_load(load, n)
    lab.exec("lb1", "conntrack", "-R", str(load), timeout=120)

    wait_for(lambda: replicated(pair["lb2"]) == (n, n), 180, "100k entries and sessions on lb2",
             interval=1)
    kernel_ct = int(lab.exec("lb2", "conntrack", "-C").stdout.strip())
    assert kernel_ct >= n
    assert len(sessions(lab, "lb2")) == n
    st = pair["lb2"].ctl("stats")["kernel"]
    assert st["nft"]["failed"] == 0 and st["conntrack"]["failed"] == 0, st


def replicated(d: DaemonProc) -> tuple[int, int] | None:
    """(conntrack entries, sessions) the daemon holds, once its kernel writer has caught up
    (the mirror counts a record when it arrives; the writer thread puts it in the kernel)."""
    st = d.ctl("stats")
    if st["kernel"]["queued"]:
        return None
    return st["conntrack"], st["sessions"].get("http/sessions", 0)


def conntrack_load(path, n: int, first: int = 0) -> None:
    """`conntrack -R` lines for n DNATed connections of distinct clients (10.11.x.y)."""
    lines = []
    for i in range(first, first + n):
        src = f"10.{11 + (i >> 16)}.{i >> 8 & 255}.{i & 255}"
        mark, backend = ("0x200", "10.20.0.11") if i % 2 else ("0x201", "10.20.0.12")
        lines.append(f"-A -t 600 -u SEEN_REPLY,ASSURED -s {src} -d 10.10.0.100 -r {backend} "
                     f"-q {src} -p tcp --sport 40000 --dport 80 --reply-port-src 80 "
                     f"--reply-port-dst 40000 --state ESTABLISHED -m {mark}")
    path.write_text("\n".join(lines) + "\n")


def test_event_overrun_is_counted_and_reconciled(lab, pair, tmp_path):
    """A burst larger than the event buffer: the loss is detected, counted, and repaired from a
    dump, so the peer still gets every connection and every session."""
    pair["lb1"].stop()
    cfg = tmp_path / "small-buffer.toml"
    cfg.write_text("[limits]\nevent_buffer = 65536\n")
    small = DaemonProc(lab.ns("lb1"), "lb1", 1, SYNC4["lb1"], [SYNC4["lb2"]],
                       pair["lb1"].key, tmp_path, role="active", extra=("--config", str(cfg)))
    pair["lb1small"] = small
    small.start()
    small.wait(lambda: small.peers_up() >= 1, 15, "lb2 connected")
    n = 20_000
    load = tmp_path / "burst.txt"
    conntrack_load(load, n)
    lab.exec("lb1", "conntrack", "-R", str(load), timeout=120)

    wait_for(lambda: replicated(pair["lb2"]) == (n, n), 120, "every entry and session on lb2",
             interval=0.5)
    c = small.ctl("stats")["counters"]
    assert c["ct_overruns"] >= 1, c
    assert c["reconciles"] >= 1, c
