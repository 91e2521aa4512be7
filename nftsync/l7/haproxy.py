"""nftsync as a local peer of its own HAProxy (HAProxy's peers protocol on 127.0.0.1).

HAProxy dials the listener, says hello, and from then on pushes every stick-table change as it
happens; nftsync answers HAProxy's resync request (at its start) from what it holds and writes
entries from the other node as timed updates (server name and id, remaining expiry). Why this
way and not the runtime API: docs/l7.md. The codec is `peerproto`; this module is the session:
handshake, acks, heartbeats, resyncs and a bounded queue of pushes.

One session at a time: a new HAProxy process (a reload) replaces the old one's session. A broken
or hostile session costs its connection (ProtocolError), never the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from . import peerproto as pp

log = logging.getLogger("nftsync.l7")

# Data types nftsync writes: stickiness only. Counters are never declared, so HAProxy's own
# counters of an entry are left alone when nftsync writes it (a declared type would be written).
PUSHED_TYPES = (1 << pp.DT_SERVER_ID) | (1 << pp.DT_SERVER_KEY)
PUSH_BATCH = 1000  # messages written between two waits for the socket to drain


@dataclass(frozen=True, slots=True)
class StickTable:
    """A table definition HAProxy announced on the peers link."""

    name: str
    key_type: str  # "ip" (IPv4), "ipv6", "integer", "string", "binary"
    key_len: int  # as HAProxy announces it (a `len 64` string table says 65)
    expire_ms: int  # the table's `expire`


@dataclass(slots=True)
class StickUpdate:
    table: str
    key: bytes  # raw key bytes (IPv4: 4 bytes; string: its bytes, no NUL padding)
    server_id: int
    server_name: str | None  # server_key; None when HAProxy did not say
    expire_ms: int | None  # remaining ms; None on live updates (then: the table's expire_ms)


@dataclass
class PeerStats:
    connects: int = 0
    refused: int = 0  # hellos answered with an error status
    updates_received: int = 0
    updates_skipped: int = 0  # tables whose data types this codec cannot decode
    updates_pushed: int = 0
    pushes_dropped: int = 0  # the queue was full: oldest dropped
    pushes_unstorable: int = 0  # the table stores neither server_id nor server_key
    acks_sent: int = 0
    acks_received: int = 0
    resyncs_served: int = 0  # HAProxy's RESYNCREQ answered (snapshot + FINISHED)
    resyncs_requested: int = 0  # our RESYNCREQ answered by HAProxy
    heartbeats_sent: int = 0
    bad_messages: int = 0  # sessions dropped for a protocol error
    callback_errors: int = 0
    last_error: str = ""


@dataclass
class _Session:
    """State of one connection (HAProxy's ids, caches and cursors are per connection)."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    peer_pid: int
    rx_tables: dict[int, pp.TableDef] = field(default_factory=dict)  # HAProxy's id -> DEFINE
    rx_current: pp.TableDef | None = None
    last_get: dict[int, int] = field(default_factory=dict)  # HAProxy's id -> last update id
    last_acked: dict[int, int] = field(default_factory=dict)
    rx_cache: pp.RxDictCache = field(default_factory=pp.RxDictCache)
    tx_cache: pp.TxDictCache = field(default_factory=pp.TxDictCache)
    our_defs: dict[str, pp.TableDef] = field(default_factory=dict)  # name -> our DEFINE
    tx_current: str | None = None
    tx_last_id: dict[str, int] = field(default_factory=dict)
    lesson_until: float = 0.0  # our RESYNCREQ is outstanding until then (monotonic)
    teach_requested: bool = False
    last_rx: float = field(default_factory=time.monotonic)
    last_tx: float = field(default_factory=time.monotonic)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None

    def send(self, data: bytes) -> None:
        self.writer.write(data)
        self.last_tx = time.monotonic()


def _check_loopback(host: str) -> None:
    if host == "localhost":
        return
    try:
        addr = ipaddress.ip_address(host)
    except ValueError as exc:
        raise ValueError(f"haproxy peer: listen address {host!r} is not an IP address") from exc
    if not addr.is_loopback:
        raise ValueError(f"haproxy peer: refusing to listen on {host}: the peers protocol has no "
                         "authentication, listen on 127.0.0.1 (or ::1) only")


class HaproxyPeer:
    """nftsync as a local peer of one HAProxy: listens on 127.0.0.1:port, HAProxy dials it."""

    def __init__(self, host: str, port: int, local_name: str, haproxy_name: str,
                 on_update: Callable[[StickUpdate], None],
                 snapshot: Callable[[str], Iterable[StickUpdate]], *,
                 heartbeat_s: float = 3.0, silence_s: float = 8.0, max_pending: int = 200_000,
                 request_resync: bool = True, resync_wait_s: float = 5.0,
                 hello_timeout_s: float = 5.0) -> None:
        _check_loopback(host)
        for what, name in (("local_name", local_name), ("haproxy_name", haproxy_name)):
            if not name or any(c in name for c in " \n\r\t") or len(name) > 64:
                raise ValueError(f"haproxy peer: {what} {name!r} is not a peer name")
        self.host, self.port = host, port
        self.local_name, self.haproxy_name = local_name, haproxy_name
        self.on_update, self.snapshot = on_update, snapshot
        self.heartbeat_s, self.silence_s = heartbeat_s, silence_s
        self.max_pending = max_pending
        self.request_resync, self.resync_wait_s = request_resync, resync_wait_s
        self.hello_timeout_s = hello_timeout_s
        self.tables: dict[str, StickTable] = {}
        self._defs: dict[str, pp.TableDef] = {}  # HAProxy's DEFINE, latest per name
        self._pending: OrderedDict[tuple[str, bytes], StickUpdate] = OrderedDict()
        self._stats = PeerStats()
        self._server: asyncio.Server | None = None
        self._session: _Session | None = None
        self._handlers: set[asyncio.Task] = set()

    # --- public ------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._session is not None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self.port,
                                                  reuse_address=True,
                                                  limit=4 * pp.MAX_HELLO_LINE)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._handlers):
            task.cancel()
        for task in list(self._handlers):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def push(self, updates: Iterable[StickUpdate]) -> None:
        """Queue entries for HAProxy (latest per key wins); sent once connected and the table
        is known, oldest dropped (and counted) beyond max_pending."""
        for upd in updates:
            k = (upd.table, bytes(upd.key))
            self._pending[k] = upd
            self._pending.move_to_end(k)
        while len(self._pending) > self.max_pending:
            self._pending.popitem(last=False)
            self._stats.pushes_dropped += 1
        if self._session is not None:
            self._session.wake.set()

    def stats(self) -> dict:
        s = self._stats
        return {
            "connected": self.connected,
            "haproxy_pid": self._session.peer_pid if self._session else None,
            "tables": sorted(self.tables),
            "pending_pushes": len(self._pending),
            **{k: getattr(s, k) for k in s.__dataclass_fields__},
        }

    # --- sessions ----------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        session: _Session | None = None
        try:
            hello = await asyncio.wait_for(self._handshake(reader, writer), self.hello_timeout_s)
            if hello is None:
                return
            session = _Session(reader, writer, hello.pid)
            session.task = task
            old, self._session = self._session, session
            if old is not None and old.task is not None:
                log.info("haproxy peer: new session from %s pid %d replaces pid %d",
                         self.haproxy_name, hello.pid, old.peer_pid)
                old.task.cancel()
            self._stats.connects += 1
            log.info("haproxy peer: %s (pid %d) connected", self.haproxy_name, hello.pid)
            await self._run(session)
        except pp.ProtocolError as exc:
            self._stats.bad_messages += 1
            self._stats.last_error = f"protocol error: {exc}"
            log.warning("haproxy peer: dropping the session: %s", exc)
            with contextlib.suppress(OSError, RuntimeError):
                writer.write(bytes((pp.CLASS_ERROR, pp.ERR_PROTOCOL)))
        except TimeoutError:
            self._stats.last_error = "no hello in time"
        except (OSError, asyncio.IncompleteReadError) as exc:
            if session is not None:
                self._stats.last_error = f"connection lost: {exc or type(exc).__name__}"
        finally:
            if session is not None and self._session is session:
                self._session = None
                log.info("haproxy peer: session with pid %d ended", session.peer_pid)
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()
            self._handlers.discard(task)

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                         ) -> pp.Hello | None:
        """Read the three hello lines; answer 200 or the error status. None when refused."""
        lines = []
        for _ in range(3):
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.LimitOverrunError as exc:
                raise pp.ProtocolError("hello line too long") from exc
            lines.append(line[:-1])
        try:
            hello = pp.decode_hello(lines)
        except pp.ProtocolError as exc:
            return await self._refuse(writer, pp.STATUS_ERR_PROTO, str(exc))
        if not pp.version_supported(hello.version):
            return await self._refuse(writer, pp.STATUS_ERR_VERSION,
                                      f"protocol version {hello.version}, nftsync speaks "
                                      f"{pp.VERSION}")
        if hello.remote_name != self.local_name:
            return await self._refuse(writer, pp.STATUS_ERR_HOST,
                                      f"HAProxy calls this peer {hello.remote_name!r}, nftsync "
                                      f"is {self.local_name!r} (the peer line in HAProxy's "
                                      "peers section)")
        if hello.sender != self.haproxy_name:
            return await self._refuse(writer, pp.STATUS_ERR_PEER,
                                      f"the dialler is {hello.sender!r}, nftsync expects "
                                      f"HAProxy's local peer {self.haproxy_name!r}")
        writer.write(pp.encode_status(pp.STATUS_OK))
        return hello

    async def _refuse(self, writer: asyncio.StreamWriter, code: int, why: str) -> None:
        self._stats.refused += 1
        self._stats.last_error = f"hello refused ({code}): {why}"
        log.warning("haproxy peer: hello refused with %d: %s", code, why)
        writer.write(pp.encode_status(code))
        with contextlib.suppress(OSError):
            await writer.drain()
        return None

    async def _run(self, s: _Session) -> None:
        if self.request_resync:
            s.send(pp.control(pp.CTRL_RESYNCREQ))
            s.lesson_until = time.monotonic() + self.resync_wait_s
        tasks = {asyncio.create_task(self._read_loop(s)),
                 asyncio.create_task(self._writer_loop(s))}
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # re-raise what ended the session
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, OSError, pp.ProtocolError):
                    await task

    async def _read_loop(self, s: _Session) -> None:
        frames = pp.FrameDecoder()
        while True:
            data = await s.reader.read(65536)
            if not data:
                self._stats.last_error = "HAProxy closed the connection"
                return
            s.last_rx = time.monotonic()
            for msg in frames.feed(data):
                self._handle(s, msg)
            self._send_acks(s)

    def _handle(self, s: _Session, msg: pp.Message) -> None:
        if msg.cls == pp.CLASS_CONTROL:
            if msg.type == pp.CTRL_RESYNCREQ:
                s.teach_requested = True
                s.wake.set()
            elif msg.type in (pp.CTRL_RESYNCFINISHED, pp.CTRL_RESYNCPARTIAL):
                s.send(pp.control(pp.CTRL_RESYNCCONFIRM))
                if s.lesson_until:
                    self._stats.resyncs_requested += 1
                s.lesson_until = 0.0
                s.wake.set()
            # RESYNCCONFIRM (after our lesson) and HEARTBEAT need nothing but last_rx.
        elif msg.cls == pp.CLASS_ERROR:
            what = "size limit" if msg.type == pp.ERR_SIZELIMIT else "protocol"
            raise pp.ProtocolError(f"HAProxy reported error {msg.type} ({what})")
        elif msg.cls == pp.CLASS_STICKTABLE:
            self._handle_table(s, msg)
        elif msg.cls == pp.CLASS_RESERVED:
            raise pp.ProtocolError("message of the reserved class")

    def _handle_table(self, s: _Session, msg: pp.Message) -> None:
        if msg.type == pp.STKT_DEFINE:
            d = pp.decode_define(msg.payload)
            s.rx_tables[d.table_id] = s.rx_current = d
            s.last_get.setdefault(d.table_id, 0)
            self._learn_table(d)
        elif msg.type == pp.STKT_SWITCH:
            table_id = pp.decode_switch(msg.payload)
            if table_id not in s.rx_tables:
                raise pp.ProtocolError(f"switch to table id {table_id} never defined")
            s.rx_current = s.rx_tables[table_id]
        elif msg.type == pp.STKT_ACK:
            pp.decode_ack(msg.payload)
            self._stats.acks_received += 1
        elif msg.type in pp.UPDATE_TYPES:
            d = s.rx_current
            if d is None:
                raise pp.ProtocolError("update before any table definition")
            last = s.last_get[d.table_id]
            if not d.parseable:
                s.last_get[d.table_id] = pp.update_id_of(msg.type, msg.payload, last)
                self._stats.updates_skipped += 1
                return
            u = pp.decode_update(msg.type, msg.payload, d, s.rx_cache, last)
            s.last_get[d.table_id] = u.update_id
            self._stats.updates_received += 1
            update = StickUpdate(d.name, u.key, u.server_id or 0, u.server_key, u.expire_ms)
            try:
                self.on_update(update)
            except Exception as exc:  # a bug in the consumer must not drop HAProxy's session
                self._stats.callback_errors += 1
                self._stats.last_error = f"on_update failed: {exc!r}"
                log.exception("haproxy peer: on_update failed for table %s", d.name)

    def _learn_table(self, d: pp.TableDef) -> None:
        table = StickTable(d.name, d.key_type_name, d.key_len, d.expire_ms or 0)
        old = self.tables.get(d.name)
        if old != table:
            if old is not None:
                log.info("haproxy peer: table %s redefined: %s", d.name, table)
            if not d.parseable:
                log.warning("haproxy peer: table %s stores data types this nftsync cannot "
                            "decode (data field %#x); its updates are skipped", d.name,
                            d.data_types)
        self.tables[d.name] = table
        self._defs[d.name] = d

    def _send_acks(self, s: _Session) -> None:
        for table_id, last in s.last_get.items():
            if s.last_acked.get(table_id, 0) != last:
                s.send(pp.encode_ack(table_id, last))
                s.last_acked[table_id] = last
                self._stats.acks_sent += 1

    # --- what we write -----------------------------------------------------------------------

    async def _writer_loop(self, s: _Session) -> None:
        """Every table-dependent write (DEFINE, SWITCH, updates, the lesson) happens here, so
        the current table on the wire is never changed under a half-written sequence."""
        while True:
            now = time.monotonic()
            if now - s.last_rx > self.silence_s:
                self._stats.last_error = f"HAProxy silent for {self.silence_s:g} s"
                log.warning("haproxy peer: %s, closing the session", self._stats.last_error)
                return  # _run cancels the reader and _accept closes the connection
            lesson_done = not s.lesson_until or now >= s.lesson_until
            if s.teach_requested and lesson_done:
                s.teach_requested = False
                await self._teach(s)
            if lesson_done and self._pending:
                await self._push_pending(s)
            if time.monotonic() - s.last_tx >= self.heartbeat_s:
                s.send(pp.control(pp.CTRL_HEARTBEAT))
                self._stats.heartbeats_sent += 1
            s.wake.clear()
            wait = self.heartbeat_s - (time.monotonic() - s.last_tx)
            if s.lesson_until:
                wait = min(wait, s.lesson_until - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(s.wake.wait(), max(0.05, min(wait, 1.0)))

    def _table_for_push(self, s: _Session, name: str) -> pp.TableDef | None:
        """Our DEFINE of table `name` on this session (sent the first time), or None when
        HAProxy never defined it or it stores nothing nftsync writes."""
        ours = s.our_defs.get(name)
        if ours is not None:
            return ours
        theirs = self._defs.get(name)
        if theirs is None:
            return None
        ours = pp.TableDef(len(s.our_defs) + 1, name, theirs.key_type, theirs.key_len,
                           theirs.data_types & PUSHED_TYPES, theirs.expire_ms)
        s.our_defs[name] = ours
        s.send(pp.encode_define(ours))
        s.tx_current = name
        return ours

    def _write_update(self, s: _Session, upd: StickUpdate) -> bool:
        d = self._table_for_push(s, upd.table)
        if d is None:
            return False
        if not d.data_types:
            self._stats.pushes_unstorable += 1
            return True
        if s.tx_current != upd.table:
            s.send(pp.encode_switch(d.table_id))
            s.tx_current = upd.table
        table_expire = d.expire_ms or 0
        expire = upd.expire_ms if upd.expire_ms is not None else table_expire
        if table_expire:
            expire = min(expire, table_expire)
        update_id = (s.tx_last_id.get(upd.table, 0) + 1) & pp.U32
        try:
            data = pp.encode_update(d, update_id, bytes(upd.key), expire_ms=max(expire, 1),
                                    server_id=upd.server_id, server_key=upd.server_name,
                                    cache=s.tx_cache)
        except ValueError as exc:
            self._stats.pushes_unstorable += 1
            self._stats.last_error = f"push to {upd.table}: {exc}"
            return True
        s.tx_last_id[upd.table] = update_id
        s.send(data)
        self._stats.updates_pushed += 1
        return True

    async def _push_pending(self, s: _Session) -> None:
        sent = 0
        for k in list(self._pending):
            upd = self._pending.get(k)
            if upd is None or not self._write_update(s, upd):
                continue
            del self._pending[k]
            sent += 1
            if sent % PUSH_BATCH == 0:
                await s.writer.drain()
        if sent:
            await s.writer.drain()

    async def _teach(self, s: _Session) -> None:
        """Answer HAProxy's RESYNCREQ: every entry nftsync holds for every table HAProxy
        defined, then RESYNCFINISHED (PARTIAL when a snapshot failed)."""
        complete = True
        sent = 0
        for name in list(self._defs):
            try:
                for upd in self.snapshot(name):
                    if self._write_update(s, upd):
                        sent += 1
                        if sent % PUSH_BATCH == 0:
                            await s.writer.drain()
            except Exception as exc:  # the lesson is then partial, HAProxy asks nobody else
                complete = False
                self._stats.callback_errors += 1
                self._stats.last_error = f"snapshot({name}) failed: {exc!r}"
                log.exception("haproxy peer: snapshot of %s failed", name)
        s.send(pp.control(pp.CTRL_RESYNCFINISHED if complete else pp.CTRL_RESYNCPARTIAL))
        await s.writer.drain()
        self._stats.resyncs_served += 1
        log.info("haproxy peer: resync served to pid %d: %d entries of %d tables", s.peer_pid,
                 sent, len(self._defs))
