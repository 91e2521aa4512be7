"""xt_recent adapter: the /proc parser on crafted text, then the real (stock) kernel in a netns."""

from __future__ import annotations

import ipaddress
import subprocess

import netns
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nftsync.compat.clock import (
    KernelClock,
    initial_jiffies,
    jiffies_diff,
)
from nftsync.compat.xtrecent import (
    MAX_LINE,
    ProcFormatError,
    RecentSession,
    TableFullError,
    XtRecentError,
    XtRecentTable,
    diff_entries,
    format_stamps_command,
    ip_list_tot,
    parse_line,
    parse_proc,
    probe_patched,
)

SEED_LINE = ("src=192.168.56.1 ttl: 64 last_seen: 4298231337 oldest_pkt: 3 "
             "4298229032, 4298230236, 4298231337")


# -- parser, on crafted text ------------------------------------------------------------------

def test_parse_seed_line() -> None:
    e = parse_line(SEED_LINE)
    assert (e.addr, e.ttl, e.last_seen, e.index, e.hits) == ("192.168.56.1", 64, 4298231337, 3, 3)
    assert e.stamps == (4298229032, 4298230236, 4298231337)


def test_parse_ipv6_full_form_is_canonicalised() -> None:
    e = parse_line("src=2001:0db8:0000:0000:0000:0000:0000:0007 ttl: 0 last_seen: 5 "
                   "oldest_pkt: 1 5")
    assert e.addr == "2001:db8::7" and e.family == 6


def test_parse_wrapped_ring_orders_stamps_oldest_first() -> None:
    # A 4-slot ring after 6 packets (stamps 10..15): slots [14, 15, 12, 13], next write slot 2.
    e = parse_line("src=10.0.0.1 ttl: 0 last_seen: 15 oldest_pkt: 2 14, 15, 12, 13")
    assert e.stamps == (12, 13, 14, 15)
    # The patched kernel's full ring: newest in slot 0, next write (oldest) slot 1.
    e = parse_line("src=10.0.0.1 ttl: 0 last_seen: 9 oldest_pkt: 1 9, 6, 7, 8")
    assert e.stamps == (6, 7, 8, 9)


@pytest.mark.parametrize("line, what", [
    ("src=10.0.0.1 ttl: 0 last_seen: 5 oldest_pkt: 1", "not an xt_recent entry"),
    ("src=10.0.0.1 ttl: 0 last_seen: 5 oldest_pkt: 1 5,", "not an xt_recent entry"),
    ("src=10.0.0.1 ttl: x last_seen: 5 oldest_pkt: 1 5", "not an xt_recent entry"),
    ("src=10.0.0.999 ttl: 0 last_seen: 5 oldest_pkt: 1 5", "bad address"),
    ("src=10.0.0.1 ttl: 300 last_seen: 5 oldest_pkt: 1 5", "ttl 300"),
    ("src=10.0.0.1 ttl: 0 last_seen: 5 oldest_pkt: 3 4, 5", "oldest_pkt 3"),
    ("src=10.0.0.1 ttl: 0 last_seen: 7 oldest_pkt: 2 4, 5", "last_seen 7"),
    ("garbage", "not an xt_recent entry"),
    ("src=10.0.0.1 ttl: 0 last_seen: 5 oldest_pkt: 1 5 extra", "not an xt_recent entry"),
])
def test_malformed_line_names_file_and_line(line: str, what: str) -> None:
    text = SEED_LINE + "\n" + line + "\n"
    with pytest.raises(ProcFormatError) as err:
        parse_proc(text, source="/proc/net/xt_recent/x")
    assert "/proc/net/xt_recent/x:2" in str(err.value) and what in str(err.value)


def _kernel_ring_line(addr: str, ring_bits: int, stamps: list[int]) -> str:
    """What recent_entry_init/recent_entry_update + recent_seq_show print after these packets."""
    mask = (1 << ring_bits) - 1
    ring = [0] * (mask + 1)
    ring[0], nstamps, index = stamps[0], 1, 1
    for s in stamps[1:]:
        index &= mask
        ring[index] = s
        index += 1
        nstamps = max(nstamps, index)
    last = ring[(index - 1) & mask]
    body = ", ".join(str(x) for x in ring[:nstamps])
    return f"src={addr} ttl: 0 last_seen: {last} oldest_pkt: {index} {body}"


@given(ring_bits=st.integers(0, 6),
       steps=st.lists(st.integers(0, 1000), min_size=1, max_size=300),
       start=st.integers(0, 2**64 - 1))
def test_parser_recovers_packet_order_of_any_ring_state(ring_bits: int, steps: list[int],
                                                        start: int) -> None:
    stamps, t = [], start
    for d in steps:
        t = (t + d) % 2**64
        stamps.append(t)
    e = parse_line(_kernel_ring_line("10.0.0.1", ring_bits, stamps))
    assert list(e.stamps) == stamps[-(1 << ring_bits):]


def test_overlong_line_and_too_many_entries_are_refused() -> None:
    with pytest.raises(ProcFormatError, match="longer than any the kernel writes"):
        parse_line("src=10.0.0.1 " + "1" * MAX_LINE)
    with pytest.raises(ProcFormatError, match="more than 2 entries"):
        parse_proc("\n".join([SEED_LINE] * 3), max_entries=2)


def test_stamps_command_format() -> None:
    assert format_stamps_command("2001:db8::1", 5, [1, 2]) == b"*2001:db8::1;5;1;2;"
    with pytest.raises(XtRecentError):
        format_stamps_command("10.0.0.1", 0, [])


def test_jiffies_arithmetic() -> None:
    assert initial_jiffies(250) == 2**32 - 300 * 250
    assert initial_jiffies(1000, bits=32) == 2**32 - 300_000
    # 32-bit wrap: 10 ticks after 2^32 - 5 is 5.
    assert jiffies_diff(5, 2**32 - 5, bits=32) == 10
    assert jiffies_diff(2**32 - 5, 5, bits=32) == -10
    clock = KernelClock(hz=100, bits=32)
    assert clock.stamp_for_age(0.2, 5) == 2**32 - 15
    assert clock.age_s(2**32 - 15, 5) == pytest.approx(0.2)


# -- the real kernel (stock xt_recent), in a namespace ----------------------------------------

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
