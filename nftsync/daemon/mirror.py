"""The daemon's in-memory mirror of what it replicates.

Why a mirror: the kernel does not tell us about packet-path session refreshes, and dumping a big
timeout map is quadratic, so the daemon keeps its own compact copy of every replicated session
and conntrack entry, learned from events. Snapshots for peers are made from it, never from the
kernel; and it is what lets a receiver decide whether an incoming record is newer than what it has.

Conflict rule (docs/protocol.md): the newest `updated_ms` wins, then the highest origin node id.
Deletes are kept as tombstones for a while so that a stale add cannot resurrect them.

Origin 0 marks entries found in the kernel at start-up whose origin is unknown ("unverified"):
an active node claims them, a backup keeps them until its peers' snapshots confirm or sweep them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

UNVERIFIED = 0
TOMBSTONE_S = 120.0  # how long a delete is remembered
SWEEP_BUDGET = 10_000  # entries looked at per sweep slice (~2.5 ms; 5 slices/s: 1M in 20 s)


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(slots=True)
class Entry:
    """A session (value = mark) or conntrack entry (value = CtEntry) with its replication facts."""

    value: object | None  # None: deleted (tombstone)
    expires_at: float | None  # monotonic seconds; None: never expires (static pins)
    updated_ms: int  # origin's wall clock at the last change
    origin: int
    touched: float  # monotonic time of the last local change or accepted record

    def remaining_ms(self, now: float) -> int:
        if self.expires_at is None:
            return 0
        return max(1, int((self.expires_at - now) * 1000))

    @property
    def alive(self) -> bool:
        return self.value is not None


def newer(updated_ms: int, origin: int, cur: Entry | None) -> bool:
    if cur is None:
        return True
    return (updated_ms, origin) > (cur.updated_ms, cur.origin)


class Table:
    """One replicated table: a session map (keys: bytes) or the conntrack table (keys: tuples)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.entries: dict[object, Entry] = {}
        self._dead = 0  # tombstones in `entries`, so that len() needs no scan of a 1M table
        self._sweep_keys: list[object] | None = None  # the current incremental expiry pass
        self._sweep_pos = 0

    def __len__(self) -> int:
        return len(self.entries) - self._dead

    def get(self, key: object) -> Entry | None:
        e = self.entries.get(key)
        return e if e is not None and e.alive else None

    def local_set(self, key: object, value: object, expires_at: float | None, origin: int,
                  updated_ms: int | None = None, now: float | None = None,
                  wall_ms: int | None = None) -> Entry:
        """A change made on this node (learned from the kernel): always wins locally.

        `now`/`wall_ms` (monotonic s, wall ms) let a caller applying a batch read the clocks
        once; `updated_ms` is taken as given (a dump's estimate), not bumped past the old one.
        """
        cur = self.entries.get(key)
        if updated_ms is None:
            # A local change is newer than anything we hold for the key, even within one ms
            # (a delete + add in one transaction must not tie, or the add would lose).
            updated_ms = wall_ms if wall_ms is not None else now_ms()
            if cur is not None and updated_ms <= cur.updated_ms:
                updated_ms = cur.updated_ms + 1
        if cur is not None and cur.value is None:
            self._dead -= 1
        e = Entry(value, expires_at, updated_ms, origin,
                  now if now is not None else time.monotonic())
        self.entries[key] = e
        return e

    def _next_ms(self, key: object) -> int:
        ms = now_ms()
        cur = self.entries.get(key)
        if cur is not None and ms <= cur.updated_ms:
            ms = cur.updated_ms + 1
        return ms

    def local_delete(self, key: object, origin: int) -> Entry | None:
        """A deletion made on this node; returns the tombstone, or None if we had nothing."""
        cur = self.entries.get(key)
        if cur is None or not cur.alive:
            return None
        now = time.monotonic()
        e = Entry(None, now + TOMBSTONE_S, self._next_ms(key), origin, now)
        self.entries[key] = e
        self._dead += 1
        return e

    def pop(self, key: object) -> Entry:
        """Remove an entry outright (sweep after a snapshot); KeyError if absent."""
        e = self.entries.pop(key)
        if e.value is None:
            self._dead -= 1
        return e

    def merge(self, key: object, value: object | None, remaining_ms: int, updated_ms: int,
              origin: int) -> Entry | None:
        """A record from a peer: returns the new entry if it won, None if ours is newer."""
        cur = self.entries.get(key)
        if not newer(updated_ms, origin, cur):
            if cur is not None:
                cur.touched = time.monotonic()  # still confirmed by this origin's snapshot
            return None
        now = time.monotonic()
        if value is None:
            expires = now + TOMBSTONE_S
            self._dead += 1
        else:
            expires = None if remaining_ms == 0 else now + remaining_ms / 1000
        if cur is not None and cur.value is None:
            self._dead -= 1
        e = Entry(value, expires, updated_ms, origin, now)
        self.entries[key] = e
        return e

    def sweep_expired(self, now: float, budget: int = SWEEP_BUDGET) -> int:
        """Forget entries past their expiry (the kernel expires them on its own).

        Incremental: each call looks at up to `budget` keys of a key list taken at the start of
        a pass, so a big table never stalls the event loop (a full scan of 1M entries takes
        longer than a replication batch should wait). An entry is forgotten at most one pass
        after its expiry; until then it is only ever re-sent with the minimum remaining time.
        """
        keys = self._sweep_keys
        if keys is None:
            if not self.entries:
                return 0
            keys = self._sweep_keys = list(self.entries)
            self._sweep_pos = 0
        entries = self.entries
        start = self._sweep_pos
        end = min(len(keys), start + budget)
        n = 0
        for i in range(start, end):
            k = keys[i]
            e = entries.get(k)
            if e is not None and e.expires_at is not None and e.expires_at <= now:
                del entries[k]
                if e.value is None:
                    self._dead -= 1
                n += 1
        if end >= len(keys):
            self._sweep_keys = None
        else:
            self._sweep_pos = end
        return n

    def stale(self, origin: int, since: float) -> list[object]:
        """Live keys of `origin` not touched since `since` (mark-and-sweep after a snapshot)."""
        return [k for k, e in self.entries.items()
                if e.alive and e.origin == origin and e.touched < since]

    def items_of(self, origins: set[int]) -> Iterator[tuple[object, Entry]]:
        for k, e in self.entries.items():
            if e.origin in origins:
                yield k, e

    def claim(self, old_origin: int, new_origin: int) -> int:
        n = 0
        for e in self.entries.values():
            if e.origin == old_origin:
                e.origin = new_origin
                n += 1
        return n
