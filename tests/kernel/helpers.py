"""Helpers shared by the farm and daemon tests: run nftsync in a lab node, read kernel maps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from lab import Lab

ROOT = Path(__file__).resolve().parents[2]
RULESETS = ROOT / "rulesets"


def nftsync(lab: Lab, node: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`nftsync ARGS` inside a lab node (as root, like a user would run it there)."""
    return lab.exec(node, sys.executable, "-m", "nftsync", *args, check=check)


def nftsync_json(lab: Lab, node: str, *args: str):
    return json.loads(nftsync(lab, node, *args, "--json").stdout)


def map_elements(lab: Lab, node: str, family: str, table: str, name: str) -> dict[str, dict]:
    """Elements of a kernel map as {key text: {"mark": int, "expires": s|None}}, from nft -j."""
    objs = lab.nft_json(node, "list", "map", family, table, name)
    out: dict[str, dict] = {}
    for obj in objs:
        if "map" not in obj:
            continue
        for key, value in obj["map"].get("elem", []):
            attrs = {}
            if isinstance(key, dict) and "elem" in key:
                attrs = key["elem"]
                key = attrs["val"]
            if isinstance(key, dict) and "concat" in key:
                key = " . ".join(str(k) for k in key["concat"])
            out[str(key)] = {"mark": value, "expires": attrs.get("expires")}
    return out


def reset_node(lab: Lab, node: str) -> None:
    """Empty a node's ruleset and conntrack table, so each test starts from a clean kernel."""
    lab.nft(node, "flush", "ruleset")
    lab.exec(node, "conntrack", "-F", check=False)
