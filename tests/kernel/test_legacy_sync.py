"""The daemon replicates legacy iptables-recent farms: xt_recent tables of lb1 appear on lb2,
deletes follow, and after a failover every client keeps its backend (real traffic)."""

from __future__ import annotations

import pytest
from daemons import SYNC4, DaemonProc, make_key, wait_for
from helpers import nftsync, reset_node
from lab import client4
from test_migrate import LEGACY

TABLES = ("_web_0x200_sessions", "_web_0x201_sessions")


def recent(lab, node: str) -> dict[str, set[str]]:
    out = {}
    for name in TABLES:
        p = lab.exec(node, "cat", f"/proc/net/xt_recent/{name}", check=False)
        out[name] = {ln.split()[0][4:] for ln in p.stdout.splitlines() if ln.startswith("src=")}
    return out


@pytest.fixture
def legacy_pair(lab, tmp_path):
    farm = tmp_path / "legacy.toml"
    farm.write_text(LEGACY)
    key = make_key(tmp_path)
    lab.move_vip("lb1")
    daemons = []
    try:
        for node in ("lb1", "lb2"):
            reset_node(lab, node)
            nftsync(lab, node, "compat", "rules", str(farm), "--apply")
        for i, (node, peer) in enumerate((("lb1", "lb2"), ("lb2", "lb1")), 1):
            d = DaemonProc(lab.ns(node), node, i, SYNC4[node], [SYNC4[peer]], key, tmp_path,
                           role="active" if node == "lb1" else "backup",
                           extra=("--legacy-farm", str(farm)))
            daemons.append(d.start())
        for d in daemons:
            d.wait(lambda d=d: d.peers_up() >= 1, 15, "peer up")
        yield farm, daemons
    finally:
        for d in daemons:
            d.stop()
        lab.move_vip("lb1")


def test_legacy_tables_replicate_and_fail_over(lab, legacy_pair):
    farm, (d1, d2) = legacy_pair
    clients = [client4(i) for i in range(1, 13)]
    before = lab.request(port=80, sources=clients)
    assert {b[0] for b in before.values()} == {"be1", "be2"}
    lb1 = recent(lab, "lb1")
    assert set().union(*lb1.values()) == set(clients)
    # lb2's tables get the same clients, each in its backend's table (polled within ~1 s).
    wait_for(lambda: recent(lab, "lb2") == lb1, 15, "lb2's xt_recent tables equal lb1's")
    shown = d2.ctl("show")["farms"]["web"]
    assert sum(v["count"] for v in shown.values()) == len(clients)

    # A delete on lb1 (the seed's echo -addr) reaches lb2.
    gone = clients[0]
    table = next(t for t, addrs in lb1.items() if gone in addrs)
    nftsync(lab, "lb1", "compat", "recent", "del", table, gone)
    wait_for(lambda: gone not in recent(lab, "lb2")[table], 15, "the delete on lb2")

    # Failover: lb2 takes the VIP; every remaining client keeps its backend.
    lab.move_vip("lb2")
    after = lab.request(port=80, sources=clients[1:])
    assert after == {c: before[c] for c in clients[1:]}
    assert d1.ctl("status")["health"] == "ok"
