"""`nftsync compat migrate`: a running iptables-recent farm moves to its nft farm in the lab,
and no client changes backend (checked with real traffic before and after)."""

from __future__ import annotations

import json

from helpers import RULESETS, map_elements, nftsync, reset_node
from lab import client4

LEGACY = """
[farm]
name = "web"
vip = "10.10.0.100"
proto = "tcp"
ports = [80]
persistence_seconds = 120
mask = "255.255.255.255"
scheduler = "nth"

[[farm.backends]]
mark = 0x200
address = "10.20.0.11:80"

[[farm.backends]]
mark = 0x201
address = "10.20.0.12:80"
"""


def test_migrate_keeps_every_client_on_its_backend(lab, tmp_path):
    reset_node(lab, "lb1")
    legacy = tmp_path / "legacy.toml"
    legacy.write_text(LEGACY)
    nftsync(lab, "lb1", "compat", "rules", str(legacy), "--apply")
    clients = [client4(i) for i in range(1, 21)]
    before = lab.request(port=80, sources=clients, repeat=2)
    assert all(b[0] and b[0] == b[1] for b in before.values()), before
    assert {b[0] for b in before.values()} == {"be1", "be2"}

    plan = json.loads(nftsync(lab, "lb1", "compat", "migrate", "--dry-run", str(legacy),
                              str(RULESETS / "farm-http.nft"), "--json").stdout)
    assert plan["farm"] == "http" and sum(plan["sessions"].values()) == 20
    assert "FARM_web" in lab.exec("lb1", "iptables-save", "-t", "nat").stdout  # untouched

    out = json.loads(nftsync(lab, "lb1", "compat", "migrate", str(legacy),
                             str(RULESETS / "farm-http.nft"), "--json").stdout)
    assert out["rules_removed"] is True
    assert out["sessions"] == {"0x200": 10, "0x201": 10}
    assert "FARM_web" not in lab.exec("lb1", "iptables-save", "-t", "nat").stdout
    # Every legacy session is in the nft map, with its remaining time (legacy: 120 s).
    elems = map_elements(lab, "lb1", "ip", "nftsync_http", "http_sessions")
    marks = {"be1": 0x200, "be2": 0x201}
    assert set(elems) == set(clients)
    for src in clients:
        assert elems[src]["mark"] == marks[before[src][0]]
        assert 100 <= elems[src]["expires"] <= 120, elems[src]
    # And the traffic, now balanced by nftables alone, still goes where it went.
    after = lab.request(port=80, sources=clients, repeat=2)
    assert after == before
    # Errors are clear: a farm whose backends do not fit is refused before anything changes.
    bad = tmp_path / "bad.toml"
    bad.write_text(LEGACY.replace("10.20.0.12:80", "10.20.0.99:80"))
    p = nftsync(lab, "lb1", "compat", "migrate", str(bad), str(RULESETS / "farm-http.nft"),
                check=False)
    assert p.returncode == 2
    assert "backend 0x201 is 10.20.0.12 in farm http but 10.20.0.99 in the legacy farm" in p.stderr
