"""How fast and at what cost do two nftsync daemons replicate HAProxy stick tables? Prints figures.

Issue 14: nftsync is a local peer of its own HAProxy (docs/l7.md) and replicates its stick
tables to the other node's nftsync, which pushes them into that node's HAProxy. This measures,
for a `type ip size 200k` table holding N entries (10k, 100k):

1. bulk: N `set table ... data.server_id` written on A's admin socket (`;`-joined lines of
   200 commands, one connection each) -> the time until B's HAProxy holds all N (`show table`'s
   `used:`, polled every 20 ms), and every entry's server then compared with A's;
2. live: with the N entries there, 200 of them moved to the other server on A one at a time;
   for each, the time from the write until B's `show table web key K` shows the new server_id
   (polled every 0.5 ms: the figure includes up to ~1 ms of polling);
3. cost: CPU (utime+stime from /proc/PID/stat, all threads; 10 ms ticks) of both nftsync
   daemons and both HAProxies: over the bulk (per entry), over 3 s of idling with N entries,
   and over 2,000 single updates written 2 ms apart on A while nothing polls B (per update,
   raw and net of the idle rate over the same time);
4. resync: B's HAProxy restarted (empty): the time until it holds all N again (taught by
   B's nftsync, which answers its RESYNCREQ), and what that costs B's nftsync.

Two namespaces joined by a veth (no route out); HAProxy (Debian's) and an nftsync daemon in
each, as in tests/kernel/test_l7_replication.py. Every process is stopped by pid and both
namespaces deleted afterwards, also on failure. Every wait is bounded.

    sudo .venv/bin/python benchmarks/bench_l7_replication.py [--entries 10000,100000] [--runs 1]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kernel"))

import haproxy_lab  # noqa: E402
import netns  # noqa: E402
from daemons import DaemonProc, make_key  # noqa: E402
from haproxy_lab import (  # noqa: E402
    SRC,
    ReplicaNode,
    cpu_seconds,
    ip_key,
    start_replicas,
    write_replica_files,
)

ADDR = {"a": "10.237.0.1", "b": "10.237.0.2"}
LB = {"a": "lb1", "b": "lb2"}
NODE_ID = {"a": 1, "b": 2}
PER_LINE = 200  # `set table` commands per `;`-joined line
SAMPLE = 200  # live updates, one at a time
IDLE_S = 3.0
PACED = 2000  # single updates for the CPU per update
PACE_GAP_S = 0.002

class BenchError(Exception):
    pass


class Daemon(DaemonProc):
    port = 7796
    cluster = "l7bench"
    start_timeout = 30.0


def wait_for(what: str, check: Callable[[], object], seconds: float,
             interval: float = 0.02) -> float:
    """Poll `check` until truthy; the monotonic time it first was (bounded)."""
    haproxy_lab.wait_for(what, check, seconds, interval, error=BenchError)
    return time.monotonic()


@dataclass
class Side(ReplicaNode):
    """One load balancer: its namespace, HAProxy (no master: the pid is the process's) and
    nftsync daemon."""

    master_worker: ClassVar[bool] = False
    start_seconds: ClassVar[float] = 20.0
    cli_timeout: ClassVar[float] = 30.0
    error: ClassVar[type[Exception]] = BenchError

    def used(self) -> int:
        m = re.search(r"# table: web, .*used:(\d+)", self.cli("show table"))
        return int(m.group(1)) if m else -1

    def servers(self) -> dict[str, str]:
        return {k: d["server_id"] for k, (_, d) in self.show_table("web", timeout=60).items()
                if "server_id" in d}

    def server_of(self, key: str) -> str | None:
        m = re.search(r"server_id=(\S+)", self.cli(f"show table web key {key}"))
        return m.group(1) if m else None

    def pids(self) -> dict[str, int]:
        assert self.haproxy is not None and self.daemon.proc is not None
        return {f"nftsync {self.lb}": self.daemon.proc.pid, f"haproxy {self.lb}": self.haproxy.pid}


@contextlib.contextmanager
def lab() -> Iterator[dict[str, Side]]:
    tmp_root = Path(tempfile.mkdtemp(prefix="l7bench-"))
    made: dict[str, Side] = {}
    try:
        with netns.linked_pair("l7b", ADDR["a"], ADDR["b"]) as names:
            key = make_key(tmp_root)
            for side in ("a", "b"):
                tmp, lb = tmp_root / side, LB[side]
                toml = write_replica_files(names[side], tmp, lb, key, (SRC,), BenchError)
                other = "b" if side == "a" else "a"
                d = Daemon(names[side], lb, NODE_ID[side], ADDR[side], [ADDR[other]], key, tmp,
                           role="active" if side == "a" else "backup",
                           extra=("--config", str(toml)))
                made[side] = Side(names[side], lb, tmp, d)
            start_replicas(list(made.values()), 30, 0.2)
            yield made
    finally:
        for s in made.values():
            s.stop_haproxy()
            s.daemon.stop()
        shutil.rmtree(tmp_root, ignore_errors=True)


def cpu_all(sides: dict[str, Side]) -> dict[str, float]:
    return {name: cpu_seconds(pid) for s in sides.values() for name, pid in s.pids().items()}


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in before if k in after}


def bulk(a: Side, b: Side, sides: dict[str, Side], n: int) -> dict:
    cmds = [f"set table web key {ip_key(i)} data.server_id {1 + i % 2}" for i in range(n)]
    cpu0 = cpu_all(sides)
    t0 = time.monotonic()
    for i in range(0, n, PER_LINE):
        out = a.cli(";".join(cmds[i:i + PER_LINE]))
        if out.strip():
            raise BenchError(f"set table refused: {out.strip()[:200]!r}")
    t_written = time.monotonic()
    t_b = wait_for(f"{n} entries on B", lambda: b.used() >= n, 120 + n / 1000)
    cpu = cpu_delta(cpu0, cpu_all(sides))
    on_a, on_b = a.servers(), b.servers()
    if len(on_a) != n or on_b != on_a:
        wrong = sum(on_b.get(k) != v for k, v in on_a.items())
        raise BenchError(f"B differs from A: A {len(on_a)}, B {len(on_b)}, {wrong} wrong")
    return {"write_s": t_written - t0, "b_all_s": t_b - t0, "cpu": cpu}


def live(a: Side, b: Side, sides: dict[str, Side], n: int) -> dict:
    keys = [ip_key(i) for i in range(0, n, max(1, n // SAMPLE))][:SAMPLE]
    delays = []
    cpu0 = cpu_all(sides)
    t_start = time.monotonic()
    for k in keys:
        new = "2" if a.server_of(k) == "1" else "1"
        t0 = time.monotonic()
        out = a.cli(f"set table web key {k} data.server_id {new}")
        if out.strip():
            raise BenchError(f"set table refused: {out.strip()!r}")
        t1 = wait_for(f"{k} -> {new} on B", lambda k=k, new=new: b.server_of(k) == new, 10,
                      0.0005)
        delays.append(t1 - t0)
    wall = time.monotonic() - t_start
    cpu = cpu_delta(cpu0, cpu_all(sides))
    delays.sort()
    return {"n": len(keys), "p50": statistics.median(delays),
            "p99": delays[min(len(delays) - 1, int(len(delays) * 0.99))],
            "max": delays[-1], "wall": wall, "cpu": cpu}


def paced(a: Side, b: Side, sides: dict[str, Side], n: int, idle_rate: dict[str, float]) -> dict:
    """PACED single updates, PACE_GAP_S apart (each travels alone, as live traffic does), B not
    polled meanwhile: the CPU per update, also net of the idle rate over the same time."""
    step = max(1, n // PACED)
    idx = list(range(1, n, step))[:PACED]  # odd keys: untouched by live()
    cpu0 = cpu_all(sides)
    t0 = time.monotonic()
    for i in idx:
        out = a.cli(f"set table web key {ip_key(i)} data.server_id {2 - i % 2}")
        if out.strip():
            raise BenchError(f"set table refused: {out.strip()!r}")
        time.sleep(PACE_GAP_S)
    last = ip_key(idx[-1])
    wait_for("the last paced update on B", lambda: b.server_of(last) == str(2 - idx[-1] % 2), 30)
    wall = time.monotonic() - t0
    cpu = cpu_delta(cpu0, cpu_all(sides))
    on_b = b.servers()
    wrong = sum(on_b.get(ip_key(i)) != str(2 - i % 2) for i in idx)
    if wrong:
        raise BenchError(f"{wrong} of {len(idx)} paced updates not on B")
    net = {k: v - idle_rate.get(k, 0.0) * wall for k, v in cpu.items()}
    return {"n": len(idx), "wall": wall, "cpu": cpu, "net": net}


def idle(sides: dict[str, Side]) -> dict[str, float]:
    cpu0 = cpu_all(sides)
    time.sleep(IDLE_S)
    return {k: v / IDLE_S for k, v in cpu_delta(cpu0, cpu_all(sides)).items()}


def resync(a: Side, b: Side, n: int) -> dict:
    d_pid = b.daemon.proc.pid if b.daemon.proc else 0
    b.stop_haproxy()
    c0 = cpu_seconds(d_pid)
    t0 = time.monotonic()
    b.start_haproxy()
    t_b = wait_for(f"{n} entries on restarted B", lambda: b.used() >= n, 60 + n / 1000)
    d_cpu = cpu_seconds(d_pid) - c0
    h_cpu = cpu_seconds(b.haproxy.pid) if b.haproxy else 0.0
    on_b = b.servers()
    if on_b != a.servers():
        raise BenchError(f"restarted B differs from A ({len(on_b)} entries)")
    return {"s": t_b - t0, "nftsync_cpu": d_cpu, "haproxy_cpu": h_cpu}


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def run_one(n: int) -> None:
    with lab() as sides:
        a, b = sides["a"], sides["b"]
        print(f"\n## N = {n:,} (load {loadavg()})")
        r = bulk(a, b, sides, n)
        print(f"bulk: {n:,} set table on A written in {r['write_s']:.2f} s; all on B after "
              f"{r['b_all_s']:.2f} s ({n / r['b_all_s']:,.0f} entries/s)")
        for k, v in r["cpu"].items():
            print(f"  CPU {k:14} {v:6.2f} s  {v / n * 1e6:6.1f} µs/entry")
        time.sleep(1.0)  # let the acks and B's writes settle
        rate = idle(sides)
        print(f"idle {IDLE_S:.0f} s with {n:,} entries:")
        for k, v in rate.items():
            print(f"  CPU {k:14} {v * 100:5.1f} % of a core")
        lv = live(a, b, sides, n)
        print(f"live: {lv['n']} single updates, A's write -> B's HAProxy: p50 "
              f"{lv['p50'] * 1e3:.1f} ms, p99 {lv['p99'] * 1e3:.1f} ms, max "
              f"{lv['max'] * 1e3:.1f} ms ({lv['wall']:.1f} s wall)")
        pc = paced(a, b, sides, n, rate)
        print(f"cost: {pc['n']} single updates {PACE_GAP_S * 1e3:.0f} ms apart "
              f"({pc['wall']:.1f} s wall), CPU per update, raw / net of idle:")
        for k, v in pc["cpu"].items():
            print(f"  CPU {k:14} {v:6.2f} s  {v / pc['n'] * 1e6:5.0f} / "
                  f"{pc['net'][k] / pc['n'] * 1e6:5.0f} µs/update")
        rs = resync(a, b, n)
        print(f"resync: B's HAProxy restarted, all {n:,} back after {rs['s']:.2f} s; "
              f"CPU nftsync lb2 {rs['nftsync_cpu']:.2f} s, new HAProxy lb2 "
              f"{rs['haproxy_cpu']:.2f} s (start-up included)")
        print(f"(load after: {loadavg()})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", default="10000,100000")
    ap.add_argument("--runs", type=int, default=1)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("error: run as root (it creates network namespaces)", file=sys.stderr)
        return 2
    if shutil.which("haproxy") is None:
        print("error: haproxy not installed (scripts/setup.sh)", file=sys.stderr)
        return 2
    sizes = [int(x) for x in args.entries.split(",")]
    if any(not 0 < n <= 190_000 for n in sizes):
        print("error: --entries must be 1..190000 (the table holds 200k)", file=sys.stderr)
        return 2
    version = subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout
    print(f"# {version.splitlines()[0]}; {os.cpu_count()} CPUs; load {loadavg()}")
    try:
        for run in range(args.runs):
            for n in sizes:
                print(f"\n# run {run + 1}")
                run_one(n)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
