"""`nftsync apply` notices hand edits of a farm's tables in the kernel and repairs them.

Each test loads rulesets/farm.nft on lb1 of the netns lab, makes clients stick to backends,
edits the kernel with `nft` by hand and applies the same file again: the drift must be reported
(JSON and text), the farm's rules must be back (read with `nft -j list table` in lb1's
namespace) and every session kept. The old apply trusted its stamp and answered "already applied,
nothing changed" to all of these.
"""

from __future__ import annotations

from typing import Any

import pytest
from helpers import RULESETS, map_elements, nftsync, nftsync_json, reset_node
from lab import client4

FARM = RULESETS / "farm.nft"
TABLE = ("ip", "nftsync_web")
MARK = {"be1": 0x200, "be2": 0x201}


@pytest.fixture(autouse=True)
def clean_lb1(lab):
    reset_node(lab, "lb1")
    yield


def _apply(lab, *extra: str, farm=FARM) -> dict:
    return nftsync_json(lab, "lb1", "apply", str(farm), *extra)


def _sessions(lab) -> dict[str, int]:
    return {k: v["mark"] for k, v in map_elements(lab, "lb1", *TABLE, "web_sessions").items()}


def _loaded(lab, clients: int = 6, farm=FARM) -> dict[str, int]:
    """The farm applied, `clients` clients stuck to their backends; their sessions."""
    _apply(lab, farm=farm)
    seen = lab.request(port=60, sources=[client4(i) for i in range(1, clients + 1)])
    assert all(b[0] in MARK for b in seen.values()), seen
    sessions = _sessions(lab)
    assert sessions == {src: MARK[b[0]] for src, b in seen.items()}
    return sessions


def _rules(lab, chain: str) -> list[list[dict[str, Any]]]:
    objs = lab.nft_json("lb1", "list", "table", *TABLE)
    return [o["rule"]["expr"] for o in objs if "rule" in o and o["rule"]["chain"] == chain]


def _chains(lab) -> set[str]:
    return {o["chain"]["name"] for o in lab.nft_json("lb1", "list", "table", *TABLE)
            if "chain" in o}


def _has_dnat(lab) -> bool:
    return any("dnat" in e for rule in _rules(lab, "web") for e in rule)


def _still_sticks(lab, sessions: dict[str, int]) -> None:
    seen = lab.request(port=60, sources=sorted(sessions))
    assert {src: MARK.get(b[0]) for src, b in seen.items()} == sessions


def test_flushed_chain_is_reported_and_repaired(lab):
    sessions = _loaded(lab)
    lab.nft("lb1", "flush", "chain", *TABLE, "web")
    assert not _has_dnat(lab)

    out = _apply(lab)
    assert out["changed"] and out["applied"]
    drift = [d for d in out["drift"] if d["kind"] == "rule" and d["name"] == "web"]
    assert len(drift) == 6, out["drift"]
    assert all(d["table"] == "ip nftsync_web" and "missing" in d["what"] for d in drift)
    assert any("dnat to meta mark map @web_backends" in d["what"] for d in drift)
    assert _has_dnat(lab) and len(_rules(lab, "web")) == 6
    assert _sessions(lab) == sessions  # kept, not even re-created
    assert out["restored"] == {}
    _still_sticks(lab, sessions)

    # Repaired: the next apply finds nothing to do.
    p = nftsync(lab, "lb1", "apply", str(FARM))
    assert p.returncode == 0
    assert p.stdout.strip() == f"{FARM}: already applied, nothing changed"


def test_drift_in_text_and_dry_run(lab):
    sessions = _loaded(lab, 4)
    lab.nft("lb1", "flush", "chain", *TABLE, "web")

    out = _apply(lab, "--dry-run")
    assert out["changed"] and not out["applied"] and out["drift"]
    assert not _has_dnat(lab)  # a dry run repairs nothing

    p = nftsync(lab, "lb1", "apply", str(FARM))
    assert p.returncode == 0
    assert p.stderr == ""  # no progress line off a terminal
    assert "drift since the last apply (repaired):" in p.stdout
    assert "rule ip nftsync_web web: rule 6 missing: dnat to meta mark map @web_backends" \
        in p.stdout, p.stdout
    assert _has_dnat(lab) and _sessions(lab) == sessions


def test_rule_added_by_hand_is_removed(lab):
    sessions = _loaded(lab, 4)
    lab.nft("lb1", "insert", "rule", *TABLE, "web", "ip", "saddr", "10.10.1.3", "counter", "drop")
    assert len(_rules(lab, "web")) == 7

    out = _apply(lab)
    assert out["applied"]
    assert [(d["kind"], d["name"]) for d in out["drift"]] == [("rule", "web")]
    what = out["drift"][0]["what"]
    assert what.startswith("rule 1 not from the file: [") and "counter" in what, what
    rules = _rules(lab, "web")
    assert len(rules) == 6 and not any("drop" in e for rule in rules for e in rule)
    assert _sessions(lab) == sessions
    _still_sticks(lab, sessions)


def test_deleted_chain_is_recreated(lab):
    sessions = _loaded(lab, 4)
    lab.nft("lb1", "delete", "chain", *TABLE, "prerouting")
    assert "prerouting" not in _chains(lab)

    out = _apply(lab)
    assert out["applied"]
    assert {"table": "ip nftsync_web", "kind": "chain", "name": "prerouting",
            "what": "deleted"} in out["drift"]
    assert "prerouting" in _chains(lab) and len(_rules(lab, "prerouting")) == 1
    assert _sessions(lab) == sessions
    _still_sticks(lab, sessions)


def test_chain_added_by_hand_is_removed(lab):
    _loaded(lab, 2)
    lab.nft("lb1", "add", "chain", *TABLE, "extra")
    lab.nft("lb1", "add", "rule", *TABLE, "extra", "counter")
    out = _apply(lab)
    assert {"table": "ip nftsync_web", "kind": "chain", "name": "extra",
            "what": "added (1 rule)"} in out["drift"]
    assert "extra" not in _chains(lab)


def test_map_timeout_changed_by_hand_is_put_back(lab):
    sessions = _loaded(lab, 4)
    # On 6.x an existing map's timeout is updated in place, elements kept.
    lab.nft("lb1", "add", "map", *TABLE, "web_sessions",
            "{ type ipv4_addr : mark; flags dynamic,timeout; timeout 30s; size 65535; "
            "comment \"nftsync:sessions farm=web key=saddr\"; }")
    info = lab.nft_json("lb1", "list", "map", *TABLE, "web_sessions")[1]["map"]
    assert info["timeout"] == 30

    out = _apply(lab)
    assert out["applied"]
    assert {"table": "ip nftsync_web", "kind": "map", "name": "web_sessions",
            "what": "definition changed (type, flags, timeout, size or comment)"} in out["drift"]
    info = lab.nft_json("lb1", "list", "map", *TABLE, "web_sessions")[1]["map"]
    assert info["timeout"] == 120
    assert out["restored"] == {"ip nftsync_web web_sessions": len(sessions)}
    assert _sessions(lab) == sessions
    _still_sticks(lab, sessions)


def test_what_the_farm_changes_itself_is_no_drift(lab, tmp_path):
    """Sessions, backend states, counters and pinned clients change all the time: no drift."""
    farm = tmp_path / "counted.nft"
    farm.write_text(FARM.read_text().replace("tcp dport $PORT jump web",
                                             "tcp dport $PORT counter jump web"))
    _loaded(lab, 6, farm=farm)
    nftsync(lab, "lb1", "backend", "set", "0x201", "drain")
    nftsync(lab, "lb1", "sessions", "add", "10.10.1.40", "0x200", "--expires", "30s")
    nftsync(lab, "lb1", "sessions", "add", "--static", "10.10.1.41", "0x201")
    lab.request(port=60, sources=[client4(i) for i in range(7, 12)])
    counter = [e["counter"] for rule in _rules(lab, "prerouting") for e in rule if "counter" in e]
    assert counter and counter[0]["packets"] > 0

    p = nftsync(lab, "lb1", "apply", str(farm))
    assert p.returncode == 0
    assert p.stdout.strip() == f"{farm}: already applied, nothing changed"
    out = _apply(lab, farm=farm)
    assert out["changed"] is False and out["drift"] == []
    rows = {r["backend"]: r["state"] for r in nftsync_json(lab, "lb1", "backend", "list")}
    assert rows["0x201"] == "drain"
