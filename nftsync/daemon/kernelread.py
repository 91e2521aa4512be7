"""The daemon's reads of the kernel's state: the farms' conntrack entries at start-up, and the
session maps, in the background, at start-up and again when events were lost or a map appeared.

The kernel is read in two steps (docs/daemon.md, "Start-up"):
1. before the daemon listens, what is linear: the xt_recent tables and the farms'
   conntrack entries (1M in ~5 s), each a found conntrack entry and, for each sessions
   map of its mark, its client's session; the loop answers the control socket meanwhile;
2. once it listens and follows events, the maps (their dump is quadratic: ~35 s at 1M):
   a thread streams each map's dump (nftsync.netlink.setdump) and the loop applies the
   elements in slices of about a millisecond.
What is found has no known author and an old date: whatever a live change or a peer
says wins over it, so it does not matter what the loop learned before or in between.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from nftsync.netlink.ctsocket import dump
from nftsync.netlink.nftables import Element
from nftsync.netlink.setdump import DumpThread, SetElemDump, SetGone, iter_elements
from nftsync.replication import FOUND_CT_MS, UNVERIFIED, ElementOp

from .clock import now_ms
from .farms import ReplicatedMap
from .links import Links
from .replicator import Replicator

log = logging.getLogger("nftsync.daemon")

SLICE_S = 0.001  # the map reads give the loop back after about this long...
POLL_S = 0.002  # ... for this long at least
SLICE_ELEMENTS = 64  # map elements applied between two looks at the clock (~0.2 ms)
READ_WINDOW = 8  # datagrams (<= 32 KiB, ~800 elements each) handed to the loop, not yet applied
MIN_PASSES, MAX_PASSES = 2, 4  # reads of one map (see KernelReads._end_read)


class KernelReads:
    """The reads of conntrack and of the replicated maps, their progress for ctl, and the
    reading thread."""

    def __init__(self, replicator: Replicator, links: Links) -> None:
        self.replicator = replicator
        self.replica = replicator.replica
        self.links = links
        self.startup_ct: dict = {}
        self.ct_seen = 0  # conntrack entries read so far at start-up (`starting` in ctl status)
        self.startup_reads: dict[str, MapRead] = {}
        self.map_reads: dict[str, MapRead] = {}  # the latest later read of each map
        self.slowest_slice_ms = 0.0
        self._dumper: DumpThread | None = None
        self._backlog: deque[Iterator[None]] = deque()
        self._poll_handle: asyncio.TimerHandle | None = None
        self._unsent = False  # found state taken since the last snapshot we asked for
        self._derived: dict[str, list[bytes]] = {}  # map -> sessions derived from conntrack

    def close(self) -> None:
        if self._poll_handle is not None:
            self._poll_handle.cancel()
        if self._dumper is not None:
            self._dumper.close()

    def read_maps(self) -> None:
        """Step 2, once listening: every replicated map, read in the background."""
        for rmap in self.replicator.view.maps.values():
            self.read_map(rmap, startup=True)

    async def read_conntrack(self) -> None:
        """The farms' conntrack entries: found entries (when conntrack is replicated) and, from
        each, its client's session in each sessions map of its mark, by the recipe the NEW
        events use. A connection says its client had that session when it began, at a time
        ctnetlink does not tell (no timestamps unless nf_conntrack_timestamp is on), so the
        session is dated "long ago" (FOUND_CT_MS, like a found conntrack entry): the map's own
        element, once read, any live change and any peer's record all win over it. Its expiry
        is the map's full timeout from now, the latest the kernel's can be; the map's read
        replaces it by the element's own (`_apply_elements`) and drops the sessions the map does
        not hold (`_drop_unconfirmed`): a connection can outlive its client's session."""
        t0 = time.monotonic()
        view = self.replicator.view
        marks, by_mark = view.marks, view.by_mark
        replicate_ct = self.replicator.config.conntrack
        replica = self.replica
        derived = self._derived = {}
        entries = sessions = seen = 0
        now = time.monotonic()
        deadline = time.perf_counter() + SLICE_S
        for ct in dump():
            seen += 1
            if not seen & 63 and time.perf_counter() >= deadline:
                self.ct_seen = seen
                await asyncio.sleep(0)  # the control socket answers during a long read
                now = time.monotonic()
                deadline = time.perf_counter() + SLICE_S
            if ct.mark not in marks:
                continue
            entries += 1
            if replicate_ct:
                replica.found_ct(ct, now + ct.timeout)
            for rmap in by_mark.get(ct.mark, ()):
                key = rmap.recipe.key(ct, rmap.smap.key_type)  # type: ignore[union-attr]
                if key is None:
                    continue
                timeout = rmap.smap.timeout
                if replica.found_session(rmap.map_id, key, ct.mark,
                                         now + timeout if timeout else None, FOUND_CT_MS):
                    derived.setdefault(rmap.map_id, []).append(key)
                    sessions += 1
        took = time.monotonic() - t0
        self.ct_seen = seen
        self.startup_ct = {"entries": entries, "sessions": sessions, "read": seen,
                           "duration_s": round(took, 3)}
        log.info("conntrack: %d entr%s of the farms at start-up, %d session(s) derived from "
                 "them, read in %.1fs", entries, "y" if entries == 1 else "ies", sessions, took)

    def read_map(self, rmap: ReplicatedMap, startup: bool) -> None:
        """Read one map in the background. At start-up its elements are found state; later (a
        new map, lost nft events) an element that differs from one we authored is a change we
        did not hear of, and one we lack is found state (a read never undoes a live delete)."""
        prev = self.map_reads.get(rmap.map_id) or self.startup_reads.get(rmap.map_id)
        if prev is not None and prev.queued:
            return  # a read that has not begun yet sees everything this one would
        read = MapRead(rmap, startup, time.monotonic())
        (self.startup_reads if startup else self.map_reads)[rmap.map_id] = read
        self._next_pass(read)

    def _next_pass(self, read: MapRead) -> None:
        """Queue one pass over the map: a dump, in the reading thread (`DumpThread`)."""
        if self._dumper is None:
            self._dumper = DumpThread(window=READ_WINDOW)
        ref = read.rmap.smap.ref
        read.queued = True
        read.pass_taken = read.pass_changed = read.pass_elements = 0

        def open_dump() -> SetElemDump:  # in the thread, when this pass's turn comes
            read.queued = False
            return SetElemDump(ref.family, ref.table, ref.name)

        self._dumper.submit(read, open_dump)
        self._poll_soon()

    # The loop polls the reading thread every POLL_S while a read is on, takes what came and
    # works through it as generators, for about SLICE_S at a time, then sleeps again: the
    # thread is never waiting long for the GIL, so it never forces the loop to give it up
    # (nftsync.netlink.setdump.DumpThread says what that costs).
    def _poll_soon(self) -> None:
        if self._poll_handle is None:
            self._poll_handle = asyncio.get_running_loop().call_later(POLL_S, self._poll)

    def _poll(self) -> None:
        self._poll_handle = None
        assert self._dumper is not None
        for job, data, mono_or_dump, wall_or_error in self._dumper.take():
            if data is not None:
                self._backlog.append(self._apply_datagram(job, data, mono_or_dump, wall_or_error))
            else:
                self._backlog.append(self._end_read(job, mono_or_dump, wall_or_error))
        self._work()
        if self._backlog or any(r.ended is None for r in self._all_reads()):
            self._poll_soon()

    def _work(self) -> None:
        """Run queued work for about SLICE_S."""
        start = time.perf_counter()
        deadline = start + SLICE_S
        backlog = self._backlog
        try:
            while backlog:
                for _ in backlog[0]:
                    if time.perf_counter() >= deadline:
                        return
                backlog.popleft()
                if time.perf_counter() >= deadline:
                    return
        except Exception:  # a bug: this work is lost, the daemon goes on
            backlog.popleft()
            log.exception("reading a map")
        finally:
            self.slowest_slice_ms = max(self.slowest_slice_ms,
                                        (time.perf_counter() - start) * 1000)

    def _apply_datagram(self, read: MapRead, data: bytes, mono: float,
                        wall: int) -> Iterator[None]:
        """Apply one datagram's elements, SLICE_ELEMENTS at a time."""
        try:
            elements = iter_elements(data)
            while True:
                batch = list(itertools.islice(elements, SLICE_ELEMENTS))
                if not batch:
                    return
                self._apply_elements(read, batch, mono, wall)
                read.pass_elements += len(batch)
                yield
        finally:
            assert self._dumper is not None
            self._dumper.release()

    def _apply_elements(self, read: MapRead, batch: list[Element], mono: float,
                        wall: int) -> None:
        """Each element is found state, last refreshed (as its expiry tells) at `wall` -
        (timeout - remaining); one the replica does not take gets the kernel corrected
        (`_correct`). A session derived from a connection at start-up gives way to the element
        in place (it says more: the real expiry): found_session replaces found state by later
        found state.

        A read after start-up first skips what we hold already, and treats an element we
        authored whose mark differs, and which has not changed since `wall` (the loop went on
        meanwhile), as a change whose event was lost: a local change, sent now. Found state
        never wins over a live change, so a delete made during the read stays."""
        map_id = read.rmap.map_id
        replica = self.replica
        table = replica.sessions.get(map_id)
        if table is None:
            return
        me = replica.node_id
        default_ms = (read.rmap.smap.timeout or 0) * 1000
        order = sys.byteorder
        now = time.monotonic()
        taken = 0
        fixes: list[ElementOp] = []
        for el in batch:
            data = el.data
            key = el.key
            if data is None or len(data) != 4 or not key:
                continue  # the catch-all element, or not a mark
            mark = int.from_bytes(data, order)  # nft marks: host order
            left = el.expiration_ms
            expires = None if left is None else mono + left / 1000
            if not read.startup:
                cur = table.get(key)
                if cur is not None and cur.value == mark:
                    continue
                if cur is not None and cur.origin == me and cur.updated_ms < wall:
                    self.links.enqueue(replica.local_session(map_id, key, mark, expires, now,
                                                             now_ms()))
                    read.changed += 1
                    read.pass_changed += 1
                    continue
            refreshed = wall if left is None else \
                wall - max(0, (el.timeout_ms or default_ms) - left)
            if replica.found_session(map_id, key, mark, expires, refreshed):
                taken += 1
            else:
                self._correct(map_id, key, mark, now, fixes)
        read.taken += taken
        read.pass_taken += taken
        if fixes:
            read.corrected += len(fixes)
            target = self.replicator.target(map_id)
            if target is not None:
                target.apply(fixes)

    def _correct(self, map_id: str, key: bytes, mark: int, now: float,
                 fixes: list[ElementOp]) -> None:
        """An element the replica did not take: a peer's newer delete or move may have come
        before the read reached it (then nothing was written for it): make the kernel agree."""
        op = self.replica.correction(map_id, key, mark, now)
        if op is not None:
            fixes.append(op)

    def _end_read(self, read: MapRead, dump: SetElemDump | None,
                  error: BaseException | None) -> Iterator[None]:
        """A pass is over: another, or the read is done. A dump is no snapshot of the set
        (nftsync.netlink.setdump): when the set changes during it, by a delete (expiry
        included) or a resize of its hash table, elements are skipped, and the kernel does not
        say so (no NLM_F_DUMP_INTR on set-element dumps, 6.18). So the map is read again as
        long as a pass found something the replica lacked, at least twice (unless empty), at
        most MAX_PASSES times; what the last pass skipped stays covered as SetElemDump says."""
        read.passes += 1
        if dump is not None:
            read.interrupted += dump.interrupted
        self._unsent = self._unsent or bool(read.pass_taken)
        ref = read.rmap.smap.ref
        if error is None and read.pass_elements and read.passes < MAX_PASSES and (
                read.passes < MIN_PASSES or read.pass_taken or read.pass_changed):
            log.info("map %s: pass %d: %d element(s), %d taken%s; reading it again", ref,
                     read.passes, read.pass_elements, read.pass_taken,
                     f", {read.pass_changed} changed" if read.pass_changed else "")
            self._send_found()
            self._next_pass(read)
            return
        read.ended = time.monotonic()
        if error is not None:
            read.error = str(error)
            if isinstance(error, SetGone):
                log.warning("map %s: gone before it was read (%s)", ref, error)
            else:
                log.error("reading map %s: %s", ref, error)
        else:
            log.info("map %s: %d element(s) read in %.1fs, %d pass(es), %d taken%s%s", ref,
                     read.pass_elements, read.ended - read.started, read.passes, read.taken,
                     f", {read.changed} changed" if read.changed else "",
                     f", {read.interrupted} datagram(s) flagged NLM_F_DUMP_INTR"
                     if read.interrupted else "")
            if read.startup:
                yield from self._drop_unconfirmed(read)
        self._send_found()

    def _send_found(self) -> None:
        """Found state travels only in snapshots (updates carry a node's own changes): once
        every map has been read through at least once, each peer gets a new snapshot if a pass
        took anything since the last one (so peers have a 1M map after one pass, not two)."""
        if self._unsent and all(r.passes or r.ended is not None for r in self._all_reads()):
            self._unsent = False
            for link in self.links.all():
                if link.channel is not None:
                    link.request_snapshot("maps read")

    def _drop_unconfirmed(self, read: MapRead) -> Iterator[None]:
        """Sessions derived from connections that the map, read in full, does not hold
        (their client's session expired while a connection lived on): the replica would
        hold a backend the kernel no longer keeps for that client, and refuse the client's
        next connection's session as a conflict. Forgotten without a tombstone."""
        keys = self._derived.pop(read.rmap.map_id, [])
        table = self.replica.sessions.get(read.rmap.map_id)
        if table is None:
            return
        dropped = 0
        for i, key in enumerate(keys):
            cur = table.get(key)
            if cur is not None and cur.origin == UNVERIFIED and cur.updated_ms == FOUND_CT_MS:
                table.drop(key)
                dropped += 1
            if not i & 255:
                yield
        read.dropped = dropped
        if dropped:
            log.info("map %s: %d session(s) derived from connections are not in the map: "
                     "forgotten", read.rmap.smap.ref, dropped)

    def _all_reads(self) -> Iterator[MapRead]:
        yield from self.startup_reads.values()
        yield from self.map_reads.values()

    def status(self) -> dict[str, dict]:
        """What `ctl status` shows of the start-up read, per map."""
        return {map_id: r.progress() for map_id, r in self.startup_reads.items()}

    def stats(self) -> dict:
        """What `ctl stats` shows of the reads: start-up (conntrack, each map), later ones."""
        return {"conntrack": self.startup_ct,
                "maps": {m: r.as_dict() for m, r in self.startup_reads.items()},
                "later": {m: r.as_dict() for m, r in self.map_reads.items()},
                "slowest_slice_ms": round(self.slowest_slice_ms, 3)}


@dataclass(slots=True)
class MapRead:
    """One read of a map (at start-up, or later), as `ctl stats` and `ctl status` show it."""

    rmap: ReplicatedMap
    startup: bool
    started: float  # monotonic
    queued: bool = True  # the dump of its next pass has not begun yet
    passes: int = 0  # passes over the map done
    pass_elements: int = 0  # elements of the pass under way (or of the last one)
    pass_taken: int = 0
    pass_changed: int = 0
    taken: int = 0  # found state the replica took, all passes
    changed: int = 0  # later reads: elements we authored that differed (lost events)
    dropped: int = 0  # start-up: sessions derived from connections the map did not hold
    corrected: int = 0  # elements rewritten or deleted: a peer's newer change came first
    interrupted: int = 0  # datagrams flagged NLM_F_DUMP_INTR (the set changed meanwhile)
    ended: float | None = None
    error: str = ""

    def progress(self) -> dict:
        end = self.ended if self.ended is not None else time.monotonic()
        return {"elements": self.pass_elements, "pass": self.passes + (self.ended is None),
                "done": self.ended is not None, "duration_s": round(end - self.started, 1)}

    def as_dict(self) -> dict:
        return {"map": str(self.rmap.smap.ref), **self.progress(), "queued": self.queued,
                "taken": self.taken, "changed": self.changed, "dropped": self.dropped,
                "corrected": self.corrected,
                "interrupted": self.interrupted, "error": self.error}
