"""The sync daemon: learn locally, replicate to peers, apply what peers send.

Learning (the kernel does not tell us everything):
* conntrack events of the farms' marks: NEW -> the client's session is (re)started, so it is
  upserted with the map's full timeout; NEW/UPDATE/DESTROY -> the conntrack entry itself;
* nft events of the session/static maps from transactions that are not ours (`nftsync sessions`,
  `nft add element`, `nftsync backend set down`): admin changes, adds and deletes;
* one dump of the maps and the farms' conntrack entries at start-up, and again only after an
  event-socket overrun or an explicit resync: never periodically (a big map dumps slowly).

Everything learned goes into the mirror (origin = this node) and into every peer's send queue.
Records from peers go through the conflict rule into the mirror and, if they win, into the kernel.
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
from nftsync.netlink.ctnetlink import CtEntry, CtEvent, CtEventSocket, CtFormatError, dump
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
    OP_ADD,
    OP_DELETE,
    OP_UPSERT,
    AuthError,
    Channel,
    ConnectionClosed,
    ConntrackRecord,
    Identity,
    ProtocolError,
    Record,
    RefuseReason,
    ResyncRequest,
    SessionRecord,
)
from nftsync.ruleset import current_farms
from nftsync.tables.nftmap import NftSessionMap

from .farms import FarmView, ReplicatedMap
from .legacy import LegacyMap, load_legacy_maps
from .mirror import UNVERIFIED, Entry, Table, now_ms
from .peer import PeerLink, record_key
from .sink import (
    CtSink,
    ElementOp,
    KernelWriter,
    NftSink,
    attach_echo_filter,
    detach_echo_filter,
)

log = logging.getLogger("nftsync.daemon")

CT_TABLE = "conntrack"
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
        self.sessions: dict[str, Table] = {}
        self.conntrack = Table(CT_TABLE)
        self.links: dict[str, PeerLink] = {}
        self.inbound: list[PeerLink] = []
        self.counters: dict[str, int] = {
            "ct_events": 0, "nft_events": 0, "ct_overruns": 0, "nft_overruns": 0,
            "reconciles": 0, "learned_sessions": 0, "learned_conntrack": 0,
            "admin_changes": 0, "auth_failures": 0, "unknown_map": 0, "bad_records": 0,
            "expired": 0, "farm_reloads": 0,
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
        self._snapshotted: set[int] = set()  # origins whose snapshot completed since start
        self._last_full_gc = time.monotonic()
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
        for map_id in self.view.maps:
            self.sessions.setdefault(map_id, Table(map_id))
        if self._ct_events is not None:
            self._ct_events.marks = frozenset(self.view.marks)
        self.counters["farm_reloads"] += 1
        log.info("farms: %s", ", ".join(f"{n} ({len(f.backends)} backends)"
                                        for n, f in self.view.farms.items()) or "none")

    def _load_legacy(self) -> None:
        self.legacy = load_legacy_maps(self.config.legacy_farms)
        for map_id in self.legacy:
            self.sessions.setdefault(map_id, Table(map_id))
        if self.legacy:
            log.info("legacy xt_recent tables: %s", ", ".join(
                lm.table.name for lm in self.legacy.values()))

    def _target(self, map_id: str) -> ReplicatedMap | LegacyMap | None:
        """Where records of `map_id` go: an nft session map, or a legacy xt_recent table."""
        return self.view.maps.get(map_id) or self.legacy.get(map_id)

    def _write(self, target: ReplicatedMap | LegacyMap, ops: list[ElementOp]) -> None:
        if isinstance(target, LegacyMap):
            target.apply(ops)  # small /proc writes: done here, folded into the next poll
        else:
            self.nft_sink.apply(target, ops)

    def _poll_legacy(self, origin: int) -> None:
        """xt_recent raises no events: what changed since the last poll is a local change."""
        now = time.monotonic()
        for map_id, lm in self.legacy.items():
            table = self.sessions[map_id]
            for ch in lm.read():
                if ch.mark is None:
                    e = table.local_delete(ch.key, origin)
                    if e is not None:
                        self._enqueue(SessionRecord(OP_DELETE, map_id, ch.key, 0, 0,
                                                    e.updated_ms, origin))
                    continue
                e = table.local_set(ch.key, ch.mark, now + ch.remaining_ms / 1000, origin)
                self.counters["learned_sessions"] += 1
                if origin == self.node_id:
                    self._enqueue_session(map_id, ch.key, e)

    def _initial_dump(self) -> None:
        """The only full read of the kernel: what is there now becomes the mirror's start."""
        origin = self.node_id if self.role == "active" else UNVERIFIED
        for rmap in self.view.maps.values():
            self._dump_map(rmap, origin)
        self._poll_legacy(origin)
        if self.config.conntrack:
            self._dump_conntrack(origin)

    def _dump_map(self, rmap: ReplicatedMap, origin: int) -> int:
        try:
            elems = NftSessionMap(rmap.smap, self.nft).list()
        except NftsyncError as exc:
            log.error("dumping %s: %s", rmap.smap.ref, exc)
            return 0
        table = self.sessions[rmap.map_id]
        now = time.monotonic()
        wall = now_ms()
        types = list(rmap.smap.key_type)
        seen = set()
        for s in elems:
            try:
                key = join_concat(list(s.key), types)
            except NftsyncError:
                continue
            seen.add(key)
            cur = table.get(key)
            if cur is not None and cur.value == s.mark:
                continue
            expires = None if s.expires is None else now + s.expires
            # Estimate the last refresh from the expiry: expires = refresh + timeout.
            age = (s.timeout or 0) - (s.expires or 0)
            table.local_set(key, s.mark, expires, origin, updated_ms=wall - max(0, age) * 1000)
            if origin == self.node_id:
                self._enqueue_session(rmap.map_id, key, table.get(key))
        log.info("map %s: %d element(s) at start-up", rmap.smap.ref, len(elems))
        return len(seen)

    def _dump_conntrack(self, origin: int) -> None:
        marks = self.view.marks
        n = 0
        now = time.monotonic()
        for ct in dump():
            if ct.mark not in marks:
                continue
            self.conntrack.local_set(ct.key, ct, now + ct.timeout, origin)
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
        # are looked up once, and records go straight into them (no per-record helper calls).
        now = time.monotonic()
        wall = now_ms()
        me = self.node_id
        table = self.conntrack
        by_mark = self.view.by_mark
        sessions = self.sessions
        replicate_ct = self.config.conntrack
        links = self._all_links()
        new_ev, destroy_ev, tcp = CtEvent.NEW, CtEvent.DESTROY, socket.IPPROTO_TCP
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
                    map_id = rmap.map_id
                    e = sessions[map_id].local_set(key, ct.mark, now + timeout if timeout
                                                   else None, me, now=now, wall_ms=wall)
                    learned_sessions += 1
                    rec = SessionRecord(OP_ADD, map_id, key, e.value, timeout * 1000 if timeout
                                        else 0, e.updated_ms, me)
                    for link in links:
                        link.enqueue((map_id, key), rec)
            if not replicate_ct:
                continue
            key = ct.key
            if ev == destroy_ev:
                e = table.local_delete(key, me)
                if e is not None:
                    self._enqueue(ConntrackRecord(OP_DELETE, me, e.updated_ms, ct.to_bytes()))
                continue
            if ct.tcp_state is None and ct.l4proto == tcp:
                prev = table.get(key)
                if prev is not None:
                    ct.tcp_state = prev.value.tcp_state  # UPDATE carries the state only on change
            e = table.local_set(key, ct, now + ct.timeout, me, now=now, wall_ms=wall)
            learned_ct += 1
            if links:
                rec = ConntrackRecord(OP_UPSERT, me, e.updated_ms, ct.to_bytes())
                qkey = record_key(rec)
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
                elif not self.nft_sink.thread_is_ours(item.pid) or not item.complete:
                    self._learn_nft(item)

    def _learn_nft(self, tx: Transaction) -> None:
        me = self.node_id
        for ev in tx.events:
            if isinstance(ev, SetElemEvent):
                rmap = self.view.by_ref.get((ev.family, ev.table, ev.set))
                if rmap is None:
                    continue
                table = self.sessions[rmap.map_id]
                now = time.monotonic()
                for el in ev.elements:
                    key = bytes(el.key)
                    if ev.op == "delete":
                        e = table.local_delete(key, me)
                        if e is not None:
                            self.counters["admin_changes"] += 1
                            self._enqueue(SessionRecord(OP_DELETE, rmap.map_id, key, 0, 0,
                                                        e.updated_ms, me))
                        continue
                    if el.data is None or len(el.data) != 4:
                        continue
                    mark = int.from_bytes(el.data, sys.byteorder)  # nft marks: host order
                    expires = None if el.expiration_ms is None else now + el.expiration_ms / 1000
                    e = table.local_set(key, mark, expires, me)
                    self.counters["admin_changes"] += 1
                    self._enqueue_session(rmap.map_id, key, e)
            elif isinstance(ev, SetEvent | TableEvent):
                self._reload_farms = True

    # == queues ===============================================================================
    def _enqueue_session(self, map_id: str, key: bytes, e: Any) -> None:
        if e is None:
            return
        rec = SessionRecord(OP_ADD, map_id, key, e.value, e.remaining_ms(time.monotonic()),
                            e.updated_ms, e.origin)
        self._enqueue(rec)

    def _enqueue(self, rec: Record) -> None:
        qkey = record_key(rec)
        for link in self._all_links():
            link.enqueue(qkey, rec)

    def _all_links(self) -> list[PeerLink]:
        return [*self.links.values(), *self.inbound]

    def snapshot_records(self, peer_id: int | None, chunk: int = 4000) -> Iterator[list[Record]]:
        """Everything this node originated, plus what it holds of the peer's own origin, in
        chunks of records.

        The tables' items are copied here, synchronously (a point in time: entries are replaced
        on change, never edited); the records are built lazily, chunk by chunk, so a sender
        can stream a 1M-entry snapshot without stalling the event loop for seconds (building
        all records at once took ~2 s, long enough to make peers time out and reconnect).
        """
        origins = {self.node_id} | ({peer_id} if peer_id else set())
        parts = [(map_id, list(table.items_of(origins)))
                 for map_id, table in self.sessions.items() if self._target(map_id) is not None]
        cts = list(self.conntrack.items_of(origins)) if self.config.conntrack else []
        return self._snapshot_chunks(parts, cts, chunk)

    def _snapshot_chunks(self, parts: list[tuple[str, list[tuple[object, Entry]]]],
                         cts: list[tuple[object, Entry]], chunk: int) -> Iterator[list[Record]]:
        out: list[Record] = []
        for map_id, items in parts:
            now = time.monotonic()
            for key, e in items:
                if e.value is not None:
                    out.append(SessionRecord(OP_ADD, map_id, key, e.value, e.remaining_ms(now),
                                             e.updated_ms, e.origin))
                    if len(out) >= chunk:
                        yield out
                        out = []
                        now = time.monotonic()
        now = time.monotonic()
        for _key, e in cts:
            if e.value is not None:
                ct: CtEntry = e.value
                ct.timeout = max(1, int(e.expires_at - now)) if e.expires_at else ct.timeout
                out.append(ConntrackRecord(OP_UPSERT, e.origin, e.updated_ms, ct.to_bytes()))
                if len(out) >= chunk:
                    yield out
                    out = []
                    now = time.monotonic()
        if out:
            yield out

    # == applying peers' records ==============================================================
    def apply_remote(self, records: list[Record]) -> tuple[int, int]:
        """Merge records into the mirror; those that win go into the kernel, batched."""
        by_map: dict[str, list[ElementOp]] = {}
        ct_ops: list[tuple[str, CtEntry]] = []
        rejected = 0
        me = self.node_id
        for r in records:
            if isinstance(r, SessionRecord):
                rmap = self._target(r.map_id)
                if rmap is None or not rmap.key_valid(r.key):
                    self.counters["unknown_map"] += 1
                    rejected += 1
                    continue
                table = self.sessions[r.map_id]
                key = bytes(r.key)
                cur = table.get(key)
                old_mark = cur.value if cur is not None else None
                value = r.mark if r.op == OP_ADD else None
                won = table.merge(key, value, r.remaining_ms, r.updated_ms, r.origin)
                if won is None or (value is None and old_mark is None):
                    continue
                if won.origin == UNVERIFIED:
                    won.origin = me
                by_map.setdefault(r.map_id, []).append(
                    ElementOp(key, value, r.remaining_ms, old_mark))
            else:
                if not self.config.conntrack:
                    continue
                try:
                    ct = CtEntry.from_bytes(r.entry)
                except CtFormatError:
                    self.counters["bad_records"] += 1
                    rejected += 1
                    continue
                exists = self.conntrack.get(ct.key) is not None
                value = ct if r.op == OP_UPSERT else None
                won = self.conntrack.merge(ct.key, value, ct.timeout * 1000, r.updated_ms,
                                           r.origin)
                if won is None or (value is None and not exists):
                    continue
                ct_ops.append(("upsert" if value is not None else "delete", ct))
        applied = 0
        for map_id, ops in by_map.items():
            target = self._target(map_id)
            if target is not None:
                self._write(target, ops)
                applied += len(ops)
        if ct_ops and self.ct_sink is not None:
            self.ct_sink.apply(ct_ops)
            applied += len(ct_ops)
        return applied, rejected

    async def kernel_room(self) -> None:
        """Wait while the kernel writer is far behind (back-pressure on the peer's stream)."""
        if self.kernel is not None:
            await self.kernel.wait_room()

    def snapshot_done(self, link: PeerLink, since: float) -> int:
        """Mark and sweep after a complete snapshot from `link`'s node."""
        origin = link.node_id
        assert origin is not None
        swept = self._sweep(origin, since)
        self._snapshotted.add(origin)
        up = {lk.node_id for lk in self._all_links() if lk.state == "up"}
        if self.role == "backup" and up and up <= self._snapshotted:
            # Every peer has told us what it has: what we found at start-up and nobody
            # confirmed is stale (deleted or expired elsewhere while we were away).
            swept += self._sweep(UNVERIFIED, since)
        return swept

    def _sweep(self, origin: int, since: float) -> int:
        n = 0
        for map_id, table in self.sessions.items():
            rmap = self._target(map_id)
            keys = table.stale(origin, since)
            if not keys or rmap is None:
                continue
            ops = [ElementOp(k, None, 0, table.pop(k).value) for k in keys]
            self._write(rmap, ops)
            n += len(keys)
        keys = self.conntrack.stale(origin, since)
        if keys and self.ct_sink is not None:
            ops = [("delete", self.conntrack.pop(k).value) for k in keys]
            self.ct_sink.apply(ops)
            n += len(keys)
        if n:
            log.info("removed %d stale entr%s of origin %d", n, "y" if n == 1 else "ies",
                     origin)
        return n

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
            try:
                self._tick()
            except NftsyncError as exc:
                self.last_error = str(exc)
                log.error("%s", exc)

    def _sweep_slice(self, now: float) -> None:
        """A small slice of the expiry sweep of each table (a few ms, however big they are)."""
        expired = self.conntrack.sweep_expired(now)
        for table in self.sessions.values():
            expired += table.sweep_expired(now)
        self.counters["expired"] += expired

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
        if self._echo_filter is not None and not self.nft_sink.echo_filter_valid():
            # libnftables replaced its socket: its port id is no longer ours to filter on.
            assert self._nft_events is not None
            detach_echo_filter(self._nft_events.fileno())
            self._echo_filter = None
            log.warning("nft events of our own writes are no longer dropped in the kernel")
        if self.legacy:
            self._poll_legacy(self.node_id)
        if self._reload_farms:
            self._reload_farms = False
            before = set(self.view.maps)
            self._load_farms()
            for map_id in set(self.view.maps) - before:
                self._dump_map(self.view.maps[map_id], self.node_id)
        if self._reconcile_ct:
            self._reconcile_ct = False
            self.counters["reconciles"] += 1
            self._reconcile_conntrack()
        if self._reconcile_maps:
            self._reconcile_maps = False
            self.counters["reconciles"] += 1
            for rmap in self.view.maps.values():
                self._dump_map(rmap, self.node_id)

    def _reconcile_conntrack(self) -> None:
        """After an overrun: the kernel's entries of the farms are the truth for our origin.

        An entry we did not know is a NEW event we lost: it is learned as one, so its client's
        session is learned too (a 1M-entry burst overran and lost 231k sessions otherwise).
        A known entry is re-sent only if it changed beyond its timeout (re-sending all of them
        overflowed the peers' queues into a full snapshot).
        """
        marks = self.view.marks
        me = self.node_id
        now = time.monotonic()
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
            elif cur.origin == UNVERIFIED or (cur.origin == me and
                                              _ct_state(cur.value) != _ct_state(ct)):
                e = self.conntrack.local_set(ct.key, ct, now + ct.timeout, me)
                self._enqueue(ConntrackRecord(OP_UPSERT, me, e.updated_ms, ct.to_bytes()))
        if missed:
            self._learn_ct(missed)
        for key, e in list(self.conntrack.items_of({me})):
            if e.alive and key not in seen:
                t = self.conntrack.local_delete(key, me)
                if t is not None:
                    self._enqueue(ConntrackRecord(OP_DELETE, me, t.updated_ms,
                                                  e.value.to_bytes()))
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
            "sessions": sessions, "conntrack": len(self.conntrack),
            "kernel": {"nft": _stats(self.nft_sink.stats),
                       "conntrack": _stats(self.ct_sink.stats) if self.ct_sink else None,
                       "queued": self.kernel.queued if self.kernel else 0},
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
        old = self.role
        self.role = "active"
        claimed = 0
        if old != "active":
            claimed = self.conntrack.claim(UNVERIFIED, self.node_id)
            for table in self.sessions.values():
                claimed += table.claim(UNVERIFIED, self.node_id)
            if claimed:
                for lk in self._all_links():
                    lk.request_snapshot("promoted: claiming unconfirmed entries")
            log.warning("promoted to active (was %s)", old)
        return {"role": self.role, "was": old, "claimed": claimed}

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
            for key, e in table.entries.items():
                if not e.alive:
                    continue
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

