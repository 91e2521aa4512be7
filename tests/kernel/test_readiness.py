"""Readiness (issue 12): sd_notify under a real notify socket, the `starting` and `syncing`
health states, `ctl status --wait-ready`, snapshot log lines and versions, on the real kernel.

Two namespaces of their own (`rdy-<id>-a`, `-b`) joined by a veth, rulesets/large.nft in both,
daemons on port 7793. The test plays systemd: it binds a datagram socket, gives the daemon
NOTIFY_SOCKET and WATCHDOG_USEC, and reads what arrives.

* A starts beside a big conntrack table (entries of the farm's marks, `conntrack -R`): while it
  reads them, before it listens, `ctl status` answers `starting` with the read's progress and
  `ctl promote` answers; READY=1 arrives only once A accepts connections on its peer port;
* its peer B is not running: A is `syncing` for the grace, then `failing` (a pair with no
  peer), not syncing forever; `--wait-ready` ends with that health's code;
* B comes up, played by the test with the real protocol (nftsync.proto), so that its snapshot
  can be held half-sent: A is `syncing` (saying how far B's snapshot got) until B ends it and
  its sessions are in A's kernel map, then `ok` (checked in the kernel at that moment); the
  log says the snapshot was sent, received and applied; each side learns the other's version
  (NODE_INFO) and `ctl peers` shows it;
* WATCHDOG=1 keep-alives arrive, stop while A is SIGSTOPped, come back after SIGCONT;
  STOPPING=1 on SIGTERM.

Waits are bounded; no duration is asserted (a stopped loop is checked by the absence of
keep-alives over many of their intervals).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import netns
import pytest
from daemons import DaemonProc, make_key, wait_for
from helpers import RULESETS

from nftsync import __version__
from nftsync.daemon import control
from nftsync.netlink.setdump import SetElemDump
from nftsync.proto import (
    FLAG_IGNORABLE,
    OP_ADD,
    PROTOCOL_VERSION,
    Channel,
    ConnectionClosed,
    Heartbeat,
    Identity,
    NodeInfo,
    SessionRecord,
    SnapshotBegin,
    SnapshotChunk,
    SnapshotEnd,
    split_records,
)

PORT = 7793
ADDR = {"a": "10.232.0.1", "b": "10.232.0.2"}
TABLE, MAP = "nftsync_big", "big_sessions"
CT_ENTRIES = 200_000  # conntrack entries in A's table before it starts (nf_conntrack_max 262144)
B_SESSIONS = 20_000  # sessions in B's snapshot to A
B_VERSION = "9.9.9-test"
WATCHDOG_USEC = 400_000  # keep-alives every 0.2 s


class Daemon(DaemonProc):
    port = PORT
    cluster = "rdy"
    start_timeout = 60.0

    def call(self, cmd: str, args: dict | None = None, timeout: float = 30.0):
        return control.call(str(self.socket), cmd, args, timeout)


class Notifications:
    """The systemd end: a datagram socket, and every message received, with its time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, list[str]]] = []
        self.on_ready: list = []  # callbacks run in the reader thread when READY=1 arrives
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = data.decode().split("\n")
            self.messages.append((time.monotonic(), fields))
            if "READY=1" in fields:
                for callback in self.on_ready:
                    callback()

    def fields(self) -> list[list[str]]:
        return [f for _, f in list(self.messages)]

    def count(self, field: str) -> int:
        return sum(field in f for f in self.fields())

    def statuses(self) -> list[str]:
        return [x[len("STATUS="):] for f in self.fields() for x in f if x.startswith("STATUS=")]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def pair_ns() -> Iterator[dict[str, str]]:
    with netns.linked_pair("rdy", ADDR["a"], ADDR["b"], str(RULESETS / "large.nft")) as names:
        yield names


def load_conntrack(ns: str, path: Path, n: int) -> None:
    """n DNATed connections of the farm's marks in `ns`'s table (`conntrack -R`)."""
    lines = []
    for i in range(n):
        src = f"10.{128 + (i >> 16)}.{i >> 8 & 255}.{i & 255}"
        mark, backend = ("0x200", "10.20.0.11") if i % 2 else ("0x201", "10.20.0.12")
        lines.append(f"-A -t 600 -u SEEN_REPLY,ASSURED -s {src} -d 10.10.0.100 -r {backend} "
                     f"-q {src} -p tcp --sport 40000 --dport 80 --reply-port-src 80 "
                     f"--reply-port-dst 40000 --state ESTABLISHED -m {mark}")
    path.write_text("\n".join(lines) + "\n")
    netns.run(ns, "conntrack", "-R", str(path), timeout=300)


def b_client(i: int) -> str:
    return f"10.{160 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}"


class FakePeer:
    """Node 2 ("b") at B's address, played with the real protocol in a thread of its own: it
    accepts A's dial, tells its version, sends half of a snapshot of B_SESSIONS sessions and
    the rest only when `finish()` is called; it reads (and drops) what A sends, keeping what
    A's NODE_INFO said, and sends heartbeats."""

    def __init__(self, ns: str, key: bytes) -> None:
        with netns.entered(ns):
            self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind((ADDR["b"], PORT))
        self.lsock.listen(4)
        self.lsock.setblocking(False)
        self.key = key
        self.half_sent = threading.Event()
        self.a_version: str | None = None
        self.loop = asyncio.new_event_loop()
        self._finish = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self.loop).result(10)

    async def _serve(self) -> None:
        self.server = await asyncio.start_server(self._on_connection, sock=self.lsock)

    async def _on_connection(self, reader, writer) -> None:
        ch = await Channel.accept(reader, writer, Identity("rdy", 2, "b"), self.key, timeout=10)
        for work in (self._read(ch), self._heartbeats(ch)):
            task = asyncio.create_task(work)
            self._tasks.add(task)
        await ch.send(NodeInfo(B_VERSION), FLAG_IGNORABLE)
        wall = int(time.time() * 1000)
        records = [SessionRecord(OP_ADD, "big/sessions",
                                 ipaddress.IPv4Address(b_client(i)).packed, 0x200 + i % 2,
                                 500_000, wall, 2) for i in range(B_SESSIONS)]
        half = B_SESSIONS // 2
        await ch.send(SnapshotBegin(1, 2))
        await ch.send_many([SnapshotChunk(1, c) for c in split_records(records[:half])])
        self.half_sent.set()
        await self._finish.wait()
        await ch.send_many([SnapshotChunk(1, c) for c in split_records(records[half:])])
        await ch.send(SnapshotEnd(1, 2, B_SESSIONS))

    async def _read(self, ch: Channel) -> None:
        try:
            while True:
                msg = await ch.recv()
                if isinstance(msg, NodeInfo):
                    self.a_version = msg.software
        except ConnectionClosed:
            pass

    async def _heartbeats(self, ch: Channel) -> None:
        with contextlib.suppress(ConnectionClosed):
            while not ch.closed:
                await ch.send(Heartbeat(int(time.time() * 1000), 0))
                await asyncio.sleep(0.3)

    def finish(self) -> None:
        self.loop.call_soon_threadsafe(self._finish.set)

    def close(self) -> None:
        async def stop() -> None:
            for task in self._tasks:
                task.cancel()
            self.server.close()

        with contextlib.suppress(Exception):  # the loop may be gone with a failed test
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def kernel_keys(ns: str) -> set[str]:
    with netns.entered(ns):
        dump = SetElemDump("ip", TABLE, MAP)
    return {str(ipaddress.IPv4Address(el.key)) for batch in dump.batches() for el in batch}


def accepts(ns: str, host: str, port: int) -> bool:
    """A TCP connection to host:port from inside `ns` is accepted."""
    with netns.entered(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.settimeout(5)
        s.connect((host, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def test_readiness(pair_ns: dict[str, str], tmp_path: Path) -> None:
    key = make_key(tmp_path)
    conf = tmp_path / "a.toml"
    conf.write_text("[timing]\npeer_timeout = 2.0\n")  # the grace: max(5 s, 2 x peer_timeout)
    conf.chmod(0o600)
    note = Notifications(tmp_path / "notify")
    env = {**os.environ, "NOTIFY_SOCKET": str(note.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    a = Daemon(pair_ns["a"], "a", 1, ADDR["a"], [ADDR["b"]], key, tmp_path, "backup",
               extra=("--config", str(conf)), env=env)
    b: FakePeer | None = None
    listening_at_ready: list[bool] = []
    note.on_ready.append(lambda: listening_at_ready.append(accepts(pair_ns["a"], ADDR["a"],
                                                                   PORT)))
    try:
        load_conntrack(pair_ns["a"], tmp_path / "ct.txt", CT_ENTRIES)

        # -- start-up: the control socket answers during the conntrack read ------------------
        cmd = ["ip", "netns", "exec", a.netns, sys.executable, "-m", "nftsync", "daemon",
               "--listen", f"{ADDR['a']}:{PORT}", "--key-file", str(key), "--socket",
               str(a.socket), "--node-name", "a", "--node-id", "1", "--cluster", "rdy",
               "--peer", f"{ADDR['b']}:{PORT}", "--config", str(conf)]
        with open(a.log, "a") as logf:
            a.proc = subprocess.Popen(cmd, stdout=logf, stderr=logf, stdin=subprocess.DEVNULL,
                                      env=env)
        seen: list[dict] = []
        promoted = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and a.proc.poll() is None:
            try:
                st = a.call("status", timeout=10)
            except control.ControlError:
                time.sleep(0.01)
                continue
            seen.append(st)
            if st["health"] == "starting" and promoted is None and \
                    st["starting"].get("conntrack_read"):
                promoted = a.call("promote", timeout=5)  # keepalived's notify, mid-read
            if st["health"] != "starting":
                break
        starting = [s for s in seen if s["health"] == "starting"]
        print(f"{len(seen)} answers; first: {seen[0] if seen else None}")
        reading = [s for s in starting if s["starting"]["step"] == "reading conntrack"
                   and s["starting"]["conntrack_read"] > 0]
        assert reading, f"no answer during the conntrack read: {[s['health'] for s in seen]}"
        assert reading[0]["reasons"][0].startswith("reading conntrack")
        assert promoted == {"role": "active", "was": "backup"}
        assert seen[-1]["health"] != "starting"

        # READY=1 came once A accepted connections on its peer port, after STATUS=starting.
        wait_for(lambda: note.count("READY=1"), 30, "READY=1")
        # The reader thread counts READY=1 before its callback has tried the port: wait for that.
        wait_for(lambda: listening_at_ready, 10, "the port check made at READY=1")
        assert listening_at_ready == [True]
        statuses = note.statuses()
        assert statuses[0].startswith("starting")
        assert any(s.startswith("starting: reading conntrack (") for s in statuses), statuses
        ready_idx = next(i for i, f in enumerate(note.fields()) if "READY=1" in f)
        assert all("READY=1" not in f for f in note.fields()[ready_idx + 1:])
        log = a.log.read_text()
        assert "listening on" in log

        # -- B is down: syncing for the grace, then failing (a pair without its peer) --------
        st = a.call("status")
        assert st["version"] == __version__ and st["protocol"] == PROTOCOL_VERSION
        assert st["health"] in ("syncing", "failing"), st
        r = subprocess.run([sys.executable, "-m", "nftsync", "ctl", "--socket", str(a.socket),
                            "status", "--wait-ready", "--timeout", "60", "--json"],
                           capture_output=True, text=True, timeout=90)
        assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
        assert json.loads(r.stdout)["health"] == "failing"
        assert any(s.startswith("syncing: 0/1 peers' snapshots applied") for s in
                   note.statuses()) or st["health"] == "failing"
        wait_for(lambda: any(s.startswith("failing") for s in note.statuses()), 10,
                 "STATUS=failing")

        # -- B comes up: syncing while its snapshot is half-sent, ok once it is in the kernel
        b = FakePeer(pair_ns["b"], bytes.fromhex(key.read_text().strip()))
        assert b.half_sent.wait(60), "A never dialled B"
        syncing = wait_for(lambda: (s := a.call("status"))["health"] == "syncing" and
                           "receiving its snapshot" in " ".join(s["reasons"]) and s, 30,
                           "A syncing, B's snapshot half-received")
        assert syncing["sync"]["peers_applied"] == 0 and syncing["sync"]["peers"] == 1
        assert syncing["sync"]["waiting"][0].startswith(f"peer {ADDR['b']}:{PORT}: receiving")
        r = subprocess.run([sys.executable, "-m", "nftsync", "ctl", "--socket", str(a.socket),
                            "status", "--wait-ready", "--timeout", "3"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 4 and "still syncing" in r.stderr, (r.stdout, r.stderr)
        wait_for(lambda: any(s.startswith("syncing: 0/1 peers' snapshots applied") for s in
                             note.statuses()), 10, "STATUS=syncing")
        b.finish()
        r = subprocess.run([sys.executable, "-m", "nftsync", "ctl", "--socket", str(a.socket),
                            "status", "--wait-ready", "--timeout", "120"],
                           capture_output=True, text=True, timeout=150)
        assert r.returncode == 0, (r.stdout, r.stderr)
        # `ok` means B's sessions are in A's kernel, not only in its memory.
        missing = {b_client(i) for i in range(B_SESSIONS)} - kernel_keys(pair_ns["a"])
        assert not missing, f"{len(missing)} of B's sessions not in A's kernel when ok"
        assert "health    ok" in r.stdout and f"version   {__version__}" in r.stdout
        st = a.call("status")
        assert st["health"] == "ok" and st["sync"]["peers_applied"] == 1
        assert st["sync"]["waiting"] == []
        wait_for(lambda: any(s.startswith("ok: 1/1 peers up") for s in note.statuses()), 10,
                 "STATUS=ok")
        log = a.log.read_text()
        peer = f"peer {ADDR['b']}:{PORT}: snapshot epoch 1"
        assert f"{peer} received: {B_SESSIONS} entries" in log, log[-3000:]
        assert f"{peer} applied: {B_SESSIONS} entries, {B_SESSIONS} written" in log
        assert " sent: " in log and "health: ok (was syncing" in log
        peers = a.call("peers")
        assert [(p["version"], p["protocol"]) for p in peers] == [(B_VERSION, PROTOCOL_VERSION)]
        assert b.a_version == __version__

        # -- the watchdog: keep-alives from the loop, none while it is stopped ---------------
        before = note.count("WATCHDOG=1")
        assert before >= 3, before
        wait_for(lambda: note.count("WATCHDOG=1") >= before + 3, 30, "more keep-alives")
        a.proc.send_signal(signal.SIGSTOP)
        try:
            time.sleep(0.3)  # one in flight may still arrive
            stopped = note.count("WATCHDOG=1")
            time.sleep(WATCHDOG_USEC / 1e6 * 10)  # 20 keep-alive intervals
            assert note.count("WATCHDOG=1") == stopped, "keep-alives while the loop was stopped"
        finally:
            a.proc.send_signal(signal.SIGCONT)
        wait_for(lambda: note.count("WATCHDOG=1") >= stopped + 2, 30, "keep-alives again")

        # -- stopping ---------------------------------------------------------------------
        assert a.stop() == 0
        wait_for(lambda: note.count("STOPPING=1"), 10, "STOPPING=1")
    finally:
        a.stop()
        if b is not None:
            b.close()
        note.close()


UNIT_FILE = Path(__file__).parents[2] / "contrib" / "systemd" / "nftsync.service"


def test_unit_file_verifies(tmp_path: Path) -> None:
    """contrib/systemd/nftsync.service passes `systemd-analyze verify`, with its ExecStart
    pointed at this checkout's nftsync (the unit says /usr/bin, where the package puts it) and
    without the man page check (the package installs nftsync-daemon(8))."""
    if not shutil.which("systemd-analyze"):
        pytest.skip("no systemd-analyze")
    unit = UNIT_FILE.read_text()
    assert "Type=notify" in unit and "WatchdogSec=" in unit and "NotifyAccess=main" in unit
    nftsync_bin = Path(sys.executable).parent / "nftsync"
    (tmp_path / "nftsync.service").write_text(unit.replace("/usr/bin/nftsync",
                                                           str(nftsync_bin)))
    r = subprocess.run(["systemd-analyze", "verify", "--man=no",
                        str(tmp_path / "nftsync.service")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


def _systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir() and shutil.which("systemd-run") is not None


@pytest.mark.skipif(not _systemd_running(), reason="systemd is not PID 1")
def test_under_systemd(tmp_path: Path) -> None:
    """The real systemd: a transient Type=notify unit with a watchdog runs the daemon inside a
    namespace of its own (`ip netns exec` keeps the pid, so the daemon is the unit's main
    process). systemd-run returns once READY=1 arrived; the unit's status line is the daemon's;
    a SIGSTOPped daemon is killed by the watchdog (Result=watchdog)."""
    ns = netns.create("rdysd")
    unit = f"nftsync-test-{uuid.uuid4().hex[:8]}"
    key = make_key(tmp_path)
    sock = tmp_path / "d.sock"

    def show(*props: str) -> dict[str, str]:
        out = subprocess.run(["systemctl", "show", unit, *(f"-p{p}" for p in props)],
                             capture_output=True, text=True, timeout=30).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    try:
        netns.run(ns, sys.executable, "-m", "nftsync", "apply", str(RULESETS / "farm.nft"))
        r = subprocess.run(
            ["systemd-run", f"--unit={unit}", "-p", "Type=notify", "-p", "NotifyAccess=main",
             "-p", "WatchdogSec=3", "-p", "TimeoutStartSec=60", "-p", "LimitCORE=0",
             "ip", "netns", "exec", ns, sys.executable, "-m", "nftsync", "daemon",
             "--listen", "127.0.0.1:7794", "--key-file", str(key), "--socket", str(sock),
             "--node-name", "solo"],
            capture_output=True, text=True, timeout=90)
        assert r.returncode == 0, r.stderr
        # systemd-run returned: the start job is done, i.e. READY=1 arrived.
        state = show("ActiveState", "SubState", "StatusText", "MainPID")
        assert (state["ActiveState"], state["SubState"]) == ("active", "running"), state
        # No peers configured, none connected: nothing to wait for.
        wait_for(lambda: show("StatusText")["StatusText"].startswith("ok: 0/0 peers up"), 30,
                 "the daemon's STATUS line in systemctl")
        pid = int(state["MainPID"])
        assert control.call(str(sock), "status")["pid"] == pid
        os.kill(pid, signal.SIGSTOP)
        wait_for(lambda: show("Result")["Result"] == "watchdog", 30,
                 "the watchdog to kill the stopped daemon")
    finally:
        subprocess.run(["systemctl", "stop", unit], capture_output=True, timeout=60)
        subprocess.run(["systemctl", "reset-failed", unit], capture_output=True, timeout=60)
        netns.delete(ns)
