"""The sync daemon: learn locally, replicate to peers, apply what peers send.

Learning (the kernel does not tell us everything):
* conntrack events of the farms' marks: NEW -> the client's session is (re)started, so it is
  upserted with the map's full timeout; NEW/UPDATE/DESTROY -> the conntrack entry itself;
* nft events of the session/static maps from transactions that are not ours (`nftsync sessions`,
  `nft add element`, `nftsync backend set down`): admin changes, adds and deletes;
* one dump of the maps and the farms' conntrack entries at start-up, and again only after an
  event-socket overrun or an explicit resync: never periodically (a big map dumps slowly).

Everything learned goes into the replica (`nftsync.replication`, origin = this node) and into
every peer's send queue. Records from peers go through the replica's checks and conflict rule and,
if they win, into the kernel. The rules themselves (what a snapshot means, when a deletion
travels) live in the replica, not here: this module does the I/O around them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any

from nftsync.daemon.config import DaemonConfig
from nftsync.errors import NftsyncError
from nftsync.netlink.ctnetlink import CtEntry, CtEvent, CtEventSocket, dump
from nftsync.netlink.nftables import (
    NftEventSocket,
    Overrun,
    SetElemEvent,
    SetEvent,
    TableEvent,
    Transaction,
    TransactionAssembler,
    join_concat,
)
from nftsync.nft import Nft
from nftsync.proto import (
    MAX_REMAINING_MS,
    AuthError,
    Channel,
    ConnectionClosed,
    Identity,
    ProtocolError,
    Record,
    RefuseReason,
    ResyncRequest,
)
from nftsync.replication import FOUND_CT_MS, ElementOp, MapPolicy, Replica
from nftsync.replication.table import Table
from nftsync.ruleset import current_farms
from nftsync.tables.nftmap import NftSessionMap

from .clock import now_ms
from .farms import FarmView, ReplicatedMap
from .legacy import LegacyMap, load_legacy_maps
from .peer import PeerLink, record_key
from .sink import (
    CtSink,
    KernelWriter,
    NftSink,
    attach_echo_filter,
    detach_echo_filter,
)

log = logging.getLogger("nftsync.daemon")

DEFAULT_CAPACITY = 1 << 22  # bound per origin for a map without `size` (the kernel has none)
STARTUP_GRACE_S = 5.0
SWEEP_INTERVAL_S = 0.2  # expiry sweep slices; other housekeeping once a second
GC_FULL_S = 900.0  # full cyclic garbage collection (unfrozen): a stall of ~0.5 s per 1M entries


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.node_id = config.node_id
        self.role = config.role
        self.started = time.monotonic()
        self.identity = Identity(config.cluster, config.node_id, config.node_name)
        self.view = FarmView()
        self.replica = Replica(config.node_id)
        self.sessions: dict[str, Table] = self.replica.sessions  # map_id -> table (same dict)
        self.conntrack: Table = self.replica.conntrack
        self.links: dict[str, PeerLink] = {}
        self.inbound: list[PeerLink] = []
        self.counters: dict[str, int] = {
            "ct_events": 0, "nft_events": 0, "ct_overruns": 0, "nft_overruns": 0,
            "reconciles": 0, "learned_sessions": 0, "learned_conntrack": 0,
            "admin_changes": 0, "auth_failures": 0, "expired": 0, "farm_reloads": 0,
            "ct_mark_conflicts": 0,
        }
        self.last_error = ""
        self._stop = asyncio.Event()
        self._server: asyncio.base_events.Server | None = None
        self._ct_events: CtEventSocket | None = None
        self._nft_events: NftEventSocket | None = None
        self._assembler = TransactionAssembler()
        self._reload_farms = False
        self._reconcile_ct = False
        self._reconcile_maps = False
        self._last_full_gc = time.monotonic()
        self._capped_seen = 0  # replica.capped at the last warning (one line a second at most)
        self._echo_filter: object | None = None  # BPF program dropping our own nft events
        self.nft = Nft()
        # The sink's own libnftables context: its writes run in the kernel writer thread.
        self.nft_sink = NftSink()
        self.ct_sink: CtSink | None = None
        self.kernel: KernelWriter | None = None
        self.legacy: dict[str, LegacyMap] = {}  # map_id -> xt_recent table of a legacy farm
        self._tasks: list[asyncio.Task] = []

    # == life cycle ===========================================================================
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.kernel = KernelWriter(loop)
        self.nft_sink.writer = self.kernel
        self.ct_sink = CtSink(self.kernel)
        # 256 MiB (SO_RCVBUFFORCE, used only while a backlog exists): a burst of 1M new
        # entries (conntrack -R at ~80k/s) outruns the learning loop for seconds; 64 MiB
        # (~220k events) overran, and an overrun costs a full conntrack dump and resend.
        self._ct_events = CtEventSocket(marks=(), ignore_portids={self.ct_sink.portid},
                                        rcvbuf=self.config.event_buffer)
        self._nft_events = NftEventSocket()
        if self.nft_sink.portid is not None:
            self._echo_filter = attach_echo_filter(self._nft_events.fileno(),
                                                   self.nft_sink.portid)
        self._load_farms()
        self._load_legacy()
        self._initial_dump()
        loop.add_reader(self._ct_events.fileno(), self._on_ct_events)
        loop.add_reader(self._nft_events.fileno(), self._on_nft_events)
        try:
            self._server = await asyncio.start_server(self._accept, self.config.listen_host,
                                                      self.config.listen_port)
        except OSError as exc:
            raise NftsyncError(f"cannot listen on {self.config.listen_host}:"
                               f"{self.config.listen_port}: {exc.strerror}") from None
        log.info("node %d (%s) of cluster %s: listening on %s:%d as %s, %d farm(s), %d peer(s)",
                 self.node_id, self.config.node_name, self.config.cluster,
                 self.config.listen_host, self.config.listen_port, self.role,
                 len(self.view.farms), len(self.config.peers))
        for peer in self.config.peers:
            self._add_dialer(str(peer), peer.host, peer.port)
        self._tasks.append(asyncio.create_task(self._housekeeping()))
        try:
            await self._stop.wait()
        finally:
            await self._shutdown(loop)

    def stop(self) -> None:
        self._stop.set()

    async def _shutdown(self, loop: asyncio.AbstractEventLoop) -> None:
        log.info("stopping")
        if self._server is not None:
            self._server.close()
        for link in [*self.links.values(), *self.inbound]:
            link.close()
            if link.dialer is not None:
                link.dialer.cancel()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, *[lk.dialer for lk in self.links.values()
                                             if lk.dialer], return_exceptions=True)
        for sock in (self._ct_events, self._nft_events):
            if sock is not None:
                with contextlib.suppress(ValueError, OSError):  # already removed / closed
                    loop.remove_reader(sock.fileno())
                sock.close()
        if self.kernel is not None:
            self.kernel.close()
        if self.ct_sink is not None:
            self.ct_sink.close()

    # == farms and start-up ===================================================================
    def _load_farms(self) -> None:
        try:
            farms = current_farms(self.nft)
        except NftsyncError as exc:
            self.last_error = f"reading farms: {exc}"
            log.error("%s", self.last_error)
            return
        self.view = FarmView.build(farms, self.config.farms)
        self._set_policies()
        if self._ct_events is not None:
            self._ct_events.marks = frozenset(self.view.marks)
        self.counters["farm_reloads"] += 1
        log.info("farms: %s", ", ".join(f"{n} ({len(f.backends)} backends)"
                                        for n, f in self.view.farms.items()) or "none")

    def _load_legacy(self) -> None:
        self.legacy = load_legacy_maps(self.config.legacy_farms)
        self._set_policies()
        if self.legacy:
            log.info("legacy xt_recent tables: %s", ", ".join(
                lm.table.name for lm in self.legacy.values()))

    def _set_policies(self) -> None:
        """Tell the replica what each replicated map may hold: its farm's backend marks, its
        size, its timeout (peer records are checked against these)."""
        policies: dict[str, MapPolicy] = {}
        for map_id, rmap in self.view.maps.items():
            smap = rmap.smap
            farm = self.view.farms[smap.farm]
            timeout_ms = min((smap.timeout or 0) * 1000, MAX_REMAINING_MS)
            policies[map_id] = MapPolicy(
                marks=frozenset(farm.backends), capacity=smap.size or DEFAULT_CAPACITY,
                max_ms=timeout_ms or MAX_REMAINING_MS, static=not smap.timeout,
                key_valid=rmap.key_valid)
        for map_id, lm in self.legacy.items():
            policies[map_id] = MapPolicy(marks=frozenset((lm.mark,)),
                                         capacity=lm.table.capacity,
                                         max_ms=MAX_REMAINING_MS, key_valid=lm.key_valid)
        legacy_marks = {lm.mark for lm in self.legacy.values()}
        self.replica.set_maps(policies, self.view.marks | legacy_marks)

    def _target(self, map_id: str) -> ReplicatedMap | LegacyMap | None:
        """Where records of `map_id` go: an nft session map, or a legacy xt_recent table."""
        return self.view.maps.get(map_id) or self.legacy.get(map_id)

    def _write(self, target: ReplicatedMap | LegacyMap, ops: list[ElementOp]) -> None:
        if isinstance(target, LegacyMap):
            target.apply(ops)  # small /proc writes: done here, folded into the next poll
        else:
            self.nft_sink.apply(target, ops)

    def _poll_legacy(self, startup: bool = False) -> None:
        """xt_recent raises no events: what changed since the last poll is a local change
        (at start-up: what the kernel holds, of no known author)."""
        now = time.monotonic()
        wall = now_ms()
        replica = self.replica
        for map_id, lm in self.legacy.items():
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
                if rec is not None:
                    self._enqueue(rec)

    def _initial_dump(self) -> None:
        """The only full read of the kernel. What is there has no known author: it fills what
        peers lack and yields to any live change they know of (nftsync.replication)."""
        for rmap in self.view.maps.values():
            self._dump_map(rmap, startup=True)
        self._poll_legacy(startup=True)
        if self.config.conntrack:
            self._dump_conntrack()

    def _dump_map(self, rmap: ReplicatedMap, startup: bool) -> int:
        """Read one map. At start-up its elements are found state; later (a new map, lost nft
        events) an element that differs from what we hold is a local change we did not hear of."""
        try:
            elems = NftSessionMap(rmap.smap, self.nft).list()
        except NftsyncError as exc:
            log.error("dumping %s: %s", rmap.smap.ref, exc)
            return 0
        replica = self.replica
        table = self.sessions[rmap.map_id]
        now = time.monotonic()
        wall = now_ms()
        types = list(rmap.smap.key_type)
        n = 0
        for s in elems:
            try:
                key = join_concat(list(s.key), types)
            except NftsyncError:
                continue
            n += 1
            expires = None if s.expires is None else now + s.expires
            if startup:
                # The last refresh, from the expiry: expires = refresh + timeout.
                age = max(0, (s.timeout or 0) - (s.expires or 0))
                replica.found_session(rmap.map_id, key, s.mark, expires, wall - age * 1000)
                continue
            cur = table.get(key)
            if cur is None or cur.value != s.mark:
                self._enqueue(replica.local_session(rmap.map_id, key, s.mark, expires, now,
                                                    wall))
        log.info("map %s: %d element(s) read", rmap.smap.ref, n)
        return n

    def _dump_conntrack(self) -> None:
        marks = self.view.marks
        n = 0
        now = time.monotonic()
        for ct in dump():
            if ct.mark not in marks:
                continue
            self.replica.found_ct(ct, now + ct.timeout)
            n += 1
        log.info("conntrack: %d entr%s of the farms at start-up", n, "y" if n == 1 else "ies")

    # == local learning =======================================================================
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
        table = self.conntrack
        by_mark = self.view.by_mark
        sessions = self.sessions
        replicate_ct = self.config.conntrack
        links = self._all_links()
        new_ev, destroy_ev, tcp = CtEvent.NEW, CtEvent.DESTROY, socket.IPPROTO_TCP
        learned_sessions = learned_ct = conflicts = 0
        self.counters["ct_events"] += len(events)
        for ev, ct in events:
            if ev == new_ev:
                for rmap in by_mark.get(ct.mark, ()):
                    recipe = rmap.recipe
                    key = recipe.key(ct, rmap.smap.key_type) if recipe is not None else None
                    if key is None:
                        continue
                    map_id = rmap.map_id
                    cur = sessions[map_id].live.get(key)
                    if cur is not None and cur.value != ct.mark and \
                            (cur.expires_at is None or cur.expires_at > now):
                        # The packet path updates the map with the connection's mark, so a
                        # NEW entry that contradicts a live session did not come from it (it
                        # was inserted): the map, which we hold, stays the truth.
                        conflicts += 1
                        continue
                    timeout = rmap.smap.timeout
                    rec = replica.local_session(map_id, key, ct.mark, now + timeout
                                                if timeout else None, now, wall)
                    learned_sessions += 1
                    for link in links:
                        link.enqueue((map_id, key), rec)
            if not replicate_ct:
                continue
            if ev == destroy_ev:
                rec = replica.local_ct_destroy(ct, now, wall)
                if rec is not None:
                    self._enqueue(rec)
                continue
            if ct.tcp_state is None and ct.l4proto == tcp:
                prev = table.live.get(ct.key)
                if prev is not None:
                    ct.tcp_state = prev.value.tcp_state  # UPDATE carries the state only on change
            rec = replica.local_ct(ct, now + ct.timeout, now, wall)
            learned_ct += 1
            if links:
                qkey = record_key(rec)
                for link in links:
                    link.enqueue(qkey, rec)
        self.counters["learned_sessions"] += learned_sessions
        self.counters["learned_conntrack"] += learned_ct
        self.counters["ct_mark_conflicts"] += conflicts

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
                elif not self.nft_sink.thread_is_ours(item.pid) or not item.complete:
                    self._learn_nft(item)

    def _learn_nft(self, tx: Transaction) -> None:
        """Another process's transaction on a replicated map: an admin change, seen live."""
        replica = self.replica
        for ev in tx.events:
            if isinstance(ev, SetElemEvent):
                rmap = self.view.by_ref.get((ev.family, ev.table, ev.set))
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
                    self._enqueue(rec)
            elif isinstance(ev, SetEvent | TableEvent):
                self._reload_farms = True

    # == queues ===============================================================================
    def _enqueue(self, rec: Record) -> None:
        qkey = record_key(rec)
        for link in self._all_links():
            link.enqueue(qkey, rec)

    def _all_links(self) -> list[PeerLink]:
        return [*self.links.values(), *self.inbound]

    def snapshot_records(self, chunk: int = 4000) -> Iterator[list[Record]]:
        """Everything this node holds (every origin, tombstones too), in chunks of records,
        copied now and built lazily (nftsync.replication.Replica.snapshot)."""
        return self.replica.snapshot(time.monotonic(), self.config.conntrack, chunk,
                                     clock=time.monotonic)

    # == applying peers' records ==============================================================
    def apply_remote(self, records: list[Record], sender: int,
                     in_snapshot: bool) -> tuple[int, int]:
        """Merge a peer's records; what wins goes into the kernel, batched."""
        w = self.replica.receive(records, sender, in_snapshot, time.monotonic(), now_ms())
        for map_id, ops in w.sessions.items():
            target = self._target(map_id)
            if target is not None:
                self._write(target, ops)
        if w.conntrack and self.ct_sink is not None:
            self.ct_sink.apply(w.conntrack)
        return len(w), w.refused

    async def kernel_room(self) -> None:
        """Wait while the kernel writer is far behind (back-pressure on the peer's stream)."""
        if self.kernel is not None:
            await self.kernel.wait_room()

    # == peers ================================================================================
    def _add_dialer(self, name: str, host: str, port: int) -> None:
        link = PeerLink(self, name, host, port)
        self.links[name] = link
        link.dialer = asyncio.create_task(self._dial(link))

    async def _dial(self, link: PeerLink) -> None:
        cfg = self.config
        delay = cfg.reconnect_min
        while not self._stop.is_set():
            if link.channel is not None:  # the peer dialled us: that connection serves
                await self._pause(cfg.reconnect_min)
                continue
            link.state = "connecting"
            try:
                ch = await Channel.connect(link.host, link.port, self.identity, cfg.key,
                                           timeout=max(2.0, cfg.peer_timeout))
            except AuthError as exc:
                link.stats.auth_failures += 1
                self.counters["auth_failures"] += 1
                link.last_error = f"authentication failed: {exc}"
                log.error("peer %s: %s", link.name, link.last_error)
            except (ConnectionClosed, ProtocolError, OSError) as exc:
                link.last_error = str(exc)
            else:
                if self._duplicate(ch, link):
                    await ch.refuse(RefuseReason.DUPLICATE_PEER)
                else:
                    delay = cfg.reconnect_min
                    await link.take_over(ch)  # the peer's own dial may have won meanwhile
            link.state = "down"
            await self._pause(delay)
            delay = min(cfg.reconnect_max, delay * 2)

    async def _pause(self, seconds: float) -> None:
        """Sleep, but return at once when the daemon stops."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stop.wait()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername")
        try:
            ch = await Channel.accept(reader, writer, self.identity, self.config.key,
                                      timeout=max(2.0, self.config.peer_timeout))
        except AuthError as exc:
            self.counters["auth_failures"] += 1
            log.error("connection from %s refused: %s", peername, exc)
            return
        except (ConnectionClosed, ProtocolError, OSError) as exc:
            log.warning("connection from %s failed: %s", peername, exc)
            return
        link = next((lk for lk in self.links.values() if lk.node_id == ch.peer.node_id), None)
        if link is None:
            link = next((lk for lk in self.inbound if lk.node_id == ch.peer.node_id), None)
        if link is not None and self._duplicate(ch, link):
            await ch.refuse(RefuseReason.DUPLICATE_PEER)
            return
        if link is None:
            link = PeerLink(self, f"{ch.peer.node_name}@{peername[0]}")
            self.inbound.append(link)
        try:
            # The new connection wins (the old one is half-dead, or loses the tie-break).
            await link.take_over(ch)
        finally:
            if link in self.inbound and link.channel is None:
                self.inbound.remove(link)

    def _duplicate(self, ch: Channel, link: PeerLink) -> bool:
        """Both sides dialled: keep the connection that the lower node id initiated."""
        if link.channel is None or link.channel.closed:
            return False
        lower_initiated = ch.peer.we_initiated == (self.node_id < ch.peer.node_id)
        return not lower_initiated

    # == housekeeping =========================================================================
    async def _housekeeping(self) -> None:
        last_tick = time.monotonic()
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            now = time.monotonic()
            self._sweep_slice(now)
            if now - last_tick < 1.0:
                continue
            last_tick = now
            self._collect_garbage(now)
            self.nft_sink.retry_refused()  # refused session writes whose cause may be gone
            try:
                self._tick()
            except NftsyncError as exc:
                self.last_error = str(exc)
                log.error("%s", exc)

    def _sweep_slice(self, now: float) -> None:
        """A small slice of the expiry sweep of each table (a few ms, however big they are)."""
        self.counters["expired"] += self.replica.sweep(now)

    def _collect_garbage(self, now: float) -> None:
        """Keep the cyclic GC off the mirror: with 1M entries a full collection walks ~3M
        objects (~0.5 s, a replication stall). Once a second the young generations are
        collected and what survived is frozen (moved out of the collector's sight: mirror
        entries hold no cycles and are freed by reference counting anyway). A full collection
        of everything runs every GC_FULL_S, for cycles that became garbage after freezing."""
        gc.collect(1)
        if now - self._last_full_gc >= GC_FULL_S:
            self._last_full_gc = now
            gc.unfreeze()
            gc.collect()
        gc.freeze()

    def _tick(self) -> None:
        capped = self.replica.capped
        if capped != self._capped_seen:
            log.warning("%d session record(s) carried an expiry longer than their map's timeout "
                        "and were cut to it (%d in all)", capped - self._capped_seen, capped)
            self._capped_seen = capped
        if self._echo_filter is not None and not self.nft_sink.echo_filter_valid():
            # libnftables replaced its socket: its port id is no longer ours to filter on.
            assert self._nft_events is not None
            detach_echo_filter(self._nft_events.fileno())
            self._echo_filter = None
            log.warning("nft events of our own writes are no longer dropped in the kernel")
        if self.legacy:
            self._poll_legacy()
        if self._reload_farms:
            self._reload_farms = False
            before = set(self.view.maps)
            self._load_farms()
            for map_id in set(self.view.maps) - before:
                self._dump_map(self.view.maps[map_id], startup=False)
        if self._reconcile_ct:
            self._reconcile_ct = False
            self.counters["reconciles"] += 1
            self._reconcile_conntrack()
        if self._reconcile_maps:
            self._reconcile_maps = False
            self.counters["reconciles"] += 1
            for rmap in self.view.maps.values():
                self._dump_map(rmap, startup=False)

    def _reconcile_conntrack(self) -> None:
        """After an overrun: the kernel's entries of the farms are what the lost events said.

        An entry we did not know is a NEW event we lost: it is learned as one, so its client's
        session is learned too (a 1M-entry burst overran and lost 231k sessions otherwise).
        A known entry is re-sent only if it changed beyond its timeout (re-sending all of them
        overflowed the peers' queues into a full snapshot). One we hold that the kernel no
        longer has is a DESTROY we lost (a live deletion only where we authored it).
        """
        marks = self.view.marks
        now = time.monotonic()
        wall = now_ms()
        seen = set()
        missed: list[tuple[CtEvent, CtEntry]] = []
        for ct in dump():
            if ct.mark not in marks:
                continue
            seen.add(ct.key)
            cur = self.conntrack.get(ct.key)
            if cur is None:
                missed.append((CtEvent.NEW, ct))
                if len(missed) >= 4096:
                    self._learn_ct(missed)
                    missed = []
            elif _ct_state(cur.value) != _ct_state(ct):
                self._enqueue(self.replica.local_ct(ct, now + ct.timeout, now, wall))
        if missed:
            self._learn_ct(missed)
        for key, e in list(self.conntrack.live.items()):
            if key not in seen:
                rec = self.replica.local_ct_destroy(e.value, now, wall)
                if rec is not None:
                    self._enqueue(rec)
        log.warning("conntrack events were lost (socket overrun): reconciled from a dump")

    # == control operations ===================================================================
    def health(self) -> tuple[str, list[str]]:
        reasons = []
        links = self._all_links()
        up = [lk for lk in links if lk.state == "up"]
        grace = time.monotonic() - self.started < STARTUP_GRACE_S
        if self.config.peers and not up and not grace:
            reasons.append("no peer is connected")
        for lk in links:
            if lk.state != "up" and lk.host and not grace:
                reasons.append(f"peer {lk.name} is {lk.state}: {lk.last_error or 'no answer'}")
            elif lk.state == "up" and lk.unacked_age() > self.config.stall_after:
                reasons.append(f"peer {lk.name} has not acknowledged updates for "
                               f"{lk.unacked_age():.0f}s (sync stalled)")
        if not self.view.farms and not self.legacy:
            reasons.append("no nftsync farm is loaded")
        if self.nft_sink.stats.failed or (self.ct_sink and self.ct_sink.stats.failed):
            reasons.append("some replicated changes could not be applied to the kernel "
                           "(see stats)")
        reasons.extend(self.nft_sink.problems())  # refused writes waiting, in words
        if not reasons:
            return "ok", []
        failing = (self.config.peers and not up and not grace) or \
            (not self.view.farms and not self.legacy)
        return ("failing" if failing else "degraded"), reasons

    def status(self) -> dict:
        health, reasons = self.health()
        links = self._all_links()
        return {
            "node": self.config.node_name, "node_id": self.node_id,
            "cluster": self.config.cluster, "role": self.role, "health": health,
            "reasons": reasons, "uptime_s": round(time.monotonic() - self.started, 1),
            "farms": sorted(self.view.farms), "peers_up": sum(lk.state == "up" for lk in links),
            "peers_total": len(links), "pid": os.getpid(),
        }

    def peers(self) -> list[dict]:
        return [lk.as_dict() for lk in self._all_links()]

    def stats(self) -> dict:
        sessions = {m: len(t) for m, t in self.sessions.items()}
        return {
            "counters": dict(self.counters),
            "refused": dict(self.replica.refused),  # peer records refused, by cause
            "capped_expiry": self.replica.capped,
            "sessions": sessions, "conntrack": len(self.conntrack),
            "kernel": {"nft": _stats(self.nft_sink.stats),
                       "conntrack": _stats(self.ct_sink.stats) if self.ct_sink else None,
                       "queued": self.kernel.queued if self.kernel else 0,
                       "problems": self.nft_sink.problems()},
            "events": {
                "conntrack": _stats(self._ct_events.stats) if self._ct_events else None,
                "nftables": _stats(self._nft_events.stats) if self._nft_events else None},
            "peers": {lk.name: lk.as_dict() for lk in self._all_links()},
            "last_error": self.last_error,
        }

    async def resync(self, peer: str | None = None) -> dict:
        links = [lk for lk in self._all_links() if peer is None or peer in
                 (lk.name, lk.node_name, str(lk.node_id))]
        if peer is not None and not links:
            raise NftsyncError(f"no peer {peer!r} (peers: "
                               f"{', '.join(lk.name for lk in self._all_links()) or 'none'})")
        done = []
        for lk in links:
            if lk.channel is None:
                continue
            lk.request_snapshot("operator resync")
            await lk.channel.send(ResyncRequest(RefuseReason.OPERATOR, "operator resync"))
            done.append(lk.name)
        return {"resync": done}

    def promote(self) -> dict:
        """The node now serves the VIP. Replication is symmetric, so nothing changes in what it
        holds or sends: the role is what keepalived and operators read."""
        old = self.role
        self.role = "active"
        if old != "active":
            log.warning("promoted to active (was %s)", old)
        return {"role": self.role, "was": old}

    def demote(self) -> dict:
        old = self.role
        self.role = "backup"
        if old != "backup":
            log.warning("demoted to backup (was %s)", old)
        return {"role": self.role, "was": old}

    def show(self, farm: str | None = None, limit: int = 100) -> dict:
        now = time.monotonic()
        out: dict[str, Any] = {"farms": {}, "conntrack": len(self.conntrack)}
        shown: list[tuple[str, str, ReplicatedMap | LegacyMap]] = \
            [(r.smap.farm, r.smap.role.value, r) for r in self.view.maps.values()] + \
            [(lm.farm.name, f"recent {lm.table.name}", lm) for lm in self.legacy.values()]
        for farm_name, section, target in sorted(shown, key=lambda t: (t[0], t[1])):
            if farm is not None and farm_name != farm:
                continue
            table = self.sessions[target.map_id]
            rows = []
            for key, e in table.live.items():
                if len(rows) >= limit:
                    break
                rows.append({"client": target.key_text(key), "backend": f"{e.value:#x}",
                             "expires_s": None if e.expires_at is None else
                             round(e.expires_at - now, 1), "origin": e.origin,
                             "updated_ms": e.updated_ms})
            out["farms"].setdefault(farm_name, {})[section] = {"count": len(table),
                                                               "entries": rows}
        if farm is not None and not out["farms"]:
            known = sorted({f for f, _, _ in shown})
            raise NftsyncError(f"no replicated farm {farm!r} (farms: "
                               f"{', '.join(known) or 'none'})")
        return out

    async def reload(self, config: DaemonConfig) -> dict:
        changes: dict[str, Any] = {}
        old = {str(p) for p in self.config.peers}
        new = {str(p): p for p in config.peers}
        if config.key != self.config.key or config.cluster != self.config.cluster or \
                config.node_id != self.config.node_id:
            changes["restart_needed"] = "key, cluster and node id take effect on restart"
        self.config = _merge_reloadable(self.config, config)
        for name in old - set(new):
            link = self.links.pop(name)
            link.close()
            if link.dialer:
                link.dialer.cancel()
        for name in set(new) - old:
            self._add_dialer(name, new[name].host, new[name].port)
        changes["peers_added"] = sorted(set(new) - old)
        changes["peers_removed"] = sorted(old - set(new))
        if config.role != self.role:
            changes["role"] = (self.promote() if config.role == "active" else self.demote())
        self._reload_farms = True
        log.info("configuration reloaded: %s", changes)
        return changes


def _merge_reloadable(old: DaemonConfig, new: DaemonConfig) -> DaemonConfig:
    """Take what can change at run time; identity and key stay until a restart."""
    new.key, new.cluster, new.node_id, new.node_name = old.key, old.cluster, old.node_id, \
        old.node_name
    new.listen_host, new.listen_port = old.listen_host, old.listen_port
    return new


def _ct_state(ct: CtEntry) -> tuple:
    """What a peer must hear about when it changes (the timeout runs down on its own)."""
    return (ct.mark, ct.status, ct.tcp_state, ct.reply_src, ct.reply_dst, ct.reply_sport,
            ct.reply_dport)


def _stats(obj: Any) -> dict:
    fields = getattr(obj, "__dataclass_fields__", None) or getattr(obj, "__slots__", ())
    return {f: getattr(obj, f) for f in fields if not f.startswith("_")}

