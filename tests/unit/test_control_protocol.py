"""The control socket and `nftsync ctl`, over a real unix socket in a temporary directory (no root).

`FakeDaemon` below is a test double for what sits *behind* the socket (the daemon core's control
operations, with their documented result shapes), so that the transport can be tested on its own:
framing, limits, errors, socket file handling and the ctl output and exit codes. The real daemon
behind it: tests/kernel/test_control.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nftsync.daemon import control
from nftsync.daemon.control import ControlError, ControlServer, DaemonNotRunning
from nftsync.errors import NftsyncError

NFTSYNC = [sys.executable, "-m", "nftsync"]


class FakeDaemon:
    """The core's control interface with canned data; records the calls it gets."""

    def __init__(self) -> None:
        self.role = "backup"
        self.health = "ok"
        self.calls: list[tuple[str, dict]] = []

    def status(self) -> dict:
        self.calls.append(("status", {}))
        return {"node": "lb1", "node_id": 11, "cluster": "prod", "role": self.role,
                "health": self.health,
                "reasons": [] if self.health == "ok" else ["peer lb2 is down: refused"],
                "uptime_s": 3725.5, "farms": ["web"], "peers_up": 1, "peers_total": 2}

    def peers(self) -> list[dict]:
        self.calls.append(("peers", {}))
        return [{"name": "10.0.0.2:7777", "node_name": "lb2", "node_id": 12,
                 "address": "10.0.0.2:7777", "state": "up", "since_s": 61.0, "last_error": "",
                 "sent": 10, "received": 20, "applied": 19,
                 "lag_ms": {"p50": 0.4, "p99": 2.5, "last": 0.3}, "resnapshots": 0,
                 "auth_failures": 0},
                {"name": "10.0.0.3:7777", "node_name": None, "node_id": None,
                 "address": "10.0.0.3:7777", "state": "connecting", "since_s": 3.0,
                 "last_error": "Connection refused", "sent": 0, "received": 0, "applied": 0,
                 "lag_ms": None, "resnapshots": 0, "auth_failures": 2}]

    def control_ops(self) -> dict:
        return {"status": self.status, "peers": self.peers, "stats": self.stats,
                "resync": self.resync, "promote": self.promote, "demote": self.demote,
                "show": self.show}

    def stats(self) -> dict:
        self.calls.append(("stats", {}))
        return {"counters": {"ct_events": 5, "auth_failures": 2}, "conntrack": 3,
                "peers": {"lb2": {"sent": 10}}, "last_error": ""}

    async def resync(self, peer: str | None = None) -> dict:
        self.calls.append(("resync", {"peer": peer}))
        await asyncio.sleep(0)
        if peer == "nope":
            raise NftsyncError("no peer 'nope' (peers: lb2)")
        return {"resync": [peer or "lb2"]}

    def promote(self) -> dict:
        old, self.role = self.role, "active"
        self.calls.append(("promote", {}))
        return {"role": "active", "was": old}

    def demote(self) -> dict:
        old, self.role = self.role, "backup"
        self.calls.append(("demote", {}))
        return {"role": "backup", "was": old}

    def show(self, farm: str | None = None, limit: int = 100) -> dict:
        self.calls.append(("show", {"farm": farm, "limit": limit}))
        if farm == "crash":
            raise RuntimeError("a bug in the core")
        entries = [{"client": f"10.10.1.{i}", "backend": "0x200", "expires_s": 90.0,
                    "origin": 11, "updated_ms": 1} for i in range(min(limit, 3))]
        return {"farms": {"web": {"sessions": {"count": 3, "entries": entries}}},
                "conntrack": 7}


class Served:
    """A ControlServer running on its own event loop in a thread, for blocking clients."""

    def __init__(self, path: str, daemon: Any) -> None:
        self.path = path
        self.daemon = daemon
        self.loop = asyncio.new_event_loop()
        self.server = ControlServer(daemon.control_ops(), path)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> Served:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / "run" / "nftsync.sock")


@pytest.fixture
def served(sock_path: str) -> Iterator[Served]:
    with Served(sock_path, FakeDaemon()) as s:
        yield s


def raw(path: str, data: bytes, timeout: float = 5.0) -> list[dict]:
    """Send raw bytes, read response lines until the server closes or goes quiet."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        buf = b""
        # A server that hangs up with our bytes unread makes the kernel report ECONNRESET
        # after the data it sent: that is the end of the stream too.
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                buf += chunk
    return [json.loads(line) for line in buf.splitlines()]


# --- protocol -------------------------------------------------------------------------------

def test_every_command_round_trips(served: Served) -> None:
    p = served.path
    assert control.call(p, "status")["health"] == "ok"
    assert [r["node_name"] for r in control.call(p, "peers")] == ["lb2", None]
    assert control.call(p, "stats")["conntrack"] == 3
    assert control.call(p, "resync") == {"resync": ["lb2"]}
    assert control.call(p, "resync", {"peer": "lb9"}) == {"resync": ["lb9"]}
    assert control.call(p, "promote") == {"role": "active", "was": "backup"}
    assert control.call(p, "demote") == {"role": "backup", "was": "active"}
    shown = control.call(p, "show", {"farm": "web", "limit": 2})
    assert len(shown["farms"]["web"]["sessions"]["entries"]) == 2
    ping = control.call(p, "ping")
    assert ping["pid"] == os.getpid()
    assert [c[0] for c in served.daemon.calls] == [
        "status", "peers", "stats", "resync", "resync", "promote", "demote", "show"]
    assert served.daemon.calls[7] == ("show", {"farm": "web", "limit": 2})


def test_async_client_and_pipelined_requests(served: Served) -> None:
    async def go() -> Any:
        return await control.request(served.path, "status", None, timeout=5)
    assert asyncio.run(go())["node"] == "lb1"
    # several requests on one connection: one response each, in order
    lines = raw(served.path, b'{"cmd":"status"}\n{"cmd":"promote","args":{}}\n\n'
                b'{"cmd":"demote"}\n')
    assert [r["ok"] for r in lines] == [True, True, True]
    assert lines[1]["result"]["role"] == "active" and lines[2]["result"]["role"] == "backup"


def test_daemon_errors_are_error_responses(served: Served) -> None:
    with pytest.raises(ControlError, match=r"^no peer 'nope' \(peers: lb2\)$"):
        control.call(served.path, "resync", {"peer": "nope"})
    # an exception inside the daemon (a bug) is reported and does not kill the server
    with pytest.raises(ControlError, match="internal error in show: RuntimeError: a bug in"):
        control.call(served.path, "show", {"farm": "crash"})
    assert control.call(served.path, "status")["node"] == "lb1"


@pytest.mark.parametrize("line,error", [
    (b"garbage\n", "malformed request: expected one JSON object per line"),
    (b"\xff\xfe\n", "malformed request: expected one JSON object per line"),
    (b"[" * 60000 + b"\n", "malformed request: expected one JSON object per line"),
    (b'["status"]\n', 'malformed request: expected {"cmd": NAME'),
    (b'{"cmd": 5}\n', 'malformed request: expected {"cmd": NAME'),
    (b'{"cmd": "status", "x": 1}\n', "malformed request: unknown field(s) x"),
    (b'{"cmd": "reboot"}\n', "unknown command 'reboot' (one of: ping, status, peers, stats, "
                             "resync, promote, demote, show)"),
    (b'{"cmd": "status", "args": [1]}\n', "status: args must be a JSON object"),
    (b'{"cmd": "status", "args": {"v": 1}}\n', "status: unknown argument 'v' (accepted: none)"),
    (b'{"cmd": "show", "args": {"limit": "9"}}\n',
     "show: argument 'limit' must be an integer in 1..100000"),
    (b'{"cmd": "show", "args": {"limit": 0}}\n',
     "show: argument 'limit' must be an integer in 1..100000"),
    (b'{"cmd": "resync", "args": {"peer": ""}}\n',
     "resync: argument 'peer' must be a string of 1..255 characters"),
])
def test_bad_requests_get_errors_and_server_survives(served: Served, line: bytes,
                                                     error: str) -> None:
    (resp,) = raw(served.path, line)
    assert resp["ok"] is False
    assert resp["error"].startswith(error), resp
    assert control.call(served.path, "status")["node"] == "lb1"


def test_huge_line_is_refused_and_next_client_served(served: Served) -> None:
    resp = raw(served.path, b'{"cmd": "status", "pad": "' + b"x" * 200_000 + b'"}\n')
    assert resp == [{"ok": False, "error": "request larger than 65536 bytes"}]
    # a client that sends a huge line and never a newline, then vanishes
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(served.path)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(b"y" * 100_000)
    assert control.call(served.path, "status")["node"] == "lb1"
    # the client refuses to send oversized requests itself
    with pytest.raises(ControlError, match="request larger than 65536 bytes"):
        control.call(served.path, "resync", {"peer": "p" * 70_000})


def test_clients_that_hang_up_early(served: Served) -> None:
    for i in range(50):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(served.path)
            if i % 2:
                s.sendall(b'{"cmd":"show","args":{"limit":3}}\n')  # gone before the answer
            else:
                s.sendall(b'{"cmd":"sta')  # gone in the middle of a request
    assert control.call(served.path, "status")["node"] == "lb1"


def test_too_many_clients(served: Served, monkeypatch) -> None:
    monkeypatch.setattr(control, "SLOT_WAIT", 0.3)
    held = []
    try:
        for _ in range(control.MAX_CLIENTS):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(served.path)
            s.sendall(b'{"cmd":"ping"}\n')
            s.settimeout(5)
            assert json.loads(s.recv(65536))["ok"]  # connected and being served
            held.append(s)
        (resp,) = raw(served.path, b'{"cmd":"status"}\n')
        assert resp == {"ok": False, "error": "too many control connections (at most 32)"}
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 10
    while True:  # the server notices the closed connections; then it serves again
        try:
            assert control.call(served.path, "status")["node"] == "lb1"
            break
        except ControlError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_idle_and_non_reading_clients_are_dropped(served: Served, monkeypatch) -> None:
    monkeypatch.setattr(control, "CLIENT_IDLE", 0.3)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as idle:
        idle.settimeout(10)
        idle.connect(served.path)
        assert idle.recv(1) == b""  # closed by the server, without a request
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as greedy:
        greedy.settimeout(10)
        greedy.connect(served.path)
        # requests whose answers it never reads: the server's send buffer fills, it gives up
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for _ in range(200):
                greedy.sendall(b'{"cmd":"status"}\n' * 100)
        deadline = time.monotonic() + 10
        while served.server._clients and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not served.server._clients
    assert control.call(served.path, "status")["node"] == "lb1"


def test_burst_waits_for_a_slot(served: Served, monkeypatch) -> None:
    monkeypatch.setattr(control, "SLOT_WAIT", 10.0)
    held = []
    try:
        for _ in range(control.MAX_CLIENTS):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            s.connect(served.path)
            s.sendall(b'{"cmd":"ping"}\n')
            assert json.loads(s.recv(65536))["ok"]
            held.append(s)
        result: list[Any] = []
        waiter = threading.Thread(
            target=lambda: result.append(control.call(served.path, "status", timeout=20)))
        waiter.start()
        time.sleep(0.3)
        assert not result  # waiting: every slot is taken
        held.pop().close()  # one client leaves: the waiting one is served
        waiter.join(20)
        assert result and result[0]["node"] == "lb1"
    finally:
        for s in held:
            s.close()


# --- socket file ----------------------------------------------------------------------------

def test_permissions(served: Served) -> None:
    st = os.stat(served.path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(served.path)).st_mode) == 0o750


def test_socket_removed_on_close(sock_path: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as idle:
        with Served(sock_path, FakeDaemon()):
            assert os.path.exists(sock_path)
            idle.connect(sock_path)  # a connected client does not keep the server open
            idle.sendall(b'{"cmd":"ping"}\n')
            idle.settimeout(5)
            assert json.loads(idle.recv(65536))["ok"]
        assert idle.recv(1) == b""
    assert not os.path.exists(sock_path)
    with pytest.raises(DaemonNotRunning, match=f"^no daemon is listening on {sock_path}: "):
        control.call(sock_path, "status")


def test_stale_socket_is_replaced(sock_path: str) -> None:
    os.makedirs(os.path.dirname(sock_path))
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(sock_path)  # a daemon that died without removing its socket
    dead.close()
    os.chmod(sock_path, 0o777)
    with pytest.raises(DaemonNotRunning):
        control.call(sock_path, "status")
    with Served(sock_path, FakeDaemon()) as s:
        assert control.call(s.path, "status")["node"] == "lb1"
        # a new socket (inode numbers get reused, so tell it by its mode)
        assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o600


def test_live_socket_refuses_second_server(served: Served) -> None:
    async def second() -> None:
        await ControlServer(FakeDaemon().control_ops(), served.path).start()
    with pytest.raises(ControlError, match=rf"^another nftsync daemon \(pid {os.getpid()}\) is "
                       rf"already listening on {served.path}: stop it first"):
        asyncio.run(second())
    assert control.call(served.path, "status")["node"] == "lb1"  # the first is untouched


def test_non_socket_file_is_not_removed(sock_path: str) -> None:
    os.makedirs(os.path.dirname(sock_path))
    Path(sock_path).write_text("precious")
    with pytest.raises(ControlError, match="exists and is not a socket"):
        asyncio.run(ControlServer(FakeDaemon().control_ops(), sock_path).start())
    assert Path(sock_path).read_text() == "precious"


# --- nftsync ctl ----------------------------------------------------------------------------

def ctl(path: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*NFTSYNC, "ctl", "--socket", path, *args], capture_output=True,
                          text=True, timeout=60)


def test_ctl_without_daemon(tmp_path: Path) -> None:
    path = str(tmp_path / "none.sock")
    r = ctl(path, "status")
    assert r.returncode == 3
    assert r.stdout == ""
    assert r.stderr == (f"nftsync: error: no daemon is listening on {path}: start it with "
                        "`nftsync daemon --config /etc/nftsync/nftsync.toml` (or `systemctl "
                        "start nftsync`), or give its --socket\n")
    r = ctl(path, "peers")
    assert r.returncode == 3 and r.stderr.count("\n") == 1


def test_ctl_outputs_and_status_exit_codes(served: Served) -> None:
    p = served.path
    r = ctl(p, "status")
    assert r.returncode == 0, r.stderr
    assert "health    ok" in r.stdout and "uptime    1h02m05s" in r.stdout
    served.daemon.health = "degraded"
    r = ctl(p, "status", "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["health"] == "degraded"
    served.daemon.health = "failing"
    r = ctl(p, "status")
    assert r.returncode == 2 and "- peer lb2 is down: refused" in r.stdout

    r = ctl(p, "peers")
    assert r.returncode == 0, r.stderr
    header, up, connecting = r.stdout.splitlines()
    assert header.split()[:6] == ["NAME", "NODE", "ID", "ADDRESS", "STATE", "SINCE"]
    assert "lb2" in up and "1m01s ago" in up and "0.4/2.5ms" in up
    assert "Connection refused" in connecting

    r = ctl(p, "show", "--farm", "web", "--limit", "2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "farm web, sessions map: 3 entries (first 2 shown)"
    assert "10.10.1.1" in r.stdout and "10.10.1.2" not in r.stdout
    assert r.stdout.rstrip().endswith("conntrack entries: 7")

    r = ctl(p, "resync", "--peer", "nope")
    assert r.returncode == 1 and r.stderr == "nftsync: error: no peer 'nope' (peers: lb2)\n"
    r = ctl(p, "promote", "--json")
    assert json.loads(r.stdout)["role"] == "active"
    r = ctl(p, "stats")
    assert r.returncode == 0 and "ct_events" in r.stdout


def test_status_exit_codes_while_starting_and_syncing(served: Served) -> None:
    for health in ("starting", "syncing"):
        served.daemon.health = health
        r = ctl(served.path, "status")
        assert r.returncode == 1 and f"health    {health}" in r.stdout, (r.stdout, r.stderr)


class Healths(FakeDaemon):
    """A daemon whose health moves on one step each time `status` is asked."""

    def __init__(self, *healths: str) -> None:
        super().__init__()
        self.healths = list(healths)

    def status(self) -> dict:
        if len(self.healths) > 1:
            self.health = self.healths.pop(0)
        else:
            self.health = self.healths[0]
        out = super().status()
        out["sync"] = {"peers_applied": 0 if self.health == "syncing" else 1, "peers": 1,
                       "waiting": [], "kernel_queued": 3}
        return out


@pytest.mark.parametrize(("healths", "code", "asked"), [
    (("starting", "syncing", "syncing", "ok"), 0, 4),
    (("syncing", "degraded"), 1, 2),
    (("starting", "failing"), 2, 2),
    (("ok",), 0, 1),
])
def test_wait_ready_ends_with_the_health(sock_path: str, healths, code: int, asked: int) -> None:
    daemon = Healths(*healths)
    with Served(sock_path, daemon):
        r = ctl(sock_path, "status", "--wait-ready", "--timeout", "60", "--json")
    assert r.returncode == code, (r.stdout, r.stderr)
    assert json.loads(r.stdout)["health"] == healths[-1]
    assert [c for c, _ in daemon.calls].count("status") == asked
    assert r.stderr == ""  # no progress line off a terminal


def test_wait_ready_timeout_is_its_own_code(sock_path: str) -> None:
    with Served(sock_path, Healths("syncing")):
        r = ctl(sock_path, "status", "--wait-ready", "--timeout", "1")
    assert r.returncode == 4, (r.stdout, r.stderr)
    assert "health    syncing" in r.stdout
    assert r.stderr == "nftsync: error: the daemon is still syncing after 1 s\n"


def test_wait_ready_waits_for_a_daemon_to_answer(tmp_path: Path) -> None:
    path = str(tmp_path / "late.sock")
    r = ctl(path, "status", "--wait-ready", "--timeout", "1")
    assert r.returncode == 3 and r.stderr.startswith("nftsync: error: no daemon is listening")
    # ... and takes one that comes up while it waits
    proc = subprocess.Popen([*NFTSYNC, "ctl", "--socket", path, "status", "--wait-ready",
                             "--timeout", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        time.sleep(1.0)  # a few polls with no daemon
        with Served(path, Healths("syncing", "ok")):
            out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, (out, err)


def test_timeout_without_wait_ready_is_a_usage_error(served: Served) -> None:
    r = ctl(served.path, "status", "--timeout", "5")
    assert r.returncode == 2 and "--timeout SECONDS is for --wait-ready" in r.stderr
    assert not served.daemon.calls


class Resyncing(FakeDaemon):
    """After `resync`, lb2's snapshot arrives over a few `peers` calls, then is applied."""

    def __init__(self) -> None:
        super().__init__()
        self.step = -1  # no resync asked yet

    async def resync(self, peer: str | None = None) -> dict:
        self.step = 0
        return await super().resync(peer)

    def peers(self) -> list[dict]:
        rows = super().peers()[:1]
        receiving, applied = None, 4
        if self.step >= 0:
            self.step += 1
            if self.step < 4:
                receiving = 50_000 * self.step
            else:
                applied = 5
        rows[0].update(name="lb2", snapshots_applied=applied, snapshot_receiving=receiving)
        return rows


def test_resync_progress_on_a_terminal_only(sock_path: str) -> None:
    import pty

    daemon = Resyncing()
    with Served(sock_path, daemon):
        primary, secondary = pty.openpty()
        try:
            proc = subprocess.run([*NFTSYNC, "ctl", "--socket", sock_path, "resync"],
                                  stdout=subprocess.PIPE, stderr=secondary, text=True,
                                  timeout=60)
            os.close(secondary)
            secondary = -1
            err = b""
            with contextlib.suppress(OSError):  # EIO once the pty's other side is closed
                while chunk := os.read(primary, 4096):
                    err += chunk
        finally:
            os.close(primary)
            if secondary >= 0:
                os.close(secondary)
        assert proc.returncode == 0 and "lb2" in proc.stdout
        text = err.decode()
        assert "resync, 0/1 snapshots applied, entries received: 50,000" in text, text
        assert [c for c, _ in daemon.calls].count("peers") >= 5
        daemon.calls.clear()
        r = ctl(sock_path, "resync", "--json")  # a script: the answer at once, nothing else
        assert r.returncode == 0 and r.stderr == ""
        assert [c for c, _ in daemon.calls] == ["resync"]


# --- logging --------------------------------------------------------------------------------

LOG_SNIPPET = """
import logging
from nftsync.daemon.service import setup_logging
setup_logging("info")
log = logging.getLogger("nftsync.test")
log.debug("hidden")
log.info("peer lb2: up")
log.error("two\\nlines")
"""


def _log_lines(journal: bool) -> list[str]:
    r, w = os.pipe()
    try:
        st = os.fstat(w)
        env = dict(os.environ)
        env.pop("JOURNAL_STREAM", None)
        if journal:  # what systemd sets: the device and inode of the stream it connected
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        proc = subprocess.Popen([sys.executable, "-c", LOG_SNIPPET], stderr=w, env=env)
        os.close(w)
        w = -1
        with os.fdopen(r, "rb") as f:
            r = -1
            out = f.read().decode()
        assert proc.wait(timeout=30) == 0
    finally:
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)
    return out.splitlines()


def test_journal_log_format() -> None:
    assert _log_lines(journal=True) == ["<6>INFO: nftsync.test: peer lb2: up",
                                        "<3>ERROR: nftsync.test: two", "<3>lines"]
    plain = _log_lines(journal=False)
    assert len(plain) == 3 and plain[0].endswith(" INFO nftsync.test: peer lb2: up")
    assert plain[0][:4].isdigit()  # a timestamp first when not under journald


# --- end to end: the real daemon ------------------------------------------------------------
