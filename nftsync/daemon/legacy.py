"""Legacy farms' xt_recent tables as replicated session tables (a `KernelTarget`).

xt_recent raises no events, so its tables are polled (they are small: `ip_list_tot`, 100 entries
by default); what changed since the last poll is replicated like any session. Entries do not
leave an xt_recent table when their time is up (the `--seconds` check just stops matching), so
only `-addr` and `/` make deletions. What the daemon writes itself is folded into the last poll
right away, so it is not mistaken for a local change and echoed.

Records travel as sessions of map `recent/<table name>` (the seed's `_FARM_0x200_sessions`),
keyed by the packed client address, with the backend mark of the table and the remaining time
(persistence seconds - age of the last packet): never the jiffies, which mean nothing elsewhere.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field

from nftsync.compat.iptables import Backend, LegacyFarm, load_farm
from nftsync.compat.xtrecent import XtRecentError, XtRecentTable
from nftsync.datatypes import ADDRESS_LENGTHS
from nftsync.replication import ElementOp

from .target import SinkStats

log = logging.getLogger("nftsync.daemon")

PREFIX = "recent/"


@dataclass(slots=True)
class Change:
    key: bytes
    mark: int | None  # None: deleted
    remaining_ms: int


@dataclass
class LegacyMap:
    """One xt_recent table of a legacy farm (one backend)."""

    farm: LegacyFarm
    backend: Backend
    table: XtRecentTable
    last: dict[str, int] = field(default_factory=dict)  # address -> last_seen at the last poll
    stats: SinkStats = field(default_factory=SinkStats)

    @property
    def map_id(self) -> str:
        return PREFIX + self.table.name

    @property
    def mark(self) -> int:
        return self.backend.mark

    def key_valid(self, key: bytes) -> bool:
        return len(key) in ADDRESS_LENGTHS.values()

    def key_text(self, key: bytes) -> str:
        return str(ipaddress.ip_address(key))

    def read(self) -> list[Change]:
        """Entries that are new or were refreshed since the last read, and deletions."""
        try:
            sessions = {s.addr: s for s in self.table.sessions(include_expired=True)}
            entries = {e.addr: e.last_seen for e in self.table.list()}
        except (OSError, XtRecentError) as exc:
            self.stats.last_error = f"{self.table.name}: {exc}"
            return []
        out = []
        for addr, seen in entries.items():
            if self.last.get(addr) == seen:
                continue
            s = sessions.get(addr)
            remaining = s.remaining_s if s is not None and s.remaining_s is not None else 0
            if remaining > 0:
                out.append(Change(ipaddress.ip_address(addr).packed, self.mark,
                                  int(remaining * 1000)))
        out += [Change(ipaddress.ip_address(a).packed, None, 0) for a in self.last
                if a not in entries]
        self.last = entries
        return out

    def apply(self, ops: list[ElementOp]) -> None:
        """Small /proc writes, done at once (no writer thread), folded into the next poll."""
        for op in ops:
            addr = self.key_text(op.key)
            try:
                if op.mark is None:
                    self.table.delete(addr)
                else:
                    self.table.add(addr, remaining_s=max(1.0, op.remaining_ms / 1000))
                self.stats.applied += 1
            except (OSError, XtRecentError) as exc:
                self.stats.failed += 1
                self.stats.last_error = f"{self.table.name} {addr}: {exc}"
                log.warning("could not apply %s", self.stats.last_error)
        self.stats.transactions += 1
        # What we wrote is not a local change: fold it into the last poll.
        try:
            self.last = {e.addr: e.last_seen for e in self.table.list()}
        except (OSError, XtRecentError) as exc:
            self.stats.last_error = f"{self.table.name}: {exc}"

    def problems(self) -> list[str]:
        """Nothing waits for retry: a refused /proc write is counted failed (the table is
        polled, so what it holds is read back and replicated as it is)."""
        return []


def load_legacy_maps(files: list[str]) -> dict[str, LegacyMap]:
    maps: dict[str, LegacyMap] = {}
    for path in files:
        farm = load_farm(path)
        for backend in farm.backends:
            table = XtRecentTable(farm.table_name(backend), farm.seconds)
            lm = LegacyMap(farm, backend, table)
            maps[lm.map_id] = lm
    return maps
