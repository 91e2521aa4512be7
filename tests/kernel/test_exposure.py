"""Bounded exposure to strangers (issue 13): a real pair keeps replicating, its control socket
answers and its log stays short while a stranger floods the sync port.

Three namespaces of their own: A and B (`exp-<id>-a`, `-b`, a veth, rulesets/large.nft in both,
daemons on port 7796), and the stranger C, joined to A by a second veth (10.233.1.0/24: C has
21 addresses there). A runs under a file-descriptor soft limit of 300 (as `ulimit -n 300` in
the shell that starts it), the case of the issue in which `ctl status` stopped answering.

While the test polls (~15 s; FLOOD_S at most), from C:

* 1,000 silent TCP connections to A's sync port, half from one address, half from 20 others,
  each replaced as soon as A closes it (at most MAX_SILENT_OPENS connects in all);
* bogus handshakes from 20 workers, in turn: random bytes, a truncated HELLO (the first bytes
  the project's own client sends, cut short), and a full handshake with the wrong key
  (`nftsync.proto.Channel.connect`), at most MAX_BOGUS attempts in all;

while sessions are added to A's kernel map one by one (`nft add element`, SESSIONS of them) and
`ctl status` is asked of A STATUS_POLLS times. Checked: every session reaches B's kernel map,
every `ctl status` answered with a health (never exit 3, "no daemon"), A's log grew by fewer
than MAX_LOG_LINES lines during the flood, and `ctl stats` counts the refusals by cause.

NFTSYNC_EXPOSURE_CODE=DIR runs the daemons from another source tree (e.g. `git archive` of the
commit before the gate, to see the old code fail). Figures are printed (pytest -s).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import resource
import select
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

from nftsync.proto import Channel, Identity

PORT = 7796
ADDR = {"a": "10.233.0.1", "b": "10.233.0.2"}
A_STRANGER_SIDE = "10.233.1.1"
STRANGER = "10.233.1.2"
STRANGER_MORE = [f"10.233.1.{10 + i}" for i in range(20)]
TABLE, MAP = "nftsync_big", "big_sessions"
FD_LIMIT = 300
FLOOD_S = 40.0  # at most: the flood ends when the polls are done (~15 s)
SILENT = 1000
MAX_SILENT_OPENS = 100_000
REFILL_S = 0.05  # the closed ones are replaced at most this often
BOGUS_WORKERS = 20
MAX_BOGUS = 20_000
SESSIONS = 100
STATUS_POLLS = 30
POLL_EVERY_S = 0.5  # so the flood lasts ~15 s
MAX_LOG_LINES = 100
WAIT = 60.0


class Daemon(DaemonProc):
    port = PORT
    cluster = "exp"
    start_timeout = 60.0


@contextlib.contextmanager
def three_namespaces() -> Iterator[dict[str, str]]:
    """A and B (linked_pair, the farm applied) and C, a stranger on a second link to A."""
    with netns.linked_pair("exp", ADDR["a"], ADDR["b"], str(RULESETS / "large.nft")) as names:
        tag = uuid.uuid4().hex[:6]
        c = f"exp-{tag}-c"
        subprocess.run(["ip", "netns", "add", c], check=True)
        try:
            subprocess.run(["ip", "-n", c, "link", "set", "lo", "up"], check=True)
            dev_a, dev_c = f"expA{tag}", f"expC{tag}"
            subprocess.run(["ip", "link", "add", dev_a, "netns", names["a"], "type", "veth",
                            "peer", "name", dev_c, "netns", c], check=True)
            subprocess.run(["ip", "-n", names["a"], "addr", "add", f"{A_STRANGER_SIDE}/24",
                            "dev", dev_a], check=True)
            for addr in [STRANGER, *STRANGER_MORE]:
                subprocess.run(["ip", "-n", c, "addr", "add", f"{addr}/24", "dev", dev_c],
                               check=True)
            for ns, dev in ((names["a"], dev_a), (c, dev_c)):
                subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
            yield {**names, "c": c}
        finally:
            netns.delete(c)


@contextlib.contextmanager
def fd_soft_limit(n: int) -> Iterator[None]:
    """`ulimit -Sn n` for what this process starts meanwhile (the hard limit is kept)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# --------------------------------------------------------------------------------------------
# The stranger
# --------------------------------------------------------------------------------------------

def silent_connections(ns: str, until: float, done: threading.Event,
                       counts: dict[str, int]) -> None:
    """Keep SILENT connections open to A's sync port, replacing each one A closes."""
    open_: dict[int, socket.socket] = {}
    poller = select.poll()
    with netns.entered(ns):
        try:
            while time.monotonic() < until and not done.is_set() and \
                    counts["opened"] < MAX_SILENT_OPENS:
                while len(open_) < SILENT and counts["opened"] < MAX_SILENT_OPENS:
                    n = counts["opened"]
                    src = STRANGER if n % 2 == 0 else STRANGER_MORE[(n // 2) % 20]
                    s = socket.socket()
                    s.setblocking(False)
                    s.bind((src, 0))
                    with contextlib.suppress(BlockingIOError):
                        s.connect((A_STRANGER_SIDE, PORT))
                    counts["opened"] += 1
                    open_[s.fileno()] = s
                    poller.register(s, select.POLLIN | select.POLLERR | select.POLLHUP)
                for fd, _ in poller.poll(100):  # readable: A closed or reset it
                    s = open_.pop(fd)
                    poller.unregister(fd)
                    s.close()
                    counts["closed_by_a"] += 1
                time.sleep(REFILL_S)
        finally:
            for s in open_.values():
                s.close()


async def _capture_hello() -> bytes:
    """The first bytes the project's client sends (its HELLO), caught by a local listener."""
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(4096)
        if not got.done():
            got.set_result(data)
        writer.close()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    with contextlib.suppress(Exception):
        await Channel.connect("127.0.0.1", port, Identity("exp", 99, "stranger"), b"w" * 32,
                              timeout=2.0)
    srv.close()
    return await asyncio.wait_for(got, 5.0)


async def _bogus(until: float, done: threading.Event, counts: dict[str, int]) -> None:
    hello = await _capture_hello()
    assert len(hello) > 8
    rng = random.Random(13)

    async def one(kind: int, src: str) -> None:
        if kind == 2:  # a whole handshake, with the wrong key
            with contextlib.suppress(Exception):
                await Channel.connect(A_STRANGER_SIDE, PORT,
                                      Identity("exp", 1000 + rng.randrange(1000), "stranger"),
                                      rng.randbytes(32), timeout=3.0)
            return
        payload = rng.randbytes(rng.randrange(16, 512)) if kind == 0 else \
            hello[:rng.randrange(1, len(hello))]
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(3.0):
                reader, writer = await asyncio.open_connection(A_STRANGER_SIDE, PORT,
                                                               local_addr=(src, 0))
                try:
                    writer.write(payload)
                    await writer.drain()
                    if kind == 1:
                        await asyncio.sleep(0.5)  # truncated: then gone
                    else:
                        await reader.read(1024)  # until A refuses and closes
                finally:
                    writer.close()

    async def worker(i: int) -> None:
        while time.monotonic() < until and not done.is_set() and counts["bogus"] < MAX_BOGUS:
            n = counts["bogus"]
            counts["bogus"] += 1
            await one(n % 3, STRANGER_MORE[(i + n) % 20])

    await asyncio.gather(*(worker(i) for i in range(BOGUS_WORKERS)))


def wrong_key_handshakes(ns: str, n: int) -> list[str]:
    """n handshakes with the wrong key, one after the other: how each ended, for the client."""
    async def main() -> list[str]:
        out = []
        for i in range(n):
            try:
                await Channel.connect(A_STRANGER_SIDE, PORT, Identity("exp", 2000 + i, "x"),
                                      bytes([i + 1]) * 32, timeout=10.0)
                out.append("connected?!")
            except Exception as exc:  # noqa: BLE001 - reported, and checked by the caller
                out.append(f"{type(exc).__name__}: {exc}")
        return out

    with netns.entered(ns):
        return asyncio.run(main())


def bogus_handshakes(ns: str, until: float, done: threading.Event,
                     counts: dict[str, int]) -> None:
    with netns.entered(ns):
        asyncio.run(_bogus(until, done, counts))


# --------------------------------------------------------------------------------------------
# The pair
# --------------------------------------------------------------------------------------------

def add_session(ns: str, i: int) -> str:
    client = f"10.201.{i >> 8}.{i & 255}"
    netns.run(ns, "nft", "add", "element", "ip", TABLE, MAP,
              f"{{ {client} : 0x{0x200 + i % 2:x} }}")
    return client


def kernel_clients(ns: str) -> set[str]:
    """The keys of the sessions map in `ns`'s kernel (nft -j)."""
    out = netns.run(ns, "nft", "-j", "list", "map", "ip", TABLE, MAP).stdout
    clients = set()
    for obj in json.loads(out)["nftables"]:
        for key, _ in obj.get("map", {}).get("elem", []):
            if isinstance(key, dict) and "elem" in key:
                key = key["elem"]["val"]
            clients.add(str(key))
    return clients


def status_rc(d: Daemon) -> tuple[int, str]:
    p = subprocess.run([sys.executable, "-m", "nftsync", "ctl", "--socket", str(d.socket),
                        "--timeout", "10", "status", "--json"], capture_output=True, text=True,
                       timeout=30, env=d.env)
    health = ""
    if p.stdout.strip():
        with contextlib.suppress(ValueError):
            health = json.loads(p.stdout).get("health", "")
    return p.returncode, health or p.stderr.strip()[-200:]


def test_a_flood_of_strangers_costs_the_pair_nothing(tmp_path: Path) -> None:
    code = os.environ.get("NFTSYNC_EXPOSURE_CODE")
    env = {**os.environ, "PYTHONPATH": code} if code else None
    key = make_key(tmp_path)
    with three_namespaces() as ns:
        a = Daemon(ns["a"], "a", 1, "0.0.0.0", [ADDR["b"]], key, tmp_path, role="active",
                   env=env)
        b = Daemon(ns["b"], "b", 2, ADDR["b"], [ADDR["a"]], key, tmp_path, env=env)
        try:
            with fd_soft_limit(FD_LIMIT):
                a.start()
            b.start()
            for d in (a, b):
                d.wait(lambda d=d: d.peers_up() >= 1, WAIT, "the pair up")
                d.wait(d.synced, WAIT, "the peer's snapshot applied")
            a_limit = _soft_nofile(a.proc.pid)
            assert a_limit == FD_LIMIT

            log_before = _lines(a.log)
            counts = {"opened": 0, "closed_by_a": 0, "bogus": 0}
            until, done = time.monotonic() + FLOOD_S, threading.Event()
            threads = [threading.Thread(target=f, args=(ns["c"], until, done, counts))
                       for f in (silent_connections, bogus_handshakes)]
            for t in threads:
                t.start()
            answers: list[tuple[int, str]] = []
            added: list[str] = []
            max_fds = 0
            try:
                time.sleep(1.0)  # the silent connections are in place
                start = time.monotonic()
                for i in range(STATUS_POLLS):
                    time.sleep(max(0.0, start + i * POLL_EVERY_S - time.monotonic()))
                    answers.append(status_rc(a))
                    for _ in range(SESSIONS // STATUS_POLLS + 1):
                        if len(added) < SESSIONS:
                            added.append(add_session(ns["a"], len(added)))
                    max_fds = max(max_fds, _open_fds(a.proc.pid))
                    if time.monotonic() > until:
                        break
                while len(added) < SESSIONS:
                    added.append(add_session(ns["a"], len(added)))
                flood_s = time.monotonic() - until + FLOOD_S
            finally:
                done.set()
                for t in threads:
                    t.join(FLOOD_S + 30)
            log_during = _lines(a.log) - log_before
            stats = a.ctl("stats")
            inbound = stats.get("inbound", {})
            print(f"\nflood of {flood_s:.1f}s: {counts['opened']} silent connects "
                  f"({counts['closed_by_a']} closed by A), {counts['bogus']} bogus "
                  f"handshakes; A: fd soft limit {a_limit}, "
                  f"at most {max_fds} fds open; ctl status answers: "
                  f"{[rc for rc, _ in answers]}; A's log: {log_during} lines during the flood; "
                  f"inbound: {inbound}")

            bad = [(rc, h) for rc, h in answers if rc not in (0, 1, 2)]
            assert not bad, f"ctl status did not answer: {bad}"
            assert len(answers) == STATUS_POLLS, answers
            assert log_during < MAX_LOG_LINES, _tail(a.log, log_before)
            # Nothing lost: every session made on A during the flood is in B's kernel map.
            wait_for(lambda: set(added) <= kernel_clients(ns["b"]), WAIT,
                     f"the {len(added)} sessions added on A in B's kernel map")
            assert a.peers_up() >= 1 and b.peers_up() >= 1
            refused = inbound["refused"]
            assert refused["source_cap"] > 0 and refused["total_cap"] > 0
            assert refused["timeout"] > 0  # silent ones that got a slot, until the deadline
            assert refused["malformed"] + refused["closed"] + refused["auth"] > 0
            # After the flood, handshakes are handled at once again: each wrong key is refused
            # as one (during the flood most never got a slot: the silent ones held them).
            ends = wrong_key_handshakes(ns["c"], 3)
            assert all(e.startswith("AuthError") for e in ends), ends
            after = a.ctl("stats")["inbound"]["refused"]
            assert after["auth"] == refused["auth"] + 3
            assert inbound["unauthenticated_peak"] <= 64 + 4  # strangers' total + a peer's
        finally:
            for d in (a, b):
                d.stop()


def _soft_nofile(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no Max open files line")


def _open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _tail(path: Path, skip: int) -> str:
    lines = path.read_text(errors="replace").splitlines()[skip:]
    return "\n".join(lines[:40]) + f"\n... ({len(lines)} lines)"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-s"]))
