"""xt_recent adapter against the real (stock) kernel in a netns (the parser on crafted text:
tests/unit/test_xtrecent_format.py)."""

from __future__ import annotations

import ipaddress
import subprocess

import netns
import pytest

from nftsync.compat.clock import (
    KernelClock,
    initial_jiffies,
    jiffies_diff,
)
from nftsync.compat.xtrecent import (
    RecentSession,
    TableFullError,
    XtRecentError,
    XtRecentTable,
    diff_entries,
    ip_list_tot,
    parse_proc,
    probe_patched,
)


@pytest.fixture
def table_ns(ns: str) -> str:
    """A namespace with xt_recent table `t` (made by a check-only rule: no packet stamps it)."""
    netns.run(ns, "iptables", "-w", "-A", "INPUT", "-m", "recent", "--name", "t", "--rcheck",
              "--seconds", "100")
    return ns


def _raw(ns: str) -> str:
    return netns.run(ns, "cat", "/proc/net/xt_recent/t").stdout


def test_stock_commands_round_trip(table_ns: str) -> None:
    with netns.entered(table_ns):
        t = XtRecentTable("t", 100, patched=False)
        assert t.list() == []
        t.add("192.0.2.1", 100)
        t.add("2001:db8::1", 100)
        raw = parse_proc(_raw(table_ns))
        assert sorted(e.addr for e in t.list()) == ["192.0.2.1", "2001:db8::1"]
        assert sorted(t.list(), key=lambda e: e.addr) == sorted(raw, key=lambda e: e.addr)
        assert t.delete("192.0.2.1") is True
        assert t.delete("192.0.2.1") is False
        assert [e.addr for e in t.list()] == ["2001:db8::1"]
        t.flush()
        assert t.list() == []
    assert _raw(table_ns) == ""


def test_adapter_reads_exactly_what_the_kernel_prints(table_ns: str) -> None:
    for _ in range(3):
        netns.run(table_ns, "sh", "-c", "echo +198.51.100.7 > /proc/net/xt_recent/t")
    netns.run(table_ns, "sh", "-c", "echo +2001:db8::42 > /proc/net/xt_recent/t")
    raw = _raw(table_ns)
    with netns.entered(table_ns):
        entries = {e.addr: e for e in XtRecentTable("t", 100).list()}
    for line in raw.splitlines():
        fields = line.split()
        addr = str(ipaddress.ip_address(fields[0][4:]))
        e = entries.pop(addr)
        assert (e.ttl, e.last_seen, e.index) == (int(fields[2]), int(fields[4]), int(fields[6]))
        assert sorted(e.stamps) == sorted(int(s.rstrip(",")) for s in fields[7:])
    assert entries == {}
    assert len(raw.splitlines()) == 2


def test_probe_says_absent_on_the_stock_kernel() -> None:
    patched, why = probe_patched()
    assert patched is False, why


def test_fallback_add_resets_to_full_timeout(table_ns: str) -> None:
    with netns.entered(table_ns):
        t = XtRecentTable("t", 100)  # patched=None: probes, finds the stock kernel
        res = t.add("192.0.2.9", remaining_s=10)
        assert (res.method, res.exact, res.replaced) == ("plus", False, False)
        e = t.get("192.0.2.9")
        assert e is not None and e.hits == 1 and e.ttl == 0
        rem = e.remaining_s(100, t.clock, t.clock.now())
        assert 99.0 <= rem <= 100.0  # reset to the full --seconds, not the 10 s asked for
        # Adding again replaces (one stamp), rather than appending a second stamp.
        res = t.add("192.0.2.9", remaining_s=10)
        assert res.replaced and t.get("192.0.2.9").hits == 1


def test_stamps_command_is_refused_by_the_stock_kernel(table_ns: str) -> None:
    with netns.entered(table_ns):
        t = XtRecentTable("t", 100, patched=True)
        with pytest.raises(XtRecentError, match="timestamps patch"):
            t.add("192.0.2.9", remaining_s=10)
        assert t.list() == []


def test_remaining_time_from_jiffies(table_ns: str) -> None:
    netns.run(table_ns, "sh", "-c", "echo +192.0.2.20 > /proc/net/xt_recent/t")
    with netns.entered(table_ns):
        t = XtRecentTable("t", 100)
        clock = t.clock
        now = clock.now()
        e = t.get("192.0.2.20")
        assert e is not None
        # The kernel stamped the entry with jiffies just before we read them.
        assert 0 <= jiffies_diff(now, e.last_seen) < clock.hz
        assert 99.0 < e.remaining_s(100, clock, now) <= 100.0
        [s] = t.sessions()
        assert s.addr == "192.0.2.20" and 99.0 < s.remaining_s <= 100.0
        # last_seen carries INITIAL_JIFFIES: now - INITIAL_JIFFIES is the uptime in ticks.
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        assert abs((now - initial_jiffies(clock.hz)) / clock.hz - uptime) < 1.0


def test_uptime_estimate_is_never_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without /proc/timer_list, now() estimates from /proc/uptime, one second on the safe side:
    the kernel's jiffies read afterwards are at or past it, by no more than ~1.5 s."""
    import nftsync.compat.clock as clockmod
    clock = KernelClock.detect()
    real = clockmod.read_timer_list_jiffies
    monkeypatch.setattr(clockmod, "read_timer_list_jiffies", lambda path="": None)
    est = clock.now()
    exact = real()
    assert exact is not None
    assert 0 <= jiffies_diff(exact, est) <= 2 * clock.hz


def test_full_table_is_reported_not_silently_evicted(table_ns: str) -> None:
    cap = ip_list_tot()
    script = ";".join(f"echo +10.1.{i // 250}.{i % 250 + 1} > /proc/net/xt_recent/t"
                      for i in range(cap))
    netns.run(table_ns, "sh", "-c", script)
    with netns.entered(table_ns):
        t = XtRecentTable("t", 100, patched=False)
        assert len(t.list()) == cap
        with pytest.raises(TableFullError, match=f"full \\({cap} of ip_list_tot={cap}"):
            t.add("192.0.2.77", 50)
        assert t.get("192.0.2.77") is None and t.get("10.1.0.1") is not None
        # Replacing an address already there never evicts.
        assert t.add("10.1.0.2", 50).evicted is False
        res = t.add("192.0.2.77", 50, allow_evict=True)
        assert res.evicted
        entries = t.list()
        assert len(entries) == cap
        assert t.get("192.0.2.77") is not None and t.get("10.1.0.1") is None  # the oldest went


def test_missing_table_is_a_clear_error(ns: str) -> None:
    with netns.entered(ns), pytest.raises(XtRecentError, match="exists only while an iptables"):
        XtRecentTable("nothere", 10).list()


def test_cli_recent_and_probe(table_ns: str) -> None:
    import json
    import sys
    from pathlib import Path
    exe = str(Path(sys.executable).with_name("nftsync"))

    def cli(*args: str) -> subprocess.CompletedProcess:
        return netns.run(table_ns, exe, "compat", *args, check=False)

    r = cli("recent", "add", "t", "192.0.2.5", "--remaining", "30", "--seconds", "100", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["method"] == "plus"
    r = cli("recent", "list", "t", "--seconds", "100", "--json")
    data = json.loads(r.stdout)
    assert [e["addr"] for e in data["entries"]] == ["192.0.2.5"]
    assert data["entries"][0]["stamps"] == [parse_proc(_raw(table_ns))[0].last_seen]
    r = cli("recent", "add", "t", "not-an-ip")
    assert r.returncode == 2 and "not an IPv4/IPv6 address" in r.stderr
    assert cli("recent", "del", "t", "192.0.2.5").returncode == 0
    assert _raw(table_ns) == ""
    r = cli("probe", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["patched"] is False


def test_add_many_one_read_one_open(table_ns: str) -> None:
    with netns.entered(table_ns):
        t = XtRecentTable("t", 100)
        t.add("192.0.2.1", 100)
        batch = [RecentSession("192.0.2.1", (5.0,)), RecentSession("192.0.2.2", (9.0, 3.0)),
                 RecentSession("2001:db8::2", (1.0,))]
        res = t.add_many(batch)
        assert [(r.method, r.replaced) for r in res] == [("plus", True), ("plus", False),
                                                          ("plus", False)]
        assert sorted(e.addr for e in t.list()) == ["192.0.2.1", "192.0.2.2", "2001:db8::2"]
        assert all(e.hits == 1 for e in t.list())
        assert sorted(parse_proc(_raw(table_ns)), key=lambda e: e.addr) == \
            sorted(t.list(), key=lambda e: e.addr)


def test_add_many_checks_the_whole_batch_before_writing(table_ns: str) -> None:
    cap = ip_list_tot()
    with netns.entered(table_ns):
        t = XtRecentTable("t", 100, patched=False)
        batch = [RecentSession(f"10.3.{i // 250}.{i % 250 + 1}", (1.0,)) for i in range(cap + 2)]
        with pytest.raises(TableFullError, match=f"{cap + 2} new addresses do not fit"):
            t.add_many(batch)
        assert t.list() == []  # nothing written
        res = t.add_many(batch, allow_evict=True)
        assert sum(r.evicted for r in res) == 2 and len(t.list()) == cap


def test_diff_between_two_reads(table_ns: str) -> None:
    with netns.entered(table_ns):
        t = XtRecentTable("t", 100, patched=False)
        for a in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
            t.add(a, 100)
        before = t.list()
        assert diff_entries(before, t.list()) == diff_entries([], [])  # nothing changed
        t.delete("192.0.2.2")
        t.add("2001:db8::5", 100)
        t._write(b"+192.0.2.3")  # a packet-like update: one more stamp on a known address
        d = diff_entries(before, t.list())
        assert sorted(e.addr for e in d.upserted) == ["192.0.2.3", "2001:db8::5"]
        assert d.deleted == ("192.0.2.2",)
        assert [e.hits for e in d.upserted if e.addr == "192.0.2.3"] == [2]
