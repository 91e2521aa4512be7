"""The daemon's log lines about addresses and peer links (issue 12): addresses as `host:port` or
`[IPv6]:port`, never a Python tuple; a clean start of a pair logs no WARNING (both sides dial,
one connection replaces the other); a lost link still does; one line per failed handshake.

Two Links on the loopback in one event loop, with a replicator that holds nothing: no root.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from nftsync.daemon.config import DaemonConfig, PeerConfig
from nftsync.daemon.links import Links
from nftsync.endpoint import format_endpoint
from nftsync.proto import Identity

BOUND = 20.0


@pytest.mark.parametrize(("args", "text"), [
    (("10.0.0.1", 7777), "10.0.0.1:7777"),
    (("fd00:77::1", 7777), "[fd00:77::1]:7777"),
    (("lb2.example", 7777), "lb2.example:7777"),
    (("fe80::1%eth0", 7777), "[fe80::1%eth0]:7777"),
    ((("10.0.0.2", 51338),), "10.0.0.2:51338"),  # an AF_INET peername
    ((("fd00:77::2", 51338, 0, 0),), "[fd00:77::2]:51338"),  # an AF_INET6 peername
    ((None,), "unknown address"),  # no peername (the socket is gone)
    (("",), "unknown address"),  # an unnamed Unix socket's peername
    (("/run/nftsync/nftsync.sock",), "/run/nftsync/nftsync.sock"),
])
def test_format_endpoint(args, text):
    assert format_endpoint(*args) == text


def test_configured_peers_and_listen_address_use_it():
    assert str(PeerConfig("fd00:77::1", 7777)) == "[fd00:77::1]:7777"
    assert str(PeerConfig("10.0.0.1", 7777)) == "10.0.0.1:7777"


# -- two Links on the loopback --------------------------------------------------------------------
class _Replicator:
    """Holds nothing: snapshots are empty, whatever arrives is taken."""

    def __init__(self, config: DaemonConfig) -> None:
        self.node_id, self.config = config.node_id, config

    def snapshot_records(self, chunk: int):
        return iter(())

    def apply_remote(self, records, sender: int, in_snapshot: bool) -> tuple[int, int]:
        return len(records), 0

    async def kernel_room(self) -> None:
        return None

    def kernel_queued(self) -> int:
        return 0

    def after_kernel_writes(self, callback) -> None:
        callback()  # no kernel: everything is written


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _hosts() -> list:
    try:
        _free_port("::1")
    except OSError:
        return ["127.0.0.1", pytest.param("::1", marks=pytest.mark.skip("no IPv6 loopback"))]
    return ["127.0.0.1", "::1"]


def _node(node_id: int, host: str, port: int, peers: list[int], key: bytes, stop: asyncio.Event,
          **timing: float) -> Links:
    cfg = DaemonConfig(key, node_id, f"lb{node_id}", listen_host=host, listen_port=port,
                       peers=[PeerConfig(host, p) for p in peers], **timing)
    return Links(cfg, Identity("lab", node_id, f"lb{node_id}"), _Replicator(cfg), stop)


async def _until(cond, what: str, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


def _up(links: Links) -> int:
    return sum(lk.state == "up" for lk in links.all())


def _lines(caplog, level: int = logging.DEBUG) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("nftsync") and r.levelno >= level]


@pytest.mark.parametrize("host", _hosts())
@pytest.mark.parametrize("second_after", [0.0, 0.1])
def test_clean_start_of_a_pair_logs_no_warning(caplog, host, second_after):
    """Both dial; when both connections complete one replaces the other (docs/protocol.md,
    DUPLICATE_PEER): INFO on both sides, not `down (closed)` at WARNING. The lower node id
    starts first, as in the kernel tests' pair; the other order is in the report of issue 12."""
    caplog.set_level(logging.DEBUG, logger="nftsync")
    key = b"k" * 32
    p1, p2 = _free_port(host), _free_port(host)

    async def main() -> None:
        stop = asyncio.Event()
        a = _node(1, host, p1, [p2], key, stop)
        b = _node(2, host, p2, [p1], key, stop)
        await a.start()
        await asyncio.sleep(second_after)
        await b.start()
        try:
            # Until both dialers have had their connection (the one that loses is replaced).
            await _until(lambda: _up(a) == 1 and _up(b) == 1 and
                         "down (replaced by a new connection)" in caplog.text, "replacement")
            await asyncio.sleep(0.5)  # what the replaced connection's peer logs, and any retry
            assert _up(a) == 1 and _up(b) == 1
        finally:
            stop.set()
            await a.close()
            await b.close()

    asyncio.run(asyncio.wait_for(main(), BOUND))
    assert [r.getMessage() for r in _lines(caplog, logging.WARNING)] == []
    text = caplog.text
    assert "down (peer closed the connection: duplicate_peer)" in text
    assert "('" not in text  # no peername tuple


def test_higher_node_first_serves_the_peer_once_and_stops_dialling(caplog):
    """The higher node id starts first: the lower one's dial arrives before the higher one's
    dialer ever reached it and becomes an inbound link, which wins (the lower id initiated it).
    The higher node's dialer then learns that node's id, sees it served and stops dialling
    ("served"): no connection up and down every reconnect_min, and one peer up on each side."""
    caplog.set_level(logging.DEBUG, logger="nftsync")
    key = b"k" * 32
    p1, p2 = _free_port("127.0.0.1"), _free_port("127.0.0.1")
    seen: dict[str, object] = {}

    async def main() -> None:
        stop = asyncio.Event()
        low = _node(1, "127.0.0.1", p1, [p2], key, stop)
        high = _node(2, "127.0.0.1", p2, [p1], key, stop)
        await high.start()
        await asyncio.sleep(0.3)  # its dialer fails to reach lb1 and backs off
        await low.start()
        try:
            await _until(lambda: _up(low) == 1 and _up(high) == 1, "the pair up")
            await asyncio.sleep(1.5)  # several reconnect_min (0.2 s): no redial may happen
            seen["states"] = sorted(lk.state for lk in high.all())
            seen["ups"] = caplog.text.count(": up (node")
            seen["up"] = (_up(low), _up(high))
        finally:
            stop.set()
            await low.close()
            await high.close()

    asyncio.run(asyncio.wait_for(main(), BOUND))
    assert seen["up"] == (1, 1)
    assert seen["states"] == ["served", "up"]  # the dialled link, the inbound one
    assert seen["ups"] <= 4, caplog.text  # each side's link up, and at most one replaced pair


def test_losing_a_working_link_is_still_a_warning(caplog):
    caplog.set_level(logging.INFO, logger="nftsync")
    key = b"k" * 32
    p1, p2 = _free_port("127.0.0.1"), _free_port("127.0.0.1")

    async def main() -> None:
        stop_a, stop_b = asyncio.Event(), asyncio.Event()
        a = _node(1, "127.0.0.1", p1, [p2], key, stop_a, reconnect_min=5.0)
        b = _node(2, "127.0.0.1", p2, [], key, stop_b)
        await b.start()
        await a.start()
        try:
            await _until(lambda: _up(a) == 1 and _up(b) == 1, "the pair up")
            caplog.clear()
            stop_b.set()
            await b.close()  # b stops: a loses its link
            await _until(lambda: _up(a) == 0, "a's link down")
        finally:
            stop_a.set()
            await a.close()

    asyncio.run(asyncio.wait_for(main(), BOUND))
    warnings = [r.getMessage() for r in _lines(caplog, logging.WARNING)]
    assert warnings == [f"peer 127.0.0.1:{p2}: down (peer closed the connection: shutdown)"]
    # b's own side of it: it stopped, which is no failure of its.
    assert "down (stopping)" in caplog.text


@pytest.mark.parametrize("host", _hosts())
def test_an_authentication_failure_is_one_line_with_the_address(caplog, host):
    """A dials B with another key: B logs one line naming A's address, A one naming B's."""
    caplog.set_level(logging.DEBUG, logger="nftsync")
    p1, p2 = _free_port(host), _free_port(host)
    links: dict[str, Links] = {}

    async def main() -> None:
        stop = asyncio.Event()
        a = links["a"] = _node(1, host, p1, [p2], b"a" * 32, stop, reconnect_min=30.0)
        b = links["b"] = _node(2, host, p2, [], b"b" * 32, stop)
        await b.start()
        await a.start()
        try:
            await _until(lambda: a.auth_failures == 1 and b.auth_failures == 1, "both failures")
            await asyncio.sleep(0.2)
        finally:
            stop.set()
            await a.close()
            await b.close()

    asyncio.run(asyncio.wait_for(main(), BOUND))
    dialled = format_endpoint(host, p2)
    lines = _lines(caplog, logging.INFO)
    assert [r.levelno for r in lines] == [logging.ERROR, logging.ERROR], caplog.text
    msgs = sorted(r.getMessage() for r in lines)
    assert msgs[0].startswith("connection from ") and " refused: " in msgs[0], msgs
    src = msgs[0].removeprefix("connection from ").split(" refused: ")[0]
    assert src.startswith(f"[{host}]:" if ":" in host else f"{host}:"), src
    assert msgs[1] == (f"peer {dialled}: authentication failed: peer refused us: auth_failed: "
                       "authentication failed"), msgs
    assert "('" not in caplog.text
