"""An active-active mesh of three daemons: every node's changes reach both others, once.

Three namespaces on one bridge (10.40.0.1-3/24, in a fourth "switch" namespace), each with the
same farm and a daemon listing the two others as peers.
"""

from __future__ import annotations

import subprocess

import netns
import pytest
from daemons import DaemonProc, make_key, wait_for
from helpers import RULESETS

NODES = {"n1": "10.40.0.1", "n2": "10.40.0.2", "n3": "10.40.0.3"}


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


@pytest.fixture
def mesh(tmp_path):
    made: list[str] = []
    daemons: dict[str, DaemonProc] = {}
    try:
        sw = netns.create("msw")
        made.append(sw)
        sh("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", sw, "link", "set", "br0", "up")
        spaces = {}
        for i, (node, addr) in enumerate(NODES.items(), 1):
            ns = netns.create(f"m{node}")
            made.append(ns)
            spaces[node] = ns
            sh("ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name",
               f"p{i}", "netns", sw)
            sh("ip", "-n", sw, "link", "set", f"p{i}", "master", "br0", "up")
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            netns.run(ns, "nft", "-f", str(RULESETS / "farm-http.nft"))
        key = make_key(tmp_path)
        for i, (node, addr) in enumerate(NODES.items(), 1):
            others = [a for n, a in NODES.items() if n != node]
            daemons[node] = DaemonProc(spaces[node], node, i, addr, others, key, tmp_path,
                                       role="active").start()
        for d in daemons.values():
            d.wait(lambda d=d: d.peers_up() == 2, 20, "two peers up")
        yield spaces, daemons
    finally:
        for d in daemons.values():
            d.stop()
        for ns in made:
            netns.delete(ns)


def elements(ns: str) -> dict[str, int]:
    import json

    out = netns.run(ns, "nft", "-j", "list", "map", "ip", "nftsync_http", "http_sessions").stdout
    objs = json.loads(out)["nftables"]
    res = {}
    for obj in objs:
        for key, value in obj.get("map", {}).get("elem", []):
            if isinstance(key, dict):
                key = key["elem"]["val"]
            res[key] = value
    return res


def nftsync_in(ns: str, *args: str) -> None:
    import sys

    netns.run(ns, sys.executable, "-m", "nftsync", *args)


def test_mesh_of_three_converges(mesh):
    spaces, daemons = mesh
    # Each node learns sessions of its own: admin adds, and conntrack entries of the farm
    # (a NEW conntrack event with the farm's mark is how real traffic is learned).
    for i, ns in enumerate(spaces.values(), 1):
        for j in range(1, 6):
            nftsync_in(ns, "sessions", "add", f"10.10.{i}.{j}", "0x200" if j % 2 else "0x201")
        netns.run(ns, "conntrack", "-I", "-p", "tcp", "-s", f"10.10.{i}.100", "-d",
                  "10.10.0.100", "--sport", "40000", "--dport", "80", "-r", "10.20.0.12",
                  "-q", f"10.10.{i}.100", "--reply-port-src", "80", "--reply-port-dst", "40000",
                  "--state", "ESTABLISHED", "-u", "SEEN_REPLY,ASSURED", "-t", "600",
                  "-m", "0x201")
    # A conntrack entry inserted by hand makes the daemon learn its client's session, which the
    # *other* nodes receive; on its own node no packet ran `update @map`, so the map lacks it.
    admin = {f"10.10.{i}.{j}" for i in (1, 2, 3) for j in (1, 2, 3, 4, 5)}
    for k, ns in enumerate(spaces.values(), 1):
        want = admin | {f"10.10.{i}.100" for i in (1, 2, 3) if i != k}
        wait_for(lambda ns=ns, want=want: set(elements(ns)) == want, 15, f"sessions on {ns}")
    tables = [{k: v for k, v in elements(ns).items() if k in admin} for ns in spaces.values()]
    assert tables[0] == tables[1] == tables[2]
    for ns in spaces.values():
        out = netns.run(ns, "conntrack", "-L", "-p", "tcp", "--dport", "80").stdout
        assert sum("src=10.20.0.12" in ln for ln in out.splitlines()) == 3, out

    # The same client changed on two nodes at once: all three agree on one winner.
    nftsync_in(spaces["n1"], "sessions", "add", "10.10.9.9", "0x200")
    nftsync_in(spaces["n2"], "sessions", "add", "10.10.9.9", "0x201")
    wait_for(lambda: len({elements(ns).get("10.10.9.9") for ns in spaces.values()}) == 1
             and elements(spaces["n3"]).get("10.10.9.9") is not None, 15, "one winner")

    # Nobody echoes: every record a node received came from its origin, none was rejected.
    for d in daemons.values():
        for peer in d.ctl("peers"):
            assert peer["rejected"] == 0, peer
    # A delete on one node reaches the others.
    nftsync_in(spaces["n3"], "sessions", "del", "10.10.1.1")
    for ns in spaces.values():
        wait_for(lambda ns=ns: "10.10.1.1" not in elements(ns), 15, f"delete on {ns}")
