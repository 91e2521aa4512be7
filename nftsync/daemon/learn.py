"""Learning: what this node's kernel did, turned into replicated changes.

The kernel does not tell us everything, so three sources are combined:
* conntrack events of the farms' marks: NEW -> the client's session is (re)started, so it is
  upserted with the map's full timeout (the packet path updates the map at each new connection
  and raises no event of its own); NEW/UPDATE/DESTROY -> the conntrack entry itself;
* nft events of the session/static maps from transactions that are not ours (`nftsync
  sessions`, `nft add element`, `nftsync backend set down`): admin changes, adds and deletes;
* one read of the farms' conntrack entries and of the maps at start-up (the maps streamed in the
  background: `kernelread.KernelReads`), and again only after an event-socket overrun: never
  periodically (a big map dumps slowly).

Every change goes into the replica (origin = this node) and out to every peer link's queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time

from nftsync.conntrack import CtEntry
from nftsync.netlink.ctnetlink import CtEvent
from nftsync.netlink.ctsocket import CtEventSocket, dump
from nftsync.netlink.nftables import (
    NftEventSocket,
    Overrun,
    SetElemEvent,
    SetEvent,
    TableEvent,
    Transaction,
    TransactionAssembler,
)
from nftsync.proto.conntrack import ct_key, ct_state_bytes, encode_ct
from nftsync.replication import FOUND_CT_MS

from .clock import now_ms
from .echo import attach_echo_filter, detach_echo_filter
from .kernelread import KernelReads
from .links import Links
from .replicator import Replicator

log = logging.getLogger("nftsync.daemon")
# Conntrack events learned per wake-up of the loop: ~7 us each on the active node, so one read
# holds the loop ~2 ms at most; the socket stays readable and the loop comes back at once.
EVENTS_PER_READ = 256


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
        self.reads = KernelReads(replicator, links)  # of conntrack and the maps (start-up)

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
        self.reads.close()
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
                self.reads.read_map(self.replicator.view.maps[map_id], startup=False)
        if self._reconcile_ct:
            self._reconcile_ct = False
            self.counters["reconciles"] += 1
            self._reconcile_conntrack()
        if self._reconcile_maps:
            self._reconcile_maps = False
            self.counters["reconciles"] += 1
            for rmap in self.replicator.view.maps.values():
                self.reads.read_map(rmap, startup=False)

    # == start-up =============================================================================
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
        await self.reads.read_conntrack()

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
