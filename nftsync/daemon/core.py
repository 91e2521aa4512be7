"""The sync daemon: wires its rooms together and answers the control operations.

* `replicator.Replicator`: the replicated maps, the replica (nftsync.replication, sans-I/O) and
  the kernel writers: what peer links talk to;
* `learn.Learner`: the kernel's events turned into local changes, and `kernelread.KernelReads`,
  its reads of conntrack and of the maps (start-up, lost events);
* `links.Links` and `peer.PeerLink`: dialling, accepting, one connection per peer, and the
  exchange of snapshots and updates over it;
* `service`: the process around it (signals, reload, logging), `realtime`: its optional
  real-time scheduling, `control`: the control socket, `loopwatch`: loop pauses and GC time.

This module only starts, stops and schedules them (housekeeping once a second) and holds the
operations `nftsync ctl` can call, in an explicit table (`control_ops`).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from nftsync import __version__
from nftsync.endpoint import format_endpoint
from nftsync.errors import NftsyncError
from nftsync.proto import PROTOCOL_VERSION, Identity

from .config import DaemonConfig
from .farms import ReplicatedMap
from .l7 import HaproxyLink, L7Map, build_links
from .learn import Learner
from .legacy import LegacyMap
from .links import Links
from .loopwatch import GcWatch, LoopWatch
from .notify import Notifier
from .replicator import Replicator

log = logging.getLogger("nftsync.daemon")

STARTUP_GRACE_S = 5.0  # at least; see Daemon.sync_grace
SWEEP_INTERVAL_S = 0.2  # expiry sweep slices; other housekeeping once a second
GC_FULL_S = 900.0  # full cyclic garbage collection (unfrozen): a stall of ~0.5 s per 1M entries


class Daemon:
    def __init__(self, config: DaemonConfig, notifier: Notifier | None = None) -> None:
        self.config = config
        self.node_id = config.node_id
        self.role = config.role
        self.started = time.monotonic()
        # systemd (or nothing): READY once listening, STATUS lines, the watchdog, STOPPING.
        self.notifier = notifier if notifier is not None else Notifier({})
        self.phase = "starting"  # "running" once it listens for peers
        self.step = "opening the kernel's event sockets"  # what start-up is doing now
        self.listening_at: float | None = None
        self._health = "starting"  # the last health seen by housekeeping (logged on change)
        self._stop = asyncio.Event()
        self.replicator = Replicator(config)
        self.replica = self.replicator.replica
        self.links = Links(config, Identity(config.cluster, config.node_id, config.node_name),
                           self.replicator, self._stop)
        self.learner = Learner(self.replicator, self.links)
        # Local HAProxies whose stick tables are replicated ([[haproxy]], daemon/l7.py).
        self.haproxy: list[HaproxyLink] = build_links(config.haproxy, self.replica,
                                                      self.links.enqueue)
        self.expired = 0
        self.loop_watch = LoopWatch()
        self.gc_watch = GcWatch()
        self._last_full_gc = time.monotonic()
        self._capped_seen = 0  # replica.capped at the last warning (one line a second at most)
        self._tasks: list[asyncio.Task] = []

    # == life cycle ===========================================================================
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        # The keep-alives come from this loop from the first moment: the start-up reads give
        # the loop back every millisecond, so they flow through those too.
        self._tasks.append(asyncio.create_task(self.notifier.watchdog()))
        self._tasks.append(asyncio.create_task(self._follow_health()))
        self.replicator.open(loop)
        self.learner.open()
        try:
            self.step = "loading the farms"
            self.replicator.load_farms()
            self.learner.farms_changed()
            self.replicator.load_legacy()
            self.replicator.load_l7({m.map_id: m for h in self.haproxy for m in h.maps.values()})
            for h in self.haproxy:  # early: a starting HAProxy asks us for its tables
                await h.start()
            # What is linear to read (conntrack, xt_recent) before listening; the maps, whose
            # kernel dump is quadratic (~35 s at 1M), in the background once we listen: what
            # is not read yet is covered by the sessions derived from conntrack and by the
            # peers' snapshots (docs/daemon.md, "Start-up").
            self.step = "reading conntrack"
            await self.learner.initial_dump()
            self.learner.watch(loop)
            self.step = "listening"
            await self.links.start()
            self.phase, self.listening_at = "running", time.monotonic()
            cfg = self.config
            log.info("node %d (%s) of cluster %s: listening on %s as %s, %d farm(s), "
                     "%d peer(s)", self.node_id, cfg.node_name, cfg.cluster,
                     format_endpoint(cfg.listen_host, cfg.listen_port), self.role,
                     len(self.replicator.view.farms), len(cfg.peers))
            self.notifier.ready(self.summary())
            self.learner.reads.read_maps()
            self._tasks.append(asyncio.create_task(self._housekeeping()))
            self._tasks.append(asyncio.create_task(self.loop_watch.run()))
            self.gc_watch.install()
            await self._stop.wait()
        finally:
            log.info("stopping")
            self.gc_watch.remove()
            for t in self._tasks:
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.links.close()
            for h in self.haproxy:
                await h.close()
            self.learner.close(loop)
            self.replicator.close()

    def stop(self) -> None:
        if not self._stop.is_set():
            self.notifier.stopping()
        self._stop.set()

    # == housekeeping =========================================================================
    async def _housekeeping(self) -> None:
        last_tick = time.monotonic()
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            now = time.monotonic()
            # A small slice of the expiry sweep of each table (a few ms, however big they are).
            self.expired += self.replica.sweep(now)
            if now - last_tick < 1.0:
                continue
            last_tick = now
            self._collect_garbage(now)
            self.replicator.nft_sink.retry_refused()  # refused writes whose cause may be gone
            self._warn_capped()
            for h in self.haproxy:
                h.tick()
            try:
                self.learner.tick()
            except NftsyncError as exc:
                self.replicator.last_error = str(exc)
                log.error("%s", exc)

    async def _follow_health(self) -> None:
        """From the start, once a second: a change of health is logged, and systemd's STATUS
        follows the summary (start-up progress included)."""
        while True:
            health, reasons = self.health()
            if health != self._health:
                since = "" if self.listening_at is None else \
                    f", {time.monotonic() - self.listening_at:.1f}s after listening"
                log.info("health: %s (was %s%s)%s", health, self._health, since,
                         ": " + "; ".join(reasons) if reasons else "")
                self._health = health
            self.notifier.status(self.summary())
            await asyncio.sleep(1.0)

    def _collect_garbage(self, now: float) -> None:
        """Keep the cyclic GC off the replica: with 1M entries a full collection walks ~3M
        objects (~0.5 s, a replication stall). Once a second the young generations are
        collected and what survived is frozen (moved out of the collector's sight: replica
        entries hold no cycles and are freed by reference counting anyway). A full collection
        of everything runs every GC_FULL_S, for cycles that became garbage after freezing."""
        gc.collect(1)
        if now - self._last_full_gc >= GC_FULL_S:
            self._last_full_gc = now
            gc.unfreeze()
            gc.collect()
        gc.freeze()

    def _warn_capped(self) -> None:
        capped = self.replica.capped
        if capped != self._capped_seen:
            log.warning("%d session record(s) carried an expiry longer than their map's timeout "
                        "and were cut to it (%d in all)", capped - self._capped_seen, capped)
            self._capped_seen = capped

    # == control operations ===================================================================
    def control_ops(self) -> dict[str, Callable[..., Any]]:
        """What `nftsync ctl` may call (nftsync.daemon.control checks the arguments)."""
        return {"status": self.status, "peers": self.peers, "stats": self.stats,
                "resync": self.resync, "promote": self.promote, "demote": self.demote,
                "show": self.show}

    def sync_grace(self) -> float:
        """How long after it began listening the daemon waits for a configured peer that has
        not connected before counting it as down: two peer timeouts (a dial that times out and
        its retry; a live peer connects within a few hundred ms), at least STARTUP_GRACE_S."""
        return max(STARTUP_GRACE_S, 2 * self.config.peer_timeout)

    def starting(self) -> dict[str, Any]:
        """What start-up is doing, for `ctl status` while the health is `starting`."""
        out: dict[str, Any] = {"step": self.step}
        if self.step == "reading conntrack":
            out["conntrack_read"] = self.learner.reads.ct_seen
        return out

    def sync(self) -> dict[str, Any]:
        """Whose snapshots this node still awaits (`syncing`) and the kernel writer's queue."""
        grace = self.listening_at is None or \
            time.monotonic() - self.listening_at < self.sync_grace()
        waiting, done, total = self.links.awaited(grace)
        return {"peers_applied": done, "peers": total, "waiting": waiting,
                "kernel_queued": self.replicator.kernel_queued()}

    def summary(self) -> str:
        """One line for systemd's STATUS= (what `systemctl status nftsync` shows)."""
        health, reasons = self.health()
        if health == "starting":
            return "starting: " + reasons[0]
        links = self.links.all()
        up = sum(lk.state == "up" for lk in links)
        peers = f"{up}/{len(links)} peers up"
        if health == "syncing":
            s = self.sync()
            return (f"syncing: {s['peers_applied']}/{s['peers']} peers' snapshots applied, "
                    f"{s['kernel_queued']:,} writes queued; {peers}")
        text = f"{health}: {peers}, role {self.role}"
        return text + (f"; {reasons[0]}" if reasons else "")

    def health(self) -> tuple[str, list[str]]:
        """`starting` (not listening yet), `failing`, `syncing`, `degraded` or `ok`, in that
        order of precedence, with reasons (docs/daemon.md, "Health")."""
        if self.phase == "starting":
            what = self.step
            if self.step == "reading conntrack":
                what += f" ({self.learner.reads.ct_seen:,} entries so far)"
            return "starting", [what]
        reasons = []
        links = self.links.all()
        up = [lk for lk in links if lk.state == "up"]
        grace = self.listening_at is None or \
            time.monotonic() - self.listening_at < self.sync_grace()
        if self.config.peers and not up and not grace:
            reasons.append("no peer is connected")
        for lk in links:
            if lk.state not in ("up", "served") and lk.host and not grace:
                reasons.append(f"peer {lk.name} is {lk.state}: {lk.last_error or 'no answer'}")
            elif lk.state == "up" and lk.unacked_age() > self.config.stall_after:
                reasons.append(f"peer {lk.name} has not acknowledged updates for "
                               f"{lk.unacked_age():.0f}s (sync stalled)")
        r = self.replicator
        no_farms = not r.view.farms and not r.legacy and not r.l7
        if no_farms:
            reasons.append("no nftsync farm is loaded")
        if r.nft_sink.stats.failed or (r.ct_sink and r.ct_sink.stats.failed):
            reasons.append("some replicated changes could not be applied to the kernel "
                           "(see stats)")
        reasons.extend(r.nft_sink.problems())  # refused writes waiting, in words
        reasons += [f"HAProxy {h.cfg.name} is not connected (it dials {h.cfg.peer_host}:"
                    f"{h.cfg.peer_port})" for h in self.haproxy
                    if not grace and h.peer is not None and not h.peer.connected]
        failing = (self.config.peers and not up and not grace) or no_farms
        if failing:
            return "failing", reasons
        waiting = self.links.awaited(grace)[0]
        if waiting:
            return "syncing", waiting + reasons
        return ("degraded", reasons) if reasons else ("ok", [])

    def status(self) -> dict:
        health, reasons = self.health()
        links = self.links.all()
        return {
            "node": self.config.node_name, "node_id": self.node_id,
            "cluster": self.config.cluster, "role": self.role, "health": health,
            "reasons": reasons, "uptime_s": round(time.monotonic() - self.started, 1),
            "farms": sorted(self.replicator.view.farms),
            "peers_up": sum(lk.state == "up" for lk in links), "peers_total": len(links),
            "pid": os.getpid(), "version": __version__, "protocol": PROTOCOL_VERSION,
            **({"starting": self.starting()} if self.phase == "starting" else
               {"sync": self.sync()}),
            "startup_read": self.learner.reads.status(),  # per map: read, done, how long
            **({"haproxy": [h.status() for h in self.haproxy]} if self.haproxy else {}),
        }

    def peers(self) -> list[dict]:
        return [lk.as_dict() for lk in self.links.all()]

    def stats(self) -> dict:
        r = self.replicator
        counters = {**self.learner.counters, "auth_failures": self.links.auth_failures,
                    "expired": self.expired, "farm_reloads": r.farm_reloads,
                    "ct_mark_conflicts": self.replica.ct_mark_conflicts}
        return {
            "counters": counters,
            "refused": dict(self.replica.refused),  # peer records refused, by cause
            "inbound": self.links.gate.stats(),  # connections before the key: refused, by cause
            "capped_expiry": self.replica.capped,
            "sessions": {m: len(t) for m, t in self.replica.sessions.items()},
            "conntrack": len(self.replica.conntrack),
            "kernel": {"nft": _stats(r.nft_sink.stats),
                       "conntrack": _stats(r.ct_sink.stats) if r.ct_sink else None,
                       "queued": r.kernel.queued if r.kernel else 0,
                       "problems": r.nft_sink.problems()},
            "events": {"conntrack": _stats(self.learner.ct_stats),
                       "nftables": _stats(self.learner.nft_stats)},
            "peers": {lk.name: lk.as_dict() for lk in self.links.all()},
            "loop": self.loop_watch.as_dict(),  # how long the event loop could not run
            "gc": self.gc_watch.as_dict(),  # ... and how much of that the cyclic GC took
            "reads": self.learner.reads.stats(),  # the kernel's conntrack and maps, read
            "last_error": r.last_error,
            **({"haproxy": {h.cfg.name: h.stats() for h in self.haproxy}} if self.haproxy
               else {}),
        }

    async def resync(self, peer: str | None = None) -> dict:
        return {"resync": await self.links.resync(peer)}

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
        r = self.replicator
        out: dict[str, Any] = {"farms": {}, "conntrack": len(self.replica.conntrack)}
        shown: list[tuple[str, str, ReplicatedMap | LegacyMap | L7Map]] = \
            [(m.smap.farm, m.smap.role.value, m) for m in r.view.maps.values()] + \
            [(lm.farm.name, f"recent {lm.table.name}", lm) for lm in r.legacy.values()] + \
            [(m.farm, "stick table", m) for m in r.l7.values()]
        for farm_name, section, target in sorted(shown, key=lambda t: (t[0], t[1])):
            if farm is not None and farm_name != farm:
                continue
            table = self.replica.sessions[target.map_id]
            rows = []
            for key, e in table.entries():
                if len(rows) >= limit:
                    break
                backend = f"{e.value:#x}" if not isinstance(target, L7Map) else \
                    target.link.names.get(e.value, f"id {e.value}")  # type: ignore[call-overload]
                rows.append({"client": target.key_text(key), "backend": backend,
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
        """SIGHUP: take what can change at run time; identity and key stay until a restart."""
        changes: dict[str, Any] = {}
        if config.key != self.config.key or config.cluster != self.config.cluster or \
                config.node_id != self.config.node_id:
            changes["restart_needed"] = "key, cluster and node id take effect on restart"
        self.config = _merge_reloadable(self.config, config)
        self.replicator.config = self.config
        added, removed = self.links.set_peers(self.config)
        changes["peers_added"], changes["peers_removed"] = added, removed
        if config.role != self.role:
            changes["role"] = (self.promote() if config.role == "active" else self.demote())
        self.learner.reload_farms = True
        if config.haproxy != [h.cfg for h in self.haproxy]:
            changes["restart_needed_haproxy"] = "[[haproxy]] changes take effect on restart"
        for h in self.haproxy:  # servers may have been renamed or added: read the names again
            h.schedule_refresh()
        log.info("configuration reloaded: %s", changes)
        return changes


def _merge_reloadable(old: DaemonConfig, new: DaemonConfig) -> DaemonConfig:
    new.key, new.cluster, new.node_id, new.node_name = old.key, old.cluster, old.node_id, \
        old.node_name
    new.listen_host, new.listen_port = old.listen_host, old.listen_port
    return new


def _stats(obj: Any) -> dict | None:
    if obj is None:
        return None
    fields = getattr(obj, "__dataclass_fields__", None) or getattr(obj, "__slots__", ())
    return {f: getattr(obj, f) for f in fields if not f.startswith("_")}
