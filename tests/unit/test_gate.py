"""The admission gate for inbound sync connections (issue 13, "bounded exposure"): caps per
source and in total, the known peers' lane, the fixed handshake deadline, the descriptor reserve,
and the bounded log (a line each for the first few refusals, then one summary an interval).

The pure parts with a fake clock; the listener with real sockets on the loopback (127.0.0.x
sources: every 127/8 address is local on Linux), so the caps are checked on real connections
that the kernel resets. No root.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import socket

import pytest
from test_daemon_logs import _free_port, _node, _up

from nftsync.daemon import gate as gate_mod
from nftsync.daemon.gate import (
    CAUSES,
    FdBudget,
    Gate,
    GatedListener,
    RefusalLog,
    Ticket,
    cause_of,
    source_of,
)
from nftsync.proto import (
    AuthError,
    Channel,
    ConnectionClosed,
    Identity,
    ProtocolError,
    RefuseReason,
)

BOUND = 30.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _gate(per_source: int = 4, total: int = 64, **kw) -> Gate:
    fds = FdBudget(reserve=0, limit=1 << 20)  # no descriptor pressure unless a test wants it
    return Gate(per_source, total, fds=fds, **kw)


# -- the pure parts ------------------------------------------------------------------------------

@pytest.mark.parametrize(("host", "source"), [
    ("10.0.0.9", "10.0.0.9"),
    ("fd00:1:2:3::9", "fd00:1:2:3::/64"),
    ("fd00:1:2:3:ffff:ffff:ffff:ffff", "fd00:1:2:3::/64"),
    ("::ffff:10.0.0.9", "10.0.0.9"),  # a v4 client of a dual-stack socket
    ("fe80::1%eth0", "fe80::/64"),
])
def test_source_of(host, source):
    assert source_of(host) == source


@pytest.mark.parametrize(("exc", "cause"), [
    (TimeoutError(), "timeout"),
    (AuthError("handshake timed out after 5.0s", RefuseReason.TIMEOUT), "timeout"),
    (AuthError("peer's proof is wrong"), "auth"),
    (ProtocolError("bad magic"), "malformed"),
    (ConnectionClosed("peer closed the connection"), "closed"),
    (ConnectionResetError(), "closed"),
])
def test_cause_of(exc, cause):
    assert cause_of(exc) == cause


def test_per_source_and_total_caps():
    g = _gate(per_source=2, total=5)
    a = [g.admit("10.0.0.1", 1000 + i) for i in range(3)]
    assert a[0] and a[1] and a[2] is None  # the third from one address is refused
    others = [g.admit(f"10.0.1.{i}", 1) for i in range(5)]
    assert sum(t is not None for t in others) == 3  # 2 + 3 = the total of 5
    assert g.refused["source_cap"] == 1 and g.refused["total_cap"] == 2
    assert g.unauthenticated == 5
    g.release(a[0])
    g.release(a[0])  # idempotent
    assert g.unauthenticated == 4
    assert g.admit("10.0.2.1", 1) is not None  # a slot is free again
    assert g.admit("10.0.2.2", 1) is None


def test_known_peers_are_outside_the_total_cap_but_not_the_per_source_one():
    g = _gate(per_source=2, total=3)
    g.set_peers(["10.0.0.2", "lb3.example"])
    for i in range(3):
        assert g.admit(f"10.9.0.{i}", 1)  # strangers fill the total
    assert g.admit("10.9.0.9", 1) is None
    p1, p2 = g.admit("10.0.0.2", 1), g.admit("10.0.0.2", 2)
    assert p1 and p2 and p1.known  # the configured peer still gets in ...
    assert g.admit("10.0.0.2", 3) is None  # ... within its own per-source cap
    assert g.refused["source_cap"] == 1
    # lb3.example is a name: its address is learned once a connection from it proves the key.
    g.release(p1)
    t = g.admit("fd00::7", 1)
    assert t is None  # a stranger, and the total is full
    g2 = _gate(per_source=2, total=1)
    first = g2.admit("fd00::7", 1)
    assert first and not first.known
    g2.passed(first)
    assert g2.authenticated == 1 and g2.unauthenticated == 0
    g2.admit("10.9.9.9", 1)  # a stranger takes the only slot
    again = g2.admit("fd00::8", 2)  # the same /64 as the peer that proved the key
    assert again is not None and again.known


def test_fd_reserve_refuses_before_the_limit():
    clock = Clock()
    fds = FdBudget(reserve=10, clock=clock, limit=10_000)
    open_now = fds.open_now()
    fds.limit = open_now + 13  # room for 3 more before the reserve
    g = Gate(100, 100, fds=fds)
    got = [g.admit("10.0.0.1", i) for i in range(5)]
    # admissions count until /proc/self/fd is listed again (at most once a second)
    assert [t is not None for t in got] == [True, True, True, False, False]
    assert g.refused["fd_reserve"] == 2
    assert g.stats()["fds"]["limit"] == open_now + 13
    # Near the reserve the list is read again after 0.1 s, not 1 s: these five admissions
    # opened no descriptor, so there is room again.
    clock.now += 0.1
    assert g.admit("10.0.0.2", 1) is not None
    # A failed handshake gives its descriptor back at once, without a new listing.
    before = fds.open_now()
    for t in got[:3]:
        g.failed(t, ProtocolError("bad magic"))
    assert fds.open_now() == before - 3


def test_fd_limit_is_the_soft_limit():
    assert FdBudget(limit=65536).limit == 65536
    assert FdBudget(limit=300).limit == 300
    assert FdBudget(limit=resource.RLIM_INFINITY).limit == gate_mod.FD_UNLIMITED


def test_refusal_log_is_bounded_and_summarised(caplog):
    caplog.set_level(logging.DEBUG, logger="nftsync")
    clock = Clock()
    rlog = RefusalLog(logging.getLogger("nftsync.daemon"), interval=10.0, each=5, clock=clock)
    g = _gate(per_source=1, total=1000, refusals=rlog)
    g.admit("10.0.0.9", 1)
    for i in range(1200):
        g.admit("10.0.0.9", 2 + i)  # over the per-source cap
    for i in range(30):
        t = g.admit(f"10.0.1.{i}", 1)
        assert t is not None
        g.failed(t, AuthError("handshake timed out after 5.0s", RefuseReason.TIMEOUT))
    for i in range(4):
        t = g.admit("10.0.2.1", i)
        g.failed(t, ProtocolError("bad magic"))
    assert len(caplog.records) == 5  # the first five, one line each
    assert caplog.records[0].getMessage().startswith("connection from 10.0.0.9:2 refused: over "
                                                     "the per-source cap")
    clock.now += 10.0
    rlog.flush()
    assert len(caplog.records) == 6
    summary = caplog.records[-1].getMessage()
    assert summary == ("refused 1,229 more inbound connection(s) in the last 10 s, not logged "
                       "one by one: 1,195 over the per-source cap, 30 handshake timeout, 4 "
                       "malformed handshake; from 10.0.0.9 (1,195), 10.0.2.1 (4), 10.0.1.0 (1) "
                       "and 29 other source(s)")
    assert g.refused["source_cap"] == 1200 and g.refused["timeout"] == 30
    assert set(g.stats()["refused"]) == set(CAUSES)
    # A new interval logs its first refusals again, and a quiet one says nothing.
    rlog.flush()
    g.admit("10.0.0.9", 1)
    assert len(caplog.records) == 7


def test_one_line_per_failed_handshake_even_when_it_is_not_an_auth_error(caplog):
    """Bytes that are no frame: the channel logs nothing at INFO, the gate one line."""
    caplog.set_level(logging.DEBUG, logger="nftsync")
    records = asyncio.run(asyncio.wait_for(_bad_bytes(), BOUND))
    shown = [r.getMessage() for r in records if r.levelno >= logging.INFO]
    assert len(shown) == 1, shown
    assert shown[0].startswith("connection from 127.0.0.1:") and " refused: " in shown[0]


async def _bad_bytes() -> list[logging.LogRecord]:
    handler = _Collect()
    logging.getLogger("nftsync").addHandler(handler)
    try:
        stop = asyncio.Event()
        port = _free_port("127.0.0.1")
        links = _node(1, "127.0.0.1", port, [], b"k" * 32, stop)
        await links.start()
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"GET / HTTP/1.0\r\n\r\n" + bytes(64))
            await w.drain()
            await _until(lambda: links.gate.refused["malformed"] == 1)
            w.close()
        finally:
            stop.set()
            await links.close()
    finally:
        logging.getLogger("nftsync").removeHandler(handler)
    return handler.records


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def _until(cond, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


# -- real connections on the loopback -------------------------------------------------------------

def _silent(src: str, port: int, n: int) -> list[socket.socket]:
    out = []
    for _ in range(n):
        s = socket.socket()
        s.bind((src, 0))
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):  # completes in the background
            s.connect(("127.0.0.1", port))
        out.append(s)
    return out


async def _closed_by_peer(s: socket.socket, timeout: float) -> bool:
    """Did the other end close or reset `s` within `timeout`?"""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            data = await loop.sock_recv(s, 1)
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    return data == b""


def test_listener_resets_over_the_caps_at_once_and_times_out_the_rest():
    seen: dict[str, object] = {}

    async def main() -> None:
        g = _gate(per_source=4, total=6)
        g.deadline = 0.5

        async def handler(reader, writer, ticket: Ticket) -> None:
            try:  # a handshake that never comes: the deadline ends it
                async with asyncio.timeout(g.deadline):
                    await reader.read(1)
            except TimeoutError as exc:
                g.failed(ticket, exc)
            writer.close()

        lst = GatedListener(g, "127.0.0.1", 0, handler)
        lst.start()
        socks = _silent("127.0.0.2", lst.port, 10) + _silent("127.0.0.3", lst.port, 4)
        try:
            await _until(lambda: sum(g.refused.values()) >= 8)
            seen["peak"] = g.unauthenticated
            # refused ones are closed at once, admitted ones only after the deadline
            early = [await _closed_by_peer(s, 0.05) for s in socks]
            seen["early"] = early
            late = [await _closed_by_peer(s, 3.0) for s in socks]
            seen["late"] = late
            seen["refused"] = dict(g.refused)
            seen["left"] = g.unauthenticated
        finally:
            for s in socks:
                s.close()
            lst.close()

    asyncio.run(asyncio.wait_for(main(), BOUND))
    assert seen["peak"] == 6
    # 127.0.0.2: 4 admitted, 6 over the per-source cap; 127.0.0.3: 2 admitted, 2 over the total
    assert seen["refused"]["source_cap"] == 6 and seen["refused"]["total_cap"] == 2
    assert sum(seen["early"]) == 8, seen["early"]
    assert all(seen["late"])
    assert seen["refused"]["timeout"] == 6 and seen["left"] == 0


def test_a_real_peer_connects_while_strangers_fill_every_slot(caplog):
    """Strangers from 40 addresses hold every unauthenticated slot (silent connections); the
    configured peer dials from its own address and is up at once, and the strangers' refusals
    are a few lines, not one each."""
    caplog.set_level(logging.INFO, logger="nftsync")
    key = b"k" * 32
    seen: dict[str, object] = {}

    async def main() -> None:
        stop = asyncio.Event()
        p1, p2 = _free_port("127.0.0.1"), _free_port("127.0.0.1")
        a = _node(1, "127.0.0.1", p1, [p2], key, stop, reconnect_min=30.0)
        b = _node(2, "127.0.0.1", p2, [], key, stop)
        await b.start()
        b.gate.set_peers(["127.0.0.1"])  # what b's own `peers` would say
        socks = [s for i in range(40) for s in _silent(f"127.0.1.{i + 1}", p2, 4)]
        try:
            await _until(lambda: b.gate.refused["total_cap"] >= 160 - 64)
            seen["strangers"] = b.gate.unauthenticated
            await a.start()
            await _until(lambda: _up(a) == 1 and _up(b) == 1)
            seen["inbound"] = b.gate.stats()
        finally:
            stop.set()
            for s in socks:
                s.close()
            await a.close()
            await b.close()

    asyncio.run(asyncio.wait_for(main(), BOUND))
    assert seen["strangers"] == 64
    assert seen["inbound"]["authenticated"] == 1
    assert seen["inbound"]["refused"]["total_cap"] == 96
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) <= gate_mod.LOG_EACH + 1, [r.getMessage() for r in refusals]


def test_wrong_key_strangers_are_counted_as_auth_failures():
    async def main() -> dict:
        stop = asyncio.Event()
        port = _free_port("127.0.0.1")
        b = _node(2, "127.0.0.1", port, [], b"k" * 32, stop)
        await b.start()
        try:
            for i in range(3):
                with pytest.raises(AuthError):
                    await Channel.connect("127.0.0.1", port, Identity("lab", 10 + i, "x"),
                                          b"w" * 32, timeout=5.0)
            await _until(lambda: b.gate.refused["auth"] == 3)
            return b.gate.stats()
        finally:
            stop.set()
            await b.close()

    stats = asyncio.run(asyncio.wait_for(main(), BOUND))
    assert stats["refused"]["auth"] == 3 and stats["unauthenticated"] == 0
    assert stats["limits"]["handshake_deadline_s"] == gate_mod.HANDSHAKE_DEADLINE_S


def test_ctl_stats_and_the_metrics_say_the_same_counts():
    from test_metrics import daemon, parse, value

    from nftsync.daemon.metrics import render

    d = daemon()
    g = d.links.gate
    g.fds = FdBudget(reserve=0, limit=1 << 20)
    g.per_source = 1
    g.admit("10.0.0.9", 1)
    for i in range(3):
        g.admit("10.0.0.9", 2 + i)
    t = g.admit("10.0.0.8", 1)
    g.failed(t, ProtocolError("bad magic"))
    stats = d.stats()["inbound"]
    assert stats["refused"]["source_cap"] == 3 and stats["refused"]["malformed"] == 1
    assert stats["unauthenticated"] == 1
    s = parse(render(d, {}))
    for cause in CAUSES:
        assert value(s, "nftsync_inbound_refused_total", cause=cause) == stats["refused"][cause]
    assert value(s, "nftsync_inbound_unauthenticated") == 1
    assert value(s, "nftsync_inbound_authenticated_total") == 0
    assert value(s, "nftsync_fd_limit") == stats["fds"]["limit"]
    assert value(s, "nftsync_open_fds") > 0
