"""Replication benchmark: an `nftsync daemon` pair side by side with a conntrackd pair.

One run creates two namespaces A and B joined by a veth (10.99.0.1/30 - 10.99.0.2/30, no route
out), loads the same bench farm into both, and for each system (nftsync daemons, conntrackd
FTFW/UDP, DisableExternalCache On: the reference configuration in `CONNTRACKD_CONF`) measures:

1. throughput: N DNATed TCP ESTABLISHED entries with the farm's marks and distinct sources are
   loaded on A with `conntrack -R`; time from the start of the load until B holds all N conntrack
   entries (B's nf_conntrack_count) and, for nftsync, all N sessions (B's mirror count minus what
   its kernel writer still has queued);
2. memory, per throughput size: each daemon's RSS growth over the load divided by what it holds
   (nftsync: its conntrack entries plus its sessions, both replicated; conntrackd: the conntrack
   entries) and by connection (N), and its peak (VmHWM) against its RSS once B holds everything;
3. lag at steady rates (`--rates`, default 10k and 40k/s): new entries are written on A through
   `CtWriter` every 10 ms; B's conntrack NEW events are matched to their creation time on A (the
   sequence number is the source address); p50/p99/max, CPU % of each daemon, and the rate the
   generator really achieved (it and the NEW-event listener share this process: its own CPU %
   is printed too, so a generator that cannot keep up is seen, not hidden);
4. event-loop pauses (nftsync): the loop watch's histogram (`ctl stats`, "loop") of both
   daemons taken before and after each steady run; the difference is printed (pauses over 2 ms
   during the run, and the longest);
5. full resync (nftsync only): A's map is loaded with M sessions (one `nft -f`) before A's
   daemon starts and reads them; then B's daemon starts empty: time until B holds all M;
6. start-up beside a big map (nftsync only, `--startup M`): A's map gets M sessions (one
   `nft -f`) while B's daemon runs; then A's daemon starts, and from its process start: (a) the
   first answer of `ctl status`, (b) the first session on B of a new connection made on A after
   the start (a DNATed entry with a farm mark written every 0.5 s with a fresh client, as in 3;
   looked up in B's kernel map with one NFT_MSG_GETSETELEM, not `nft get element`, which lists
   the whole map first), (c) B holding all M sessions (and the new connections'), (d) A's peak
   RSS (VmHWM) during start-up against its RSS once settled. Waits that run out leave a figure
   empty ("—") instead of failing the run.

Run as root: `.venv/bin/python benchmarks/bench_replication.py [--sizes 10000,100000,1000000]
[--rates 10000,40000] [--resync 1000000] [--startup 1000000] [--tls]`. With `--tls` the
nftsync pair runs a second time (throughput, lag, resync) with mutual TLS on its link (a private
CA and certificates made by openssl, tests/kernel/pki.py), and a last table gives TLS / plain
ratios from the same run. The table at the end puts the
figures of both systems of the same run side by side, with the ratio conntrackd / nftsync
(above 1: nftsync faster, lighter or shorter), and `--json F` writes them all.
Everything it starts is stopped by pid and both namespaces are deleted at the end, also on
failure. When a load needs more than the global `net.netfilter.nf_conntrack_max` allows, it is
raised for the run and restored after. No packets are sent apart from the replication traffic
itself on the veth.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
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
from pki import Ca  # noqa: E402

from nftsync.conntrack import CtEntry  # noqa: E402
from nftsync.netlink.core import (  # noqa: E402
    NETLINK_NETFILTER,
    NFNL_SUBSYS_NFTABLES,
    NLA_F_NESTED,
    NLM_F_ACK,
    NLM_F_REQUEST,
    NetlinkError,
    NetlinkSocket,
    nfgenmsg,
    nfnl_type,
    nla,
    nla_str,
    nlmsg,
)
from nftsync.netlink.ctnetlink import EV_NEW  # noqa: E402
from nftsync.netlink.ctsocket import CtEventSocket, CtWriter  # noqa: E402
from nftsync.netlink.nftables import (  # noqa: E402
    NFTA_SET_ELEM_LIST_ELEMENTS,
    NFTA_SET_ELEM_LIST_SET,
    NFTA_SET_ELEM_LIST_TABLE,
)
from nftsync.netlink.nftwriter import encode_delete  # noqa: E402

ADDR = {"a": "10.99.0.1", "b": "10.99.0.2"}
VIP, MARKS, BACKENDS = "10.10.0.100", (0x200, 0x201), ("10.20.0.11", "10.20.0.12")
MAP_REF = "ip nftsync_bench sessions"
LAG_BASE, PROBE_BASE = 160, 224  # client ranges (see `client`): steady-rate load, start-up probes
NFT_MSG_GETSETELEM = 13
NFPROTO_IPV4 = 2
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
    return sum(proc_cpu_split(pid))


def proc_cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process in seconds: user space (for nftsync: Python) and the
    kernel's work done in its system calls (conntrack and map writes, event delivery)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tck, int(fields[12]) / tck


def proc_mem_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (the peak RSS since the process started), in KiB."""
    out = {"rss": 0, "hwm": 0}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            out["rss"] = int(line.split()[1])
        elif line.startswith("VmHWM:"):
            out["hwm"] = int(line.split()[1])
    return out


def proc_rss_kib(pid: int) -> int:
    return proc_mem_kib(pid)["rss"]


class ElemProbe:
    """Is this one key in a namespace's bench session map? One NFT_MSG_GETSETELEM naming the
    key (a hash lookup in the kernel, microseconds at any map size); `nft get element` would
    first list the whole map into its cache: 37 s for a 1M map on the project VM."""

    def __init__(self, ns: str) -> None:
        with netns.entered(ns):
            self.sock = NetlinkSocket(NETLINK_NETFILTER)
        table, name = MAP_REF.split()[1:]
        self.head = (nfgenmsg(NFPROTO_IPV4) + nla_str(NFTA_SET_ELEM_LIST_TABLE, table)
                     + nla_str(NFTA_SET_ELEM_LIST_SET, name))

    def has(self, addr: str) -> bool:
        seq = self.sock.next_seq()
        body = self.head + nla(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED,
                               encode_delete(socket.inet_aton(addr)))
        msg = nlmsg(nfnl_type(NFNL_SUBSYS_NFTABLES, NFT_MSG_GETSETELEM),
                    NLM_F_REQUEST | NLM_F_ACK, seq, body)
        try:
            return sum(1 for _ in self.sock.request(msg, seq, timeout=5.0)) > 0
        except NetlinkError as e:
            if e.errno == errno.ENOENT:
                return False
            raise

    def close(self) -> None:
        self.sock.close()


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

    def __init__(self, lab: Lab, tls: bool = False) -> None:
        self.lab = lab
        # --tls: a private CA and one certificate per side (its sync IP in subjectAltName), made
        # by openssl as docs/daemon.md shows; the daemons get --tls-cert/--tls-key/--tls-ca.
        self.tls: dict[str, tuple[str, ...]] = {}
        if tls:
            ca = Ca.create(lab.workdir / "pki", "bench-ca")
            self.tls = {side: ca.node(f"bench-{side}", ADDR[side]).flags() for side in ADDR}
        self.key = lab.workdir / "key"
        if not self.key.exists():
            fd = os.open(self.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(os.urandom(32).hex() + "\n")
        self.procs: dict[str, subprocess.Popen] = {}

    def sock(self, side: str) -> Path:
        return self.lab.workdir / f"nftsync-{side}.sock"

    def start_one(self, side: str, timeout: float = 30.0) -> None:
        self.spawn_one(side)
        wait_until(lambda: self.sock(side).exists(), timeout, f"nftsync {side} control socket")

    def spawn_one(self, side: str) -> subprocess.Popen:
        """Start one daemon without waiting for anything (`ip netns exec` execs it: same pid)."""
        peer = ADDR["b" if side == "a" else "a"]
        node_id = 1 if side == "a" else 2
        cmd = [sys.executable, "-m", "nftsync", "daemon", "--listen", f"{ADDR[side]}:7777",
               "--peer", f"{peer}:7777", "--key-file", str(self.key),
               "--socket", str(self.sock(side)), "--node-name", f"bench-{side}",
               "--node-id", str(node_id), "--cluster", "bench",
               "--role", "active" if side == "a" else "backup", *self.tls.get(side, ())]
        if REALTIME:
            conf = self.lab.workdir / "nftsync-realtime.toml"
            conf.write_text(f"realtime_priority = {REALTIME}\n")
            cmd += ["--config", str(conf)]
        self.sock(side).unlink(missing_ok=True)
        self.procs[side] = self.lab.spawn(side, cmd, self.lab.workdir / f"nftsync-{side}.log")
        return self.procs[side]

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
REALTIME = 0  # realtime_priority of the nftsync daemons (--realtime)


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
        mem0 = {side: proc_mem_kib(p.pid) for side, p in pair.procs.items()}
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
        mem1 = {side: proc_mem_kib(p.pid) for side, p in pair.procs.items()}
        cpu = [round(proc_cpu(pid) - cpu0[pid], 2) for pid in pair.pids()]
        res = {"n": n, "loaded_on_a": loaded, "load_s": None if t_load is None else t_load - t0,
               "ct_s": None if t_ct is None else t_ct - t0, "ct_on_b": got_ct,
               "rss_kib": {side: (mem0[side]["rss"], mem1[side]["rss"]) for side in mem0},
               "hwm_kib": {side: mem1[side]["hwm"] for side in mem1}, "cpu_s": cpu}
        held = {side: loaded for side in mem0}  # conntrackd: the conntrack entries
        if pair.name == "nftsync":
            held = {}
            for side in mem0:
                st = tolerant(lambda s=side: pair.stats(s), None)()
                held[side] = None if st is None else st["conntrack"] + sum(st["sessions"].values())
        res["memory"] = memory_per_entry(mem0, mem1, held, loaded)
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


def memory_per_entry(mem0: dict, mem1: dict, held: dict, conns: int) -> dict:
    """Per daemon: RSS growth over the load in bytes per entry it holds (nftsync: conntrack
    entries + sessions; conntrackd: conntrack entries) and per connection, and its peak."""
    out = {}
    for side in mem0:
        grow = (mem1[side]["rss"] - mem0[side]["rss"]) * 1024
        out[side] = {"growth_kib": grow // 1024, "entries": held[side],
                     "b_per_entry": round(grow / held[side]) if held[side] else None,
                     "b_per_conn": round(grow / conns) if conns else None,
                     "rss_kib": mem1[side]["rss"], "hwm_kib": mem1[side]["hwm"]}
    return out


def loop_delta(before: dict | None, after: dict | None) -> dict | None:
    """The loop watch's histogram over a run: `after - before` (cumulative `le_ms` buckets).
    The longest pause is exact when it grew during the run; otherwise the run's longest is at
    most the smallest bucket bound holding every sample of the run (`max_le_ms`)."""
    if not before or not after:
        return None
    le = {k: v - before["le_ms"].get(k, 0) for k, v in after["le_ms"].items()}
    samples = after["samples"] - before["samples"]
    grew = after["max_ms"] > before["max_ms"]
    bound = next((k for k, v in le.items() if v >= samples), "+Inf")
    per_bucket, prev = {}, 0
    for k, v in le.items():
        per_bucket[k] = v - prev
        prev = v
    return {"samples": samples, "over_2ms": after["over_2ms"] - before["over_2ms"],
            "sum_ms": round(after["sum_ms"] - before["sum_ms"], 1),
            "max_ms": after["max_ms"] if grew else None, "max_le_ms": bound,
            "le_ms": le, "count_le_ms": {k: v for k, v in per_bucket.items() if v}}


def gc_delta(before: dict | None, after: dict | None) -> dict | None:
    """Cyclic GC collections and time over a run, all generations together, and the longest."""
    if not before or not after:
        return None
    gens = list(after)
    return {"collections": sum(after[g]["collections"] - before[g]["collections"] for g in gens),
            "sum_ms": round(sum(after[g]["sum_ms"] - before[g]["sum_ms"] for g in gens), 1),
            "max_ms_since_start": max(after[g]["max_ms"] for g in gens)}


def steady_lag(lab: Lab, pair, rate: int, seconds: float) -> dict:
    """`rate` new entries/s on A for `seconds`; lag of each one's NEW event on B."""
    lab.reset()
    total = int(rate * seconds)
    lab.ensure_ct_max(total)
    pair.start()
    base = LAG_BASE  # 10.160.0.0/11: distinct from the throughput loads
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
    spies = profile(lab, pair, f"lag-{rate}", seconds)
    loops = tolerant(lambda: {s: {"loop": st["loop"], "gc": st.get("gc")} for s in pair.procs
                              for st in (pair.stats(s),)}, None) \
        if pair.name == "nftsync" else (lambda: None)
    loop0 = loops()
    pids = {side: p.pid for side, p in pair.procs.items()}
    cpu0 = {side: proc_cpu_split(pid) for side, pid in pids.items()}
    own0 = time.process_time()
    th.start()
    t_start = time.monotonic()
    i = 0
    late_ticks = 0  # ticks that started more than one tick late: the generator fell behind
    try:
        tick = 0
        while i < total:
            target = t_start + tick * 0.01
            delay = target - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            elif delay < -0.01:
                late_ticks += 1
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
        own_gen = time.process_time() - own0
        th.join(timeout=30)
        cpu1 = {side: proc_cpu_split(pid) for side, pid in pids.items()}
        t_all = time.monotonic() - t_start
        loop1 = loops()
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
    user = {side: cpu1[side][0] - cpu0[side][0] for side in cpu0}
    cpu = {side: user[side] + cpu1[side][1] - cpu0[side][1] for side in cpu0}

    def pct(q: float) -> float | None:
        return lags[min(len(lags) - 1, int(q * len(lags)))] if lags else None

    res = {"rate": rate, "generated": i, "gen_s": t_gen,
           "achieved_rate": round(i / t_gen) if t_gen else None, "late_ticks": late_ticks,
           "generator_cpu_pct": round(100 * own_gen / t_gen, 1) if t_gen else None,
           "received": len(lags),
           "p50_ms": pct(0.5), "p99_ms": pct(0.99), "max_ms": lags[-1] if lags else None,
           "mean_ms": statistics.fmean(lags) if lags else None, "overruns": overruns[0],
           "max_ms_per_s": per_s, "cpu_s": sum(cpu.values()),
           "cpu_pct": 100 * sum(cpu.values()) / t_all,
           "cpu_pct_per_daemon": {side: round(100 * c / t_all, 1) for side, c in cpu.items()},
           "user_pct_per_daemon": {side: round(100 * c / t_all, 1) for side, c in user.items()}}
    if pair.name == "nftsync":
        res["loop"] = {side: loop_delta(loop0 and loop0[side]["loop"],
                                        loop1 and loop1[side]["loop"]) for side in pids}
        res["gc"] = {side: gc_delta(loop0 and loop0[side]["gc"], loop1 and loop1[side]["gc"])
                     for side in pids}
    return res


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
    t_nft = load_map(lab, "a", m, timeout)
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


def load_map(lab: Lab, side: str, m: int, timeout: float) -> float:
    """Put m sessions (10.128.0.0/12, expires 3000 s) into a side's map with one `nft -f`;
    returns how long it took."""
    f = lab.workdir / f"elements-{m}.nft"
    if not f.exists():
        lines = []
        for s in range(0, m, 5000):
            elems = ", ".join(f"{client(i, 128)} expires 3000s : {MARKS[i % 2]:#x}"
                              for i in range(s, min(m, s + 5000)))
            lines.append(f"add element {MAP_REF} {{ {elems} }}\n")
        f.write_text("".join(lines))
    t0 = time.monotonic()
    netns.run(lab.ns[side], "nft", "-f", str(f), timeout=timeout)
    return time.monotonic() - t0


def startup(lab: Lab, pair: NftsyncPair, m: int, timeout: float) -> dict:
    """A's map holds m sessions and B's daemon runs; A's daemon starts. From A's process start:
    (a) `ctl status` answers, (b) a connection made on A after the start has its session in B's
    kernel map, (c) B holds all m sessions (+ the connections'), (d) A's peak RSS vs settled.
    Waits that run out leave their figure None: the run goes on and the table shows "—"."""
    lab.reset()
    pair.start_one("b")
    t_nft = load_map(lab, "a", m, timeout)
    with netns.entered(lab.ns["a"]):
        writer = CtWriter()
    probe = ElemProbe(lab.ns["b"])
    sock_a = pair.sock("a")
    sock_a.unlink(missing_ok=True)
    marks: dict[str, float] = {}  # what the ctl thread saw, in seconds from A's start
    done = threading.Event()
    t0 = time.monotonic()
    deadline = t0 + timeout
    proc = pair.spawn_one("a")

    def watch_ctl() -> None:
        """Ask A `status` until it answers, then `stats` until A holds the m sessions. One
        request at a time with a long socket timeout: a busy daemon answers when it can, and
        that moment is what is measured (bounded by the deadline)."""
        while not done.is_set() and time.monotonic() < deadline:
            left = max(0.1, min(30.0, deadline - time.monotonic()))
            try:
                if "ctl_s" not in marks:
                    control(sock_a, "status", timeout=left)
                    marks["ctl_s"] = time.monotonic() - t0
                    continue
                if sum(control(sock_a, "stats", timeout=left)["sessions"].values()) >= m:
                    marks["a_sessions_s"] = time.monotonic() - t0
                    return
            except (OSError, RuntimeError, ValueError):
                pass
            time.sleep(0.05 if "ctl_s" not in marks else 0.25)

    th = threading.Thread(target=watch_ctl, daemon=True)
    th.start()
    probes: list[tuple[str, float]] = []  # (client, made at: s from A's start)
    t_first = first_probe = t_all = None
    count_b, last_count, next_probe = 0, 0.0, 0.0
    rss_trace = []  # A's RSS every 5 s (MiB): where the start-up's memory goes
    next_rss = 1.0
    exited = None
    try:
        while time.monotonic() < deadline:
            now = time.monotonic() - t0
            if proc.poll() is not None:
                exited = proc.returncode
                break
            if now >= next_rss:
                next_rss += 5.0
                with contextlib.suppress(OSError):
                    rss_trace.append((round(now, 1), proc_rss_kib(proc.pid) // 1024))
            if t_first is None and now >= next_probe:
                next_probe += 0.5
                k = len(probes)
                addr = client(k, PROBE_BASE)
                writer.apply([("upsert", CtEntry.make(addr, 1024 + k, VIP, 80, BACKENDS[k % 2],
                                                      80, mark=MARKS[k % 2], timeout=600))])
                probes.append((addr, time.monotonic() - t0))
            if t_first is None:
                for addr, at in probes:
                    if probe.has(addr):
                        t_first, first_probe = time.monotonic() - t0, {"client": addr,
                                                                         "created_s": at}
                        break
            elif t_all is None and now - last_count >= 0.25:
                # The map's m, not counting the new connections: those made before A opened
                # its event sockets have no session (A's start-up dump of conntrack learns no
                # sessions: on a real node the farm's rule has put them in the map already).
                last_count = now
                count_b = tolerant(pair.sessions_on_b)()
                if count_b - sum(probe.has(addr) for addr, _ in probes) >= m:
                    t_all = time.monotonic() - t0
            if t_all is not None and "a_sessions_s" in marks:
                break
            time.sleep(0.05)
        done.set()
        th.join(timeout=35)
        settled = {}
        if exited is None and t_all is not None:
            time.sleep(2.0)  # settled: B holds everything; A's own read may finish later
            settled = proc_mem_kib(proc.pid)
        mem = proc_mem_kib(proc.pid) if exited is None else {}
        probes_on_b = sum(probe.has(addr) for addr, _ in probes)
        a_stats = tolerant(lambda: pair.stats("a"), None)()
        b_stats = tolerant(lambda: pair.stats("b"), None)()
    finally:
        done.set()
        writer.close()
        probe.close()
        pair.stop()
    return {"m": m, "nft_load_s": t_nft, "timeout_s": timeout, "a_exited": exited,
            "ctl_s": marks.get("ctl_s"), "new_conn_on_b_s": t_first, "first_probe": first_probe,
            "probes": len(probes), "probes_on_b": probes_on_b, "all_on_b_s": t_all,
            "sessions_on_b": count_b,
            "a_sessions_s": marks.get("a_sessions_s"),
            "a_hwm_kib": mem.get("hwm"), "a_rss_settled_kib": settled.get("rss"),
            "a_rss_end_kib": mem.get("rss"), "a_rss_trace_mib": rss_trace,
            "a_loop": a_stats and a_stats["loop"],
            "a_sessions_end": a_stats and sum(a_stats["sessions"].values()),
            "b_sessions_end": b_stats and sum(b_stats["sessions"].values()),
            "b_failed": b_stats and b_stats["kernel"]["nft"]["failed"]}


# -- main ----------------------------------------------------------------------------------------
def fmt(x, unit: str = "", nd: int = 2) -> str:
    return "—" if x is None else f"{x:.{nd}f}{unit}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--systems", default="nftsync,conntrackd")
    ap.add_argument("--rates", default="10000,40000",
                    help="steady rates (new entries/s on A), one lag run per rate and system")
    ap.add_argument("--rate", type=int, help="one steady rate (the same as --rates N)")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each steady run")
    ap.add_argument("--resync", type=int, default=1_000_000, help="0: skip")
    ap.add_argument("--startup", type=int, default=1_000_000,
                    help="sessions in A's map when its daemon starts (nftsync); 0: skip")
    ap.add_argument("--startup-timeout", type=float,
                    help="bound of the start-up measurement in s (default 120 + M/2000)")
    ap.add_argument("--skip", default="", help="comma list of: throughput,lag")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--logs", type=Path, help="copy the daemons' logs here at the end")
    ap.add_argument("--profile", type=Path, help="py-spy the nftsync daemons into this dir")
    ap.add_argument("--tls", action="store_true",
                    help="also run the nftsync pair with mutual TLS (a CA and certificates made "
                    "with openssl), after the plain one, and print TLS / plain ratios")
    ap.add_argument("--realtime", type=int, default=0, metavar="N",
                    help="run the nftsync daemons with realtime_priority = N (SCHED_RR, as "
                    "conntrackd runs by default at 99); 0: SCHED_OTHER")
    args = ap.parse_args()
    global PROFILE_DIR, REALTIME
    PROFILE_DIR = args.profile
    REALTIME = args.realtime
    if PROFILE_DIR:
        PROFILE_DIR.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",") if s and int(s)]
    rates = [args.rate] if args.rate else [int(r) for r in args.rates.split(",") if r]
    skip = set(args.skip.split(","))
    results: dict = {"machine": {"nproc": os.cpu_count(), "kernel": os.uname().release,
                                 "load_before": os.getloadavg()},
                     "args": {"sizes": sizes, "rates": rates, "seconds": args.seconds,
                              "resync": args.resync, "startup": args.startup,
                              "realtime": args.realtime, "tls": args.tls}}
    systems = args.systems.split(",")
    if args.tls:
        at = systems.index("nftsync") + 1 if "nftsync" in systems else len(systems)
        systems.insert(at, "nftsync-tls")
    with tempfile.TemporaryDirectory(prefix="bench-repl-") as tmp:
        lab = Lab(Path(tmp))
        try:
            lab.up()
            if sizes:
                lab.ensure_ct_max(max(sizes))
            for sysname in systems:
                pair = NftsyncPair(lab, tls=sysname == "nftsync-tls") \
                    if sysname.startswith("nftsync") else ConntrackdPair(lab)
                r = results.setdefault(sysname, {})
                if "throughput" not in skip:
                    for n in sizes:
                        res = throughput(lab, pair, n, timeout=60 + n / 2000)
                        r.setdefault("throughput", []).append(res)
                        print(f"[{sysname}] throughput {n}: {res}", flush=True)
                if "lag" not in skip:
                    for rate in rates:
                        res = steady_lag(lab, pair, rate, args.seconds)
                        r.setdefault("lag", []).append(res)
                        print(f"[{sysname}] lag at {rate}/s: {res}", flush=True)
                if sysname.startswith("nftsync") and args.resync:
                    res = resync(lab, pair, args.resync, timeout=300)
                    r["resync"] = res
                    print(f"[{sysname}] resync: {res}", flush=True)
                if sysname == "nftsync" and args.startup:
                    bound = args.startup_timeout or 120 + args.startup / 2000
                    res = startup(lab, pair, args.startup, timeout=bound)
                    r["startup"] = res
                    print(f"[{sysname}] startup: {res}", flush=True)
        finally:
            if args.logs:
                args.logs.mkdir(parents=True, exist_ok=True)
                for log in Path(tmp).glob("*.log"):
                    (args.logs / log.name).write_bytes(log.read_bytes())
            lab.down()
    results["machine"]["load_after"] = os.getloadavg()
    print_table(results)
    if "nftsync-tls" in results:
        print_tls_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def ratio(cd, ns) -> float | None:
    """conntrackd's figure / nftsync's: above 1, nftsync is faster, lighter or shorter."""
    return cd / ns if cd is not None and ns and cd >= 0 and ns > 0 else None


def row(label: str, ns: str, cd: str = "n/a", r: float | None = None) -> None:
    print(f"| {label} | {ns} | {cd} | {fmt(r, '×')} |")


def mib(kib) -> str:
    return "—" if kib is None else f"{kib / 1024:.0f} MiB"


def loop_text(d: dict | None) -> str:
    if not d:
        return "—"
    mx = f"{d['max_ms']:.1f} ms" if d["max_ms"] is not None else f"≤ {d['max_le_ms']} ms"
    return f"{d['over_2ms']} over 2 ms of {d['samples']}, max {mx}"


def print_table(results: dict) -> None:
    ns, cd = results.get("nftsync", {}), results.get("conntrackd", {})
    print("\n| measure | nftsync | conntrackd | ratio conntrackd / nftsync (> 1: nftsync better) |")
    print("|---|---|---|---|")
    cdt = {t["n"]: t for t in cd.get("throughput", [])}
    nst = {t["n"]: t for t in ns.get("throughput", [])}
    for n in sorted(set(cdt) | set(nst)):
        a, b = nst.get(n), cdt.get(n)
        sess = f", sessions {fmt(a.get('sessions_s'), ' s')}" if a else ""
        row(f"{n} entries on B", f"conntrack {fmt(a and a['ct_s'], ' s')}{sess}",
            fmt(b and b["ct_s"], " s"), ratio(b and b["ct_s"], a and a["ct_s"]))
    for n in sorted(set(cdt) | set(nst)):
        a, b = (nst.get(n) or {}).get("memory"), (cdt.get(n) or {}).get("memory")

        def per(m, key):
            return None if not m or None in (m["a"][key], m["b"][key]) else \
                m["a"][key] + m["b"][key]

        row(f"{n}: RSS growth per connection, A + B", fmt(per(a, "b_per_conn"), " B", 0) +
            (f" (A {a['a']['b_per_conn']}, B {a['b']['b_per_conn']})" if a else ""),
            fmt(per(b, "b_per_conn"), " B", 0) +
            (f" (A {b['a']['b_per_conn']}, B {b['b']['b_per_conn']})" if b else ""),
            ratio(per(b, "b_per_conn"), per(a, "b_per_conn")))
        def both(m, key):
            return "—" if not m else f"{fmt(m['a'][key], ' B', 0)} / {fmt(m['b'][key], ' B', 0)}"

        row(f"{n}: RSS growth per replicated entry (nftsync: conntrack + session; "
            "conntrackd: conntrack), A / B (ratio: A's)", both(a, "b_per_entry"),
            both(b, "b_per_entry"), ratio(b and b["a"]["b_per_entry"],
                                          a and a["a"]["b_per_entry"]))

        def peak(m):
            return "—" if not m else " ; ".join(
                f"{s.upper()} {mib(m[s]['hwm_kib'])} / {mib(m[s]['rss_kib'])}" for s in ("a", "b"))

        row(f"{n}: peak RSS (VmHWM) / RSS after the load", peak(a), peak(b))
    cdl = {x["rate"]: x for x in cd.get("lag", [])}
    nsl = {x["rate"]: x for x in ns.get("lag", [])}
    for rate in sorted(set(cdl) | set(nsl)):
        a, b = nsl.get(rate, {}), cdl.get(rate, {})

        def got(x):
            return "—" if not x else (f"{x['achieved_rate']}/s ({x['generated']} made, "
                                      f"{x['received']} seen on B, generator CPU "
                                      f"{x['generator_cpu_pct']} %)")

        row(f"rate achieved, asked {rate}/s (lags: of the entries seen on B)", got(a), got(b))
        for label, key in (("p50", "p50_ms"), ("p99", "p99_ms"), ("max", "max_ms")):
            row(f"lag {label} at {rate}/s", fmt(a.get(key), " ms"), fmt(b.get(key), " ms"),
                ratio(b.get(key), a.get(key)))

        def cpu(x):
            if not x:
                return "—"
            d, u = x["cpu_pct_per_daemon"], x.get("user_pct_per_daemon", {})
            return (f"{x['cpu_pct']:.1f} % (A {d['a']} %, B {d['b']} %; of which user space "
                    f"A {u.get('a', '?')} %, B {u.get('b', '?')} %)")

        row(f"CPU of the daemons at {rate}/s (% of one core)", cpu(a), cpu(b),
            ratio(b.get("cpu_pct"), a.get("cpu_pct")))
        for side in ("a", "b"):
            g = (a.get("gc") or {}).get(side)
            gc_text = "" if not g else (f"; cyclic GC: {g['collections']} collections, "
                                        f"{g['sum_ms']} ms")
            row(f"nftsync {side.upper()}'s event-loop pauses during the {rate}/s run",
                loop_text((a.get("loop") or {}).get(side)) + gc_text)
    if "resync" in ns:
        r = ns["resync"]
        row(f"full resync of {r['m']} sessions", fmt(r["resync_s"], " s"))
    if "startup" in ns:
        r = ns["startup"]
        m = r["m"]
        row(f"start-up beside {m} sessions: A's `ctl status` answers", fmt(r["ctl_s"], " s"))
        row(f"start-up beside {m}: a connection made on A after its start has its session on B",
            fmt(r["new_conn_on_b_s"], " s") + (
                f" (made at {r['first_probe']['created_s']:.1f} s)" if r["first_probe"] else ""))
        short = f" (not within {r['timeout_s']:.0f} s: A held {r['a_sessions_end']}, B " \
            f"{r['b_sessions_end']})"
        row(f"start-up beside {m}: B holds all {m} sessions", fmt(r["all_on_b_s"], " s") +
            ("" if r["all_on_b_s"] is not None else short))
        row(f"start-up beside {m}: A holds all {m} sessions", fmt(r["a_sessions_s"], " s") +
            ("" if r["a_sessions_s"] is not None else short))
        row(f"start-up beside {m}: A's peak RSS (VmHWM) / RSS settled",
            f"{mib(r['a_hwm_kib'])} / {mib(r['a_rss_settled_kib'])}")


def print_tls_table(results: dict) -> None:
    """The cost of TLS: the nftsync pair's figures plain and with --tls, from the same run."""
    plain, tls = results.get("nftsync", {}), results["nftsync-tls"]

    def ratio_tls(t, p) -> str:
        return fmt(t / p if t is not None and p else None, "×")

    print("\n| measure (nftsync) | plain TCP | mutual TLS 1.3 | TLS / plain |")
    print("|---|---|---|---|")
    pt = {x["n"]: x for x in plain.get("throughput", [])}
    for x in tls.get("throughput", []):
        p = pt.get(x["n"], {})
        for key, label in (("ct_s", "conntrack entries"), ("sessions_s", "sessions")):
            print(f"| {x['n']} {label} on B | {fmt(p.get(key), ' s')} | "
                  f"{fmt(x.get(key), ' s')} | {ratio_tls(x.get(key), p.get(key))} |")
        pc, tc = sum(p.get("cpu_s") or [0]) or None, sum(x.get("cpu_s") or [0]) or None
        print(f"| {x['n']}: CPU of both daemons over the load | {fmt(pc, ' s')} | "
              f"{fmt(tc, ' s')} | {ratio_tls(tc, pc)} |")
    pl = {x["rate"]: x for x in plain.get("lag", [])}
    for x in tls.get("lag", []):
        p = pl.get(x["rate"], {})
        print(f"| rate achieved, asked {x['rate']}/s | {p.get('achieved_rate', '—')}/s | "
              f"{x.get('achieved_rate', '—')}/s | |")
        for key in ("p50_ms", "p99_ms", "max_ms"):
            print(f"| lag {key[:-3]} at {x['rate']}/s | {fmt(p.get(key), ' ms')} | "
                  f"{fmt(x.get(key), ' ms')} | {ratio_tls(x.get(key), p.get(key))} |")
        print(f"| CPU of both daemons at {x['rate']}/s (% of one core) | "
              f"{fmt(p.get('cpu_pct'), ' %', 1)} | {fmt(x.get('cpu_pct'), ' %', 1)} | "
              f"{ratio_tls(x.get('cpu_pct'), p.get('cpu_pct'))} |")
    if "resync" in tls:
        p, t = plain.get("resync", {}).get("resync_s"), tls["resync"]["resync_s"]
        print(f"| full resync of {tls['resync']['m']} sessions | {fmt(p, ' s')} | "
              f"{fmt(t, ' s')} | {ratio_tls(t, p)} |")


if __name__ == "__main__":
    sys.exit(main())
