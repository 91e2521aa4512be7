"""Admission of inbound sync connections before they prove the key (docs/daemon.md, "Exposure
to strangers").

Anyone who can reach the peer port can open connections to it. Until a connection has passed
the handshake it costs a file descriptor, a task and a timer, and nothing says who it is, so
that phase is bounded here, before any asyncio object exists for the connection:

* at most PER_SOURCE unauthenticated connections from one source (an IPv4 address, an IPv6 /64)
  and at most TOTAL in all; over a cap the socket is closed at once (a reset), no handshake;
* a source that has proved the key before (a configured peer's address, or one that passed a
  handshake) is outside TOTAL: strangers elsewhere cannot fill the slots a real peer needs;
* HANDSHAKE_DEADLINE_S for the whole unauthenticated phase (TLS, when configured, and the PSK
  handshake), whatever peer_timeout is;
* the file descriptors the process may still open (FdBudget): inbound connections are refused
  while fewer than FD_RESERVE would remain, so the control socket, the metrics endpoint and the
  kernel's sockets always find one;
* refusals and failed handshakes are logged at a bounded rate (RefusalLog) and counted by
  cause (`inbound` in `ctl stats`, `nftsync_inbound_*` in the metrics).

`GatedListener` owns the listening socket: it accepts in batches from the event loop's reader
callback, asks the gate, and only then builds the streams of an admitted connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import resource
import socket
import ssl
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from nftsync.endpoint import format_endpoint
from nftsync.proto import AuthError, ProtocolError, RefuseReason

log = logging.getLogger("nftsync.daemon")

PER_SOURCE = 4  # a peer needs one; two while a reconnect overlaps the old connection
TOTAL = 64  # unauthenticated connections of strangers at once
#: The handshake is three small frames each way: milliseconds on a sync network, and the
#: longest loop pauses measured (~0.5 s, a full GC of a 1M replica) are a tenth of this. It is
#: not peer_timeout (up to an hour), which bounds the silence of a link that proved the key.
HANDSHAKE_DEADLINE_S = 5.0
#: Descriptors kept for everything but inbound sync connections: the control socket's clients
#: (it holds up to 128 waiting), the metrics endpoint's (16), the kernel writers' sockets.
FD_RESERVE = 128
#: What an unlimited RLIMIT_NOFILE is counted as (nothing here uses select(): no 1024 ceiling).
FD_UNLIMITED = 1 << 20
FD_RECOUNT_S = 1.0  # /proc/self/fd is listed at most this often; admissions are added between
FD_RECOUNT_NEAR_S = 0.1  # ... or this often while the estimate says the reserve is reached
ACCEPT_BATCH = 64  # connections accepted per wakeup of the listening socket
EMFILE_PAUSE_S = 1.0  # accept() itself ran out of descriptors: stop accepting this long
LOG_INTERVAL_S = 10.0  # refusals beyond LOG_EACH in an interval are summarised at its end
LOG_EACH = 5
SUMMARY_SOURCES = 3  # sources named in a summary line
MAX_TRACKED_SOURCES = 4096  # sources counted one by one in an interval; more are "others"
MAX_KNOWN = 256  # addresses remembered as having proved the key

#: Causes of a refused or failed inbound connection, in the order summaries list them.
CAUSES = ("source_cap", "total_cap", "fd_reserve", "timeout", "auth", "malformed", "closed",
          "tls")
_CAUSE_TEXT = {
    "source_cap": "over the per-source cap",
    "total_cap": "over the total cap",
    "fd_reserve": "file descriptors kept in reserve",
    "timeout": "handshake timeout",
    "auth": "authentication failed",
    "malformed": "malformed handshake",
    "closed": "closed during the handshake",
    "tls": "TLS handshake failed",
}
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset


def source_of(host: str) -> str:
    """The unit a per-source cap counts: an IPv4 address, or the /64 of an IPv6 one (whoever has
    one IPv6 address usually has its whole /64); an IPv4-mapped address is its IPv4 one."""
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


def cause_of(exc: BaseException) -> str:
    """The counter a failed handshake goes to."""
    if isinstance(exc, ssl.SSLError):
        return "tls"
    if isinstance(exc, TimeoutError) or \
            (isinstance(exc, AuthError) and exc.reason == RefuseReason.TIMEOUT):
        return "timeout"
    if isinstance(exc, AuthError):
        return "auth"
    if isinstance(exc, ProtocolError):
        return "malformed"
    return "closed"  # ConnectionClosed, a reset: it hung up


# --------------------------------------------------------------------------------------------
# File descriptors
# --------------------------------------------------------------------------------------------

class FdBudget:
    """How many descriptors are open, against the limit minus the reserve.

    Counting is cheap: /proc/self/fd is listed at most every FD_RECOUNT_S, and between two
    listings each admission is added and each connection closed after a failed handshake taken
    off (one that proved the key keeps its descriptor). When the estimate says the reserve is
    reached, the list is read again first (at most every FD_RECOUNT_NEAR_S), so a burst of
    short-lived connections is not refused on an estimate alone.
    """

    def __init__(self, reserve: int = FD_RESERVE, clock: Callable[[], float] = time.monotonic,
                 limit: int | None = None) -> None:
        self.reserve = reserve
        self.clock = clock
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0] if limit is None else limit
        self.soft = soft if soft != resource.RLIM_INFINITY else FD_UNLIMITED
        self.limit = self.soft
        self._counted = 0
        self._counted_at = -1e9
        self._added = 0

    def open_now(self, max_age: float = FD_RECOUNT_S) -> int:
        now = self.clock()
        if now - self._counted_at >= max_age:
            with contextlib.suppress(OSError):  # no /proc: keep the estimate
                self._counted = len(os.listdir("/proc/self/fd"))
                self._added = 0
            self._counted_at = now
        return max(0, self._counted + self._added)

    def room(self) -> bool:
        """May one more inbound connection be held?"""
        bound = self.limit - self.reserve
        return self.open_now() < bound or self.open_now(FD_RECOUNT_NEAR_S) < bound

    def took(self) -> None:
        self._added += 1

    def gave_back(self) -> None:
        self._added -= 1

    def as_dict(self) -> dict[str, int]:
        return {"open": self.open_now(), "limit": self.limit, "soft_limit": self.soft,
                "reserve": self.reserve}


# --------------------------------------------------------------------------------------------
# Bounded logging
# --------------------------------------------------------------------------------------------

@dataclass
class _Window:
    suppressed: Counter[str] = field(default_factory=Counter)  # by cause
    sources: Counter[str] = field(default_factory=Counter)
    others: int = 0  # suppressed events from sources beyond MAX_TRACKED_SOURCES
    logged: int = 0
    started: float = 0.0


class RefusalLog:
    """The first LOG_EACH refusals of an interval get a line each; the others are counted and
    summarised in one line when the interval ends. A flood is a few lines every LOG_INTERVAL_S.
    """

    def __init__(self, logger: logging.Logger = log, interval: float = LOG_INTERVAL_S,
                 each: int = LOG_EACH, clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.interval, self.each, self.clock = logger, interval, each, clock
        self._w: _Window | None = None
        self._timer: asyncio.TimerHandle | None = None

    def note(self, cause: str, source: str, level: int, msg: str, *args: object) -> None:
        now = self.clock()
        w = self._w
        if w is not None and now - w.started >= self.interval:
            self.flush()
            w = None
        if w is None:
            w = self._w = _Window(started=now)
        if w.logged < self.each:
            w.logged += 1
            self.logger.log(level, msg, *args)
            return
        w.suppressed[cause] += 1
        if source in w.sources or len(w.sources) < MAX_TRACKED_SOURCES:
            w.sources[source] += 1
        else:
            w.others += 1
        self._schedule(w.started + self.interval - now)

    def _schedule(self, delay: float) -> None:
        if self._timer is not None:
            return
        with contextlib.suppress(RuntimeError):  # no running loop: the next note() flushes
            self._timer = asyncio.get_running_loop().call_later(max(0.0, delay), self.flush)

    def flush(self) -> None:
        """End the interval: one summary line if anything went unlogged."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        w, self._w = self._w, None
        if w is None or not w.suppressed:
            return
        total = sum(w.suppressed.values())
        span = min(self.interval, max(self.clock() - w.started, 0.0))
        causes = ", ".join(f"{w.suppressed[c]:,} {_CAUSE_TEXT.get(c, c)}"
                           for c in [*CAUSES, *sorted(set(w.suppressed) - set(CAUSES))]
                           if w.suppressed[c])
        top = w.sources.most_common(SUMMARY_SOURCES)
        rest = len(w.sources) - len(top)
        where = ", ".join(f"{s} ({n:,})" for s, n in top)
        if rest or w.others:
            where += f" and {rest + (1 if w.others else 0):,}{'+' if w.others else ''} " \
                     "other source(s)"
        self.logger.warning("refused %s more inbound connection(s) in the last %.0f s, not "
                            "logged one by one: %s; from %s", f"{total:,}", span, causes, where)


# --------------------------------------------------------------------------------------------
# The gate
# --------------------------------------------------------------------------------------------

@dataclass
class Ticket:
    """One admitted connection in its unauthenticated phase."""

    host: str
    source: str
    known: bool  # from an address that proved the key before: outside the total cap
    address: str  # ADDR:PORT, for log lines
    open: bool = True


class Gate:
    """Caps, deadline, descriptor budget and counters of the unauthenticated phase."""

    def __init__(self, per_source: int = PER_SOURCE, total: int = TOTAL,
                 deadline: float = HANDSHAKE_DEADLINE_S, fds: FdBudget | None = None,
                 refusals: RefusalLog | None = None) -> None:
        self.per_source, self.total, self.deadline = per_source, total, deadline
        self.fds = fds if fds is not None else FdBudget()
        self.log = refusals if refusals is not None else RefusalLog()
        self.by_source: Counter[str] = Counter()
        self.strangers = 0  # unauthenticated connections counted against `total`
        self.refused: Counter[str] = Counter({c: 0 for c in CAUSES})
        self.authenticated = 0
        self.peak = 0  # most unauthenticated connections at once
        self._configured: set[str] = set()
        self._learned: dict[str, None] = {}  # insertion-ordered, bounded by MAX_KNOWN
        self._fd_logged_at = -1e9

    # -- known sources -------------------------------------------------------------------------
    def set_peers(self, hosts: Iterable[str]) -> None:
        """The configured peers' addresses (host names are learned when they prove the key)."""
        self._configured = {source_of(h) for h in hosts}

    def learn(self, host: str) -> None:
        src = source_of(host)
        self._learned.pop(src, None)
        self._learned[src] = None
        while len(self._learned) > MAX_KNOWN:
            del self._learned[next(iter(self._learned))]

    def known(self, source: str) -> bool:
        return source in self._configured or source in self._learned

    # -- the unauthenticated phase -------------------------------------------------------------
    @property
    def unauthenticated(self) -> int:
        return sum(self.by_source.values())

    def admit(self, host: str, port: int) -> Ticket | None:
        """A new connection from host:port: a ticket, or None (refused, counted, logged)."""
        source = source_of(host)
        address = format_endpoint(host, port)
        known = self.known(source)
        if not self.fds.room():
            self._refuse_fd(source, address)
            return None
        if self.by_source[source] >= self.per_source:
            self._refuse("source_cap", source, address,
                         f"{self.per_source} unauthenticated connections from {source} already")
            return None
        if not known and self.strangers >= self.total:
            self._refuse("total_cap", source, address,
                         f"{self.total} unauthenticated connections already")
            return None
        self.by_source[source] += 1
        self.strangers += not known
        self.peak = max(self.peak, self.unauthenticated)
        self.fds.took()
        return Ticket(host, source, known, address)

    def passed(self, ticket: Ticket) -> None:
        """The connection proved the key: its address is known from now on."""
        self.release(ticket)
        self.authenticated += 1
        self.learn(ticket.host)

    def failed(self, ticket: Ticket, exc: BaseException) -> str:
        """The handshake failed: one line (rate-bounded) and a count; returns the cause."""
        self.release(ticket)
        self.fds.gave_back()  # the caller closes it
        cause = cause_of(exc)
        self.refused[cause] += 1
        level = logging.ERROR if cause in ("auth", "timeout", "tls") else logging.WARNING
        self.log.note(cause, ticket.source, level, "connection from %s refused: %s",
                      ticket.address, exc or type(exc).__name__)
        return cause

    def release(self, ticket: Ticket) -> None:
        """The connection left the unauthenticated phase (idempotent)."""
        if not ticket.open:
            return
        ticket.open = False
        self.by_source[ticket.source] -= 1
        if self.by_source[ticket.source] <= 0:
            del self.by_source[ticket.source]
        self.strangers -= not ticket.known

    def _refuse(self, cause: str, source: str, address: str, why: str) -> None:
        self.refused[cause] += 1
        self.log.note(cause, source, logging.WARNING, "connection from %s refused: %s (%s)",
                      address, _CAUSE_TEXT[cause], why)

    def _refuse_fd(self, source: str, address: str) -> None:
        self.refused["fd_reserve"] += 1
        now = self.fds.clock()
        if now - self._fd_logged_at >= LOG_INTERVAL_S:  # its own line, once an interval
            self._fd_logged_at = now
            log.warning("file descriptors: %d open of %d, %d kept for the control socket and "
                        "the kernel: inbound connections are refused until some close "
                        "(connection from %s)", self.fds.open_now(), self.fds.limit,
                        self.fds.reserve, address)
        else:
            self.log.note("fd_reserve", source, logging.WARNING,
                          "connection from %s refused: %s", address,
                          _CAUSE_TEXT["fd_reserve"])

    def stats(self) -> dict[str, object]:
        """`inbound` of `ctl stats`."""
        return {"refused": dict(self.refused), "authenticated": self.authenticated,
                "unauthenticated": self.unauthenticated, "unauthenticated_peak": self.peak,
                "limits": {"per_source": self.per_source, "total": self.total,
                           "handshake_deadline_s": self.deadline},
                "fds": self.fds.as_dict()}


# --------------------------------------------------------------------------------------------
# The listening socket
# --------------------------------------------------------------------------------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, Ticket], Awaitable[None]]


class GatedListener:
    """A TCP listener whose connections pass `gate` before any transport or task exists for
    them: a refused one costs an accept() and a close(), nothing else."""

    def __init__(self, gate: Gate, host: str, port: int, handler: Handler,
                 backlog: int = 128) -> None:
        self.gate, self.host, self.port, self.handler = gate, host, port, handler
        self.backlog = backlog
        self.sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._resume: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Bind and listen (an OSError with the plain strerror if that fails)."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:  # as asyncio.start_server did: address reuse, an IPv6 socket for IPv6 only
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((self.host, self.port))
            sock.listen(self.backlog)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        if self.port == 0:
            self.port = self.sock.getsockname()[1]
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.fileno(), self._accept_ready)

    def close(self) -> None:
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        if self.sock is not None and self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
        self.gate.log.flush()  # what a summary would have said at the end of its interval
        # Connections being served finish on their own: a handshake within its deadline, a
        # link when Links.close() closes it.

    def _accept_ready(self) -> None:
        assert self.sock is not None
        for _ in range(ACCEPT_BATCH):
            try:
                conn, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause(exc)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue  # that one is gone already
                raise
            ticket = self.gate.admit(str(addr[0]), int(addr[1]))
            if ticket is None:
                with contextlib.suppress(OSError):
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                conn.close()
                continue
            task = asyncio.ensure_future(self._serve(conn, ticket))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _pause(self, exc: OSError) -> None:
        """accept() found no descriptor: the budget was outrun (by other parts of the process,
        or another process for ENFILE). Stop accepting for EMFILE_PAUSE_S."""
        assert self.sock is not None and self._loop is not None
        self.gate.refused["fd_reserve"] += 1
        self.gate.log.note("fd_reserve", "(not accepted)", logging.ERROR,
                           "cannot accept inbound connections: %s; trying again in %.0f s",
                           exc.strerror or exc, EMFILE_PAUSE_S)
        self._loop.remove_reader(self.sock.fileno())
        self._resume = self._loop.call_later(EMFILE_PAUSE_S, self._unpause)

    def _unpause(self) -> None:
        self._resume = None
        if self.sock is not None and self._loop is not None:
            self._loop.add_reader(self.sock.fileno(), self._accept_ready)

    async def _serve(self, conn: socket.socket, ticket: Ticket) -> None:
        """Streams for an admitted connection, made as asyncio.start_server makes them (a
        protocol with a connected callback: StreamWriter.start_tls is then server-side), and
        the handler run on them."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(loop=loop)
        done = loop.create_future()

        def connected(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            done.set_result(w)

        protocol = asyncio.StreamReaderProtocol(reader, connected)
        try:
            try:
                await loop.connect_accepted_socket(lambda: protocol, sock=conn)
            except OSError as exc:
                conn.close()
                self.gate.failed(ticket, exc)
                return
            await self.handler(reader, await done, ticket)
        except Exception:  # a bug must not go unseen in a task nobody awaits
            log.exception("inbound connection from %s", ticket.address)
        finally:
            self.gate.release(ticket)  # a handler that ended without saying how
