"""keepalived (VRRP) between the lab's load balancers: real keepalived, real traffic, kernel state.

One lab per module with `rulesets/farm-http.nft` applied on both load balancers (through `nftsync
apply` inside each node); each test starts keepalived with `netns-lab/ha.sh up` and stops it
afterwards, failed or not. Move times are printed (`pytest -s`), never asserted: the bounded waits
only say the VIP moved at all.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from ha import HA_SH, Ha, HaError, keepalived_in, proc_starttime
from helpers import RULESETS, map_elements, nftsync, reset_node
from lab import GW4, GW6, VIP4, VIP6, Lab, client4, client6, lab_namespaces

NOTIFY_SH = Path(__file__).resolve().parents[2] / "contrib" / "keepalived" / "nftsync-notify.sh"
SOURCES = [client4(i) for i in range(1, 11)]
BACKENDS = {"be1", "be2"}


def lab_prefix() -> str:
    """"kv…": our labs are told apart from the other suites' ("t…") at a glance."""
    return "kv" + uuid.uuid4().hex[:6]


@pytest.fixture(scope="module")
def farm_lab() -> Iterator[Lab]:
    """A lab whose two load balancers both carry the HTTP farm, as a real HA pair would."""
    running = Lab.up(prefix=lab_prefix())
    try:
        for node in ("lb1", "lb2"):
            reset_node(running, node)
            nftsync(running, node, "apply", str(RULESETS / "farm-http.nft"))
        yield running
    finally:
        running.down()


@pytest.fixture
def ha(farm_lab: Lab) -> Iterator[Ha]:
    """keepalived up on both nodes (lb1 MASTER), stopped after the test; sessions and conntrack
    emptied before, so each test sees only its own traffic."""
    for node in ("lb1", "lb2"):
        nftsync(farm_lab, node, "sessions", "flush")
        farm_lab.exec(node, "conntrack", "-F", check=False)
    pair = Ha(farm_lab)
    try:
        pair.up()
        yield pair
    finally:
        pair.down()


def sessions(lab: Lab, node: str) -> dict[str, dict]:
    return map_elements(lab, node, "ip", "nftsync_http", "http_sessions")


def assert_served(lab: Lab, node: str, sources: list[str] = SOURCES) -> None:
    """Every source gets an answer from a backend, and it went through `node`: the node's session
    map (written by the packet path) now holds each source."""
    seen = lab.request(port=80, sources=sources)
    assert {src: b[0] in BACKENDS for src, b in seen.items()} == {s: True for s in sources}, seen
    assert set(sources) <= set(sessions(lab, node)), f"traffic did not go through {node}"


def assert_only_owner(pair: Ha, node: str) -> None:
    """`node` alone holds all four addresses keepalived manages (v4 and v6, front and back)."""
    assert pair.holders(VIP4, "front") == [node]
    assert pair.holders(VIP6, "front") == [node]
    assert pair.holders(GW4, "back") == [node]
    assert pair.holders(GW6, "back") == [node]


def test_exactly_one_node_holds_the_vip_and_serves(ha: Ha, farm_lab: Lab):
    assert_only_owner(ha, "lb1")
    assert ha.state("lb1") == "MASTER"
    assert ha.state("lb2") == "BACKUP"
    assert_served(farm_lab, "lb1")
    assert sessions(farm_lab, "lb2") == {}, "the backup saw client traffic"
    # IPv6 through the VIP reaches the backends' network too (no v6 farm: ping the gateway VIP).
    assert farm_lab.ping("client", VIP6)


def test_graceful_stop_moves_the_vip(ha: Ha, farm_lab: Lab):
    # The client's neighbour entries (v4 and v6) point at lb1 now; only keepalived's gratuitous
    # ARP / unsolicited NA can point them at lb2 in time for the requests below.
    assert_served(farm_lab, "lb1")
    assert farm_lab.ping("client", VIP6)
    nftsync(farm_lab, "lb1", "sessions", "flush")
    took = ha.timed_move("stop", "lb1")
    print(f"\nVIP move after stopping keepalived on the MASTER: {took * 1000:.0f} ms "
          f"(advert_int {ha.advert_int} s)")
    assert_only_owner(ha, "lb2")
    assert ha.keepalived_pid("lb1") is None
    ha.wait_notified("lb2", "MASTER")
    assert ha.state("lb2") == "MASTER"
    assert_served(farm_lab, "lb2")
    assert sessions(farm_lab, "lb1") == {}
    assert farm_lab.ping("client", VIP6)
    assert farm_lab.ping("be1", client6(1))  # backend -> client through the moved v6 gateway


def test_node_crash_moves_the_vip_and_it_does_not_come_back(ha: Ha, farm_lab: Lab):
    assert_served(farm_lab, "lb1")
    took = ha.timed_move("kill", "lb1")
    print(f"\nVIP move after killing the MASTER node: {took * 1000:.0f} ms "
          f"(advert_int {ha.advert_int} s)")
    assert_only_owner(ha, "lb2")
    assert keepalived_in([farm_lab.ns("lb1")]) == []
    assert_served(farm_lab, "lb2")
    # The node comes back: nopreempt keeps the VIP where it is (no second interruption, and the
    # sync daemon gets time to resynchronise the returning node before it could ever take over).
    ha.start("lb1")
    deadline = time.monotonic() + 10 * ha.advert_int + 2
    while ha.state("lb1") != "BACKUP" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ha.state("lb1") == "BACKUP"
    time.sleep(10 * ha.advert_int)
    assert_only_owner(ha, "lb2")
    assert ha.state("lb2") == "MASTER"


def test_cutting_the_sync_link_does_not_move_the_vip(ha: Ha, farm_lab: Lab):
    """VRRP talks over `front`, not over the sync link that partition tests cut."""
    farm_lab.cut_sync()
    try:
        time.sleep(10 * ha.advert_int)
        assert_only_owner(ha, "lb1")
        assert ha.state("lb2") == "BACKUP"
    finally:
        farm_lab.restore_sync()


def test_backend_link_failure_moves_the_vip(ha: Ha, farm_lab: Lab):
    """track_interface back: a MASTER that cannot reach the backends goes FAULT and hands over."""
    farm_lab.exec("lb1", "ip", "link", "set", "back", "down")
    try:
        took = ha.wait_owner("lb2", timeout=5)
        print(f"\nVIP move after lb1 lost its backend link: {took * 1000:.0f} ms")
        ha.wait_notified("lb1", "FAULT")
        assert ha.state("lb1") == "FAULT"
        assert ha.notify_calls("lb1")[-1].action == "demote"
        assert_served(farm_lab, "lb2")
    finally:
        farm_lab.exec("lb1", "ip", "link", "set", "back", "up")
    deadline = time.monotonic() + 5
    while ha.state("lb1") != "BACKUP" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ha.state("lb1") == "BACKUP"
    assert_only_owner(ha, "lb2")


def test_notify_runs_with_each_nodes_state(ha: Ha):
    ha.wait_notified("lb1", "MASTER")
    ha.wait_notified("lb2", "BACKUP")
    lb1 = ha.notify_calls("lb1")
    lb2 = ha.notify_calls("lb2")
    assert [c.state for c in lb1] == ["BACKUP", "MASTER"], lb1
    assert [c.state for c in lb2] == ["BACKUP"], lb2
    assert {c.priority for c in lb1} == {150} and {c.priority for c in lb2} == {100}
    assert [c.action for c in lb1] == ["demote", "promote"]
    # No daemon runs in this lab: the script says so and lets VRRP go on.
    assert all(c.outcome.startswith("skipped, daemon not running") for c in lb1 + lb2), lb1 + lb2

    ha.stop("lb1")
    ha.wait_notified("lb2", "MASTER")
    ha.wait_notified("lb1", "STOP")
    assert [c.state for c in ha.notify_calls("lb1")] == ["BACKUP", "MASTER", "STOP"]
    assert ha.notify_calls("lb1")[-1].action == "demote"
    assert [(c.state, c.action) for c in ha.notify_calls("lb2")] == \
        [("BACKUP", "demote"), ("MASTER", "promote")]


def test_down_and_teardown_leave_no_keepalived():
    lab = Lab.up(prefix=lab_prefix(), clients=2, backends=1)
    namespaces = [lab.ns("lb1"), lab.ns("lb2")]
    try:
        pair = Ha(lab)
        pair.up()
        first = pair.recorded_pids()
        assert len(first) == 2 and all(proc_starttime(p) == s for p, s in first)
        assert len(keepalived_in(namespaces)) == 4  # parent + VRRP child on each node
        pair.down()
        assert [p for p, s in first if proc_starttime(p) == s] == []
        assert keepalived_in(namespaces) == []
        assert pair.holders(VIP4, "front") == [] and pair.holders(GW4, "back") == []
        pair.down()  # idempotent

        # A killed node and a running one: lab teardown alone cleans up everything.
        pair.up()
        pair.kill("lb1")
        second = pair.recorded_pids()
        assert keepalived_in(namespaces[:1]) == [] and len(keepalived_in(namespaces[1:])) == 2
    finally:
        lab.down()
    assert [p for p, s in second if proc_starttime(p) == s] == []
    assert lab_namespaces(lab.prefix) == []
    assert not (Path("/run/nftsync-lab") / lab.prefix).exists()


def test_ha_sh_rejects_bad_input(farm_lab: Lab):
    pair = Ha(farm_lab)
    with pytest.raises(HaError, match="NODE must be lb1 or lb2"):
        pair.sh("kill", "lb3")
    with pytest.raises(HaError, match="HA_ADVERT_INT must be seconds"):
        Ha(farm_lab, env={"HA_ADVERT_INT": "0.1; reboot"}).sh("status")
    with pytest.raises(HaError, match="is not up"):
        Ha(Lab(lab_prefix())).sh("up")
    p = subprocess.run([str(HA_SH), "--help"], capture_output=True, text=True, check=False)
    assert p.returncode == 0 and "wait-owner" in p.stderr


# --- the notify script on its own: a fake `nftsync` records how it is called -------------------
@pytest.fixture
def notify_env(tmp_path: Path) -> Iterator[tuple[dict[str, str], Path]]:
    fake = tmp_path / "nftsync"
    calls = tmp_path / "calls"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n'
                    '[ "$NFTSYNC_FAKE_RC" = "" ] || exit "$NFTSYNC_FAKE_RC"\n'
                    '[ "$NFTSYNC_FAKE_SLEEP" = "" ] || sleep "$NFTSYNC_FAKE_SLEEP"\n')
    fake.chmod(0o755)
    sock = tmp_path / "ctl.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock))
    defaults = tmp_path / "defaults"
    defaults.write_text(f"# test\nNFTSYNC_CMD={fake}\nNFTSYNC_SOCKET='{sock}'\n"
                        f'NFTSYNC_NOTIFY_LOG="{tmp_path / "log"}"\n'
                        f"NFTSYNC_NOTIFY_STATE={tmp_path / 'state'}\nNFTSYNC_NOTIFY_SYSLOG=0\n")
    env = {"PATH": os.environ["PATH"]}
    try:
        yield env, tmp_path
    finally:
        listener.close()


def notify(env: dict[str, str], tmp: Path, *args: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(NOTIFY_SH), "--defaults", str(tmp / "defaults"), *args],
                          env={**env, **extra}, capture_output=True, text=True, timeout=30,
                          check=False)


def test_notify_script_maps_states_to_ctl(notify_env):
    env, tmp = notify_env
    for state in ("MASTER", "BACKUP", "FAULT", "STOP", "DELETED"):
        assert notify(env, tmp, "INSTANCE", "nftsync", state, "150").returncode == 0
    sock = tmp / "ctl.sock"
    assert (tmp / "calls").read_text().splitlines() == [
        f"ctl --socket {sock} promote", *[f"ctl --socket {sock} demote"] * 4]
    assert (tmp / "state").read_text().split()[0] == "DELETED"
    assert "MASTER 150 -> promote: ok" in (tmp / "log").read_text()


def test_notify_script_reports_failures_and_bounds_the_call(notify_env):
    env, tmp = notify_env
    p = notify(env, tmp, "INSTANCE", "nftsync", "MASTER", "150", NFTSYNC_FAKE_RC="3")
    assert p.returncode == 1 and "failed (rc 3" in p.stderr
    t0 = time.monotonic()
    p = notify(env, tmp, "INSTANCE", "nftsync", "MASTER", "150", NFTSYNC_FAKE_SLEEP="30",
               NFTSYNC_NOTIFY_TIMEOUT="0.5")
    assert p.returncode == 1 and "timed out" in p.stderr
    assert time.monotonic() - t0 < 10
    # No daemon: an error by default, a logged no-op when told to tolerate it (the lab's setting).
    p = notify(env, tmp, "INSTANCE", "nftsync", "BACKUP", "100", NFTSYNC_SOCKET=str(tmp / "none"))
    assert p.returncode == 1 and "daemon not running" in p.stderr
    p = notify(env, tmp, "INSTANCE", "nftsync", "BACKUP", "100", NFTSYNC_SOCKET=str(tmp / "none"),
               NFTSYNC_REQUIRE_DAEMON="0")
    assert p.returncode == 0 and "skipped, daemon not running" in p.stderr


@pytest.mark.parametrize("args, message", [
    (("INSTANCE", "nftsync", "MASTER"), "usage"),
    (("VSERVER", "nftsync", "MASTER", "1"), "TYPE must be INSTANCE or GROUP"),
    (("INSTANCE", "bad name;", "MASTER", "1"), "bad instance name"),
    (("INSTANCE", "nftsync", "MASTER", "x"), "bad priority"),
])
def test_notify_script_rejects_bad_arguments(notify_env, args, message):
    env, tmp = notify_env
    p = notify(env, tmp, *args)
    assert p.returncode == 2 and message in p.stderr
    assert not (tmp / "calls").exists()


def test_notify_script_parses_its_defaults_file_without_running_it(notify_env):
    env, tmp = notify_env
    marker = tmp / "pwned"
    (tmp / "defaults").write_text(f"NFTSYNC_SOCKET=$(touch {marker})\n")
    p = notify(env, tmp, "INSTANCE", "nftsync", "MASTER", "1")
    assert not marker.exists()
    assert p.returncode == 1 and "daemon not running" in p.stderr
    (tmp / "defaults").write_text("PATH=/tmp/evil\n")
    p = notify(env, tmp, "INSTANCE", "nftsync", "MASTER", "1")
    assert p.returncode == 1 and "unknown setting PATH" in p.stderr


def test_notify_script_applies_the_latest_state_when_calls_overlap(notify_env):
    """A slow promote still running when BACKUP arrives: the node must end demoted."""
    env, tmp = notify_env
    slow = subprocess.Popen([str(NOTIFY_SH), "--defaults", str(tmp / "defaults"), "INSTANCE",
                             "nftsync", "MASTER", "150"], env={**env, "NFTSYNC_FAKE_SLEEP": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not (tmp / "calls").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert notify(env, tmp, "INSTANCE", "nftsync", "BACKUP", "150").returncode == 0
    finally:
        slow.wait(timeout=30)
    calls = (tmp / "calls").read_text().splitlines()
    assert calls[0].endswith("promote") and calls[-1].endswith("demote"), calls
    assert proc_starttime(slow.pid) is None


# --- with the sync daemon: the promise, end to end ---------------------------------------------
def daemon_available() -> bool:
    root = Path(__file__).resolve().parents[2]
    return (root / "nftsync" / "daemon" / "core.py").exists()


@pytest.mark.skipif(not daemon_available(), reason="nftsync daemon not written yet")
def test_crash_of_the_active_node_is_invisible_to_clients(tmp_path: Path):
    """keepalived + nftsync daemon on both nodes; lb1 dies (links down, everything SIGKILLed):
    every client keeps its backend, an established stream goes on without a lost line, and
    keepalived's notify promoted lb2's daemon."""
    from daemons import SYNC4, DaemonProc, make_key, wait_for

    farm = tmp_path / "farm.nft"
    farm.write_text((RULESETS / "farm-http.nft").read_text()
                    .replace("tcp dport 80 jump", "tcp dport { 80, 7000 } jump"))
    lab = Lab.up(prefix=lab_prefix(), clients=31, backends=2)
    state = Path("/run/nftsync-lab") / lab.prefix
    daemons: list[DaemonProc] = []
    pair = Ha(lab)
    try:
        key = make_key(state)
        for node in ("lb1", "lb2"):
            nftsync(lab, node, "apply", str(farm))
        # Sockets where ha.sh's notify settings look for them: $STATE/lbN.sock.
        d1 = DaemonProc(lab.ns("lb1"), "lb1", 1, SYNC4["lb1"], [SYNC4["lb2"]], key, state,
                        role="active")
        d2 = DaemonProc(lab.ns("lb2"), "lb2", 2, SYNC4["lb2"], [SYNC4["lb1"]], key, state)
        daemons += [d1, d2]
        for d in daemons:
            d.start()
        for d in daemons:
            d.wait(lambda d=d: d.peers_up() >= 1, 15, "peer connected")
        pair.up()
        pair.wait_notified("lb1", "MASTER")
        assert pair.notify_calls("lb1")[-1].outcome.startswith("ok"), pair.notify_calls("lb1")
        assert d1.ctl("status")["role"] == "active" and d2.ctl("status")["role"] == "backup"

        sources = [client4(i) for i in range(1, 21)]
        stream = lab.stream(source=client4(31), seconds=6)
        before = lab.request(port=80, sources=sources)
        assert all(b[0] in BACKENDS for b in before.values()), before
        wait_for(lambda: set(sources) <= set(sessions(lab, "lb2")), 10, "sessions on lb2")
        wait_for(lambda: any("dport=7000" in ln and "ESTABLISHED" in ln for ln in
                             lab.exec("lb2", "conntrack", "-L", check=False).stdout.splitlines()),
                 10, "the stream's conntrack entry on lb2")

        took = pair.timed_move("kill", "lb1")
        print(f"\nVIP move after the active node died (daemons running): {took * 1000:.0f} ms")
        after = lab.request(port=80, sources=sources)
        assert after == before
        result = stream.result(timeout=20)
        print(f"stream across the failover: {result}")
        assert result["error"] is None and not result["reset"] and not result["eof"], result
        assert result["missing"] == 0 and len(result["backends_seen"]) == 1, result
        pair.wait_notified("lb2", "MASTER")
        assert pair.notify_calls("lb2")[-1].action == "promote"
        assert pair.notify_calls("lb2")[-1].outcome.startswith("ok"), pair.notify_calls("lb2")
        print(f"lb2 notify: promote {pair.notify_calls('lb2')[-1].outcome}")
        assert d2.ctl("status")["role"] == "active"
    finally:
        for d in daemons:
            d.stop()
        try:
            pair.down()
        finally:
            lab.down()


@pytest.mark.slow
def test_repeated_failovers_back_and_forth(ha: Ha, farm_lab: Lab):
    """Ten crashes in a row, alternating nodes: every time exactly one node ends up with the VIP
    and serves; the returning node always stays BACKUP."""
    times = []
    for _ in range(10):
        master = ha.owner()
        assert master in ("lb1", "lb2")
        peer = "lb2" if master == "lb1" else "lb1"
        times.append(ha.timed_move("kill", master))
        assert_only_owner(ha, peer)
        nftsync(farm_lab, peer, "sessions", "flush")
        assert_served(farm_lab, peer, SOURCES[:3])
        ha.start(master)
        assert ha.state(master) == "BACKUP"
    print(f"\nVIP move after a crash, 10 runs: {sorted(round(t * 1000) for t in times)} ms")
