"""The Prometheus endpoint without root: its text (parsed back, and by `promtool check metrics`
when Prometheus' tools are installed), its figures against `ctl stats`, the connection count's
reading of packed conntrack entries, and HTTP requests good and bad against a real listening
server of a daemon object that is not run."""

from __future__ import annotations

import asyncio
import math
import re
import shutil
import socket
import subprocess
import time

import pytest

from nftsync import __version__
from nftsync.conntrack import CtEntry
from nftsync.daemon import metrics
from nftsync.daemon.config import DaemonConfig
from nftsync.daemon.core import Daemon
from nftsync.daemon.farms import FarmView
from nftsync.daemon.metrics import ConnectionCount, MetricsServer, render
from nftsync.daemon.peer import PeerLink
from nftsync.daemon.promtext import Exposition, Histogram, escape_label, format_value
from nftsync.model import Farm, MapRef, Role, SessionMap
from nftsync.proto import PROTOCOL_VERSION

# -- a small parser of the text format: what Prometheus reads ---------------------------------
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    """{(name, labels): value}; asserts the structure Prometheus requires (HELP and TYPE once
    per family, before its samples, no family interleaved, no sample twice)."""
    assert text.endswith("\n")
    out: dict[tuple[str, frozenset], float] = {}
    types: dict[str, str] = {}
    current = ""
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split(" ")[2]
            assert name not in types, f"family {name} twice"
            current = name
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name == current and kind in ("counter", "gauge", "histogram")
            types[name] = kind
        else:
            m = _SAMPLE.match(line)
            assert m, line
            name, labels_text, value = m.group(1), m.group(3) or "", m.group(4)
            base = re.sub(r"_(bucket|sum|count)$", "", name) if types.get(current) == \
                "histogram" else name
            assert base == current, f"{name} outside its family {current}"
            labels = frozenset((k, v.encode().decode("unicode_escape"))
                               for k, v, _ in _LABEL.findall(labels_text))
            key = (name, labels)
            assert key not in out, f"{line}: twice"
            out[key] = float(value.replace("+Inf", "inf"))
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


# -- fixtures -----------------------------------------------------------------------------------
WEB = Farm("web", backends={0x200: "10.20.0.11", 0x201: "10.20.0.12"})
WEB.maps[Role.SESSIONS] = SessionMap(MapRef("ip", "nftsync_web", "web_sessions"), Role.SESSIONS,
                                     "web", ("ipv4_addr",), "mark", timeout=120, size=1000)
WEB.maps[Role.STATIC] = SessionMap(MapRef("ip", "nftsync_web", "web_static"), Role.STATIC,
                                   "web", ("ipv4_addr",), "mark")
MAIL = Farm("mail", backends={0x300: "10.20.1.11"})
MAIL.maps[Role.SESSIONS] = SessionMap(MapRef("ip", "nftsync_mail", "mail_sessions"),
                                      Role.SESSIONS, "mail", ("ipv4_addr",), "mark", timeout=60)


def ct(i: int, mark: int, v6: bool = False) -> CtEntry:
    if v6:
        client, vip, backend = (bytes(15) + bytes([i]), bytes(15) + b"\x64",
                                bytes(15) + b"\x0b")
        return CtEntry(socket.AF_INET6, socket.IPPROTO_TCP, client, vip, 40000 + i, 80,
                       backend, client, 80, 40000 + i, mark=mark, timeout=300, tcp_state=3)
    client = bytes([10, 10, 1, i])
    return CtEntry(socket.AF_INET, socket.IPPROTO_TCP, client, bytes([10, 10, 0, 100]),
                   40000 + i, 80, bytes([10, 20, 0, 11]), client, 80, 40000 + i, mark=mark,
                   status=0x18e, timeout=300, tcp_state=3)


def daemon() -> Daemon:
    """A daemon object with two farms, sessions, connections and a peer link with traffic
    figures, as the kernel and a peer would have made them (nothing is run)."""
    d = Daemon(DaemonConfig(key=b"k" * 32, node_id=1, node_name="lb1", role="active"))
    d.replicator.view = FarmView.build({"web": WEB, "mail": MAIL}, None)
    d.replicator._set_policies()
    rep = d.replica
    now, wall = time.monotonic(), int(time.time() * 1000)
    for i in range(7):
        rep.local_session("web/sessions", bytes([10, 10, 1, i]), 0x200 + i % 2, now + 100, now,
                          wall)
    rep.local_session("web/static", bytes([10, 10, 2, 1]), 0x201, None, now, wall)
    for i in range(3):
        rep.local_session("mail/sessions", bytes([10, 10, 3, i]), 0x300, now + 50, now, wall)
    for i in range(5):
        rep.local_ct(ct(i, 0x200), now + 300, now, wall)
    rep.local_ct(ct(9, 0x201, v6=True), now + 300, now, wall)
    for i in range(2):
        rep.local_ct(ct(20 + i, 0x300), now + 300, now, wall)
    rep.refused["unknown_backend"] = 4
    link = PeerLink(d.replicator, "10.30.0.2:7777", "10.30.0.2", 7777)
    link.state = "up"
    link.stats.sent, link.stats.received, link.stats.applied = 12, 30, 29
    for lag in (0.0004, 0.003, 0.003, 2.0):
        link.stats.lag_s.observe(lag)
    link.stats.snapshot_received_s.observe(0.2)
    link.pending[b"k"] = object()  # type: ignore[assignment]
    d.links.dialled[link.name] = link
    d.links.dialled["10.30.0.3:7777"] = PeerLink(d.replicator, "10.30.0.3:7777", "10.30.0.3",
                                                 7777)
    d.loop_watch.record(0.5)
    d.loop_watch.record(7.0)
    return d


# -- the format -------------------------------------------------------------------------------
def test_histogram_counts_by_upper_bound_inclusive() -> None:
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 1.0, 3.0):
        h.observe(v)
    assert h.cumulative() == [(0.1, 2), (1.0, 4), (math.inf, 5)]
    assert h.count == 5 and h.sum == pytest.approx(4.65)
    with pytest.raises(ValueError):
        Histogram((1.0, 0.5))


def test_values_and_labels_are_written_as_prometheus_reads_them() -> None:
    assert [format_value(v) for v in (3, 2.0, 0.25, math.inf, -math.inf, True)] == \
        ["3", "2", "0.25", "+Inf", "-Inf", "1"]
    assert format_value(math.nan) == "NaN"
    assert escape_label('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    x = Exposition()
    x.metric("t_total", "counter", "help\nwith a newline", [({"peer": 'x"y'}, 1)])
    assert parse(x.text()) == {("t_total", frozenset({("peer", 'x"y')})): 1.0}
    with pytest.raises(ValueError, match="twice"):
        x.family("t_total", "counter", "again")
    with pytest.raises(ValueError, match="_total"):
        x.family("t_count", "counter", "a counter without _total")
    with pytest.raises(ValueError, match="label"):
        x.metric("u", "gauge", "h", [({"bad-label": "1"}, 1)])


# -- the figures ------------------------------------------------------------------------------
def test_the_exposition_says_what_ctl_says() -> None:
    d = daemon()

    async def scrape() -> str:
        return render(d, await ConnectionCount().refresh(d.replica.conntrack))

    text = asyncio.run(scrape())
    s = parse(text)
    stats, status, peers = d.stats(), d.status(), {p["name"]: p for p in d.peers()}
    assert value(s, "nftsync_build_info", version=__version__,
                 protocol=str(PROTOCOL_VERSION)) == 1
    assert value(s, "nftsync_health", state=status["health"]) == 1
    assert sum(v for (n, _), v in s.items() if n == "nftsync_health") == 1
    assert value(s, "nftsync_role", role="active") == 1
    # Sessions per map are `sessions` of ctl stats, by map id.
    for map_id, labels in (("web/sessions", {"farm": "web", "map": "web_sessions",
                                             "kind": "sessions"}),
                           ("web/static", {"farm": "web", "map": "web_static", "kind": "static"}),
                           ("mail/sessions", {"farm": "mail", "map": "mail_sessions",
                                              "kind": "sessions"})):
        assert value(s, "nftsync_sessions", **labels) == stats["sessions"][map_id]
    assert stats["sessions"]["web/sessions"] == 7
    assert value(s, "nftsync_map_size_limit", farm="web", map="web_sessions",
                 kind="sessions") == 1000
    assert ("nftsync_map_size_limit", frozenset({("farm", "mail"), ("map", "mail_sessions"),
                                                  ("kind", "sessions")})) not in s
    # Connections: the total is ctl's; per farm by mark, the IPv6 entry included.
    assert value(s, "nftsync_conntrack_entries") == stats["conntrack"] == 8
    assert value(s, "nftsync_connections", farm="web") == 6
    assert value(s, "nftsync_connections", farm="mail") == 2
    # Peers: state, queue and counters as in ctl peers; the lag histogram.
    p = "10.30.0.2:7777"
    assert value(s, "nftsync_peer_up", peer=p) == 1
    assert value(s, "nftsync_peer_up", peer="10.30.0.3:7777") == 0
    assert value(s, "nftsync_peer_state", peer="10.30.0.3:7777", state="down") == 1
    assert value(s, "nftsync_peer_send_queue", peer=p) == peers[p]["queued"] == 1
    assert value(s, "nftsync_peer_records_sent_total", peer=p) == peers[p]["sent"]
    assert value(s, "nftsync_peer_records_applied_total", peer=p) == peers[p]["applied"]
    lag = "nftsync_peer_replication_lag_seconds"
    assert value(s, lag + "_bucket", peer=p, le="0.001") == 1
    assert value(s, lag + "_bucket", peer=p, le="0.005") == 3
    assert value(s, lag + "_bucket", peer=p, le="+Inf") == value(s, lag + "_count", peer=p) == 4
    assert value(s, lag + "_sum", peer=p) == pytest.approx(2.0064)
    assert value(s, "nftsync_peer_snapshot_receive_duration_seconds_count", peer=p) == 1
    assert value(s, "nftsync_peer_records_refused_total", cause="unknown_backend") == \
        stats["refused"]["unknown_backend"]
    # Loop pauses: ctl's cumulative histogram, in seconds.
    for le_ms, n in stats["loop"]["le_ms"].items():
        le = "+Inf" if le_ms == "+Inf" else format_value(int(le_ms) / 1000)
        assert value(s, "nftsync_loop_pause_seconds_bucket", le=le) == n
    assert value(s, "nftsync_gc_collections_total", generation="0") == \
        stats["gc"]["gen0"]["collections"]
    if shutil.which("promtool"):  # Prometheus' own linter (CI installs it: scripts/setup.sh)
        p = subprocess.run(["promtool", "check", "metrics"], input=text, text=True,
                           capture_output=True, timeout=30)
        assert p.returncode == 0, p.stdout + p.stderr


def test_the_connection_count_reads_the_mark_of_packed_entries() -> None:
    """CT_MARK_AT is an offset into the replica's packed form: any other layout gives other
    marks here (IPv4 and IPv6 entries have different bodies, same head)."""
    d = daemon()
    by_mark = asyncio.run(ConnectionCount().refresh(d.replica.conntrack))
    assert by_mark == {0x200: 5, 0x201: 1, 0x300: 2}


def test_a_recent_count_is_reused() -> None:
    d = daemon()
    count = ConnectionCount()

    async def twice() -> tuple[dict, dict]:
        first = dict(await count.refresh(d.replica.conntrack))
        d.replica.local_ct(ct(40, 0x200), time.monotonic() + 300, time.monotonic(),
                           int(time.time() * 1000))
        return first, await count.refresh(d.replica.conntrack)

    first, second = asyncio.run(twice())
    assert first == second  # within CT_COUNT_MIN_AGE_S: not counted again
    count.counted_at = -1e9
    assert asyncio.run(count.refresh(d.replica.conntrack))[0x200] == 6


# -- HTTP ---------------------------------------------------------------------------------------
async def _exchange(port: int, data: bytes, half_close: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    if half_close:
        writer.write_eof()
    try:
        async with asyncio.timeout(10):
            return await reader.read()
    finally:
        writer.close()


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer else 0


def test_http_requests_good_and_bad(monkeypatch) -> None:
    monkeypatch.setattr(metrics, "REQUEST_TIMEOUT_S", 0.5)
    d = daemon()

    async def run() -> dict[str, bytes]:
        server = MetricsServer(d, "127.0.0.1", 0)
        await server.start()
        port, out = server.port, {}
        try:
            get = b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: text/plain\r\n\r\n"
            out["ok"] = await _exchange(port, get)
            out["query"] = await _exchange(port, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n")
            out["404"] = await _exchange(port, b"GET / HTTP/1.1\r\n\r\n")
            out["405"] = await _exchange(port, b"POST /metrics HTTP/1.1\r\n"
                                               b"Content-Length: 3\r\n\r\nabc")
            out["garbage"] = await _exchange(port, b"\x16\x03\x01\x02\x00\x01\x00\r\n\r\n")
            out["noversion"] = await _exchange(port, b"GET /metrics\r\n\r\n")
            out["http2"] = await _exchange(port, b"GET /metrics HTTP/2.0\r\n\r\n")
            out["huge"] = await _exchange(port, b"GET /metrics HTTP/1.1\r\nX: " +
                                          b"a" * 20000 + b"\r\n\r\n")
            out["truncated"] = await _exchange(port, b"GET /metrics HTTP/1.1\r\nHost")
            out["empty"] = await _exchange(port, b"")
            # Sends half a request and waits: closed after REQUEST_TIMEOUT_S, no answer.
            out["slow"] = await _exchange(port, b"GET /metr", half_close=False)
            # Many at once, each silent: the ones over MAX_CLIENTS are closed at once.
            conns = [await asyncio.open_connection("127.0.0.1", port)
                     for _ in range(metrics.MAX_CLIENTS + 4)]
            out["crowd"] = b"".join([await asyncio.wait_for(r.read(), 5) for r, _ in conns])
            for _, w in conns:
                w.close()
            out["after"] = await _exchange(port, get)
            out["bad_requests"] = str(server.bad_requests).encode()
        finally:
            await server.close()
        return out

    out = asyncio.run(run())
    head, _, body = out["ok"].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Content-Type: text/plain; version=0.0.4; charset=utf-8" in head
    assert int(re.search(rb"Content-Length: (\d+)", head).group(1)) == len(body)
    assert value(parse(body.decode()), "nftsync_sessions", farm="web", map="web_sessions",
                 kind="sessions") == 7
    assert _status(out["query"]) == 200
    assert _status(out["404"]) == 404
    assert _status(out["405"]) == 405 and b"Allow: GET\r\n" in out["405"]
    assert _status(out["garbage"]) == 400
    assert _status(out["noversion"]) == 400
    assert _status(out["http2"]) == 505
    assert _status(out["huge"]) == 431
    assert _status(out["truncated"]) == 400
    assert out["empty"] == b"" and out["slow"] == b"" and out["crowd"] == b""
    after = parse(out["after"].partition(b"\r\n\r\n")[2].decode())
    assert _status(out["after"]) == 200  # the server is unharmed
    # 7 refused with a status, and the ones too slow to send a request: "slow" and the crowd
    # that got a slot (MAX_CLIENTS of them; the others were closed at once, uncounted).
    refused = 7 + 1 + metrics.MAX_CLIENTS
    assert value(after, "nftsync_metrics_bad_requests_total") == refused == int(out["bad_requests"])
    assert value(after, "nftsync_metrics_scrapes_total") == 2


def test_a_taken_port_is_one_clear_error() -> None:
    d = daemon()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(Exception, match=rf"cannot listen for metrics on 127.0.0.1:{port}: "
                           "Address already in use"):
            asyncio.run(MetricsServer(d, "127.0.0.1", port).start())
