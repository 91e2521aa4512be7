"""The netns lab itself: its topology, its servers and tools, and its life cycle, with real traffic.

Each test checks kernel state or packets that flowed, never wall-clock time. The DNAT rulesets
here are minimal stand-ins installed with plain `nft -f` for the test only; nftsync's own rulesets
are tested elsewhere.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from lab import (
    BACKENDS4,
    BACKENDS6,
    CLIENT_PY,
    GW4,
    GW6,
    STATE_ROOT,
    SYNC4,
    SYNC6,
    VIP4,
    VIP6,
    Lab,
    LabError,
    client4,
    client6,
    lab_namespaces,
    lab_sh,
    unique_prefix,
)

NAT_TABLE = "labtest"


def dnat_ruleset(backend: str = "be1", udp_backend: str = "be2") -> str:
    """VIP:80 and :7000 (TCP, v4 + v6) to `backend`, VIP:60/udp to `udp_backend`, with counters."""
    b4, b6 = BACKENDS4[backend], BACKENDS6[backend]
    u4 = BACKENDS4[udp_backend]
    return f"""
table inet {NAT_TABLE} {{
    chain pre {{
        type nat hook prerouting priority dstnat; policy accept;
        ip daddr {VIP4} tcp dport {{ 80, 7000 }} counter dnat ip to {b4}
        ip daddr {VIP4} udp dport 60 counter dnat ip to {u4}
        ip6 daddr {VIP6} tcp dport {{ 80, 7000 }} counter dnat ip6 to {b6}
    }}
}}
"""


def install_dnat(lab: Lab, node: str, **kw: str) -> None:
    lab.nft(node, "-f", "-", input=dnat_ruleset(**kw))


def remove_dnat(lab: Lab, node: str) -> None:
    tables = [o["table"]["name"] for o in lab.nft_json(node, "list", "tables") if "table" in o]
    if NAT_TABLE in tables:
        lab.nft(node, "delete", "table", "inet", NAT_TABLE)


def rule_packets(lab: Lab, node: str) -> list[int]:
    """Packet counts of the test table's rules, in rule order (from `nft -j list table`)."""
    counts = []
    for obj in lab.nft_json(node, "list", "table", "inet", NAT_TABLE):
        for expr in obj.get("rule", {}).get("expr", []):
            if "counter" in expr:
                counts.append(expr["counter"]["packets"])
    return counts


def addrs(lab: Lab, node: str, dev: str) -> set[str]:
    out = lab.exec(node, "ip", "-j", "addr", "show", "dev", dev).stdout
    return {f"{a['local']}/{a['prefixlen']}" for link in json.loads(out)
            for a in link["addr_info"] if a.get("scope") == "global"}


@pytest.fixture
def dnat_lb1(lab: Lab):
    install_dnat(lab, "lb1")
    try:
        yield
    finally:
        remove_dnat(lab, "lb1")


# --- topology ----------------------------------------------------------------------------------
def test_addresses_are_the_documented_ones(lab: Lab):
    client = addrs(lab, "client", "front")
    assert {f"{client4(i)}/16" for i in range(1, 51)} <= client
    assert {f"{client6(i)}/64" for i in range(1, 51)} <= client
    assert len(client) == 100
    assert addrs(lab, "lb1", "front") == {"10.10.0.2/16", f"{VIP4}/16", "fd00:10::2/64",
                                          f"{VIP6}/64"}
    assert addrs(lab, "lb1", "back") == {"10.20.0.2/24", f"{GW4}/24", "fd00:20::2/64",
                                         f"{GW6}/64"}
    assert addrs(lab, "lb2", "front") == {"10.10.0.3/16", "fd00:10::3/64"}
    assert addrs(lab, "lb2", "back") == {"10.20.0.3/24", "fd00:20::3/64"}
    for node in ("lb1", "lb2"):
        assert addrs(lab, node, "sync") == {f"{SYNC4[node]}/30", f"{SYNC6[node]}/64"}
        fwd = lab.exec(node, "sysctl", "-n", "net.ipv4.ip_forward",
                       "net.ipv6.conf.all.forwarding").stdout.split()
        assert fwd == ["1", "1"]
    assert addrs(lab, "be1", "back") == {"10.20.0.11/24", "fd00:20::11/64"}
    assert addrs(lab, "be2", "back") == {"10.20.0.12/24", "fd00:20::12/64"}
    # The switch routes nothing: it has two bridges and no address.
    bridges = json.loads(lab.exec("sw", "ip", "-j", "link", "show", "type", "bridge").stdout)
    assert sorted(b["ifname"] for b in bridges) == ["back", "front"]
    assert json.loads(lab.exec("sw", "ip", "-j", "-4", "addr").stdout)[0]["ifname"] == "lo"


def test_no_route_out_of_the_lab(lab: Lab):
    """`ip route get` only asks the routing table: nothing is sent."""
    for node in lab.nodes:
        for dst in ("1.1.1.1", "2606:4700:4700::1111"):
            p = lab.exec(node, "ip", "route", "get", dst, check=False)
            assert p.returncode != 0, f"{node} has a route to {dst}: {p.stdout}"
        assert lab.exec(node, "ip", "route", "show", "default").stdout.strip() == ""
        assert lab.exec(node, "ip", "-6", "route", "show", "default").stdout.strip() == ""


def test_nothing_of_the_lab_in_the_root_namespace(lab: Lab):
    links = json.loads(subprocess.run(["ip", "-j", "link", "show"], capture_output=True,
                                      check=True).stdout)
    assert not [link["ifname"] for link in links if link["ifname"] in ("front", "back", "sync")]
    assert sorted(lab_namespaces(lab.prefix)) == sorted(lab.ns(n) for n in lab.nodes)


# --- servers and tools -------------------------------------------------------------------------
@pytest.mark.parametrize("port", [60, 80, 443, 8080])
@pytest.mark.parametrize("family", [4, 6])
def test_backends_answer_tcp_directly(lab: Lab, port: int, family: int):
    # From lb1's back address, straight to each backend (no NAT in the path).
    for name in ("be1", "be2"):
        vip, src = (BACKENDS4[name], "10.20.0.2") if family == 4 else (BACKENDS6[name],
                                                                        "fd00:20::2")
        records, summary = lab.request_raw(port=port, vip=vip, sources=[src], repeat=3,
                                           node="lb1")
        assert [r["backend"] for r in records] == [name] * 3, records
        assert summary["ok"] == 3


@pytest.mark.parametrize("port", [60, 5353])
def test_backends_answer_udp_directly(lab: Lab, port: int):
    got4 = lab.request_raw(port=port, proto="udp", vip=BACKENDS4["be2"], sources=["10.20.0.3"],
                           node="lb2")
    got6 = lab.request_raw(port=port, proto="udp", vip=BACKENDS6["be1"], sources=["fd00:20::3"],
                           node="lb2")
    assert [r["backend"] for r in got4[0]] == ["be2"]
    assert [r["backend"] for r in got6[0]] == ["be1"]


def test_a_bare_line_gets_the_name(lab: Lab):
    """The HTTP port answers any single line, not only HTTP requests."""
    code = ("import socket; s = socket.create_connection(('10.20.0.12', 8080), 2); "
            "s.sendall(b'hello\\n'); print(s.recv(4096).decode())")
    out = lab.exec("lb2", sys.executable, "-c", code).stdout
    assert out.startswith("HTTP/1.0 200 OK") and out.rstrip().endswith("be2")


def test_without_a_ruleset_the_vip_does_not_reach_backends(lab: Lab):
    records, summary = lab.request_raw(port=80, sources=[client4(1), client4(2)], timeout=1)
    assert summary["ok"] == 0
    assert {r["error"] for r in records} == {"refused"}  # lb1 holds the VIP, listens on nothing


def test_dnat_tcp_v4_every_source(lab: Lab, dnat_lb1):
    got = lab.request(port=80)
    assert set(got) == {client4(i) for i in range(1, 51)}
    assert all(v == ["be1"] for v in got.values()), got
    assert rule_packets(lab, "lb1")[0] >= 50  # one new connection per request went through DNAT


def test_dnat_udp_v4(lab: Lab, dnat_lb1):
    got = lab.request(port=60, proto="udp", sources=f"{client4(1)}-{client4(10)}", repeat=2)
    assert got == {client4(i): ["be2", "be2"] for i in range(1, 11)}
    assert rule_packets(lab, "lb1")[1] >= 20


def test_dnat_tcp_v6(lab: Lab, dnat_lb1):
    got = lab.request(port=80, vip=VIP6, sources=f"{client6(1)}-{client6(12)}")
    assert got == {client6(i): ["be1"] for i in range(1, 13)}
    assert rule_packets(lab, "lb1")[2] >= 12


def test_many_short_connections(lab: Lab, dnat_lb1):
    records, summary = lab.request_raw(port=80, repeat=20, parallel=32)
    assert summary == {**summary, "requests": 1000, "ok": 1000, "failed": 0,
                       "backends": {"be1": 1000}}
    assert len(records) == 1000


def test_stream_gets_consecutive_numbers(lab: Lab, dnat_lb1):
    rep = lab.stream(source=client4(7), seconds=1.0).result()
    assert rep["backend"] == "be1" and rep["backends_seen"] == ["be1"]
    assert rep["first"] == 1 and rep["lines"] >= 10 and rep["last"] == rep["lines"]
    assert rep["missing"] == 0 and rep["gaps"] == [] and rep["out_of_order"] == 0
    assert not rep["reset"] and not rep["eof"] and rep["error"] is None


def test_stream_v6(lab: Lab, dnat_lb1):
    rep = lab.stream(source=client6(3), vip=VIP6, seconds=0.5).result()
    assert rep["backend"] == "be1" and rep["missing"] == 0 and rep["lines"] >= 5


def test_client_rejects_bad_input(lab: Lab):
    p = lab.python("client", CLIENT_PY, "request", "--sources", "10.10.1.1-10.10.1.250",
                   "--repeat", "100", check=False)
    assert p.returncode == 2 and "cap" in p.stderr
    p = lab.python("client", CLIENT_PY, "request", "--sources", "10.10.1.9-10.10.1.2", check=False)
    assert p.returncode == 2 and "end before start" in p.stderr


def test_v6_source_ranges_count_in_lab_notation():
    spec = importlib.util.spec_from_file_location("lab_client", CLIENT_PY)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["lab_client"] = mod  # dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
    finally:
        del sys.modules["lab_client"]
    assert mod.parse_sources("fd00:10::1:9-fd00:10::1:11") == [
        "fd00:10::1:9", "fd00:10::1:10", "fd00:10::1:11"]
    assert mod.parse_sources("fd00::a-fd00::c") == ["fd00::a", "fd00::b", "fd00::c"]
    assert mod.parse_sources("10.10.1.254-10.10.2.1,10.0.0.1") == [
        "10.10.1.254", "10.10.1.255", "10.10.2.0", "10.10.2.1", "10.0.0.1"]


# --- failover knobs ----------------------------------------------------------------------------
def test_vip_moves_to_lb2_and_back(lab: Lab, dnat_lb1):
    try:
        lab.move_vip("lb2")
        assert lab.active() == "lb2"
        assert f"{VIP4}/16" in addrs(lab, "lb2", "front")
        assert f"{GW6}/64" in addrs(lab, "lb2", "back")
        assert f"{VIP4}/16" not in addrs(lab, "lb1", "front")
        assert f"{GW4}/24" not in addrs(lab, "lb1", "back")
        # lb2 holds the VIP but has no ruleset yet: nothing reaches a backend.
        _, summary = lab.request_raw(port=80, sources=[client4(1)], timeout=1)
        assert summary["ok"] == 0
        # With a ruleset on lb2 (be2 this time, to see which LB is in the path) it works.
        install_dnat(lab, "lb2", backend="be2")
        try:
            got = lab.request(port=80, sources=f"{client4(1)}-{client4(5)}")
            assert got == {client4(i): ["be2"] for i in range(1, 6)}
            got6 = lab.request(port=80, vip=VIP6, sources=[client6(1)])
            assert got6 == {client6(1): ["be2"]}
            assert rule_packets(lab, "lb2")[0] >= 5
        finally:
            remove_dnat(lab, "lb2")
        lab.move_vip("none")
        assert f"{VIP4}/16" not in addrs(lab, "lb2", "front")
        _, summary = lab.request_raw(port=80, sources=[client4(1)], timeout=0.5)
        assert summary["ok"] == 0
        # Nobody answers now: a run still ends by itself, sending nothing past --max-seconds.
        records, summary = lab.request_raw(port=80, timeout=0.2, parallel=1, max_seconds=0.5)
        assert summary["requests"] == 50 and summary["ok"] == 0
        assert records[-1]["error"] == "not sent: --max-seconds reached"
    finally:
        lab.move_vip("lb1")
    assert lab.request(port=80, sources=[client4(2)]) == {client4(2): ["be1"]}


def test_sync_link_cut_and_restore(lab: Lab):
    assert lab.ping("lb1", SYNC4["lb2"]) and lab.ping("lb2", SYNC6["lb1"])
    try:
        lab.cut_sync()
        assert not lab.ping("lb1", SYNC4["lb2"], timeout=0.3)
        assert not lab.ping("lb2", SYNC4["lb1"], timeout=0.3)
        assert not lab.ping("lb1", SYNC6["lb2"], timeout=0.3)
        # Only the sync link is cut: the LBs still see each other on the front segment.
        assert lab.ping("lb1", "10.10.0.3")
    finally:
        lab.restore_sync()
    assert lab.ping("lb1", SYNC4["lb2"]) and lab.ping("lb1", SYNC6["lb2"])
    assert addrs(lab, "lb1", "sync") == {f"{SYNC4['lb1']}/30", f"{SYNC6['lb1']}/64"}


def test_announce_updates_neighbour_caches(lab: Lab):
    """GARP and unsolicited NA from client.py correct a stale entry (no flush involved)."""
    link = json.loads(lab.exec("lb1", "ip", "-j", "link", "show", "dev", "front").stdout)
    mac = link[0]["address"]
    try:
        for vip in (VIP4, VIP6):
            lab.exec("client", "ip", "neigh", "replace", vip, "lladdr", "02:00:00:00:00:01",
                     "dev", "front", "nud", "stale")
        lab.python("lb1", CLIENT_PY, "announce", "--dev", "front", "--addr", VIP4, "--addr", VIP6)
        for vip in (VIP4, VIP6):
            entry = json.loads(lab.exec("client", "ip", "-j", "neigh", "show", vip).stdout)
            assert [e["lladdr"] for e in entry] == [mac], entry
    finally:
        lab.exec("client", "ip", "neigh", "flush", "dev", "front")
        lab.exec("client", "ip", "-6", "neigh", "flush", "dev", "front")


def test_reset_restores_the_default(lab: Lab):
    try:
        install_dnat(lab, "lb2")
        lab.move_vip("lb2")
        lab.cut_sync()
        assert lab.request(port=80, sources=[client4(4)]) == {client4(4): ["be1"]}
        assert int(lab.exec("lb2", "conntrack", "-C").stdout) >= 1
    finally:
        lab.reset()
    assert lab.active() == "lb1" and f"{VIP4}/16" in addrs(lab, "lb1", "front")
    assert lab.nft_json("lb2", "list", "ruleset")[1:] == []  # only the metainfo object
    assert int(lab.exec("lb2", "conntrack", "-C").stdout) == 0
    assert lab.ping("lb2", SYNC4["lb1"])


def test_bad_knob_arguments_fail_clearly(lab: Lab):
    with pytest.raises(LabError, match="vip needs lb1, lb2 or none"):
        lab_sh(lab.prefix, "vip", "lb3")
    with pytest.raises(LabError, match="usage: link sync"):
        lab_sh(lab.prefix, "link", "front", "down")
    with pytest.raises(LabError, match="unknown node"):
        lab_sh(lab.prefix, "exec", "router", "true")
    assert "active LB: lb1" in lab.status()


# --- life cycle --------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie nobody has reaped yet (killed all the same)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_down_removes_everything_and_is_idempotent():
    small = Lab.up(clients=3, backends=3)
    try:
        pids = small.recorded_pids()
        assert len(pids) == 3 and all(_pid_alive(p) for p in pids)
        # The recorded pids are the servers themselves, not shells in between.
        for pid in pids:
            assert b"backend.py" in Path(f"/proc/{pid}/cmdline").read_bytes()
        assert len(lab_namespaces(small.prefix)) == 7
        # A stray process inside the lab is killed by down as well (found by `ip netns pids`).
        stray = small.stream(source=client4(1), seconds=30)
    finally:
        small.down()
    assert lab_namespaces(small.prefix) == []
    assert not (STATE_ROOT / small.prefix).exists()
    assert not any(_pid_alive(p) for p in pids)
    assert stray.proc.poll() is not None
    small.down()  # twice is fine
    assert lab_namespaces(small.prefix) == []


def test_up_refuses_an_existing_lab(lab: Lab):
    with pytest.raises(LabError, match="already exists"):
        Lab.up(prefix=lab.prefix)
    assert lab.status().count("running") == 2  # the existing lab is untouched


@pytest.mark.parametrize("env", [{"LAB_BACKENDS": "9"}, {"LAB_BACKENDS": "two"},
                                 {"LAB_CLIENTS": "0"}])
def test_up_with_bad_parameters_leaves_nothing(env: dict[str, str]):
    prefix = unique_prefix()
    with pytest.raises(LabError, match="must be an integer"):
        lab_sh(prefix, "up", env=env)
    assert lab_namespaces(prefix) == []
    assert not (STATE_ROOT / prefix).exists()


def test_up_failing_midway_tears_down_what_it_made():
    """Backends that cannot start fail `up` after every namespace exists: the trap cleans up."""
    prefix = unique_prefix()
    with pytest.raises(LabError, match="exited at start"):
        lab_sh(prefix, "up", env={"LAB_PYTHON": "/bin/false", "LAB_BACKENDS": "1"})
    assert lab_namespaces(prefix) == []
    assert not (STATE_ROOT / prefix).exists()


def test_lab_factory_makes_independent_labs(lab_factory):
    a, b = lab_factory(clients=2, backends=1), lab_factory(clients=2, backends=1)
    install_dnat(a, "lb1", udp_backend="be1")
    # Same addresses in both labs, and they do not see each other: b has no ruleset.
    assert a.request(port=60, proto="udp", sources=[client4(2)]) == {client4(2): ["be1"]}
    assert b.request(port=60, proto="udp", sources=[client4(2)], timeout=0.5) == {
        client4(2): [None]}
