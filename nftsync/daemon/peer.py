"""One peer: its connection, its send queue, and the replication exchange over it.

Per connection (docs/protocol.md, "Replication semantics"): each side first sends a snapshot of
everything it holds (so a restarted peer gets its state back), then UPDATES with seq 1, 2, ...
The receiver merges both with the conflict rule (a snapshot only ever adds: what it lacks is not
deleted), ACKs cumulatively, and asks for a new snapshot on a gap.

The send queue coalesces by key (a session refreshed ten times before the batch leaves is sent
once) and is bounded: on overflow it is dropped and a snapshot is scheduled instead, since the
replica still holds everything; the seq numbers skip so the receiver sees the gap too.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from nftsync import __version__
from nftsync.endpoint import format_endpoint
from nftsync.proto import (
    FLAG_IGNORABLE,
    Ack,
    Channel,
    ConnectionClosed,
    ConntrackRecord,
    Heartbeat,
    NodeInfo,
    PeerRefused,
    ProtocolError,
    Record,
    RefuseReason,
    ResyncRequest,
    SessionRecord,
    SnapshotBegin,
    SnapshotChunk,
    SnapshotEnd,
    Updates,
    split_records,
)
from nftsync.proto.conntrack import ct_record_key

from .clock import now_ms
from .config import DaemonConfig
from .promtext import LAG_BOUNDS_S, SNAPSHOT_BOUNDS_S, Histogram

log = logging.getLogger("nftsync.daemon")

ACK_EVERY_FRAMES = 64
ACK_EVERY_S = 0.05
SNAPSHOT_CHUNK = 1000  # records built per step of a snapshot being sent (~1 ms)
APPLY_SLICE = 400  # records merged per step of the receiver's loop (~1-2 ms)
SEND_FRAMES_PER_TURN = 4
MAX_UNACKED_FRAMES = 256  # window: stop sending updates until the peer acknowledges
LAG_SAMPLES = 2048


class Replicator(Protocol):
    """What a peer link needs of its node: its id and settings, its replicated state (to send
    a snapshot, to merge what the peer sends) and the back-pressure of its kernel writer.
    daemon.replicator.Replicator is the implementation; tests may bring their own."""

    node_id: int
    config: DaemonConfig

    def snapshot_records(self, chunk: int) -> Iterator[list[Record]]: ...

    def apply_remote(self, records: list[Record], sender: int,
                     in_snapshot: bool) -> tuple[int, int]: ...

    async def kernel_room(self) -> None: ...

    def kernel_queued(self) -> int:
        """Kernel writes queued and not done yet (for the logs)."""
        ...

    def after_kernel_writes(self, callback: Callable[[], None]) -> None:
        """Call `callback` (in the loop) once every kernel write queued so far is done."""


@dataclass(slots=True)
class LinkStats:
    sent: int = 0  # records sent (updates and snapshots)
    received: int = 0  # records received
    applied: int = 0  # received records that won and went into the kernel
    frames_sent: int = 0
    frames_received: int = 0
    snapshots_sent: int = 0
    snapshots_received: int = 0
    snapshots_applied: int = 0  # received ones whose kernel writes are all done
    resnapshots: int = 0  # snapshots caused by overflow, gaps or resync requests
    overflows: int = 0
    gaps: int = 0
    auth_failures: int = 0
    rejected: int = 0  # records refused by the replica's checks (counted by cause in stats)
    connects: int = 0
    lag_ms: deque = field(default_factory=lambda: deque(maxlen=LAG_SAMPLES))
    # Every lag and snapshot since the start, for the metrics endpoint (docs/metrics.md).
    lag_s: Histogram = field(default_factory=lambda: Histogram(LAG_BOUNDS_S))
    snapshot_sent_s: Histogram = field(default_factory=lambda: Histogram(SNAPSHOT_BOUNDS_S))
    snapshot_received_s: Histogram = field(default_factory=lambda: Histogram(SNAPSHOT_BOUNDS_S))


class PeerLink:
    """A peer known by configuration (dialled) or by an inbound connection."""

    def __init__(self, replicator: Replicator, name: str, host: str | None = None,
                 port: int | None = None,
                 on_applied: Callable[[PeerLink, int], None] | None = None) -> None:
        self.replicator = replicator
        # Called with (this link, the peer's node id) when a snapshot from the peer is in our
        # kernel: Links keeps which peers' state this node has (the `syncing` health).
        self.on_applied = on_applied
        self.name = name
        self.host = host
        self.port = port
        self.node_id: int | None = None
        self.node_name: str | None = None
        self.software: str | None = None  # the peer's nftsync version (NODE_INFO), if it said
        self.channel: Channel | None = None
        self.state = "down"
        self.since = time.monotonic()
        self.last_error = ""
        self.stats = LinkStats()
        self.pending: dict[object, Record] = {}
        self.need_snapshot = False
        self.wake = asyncio.Event()
        self.send_seq = 0
        self.acked_seq = 0
        self.sent_at: dict[int, float] = {}
        self.last_rx = time.monotonic()
        self.recv_seq = 0
        self.snap_epoch: int | None = None
        self.snap_since = 0.0
        self.snap_count = 0
        self.snap_taken = 0  # records of the snapshot being received that won (were written)
        self.tasks: list[asyncio.Task] = []
        self.dialer: asyncio.Task | None = None
        # Connections we ended on purpose (replaced, stopping), with what their `down` line says.
        self._ended: dict[Channel, str] = {}

    # -- queue -------------------------------------------------------------------------------
    def enqueue(self, qkey: object, record: Record) -> None:
        if self.channel is None:
            return  # the next connection starts with a snapshot anyway
        pending = self.pending
        pending[qkey] = record
        if len(pending) > self.replicator.config.queue_limit:
            pending.clear()
            self.stats.overflows += 1
            self.send_seq += 1  # the receiver sees a gap, as the protocol says
            self.request_snapshot("send queue overflow")
        elif len(pending) == 1:
            self.wake.set()

    def request_snapshot(self, why: str) -> None:
        if self.channel is not None:
            log.info("peer %s: new snapshot (%s)", self.name, why)
            self.stats.resnapshots += 1
        self.need_snapshot = True
        self.wake.set()

    # -- status ------------------------------------------------------------------------------
    def unacked_age(self) -> float:
        if not self.sent_at:
            return 0.0
        return time.monotonic() - min(self.sent_at.values())

    def as_dict(self) -> dict:
        lag = sorted(self.stats.lag_ms)
        s = self.stats
        return {
            "name": self.name,
            "address": format_endpoint(self.host, self.port) if self.host else None,
            "node_id": self.node_id, "node_name": self.node_name, "state": self.state,
            "version": self.software,
            "protocol": self.channel.version if self.channel is not None else None,
            "since_s": round(time.monotonic() - self.since, 1), "last_error": self.last_error,
            "sent": s.sent, "received": s.received, "applied": s.applied,
            "frames_sent": s.frames_sent, "frames_received": s.frames_received,
            "queued": len(self.pending), "unacked_frames": len(self.sent_at),
            "unacked_age_s": round(self.unacked_age(), 3),
            "lag_ms": {"p50": _pct(lag, 0.5), "p99": _pct(lag, 0.99), "last": lag[-1]
                       if lag else None} if lag else None,
            "snapshots_sent": s.snapshots_sent, "snapshots_received": s.snapshots_received,
            "snapshots_applied": s.snapshots_applied,
            # entries of the snapshot being received (None: none is): `ctl resync`'s progress
            "snapshot_receiving": self.snap_count if self.snap_epoch is not None else None,
            "resnapshots": s.resnapshots, "overflows": s.overflows, "gaps": s.gaps,
            "auth_failures": s.auth_failures, "rejected": s.rejected,
            "connects": s.connects,
        }

    # -- connection life cycle ---------------------------------------------------------------
    async def attach(self, channel: Channel) -> None:
        """Run replication over an authenticated channel until it fails or is replaced."""
        self.channel = channel
        self.node_id = channel.peer.node_id
        self.node_name = channel.peer.node_name
        self.software = None  # until this connection's NODE_INFO says
        self.state = "up"
        self.since = time.monotonic()
        self.last_error = ""
        self.stats.connects += 1
        self.pending.clear()
        self.send_seq = self.acked_seq = self.recv_seq = 0
        self.sent_at.clear()
        self.snap_epoch = None
        self.need_snapshot = True
        self.last_rx = time.monotonic()
        self.wake.set()
        log.info("peer %s: up (node %d %s)", self.name, self.node_id, self.node_name)
        try:
            # First, before the snapshot: who we are, now that the peer proved the key.
            # IGNORABLE: a node without NODE_INFO skips it (docs/protocol.md).
            await channel.send(NodeInfo(__version__), FLAG_IGNORABLE)
        except (ConnectionClosed, ValueError) as exc:
            log.debug("peer %s: NODE_INFO not sent: %s", self.name, exc)
        # This attach owns these tasks: a replacing channel gets its own list, so cleaning up
        # here never cancels the successor's tasks.
        tasks = [asyncio.create_task(self._send_loop(channel)),
                 asyncio.create_task(self._recv_loop(channel))]
        self.tasks = tasks
        error: BaseException | None = None
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                exc = t.exception()
                if exc is not None:
                    error = exc
                    self.last_error = str(exc) or type(exc).__name__
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.tasks is tasks:
                self.tasks = []
            channel.close()
            if self.channel is channel:
                self.channel = None
                self.state = "down"
                self.since = time.monotonic()
                self.pending.clear()
                self.sent_at.clear()
            why = self._ended.pop(channel, None)
            if why is not None:  # we ended it: replaced by a new connection, or stopping
                log.info("peer %s: down (%s)", self.name, why)
            elif isinstance(error, PeerRefused) and error.reason == RefuseReason.DUPLICATE_PEER:
                # Both sides dialled and the peer keeps the other connection: not a loss.
                log.info("peer %s: down (%s)", self.name, self.last_error)
            else:
                log.warning("peer %s: down (%s)", self.name, self.last_error or "closed")

    def close(self, why: str = "closed", refuse: int | None = None) -> None:
        """End the connection on our side (its `down` line, at INFO, says `why`); with a
        RefuseReason `refuse`, the peer is told why first."""
        if self.channel is not None:
            self._ended[self.channel] = why
            self.channel.close(refuse)
        for t in self.tasks:
            t.cancel()

    async def take_over(self, channel: Channel) -> None:
        """Serve `channel`, after the channel this link had (if any) has fully wound down."""
        old = self.channel
        if old is not None:
            # The peer learns it is a duplicate, so neither side logs this as a lost link.
            self.close("replaced by a new connection", RefuseReason.DUPLICATE_PEER)
            for _ in range(200):  # bounded: the old attach's clean-up is a few loop turns
                if self.channel is not old:
                    break
                await asyncio.sleep(0.01)
        await self.attach(channel)

    # -- sending -----------------------------------------------------------------------------
    async def _send_loop(self, ch: Channel) -> None:
        cfg = self.replicator.config
        last_tx = 0.0
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # arrives as the wait ends, and shutdown would then hang on this task.
            with contextlib.suppress(TimeoutError):  # a quiet interval: time for a heartbeat
                async with asyncio.timeout(cfg.heartbeat_interval):
                    await self.wake.wait()
            self.wake.clear()
            if self.need_snapshot:
                self.need_snapshot = False
                await self._send_snapshot(ch)
                last_tx = time.monotonic()
            if self.pending and len(self.sent_at) < MAX_UNACKED_FRAMES:
                # We were woken by the first record queued since the last batch; everything
                # learned in that loop tick is queued by now. An optional wait makes batches
                # bigger at the cost of latency (off by default).
                if cfg.batch_delay and len(self.pending) < cfg.batch_records:
                    await asyncio.sleep(cfg.batch_delay)
                await self._send_updates(ch)
                last_tx = time.monotonic()
                if self.pending:
                    self.wake.set()
            if time.monotonic() - last_tx >= cfg.heartbeat_interval:
                await ch.send(Heartbeat(now_ms(), self.recv_seq))
                last_tx = time.monotonic()

    async def _send_updates(self, ch: Channel) -> None:
        # Up to SEND_FRAMES_PER_TURN frames per turn, so a backlog drains as fast as it grows.
        limit = self.replicator.config.batch_records * SEND_FRAMES_PER_TURN
        pending = self.pending
        if len(pending) <= limit:
            records = list(pending.values())
            pending.clear()
        else:
            # The oldest `limit` keys only: copying the whole queue per batch made a big
            # backlog quadratic to drain.
            keys = list(itertools.islice(pending, limit))
            records = [pending.pop(k) for k in keys]
        frames = []
        per_frame = self.replicator.config.batch_records
        chunks = (c for i in range(0, len(records), per_frame)
                  for c in split_records(records[i:i + per_frame]))
        for chunk in chunks:
            self.send_seq += 1
            self.sent_at[self.send_seq] = time.monotonic()
            frames.append(Updates(self.send_seq, chunk))
        await ch.send_many(frames)
        self.stats.sent += len(records)
        self.stats.frames_sent += len(frames)

    async def _send_snapshot(self, ch: Channel) -> None:
        me = self.replicator.node_id
        epoch = max(now_ms(), getattr(self, "_last_epoch", 0) + 1)
        self._last_epoch = epoch
        # Whatever was queued is contained in the snapshot (each part of the tables is copied
        # later, as it is sent, so it is at least as new as now); later changes queue up and
        # follow as updates.
        self.pending.clear()
        chunks = self.replicator.snapshot_records(SNAPSHOT_CHUNK)
        began = time.monotonic()
        await ch.send(SnapshotBegin(epoch, me))
        sent = 0
        for batch in chunks:
            await ch.send_many([SnapshotChunk(epoch, c) for c in split_records(batch)])
            sent += len(batch)
            await asyncio.sleep(0)  # the loop's other work between chunks, even when unpaused
        await ch.send(SnapshotEnd(epoch, me, sent))
        self.stats.sent += sent
        self.stats.snapshots_sent += 1
        self.stats.snapshot_sent_s.observe(time.monotonic() - began)
        log.info("peer %s: snapshot epoch %d sent: %d entries in %.1fs", self.name, epoch, sent,
                 time.monotonic() - began)

    # -- receiving ---------------------------------------------------------------------------
    async def _recv_loop(self, ch: Channel) -> None:
        cfg = self.replicator.config
        frames_since_ack = 0
        last_ack = time.monotonic()
        while True:
            try:
                async with asyncio.timeout(cfg.peer_timeout):
                    msg = await ch.recv()
            except TimeoutError:
                raise ConnectionClosed(f"no frame from the peer for {cfg.peer_timeout:.1f}s") \
                    from None
            self.last_rx = time.monotonic()
            self.stats.frames_received += 1
            if isinstance(msg, Updates):
                if msg.seq != self.recv_seq + 1:
                    self.stats.gaps += 1
                    await ch.send(ResyncRequest(RefuseReason.SEQ_GAP,
                                                f"expected seq {self.recv_seq + 1}, got {msg.seq}"))
                self.recv_seq = msg.seq
                await self._apply(msg.records, in_snapshot=False)
                await self.replicator.kernel_room()
                frames_since_ack += 1
                if frames_since_ack >= ACK_EVERY_FRAMES or \
                        time.monotonic() - last_ack >= ACK_EVERY_S:
                    await ch.send(Ack(self.recv_seq))
                    frames_since_ack, last_ack = 0, time.monotonic()
            elif isinstance(msg, SnapshotBegin):
                if msg.origin != self.node_id:
                    raise ProtocolError(f"snapshot of origin {msg.origin} from node {self.node_id}")
                self.snap_epoch, self.snap_count, self.snap_taken = msg.epoch, 0, 0
                self.snap_since = time.monotonic()
            elif isinstance(msg, SnapshotChunk):
                if msg.epoch != self.snap_epoch:
                    self.snap_epoch = None
                    await ch.send(ResyncRequest(RefuseReason.EPOCH_CHANGED, "chunk of an "
                                                "unknown snapshot"))
                    continue
                self.snap_count += len(msg.records)
                await self._apply(msg.records, in_snapshot=True)
                await self.replicator.kernel_room()
            elif isinstance(msg, SnapshotEnd):
                if msg.epoch != self.snap_epoch or msg.count != self.snap_count:
                    self.snap_epoch = None
                    await ch.send(ResyncRequest(RefuseReason.EPOCH_CHANGED, "incomplete "
                                                "snapshot"))
                    continue
                self.snap_epoch = None
                self.stats.snapshots_received += 1
                took = time.monotonic() - self.snap_since
                self.stats.snapshot_received_s.observe(took)
                self._snapshot_received(msg.epoch, msg.count)
                await ch.send(Ack(self.recv_seq))
            elif isinstance(msg, Ack):
                for seq in [s for s in self.sent_at if s <= msg.seq]:
                    lag = time.monotonic() - self.sent_at.pop(seq)
                    self.stats.lag_ms.append(lag * 1000)
                    self.stats.lag_s.observe(lag)
                self.acked_seq = max(self.acked_seq, msg.seq)
                self.wake.set()
            elif isinstance(msg, ResyncRequest):
                self.request_snapshot(f"the peer asked: {msg.text or msg.reason}")
            elif isinstance(msg, NodeInfo):
                self.software = msg.software
            elif isinstance(msg, Heartbeat) and frames_since_ack:
                await ch.send(Ack(self.recv_seq))
                frames_since_ack, last_ack = 0, time.monotonic()

    def _snapshot_received(self, epoch: int, count: int) -> None:
        """Every record of a snapshot is merged: say so, and say again once what won is in the
        kernel (the writer threads have done every write queued until now)."""
        node, began, taken = self.node_id, self.snap_since, self.snap_taken
        assert node is not None
        log.info("peer %s: snapshot epoch %d received: %d entries in %.1fs, %d taken "
                 "(%d kernel writes queued)", self.name, epoch, count,
                 time.monotonic() - began, taken, self.replicator.kernel_queued())

        def applied() -> None:
            log.info("peer %s: snapshot epoch %d applied: %d entries, %d written to the kernel, "
                     "%.1fs after it began", self.name, epoch, count, taken,
                     time.monotonic() - began)
            self.stats.snapshots_applied += 1
            if self.on_applied is not None:
                self.on_applied(self, node)

        self.replicator.after_kernel_writes(applied)

    def snapshot_progress(self) -> str:
        """What `ctl status` says of a connected peer whose first snapshot this node awaits."""
        if self.snap_epoch is not None:
            return f"receiving its snapshot ({self.snap_count:,} entries so far)"
        if self.stats.snapshots_received:
            return "its snapshot's writes are going into the kernel"
        return "connected, its snapshot has not begun"

    async def _apply(self, records: list[Record], in_snapshot: bool) -> None:
        """Merge a frame's records, APPLY_SLICE at a time with the loop's other work between
        (a 6000-record frame in one step held the loop ~15 ms)."""
        assert self.node_id is not None
        self.stats.received += len(records)
        for i in range(0, len(records), APPLY_SLICE):
            if i:
                await asyncio.sleep(0)
            applied, rejected = self.replicator.apply_remote(records[i:i + APPLY_SLICE],
                                                             self.node_id, in_snapshot)
            self.stats.applied += applied
            self.stats.rejected += rejected
            if in_snapshot:
                self.snap_taken += applied


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return round(values[min(len(values) - 1, int(q * len(values)))], 3)


def record_key(r: Record) -> object:
    """Coalescing key of a record in a send queue: one per session, one per connection."""
    if isinstance(r, SessionRecord):
        return (r.map_id, r.key)
    assert isinstance(r, ConntrackRecord)
    return ("ct", ct_record_key(r.entry))
