"""HAProxy stick tables as replicated session tables: the daemon's side of the L7 adapter.

nftsync is a peer of each local HAProxy (`[[haproxy]]` in the configuration; the protocol is
nftsync.l7.haproxy, the design docs/l7.md). Each followed stick table is a replicated map like
an nft session map:

* map_id `haproxy/<table>` (both nodes declare the same tables), key = the raw key bytes
  (at most 64), "mark" = HAProxy's `server_id`, expiry, update stamp and origin as for L4;
* **learn**: each update HAProxy pushes is a local change (a live update has no expiry: the
  table's `expire` from now), replicated to the peers like a conntrack-learned session;
  a timed update (HAProxy teaching us after our restart) is dated by its remaining time, so a
  change a peer made meanwhile still wins;
* **write**: records from peers that win are pushed to HAProxy as timed updates with the
  server's name resolved here (`show servers state` on the admin socket, cached, read again
  when HAProxy reconnects and on SIGHUP) and the remaining expiry;
* **resync**: when HAProxy starts (or reloads) it asks for every entry: the replica's live
  entries of the table are its answer;
* no deletes: the protocol has none; entries end by expiry on every node.

`L7Map` is a `KernelTarget` (daemon/target.py) like a legacy xt_recent table, so the
replicator writes to it as to any other target.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nftsync.l7 import admin
from nftsync.proto import MAX_REMAINING_MS, OP_ADD, Record, SessionRecord
from nftsync.replication import ElementOp, Replica

from .clock import now_ms
from .config import HAPROXY_PREFIX, HaproxyConfig
from .target import SinkStats

if TYPE_CHECKING:  # imported when used: a daemon without [[haproxy]] never loads the codec
    from nftsync.l7.haproxy import HaproxyPeer, StickTable, StickUpdate

log = logging.getLogger("nftsync.daemon")

MAX_KEY = 64  # SessionRecord keys; HAProxy's string keys are `len 64` at most in practice
SERVER_ID_MAX = (1 << 31) - 1  # HAProxy's server ids are positive ints
MAX_UNNAMED = 100_000  # entries waiting for their server's name (beyond: left to the id)


class ServerIds(frozenset[int]):
    """MapPolicy.marks for a stick table: any positive HAProxy server id.

    Ids are not checked on arrival against this node's HAProxy: it may not be up yet when the
    peer's snapshot comes (a failback), and refusing would lose the entries. They are resolved
    to names when pushed; an id this HAProxy lacks is counted (`unknown_server`)."""

    def __contains__(self, value: object) -> bool:
        return isinstance(value, int) and 0 < value <= SERVER_ID_MAX


ANY_SERVER = ServerIds()


def map_id(table: str) -> str:
    return HAPROXY_PREFIX + table


@dataclass
class L7Map:
    """One replicated stick table: where records of `haproxy/<table>` are written."""

    link: HaproxyLink
    table: str
    stats: SinkStats = field(default_factory=SinkStats)

    @property
    def map_id(self) -> str:
        return map_id(self.table)

    @property
    def farm(self) -> str:
        return self.map_id  # `ctl show --farm haproxy/web`

    def key_valid(self, key: bytes) -> bool:
        return 0 < len(key) <= MAX_KEY

    def key_text(self, key: bytes) -> str:
        """The key as `show table` prints it, from the type HAProxy announced (raw bytes as
        hex until it did)."""
        st = self.link.peer.tables.get(self.table) if self.link.peer else None
        kind = st.key_type if st is not None else ""
        if kind == "ip" and len(key) == 4 or kind == "ipv6" and len(key) == 16:
            return str(ipaddress.ip_address(key))
        if kind == "integer" and len(key) == 4:
            return str(int.from_bytes(key, "big"))
        if kind == "string":
            return key.decode("utf-8", "backslashreplace")
        return key.hex()

    def apply(self, ops: list[ElementOp]) -> None:
        """Peer records that won: pushed to HAProxy (kept by the peer until it is connected
        and has defined the table). Deletions do not exist in the protocol: counted, skipped."""
        updates = []
        for op in ops:
            if op.mark is None:
                self.stats.failed += 1
                self.stats.errors["delete_unsupported"] = \
                    self.stats.errors.get("delete_unsupported", 0) + 1
                continue
            updates.append(self.link.update(self.table, op.key, op.mark, op.remaining_ms))
        if updates:
            self.link.push(updates)
            self.stats.applied += len(updates)
            self.stats.transactions += 1

    def problems(self) -> list[str]:
        return []


@dataclass
class HaproxyLink:
    """One `[[haproxy]]`: its peer session, its tables, its server names."""

    cfg: HaproxyConfig
    replica: Replica
    enqueue: Callable[[Record], None]  # a local change, to every peer link
    peer: HaproxyPeer | None = None
    maps: dict[str, L7Map] = field(default_factory=dict)  # map_id ->
    names: dict[int, str] = field(default_factory=dict)  # server_id -> name (this HAProxy)
    names_error: str = ""
    names_read_at: float | None = None
    counters: dict[str, int] = field(default_factory=lambda: {
        "learned": 0, "learned_timed": 0, "timed_not_taken": 0, "not_followed": 0,
        "bad_key": 0, "pushed": 0, "unknown_server": 0, "resync_answers": 0,
        "resync_entries": 0})
    _was_connected: bool = False
    _refresh: asyncio.Task | None = None
    _refresh_at: float = -1e9  # last read of the names (monotonic): at most one a second
    # (table, key) pushed by id alone because the name was not known yet: pushed again, with
    # the name, once the names are read (HAProxy routes by name first; docs/l7.md).
    _unnamed: set[tuple[str, bytes]] = field(default_factory=set)

    def __post_init__(self) -> None:
        for table in self.cfg.tables:
            m = L7Map(self, table)
            self.maps[m.map_id] = m

    # -- life cycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        from nftsync.l7.haproxy import HaproxyPeer

        self.peer = HaproxyPeer(self.cfg.peer_host, self.cfg.peer_port, self.cfg.local_peer,
                                self.cfg.haproxy_peer, self.on_update, self.snapshot)
        await self.peer.start()
        await self.refresh_names()

    async def close(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
        if self.peer is not None:
            await self.peer.close()

    async def refresh_names(self) -> None:
        """Server id -> name from the admin socket (in a thread: the loop never waits on
        HAProxy). Kept as it was if HAProxy does not answer (it may be reloading)."""
        try:
            found = await asyncio.to_thread(admin.servers, self.cfg.admin_socket, 5.0)
        except admin.AdminError as exc:
            if str(exc) != self.names_error:
                log.warning("haproxy %s: server names not read: %s", self.cfg.name, exc)
            self.names_error = str(exc)
            return
        names: dict[int, str] = {}
        for s in found:
            other = names.setdefault(s.server_id, s.name)
            if other != s.name:
                # Two backends with the same id and different names: which one a table
                # entry means depends on the backend. Keep the first; say it.
                log.warning("haproxy %s: server id %d is %s and %s (in different backends): "
                            "entries pushed with this id get the name %s", self.cfg.name,
                            s.server_id, other, s.name, other)
        self.names, self.names_error = names, ""
        self.names_read_at = time.monotonic()
        self._push_named()

    def _push_named(self) -> None:
        """Push again, now with the name, what went out by id alone."""
        now = time.monotonic()
        again = []
        for table, key in list(self._unnamed):
            e = self.replica.sessions[map_id(table)].current(key, now)
            if e is None:
                self._unnamed.discard((table, key))
            elif e.value in self.names:
                self._unnamed.discard((table, key))
                again.append(self.update(table, key, e.value,
                                         max(1, int((e.expires_at - now) * 1000))
                                         if e.expires_at is not None else MAX_REMAINING_MS))
        if again:
            self.push(again)

    def tick(self) -> None:
        """Once a second: a new HAProxy session (a start or reload) may have new servers."""
        connected = self.peer is not None and self.peer.connected
        # ... and entries pushed by id alone wait for the names while they were never read.
        unread = self.names_read_at is None or bool(self.names_error)
        if connected and (not self._was_connected or self._unnamed and unread):
            self.schedule_refresh()
        self._was_connected = connected

    def schedule_refresh(self) -> None:
        """Read the server names again in the background (one read at a time)."""
        now = time.monotonic()
        if (self._refresh is None or self._refresh.done()) and now - self._refresh_at >= 1.0:
            self._refresh_at = now
            self._refresh = asyncio.get_running_loop().create_task(self.refresh_names())

    # -- HAProxy -> replica --------------------------------------------------------------------
    def on_update(self, u: StickUpdate) -> None:
        mid = map_id(u.table)
        if mid not in self.maps:
            self.counters["not_followed"] += 1
            return
        key = bytes(u.key)
        if not 0 < len(key) <= MAX_KEY or not 0 < u.server_id <= SERVER_ID_MAX:
            self.counters["bad_key"] += 1
            return
        if u.server_name:
            self.names.setdefault(u.server_id, u.server_name)
        now = time.monotonic()
        wall = now_ms()
        st = self.peer.tables.get(u.table) if self.peer is not None else None
        if u.expire_ms is None:
            expire = st.expire_ms if st is not None and st.expire_ms else MAX_REMAINING_MS
            rec = self.replica.local_session(mid, key, u.server_id, now + expire / 1000, now,
                                             wall)
            self.counters["learned"] += 1
            self.enqueue(rec)
            return
        rec2 = self._learn_timed(mid, key, u.server_id, u.expire_ms, st, now, wall)
        if rec2 is None:
            self.counters["timed_not_taken"] += 1
            return
        self.counters["learned_timed"] += 1
        self.enqueue(rec2)

    def _learn_timed(self, mid: str, key: bytes, server_id: int, remaining_ms: int,
                     st: StickTable | None, now: float, wall: int) -> SessionRecord | None:
        """A timed update: HAProxy's answer to our resync request (after our restart), with
        the time left. It was last touched `expire - remaining` ago, so it is dated then:
        a change a peer saw live since (the client moved on the other node) still wins,
        and what we hold that is newer stays (pushed back to HAProxy by the next write)."""
        table = self.replica.sessions[mid]
        held = table.current(key, now)
        if held is not None and held.value == server_id:
            # What we pushed (or learned) coming back in HAProxy's answer to our RESYNCREQ,
            # which follows every reconnect: nothing new; taking it would make it ours.
            return None
        expire = st.expire_ms if st is not None and st.expire_ms else remaining_ms
        touched = wall - max(0, expire - remaining_ms)
        if not table.beats(key, touched, self.replica.node_id, server_id, now):
            return None
        expires_at = now + remaining_ms / 1000
        table.put(key, server_id, expires_at, touched, self.replica.node_id)
        return SessionRecord(OP_ADD, mid, key, server_id, max(1, min(remaining_ms,
                                                                     MAX_REMAINING_MS)),
                             touched, self.replica.node_id)

    # -- replica -> HAProxy --------------------------------------------------------------------
    def update(self, table: str, key: bytes, server_id: int, remaining_ms: int) -> StickUpdate:
        from nftsync.l7.haproxy import StickUpdate

        name = self.names.get(server_id)
        if name is None:
            self.counters["unknown_server"] += 1
            if len(self._unnamed) < MAX_UNNAMED:
                self._unnamed.add((table, key))
        st = self.peer.tables.get(table) if self.peer is not None else None
        if st is not None and st.expire_ms and (remaining_ms <= 0 or remaining_ms > st.expire_ms):
            remaining_ms = st.expire_ms
        return StickUpdate(table, key, server_id, name, max(1, remaining_ms))

    def push(self, updates: list[StickUpdate]) -> None:
        if self.peer is not None:
            self.peer.push(updates)
            self.counters["pushed"] += len(updates)

    def snapshot(self, table: str) -> Iterable[StickUpdate]:
        """Every live entry of `table` we hold, for HAProxy's resync request."""
        self.counters["resync_answers"] += 1
        mid = map_id(table)
        t = self.replica.sessions.get(mid)
        if mid not in self.maps or t is None:
            return []
        return self._entries(table, t)

    def _entries(self, table: str, t: object) -> Iterator[StickUpdate]:
        now = time.monotonic()
        for key, e in t.entries(now):  # type: ignore[attr-defined]
            remaining = MAX_REMAINING_MS if e.expires_at is None else \
                max(1, int((e.expires_at - now) * 1000))
            self.counters["resync_entries"] += 1
            yield self.update(table, key, e.value, remaining)

    # -- control -------------------------------------------------------------------------------
    def status(self) -> dict:
        peer = self.peer
        defined = peer.tables if peer is not None else {}
        return {
            "name": self.cfg.name, "connected": bool(peer is not None and peer.connected),
            "haproxy_pid": peer.stats()["haproxy_pid"] if peer is not None else None,
            "peer_listen": f"{self.cfg.peer_host}:{self.cfg.peer_port}",
            "tables": {t: ({"key_type": defined[t].key_type, "key_len": defined[t].key_len,
                            "expire_ms": defined[t].expire_ms} if t in defined else
                           "not defined by HAProxy yet") for t in self.cfg.tables},
            "entries": {t: len(self.replica.sessions.get(map_id(t), ())) for t in self.cfg.tables},
            "servers_known": len(self.names),
            **({"servers_error": self.names_error} if self.names_error else {}),
        }

    def stats(self) -> dict:
        return {**self.status(), "counters": dict(self.counters),
                "peer": self.peer.stats() if self.peer is not None else None}


def build_links(configs: list[HaproxyConfig], replica: Replica,
                enqueue: Callable[[Record], None]) -> list[HaproxyLink]:
    return [HaproxyLink(c, replica, enqueue) for c in configs]
