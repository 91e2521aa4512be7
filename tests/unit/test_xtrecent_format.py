"""xt_recent's /proc format without a kernel: the parser on crafted text (ring orders, IPv6,
malformed lines with file and line), the stamps command and jiffies arithmetic. Against the stock
kernel in a netns: tests/kernel/test_compat_xtrecent.py."""

from __future__ import annotations

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
    XtRecentError,
    format_stamps_command,
    parse_line,
    parse_proc,
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
