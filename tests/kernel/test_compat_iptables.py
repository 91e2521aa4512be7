"""Legacy farm rules with real traffic through a client/lb/backend lab (description parsing:
tests/unit/test_compat_rules.py).

Lab (all addresses exist only inside the lab's namespaces, no route out):
    client 10.77.1.2-.5 --veth-- 10.77.1.1 lb 10.77.2.1 --veth-- 10.77.2.10, .11 backend
The VIP 10.77.9.100:8080 lives nowhere: the lb DNATs it in PREROUTING to backend:80. The backend
runs one small TCP server that answers each connection with the address it was reached on."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import netns
import pytest
from builders import LEGACY_BACKENDS, LEGACY_VIP, LEGACY_VPORT, legacy_farm_dict

from nftsync.compat.iptables import (
    IptablesRunner,
    LegacyFarm,
    apply_farm,
    parse_farm,
    remove_farm,
)
from nftsync.compat.xtrecent import XtRecentTable, parse_proc, tables

# iptables-legacy in the VM (tests/kernel/vm), the host's iptables (-nft on Debian 12) otherwise.
IPTABLES = os.environ.get("NFTSYNC_IPTABLES", "iptables")
VIP, VPORT, BACKENDS = LEGACY_VIP, LEGACY_VPORT, LEGACY_BACKENDS
CLIENTS = ["10.77.1.2", "10.77.1.3", "10.77.1.4", "10.77.1.5"]


# -- description ------------------------------------------------------------------------------

SERVER = r"""
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 80)); s.listen(64); s.settimeout(1.0)
print("ready", flush=True)
deadline = time.monotonic() + 60
served = 0
while time.monotonic() < deadline and served < 200:
    try:
        c, _ = s.accept()
    except socket.timeout:
        continue
    c.sendall(c.getsockname()[0].encode()); c.close(); served += 1
"""


@dataclass
class LegacyLab:
    client: str
    lb: str
    backend: str
    server: subprocess.Popen

    def connect(self, src: str) -> str:
        """One TCP connection from client address `src` to the VIP; returns the backend's
        address that answered."""
        with netns.entered(self.client), socket.create_connection(
                (VIP, VPORT), timeout=5, source_address=(src, 0)) as s:
            return s.recv(64).decode()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def legacy_lab() -> Iterator[LegacyLab]:
    tag = uuid.uuid4().hex[:6]
    names = [f"cx{tag}-c", f"cx{tag}-lb", f"cx{tag}-be"]
    created: list[str] = []
    server = None
    try:
        for n in names:
            _ip("netns", "add", n)
            created.append(n)
            _ip("-n", n, "link", "set", "lo", "up")
        c, lb, be = names
        _ip("link", "add", f"cx{tag}c", "netns", c, "type", "veth", "peer", "name", "l0",
            "netns", lb)
        _ip("link", "add", f"cx{tag}b", "netns", be, "type", "veth", "peer", "name", "l1",
            "netns", lb)
        _ip("-n", c, "link", "set", f"cx{tag}c", "name", "c0")
        _ip("-n", be, "link", "set", f"cx{tag}b", "name", "b0")
        for a in CLIENTS:
            _ip("-n", c, "addr", "add", f"{a}/24", "dev", "c0")
        _ip("-n", lb, "addr", "add", "10.77.1.1/24", "dev", "l0")
        _ip("-n", lb, "addr", "add", "10.77.2.1/24", "dev", "l1")
        for a in BACKENDS.values():
            _ip("-n", be, "addr", "add", f"{a}/24", "dev", "b0")
        for n, dev in ((c, "c0"), (lb, "l0"), (lb, "l1"), (be, "b0")):
            _ip("-n", n, "link", "set", dev, "up")
        _ip("-n", c, "route", "add", "10.77.9.0/24", "via", "10.77.1.1")
        _ip("-n", be, "route", "add", "10.77.1.0/24", "via", "10.77.2.1")
        netns.run(lb, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        server = subprocess.Popen(["ip", "netns", "exec", be, sys.executable, "-c", SERVER],
                                  stdout=subprocess.PIPE, text=True)
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        yield LegacyLab(c, lb, be, server)
    finally:
        if server is not None:
            server.kill()
            server.wait(timeout=10)
        for n in created:
            netns.delete(n)


def _table(legacy_lab: LegacyLab, mark: int) -> list:
    raw = netns.run(legacy_lab.lb, "cat", f"/proc/net/xt_recent/_lab_0x{mark:x}_sessions").stdout
    return parse_proc(raw)


def test_legacy_farm_traffic_persistence_and_adapter(legacy_lab: LegacyLab) -> None:
    farm: LegacyFarm = parse_farm(legacy_farm_dict())
    runner = IptablesRunner(iptables=IPTABLES, netns=legacy_lab.lb)
    apply_farm(farm, runner)
    apply_farm(farm, runner)  # idempotent: one jump, same chain
    save = netns.run(legacy_lab.lb, f"{IPTABLES}-save", "-t", "nat").stdout
    assert save.count("-j FARM_lab") == 1

    first = {src: legacy_lab.connect(src) for src in CLIENTS}
    # Round robin over new clients: both backends used, two clients each.
    assert sorted(first.values()) == sorted(list(BACKENDS.values()) * 2)
    # Persistence: each client comes back to its backend.
    for src in CLIENTS:
        assert legacy_lab.connect(src) == first[src]

    # The kernel's tables hold each client under its backend's mark...
    by_mark = {m: {e.addr for e in _table(legacy_lab, m)} for m in BACKENDS}
    for src, backend in first.items():
        mark = next(m for m, a in BACKENDS.items() if a == backend)
        assert src in by_mark[mark]
        assert all(src not in by_mark[m] for m in BACKENDS if m != mark)
    # ... with one stamp per new connection (two connections each), and the adapter reads
    # exactly what the raw file says.
    with netns.entered(legacy_lab.lb):
        assert sorted(tables()) == ["_lab_0x200_sessions", "_lab_0x201_sessions"]
        for m in BACKENDS:
            t = XtRecentTable(f"_lab_0x{m:x}_sessions", 120)
            entries = sorted(t.list(), key=lambda e: e.addr)
            assert entries == sorted(_table(legacy_lab, m), key=lambda e: e.addr)
            assert all(e.hits == 2 and e.ttl == 64 for e in entries)
            assert all(0 < s.remaining_s <= 120 for s in t.sessions())

    # Moving a client with the adapter moves its traffic: delete it from its table, add it
    # to the other backend's table (stock kernel: +addr fallback).
    src = CLIENTS[0]
    old = next(m for m, a in BACKENDS.items() if a == first[src])
    new = next(m for m in BACKENDS if m != old)
    with netns.entered(legacy_lab.lb):
        assert XtRecentTable(f"_lab_0x{old:x}_sessions", 120).delete(src)
        moved = XtRecentTable(f"_lab_0x{new:x}_sessions", 120)
        res = moved.add(src, remaining_s=60)
        [s] = [s for s in moved.sessions() if s.addr == src]
        # The VM run (tests/kernel/vm) sets this: there the kernel has the patch.
        assert res.exact or not os.environ.get("NFTSYNC_EXPECT_PATCHED")
        if res.method == "plus":  # stock kernel: the session restarts at the full 120 s
            assert 119 < s.remaining_s <= 120
        else:  # patched kernel: exactly the 60 s asked for
            assert res.exact and 59 < s.remaining_s <= 60
    for _ in range(3):
        assert legacy_lab.connect(src) == BACKENDS[new]

    # Re-applying the farm keeps the tables' entries (the rules are swapped in one commit).
    before = {m: {e.addr for e in _table(legacy_lab, m)} for m in BACKENDS}
    apply_farm(farm, runner)
    assert {m: {e.addr for e in _table(legacy_lab, m)} for m in BACKENDS} == before

    # Removal takes the jumps, the chain and the tables away; other nat rules stay.
    netns.run(legacy_lab.lb, IPTABLES, "-w", "-t", "nat", "-A", "POSTROUTING", "-o", "l1", "-j",
              "RETURN")
    assert remove_farm(farm, runner) is True
    assert remove_farm(farm, runner) is False
    save = netns.run(legacy_lab.lb, f"{IPTABLES}-save", "-t", "nat").stdout
    assert "FARM_lab" not in save and "-A POSTROUTING -o l1 -j RETURN" in save
    assert netns.run(legacy_lab.lb, "ls", "/proc/net/xt_recent").stdout == ""
    with pytest.raises(OSError):
        legacy_lab.connect(CLIENTS[1])  # nothing DNATs the VIP any more


def test_cli_rules_apply_and_remove(ns: str, tmp_path) -> None:
    import json
    from pathlib import Path
    exe = str(Path(sys.executable).with_name("nftsync"))
    f = tmp_path / "farm.json"
    f.write_text(json.dumps(legacy_farm_dict()))
    r = netns.run(ns, exe, "compat", "rules", str(f), "--apply", "--json", check=False)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert len(data["rules"]) == 6 and data["chain"] == "FARM_lab"
    assert netns.run(ns, "ls", "/proc/net/xt_recent").stdout.split() == [
        "_lab_0x200_sessions", "_lab_0x201_sessions"]
    r = netns.run(ns, exe, "compat", "rules", str(f), "--remove", check=False)
    assert r.returncode == 0 and "removed chain FARM_lab" in r.stdout
    f.write_text("{")
    r = netns.run(ns, exe, "compat", "rules", str(f), check=False)
    assert r.returncode == 2 and "farm.json" in r.stderr
