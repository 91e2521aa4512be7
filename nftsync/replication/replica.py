"""The replication core: what a node holds, and the rules by which it changes.

Sans-I/O, like `nftsync.proto`: no sockets, no kernel, no asyncio, no clock. The daemon feeds
it what it learns locally and what peers send, and gets back the records to send and the kernel
writes to make; the model test (tests/unit/test_replication_model.py) drives several of these
through random crashes, restarts, cuts and conflicting writes.

The semantics (docs/protocol.md, "Replication semantics"), chosen so that loss cannot happen
rather than repaired afterwards:

* **Snapshots only add.** A snapshot carries everything the sender holds, live entries and
  tombstones of every origin, and is merged record by record with the conflict rule. Absence from
  a snapshot means nothing: a node that restarts empty ("I lost state") never causes a deletion
  on its peers, and they give its state back.
* **Deletions travel only when seen live**, as tombstones: an admin delete or flush of a session
  (an nft event of another process), a conntrack entry destroyed on the node that last changed
  it. Expiry never travels: every node expires its own copy, and a copy that a node merely holds
  (it did not author its last change) leaves silently when its kernel drops it, so a backup's
  older copy can never delete what the serving node keeps refreshing.
* **Tombstones are bounded**: a timed session's tombstone lives as long as a copy of it could
  (the map's timeout), others `TOMBSTONE_MAX_S`; at most `capacity` per table. A node away for
  longer than that, with its kernel kept, can bring back an entry deleted elsewhere: then it is
  the newest thing anyone knows about that key, and it still expires on its own.
* **What a node finds in its kernel at start-up** has no known author (`UNVERIFIED`) and an old
  date (a session: a day before the refresh its expiry implies; a conntrack entry: "long ago"):
  any change a peer saw live wins over it, and it fills in what peers lack. A node that finds a
  session whose copy arrived late must not let it beat a delete made meanwhile; changes made
  while the daemon was stopped were never seen, so they do not count as live.
* **Peer records are checked** before they count: known map and key, a backend mark of the farm,
  a conntrack mark of a farm, no timestamp from the far future, expiry capped by the map's
  timeout, at most `capacity` live entries per origin. A refused record is counted by cause and
  dropped; the link stays up.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from nftsync.conntrack import IPPROTO_TCP, CtEntry
from nftsync.proto import (
    MAX_REMAINING_MS,
    OP_ADD,
    OP_DELETE,
    OP_UPSERT,
    ConntrackRecord,
    Record,
    SessionRecord,
)
from nftsync.proto.conntrack import (
    CT_ENTRY_FIELDS,
    CtFormatError,
    ct_key,
    ct_record_key,
    ct_with_timeout,
    decode_ct,
    encode_ct,
)

from .table import U64_MAX, UNVERIFIED, Entry, Table

CT_TABLE = "conntrack"
MAX_FUTURE_MS = 24 * 3600 * 1000  # a record more than a day ahead of our clock is refused
TOMBSTONE_MIN_S = 120.0  # a deletion is remembered at least this long
TOMBSTONE_MAX_S = 3600.0  # ... and at most this long, unless the map's timeout says longer
FOUND_CT_MS = 1  # "long ago": the time of a conntrack entry found in the kernel at start-up
# A session found in the kernel at start-up is dated this much before its last refresh (which
# the kernel implies: expiry minus timeout): any change a peer saw live in the meantime wins over
# it, and found sessions still order among themselves (the most recently refreshed wins).
FOUND_PENALTY_MS = 24 * 3600 * 1000
DEFAULT_CAPACITY = 1 << 22  # live entries per origin where nothing smaller is known
SWEEP_BUDGET = 10_000  # keys looked at per sweep slice (~2.5 ms)
_TCP_STATE = CT_ENTRY_FIELDS["tcp_state"].start  # offset of the TCP state in the entry bytes
_NO_STATE = 0xFF


@dataclass(frozen=True, slots=True)
class MapPolicy:
    """What records of one replicated map may hold (from the farm's ruleset)."""

    marks: frozenset[int]  # backend marks of the farm: the only values a session may have
    capacity: int  # the map's size: live entries per origin, and tombstones
    max_ms: int  # longest expiry a record may carry (the map's timeout, or the wire's max)
    static: bool = False  # no timeouts at all (pins)
    key_valid: Callable[[bytes], bool] = field(default=lambda key: 0 < len(key) <= 64)


@dataclass(slots=True)
class ElementOp:
    """One kernel write to a session map, as the sink performs it."""

    key: bytes
    mark: int | None  # None: delete
    remaining_ms: int  # 0: no timeout
    old_mark: int | None  # what this node believes the kernel has (None: absent, -1: unknown)

    @property
    def exists(self) -> bool:
        return self.old_mark is not None


@dataclass(slots=True)
class Writes:
    """The kernel writes that a batch of peer records calls for."""

    sessions: dict[str, list[ElementOp]] = field(default_factory=dict)
    conntrack: list[tuple[str, CtEntry]] = field(default_factory=list)  # ("upsert"|"delete", ct)
    refused: int = 0

    def __len__(self) -> int:
        return sum(map(len, self.sessions.values())) + len(self.conntrack)


class Replica:
    """Everything one node replicates: one Table per session map, one for conntrack."""

    def __init__(self, node_id: int, ct_capacity: int = DEFAULT_CAPACITY) -> None:
        self.node_id = node_id
        self.policies: dict[str, MapPolicy] = {}
        self.sessions: dict[str, Table] = {}
        self.ct_marks: frozenset[int] = frozenset()
        self.conntrack = Table(CT_TABLE, ct_capacity, TOMBSTONE_MIN_S, marks=False)
        self.refused: dict[str, int] = {}
        self.capped = 0  # session records whose expiry was cut to the map's timeout
        self.ct_mark_conflicts = 0  # conntrack NEWs that contradicted a live session

    # -- configuration ---------------------------------------------------------------------------
    def set_maps(self, policies: dict[str, MapPolicy], ct_marks: Iterable[int]) -> None:
        """The farms changed: new maps get a table, known ones keep theirs (a map that left the
        configuration keeps its table too, unused, so a reload that brings it back loses
        nothing)."""
        self.policies = dict(policies)
        self.ct_marks = frozenset(ct_marks)
        for map_id, pol in policies.items():
            keep = TOMBSTONE_MAX_S if pol.static else max(TOMBSTONE_MIN_S, pol.max_ms / 1000)
            t = self.sessions.get(map_id)
            if t is None:
                self.sessions[map_id] = Table(map_id, pol.capacity, keep)
            else:
                t.capacity, t.tomb_s = pol.capacity, keep

    def _refuse(self, cause: str) -> None:
        self.refused[cause] = self.refused.get(cause, 0) + 1

    # -- local changes (learned from this node's kernel) -----------------------------------------
    def _stamp(self, table: Table, key: bytes, wall: int) -> int:
        """A local change is newer than anything held for the key, even within one ms (a
        delete + add in one transaction must not tie, or the add would lose)."""
        cur = table.latest_ms(key)
        if cur is not None and wall <= cur:
            return min(U64_MAX, cur + 1)
        return wall

    def local_session(self, map_id: str, key: bytes, mark: int, expires_at: float | None,
                      now: float, wall: int) -> SessionRecord:
        """A session added or refreshed here (conntrack NEW, an admin add): the record to send."""
        table = self.sessions[map_id]
        ms = self._stamp(table, key, wall)
        table.put(key, mark, expires_at, ms, self.node_id)
        return SessionRecord(OP_ADD, map_id, key, mark, self._wire_ms(map_id, expires_at, now),
                             ms, self.node_id)

    def local_session_delete(self, map_id: str, key: bytes, now: float,
                             wall: int) -> SessionRecord:
        """An admin deletion seen live: a tombstone, and the record telling peers (even for a
        key we did not hold: a peer may hold it)."""
        table = self.sessions[map_id]
        cur = table.get(key)
        ms = self._stamp(table, key, wall)
        table.bury(key, cur.value if cur is not None else None, ms, self.node_id, now)
        return SessionRecord(OP_DELETE, map_id, key, 0, 0, ms, self.node_id)

    def session_from_ct(self, map_id: str, key: bytes, mark: int, expires_at: float | None,
                        now: float, wall: int) -> SessionRecord | None:
        """A conntrack NEW with this mark: the packet path has just updated the session map
        with it (and raises no event of its own), so it is the session's refresh; None when a
        live session says another backend. Such an entry was inserted (conntrack -I), not made
        by the packet path, and the map, which we hold, stays the truth (one truth per node)."""
        cur = self.sessions[map_id].current_mark(key, now)
        if cur is not None and cur != mark:
            self.ct_mark_conflicts += 1
            return None
        return self.local_session(map_id, key, mark, expires_at, now, wall)

    def found_session(self, map_id: str, key: bytes, mark: int, expires_at: float | None,
                      refreshed_ms: int) -> bool:
        """An element found in the kernel at start-up, last refreshed (as far as its expiry
        tells) at `refreshed_ms`. It fills what we lack; what we hold already stays. True if it
        was taken."""
        updated_ms = max(FOUND_CT_MS, refreshed_ms - FOUND_PENALTY_MS)
        table = self.sessions[map_id]
        cur = table.get(key)
        # A live-learned session with this mark stays; a found one (e.g. derived from a
        # connection at start-up) gives way to a later found one in place.
        if (cur is not None and cur.value == mark and cur.origin != UNVERIFIED) or \
                not table.beats(key, updated_ms, UNVERIFIED, mark, -math.inf):
            return False
        table.put(key, mark, expires_at, updated_ms, UNVERIFIED)
        return True

    def correction(self, map_id: str, key: bytes, kernel_mark: int,
                   now: float) -> ElementOp | None:
        """The kernel holds `kernel_mark` for `key` and we do not take it (`found_session` said
        no): the write that makes the kernel agree with what we hold, if any. A peer's delete
        or move may have arrived before the map was read (a start-up read runs in the
        background): the delete then found nothing to delete here, so it is made now."""
        table = self.sessions[map_id]
        cur = table.current(key, now)
        if cur is not None:
            if cur.value == kernel_mark:
                return None
            mark: int = cur.value  # type: ignore[assignment]
            return ElementOp(key, mark, self._wire_ms(map_id, cur.expires_at, now), kernel_mark)
        if table.is_dead(key):
            return ElementOp(key, None, 0, kernel_mark)
        return None

    def _wire_ms(self, map_id: str, expires_at: float | None, now: float) -> int:
        """The expiry a session record carries: time left in ms (0 means "no timeout", so a
        live timed entry sends at least 1), capped as `_cap_ms` says."""
        pol = self.policies.get(map_id)
        ms = 0 if expires_at is None else max(1, int((expires_at - now) * 1000))
        return min(ms, MAX_REMAINING_MS) if pol is None else self._cap_ms(pol, ms)

    def _cap_ms(self, pol: MapPolicy, ms: int) -> int:
        """The expiry a session of this map may carry, sent or received: none for a pin, at
        most the map's timeout otherwise (0, "no timeout", in a timed map means the timeout)."""
        if pol.static:
            return 0
        if ms == 0 or ms > pol.max_ms:
            self.capped += ms > pol.max_ms
            return pol.max_ms
        return ms

    def local_ct(self, ct: CtEntry, expires_at: float, now: float,
                 wall: int) -> tuple[bytes, ConntrackRecord]:
        """A conntrack entry made or changed here: its key and the record to send.

        A TCP UPDATE event carries the state only when it changed: an entry without one keeps
        the state we hold."""
        table = self.conntrack
        entry = encode_ct(ct)
        key = ct_record_key(entry)
        if entry[_TCP_STATE] == _NO_STATE and ct.l4proto == IPPROTO_TCP:
            prev = table.get(key)
            if prev is not None and prev.value[_TCP_STATE] != _NO_STATE:  # type: ignore[index]
                entry = entry[:_TCP_STATE] + prev.value[_TCP_STATE:_TCP_STATE + 1] + \
                    entry[_TCP_STATE + 1:]  # type: ignore[index]
        ms = self._stamp(table, key, wall)
        table.put(key, entry, expires_at, ms, self.node_id)
        return key, ConntrackRecord(OP_UPSERT, self.node_id, ms, entry)

    def local_ct_destroy(self, key: bytes, now: float, wall: int) -> ConntrackRecord | None:
        """The kernel destroyed the conntrack entry of `key` (`ct_key`). Only its author's
        view counts as a live deletion; a copy we merely held leaves silently (it timed out
        here, while the node serving it may still be refreshing it)."""
        table = self.conntrack
        cur = table.get(key)
        if cur is None:
            return None
        if cur.origin != self.node_id:
            table.drop(key)
            return None
        remaining = 0.0 if cur.expires_at is None else cur.expires_at - now
        keep = min(TOMBSTONE_MAX_S, max(TOMBSTONE_MIN_S, remaining))
        ms = self._stamp(table, key, wall)
        table.bury(key, cur.value, ms, self.node_id, now, keep)
        return ConntrackRecord(OP_DELETE, self.node_id, ms, cur.value)  # type: ignore[arg-type]

    def found_ct(self, ct: CtEntry, expires_at: float) -> bool:
        table = self.conntrack
        key = ct_key(ct)
        if table.latest_ms(key) is not None:
            return False
        table.put(key, encode_ct(ct), expires_at, FOUND_CT_MS, UNVERIFIED)
        return True

    # -- records from peers ----------------------------------------------------------------------
    def receive(self, records: Iterable[Record], sender: int, in_snapshot: bool, now: float,
                wall: int) -> Writes:
        """Merge a peer's records; what wins goes into the returned kernel writes.

        Updates carry only the sender's own changes (it never relays); a snapshot carries
        everything the sender holds, whoever authored it, ours included: that is how a node
        that lost its state gets it back.
        """
        out = Writes()
        horizon = wall + MAX_FUTURE_MS
        for r in records:
            if not in_snapshot and r.origin != sender:
                cause = "foreign_origin"
            elif r.updated_ms > horizon:
                cause = "future_timestamp"
            elif isinstance(r, SessionRecord):
                cause = self._receive_session(r, now, out)
            else:
                cause = self._receive_ct(r, now, out)
            if cause:
                self._refuse(cause)
                out.refused += 1
        return out

    def _receive_session(self, r: SessionRecord, now: float, out: Writes) -> str:
        pol = self.policies.get(r.map_id)
        if pol is None:
            return "unknown_map"
        key = bytes(r.key)
        if not pol.key_valid(key):
            return "bad_key"
        if r.op == OP_ADD and r.mark not in pol.marks:
            return "unknown_backend"
        table = self.sessions[r.map_id]
        verdict = table.judge(key, r.updated_ms, r.origin, r.mark if r.op == OP_ADD else None,
                              now)
        if verdict is None:
            return ""
        live, live_origin = verdict
        old = None if live is None else table.mark_of(live)
        if r.op == OP_DELETE:
            table.bury(key, old, r.updated_ms, r.origin, now)
            if live is not None:
                out.sessions.setdefault(r.map_id, []).append(ElementOp(key, None, 0, old))
            return ""
        if live_origin != r.origin and table.full_for(r.origin):
            return "origin_full"
        ms = self._cap_ms(pol, r.remaining_ms)
        table.put(key, r.mark, now + ms / 1000 if ms else None, r.updated_ms, r.origin)
        out.sessions.setdefault(r.map_id, []).append(ElementOp(key, r.mark, ms, old))
        return ""

    def _receive_ct(self, r: ConntrackRecord, now: float, out: Writes) -> str:
        entry = bytes(r.entry)
        try:
            ct = decode_ct(entry)
        except CtFormatError:
            return "bad_record"
        if ct.mark not in self.ct_marks:
            return "foreign_mark"
        table = self.conntrack
        key = ct_record_key(entry)
        verdict = table.judge(key, r.updated_ms, r.origin,
                              entry if r.op == OP_UPSERT else None, now)
        if verdict is None:
            return ""
        live, live_origin = verdict
        if r.op == OP_DELETE:
            table.bury(key, entry, r.updated_ms, r.origin, now)
            if live is not None:
                out.conntrack.append(("delete", ct))
            return ""
        if live_origin != r.origin and table.full_for(r.origin):
            return "origin_full"
        table.put(key, entry, now + ct.timeout, r.updated_ms, r.origin)
        out.conntrack.append(("upsert", ct))
        return ""

    # -- snapshots and expiry --------------------------------------------------------------------
    def snapshot(self, now: float, conntrack: bool = True, chunk: int = 4000,
                 clock: Callable[[], float] | None = None) -> Iterator[list[Record]]:
        """Everything this node holds, live and tombstones, in chunks of records.

        Records are built lazily, chunk by chunk, so a sender can stream a 1M-entry snapshot
        between other work; the tables are copied a shard at a time as the chunks are built
        (`Table.copies`: each part at least as new as the call, so whatever was queued before
        the call is in it). `clock` (monotonic seconds), if given, is read again for each
        chunk, so remaining times are those of the moment the chunk is built.
        """
        parts: list[tuple[str | None, Table]] = [
            (map_id, table) for map_id, table in self.sessions.items()
            if map_id in self.policies]
        if conntrack:
            parts.append((None, self.conntrack))
        return self._chunks(parts, now, chunk, clock)

    def _chunks(self, parts: list[tuple[str | None, Table]], now: float, chunk: int,
                clock: Callable[[], float] | None) -> Iterator[list[Record]]:
        out: list[Record] = []
        for map_id, table in parts:
            for copy, alive in table.copies():
                for key, raw in copy.items():
                    e = table.unpack(key, raw)
                    if alive and e.expires_at is not None and e.expires_at <= now:
                        continue  # the kernel has dropped it
                    out.append(self._record(map_id, key, e, alive, now))
                    if len(out) >= chunk:
                        yield out
                        out = []
                        now = clock() if clock is not None else now
        if out:
            yield out

    def _record(self, map_id: str | None, key: bytes, e: Entry, alive: bool,
                now: float) -> Record:
        if map_id is None:  # conntrack: the entry bytes, with the time left now
            entry: bytes = e.value  # type: ignore[assignment]
            if alive and e.expires_at is not None:
                entry = ct_with_timeout(entry, max(1, int(e.expires_at - now)))
            return ConntrackRecord(OP_UPSERT if alive else OP_DELETE, e.origin, e.updated_ms,
                                   entry)
        if alive:
            return SessionRecord(OP_ADD, map_id, key, e.value,
                                 self._wire_ms(map_id, e.expires_at, now), e.updated_ms,
                                 e.origin)
        return SessionRecord(OP_DELETE, map_id, key, 0, 0, e.updated_ms, e.origin)

    def sweep(self, now: float, budget: int = SWEEP_BUDGET) -> int:
        """A slice of the expiry sweep of every table; returns the entries forgotten."""
        n = self.conntrack.sweep_expired(now, budget)
        for table in self.sessions.values():
            n += table.sweep_expired(now, budget)
        return n
