"""What does following HAProxy 2.6's stick tables cost? Prints figures; asserts nothing about time.

Issue 14 replicates HAProxy stick tables (L7 sessions). The runtime API has no change events, so
following a table by polling costs one full `show table` per poll; HAProxy's peers protocol
pushes every change instead. docs/l7.md chooses between them from these figures:

* poll: `show table` of N entries on the admin socket: wall time, bytes, HAProxy CPU, and the
  time to parse the text into (key, server_id, server_key, exp) in Python;
* write: `set table ... data.server_id` per command, pipelined on one `prompt` connection, as
  `;`-joined lines (one connection per line) and one connection per command;
* peers: a full resync of the same N entries over the peers protocol (a RESYNCREQ from a small
  peer written here, answered by HAProxy with every entry and its remaining expiry), how fast
  live `set table` changes arrive at that peer, and (offline) how fast Python decodes updates.

Everything runs in a throw-away network namespace (loopback only), HAProxy is stopped by pid and
the namespace deleted at the end, also on failure. Bounded: every read has a deadline.

    sudo .venv/bin/python benchmarks/bench_haproxy.py [--entries 10000,100000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kernel"))

import netns  # noqa: E402
from haproxy_lab import (  # noqa: E402
    CLK_TCK,
    COOKIE,
    HDR,
    SRC,
    HaproxyNode,
    check_config,
    cpu_seconds,
    haproxy_config,
    ip_key,
    read_to_eof,
    start_backends,
    stop_pid,
)
from haproxy_lab import HAPROXY_PEER_PORT as PEER_PORT  # noqa: E402 (lb1's, PeerClient dials)


class LabError(RuntimeError):
    """The lab could not be set up (HAProxy refused its configuration, a socket never came up)."""


@dataclass
class Lab(HaproxyNode):
    """One namespace with HAProxy (three farms, one peers section) and two HTTP backends."""

    procs: list[subprocess.Popen] = field(default_factory=list)

    master_worker: ClassVar[bool] = False  # -db alone: foreground, one process
    cli_timeout: ClassVar[float] = 120.0
    error: ClassVar[type[Exception]] = LabError

    def cpu_seconds(self) -> float:
        """HAProxy's user+system CPU so far (all threads), from /proc/PID/stat."""
        assert self.haproxy is not None
        return cpu_seconds(self.haproxy.pid)

    def cli_pipelined(self, lines: list[str], timeout: float = 300.0) -> bytes:
        """Many commands on one interactive (`prompt`) connection, written while answers are
        read (a writer thread: HAProxy answers as it reads, so neither side may block)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(self.admin)
            payload = ("prompt\n" + "\n".join(lines) + "\nquit\n").encode()
            writer = threading.Thread(target=s.sendall, args=(payload,), daemon=True)
            writer.start()
            out = read_to_eof(s, time.monotonic() + timeout)
            writer.join(timeout)
            return out


@contextlib.contextmanager
def lab(extra_args: tuple[str, ...] = ()) -> Iterator[Lab]:
    """Start the lab; stop HAProxy and the backends by pid and delete the namespace afterwards."""
    ns = netns.create("nsh")
    tmp = Path(tempfile.mkdtemp(prefix="nsh-"))
    the_lab = Lab(ns, "lb1", tmp)
    try:
        cfg = tmp / "haproxy.cfg"
        cfg.write_text(haproxy_config(tmp, peers="lab", farms=(SRC, COOKIE, HDR), pidfile=True))
        check_config(ns, cfg, LabError)
        the_lab.procs += start_backends(ns, tmp)
        the_lab.start_haproxy(extra_args)
        yield the_lab
    finally:
        the_lab.stop_haproxy()
        for proc in reversed(the_lab.procs):
            stop_pid(proc)
        netns.delete(ns)
        shutil.rmtree(tmp, ignore_errors=True)


# --- the runtime API -------------------------------------------------------------------------

ENTRY = re.compile(rb"^0x[0-9a-f]+: key=(\S+) use=(\d+) exp=(\d+)(.*)$")


@dataclass(frozen=True)
class ShownEntry:
    """One line of `show table`: what nftsync would keep of it."""

    key: bytes
    exp_ms: int
    server_id: int
    server_key: bytes | None


def parse_show_table(text: bytes) -> list[ShownEntry]:
    """`0x55d...: key=10.0.0.1 use=0 exp=1799123 server_id=1 server_key=be1` -> ShownEntry."""
    out = []
    for line in text.split(b"\n"):
        m = ENTRY.match(line)
        if not m:
            continue
        data = dict(kv.split(b"=", 1) for kv in m.group(4).split())
        srv_key = data.get(b"server_key")
        out.append(ShownEntry(m.group(1), int(m.group(3)), int(data.get(b"server_id", b"0")),
                              None if srv_key in (None, b"-") else srv_key))
    return out


def fill(the_lab: Lab, table: str, n: int) -> tuple[float, float]:
    """Set n keys by pipelined `set table` on one connection; (wall s, HAProxy CPU s)."""
    lines = [f"set table {table} key {ip_key(i)} data.server_id {1 + i % 2}" for i in range(n)]
    cpu0, t0 = the_lab.cpu_seconds(), time.perf_counter()
    out = the_lab.cli_pipelined(lines)
    wall, cpu = time.perf_counter() - t0, the_lab.cpu_seconds() - cpu0
    errors = [ln for ln in out.split(b"\n") if ln.strip(b"> ")]
    if errors:
        raise LabError(f"set table refused {len(errors)} commands, first: {errors[0]!r}")
    return wall, cpu


def set_cost_variants(the_lab: Lab, table: str, n: int, per_line: int) -> dict[str, float]:
    """Per-command cost (µs) of `set table` sent three ways, on n keys beyond the filled ones."""
    base = 1 << 20
    cmds = [f"set table {table} key {ip_key(base + i)} data.server_id 2" for i in range(n)]
    out = {}
    t0 = time.perf_counter()
    for cmd in cmds:
        the_lab.command(cmd)
    out["one connection per command"] = (time.perf_counter() - t0) / n * 1e6
    t0 = time.perf_counter()
    for i in range(0, n, per_line):
        the_lab.command(";".join(cmds[i:i + per_line]))
    out[f"{per_line} per ';'-joined line"] = (time.perf_counter() - t0) / n * 1e6
    t0 = time.perf_counter()
    the_lab.cli_pipelined(cmds)
    out["pipelined on one prompt connection"] = (time.perf_counter() - t0) / n * 1e6
    return out


@dataclass
class PollCost:
    wall_s: float
    nbytes: int
    haproxy_cpu_s: float
    parse_s: float
    diff_s: float
    entries: int
    changed: int


def changes(previous: dict[bytes, ShownEntry], now: list[ShownEntry],
            slack_ms: int) -> tuple[dict[bytes, ShownEntry], int]:
    """What a poller must do after parsing: index the poll and find what changed since the
    previous one (new key, other server, or an expiry pushed up by a touch: exp only ever falls
    between touches, so a rise of more than slack_ms is a touch)."""
    index = {e.key: e for e in now}
    changed = 0
    for key, e in index.items():
        old = previous.get(key)
        if (old is None or old.server_id != e.server_id or old.server_key != e.server_key
                or e.exp_ms > old.exp_ms + slack_ms):
            changed += 1
    return index, changed


def poll_once(the_lab: Lab, table: str, previous: dict[bytes, ShownEntry]
              ) -> tuple[PollCost, dict[bytes, ShownEntry]]:
    cpu0, t0 = the_lab.cpu_seconds(), time.perf_counter()
    text = the_lab.command(f"show table {table}")
    wall, cpu = time.perf_counter() - t0, the_lab.cpu_seconds() - cpu0
    t1 = time.perf_counter()
    entries = parse_show_table(text)
    t2 = time.perf_counter()
    index, changed = changes(previous, entries, slack_ms=1000)
    t3 = time.perf_counter()
    return PollCost(wall, len(text), cpu, t2 - t1, t3 - t2, len(entries), changed), index


# --- the peers protocol (HAProxyS 2.1), as much as a measurement needs -----------------------

CLASS_CONTROL, CLASS_ERROR, CLASS_STKT = 0, 1, 10
CTRL_RESYNCREQ, CTRL_FINISHED, CTRL_PARTIAL, CTRL_CONFIRM, CTRL_HEARTBEAT = 0, 1, 2, 3, 4
STKT_UPDATE, STKT_INCUPDATE, STKT_DEFINE, STKT_SWITCH, STKT_ACK = 0x80, 0x81, 0x82, 0x83, 0x84
STKT_UPDATE_TIMED, STKT_INCUPDATE_TIMED = 0x85, 0x86


def varint(buf: bytes, pos: int) -> tuple[int, int]:
    """HAProxy's peers integer: < 240 in one byte, else 4 bits + 7 bits per byte."""
    i = buf[pos]
    pos += 1
    if i >= 240:
        shift = 4
        while True:
            b = buf[pos]
            pos += 1
            i += b << shift
            shift += 7
            if b < 128:
                break
    return i, pos


def enc_varint(i: int) -> bytes:
    if i < 240:
        return bytes([i])
    out = [(i | 240) & 255]
    i = (i - 240) >> 4
    while i >= 128:
        out.append((i | 128) & 255)
        i = (i - 128) >> 7
    out.append(i)
    return bytes(out)


def messages(buf: bytearray) -> Iterator[tuple[int, int, bytes]]:
    """Whole messages at the front of buf (consumed): (class, type, payload)."""
    pos = 0
    while len(buf) - pos >= 2:
        cls, typ = buf[pos], buf[pos + 1]
        if typ < 128:
            yield cls, typ, b""
            pos += 2
            continue
        try:
            length, start = varint(buf, pos + 2)
        except IndexError:
            break
        if start + length > len(buf):
            break
        yield cls, typ, bytes(buf[start:start + length])
        pos = start + length
    del buf[:pos]


@dataclass
class PeerTable:
    """What a DEFINE says: the sender's table id, name, key type and length, data types, expire."""

    sender_id: int
    name: bytes
    key_type: int
    key_len: int
    data_types: int
    expire_ms: int


def decode_define(p: bytes) -> PeerTable:
    sid, pos = varint(p, 0)
    nlen, pos = varint(p, pos)
    name = p[pos:pos + nlen]
    pos += nlen
    ktype, pos = varint(p, pos)
    klen, pos = varint(p, pos)
    data, pos = varint(p, pos)
    expire, pos = varint(p, pos) if pos < len(p) else (0, pos)
    return PeerTable(sid, name, ktype, klen, data, expire)


def decode_update(p: bytes, typ: int, table: PeerTable,
                  names: dict[int, bytes]) -> tuple[bytes, int | None, int, bytes]:
    """(key, remaining ms or None, server_id, server_key) of an update of a table that stores
    server_id (bit 0) and server_key (bit 19) only, as `stick on` tables do. server_key comes
    through a per-connection dictionary cache: id and name the first time, the id alone after
    (`names` is that cache)."""
    pos = 4 if typ in (STKT_UPDATE, STKT_UPDATE_TIMED) else 0
    exp = None
    if typ in (STKT_UPDATE_TIMED, STKT_INCUPDATE_TIMED):
        exp = struct.unpack_from("!I", p, pos)[0]
        pos += 4
    if table.key_type == 6:  # string: length + bytes
        klen, pos = varint(p, pos)
    else:
        klen = table.key_len
    key = p[pos:pos + klen]
    pos += klen
    server_id, server_key = 0, b""
    if table.data_types & 1:
        server_id, pos = varint(p, pos)
    if table.data_types & (1 << 19):
        dlen, pos = varint(p, pos)
        if dlen:
            end = pos + dlen
            cache_id, pos = varint(p, pos)
            if pos < end:
                vlen, pos = varint(p, pos)
                names[cache_id] = p[pos:pos + vlen]
            server_key = names.get(cache_id, b"")
            pos = end
    return key, exp, server_id, server_key


class PeerClient:
    """Connects to HAProxy's own peer as "nftsync", asks for a full resync, reads updates."""

    def __init__(self, ns: str, timeout: float = 60.0):
        with netns.entered(ns):
            self.sock = socket.create_connection(("127.0.0.1", PEER_PORT), timeout=timeout)
        self.sock.sendall(b"HAProxyS 2.1\nlb1\nnftsync 1 1\n")
        status = b""
        while not status.endswith(b"\n"):
            data = self.sock.recv(1)
            if not data:
                raise LabError("HAProxy closed the peer connection during the handshake")
            status += data
        if status != b"200\n":
            raise LabError(f"peer handshake refused: {status!r}")
        self.buf = bytearray()
        self.tables: dict[int, PeerTable] = {}
        self.current: PeerTable | None = None
        self.names: dict[int, bytes] = {}
        self.updates = 0
        self.bytes = 0

    def read_until(self, stop, deadline: float) -> list[tuple[bytes, int | None, int, bytes]]:
        """Read and decode until stop(cls, typ) is true; every update, in order."""
        seen = []
        while time.monotonic() < deadline:
            data = self.sock.recv(1 << 20)
            if not data:
                raise LabError("HAProxy closed the peer connection")
            self.bytes += len(data)
            self.buf += data
            for cls, typ, payload in messages(self.buf):
                if cls == CLASS_STKT and typ == STKT_DEFINE:
                    t = decode_define(payload)
                    self.tables[t.sender_id] = self.current = t
                elif cls == CLASS_STKT and typ == STKT_SWITCH:
                    self.current = self.tables[varint(payload, 0)[0]]
                elif cls == CLASS_STKT and typ in (STKT_UPDATE, STKT_INCUPDATE,
                                                     STKT_UPDATE_TIMED, STKT_INCUPDATE_TIMED):
                    assert self.current is not None
                    seen.append(decode_update(payload, typ, self.current, self.names))
                    self.updates += 1
                elif cls == CLASS_CONTROL and typ == CTRL_HEARTBEAT:
                    self.sock.sendall(bytes([CLASS_CONTROL, CTRL_HEARTBEAT]))
                elif cls == CLASS_CONTROL and typ == CTRL_RESYNCREQ:
                    # HAProxy, still learning after its start, asks us: we know nothing more.
                    self.sock.sendall(bytes([CLASS_CONTROL, CTRL_FINISHED]))
                if stop(cls, typ):
                    return seen
        raise TimeoutError("peer messages did not arrive in time")

    def close(self) -> None:
        self.sock.close()


def peer_resync(the_lab: Lab, n: int) -> tuple[float, int, int, float]:
    """(wall s until RESYNCFINISHED, bytes, updates, HAProxy CPU s) of a full resync."""
    client = PeerClient(the_lab.ns)
    try:
        cpu0, t0 = the_lab.cpu_seconds(), time.perf_counter()
        client.sock.sendall(bytes([CLASS_CONTROL, CTRL_RESYNCREQ]))
        client.read_until(lambda c, t: c == CLASS_CONTROL and t in (CTRL_FINISHED, CTRL_PARTIAL),
                          time.monotonic() + 120)
        wall, cpu = time.perf_counter() - t0, the_lab.cpu_seconds() - cpu0
        client.sock.sendall(bytes([CLASS_CONTROL, CTRL_CONFIRM]))
        return wall, client.bytes, client.updates, cpu
    finally:
        client.close()


def peer_live(the_lab: Lab, n: int) -> tuple[float, int]:
    """n pipelined `set table` changes on the CLI: (s from the first write to the n-th update
    arriving at the peer, updates seen)."""
    client = PeerClient(the_lab.ns)
    try:
        lines = [f"set table web key {ip_key((2 << 20) + i)} data.server_id 1" for i in range(n)]
        got: list[int] = []
        done = threading.Event()

        def reader() -> None:
            with contextlib.suppress(OSError, LabError, TimeoutError):
                client.read_until(lambda c, t: (client.updates >= n), time.monotonic() + 60)
            got.append(client.updates)
            done.set()

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        t0 = time.perf_counter()
        the_lab.cli_pipelined(lines)
        done.wait(60)
        return time.perf_counter() - t0, got[0] if got else client.updates
    finally:
        client.close()


def decode_rate(n: int) -> tuple[float, int]:
    """Offline: decode n live updates as HAProxy sends them (id, ipv4 key, server_id, cached
    server_key id); (updates/s, bytes per update)."""
    define = (enc_varint(1) + enc_varint(3) + b"web" + enc_varint(4) + enc_varint(4)
              + enc_varint(1 | 1 << 19) + enc_varint(1800000))
    wire = bytearray([CLASS_STKT, STKT_DEFINE]) + enc_varint(len(define)) + define
    for i in range(n):
        name = bytes([1, 3]) + b"be1" if i == 0 else bytes([1])
        p = (struct.pack("!I", i + 1) + socket.inet_aton(ip_key(i)) + enc_varint(1 + i % 2)
             + enc_varint(len(name)) + name)
        wire += bytes([CLASS_STKT, STKT_UPDATE]) + enc_varint(len(p)) + p
    size = len(wire)
    t0 = time.perf_counter()
    table, names, count = None, {}, 0
    for _cls, typ, payload in messages(wire):
        if typ == STKT_DEFINE:
            table = decode_define(payload)
        else:
            assert table is not None
            decode_update(payload, typ, table, names)
            count += 1
    if count != n:
        raise LabError(f"decoded {count} updates of {n}")
    return n / (time.perf_counter() - t0), size // n


def _median(polls: list[PollCost], attr: str) -> float:
    return statistics.median(getattr(p, attr) for p in polls)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--entries", default="10000,100000", help="table sizes, comma-separated")
    ap.add_argument("--repeat", type=int, default=3, help="polls per size (median printed)")
    ap.add_argument("--set-sample", type=int, default=2000, help="commands per write variant")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_haproxy.py: run as root (it creates a network namespace)", file=sys.stderr)
        return 1
    if not shutil.which("haproxy"):
        print("bench_haproxy.py: haproxy not installed (scripts/setup.sh)", file=sys.stderr)
        return 1
    version = subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout
    print(f"# {version.splitlines()[0]}; {os.cpu_count()} CPUs; "
          f"HAProxy CPU from /proc (ticks of {1 / CLK_TCK:.2f} s)")
    rate, size = decode_rate(100000)
    print(f"peers decode only (offline, 100000 live updates of {size} B): {rate / 1e3:.0f}k/s")
    for n in [int(x) for x in args.entries.split(",")]:
        with lab() as the_lab:
            wall, cpu = fill(the_lab, "web", n)
            print(f"\n== {n} entries (table web, type ip, store server_id + server_key)")
            print(f"fill: {n} pipelined set table: {wall:.2f} s ({wall / n * 1e6:.1f} µs/cmd), "
                  f"HAProxy CPU {cpu:.2f} s")
            polls, index = [], {}
            for _ in range(args.repeat):
                cost, index = poll_once(the_lab, "web", index)
                polls.append(cost)
            if any(p.entries != n for p in polls):
                raise LabError(f"show table listed {[p.entries for p in polls]} entries, not {n}")
            print(f"poll (show table, median of {args.repeat}): {_median(polls, 'wall_s'):.3f} s "
                  f"wall, {_median(polls, 'nbytes') / 1e6:.2f} MB "
                  f"({_median(polls, 'nbytes') / n:.0f} B/entry), "
                  f"HAProxy CPU {_median(polls, 'haproxy_cpu_s'):.2f} s, "
                  f"Python parse {_median(polls, 'parse_s'):.3f} s + diff "
                  f"{_median(polls, 'diff_s'):.3f} s (changes found: "
                  f"{', '.join(str(p.changed) for p in polls)})")
            for how, us in set_cost_variants(the_lab, "web", args.set_sample, 100).items():
                print(f"write: set table, {how}: {us:.1f} µs/cmd")
            wall, nbytes, updates, cpu = peer_resync(the_lab, n)
            print(f"peers: full resync of {updates} entries: {wall:.3f} s, {nbytes / 1e6:.2f} MB "
                  f"({nbytes / max(updates, 1):.0f} B/entry), HAProxy CPU {cpu:.2f} s")
            live_n = min(n, 10000)
            secs, seen = peer_live(the_lab, live_n)
            print(f"peers: {live_n} live set table changes: {seen} updates at the peer after "
                  f"{secs:.2f} s ({seen / secs:.0f}/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
