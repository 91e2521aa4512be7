"""Learning: what this node's kernel did, turned into replicated changes.

The kernel does not tell us everything, so three sources are combined:
* conntrack events of the farms' marks: NEW -> the client's session is (re)started, so it is
  upserted with the map's full timeout (the packet path updates the map at each new connection
  and raises no event of its own); NEW/UPDATE/DESTROY -> the conntrack entry itself;
* nft events of the session/static maps from transactions that are not ours (`nftsync
  sessions`, `nft add element`, `nftsync backend set down`): admin changes, adds and deletes;
* one read of the farms' conntrack entries and of the maps at start-up (the maps streamed in the
  background, see "start-up"), and again only after an event-socket overrun: never
  periodically (a big map dumps slowly).

Every change goes into the replica (origin = this node) and out to every peer link's queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from nftsync.conntrack import CtEntry
from nftsync.netlink.ctnetlink import CtEvent
from nftsync.netlink.ctsocket import CtEventSocket, dump
from nftsync.netlink.nftables import (
    Element,
    NftEventSocket,
    Overrun,
    SetElemEvent,
    SetEvent,
    TableEvent,
    Transaction,
    TransactionAssembler,
)
from nftsync.netlink.setdump import DumpThread, SetElemDump, SetGone, iter_elements
from nftsync.proto.conntrack import ct_key, ct_state_bytes, encode_ct
from nftsync.replication import FOUND_CT_MS, UNVERIFIED, ElementOp

from .clock import now_ms
from .echo import attach_echo_filter, detach_echo_filter
from .farms import ReplicatedMap
from .links import Links
from .replicator import Replicator

log = logging.getLogger("nftsync.daemon")
# Conntrack events learned per wake-up of the loop: ~7 us each on the active node, so one read
# holds the loop ~2 ms at most; the socket stays readable and the loop comes back at once.
EVENTS_PER_READ = 256

SLICE_S = 0.001  # the map reads give the loop back after about this long...
POLL_S = 0.002  # ... for this long at least
SLICE_ELEMENTS = 64  # map elements applied between two looks at the clock (~0.2 ms)
READ_WINDOW = 8  # datagrams (<= 32 KiB, ~800 elements each) handed to the loop, not yet applied
MIN_PASSES, MAX_PASSES = 2, 4  # reads of one map (see Learner._end_read)


class Learner:
    """The event sockets and what they teach: local changes into the replica and the links."""

    def __init__(self, replicator: Replicator, links: Links) -> None:
        self.replicator = replicator
        self.replica = replicator.replica
        self.links = links
        self.counters: dict[str, int] = {
            "ct_events": 0, "nft_events": 0, "ct_overruns": 0, "nft_overruns": 0,
            "reconciles": 0, "learned_sessions": 0, "learned_conntrack": 0,
            "admin_changes": 0,
        }
        self.reload_farms = False  # set by nft events of tables/sets and by a config reload
        self._reconcile_ct = False
        self._reconcile_maps = False
        self._ct_events: CtEventSocket | None = None
        self._nft_events: NftEventSocket | None = None
        self._assembler = TransactionAssembler()
        self._echo_filter: object | None = None  # BPF program dropping our own nft events
        self._ct_echo_filter: object | None = None  # ... and our own conntrack writes' events
        # The reads of the kernel (see "start-up"): progress for ctl, and the reading thread.
        self.startup_ct: dict = {}
        self.startup_reads: dict[str, MapRead] = {}
        self.map_reads: dict[str, MapRead] = {}  # the latest later read of each map
        self.slowest_slice_ms = 0.0
        self._dumper: DumpThread | None = None
        self._backlog: deque[Iterator[None]] = deque()
        self._poll_handle: asyncio.TimerHandle | None = None
        self._unsent = False  # found state taken since the last snapshot we asked for
        self._derived: dict[str, list[bytes]] = {}  # map -> sessions derived from conntrack

    # == sockets ==============================================================================
    def open(self) -> None:
        """Open the event sockets (before the start-up dump, so nothing falls in between)."""
        sink = self.replicator.nft_sink
        ct_sink = self.replicator.ct_sink
        # 256 MiB (SO_RCVBUFFORCE, used only while a backlog exists): a burst of 1M new
        # entries (conntrack -R at ~80k/s) outruns the learning loop for seconds; 64 MiB
        # (~220k events) overran, and an overrun costs a full conntrack dump and resend.
        self._ct_events = CtEventSocket(
            marks=frozenset(self.replicator.view.marks),
            ignore_portids={ct_sink.portid} if ct_sink is not None else set(),
            rcvbuf=self.replicator.config.event_buffer, max_events=EVENTS_PER_READ)
        if ct_sink is not None:
            # Our own conntrack writes (what peers sent) raise events too: drop them in the
            # kernel, not after reading and decoding them (the filter in Python stays as a
            # second line).
            self._ct_echo_filter = attach_echo_filter(self._ct_events.fileno(), ct_sink.portid)
        self._nft_events = NftEventSocket()
        if sink.portid is not None:
            self._echo_filter = attach_echo_filter(self._nft_events.fileno(), sink.portid)

    def watch(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self._ct_events is not None and self._nft_events is not None
        loop.add_reader(self._ct_events.fileno(), self._on_ct_events)
        loop.add_reader(self._nft_events.fileno(), self._on_nft_events)

    def close(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._poll_handle is not None:
            self._poll_handle.cancel()
        if self._dumper is not None:
            self._dumper.close()
        for sock in (self._ct_events, self._nft_events):
            if sock is not None:
                with contextlib.suppress(ValueError, OSError):  # already removed / closed
                    loop.remove_reader(sock.fileno())
                sock.close()

    def farms_changed(self) -> None:
        """The replicator reloaded the farms: follow their marks."""
        if self._ct_events is not None:
            self._ct_events.marks = frozenset(self.replicator.view.marks)

    @property
    def ct_stats(self) -> object | None:
        return self._ct_events.stats if self._ct_events is not None else None

    @property
    def nft_stats(self) -> object | None:
        return self._nft_events.stats if self._nft_events is not None else None

    # == once a second ========================================================================
    def tick(self) -> None:
        """What the events could not tell: legacy tables (no events), farm reloads, repairs
        after overruns."""
        if self._echo_filter is not None and not self.replicator.nft_sink.echo_filter_valid():
            # libnftables replaced its socket: its port id is no longer ours to filter on.
            assert self._nft_events is not None
            detach_echo_filter(self._nft_events.fileno())
            self._echo_filter = None
            log.warning("nft events of our own writes are no longer dropped in the kernel")
        if self.replicator.legacy:
            self._poll_legacy()
        if self.reload_farms:
            self.reload_farms = False
            before = set(self.replicator.view.maps)
            if self.replicator.load_farms():
                self.farms_changed()
            for map_id in set(self.replicator.view.maps) - before:
                self._dump_map(self.replicator.view.maps[map_id], startup=False)
        if self._reconcile_ct:
            self._reconcile_ct = False
            self.counters["reconciles"] += 1
            self._reconcile_conntrack()
        if self._reconcile_maps:
            self._reconcile_maps = False
            self.counters["reconciles"] += 1
            for rmap in self.replicator.view.maps.values():
                self._dump_map(rmap, startup=False)

    # == start-up =============================================================================
    # The kernel is read in two steps (docs/daemon.md, "Start-up"):
    # 1. before the daemon listens, what is linear: the xt_recent tables and the farms'
    #    conntrack entries (1M in ~5 s), each a found conntrack entry and, for each sessions
    #    map of its mark, its client's session; the loop answers the control socket meanwhile;
    # 2. once it listens and follows events, the maps (their dump is quadratic: ~35 s at 1M):
    #    a thread streams each map's dump (nftsync.netlink.setdump) and the loop applies the
    #    elements in slices of about a millisecond.
    # What is found has no known author and an old date: whatever a live change or a peer
    # says wins over it, so it does not matter what the loop learned before or in between.
    def _poll_legacy(self, startup: bool = False) -> None:
        """xt_recent raises no events: what changed since the last poll is a local change
        (at start-up: what the kernel holds, of no known author)."""
        now = time.monotonic()
        wall = now_ms()
        replica = self.replica
        for map_id, lm in self.replicator.legacy.items():
            for ch in lm.read():
                expires = now + ch.remaining_ms / 1000
                if startup:
                    if ch.mark is not None:
                        replica.found_session(map_id, ch.key, ch.mark, expires, FOUND_CT_MS)
                    continue
                if ch.mark is None:
                    rec = replica.local_session_delete(map_id, ch.key, now, wall)
                else:
                    rec = replica.local_session(map_id, ch.key, ch.mark, expires, now, wall)
                    self.counters["learned_sessions"] += 1
                self.links.enqueue(rec)

    async def initial_dump(self) -> None:
        """Step 1, before listening: the legacy tables and the farms' conntrack entries."""
        self._poll_legacy(startup=True)
        await self._dump_conntrack()

    def read_maps(self) -> None:
        """Step 2, once listening: every replicated map, read in the background."""
        for rmap in self.replicator.view.maps.values():
            self._dump_map(rmap, startup=True)

    async def _dump_conntrack(self) -> None:
        """The farms' conntrack entries: found entries (when conntrack is replicated) and, from
        each, its client's session in each sessions map of its mark, by the recipe the NEW
        events use. A connection says its client had that session when it began, at a time
        ctnetlink does not tell (no timestamps unless nf_conntrack_timestamp is on), so the
        session is dated "long ago" (FOUND_CT_MS, like a found conntrack entry): the map's own
        element, once read, any live change and any peer's record all win over it. Its expiry
        is the map's full timeout from now, the latest the kernel's can be; the map's read
        replaces it by the element's own (`_apply_found`) and drops the sessions the map does
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
        self.startup_ct = {"entries": entries, "sessions": sessions, "read": seen,
                           "duration_s": round(took, 3)}
        log.info("conntrack: %d entr%s of the farms at start-up, %d session(s) derived from "
                 "them, read in %.1fs", entries, "y" if entries == 1 else "ies", sessions, took)

    def _dump_map(self, rmap: ReplicatedMap, startup: bool) -> None:
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
                if read.startup:
                    self._apply_found(read, batch, mono, wall)
                else:
                    self._apply_reread(read, batch, mono, wall)
                read.pass_elements += len(batch)
                yield
        finally:
            assert self._dumper is not None
            self._dumper.release()

    def _apply_found(self, read: MapRead, batch: list[Element], mono: float,
                     wall: int) -> None:
        """Start-up: each element is found state, last refreshed (as its expiry tells) at
        `wall` - (timeout - remaining)."""
        map_id = read.rmap.map_id
        replica = self.replica
        if map_id not in replica.sessions:
            return
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
            if left is None:
                expires, refreshed = None, wall
            else:
                expires = mono + left / 1000
                refreshed = wall - max(0, (el.timeout_ms or default_ms) - left)
            # A session derived from a connection gives way to the element in place (it says
            # more: the real expiry); found_session replaces found state by later found state.
            if replica.found_session(map_id, key, mark, expires, refreshed):
                taken += 1
            else:
                self._correct(map_id, key, mark, now, fixes)
        read.taken += taken
        read.pass_taken += taken
        self._write_fixes(read, fixes)

    def _correct(self, map_id: str, key: bytes, mark: int, now: float,
                 fixes: list[ElementOp]) -> None:
        """An element the replica did not take: a peer's newer delete or move may have come
        before the read reached it (then nothing was written for it): make the kernel agree."""
        op = self.replica.correction(map_id, key, mark, now)
        if op is not None:
            fixes.append(op)

    def _write_fixes(self, read: MapRead, fixes: list[ElementOp]) -> None:
        if not fixes:
            return
        read.corrected += len(fixes)
        target = self.replicator.target(read.rmap.map_id)
        if target is not None:
            target.apply(fixes)

    def _apply_reread(self, read: MapRead, batch: list[Element], mono: float,
                      wall: int) -> None:
        """A read after start-up. The kernel's state is that of `wall`, and the loop went on
        meanwhile: an element we authored whose mark differs, and which has not changed since,
        is a change whose event was lost (a local change, sent now); anything else is found
        state, which never wins over a live change (a delete made during the read included)."""
        map_id = read.rmap.map_id
        replica = self.replica
        table = replica.sessions.get(map_id)
        if table is None:
            return
        me = replica.node_id
        default_ms = (read.rmap.smap.timeout or 0) * 1000
        order = sys.byteorder
        now = time.monotonic()
        fixes: list[ElementOp] = []
        for el in batch:
            data = el.data
            key = el.key
            if data is None or len(data) != 4 or not key:
                continue
            mark = int.from_bytes(data, order)
            left = el.expiration_ms
            expires = None if left is None else mono + left / 1000
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
            taken = replica.found_session(map_id, key, mark, expires, refreshed)
            if not taken:
                self._correct(map_id, key, mark, now, fixes)
            read.taken += taken
            read.pass_taken += taken
        self._write_fixes(read, fixes)

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

    def startup_status(self) -> dict[str, dict]:
        """What `ctl status` shows of the start-up read, per map."""
        return {map_id: r.progress() for map_id, r in self.startup_reads.items()}

    def startup_stats(self) -> dict:
        """What `ctl stats` shows of the reads: start-up (conntrack, each map), later ones."""
        return {"conntrack": self.startup_ct,
                "maps": {m: r.as_dict() for m, r in self.startup_reads.items()},
                "later": {m: r.as_dict() for m, r in self.map_reads.items()},
                "slowest_slice_ms": round(self.slowest_slice_ms, 3)}

    # == events =============================================================================
    def _on_ct_events(self) -> None:
        sock = self._ct_events
        assert sock is not None
        # One read (at most CtEventSocket.max_events) per wake-up: during a burst the senders
        # get the loop between reads, so the peer applies while we still learn (pipelining)
        # instead of waiting for the whole burst. The socket stays readable: we come back.
        events = sock.read()
        if events.overrun:
            self.counters["ct_overruns"] += 1
            self._reconcile_ct = True
        if events:
            self._learn_ct(events)

    def _learn_ct(self, events: list[tuple[CtEvent, CtEntry]]) -> None:
        # The hot path of the active node: clocks are read once per batch, the peers' queues
        # are looked up once, and records go straight into them.
        now = time.monotonic()
        wall = now_ms()
        replica = self.replica
        by_mark = self.replicator.view.by_mark
        replicate_ct = self.replicator.config.conntrack
        links = self.links.all()
        new_ev, destroy_ev = CtEvent.NEW, CtEvent.DESTROY
        learned_sessions = learned_ct = 0
        self.counters["ct_events"] += len(events)
        for ev, ct in events:
            if ev == new_ev:
                for rmap in by_mark.get(ct.mark, ()):
                    recipe = rmap.recipe
                    key = recipe.key(ct, rmap.smap.key_type) if recipe is not None else None
                    if key is None:
                        continue
                    timeout = rmap.smap.timeout
                    rec = replica.session_from_ct(rmap.map_id, key, ct.mark, now + timeout
                                                  if timeout else None, now, wall)
                    if rec is None:
                        continue
                    learned_sessions += 1
                    for link in links:
                        link.enqueue((rec.map_id, key), rec)
            if not replicate_ct:
                continue
            if ev == destroy_ev:
                rec = replica.local_ct_destroy(ct_key(ct), now, wall)
                if rec is not None:
                    self.links.enqueue(rec)
                continue
            key, rec = replica.local_ct(ct, now + ct.timeout, now, wall)
            learned_ct += 1
            if links:
                qkey = ("ct", key)  # peer.record_key(rec), without joining the key again
                for link in links:
                    link.enqueue(qkey, rec)
        self.counters["learned_sessions"] += learned_sessions
        self.counters["learned_conntrack"] += learned_ct

    def _on_nft_events(self) -> None:
        sock = self._nft_events
        assert sock is not None
        for _ in range(16):
            events = sock.read()
            if not events:
                return
            self.counters["nft_events"] += len(events)
            for item in self._assembler.feed(events):
                if isinstance(item, Overrun):
                    self.counters["nft_overruns"] += 1
                    self._reconcile_maps = True
                elif not self.replicator.nft_sink.thread_is_ours(item.pid) or not item.complete:
                    self._learn_nft(item)

    def _learn_nft(self, tx: Transaction) -> None:
        """Another process's transaction on a replicated map: an admin change, seen live."""
        replica = self.replica
        for ev in tx.events:
            if isinstance(ev, SetElemEvent):
                rmap = self.replicator.view.by_ref.get((ev.family, ev.table, ev.set))
                if rmap is None:
                    continue
                now = time.monotonic()
                wall = now_ms()
                for el in ev.elements:
                    key = bytes(el.key)
                    if ev.op == "delete":
                        rec = replica.local_session_delete(rmap.map_id, key, now, wall)
                    elif el.data is None or len(el.data) != 4:
                        continue
                    else:
                        mark = int.from_bytes(el.data, sys.byteorder)  # nft marks: host order
                        expires = None if el.expiration_ms is None else \
                            now + el.expiration_ms / 1000
                        rec = replica.local_session(rmap.map_id, key, mark, expires, now, wall)
                    self.counters["admin_changes"] += 1
                    self.links.enqueue(rec)
            elif isinstance(ev, SetEvent | TableEvent):
                self.reload_farms = True

    def _reconcile_conntrack(self) -> None:
        """After an overrun: the kernel's entries of the farms are what the lost events said.

        An entry we did not know is a NEW event we lost: it is learned as one, so its client's
        session is learned too (a 1M-entry burst overran and lost 231k sessions otherwise).
        A known entry is re-sent only if it changed beyond its timeout (re-sending all of them
        overflowed the peers' queues into a full snapshot). One we hold that the kernel no
        longer has is a DESTROY we lost (a live deletion only where we authored it).
        """
        marks = self.replicator.view.marks
        now = time.monotonic()
        wall = now_ms()
        seen = set()
        missed: list[tuple[CtEvent, CtEntry]] = []
        for ct in dump():
            if ct.mark not in marks:
                continue
            key = ct_key(ct)
            seen.add(key)
            cur = self.replica.conntrack.get(key)
            if cur is None:
                missed.append((CtEvent.NEW, ct))
                if len(missed) >= 4096:
                    self._learn_ct(missed)
                    missed = []
            elif ct_state_bytes(cur.value) != ct_state_bytes(encode_ct(ct)):  # type: ignore[arg-type]
                self.links.enqueue(self.replica.local_ct(ct, now + ct.timeout, now, wall)[1])
        if missed:
            self._learn_ct(missed)
        for key in list(self.replica.conntrack.keys()):
            if key not in seen:
                rec = self.replica.local_ct_destroy(key, now, wall)
                if rec is not None:
                    self.links.enqueue(rec)
        log.warning("conntrack events were lost (socket overrun): reconciled from a dump")



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
