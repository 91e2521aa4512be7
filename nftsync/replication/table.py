"""One replicated table: what a node holds of a session map or of the conntrack table.

Why a copy at all: the kernel does not report packet-path refreshes and dumping a big timeout map
is quadratic, so each node keeps its own compact copy, learned from events. Peers' snapshots are
made from it, and it is what lets a receiver decide whether an incoming record is newer.

Two maps: `live` holds what exists, `dead` holds tombstones of live deletions (an admin delete,
a conntrack entry destroyed where it was served). A tombstone carries the time of the deletion so
that an older add cannot bring the key back, and it is kept only as long as a copy of what it
deleted can still be alive somewhere (`tomb_s`), with a bound on how many (oldest dropped first).

Both dicts map key bytes to one packed `bytes` per entry (`pack`: expiry, change time, origin,
then the value: a mark, or what a conntrack entry's wire bytes hold besides its key), not to
objects: a node holds millions of them, and an entry as a dataclass with a `CtEntry` inside cost
~770 bytes of RSS per connection and its session at 1M, against ~400 packed
(benchmarks/README.md). Packed entries also keep the cyclic GC away (bytes are not tracked).
Readers get an `Entry` tuple decoded on demand.

`live` is split into `SHARDS` dicts by key hash: a dict grows by rebuilding itself, and one of a
million entries took the event loop 12-24 ms to rebuild; a shard of 1/64 of it takes ~0.3 ms.
`dead` stays one dict, in insertion order, so that the oldest tombstone goes first exactly.

Nothing here does I/O or reads a clock: callers pass `now` (monotonic seconds) and `wall`
(milliseconds since the epoch), so the rules are the same in the daemon and in the model test.
"""

from __future__ import annotations

import heapq
import math
import struct
from collections.abc import Iterator
from typing import NamedTuple

from nftsync.proto.conntrack import ct_body, ct_entry

UNVERIFIED = 0  # origin of what a node found in its own kernel at start-up: no known author
U64_MAX = 2**64 - 1

# The head of a packed entry: expiry (monotonic seconds, +inf: never), change time (the author's
# wall clock, ms), origin (node id). Native order: these bytes never leave the process.
_HEAD = struct.Struct("=dQI")
HEAD_SIZE = _HEAD.size
_UPDATED = struct.Struct("=Q")  # at offset 8
_ORIGIN = struct.Struct("=I")  # at offset 16
_MARK = struct.Struct("=I")
_SESSION = struct.Struct("=dQII")  # a session entry: the head and its mark
SHARDS = 64  # dicts that `live` is split into (a power of two)
_MASK = SHARDS - 1
_INF = math.inf


class Entry(NamedTuple):
    """A session (value = mark) or conntrack entry (value = its wire bytes), decoded from its
    packed form; in a tombstone `value` is what was deleted (a conntrack delete must name its
    tuple) or None, and `expires_at` is when the tombstone may be forgotten."""

    value: object
    expires_at: float | None  # monotonic seconds; None: never expires (static pins)
    updated_ms: int  # the author's wall clock at the change
    origin: int  # node id of the author (UNVERIFIED: found in the kernel at start-up)


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
    if isinstance(value, int | bytes):
        return (1, value)
    raise TypeError(f"no conflict order for a {type(value).__name__}")


class Table:
    """One replicated table (keys: map key bytes, or conntrack tuples as wire key bytes).

    `marks`: values are backend marks (a session map); otherwise conntrack entries (wire
    bytes, stored as `ct_body` under their `ct_record_key`).
    """

    def __init__(self, name: str, capacity: int, tomb_s: float, marks: bool = True) -> None:
        self.name = name
        self.capacity = capacity  # live entries per origin; also the tombstone bound
        self.tomb_s = tomb_s  # how long a tombstone outlives the deletion, at least
        self.marks = marks
        self.shards: list[dict[bytes, bytes]] = [{} for _ in range(SHARDS)]  # key -> packed
        self.dead: dict[bytes, bytes] = {}  # insertion order = age: the oldest goes first
        self.per_origin: dict[int, int] = {}
        # Expiry by time buckets: second -> keys whose entry or tombstone was set to expire in
        # that second, and a heap of those seconds. A sweep pops only what is due instead of
        # scanning the table (a 10k-key scan slice every 0.2 s stalled the loop ~2.5 ms; the
        # key list of a pass over 1M entries took longer). A refreshed key is in several
        # buckets: the ones before its current expiry find it alive and skip it.
        self._due: dict[int, list[bytes]] = {}
        self._seconds: list[int] = []

    def __len__(self) -> int:
        return sum(map(len, self.shards))

    def keys(self) -> Iterator[bytes]:
        """The keys of the live entries (copy them before changing the table)."""
        for shard in self.shards:
            yield from shard

    # -- the packed form -------------------------------------------------------------------------
    def pack(self, value: object, expires_at: float | None, updated_ms: int,
             origin: int) -> bytes:
        exp = _INF if expires_at is None else expires_at
        if value is None:
            return _HEAD.pack(exp, updated_ms, origin)
        if self.marks:
            return _SESSION.pack(exp, updated_ms, origin, value)
        return _HEAD.pack(exp, updated_ms, origin) + ct_body(value)  # type: ignore[arg-type]

    def unpack(self, key: bytes, raw: bytes) -> Entry:
        exp, ms, origin = _HEAD.unpack_from(raw)
        return Entry(self._value(key, raw), None if exp == _INF else exp, ms, origin)

    def _value(self, key: bytes, raw: bytes) -> object:
        if len(raw) == HEAD_SIZE:
            return None
        if self.marks:
            return _MARK.unpack_from(raw, HEAD_SIZE)[0]
        return ct_entry(key, raw[HEAD_SIZE:])

    # -- reading ---------------------------------------------------------------------------------
    def get(self, key: bytes) -> Entry | None:
        raw = self.shards[hash(key) & _MASK].get(key)
        return None if raw is None else self.unpack(key, raw)

    def latest_ms(self, key: bytes) -> int | None:
        """The change time of the entry or the tombstone of `key`: what a change of `key` is
        ordered after."""
        raw = self.shards[hash(key) & _MASK].get(key) or self.dead.get(key)
        return None if raw is None else _UPDATED.unpack_from(raw, 8)[0]

    def current(self, key: bytes, now: float) -> Entry | None:
        """The live entry of `key` unless its time is past (the kernel has dropped it; the
        sweep forgets it within a second)."""
        raw = self.shards[hash(key) & _MASK].get(key)
        if raw is None or _HEAD.unpack_from(raw)[0] <= now:
            return None
        return self.unpack(key, raw)

    def current_mark(self, key: bytes, now: float) -> int | None:
        """The mark of the live session of `key` unless its time is past (`current` without
        an Entry: the active node's hot path)."""
        raw = self.shards[hash(key) & _MASK].get(key)
        if raw is None:
            return None
        exp, _ms, _origin, mark = _SESSION.unpack(raw)
        return None if exp <= now else mark

    def beats(self, key: bytes, updated_ms: int, origin: int, value: object,
              now: float) -> bool:
        """Whether a change (value None: a deletion) wins over what we hold for `key`; what
        has expired, entry or tombstone, holds nothing."""
        return self.judge(key, updated_ms, origin, value, now) is not None

    def judge(self, key: bytes, updated_ms: int, origin: int, value: object,
              now: float) -> tuple[bytes | None, int] | None:
        """`beats`, and what a winner replaces, in one lookup (the receiver's hot path): None
        if the change loses, else (the packed live entry or None, its origin or -1). Values
        are decoded only for a tie."""
        raw = self.shards[hash(key) & _MASK].get(key)
        if raw is not None:
            exp, ms, cur_origin = _HEAD.unpack_from(raw)
            if exp > now:
                if updated_ms != ms or origin != cur_origin:
                    wins = (updated_ms, origin) > (ms, cur_origin)
                else:
                    wins = rank(value) > rank(self._value(key, raw))
                return (raw, cur_origin) if wins else None
        raw = self.dead.get(key)
        if raw is not None:
            exp, ms, t_origin = _HEAD.unpack_from(raw)
            if exp > now and not newer(updated_ms, origin, value, ms, t_origin, None):
                return None
        return (None, -1)

    def mark_of(self, raw: bytes) -> int:
        """The mark in a packed session entry."""
        return _MARK.unpack_from(raw, HEAD_SIZE)[0]

    def is_dead(self, key: bytes) -> bool:
        return key in self.dead

    def entries(self, now: float | None = None) -> Iterator[tuple[bytes, Entry]]:
        """(key, entry) of the live entries (unexpired ones only if `now` is given)."""
        for shard in self.shards:
            for k, raw in shard.items():
                e = self.unpack(k, raw)
                if now is None or e.expires_at is None or e.expires_at > now:
                    yield k, e

    def tombstones(self) -> Iterator[tuple[bytes, Entry]]:
        for k, raw in self.dead.items():
            yield k, self.unpack(k, raw)

    # -- changes ---------------------------------------------------------------------------------
    def put(self, key: bytes, value: object, expires_at: float | None, updated_ms: int,
            origin: int) -> None:
        """Make this the live entry of `key` (replacing an entry or a tombstone)."""
        raw = self.pack(value, expires_at, updated_ms, origin)
        shard = self.shards[hash(key) & _MASK]
        old = shard.get(key)
        if old is not None:
            self._count(_ORIGIN.unpack_from(old, 16)[0], -1)
        else:
            self.dead.pop(key, None)
        shard[key] = raw
        self._count(origin, 1)
        if expires_at is not None:
            self._schedule(key, expires_at)

    def bury(self, key: bytes, value: object, updated_ms: int, origin: int, now: float,
             keep_s: float | None = None) -> None:
        """Replace `key` by a tombstone of the deletion made at `updated_ms` by `origin`."""
        self.drop(key)
        self.dead.pop(key, None)  # re-inserted: it is now the youngest
        expires_at = now + (self.tomb_s if keep_s is None else keep_s)
        self.dead[key] = self.pack(value, expires_at, updated_ms, origin)
        self._schedule(key, expires_at)
        while len(self.dead) > self.capacity:
            del self.dead[next(iter(self.dead))]

    def drop(self, key: bytes) -> bool:
        """Forget a live entry without a tombstone (it expired, or a copy we did not author
        left the kernel): nothing is sent for it."""
        old = self.shards[hash(key) & _MASK].pop(key, None)
        if old is None:
            return False
        self._count(_ORIGIN.unpack_from(old, 16)[0], -1)
        return True

    def full_for(self, origin: int) -> bool:
        return self.per_origin.get(origin, 0) >= self.capacity

    def _count(self, origin: int, d: int) -> None:
        n = self.per_origin.get(origin, 0) + d
        if n:
            self.per_origin[origin] = n
        else:
            self.per_origin.pop(origin, None)

    # -- expiry ----------------------------------------------------------------------------------
    def _schedule(self, key: bytes, expires_at: float) -> None:
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
        and is never sent once past it (snapshots skip it)."""
        shards, dead, due, seconds, head = self.shards, self.dead, self._due, self._seconds, _HEAD
        n = looked = 0
        while seconds and seconds[0] + 1 <= now and (looked == 0 or
                                                     looked + len(due[seconds[0]]) <= budget):
            keys = due.pop(heapq.heappop(seconds))
            looked += len(keys)
            for k in keys:
                raw = shards[hash(k) & _MASK].get(k)
                if raw is not None and head.unpack_from(raw)[0] <= now:
                    self.drop(k)
                    n += 1
                raw = dead.get(k)
                if raw is not None and head.unpack_from(raw)[0] <= now:
                    del dead[k]
        return n

    def copies(self) -> Iterator[tuple[dict[bytes, bytes], bool]]:
        """Copies of the live shards, one at a time and only when asked for, then of the
        tombstones: (entries, alive). For a snapshot streamed while the table changes: each
        copy is a state at least as new as the call (entries are replaced, never edited, so a
        copy shares them), and copying 1/64 of a 1M table at a time keeps each step short (a
        copy of the whole stalled the loop ~30 ms). A later state than the call's is what the
        receiver would get as updates anyway; merging the same record twice changes nothing."""
        for shard in self.shards:
            yield dict(shard), True
        yield dict(self.dead), False
