"""Replication benchmark: an `nftsync daemon` pair side by side with a conntrackd pair.

One run creates two namespaces A and B joined by a veth (10.99.0.1/30 - 10.99.0.2/30, no route
out), loads the same bench farm into both, and for each system (nftsync daemons, conntrackd
FTFW/UDP, DisableExternalCache On: the reference configuration in `CONNTRACKD_CONF`) measures:

1. throughput: N DNATed TCP ESTABLISHED entries with the farm's marks and distinct sources are
   loaded on A with `conntrack -R`; time from the start of the load until B holds all N conntrack
   entries (B's nf_conntrack_count) and, for nftsync, all N sessions (the B daemon's count of
   elements written into its kernel map, `stats.kernel.nft.applied`);
2. lag at a steady rate: new entries are written on A through `CtWriter` every 10 ms; B's conntrack
   NEW events are matched to their creation time on A (the sequence number is the source address);
3. full resync (nftsync only): A's map is loaded with M sessions (one `nft -f`) before A's
   daemon starts and reads them; then B's daemon starts empty: time until B holds all M;
4. daemon RSS before/after each throughput load, and CPU (utime+stime of both daemons) over the
   steady-rate run.

Run as root: `.venv/bin/python benchmarks/bench_replication.py [--sizes 10000,100000,1000000]`.
Everything it starts is stopped by pid and both namespaces are deleted at the end, also on failure.
For N > 250k the global `net.netfilter.nf_conntrack_max` is raised for the run and restored after.
No packets are sent apart from the replication traffic itself on the veth.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "kernel"))

import netns  # noqa: E402

from nftsync.conntrack import CtEntry  # noqa: E402
from nftsync.netlink.ctnetlink import EV_NEW  # noqa: E402
from nftsync.netlink.ctsocket import CtEventSocket, CtWriter  # noqa: E402

ADDR = {"a": "10.99.0.1", "b": "10.99.0.2"}
VIP, MARKS, BACKENDS = "10.10.0.100", (0x200, 0x201), ("10.20.0.11", "10.20.0.12")
MAP_REF = "ip nftsync_bench sessions"
CT_MAX_FILE = Path("/proc/sys/net/netfilter/nf_conntrack_max")

FARM = """
table ip nftsync_bench {
	map sessions {
		type ipv4_addr : mark
		flags dynamic, timeout
		timeout 3600s
		size 4000000
		comment "nftsync:sessions farm=bench"
	}
	map static {
		type ipv4_addr : mark
		comment "nftsync:static farm=bench"
	}
	map backends {
		type mark : ipv4_addr
		comment "nftsync:backends farm=bench"
		elements = { 0x200 : 10.20.0.11, 0x201 : 10.20.0.12 }
	}
	chain prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		ip daddr 10.10.0.100 tcp dport 80 jump bench
	}
	chain bench {
		meta mark set ip saddr map @static
		meta mark 0 meta mark set ip saddr map @sessions
		meta mark 0 meta mark set numgen inc mod 2 map { 0 : 0x200, 1 : 0x201 }
		update @sessions { ip saddr : meta mark }
		ct mark set meta mark
		dnat to meta mark map @backends
	}
}
"""


def client(i: int, base: int = 64) -> str:
    """Distinct IPv4 source per sequence number (10.64.0.0/10 for loads, others per test)."""
    return f"10.{base + (i >> 16)}.{(i >> 8) & 255}.{i & 255}"


def client_seq(addr: bytes, base: int) -> int:
    return ((addr[1] - base) << 16) | (addr[2] << 8) | addr[3]


def restore_lines(n: int) -> str:
    out = []
    for i in range(n):
        c, p, k = client(i), 1024 + i % 60000, i % 2
        out.append(f"-A -t 600 -u ASSURED -s {c} -d {VIP} -r {BACKENDS[k]} -q {c} -p tcp "
                   f"--sport {p} --dport 80 --reply-port-src 80 --reply-port-dst {p} "
                   f"--state ESTABLISHED -m {MARKS[k]:#x}\n")
    return "".join(out)


# -- processes and kernel state ------------------------------------------------------------------
def proc_cpu(pid: int) -> float:
    """utime + stime of a process in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class CtCounter:
    """B's nf_conntrack_count, read from a file opened inside B (sysctl files are per netns)."""

    def __init__(self, ns: str) -> None:
        with netns.entered(ns):
            self.fh = open("/proc/sys/net/netfilter/nf_conntrack_count")  # noqa: SIM115

    def __call__(self) -> int:
        self.fh.seek(0)
        return int(self.fh.read())

    def close(self) -> None:
        self.fh.close()


def control(path: Path, cmd: str, timeout: float = 30.0) -> dict:
    """One request on the daemon's control socket (line-delimited JSON), no subprocess."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(json.dumps({"cmd": cmd, "args": {}}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            buf += chunk
    resp = json.loads(buf)
    if not resp.get("ok"):
        raise RuntimeError(f"control {cmd}: {resp.get('error')}")
    return resp["result"]


def wait_until(cond, timeout: float, what: str, interval: float = 0.05) -> float:
    """Poll cond() until true; returns the monotonic time it became true (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return time.monotonic()
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


@dataclass
class Lab:
    """Two namespaces and a veth; tracks every process it starts, tears everything down."""

    workdir: Path
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    procs: list[subprocess.Popen] = field(default_factory=list)
    ns: dict[str, str] = field(default_factory=dict)
    saved_ct_max: int | None = None

    def up(self) -> None:
        for side in ("a", "b"):
            self.ns[side] = netns.create(f"rb{side}{self.tag}")
        va, vb = f"rba{self.tag}", f"rbb{self.tag}"
        subprocess.run(["ip", "link", "add", va, "netns", self.ns["a"], "type", "veth",
                        "peer", "name", vb, "netns", self.ns["b"]], check=True)
        for side, dev in (("a", va), ("b", vb)):
            netns.run(self.ns[side], "ip", "addr", "add", f"{ADDR[side]}/30", "dev", dev)
            netns.run(self.ns[side], "ip", "link", "set", dev, "up")
        self.dev = {"a": va, "b": vb}
        farm = self.workdir / "farm.nft"
        farm.write_text(FARM)
        for side in ("a", "b"):
            netns.run(self.ns[side], "nft", "-f", str(farm))

    def ensure_ct_max(self, n: int) -> None:
        cur = int(CT_MAX_FILE.read_text())
        if cur < n + 10_000:
            if self.saved_ct_max is None:
                self.saved_ct_max = cur
            CT_MAX_FILE.write_text(str(n + 100_000))

    def reset(self) -> None:
        for side in ("a", "b"):
            netns.run(self.ns[side], "conntrack", "-F", check=False)
            netns.run(self.ns[side], "nft", "flush", "map", *MAP_REF.split())

    def spawn(self, side: str, cmd: list[str], log: Path) -> subprocess.Popen:
        with open(log, "a") as fh:
            p = subprocess.Popen(["ip", "netns", "exec", self.ns[side], *cmd], stdout=fh,
                                 stderr=fh, stdin=subprocess.DEVNULL)
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen) -> None:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        with contextlib.suppress(ValueError):
            self.procs.remove(p)

    def down(self) -> None:
        for p in list(self.procs):
            with contextlib.suppress(Exception):
                self.stop(p)
        for name in self.ns.values():
            netns.delete(name)
        if self.saved_ct_max is not None:
            CT_MAX_FILE.write_text(str(self.saved_ct_max))


# -- the two systems -------------------------------------------------------------------------------
class NftsyncPair:
    name = "nftsync"

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.key = lab.workdir / "key"
        if not self.key.exists():
            fd = os.open(self.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(os.urandom(32).hex() + "\n")
        self.procs: dict[str, subprocess.Popen] = {}

    def sock(self, side: str) -> Path:
        return self.lab.workdir / f"nftsync-{side}.sock"

    def start_one(self, side: str, timeout: float = 30.0) -> None:
        peer = ADDR["b" if side == "a" else "a"]
        node_id = 1 if side == "a" else 2
        cmd = [sys.executable, "-m", "nftsync", "daemon", "--listen", f"{ADDR[side]}:7777",
               "--peer", f"{peer}:7777", "--key-file", str(self.key),
               "--socket", str(self.sock(side)), "--node-name", f"bench-{side}",
               "--node-id", str(node_id), "--cluster", "bench",
               "--role", "active" if side == "a" else "backup"]
        self.sock(side).unlink(missing_ok=True)
        self.procs[side] = self.lab.spawn(side, cmd, self.lab.workdir / f"nftsync-{side}.log")
        wait_until(lambda: self.sock(side).exists(), timeout, f"nftsync {side} control socket")

    def start(self) -> None:
        self.start_one("a")
        self.start_one("b")
        wait_until(self.connected, 30, "nftsync peers connected", 0.1)

    def connected(self) -> bool:
        return all(any(p["state"] == "up" for p in control(self.sock(s), "peers"))
                   for s in self.procs)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs.values()]

    def sessions_on_b(self) -> int:
        """Sessions B's daemon holds and has written into its kernel map: its mirror's count
        minus what its kernel writer still has queued (a JSON listing of a 1M map takes ~50 s;
        the writer's `applied` counter alone counts re-sent elements twice)."""
        st = control(self.sock("b"), "stats")
        return sum(st["sessions"].values()) - st["kernel"].get("queued", 0)

    def stats(self, side: str) -> dict:
        return control(self.sock(side), "stats")

    def stop(self) -> None:
        for p in self.procs.values():
            self.lab.stop(p)
        self.procs.clear()


CONNTRACKD_CONF = """Sync {{
	Mode FTFW {{
		DisableExternalCache On
	}}
	UDP {{
		IPv4_address {mine}
		IPv4_Destination_Address {peer}
		Port 3780
		Interface {dev}
		Checksum on
	}}
}}
General {{
	HashSize 32768
	HashLimit 2621440
	LogFile {dir}/log
	LockFile {dir}/lock
	UNIX {{
		Path {dir}/sock
	}}
	NetlinkBufferSize 2097152
	NetlinkBufferSizeMaxGrowth 67108864
	NetlinkOverrunResync On
}}
"""


class ConntrackdPair:
    name = "conntrackd"

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self) -> None:
        for side in ("a", "b"):
            d = self.lab.workdir / f"conntrackd-{side}"
            d.mkdir(exist_ok=True)
            (d / "lock").unlink(missing_ok=True)
            conf = d / "conntrackd.conf"
            conf.write_text(CONNTRACKD_CONF.format(
                mine=ADDR[side], peer=ADDR["b" if side == "a" else "a"],
                dev=self.lab.dev[side], dir=d))
            self.procs[side] = self.lab.spawn(side, ["conntrackd", "-C", str(conf)], d / "out")
        for side in ("a", "b"):
            sock = self.lab.workdir / f"conntrackd-{side}" / "sock"
            wait_until(sock.exists, 15, f"conntrackd {side} socket")
        time.sleep(1.0)  # FTFW: let the first hello/alive exchange happen

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs.values()]

    def stop(self) -> None:
        for p in self.procs.values():
            self.lab.stop(p)
        self.procs.clear()


PROFILE_DIR: Path | None = None


def profile(lab: Lab, pair, what: str, seconds: float) -> list[subprocess.Popen]:
    """With --profile: py-spy (collapsed stacks) on each nftsync daemon for `seconds`."""
    if PROFILE_DIR is None or pair.name != "nftsync":
        return []
    spy = Path(sys.executable).parent / "py-spy"
    out = []
    for side, p in pair.procs.items():
        out.append(subprocess.Popen([str(spy), "record", "-p", str(p.pid), "-r", "200",
                                     "-d", str(int(seconds)), "-f", "raw", "-o",
                                     str(PROFILE_DIR / f"{what}-{side}.txt")],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return out


# -- measurements ----------------------------------------------------------------------------------
def throughput(lab: Lab, pair, n: int, timeout: float) -> dict:
    lab.reset()
    pair.start()
    try:
        rss0 = {pid: proc_rss_kib(pid) for pid in pair.pids()}
        cpu0 = {pid: proc_cpu(pid) for pid in pair.pids()}
        f = lab.workdir / f"load-{n}.txt"
        if not f.exists():
            f.write_text(restore_lines(n))
        count_b = CtCounter(lab.ns["b"])
        count_a = CtCounter(lab.ns["a"])
        base_a = count_a()
        spies = profile(lab, pair, f"throughput-{n}", 8 + n / 20_000)
        try:
            want = count_b() + n  # the replication link itself may have an entry
            t0 = time.monotonic()
            load = subprocess.Popen(["ip", "netns", "exec", lab.ns["a"], "conntrack", "-R",
                                     str(f)], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            lab.procs.append(load)
            t_load = t_ct = t_sess = None
            deadline = t0 + timeout
            last_poll_sess = 0.0
            sessions = 0
            while time.monotonic() < deadline and (t_load is None or t_ct is None or
                                                   (pair.name == "nftsync" and t_sess is None)):
                now = time.monotonic()
                if t_load is None and load.poll() is not None:
                    t_load = now
                    # What the load really put into A (a few may be refused at 1M): B must
                    # end with exactly that.
                    loaded = min(n, count_a() - base_a)  # a transient TCP entry may count
                    want = want - n + loaded
                if t_ct is None and count_b() >= want:
                    t_ct = now
                if pair.name == "nftsync" and t_sess is None and now - last_poll_sess > 0.25:
                    last_poll_sess = now
                    sessions = tolerant(pair.sessions_on_b)()
                    if sessions >= (n if t_load is None else loaded):
                        t_sess = time.monotonic()
                time.sleep(0.01)
            lab.procs.remove(load)
            if load.poll() is None:
                load.kill()
                load.wait()
            got_ct = count_b()
            loaded = count_a() - base_a
        finally:
            count_b.close()
            count_a.close()
            for spy in spies:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    spy.wait(timeout=60)
        rss1 = {pid: proc_rss_kib(pid) for pid in pair.pids()}
        cpu = [round(proc_cpu(pid) - cpu0[pid], 2) for pid in pair.pids()]
        res = {"n": n, "loaded_on_a": loaded, "load_s": None if t_load is None else t_load - t0,
               "ct_s": None if t_ct is None else t_ct - t0, "ct_on_b": got_ct,
               "rss_kib": {str(p): (rss0[p], rss1[p]) for p in rss0}, "cpu_s": cpu}
        if pair.name == "nftsync":
            res["sessions_s"] = None if t_sess is None else t_sess - t0
            res["sessions_on_b"] = pair.sessions_on_b()
            sb = pair.stats("b")
            res["b_failed"] = {"nft": sb["kernel"]["nft"]["failed"],
                               "ct": sb["kernel"]["conntrack"]["failed"]}
            sa = pair.stats("a")
            res["a_overruns"] = sa["counters"]["ct_overruns"]
            res["resnapshots"] = sum(p["resnapshots"] for p in sa["peers"].values())
        return res
    finally:
        pair.stop()


def steady_lag(lab: Lab, pair, rate: int, seconds: float) -> dict:
    """`rate` new entries/s on A for `seconds`; lag of each one's NEW event on B."""
    lab.reset()
    pair.start()
    base = 160  # 10.160.0.0/11: distinct from the throughput loads
    total = int(rate * seconds)
    per_tick = max(1, rate // 100)
    created = [0.0] * total
    seen = [0.0] * total
    stop = threading.Event()
    with netns.entered(lab.ns["b"]):
        ev = CtEventSocket(groups=EV_NEW, max_events=100_000)
    with netns.entered(lab.ns["a"]):
        writer = CtWriter()
    overruns = [0]

    def listen() -> None:
        got = 0
        while got < total and not stop.is_set():
            r, _, _ = select.select([ev], [], [], 0.2)
            if not r:
                continue
            events = ev.read()
            now = time.monotonic()
            overruns[0] += events.overrun
            for _e, ct in events:
                if ct.orig_src[0] != 10 or not base <= ct.orig_src[1] < base + 32:
                    continue
                i = client_seq(ct.orig_src, base)
                if i < total and not seen[i]:
                    seen[i] = now
                    got += 1

    # Built before the clock starts, so the generator's own CPU stays small.
    ops = [("upsert", CtEntry.make(client(j, base), 1024 + j % 60000, VIP, 80, BACKENDS[j % 2],
                                   80, mark=MARKS[j % 2], timeout=600)) for j in range(total)]
    th = threading.Thread(target=listen, daemon=True)
    spies = profile(lab, pair, "lag", seconds)
    cpu0 = {pid: proc_cpu(pid) for pid in pair.pids()}
    th.start()
    t_start = time.monotonic()
    i = 0
    try:
        tick = 0
        while i < total:
            target = t_start + tick * 0.01
            delay = target - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            batch = ops[i:i + per_tick]
            now = time.monotonic()
            for j in range(i, i + len(batch)):
                created[j] = now
            writer.apply(batch)
            i += len(batch)
            tick += 1
            if time.monotonic() - t_start > seconds * 3:
                break  # the writer itself cannot keep the rate: stop, bounded
        t_gen = time.monotonic() - t_start
        th.join(timeout=30)
        cpu1 = {pid: proc_cpu(pid) for pid in pair.pids()}
        t_all = time.monotonic() - t_start
    finally:
        for spy in spies:
            with contextlib.suppress(subprocess.TimeoutExpired):
                spy.wait(timeout=30)
        stop.set()
        th.join(timeout=5)
        ev.close()
        writer.close()
        pair.stop()
    lags = sorted((seen[j] - created[j]) * 1000 for j in range(i) if seen[j])
    per_s = []  # worst lag of the entries created in each second: shows a build-up
    for s0 in range(0, i, rate):
        w = [(seen[j] - created[j]) * 1000 for j in range(s0, min(i, s0 + rate)) if seen[j]]
        per_s.append(round(max(w), 1) if w else None)
    cpu = sum(cpu1[p] - cpu0[p] for p in cpu0)

    def pct(q: float) -> float | None:
        return lags[min(len(lags) - 1, int(q * len(lags)))] if lags else None

    return {"rate": rate, "generated": i, "gen_s": t_gen, "received": len(lags),
            "p50_ms": pct(0.5), "p99_ms": pct(0.99), "max_ms": lags[-1] if lags else None,
            "mean_ms": statistics.fmean(lags) if lags else None, "overruns": overruns[0],
            "max_ms_per_s": per_s, "cpu_s": cpu, "cpu_pct": 100 * cpu / t_all,
            "cpu_per_pid": {str(p): round(cpu1[p] - cpu0[p], 2) for p in cpu0}}


def tolerant(fn, default=0):
    """A control query that may time out while a daemon is busy (e.g. its start-up dump)."""
    def call():
        try:
            return fn()
        except (OSError, RuntimeError, ValueError):
            return default
    return call


def resync(lab: Lab, pair: NftsyncPair, m: int, timeout: float) -> dict:
    """A's map holds m sessions before its daemon starts (one `nft -f`); A's daemon reads them
    at start-up (a slow, quadratic kernel dump: not timed); then B's daemon starts empty and
    gets them in A's snapshot: time from B's start until B's kernel map received all m."""
    lab.reset()
    f = lab.workdir / f"elements-{m}.nft"
    if not f.exists():
        lines = []
        for s in range(0, m, 5000):
            elems = ", ".join(f"{client(i, 128)} expires 3000s : {MARKS[i % 2]:#x}"
                              for i in range(s, min(m, s + 5000)))
            lines.append(f"add element {MAP_REF} {{ {elems} }}\n")
        f.write_text("".join(lines))
    t0 = time.monotonic()
    netns.run(lab.ns["a"], "nft", "-f", str(f), timeout=timeout)
    t_nft = time.monotonic() - t0
    t0 = time.monotonic()
    pair.start_one("a", timeout)
    a_has = tolerant(lambda: sum(pair.stats("a")["sessions"].values()) >= m, False)
    t_a = wait_until(a_has, timeout, f"A's daemon holding {m} sessions", 0.5) - t0
    t1 = time.monotonic()
    pair.start_one("b", timeout)
    spies = profile(lab, pair, "resync", 15)
    on_b = tolerant(pair.sessions_on_b)
    t_b = wait_until(lambda: on_b() >= m, timeout, f"{m} sessions on B", 0.1)
    res = {"m": m, "nft_load_s": t_nft, "a_startup_s": t_a, "resync_s": t_b - t1,
           "rss_kib": {side: proc_rss_kib(p.pid) for side, p in pair.procs.items()}}
    res["b_failed"] = pair.stats("b")["kernel"]["nft"]["failed"]
    res["b_nft_overruns"] = pair.stats("b")["counters"]["nft_overruns"]
    for spy in spies:
        with contextlib.suppress(subprocess.TimeoutExpired):
            spy.wait(timeout=30)
    pair.stop()
    return res


# -- main ----------------------------------------------------------------------------------------
def fmt(x, unit: str = "", nd: int = 2) -> str:
    return "—" if x is None else f"{x:.{nd}f}{unit}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--systems", default="nftsync,conntrackd")
    ap.add_argument("--rate", type=int, default=10_000)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--resync", type=int, default=1_000_000, help="0: skip")
    ap.add_argument("--skip", default="", help="comma list of: throughput,lag")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--logs", type=Path, help="copy the daemons' logs here at the end")
    ap.add_argument("--profile", type=Path, help="py-spy the nftsync daemons into this dir")
    args = ap.parse_args()
    global PROFILE_DIR
    PROFILE_DIR = args.profile
    if PROFILE_DIR:
        PROFILE_DIR.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    skip = set(args.skip.split(","))
    results: dict = {"machine": {"nproc": os.cpu_count(), "kernel": os.uname().release,
                                 "load_before": os.getloadavg()}}
    with tempfile.TemporaryDirectory(prefix="bench-repl-") as tmp:
        lab = Lab(Path(tmp))
        try:
            lab.up()
            if sizes:
                lab.ensure_ct_max(max(sizes))
            for sysname in args.systems.split(","):
                pair = NftsyncPair(lab) if sysname == "nftsync" else ConntrackdPair(lab)
                r = results.setdefault(sysname, {})
                if "throughput" not in skip:
                    for n in sizes:
                        res = throughput(lab, pair, n, timeout=60 + n / 2000)
                        r.setdefault("throughput", []).append(res)
                        print(f"[{sysname}] throughput {n}: {res}", flush=True)
                if "lag" not in skip:
                    res = steady_lag(lab, pair, args.rate, args.seconds)
                    r["lag"] = res
                    print(f"[{sysname}] lag: {res}", flush=True)
                if sysname == "nftsync" and args.resync:
                    lab.ensure_ct_max(0)
                    res = resync(lab, pair, args.resync, timeout=300)
                    r["resync"] = res
                    print(f"[{sysname}] resync: {res}", flush=True)
        finally:
            if args.logs:
                args.logs.mkdir(parents=True, exist_ok=True)
                for log in Path(tmp).glob("*.log"):
                    (args.logs / log.name).write_bytes(log.read_bytes())
            lab.down()
    results["machine"]["load_after"] = os.getloadavg()
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def print_table(results: dict) -> None:
    ns, cd = results.get("nftsync", {}), results.get("conntrackd", {})
    print("\n| measure | nftsync | conntrackd | ratio (conntrackd time / nftsync time) |")
    print("|---|---|---|---|")
    cdt = {t["n"]: t for t in cd.get("throughput", [])}
    for t in ns.get("throughput", []) or cd.get("throughput", []):
        n = t["n"]
        a = t if ns else None
        b = cdt.get(n)
        ratio = (b["ct_s"] / a["ct_s"]) if a and b and a["ct_s"] and b["ct_s"] else None
        sess = f", sessions {fmt(a.get('sessions_s'), ' s')}" if a else ""
        print(f"| {n} entries on B | conntrack {fmt(a and a['ct_s'], ' s')}{sess} | "
              f"{fmt(b and b['ct_s'], ' s')} | {fmt(ratio, '×')} |")
    for label, key in (("lag p50", "p50_ms"), ("lag p99", "p99_ms"), ("lag max", "max_ms")):
        a, b = ns.get("lag", {}).get(key), cd.get("lag", {}).get(key)
        print(f"| {label} at {results.get('rate', '10k')}/s | {fmt(a, ' ms')} | "
              f"{fmt(b, ' ms')} | |")
    a, b = ns.get("lag", {}).get("cpu_pct"), cd.get("lag", {}).get("cpu_pct")
    print(f"| CPU of both daemons at the steady rate | {fmt(a, ' %', 1)} | {fmt(b, ' %', 1)} | |")
    for sysname, r in (("nftsync", ns), ("conntrackd", cd)):
        for t in r.get("throughput", []):
            d = sum(v[1] - v[0] for v in t["rss_kib"].values())
            print(f"| {sysname} RSS growth, both daemons, {t['n']} entries | "
                  f"{d / 1024:.1f} MiB ({d / 1024 / (t['n'] / 100_000):.1f} MiB/100k) | | |")
    if "resync" in ns:
        r = ns["resync"]
        print(f"| full resync of {r['m']} sessions | {fmt(r['resync_s'], ' s')} | n/a | |")


if __name__ == "__main__":
    sys.exit(main())
