"""The daemon's Prometheus endpoint: `GET /metrics` over plain HTTP, served on the event loop.

Off unless `metrics_listen` is set (docs/metrics.md). Everything runs on the daemon's one asyncio
loop, like the control socket: a scrape reads the same objects `nftsync ctl status|peers|stats`
read (`Daemon.health()`, the links' `LinkStats`, the replica, the sinks' `SinkStats`, the loop
and GC watches), at the moment it is answered and from the thread that changes them, so no lock
is needed and the figures are the ctl ones. The only figure that is not a counter or a length
already kept is the number of connections per farm: the replica holds one conntrack table, so
`ConnectionCount` walks it by shard, yielding to the loop between slices, at most every few
seconds (its cost is ~100 ns an entry).

The HTTP side takes one request per connection (`Connection: close`), at most MAX_REQUEST bytes
of request line and headers within REQUEST_TIMEOUT_S, at most MAX_CLIENTS at once; anything
else gets an error status or a closed connection, and nothing a client sends can raise out of
the handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import operator
import os
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from nftsync import __version__
from nftsync.endpoint import format_endpoint
from nftsync.errors import NftsyncError
from nftsync.proto import PROTOCOL_VERSION
from nftsync.replication.table import HEAD_SIZE, Table

from .loopwatch import BUCKETS_MS
from .promtext import CONTENT_TYPE, Exposition, Histogram

if TYPE_CHECKING:
    from .core import Daemon

log = logging.getLogger("nftsync.daemon")

MAX_REQUEST = 8192  # request line and headers; Prometheus sends ~300 bytes
REQUEST_TIMEOUT_S = 5.0  # to send the request, and for us to write the answer
MAX_CLIENTS = 16  # connections served at once; more are closed at once
PEER_STATES = ("connecting", "up", "down", "served")
#: Every state `Daemon.health()` may say (docs/daemon.md, "Health"): one series each, so a
#: state that is not current reads 0 rather than missing.
HEALTH_STATES = ("starting", "syncing", "ok", "degraded", "failing")
ROLES = ("active", "backup")
#: Offset of the ct mark in a packed conntrack entry of the replica: the entry head, then
#: `ct_body` (version, then tcp_state and status before the mark: docs/protocol.md's layout).
#: tests/unit/test_metrics.py checks it against Table.pack of real entries.
CT_MARK_AT = HEAD_SIZE + 6
CT_COUNT_SLICE = 4096  # entries counted per step (~0.8 ms; a shard is copied in ~0.6 ms at 1M)
CT_COUNT_MIN_AGE_S = 1.0  # a count is reused for this long, and for 50x its own duration


# --------------------------------------------------------------------------------------------
# Connections per farm
# --------------------------------------------------------------------------------------------

class ConnectionCount:
    """Replicated conntrack entries by ct mark, counted from the replica's table in slices.

    A scrape within `CT_COUNT_MIN_AGE_S` (or 50x the last count's duration) of the last count
    reuses it, so several Prometheus servers scraping often cost no more than one. Each shard
    is copied (its values, in one step) before it is counted, so the table may change between
    slices: the result is exact for a table that did not change during the count.
    """

    def __init__(self) -> None:
        self.by_mark: dict[int, int] = {}
        self.counted_at = -1e9
        self.duration = 0.0
        self._lock = asyncio.Lock()

    async def refresh(self, table: Table) -> dict[int, int]:
        async with self._lock:
            now = time.monotonic()
            if now - self.counted_at < max(CT_COUNT_MIN_AGE_S, 50 * self.duration):
                return self.by_mark
            counts: Counter[bytes] = Counter()
            mark_of = operator.itemgetter(slice(CT_MARK_AT, CT_MARK_AT + 4))
            for shard in table.shards:
                values = list(shard.values())
                for i in range(0, len(values), CT_COUNT_SLICE):
                    counts.update(map(mark_of, values[i:i + CT_COUNT_SLICE]))
                    await asyncio.sleep(0)
            self.by_mark = {int.from_bytes(m, "big"): n for m, n in counts.items()}
            self.counted_at = time.monotonic()
            self.duration = self.counted_at - now
            return self.by_mark


# --------------------------------------------------------------------------------------------
# What a scrape says
# --------------------------------------------------------------------------------------------

def render(d: Daemon, ct_by_mark: dict[int, int]) -> str:
    """The whole exposition for one scrape, read from the daemon now (one loop step)."""
    x = Exposition()
    cfg, replica = d.config, d.replica
    now = time.monotonic()
    x.metric("nftsync_build_info", "gauge", "nftsync's version and peer protocol version.",
             [({"version": __version__, "protocol": str(PROTOCOL_VERSION)}, 1)])
    x.metric("nftsync_start_time_seconds", "gauge", "When the daemon started (Unix time).",
             [(None, round(time.time() - (now - d.started), 3))])
    health, reasons = d.health()
    states = HEALTH_STATES if health in HEALTH_STATES else (*HEALTH_STATES, health)
    x.metric("nftsync_health", "gauge", "The health state of `nftsync ctl status`: 1 for the "
             "current one (starting, syncing, ok, degraded, failing).",
             [({"state": s}, s == health) for s in states])
    x.metric("nftsync_health_reasons", "gauge", "How many reasons the health state gives.",
             [(None, len(reasons))])
    x.metric("nftsync_role", "gauge", "The node's role: 1 for the current one.",
             [({"role": role}, role == d.role) for role in ROLES])
    _maps(x, d)
    _connections(x, d, ct_by_mark)
    _peers(x, d, now)
    _kernel(x, d)
    _counters(x, d)
    _inbound(x, d)
    x.metric("nftsync_peer_records_refused_total", "counter", "Records from peers refused by "
             "the replica's checks, by cause (docs/protocol.md, \"Replication semantics\").",
             [({"cause": c}, n) for c, n in sorted(replica.refused.items())])
    x.metric("nftsync_capped_expiry_total", "counter", "Session records from peers whose expiry "
             "was cut to their map's timeout.", [(None, replica.capped)])
    _loop(x, d)
    x.metric("nftsync_configured_peers", "gauge", "Peers in the configuration.",
             [(None, len(cfg.peers))])
    return x.text()


def _map_rows(d: Daemon) -> list[tuple[dict[str, str], str, int | None]]:
    """(labels, map_id, size limit) of every replicated map: nft maps, then xt_recent tables."""
    r = d.replicator
    rows: list[tuple[dict[str, str], str, int | None]] = []
    for rmap in r.view.maps.values():
        s = rmap.smap
        rows.append(({"farm": s.farm, "map": s.ref.name, "kind": s.role.value}, rmap.map_id,
                     s.size or None))
    for lm in r.legacy.values():
        rows.append(({"farm": lm.farm.name, "map": lm.table.name, "kind": "recent"}, lm.map_id,
                     lm.table.capacity or None))
    return sorted(rows, key=lambda row: (row[0]["farm"], row[0]["kind"], row[0]["map"]))


def _maps(x: Exposition, d: Daemon) -> None:
    rows = _map_rows(d)
    sessions = d.replica.sessions
    x.metric("nftsync_sessions", "gauge", "Live sessions the daemon holds, per replicated map "
             "(kind: sessions, static, or recent for a legacy xt_recent table).",
             [(labels, len(sessions[m]) if m in sessions else 0) for labels, m, _ in rows])
    x.metric("nftsync_map_size_limit", "gauge", "The map's element limit (its nft `size`, "
             "65535 for a dynamic map without one; a legacy table's ip_list_tot); absent when "
             "the map has none.", [(labels, size) for labels, _, size in rows if size])
    reads = d.learner.reads.startup_reads
    x.metric("nftsync_map_startup_read_done", "gauge", "1 once the start-up read of the "
             "map's kernel elements is over (docs/daemon.md, \"Start-up\").",
             [(labels, reads[m].ended is not None) for labels, m, _ in rows if m in reads])


def _connections(x: Exposition, d: Daemon, ct_by_mark: dict[int, int]) -> None:
    r = d.replicator
    x.metric("nftsync_conntrack_entries", "gauge", "Replicated conntrack entries the daemon "
             "holds (all farms; `conntrack` of `ctl stats`).",
             [(None, len(d.replica.conntrack))])
    farms: dict[str, int] = {name: 0 for name in r.view.farms}
    for name, farm in r.view.farms.items():
        farms[name] = sum(ct_by_mark.get(mark, 0) for mark in farm.backends)
    for lm in r.legacy.values():
        farms[lm.farm.name] = farms.get(lm.farm.name, 0) + ct_by_mark.get(lm.mark, 0)
    x.metric("nftsync_connections", "gauge", "Replicated conntrack entries per farm, by their "
             "backend mark (counted every few seconds at most).",
             [({"farm": f}, n) for f, n in sorted(farms.items())])


def _peers(x: Exposition, d: Daemon, now: float) -> None:
    links = sorted(d.links.all(), key=lambda lk: lk.name)
    x.metric("nftsync_peer_up", "gauge", "1 while the peer's connection is up (or served by "
             "its own inbound connection).",
             [({"peer": lk.name}, lk.state in ("up", "served")) for lk in links])
    x.metric("nftsync_peer_state", "gauge", "The peer link's state: 1 for the current one.",
             [({"peer": lk.name, "state": s}, lk.state == s) for lk in links
              for s in PEER_STATES])
    x.metric("nftsync_peer_state_seconds", "gauge", "How long the peer link has been in its "
             "state.", [({"peer": lk.name}, round(now - lk.since, 3)) for lk in links])
    x.metric("nftsync_peer_send_queue", "gauge", "Records queued for the peer, not sent yet.",
             [({"peer": lk.name}, len(lk.pending)) for lk in links])
    x.metric("nftsync_peer_unacked_frames", "gauge", "Update frames sent to the peer and not "
             "acknowledged yet.", [({"peer": lk.name}, len(lk.sent_at)) for lk in links])
    x.metric("nftsync_peer_unacked_age_seconds", "gauge", "Age of the oldest unacknowledged "
             "update frame (0: none); above stall_after the health is degraded.",
             [({"peer": lk.name}, round(lk.unacked_age(), 3)) for lk in links])
    counters: list[tuple[str, str, Callable]] = [
        ("records_sent", "Records sent (updates and snapshots).", lambda s: s.sent),
        ("records_received", "Records received.", lambda s: s.received),
        ("records_applied", "Received records that won and went to the kernel.",
         lambda s: s.applied),
        ("records_rejected", "Received records the replica's checks refused.",
         lambda s: s.rejected),
        ("frames_sent", "Frames sent.", lambda s: s.frames_sent),
        ("frames_received", "Frames received.", lambda s: s.frames_received),
        ("snapshots_sent", "Full snapshots sent.", lambda s: s.snapshots_sent),
        ("snapshots_received", "Full snapshots received complete.",
         lambda s: s.snapshots_received),
        ("resnapshots", "Snapshots sent again (queue overflow, sequence gap, resync request).",
         lambda s: s.resnapshots),
        ("queue_overflows", "Send queue overflows (queue_limit).", lambda s: s.overflows),
        ("sequence_gaps", "Gaps in the peer's update sequence.", lambda s: s.gaps),
        ("auth_failures", "Failed handshakes when dialling the peer.",
         lambda s: s.auth_failures),
        ("connects", "Connections established.", lambda s: s.connects),
    ]
    for name, help_text, get in counters:
        x.metric(f"nftsync_peer_{name}_total", "counter", help_text,
                 [({"peer": lk.name}, get(lk.stats)) for lk in links])
    for name, attr, help_text in (
            ("replication_lag_seconds", "lag_s", "Time from sending an update frame to the "
             "peer's acknowledgement of it."),
            ("snapshot_send_duration_seconds", "snapshot_sent_s", "Time to send a full "
             "snapshot to the peer."),
            ("snapshot_receive_duration_seconds", "snapshot_received_s", "Time to receive a "
             "full snapshot (a resync) from the peer, first chunk to last.")):
        x.family(f"nftsync_peer_{name}", "histogram", help_text)
        for lk in links:
            x.histogram(getattr(lk.stats, attr), {"peer": lk.name})


def _kernel(x: Exposition, d: Daemon) -> None:
    r = d.replicator
    sinks = [("nft", r.nft_sink.stats)]
    if r.ct_sink is not None:
        sinks.append(("conntrack", r.ct_sink.stats))
    for name, attr, help_text in (
            ("applied", "applied", "Replicated changes the kernel accepted."),
            ("failed", "failed", "Replicated changes given up (not kept for a retry)."),
            ("retries", "retries", "Write batches sent again after a refusal."),
            ("recovered", "recovered", "Refused changes that a retry wrote.")):
        x.metric(f"nftsync_kernel_writes_{name}_total", "counter", help_text,
                 [({"sink": s}, getattr(st, attr)) for s, st in sinks])
    x.metric("nftsync_kernel_transactions_total", "counter", "Kernel write transactions.",
             [({"sink": s}, st.transactions) for s, st in sinks])
    x.metric("nftsync_kernel_writes_refused_total", "counter", "Changes the kernel refused, by "
             "cause (map_full, exists, no_such_map, ...), each counted once.",
             [({"sink": s, "cause": c}, n) for s, st in sinks for c, n in
              sorted(dict(st.refused).items())])
    x.metric("nftsync_kernel_writes_waiting", "gauge", "Refused changes kept for a retry now.",
             [({"sink": s}, st.waiting) for s, st in sinks])
    lanes = r.kernel.lanes if r.kernel is not None else {}
    x.metric("nftsync_kernel_queue", "gauge", "Changes handed to the kernel writer thread of "
             "the lane and not written yet.",
             [({"lane": name}, lane.queued) for name, lane in sorted(lanes.items())])
    x.metric("nftsync_kernel_problems", "gauge", "Causes of refused writes waiting for a retry "
             "(lines of `kernel.problems` in `ctl stats`).",
             [(None, len(r.nft_sink.problems()))])


def _counters(x: Exposition, d: Daemon) -> None:
    c = d.learner.counters
    x.metric("nftsync_kernel_events_total", "counter", "Kernel events read, by source.",
             [({"source": "conntrack"}, c["ct_events"]), ({"source": "nftables"},
                                                          c["nft_events"])])
    x.metric("nftsync_kernel_event_overruns_total", "counter", "Event socket overruns (events "
             "lost, then recovered from a dump), by source.",
             [({"source": "conntrack"}, c["ct_overruns"]), ({"source": "nftables"},
                                                            c["nft_overruns"])])
    x.metric("nftsync_reconciles_total", "counter", "Dumps read to recover from lost events.",
             [(None, c["reconciles"])])
    x.metric("nftsync_learned_total", "counter", "Local changes learned from the kernel and "
             "sent to the peers, by kind.",
             [({"kind": "session"}, c["learned_sessions"]),
              ({"kind": "conntrack"}, c["learned_conntrack"]),
              ({"kind": "admin"}, c["admin_changes"])])
    x.metric("nftsync_auth_failures_total", "counter", "Failed peer handshakes, both "
             "directions (wrong key or cluster).", [(None, d.links.auth_failures)])
    x.metric("nftsync_expired_total", "counter", "Replica entries expired by the sweep.",
             [(None, d.expired)])
    x.metric("nftsync_farm_reloads_total", "counter", "Times the farms were read from the "
             "ruleset.", [(None, d.replicator.farm_reloads)])
    x.metric("nftsync_ct_mark_conflicts_total", "counter", "Conntrack entries whose mark "
             "contradicted a live session (kept as they were).",
             [(None, d.replica.ct_mark_conflicts)])


def _inbound(x: Exposition, d: Daemon) -> None:
    """The gate of inbound connections before they prove the key (`inbound` of `ctl stats`)."""
    s = d.links.gate.stats()
    x.metric("nftsync_inbound_refused_total", "counter", "Inbound sync connections refused "
             "before or during the handshake, by cause (docs/daemon.md, \"Exposure to "
             "strangers\").", [({"cause": c}, n) for c, n in s["refused"].items()])
    x.metric("nftsync_inbound_authenticated_total", "counter", "Inbound sync connections that "
             "proved the key.", [(None, s["authenticated"])])
    x.metric("nftsync_inbound_unauthenticated", "gauge", "Inbound sync connections in their "
             "handshake now.", [(None, s["unauthenticated"])])
    fds = s["fds"]
    x.metric("nftsync_open_fds", "gauge", "File descriptors open (listed at most once a "
             "second, plus admissions since).", [(None, fds["open"])])
    x.metric("nftsync_fd_limit", "gauge", "The descriptor limit the gate counts against: "
             "min(RLIMIT_NOFILE soft limit, 1024); inbound connections are refused within "
             "`reserve` of it.", [(None, fds["limit"])])


def _loop(x: Exposition, d: Daemon) -> None:
    w = d.loop_watch
    hist = Histogram(b / 1000 for b in BUCKETS_MS)  # the watch's own buckets, in seconds
    hist.counts[:] = w.counts
    hist.sum, hist.count = w.total_ms / 1000, w.samples
    x.family("nftsync_loop_pause_seconds", "histogram", "How late the event loop's 10 ms "
             "ticker woke up: time the loop could not run (`loop` of `ctl stats`).")
    x.histogram(hist)
    x.metric("nftsync_loop_pause_max_seconds", "gauge", "The longest loop pause since the "
             "start.", [(None, round(w.max_ms / 1000, 6))])
    g = d.gc_watch
    gens = range(3)
    x.metric("nftsync_gc_collections_total", "counter", "Cyclic garbage collections, by "
             "generation.", [({"generation": str(i)}, g.collections[i]) for i in gens])
    x.metric("nftsync_gc_seconds_total", "counter", "Time spent in the cyclic garbage "
             "collector, by generation.",
             [({"generation": str(i)}, round(g.total_ms[i] / 1000, 6)) for i in gens])
    x.metric("nftsync_gc_max_seconds", "gauge", "The longest collection, by generation.",
             [({"generation": str(i)}, round(g.max_ms[i] / 1000, 6)) for i in gens])


# --------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large",
            500: "Internal Server Error", 505: "HTTP Version Not Supported"}


class MetricsServer:
    """`GET /metrics` on `host:port`, answered from `daemon` on the running loop."""

    def __init__(self, daemon: Daemon, host: str, port: int) -> None:
        self.daemon = daemon
        self.host, self.port = host, port
        self.connections = ConnectionCount()
        self.scrapes = 0
        self.bad_requests = 0
        self._server: asyncio.base_events.Server | None = None
        self._clients: set[asyncio.Task] = set()

    @property
    def address(self) -> str:
        return format_endpoint(self.host, self.port)

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._serve, self.host, self.port,
                                                      limit=MAX_REQUEST)
        except OSError as exc:
            why = os.strerror(exc.errno) if exc.errno else str(exc)  # asyncio rewords it
            raise NftsyncError(f"cannot listen for metrics on {self.address}: {why}") from None
        if self.port == 0:  # tests: the kernel chose
            self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics: serving http://%s/metrics", self.address)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._clients):
            task.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        # Over MAX_CLIENTS, or too few descriptors left for the control socket and the kernel's
        # sockets (the gate's reserve, docs/daemon.md "Exposure to strangers"): closed at once.
        if len(self._clients) >= MAX_CLIENTS or task is None or \
                not self.daemon.links.gate.fds.room():
            writer.close()
            return
        self._clients.add(task)
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                status, body, extra = await self._answer(reader)
                head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
                        f"Content-Type: {CONTENT_TYPE if status == 200 else 'text/plain'}\r\n"
                        f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n")
                writer.write(head.encode("ascii") + body)
                await writer.drain()
        except TimeoutError:
            self.bad_requests += 1  # too slow to send its request (or to read the answer)
        except (OSError, asyncio.IncompleteReadError):
            log.debug("metrics: a client went away before its answer")
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[int, bytes, str]:
        """(status, body, extra header lines) for one request; never raises for its content."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            return self._bad(431, "request headers too large\n")
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                raise  # connected and closed: nobody to answer
            return self._bad(400, "incomplete request\n")
        try:
            line = head.split(b"\r\n", 1)[0].decode("ascii")
        except UnicodeDecodeError:
            return self._bad(400, "request line is not ASCII\n")
        parts = line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return self._bad(400, "malformed request line\n")
        method, target, version = parts
        if version not in ("HTTP/1.0", "HTTP/1.1"):
            return self._bad(505, "HTTP/1.0 or HTTP/1.1 only\n")
        if target.split("?", 1)[0] != "/metrics":
            return self._bad(404, "only /metrics is served here\n")
        if method != "GET":
            status, body, _ = self._bad(405, "GET /metrics only\n")
            return status, body, "Allow: GET\r\n"
        try:
            by_mark = await self.connections.refresh(self.daemon.replica.conntrack)
            text = render(self.daemon, by_mark)
            text += _self_metrics(self)
        except Exception:  # a bug in a figure must not take the daemon (or the scrape) down
            log.exception("metrics: rendering failed")
            return 500, b"rendering the metrics failed: see the daemon's log\n", ""
        self.scrapes += 1
        return 200, text.encode("utf-8"), ""

    def _bad(self, status: int, text: str) -> tuple[int, bytes, str]:
        self.bad_requests += 1
        return status, text.encode("ascii"), ""


def _self_metrics(server: MetricsServer) -> str:
    x = Exposition()
    x.metric("nftsync_metrics_scrapes_total", "counter", "Scrapes of this endpoint answered "
             "(this one not included).", [(None, server.scrapes)])
    x.metric("nftsync_metrics_bad_requests_total", "counter", "Requests to this endpoint "
             "refused (not GET /metrics, malformed, too large, too slow).",
             [(None, server.bad_requests)])
    x.metric("nftsync_connections_count_seconds", "gauge", "How long the last count of "
             "connections per farm took.", [(None, round(server.connections.duration, 6))])
    return x.text()
