"""sd_notify from the standard library (nftsync.daemon.notify): real datagram sockets, no root.

The daemon-level behaviour (READY only once listening, keep-alives that stop with the loop) is
in tests/kernel/test_readiness.py; here the protocol itself: addresses (path, abstract), the
datagram's lines, the watchdog's interval and owner, and that a failing send never raises.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from nftsync.daemon.notify import Notifier, notify_address, watchdog_interval


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.settimeout(5.0)
    yield sock, path
    sock.close()


def _fields(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_addresses() -> None:
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_address("@nftsync/x") == b"\0nftsync/x"
    assert notify_address("vsock:2:1234") is None


def test_unset_is_a_no_op() -> None:
    n = Notifier({})
    assert not n.enabled
    assert n.send("READY=1") is False
    n.ready("x")
    n.stopping()
    assert n.sent == 0 and n.interval is None


def test_ready_status_and_stopping(listener) -> None:
    sock, path = listener
    n = Notifier({"NOTIFY_SOCKET": path})
    n.ready("ok: 1/1 peers up")
    assert _fields(sock) == ["READY=1", "STATUS=ok: 1/1 peers up"]
    n.status("ok: 1/1 peers up")  # unchanged: not sent again
    n.status("degraded: 0/1 peers up")
    assert _fields(sock) == ["STATUS=degraded: 0/1 peers up"]
    n.reloading()
    fields = _fields(sock)
    assert fields[0] == "RELOADING=1" and fields[1].startswith("MONOTONIC_USEC=")
    n.stopping()
    assert _fields(sock)[0] == "STOPPING=1"
    assert n.sent == 4
    n.close()


def test_abstract_address() -> None:
    name = f"nftsync-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5.0)
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.send("READY=1")
        assert _fields(sock) == ["READY=1"]
        n.close()
    finally:
        sock.close()


def test_watchdog_interval_and_owner() -> None:
    pid = os.getpid()
    assert watchdog_interval({"WATCHDOG_USEC": "10000000"}, pid) == 5.0
    assert watchdog_interval({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(pid)}, pid) == 5.0
    # meant for another process (we inherited the environment): not ours to feed
    assert watchdog_interval({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(pid + 1)},
                             pid) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}, pid) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}, pid) is None
    assert watchdog_interval({}, pid) is None


def test_watchdog_task_sends_keepalives(listener) -> None:
    sock, path = listener
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "40000"})  # every 20 ms
    assert n.interval == pytest.approx(0.02)

    async def main() -> None:
        task = asyncio.create_task(n.watchdog())
        try:
            got = 0
            loop = asyncio.get_running_loop()
            while got < 3:
                data = await asyncio.wait_for(loop.sock_recv(sock, 4096), 5.0)
                assert data == b"WATCHDOG=1"
                got += 1
        finally:
            task.cancel()

    sock.setblocking(False)
    asyncio.run(main())


def test_send_error_is_logged_once_and_never_raises(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="nftsync")
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert n.enabled
    assert n.send("READY=1") is False
    assert n.send("STATUS=x") is False
    assert n.failed == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cannot notify systemd" in warnings[0].getMessage()


def test_unusable_address_is_said_and_disabled(caplog) -> None:
    n = Notifier({"NOTIFY_SOCKET": "vsock:2:9"})
    assert not n.enabled
    assert "not a path or an abstract" in caplog.text
