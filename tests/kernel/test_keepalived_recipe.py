"""The one keepalived recipe (contrib/keepalived/README.md, "What keepalived tracks"), in the lab.

The recipe: keepalived decides on the network only (adverts on `front`, `track_interface back`)
and tracks nothing of nftsync; the notify script only sets the daemon's role. These tests run the
shipped `contrib/keepalived/keepalived.conf` itself (netns-lab/ha.sh maps its example values onto
the lab), with both daemons and real clients through the VIP, and check each failure case the
README promises against the kernel: who holds the VIP on `front` and `back`, what the session
maps hold, which clients are served by which backend.

The cluster (farm, daemons started as `backup`, keepalived up with lb1 MASTER) is
test_failover's `cluster` fixture, on a lab of this module's own. The last test runs the recipe
the docs used to give, `nftsync ctl status` as a vrrp_script, to show why it is not the recipe:
a cut sync link fails both nodes and the VIP is nowhere.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import test_failover
from daemons import wait_for
from ha import Ha, HaError
from lab import GW4, GW6, VIP4, VIP6, Lab
from test_failover import (
    MARKS,
    NODES,
    PEER,
    Cluster,
    assert_all_served,
    assert_same_backend,
    clients,
    converged,
    served,
    sessions,
    unsteer,
)

# test_failover's fixtures, registered in this module: a lab ("fo…") and a cluster of our own.
fo_lab = test_failover.fo_lab
cluster = test_failover.cluster

RECIPE = Path(__file__).resolve().parents[2] / "contrib" / "keepalived" / "keepalived.conf"
# How long a failure is watched for a VIP move that must not happen: many adverts, and longer
# than keepalived would need to act on a track script (interval 1 s, fall 2) if there were one.
HOLD_S = 4.0


def status_rc(cluster: Cluster, node: str, *args: str) -> int:
    """Exit code of `nftsync ctl status` on `node`: what a keepalived vrrp_script would read
    (0 ok, 1 degraded/starting/syncing, 2 failing, 3 no answer)."""
    sock = cluster.lab.state_dir / f"{node}.sock"
    p = subprocess.run([sys.executable, "-m", "nftsync", "ctl", "--socket", str(sock), "status",
                        *args], capture_output=True, text=True, timeout=120, check=False)
    return p.returncode


def holders(ha: Ha) -> tuple[list[str], ...]:
    """Who holds each of the four addresses keepalived manages (v4/v6, front/back)."""
    return (ha.holders(VIP4, "front"), ha.holders(VIP6, "front"), ha.holders(GW4, "back"),
            ha.holders(GW6, "back"))


def assert_vip_stays(ha: Ha, node: str, seconds: float = HOLD_S) -> None:
    """`node` alone holds every VIP address, MASTER, its peer BACKUP, and keepalived runs no
    notify script, for `seconds` (polled): nothing moved and nothing is about to."""
    calls = {n: len(ha.notify_calls(n)) for n in NODES}
    deadline = time.monotonic() + seconds
    while True:
        assert holders(ha) == ([node],) * 4, f"VIP holders changed: {holders(ha)}"
        assert (ha.state(node), ha.state(PEER[node])) == ("MASTER", "BACKUP")
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert {n: len(ha.notify_calls(n)) for n in NODES} == calls, \
        {n: ha.notify_calls(n) for n in NODES}


def replicated(lab: Lab, node: str, want: dict[str, str | None], what: str) -> None:
    """Wait (bounded) until `node`'s kernel session map holds each client with its backend's
    mark."""
    marks = {s: MARKS[b] for s, b in want.items()}
    wait_for(lambda: all(sessions(lab, node).get(s) == m for s, m in marks.items()), 30, what)


def first_clients_everywhere(cluster: Cluster) -> dict[str, str | None]:
    """Clients 1-20 through the VIP (lb1), replicated into lb2's kernel: the state before a
    failure."""
    before = served(cluster.lab, clients(1, 20))
    assert_all_served(before, clients(1, 20))
    assert set(sessions(cluster.lab, "lb1")) >= set(before), "traffic did not go through lb1"
    replicated(cluster.lab, "lb2", before, "clients 1-20 replicated to lb2")
    return before


# --- the shipped recipe is what the lab runs -----------------------------------------------------
def directives(text: str) -> list[str]:
    """keepalived's view of a file: no comments, no blank lines."""
    return [ln.strip() for ln in (re.sub(r"\s*[#!].*$", "", line) for line in text.splitlines())
            if ln.strip()]


# The recipe's example values (its header's addressing), the only tokens the lab may change.
EXAMPLE_VALUES = {"eth0", "eth1", "192.0.2.2", "192.0.2.3", "192.0.2.100/24", "198.51.100.1/24",
                  "2001:db8:10::100/64", "2001:db8:20::1/64", "51", "0.2"}
NOTIFY = "notify /usr/lib/nftsync/nftsync-notify.sh"


def test_the_lab_runs_the_shipped_recipe_with_only_its_example_values_replaced(cluster: Cluster):
    shipped = directives(RECIPE.read_text())
    assert not [d for d in shipped if re.match(r"(vrrp_script|track_script|track_process)\b", d)]
    assert shipped.count(NOTIFY) == 1
    for node in NODES:
        generated = directives(cluster.ha.conf(node))
        assert len(generated) == len(shipped), node
        for a, b in zip(shipped, generated, strict=True):
            if a == NOTIFY:  # the lab's root-owned copy of the script, with the lab's settings
                assert b == (f'notify "{cluster.ha.state_dir}/nftsync-notify.sh --defaults '
                             f'{cluster.ha.state_dir}/{node}.notify.env"')
                continue
            ta, tb = a.split(), b.split()
            assert len(ta) == len(tb), (a, b)
            changed = {x for x, y in zip(ta, tb, strict=True) if x != y}
            assert changed <= EXAMPLE_VALUES, (a, b)
        assert f"advert_int {cluster.ha.advert_int:g}" in generated
    # keepalived picked its node's @lines: lb1 with priority 150, lb2 with 100.
    assert {c.priority for c in cluster.ha.notify_calls("lb1")} == {150}
    assert {c.priority for c in cluster.ha.notify_calls("lb2")} == {100}


def test_ha_sh_refuses_a_recipe_it_cannot_map_onto_the_lab(fo_lab: Lab, tmp_path: Path):
    """A recipe that changed shape stops the lab with the reason, instead of running something
    else than what is shipped."""
    for old, new, message in [
        ("    advert_int 0.2\n", "    advert_int 1\n", "no directive with advert_int 0.2"),
        ("        192.0.2.100/24 dev eth0\n",
         "        192.0.2.100/24 dev eth0\n        192.0.2.101/24 dev eth0\n",
         "example values ha.sh does not map onto the lab: .*192.0.2.101"),
    ]:
        variant = tmp_path / "keepalived.conf"
        text = RECIPE.read_text()
        assert old in text
        variant.write_text(text.replace(old, new))
        with pytest.raises(HaError, match=message):
            Ha(fo_lab, env={"HA_RECIPE": str(variant)}).start("lb1")
    assert Ha(fo_lab).keepalived_pid("lb1") is None


# --- (a) the sync link is cut --------------------------------------------------------------------
def test_a_cut_sync_link_leaves_the_vip_on_the_master_and_the_daemons_reconverge(
        cluster: Cluster):
    lab, ha = cluster.lab, cluster.ha
    before = first_clients_everywhere(cluster)
    lab.cut_sync()
    try:
        for node in NODES:
            d = cluster.daemons[node]
            d.wait(lambda d=d: d.peers_up() == 0, 20, "peer seen down")
        # Both daemons say `failing` now: what a health vrrp_script would fail on, on both nodes.
        for node in NODES:
            wait_for(lambda node=node: status_rc(cluster, node) == 2, 20, f"{node} failing")
        assert_vip_stays(ha, "lb1")
        # Clients are served through the master: the old ones by their backend, new ones too.
        assert_same_backend(before, served(lab, clients(1, 20)))
        during = served(lab, clients(21, 40))
        assert_all_served(during, clients(21, 40))
        assert set(sessions(lab, "lb1")) >= set(during)
        assert not set(during) & set(sessions(lab, "lb2")), "the sync link was not cut"
        assert_vip_stays(ha, "lb1", 0.5)
    finally:
        lab.restore_sync()
    cluster.wait_peers(30)
    replicated(lab, "lb2", {**before, **during}, "sessions made during the cut reach lb2")
    wait_for(lambda: converged(lab), 30, "identical session maps")
    for node in NODES:
        wait_for(lambda node=node: status_rc(cluster, node) == 0, 30, f"{node} ok again")
    assert_vip_stays(ha, "lb1", 0.5)
    assert (cluster.role("lb1"), cluster.role("lb2")) == ("active", "backup")


# --- (b) a daemon dies -------------------------------------------------------------------------
@pytest.mark.parametrize("node", ["lb1", "lb2"], ids=["on the master", "on the backup"])
def test_a_dead_daemon_moves_nothing_and_its_restart_catches_up(cluster: Cluster, node: str):
    """The kernel serves without the daemon, so the VIP stays where it is; the daemon restarted
    (by systemd in production) gives or takes what the other node missed meanwhile."""
    lab, ha = cluster.lab, cluster.ha
    before = first_clients_everywhere(cluster)
    cluster.daemons[node].stop(signal.SIGKILL)
    assert status_rc(cluster, node) == 3  # nobody answers on its socket
    other = cluster.daemons[PEER[node]]
    other.wait(lambda: other.peers_up() == 0, 20, "peer seen down")
    assert_vip_stays(ha, "lb1")
    assert_same_backend(before, served(lab, clients(1, 20)))
    during = served(lab, clients(21, 40))
    assert_all_served(during, clients(21, 40))
    assert set(sessions(lab, "lb1")) >= set(during)  # the packet path, daemon or not
    assert not set(during) & set(sessions(lab, "lb2")), "replicated without a daemon?"

    cluster.start_daemon(node, "backup")  # the configuration's role, as systemd would start it
    assert status_rc(cluster, node, "--wait-ready", "--timeout", "60") == 0
    replicated(lab, "lb2", {**before, **during}, "sessions made while the daemon was dead on lb2")
    wait_for(lambda: converged(lab), 30, "identical session maps")
    assert_vip_stays(ha, "lb1", 0.5)
    # The role is a label the restarted daemon takes from its configuration until the next VRRP
    # transition (contrib/keepalived/README.md says so); replication does not depend on it.
    assert cluster.role(node) == "backup"


# --- the master dies while the sync link is cut -------------------------------------------------
def test_the_backup_takes_the_vip_when_the_master_dies_during_a_sync_cut(cluster: Cluster):
    """A `failing` daemon does not keep its node from taking over: a node with the sessions of
    before the cut serves far better than no node."""
    lab, ha = cluster.lab, cluster.ha
    before = first_clients_everywhere(cluster)
    lab.cut_sync()
    try:
        wait_for(lambda: status_rc(cluster, "lb2") == 2, 20, "lb2 failing")
        assert_vip_stays(ha, "lb1")  # lb2 stays a BACKUP, ready to take over
        took = ha.timed_move("kill", "lb1")
        print(f"\nVIP on lb2 {took * 1000:.0f} ms after `ha.sh kill lb1`, lb2's daemon failing")
        deadline = time.monotonic() + HOLD_S
        while time.monotonic() < deadline:  # and keeps it, its daemon failing or not
            assert holders(ha) == (["lb2"],) * 4 and ha.state("lb2") == "MASTER"
            time.sleep(0.05)
        ha.wait_notified("lb2", "MASTER")
        assert ha.notify_calls("lb2")[-1].outcome.startswith("ok"), ha.notify_calls("lb2")
        assert cluster.role("lb2") == "active"
        assert_same_backend(before, served(lab, clients(1, 20)))
    finally:
        lab.restore_sync()


# --- what the recipe is not: `ctl status` as a vrrp_script ----------------------------------------
def health_script_recipe(lab: Lab, path: Path) -> Path:
    """The shipped recipe plus the vrrp_script the docs once gave (`nftsync ctl status`, every
    non-zero exit a failure), with the lab's sockets. The scripts sit in the lab's root-owned
    state dir, as enable_script_security requires."""
    for node in NODES:
        script = lab.state_dir / f"{node}.health"
        script.write_text(f"#!/bin/sh\nexec {sys.executable} -m nftsync ctl --socket "
                          f"{lab.state_dir / f'{node}.sock'} status >/dev/null 2>&1\n")
        script.chmod(0o755)
    text = RECIPE.read_text()
    block = ("vrrp_script nftsync_health {\n"
             f"    @lb1 script {lab.state_dir / 'lb1.health'}\n"
             f"    @lb2 script {lab.state_dir / 'lb2.health'}\n"
             "    interval 1\n    timeout 10\n    fall 2\n    rise 1\n}\n\n")
    notify = "    notify /usr/lib/nftsync/nftsync-notify.sh\n"
    assert notify in text and "vrrp_instance nftsync {" in text
    text = text.replace("vrrp_instance nftsync {", block + "vrrp_instance nftsync {")
    text = text.replace(notify, notify + "    track_script {\n        nftsync_health\n    }\n")
    path.write_text(text)
    return path


def test_ctl_status_as_a_vrrp_script_leaves_the_vip_nowhere_when_the_sync_link_is_cut(
        cluster: Cluster, tmp_path: Path):
    lab = cluster.lab
    cluster.ha.down()
    for node in NODES:
        wait_for(lambda node=node: status_rc(cluster, node) == 0, 30, f"{node} ok")
    cluster.ha = Ha(lab, env={"HA_RECIPE": str(health_script_recipe(lab, tmp_path / "k.conf"))})
    ha = cluster.ha
    ha.up()  # teardown's ha.down() stops it (ha.sh's state is per lab)
    ha.wait_notified("lb1", "MASTER")
    assert "track_script" in ha.conf("lb1")
    before = first_clients_everywhere(cluster)
    lab.cut_sync()
    try:
        # Both daemons fail (no peer): keepalived puts both nodes in FAULT, nobody serves.
        wait_for(lambda: (ha.state("lb1"), ha.state("lb2")) == ("FAULT", "FAULT"), 30,
                 "both nodes FAULT")
        wait_for(lambda: holders(ha) == ([],) * 4, 5, "the VIP released everywhere")
        print(f"\nwith `ctl status` tracked, sync link cut: lb1 {ha.state('lb1')}, lb2 "
              f"{ha.state('lb2')}, VIP holders {holders(ha)[0]}")
        # Nobody answers ARP for the VIP any more: once the client forgets lb1's MAC (flushed
        # here, a neighbour timeout later in real life), nothing reaches the farm.
        unsteer(lab)
        lost = served(lab, clients(1, 5))
        assert all(b is None for b in lost.values()), lost
    finally:
        lab.restore_sync()
    # The link back: the daemons reconnect, the scripts pass, a node takes the VIP again.
    wait_for(lambda: len(ha.holders()) == 1, 40, "a VIP holder again")
    assert_same_backend(before, served(lab, clients(1, 20)))
