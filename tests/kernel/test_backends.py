"""`nftsync backend set down` deletes the backend's connections over ctnetlink (no `conntrack`
tool): exactly the entries with its ct mark, IPv4 and IPv6, and says how many."""

from __future__ import annotations

import netns

from nftsync.backends import flush_conntrack
from nftsync.conntrack import CtEntry
from nftsync.netlink.ctsocket import CtWriter, dump


def _entries() -> list[CtEntry]:
    out = []
    for i in range(300):
        mark = (0x200, 0x201, 0x1201)[i % 3]
        out.append(CtEntry.make(f"10.1.{i >> 8}.{i & 255}", 20000 + i, "10.0.0.100", 80,
                                "10.0.1.1", 8080, mark=mark))
    for i in range(20):
        out.append(CtEntry.make(f"2001:db8:1::{i + 1:x}", 30000 + i, "2001:db8::100", 80,
                                "2001:db8:2::1", 8080, mark=0x201))
    return out


def test_flush_conntrack_by_mark(ns: str) -> None:
    entries = _entries()
    with netns.entered(ns):
        with CtWriter() as w:
            assert w.apply([("upsert", e) for e in entries]).created == len(entries)
        assert flush_conntrack(0x201) == 100 + 20
        left = list(dump())
        assert flush_conntrack(0x201) == 0  # nothing left of it: not an error
    assert {e.mark for e in left} == {0x200, 0x1201}
    assert len(left) == len(entries) - 120
