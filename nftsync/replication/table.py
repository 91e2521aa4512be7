"""One replicated table: what a node holds of a session map or of the conntrack table.

Why a copy at all: the kernel does not report packet-path refreshes and dumping a big timeout map
is quadratic, so each node keeps its own compact copy, learned from events. Peers' snapshots are
made from it, and it is what lets a receiver decide whether an incoming record is newer.

Two dicts: `live` holds what exists, `dead` holds tombstones of live deletions (an admin delete,
a conntrack entry destroyed where it was served). A tombstone carries the time of the deletion so
that an older add cannot bring the key back, and it is kept only as long as a copy of what it
deleted can still be alive somewhere (`tomb_s`), with a bound on how many (oldest dropped first).

Nothing here does I/O or reads a clock: callers pass `now` (monotonic seconds) and `wall`
(milliseconds since the epoch), so the rules are the same in the daemon and in the model test.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass

from nftsync.conntrack import CtEntry
from nftsync.proto.conntrack import encode_ct

UNVERIFIED = 0  # origin of what a node found in its own kernel at start-up: no known author
U64_MAX = 2**64 - 1


@dataclass(slots=True)
class Entry:
    """A session (value = mark) or conntrack entry (value = CtEntry), with its replication facts.

    In a tombstone `value` is what was deleted (a conntrack delete must name its tuple) and
    `expires_at` is when the tombstone may be forgotten.
    """

    value: object
    expires_at: float | None  # monotonic seconds; None: never expires (static pins)
    updated_ms: int  # the author's wall clock at the change
    origin: int  # node id of the author (UNVERIFIED: found in the kernel at start-up)

    def remaining_ms(self, now: float) -> int:
        """Time left, for the wire (0 means "no timeout", so a live timed entry sends >= 1)."""
        if self.expires_at is None:
            return 0
        return max(1, int((self.expires_at - now) * 1000))


def newer(updated_ms: int, origin: int, value: object, cur_ms: int, cur_origin: int,
          cur_value: object) -> bool:
    """The conflict rule: the newest change wins, then the highest origin node id, then the
    highest value (None for a deletion). Only state found in two kernels at start-up ties on
    the first two: a running node never stamps two changes of one key with the same time."""
    if updated_ms != cur_ms or origin != cur_origin:
        return (updated_ms, origin) > (cur_ms, cur_origin)
    return rank(value) > rank(cur_value)


def rank(value: object) -> tuple:
    """The order of values in a tie: nothing (a deletion) lowest, then marks by number and
    conntrack entries by their wire bytes."""
    if value is None:
        return (0,)
    if isinstance(value, int):
        return (1, value)
    if isinstance(value, CtEntry):
        return (1, encode_ct(value))
    raise TypeError(f"no conflict order for a {type(value).__name__}")


class Table:
    """One replicated table (keys: map key bytes, or conntrack tuples)."""

    def __init__(self, name: str, capacity: int, tomb_s: float) -> None:
        self.name = name
        self.capacity = capacity  # live entries per origin; also the tombstone bound
        self.tomb_s = tomb_s  # how long a tombstone outlives the deletion, at least
        self.live: dict[object, Entry] = {}
        self.dead: dict[object, Entry] = {}  # insertion order = age: the oldest goes first
        self.per_origin: dict[int, int] = {}
        # Expiry by time buckets: second -> keys whose entry or tombstone was set to expire in
        # that second, and a heap of those seconds. A sweep pops only what is due instead of
        # scanning the table (a 10k-key scan slice every 0.2 s stalled the loop ~2.5 ms; the
        # key list of a pass over 1M entries took longer). A refreshed key is in several
        # buckets: the ones before its current expiry find it alive and skip it.
        self._due: dict[int, list[object]] = {}
        self._seconds: list[int] = []

    def __len__(self) -> int:
        return len(self.live)

    def get(self, key: object) -> Entry | None:
        return self.live.get(key)

    def latest(self, key: object) -> Entry | None:
        """The entry or the tombstone: what a change of `key` is ordered after."""
        e = self.live.get(key)
        return e if e is not None else self.dead.get(key)

    def current(self, key: object, now: float) -> Entry | None:
        """The live entry of `key` unless its time is past (the kernel has dropped it; the
        sweep forgets it within a second)."""
        e = self.live.get(key)
        if e is None or (e.expires_at is not None and e.expires_at <= now):
            return None
        return e

    def beats(self, key: object, updated_ms: int, origin: int, value: object,
              now: float) -> bool:
        """Whether a change (value None: a deletion) wins over what we hold for `key`; what
        has expired, entry or tombstone, holds nothing."""
        e = self.current(key, now)
        if e is not None:
            return newer(updated_ms, origin, value, e.updated_ms, e.origin, e.value)
        t = self.dead.get(key)
        return t is None or (t.expires_at is not None and t.expires_at <= now) or \
            newer(updated_ms, origin, value, t.updated_ms, t.origin, None)

    def is_dead(self, key: object) -> bool:
        return key in self.dead

    # -- changes ---------------------------------------------------------------------------------
    def put(self, key: object, e: Entry) -> Entry:
        """Make `e` the live entry of `key` (replacing an entry or a tombstone)."""
        old = self.live.get(key)
        if old is not None:
            self._count(old.origin, -1)
        else:
            self.dead.pop(key, None)
        self.live[key] = e
        self._count(e.origin, 1)
        if e.expires_at is not None:
            self._schedule(key, e.expires_at)
        return e

    def bury(self, key: object, value: object, updated_ms: int, origin: int, now: float,
             keep_s: float | None = None) -> Entry:
        """Replace `key` by a tombstone of the deletion made at `updated_ms` by `origin`."""
        old = self.live.pop(key, None)
        if old is not None:
            self._count(old.origin, -1)
        self.dead.pop(key, None)  # re-inserted: it is now the youngest
        t = Entry(value, now + (self.tomb_s if keep_s is None else keep_s), updated_ms, origin)
        self.dead[key] = t
        self._schedule(key, t.expires_at)  # type: ignore[arg-type]
        while len(self.dead) > self.capacity:
            del self.dead[next(iter(self.dead))]
        return t

    def drop(self, key: object) -> Entry | None:
        """Forget a live entry without a tombstone (it expired, or a copy we did not author
        left the kernel): nothing is sent for it."""
        old = self.live.pop(key, None)
        if old is not None:
            self._count(old.origin, -1)
        return old

    def full_for(self, origin: int) -> bool:
        return self.per_origin.get(origin, 0) >= self.capacity

    def _count(self, origin: int, d: int) -> None:
        n = self.per_origin.get(origin, 0) + d
        if n:
            self.per_origin[origin] = n
        else:
            self.per_origin.pop(origin, None)

    # -- expiry ----------------------------------------------------------------------------------
    def _schedule(self, key: object, expires_at: float) -> None:
        sec = int(expires_at)
        bucket = self._due.get(sec)
        if bucket is None:
            self._due[sec] = [key]
            heapq.heappush(self._seconds, sec)
        else:
            bucket.append(key)

    def sweep_expired(self, now: float, budget: int) -> int:
        """Forget entries and tombstones whose time is past, looking at about `budget` keys
        (whole buckets of one second, so at least one bucket), so a sweep never stalls the
        caller however big the table is. An entry is forgotten within a second of its expiry,
        and is never sent once past it (`items` skips it)."""
        live, dead, due, seconds = self.live, self.dead, self._due, self._seconds
        n = looked = 0
        while seconds and seconds[0] + 1 <= now and (looked == 0 or
                                                     looked + len(due[seconds[0]]) <= budget):
            keys = due.pop(heapq.heappop(seconds))
            looked += len(keys)
            for k in keys:
                e = live.get(k)
                if e is not None and e.expires_at is not None and e.expires_at <= now:
                    self.drop(k)
                    n += 1
                t = dead.get(k)
                if t is not None and t.expires_at is not None and t.expires_at <= now:
                    del dead[k]
        return n

    def items(self, now: float) -> Iterator[tuple[object, Entry, bool]]:
        """(key, entry, alive) of everything worth telling a peer: unexpired entries and
        tombstones. A point in time when materialised with list() (entries are replaced on
        change, never edited in place)."""
        for k, e in self.live.items():
            if e.expires_at is None or e.expires_at > now:
                yield k, e, True
        for k, t in self.dead.items():
            yield k, t, False
