"""Failover benchmark: kill the active load balancer under load and measure what clients noticed.

The whole stack runs in the netns lab (netns-lab/lab.sh): keepalived on lb1 and lb2
(netns-lab/ha.sh, advert_int 0.1 s by default), an `nftsync daemon` on each (both started as
`backup`; keepalived's notify script promotes the MASTER's), the HTTP farm balancing tcp/80 and
the lab's stream port 7000 on both. Each run:

1. fresh kernels (ruleset and conntrack emptied, the farm applied), daemons, `ha.sh up`;
2. N sticky clients make one request each through the VIP (their sessions), S long-lived streams
   of numbered lines start (port 7000), and a prober makes one short request every ~10 ms
   (connect timeout 0.1 s) from its own source address;
3. once lb2's kernel holds the sticky sessions and the streams' conntrack entries, lb1 is killed
   (`ha.sh kill`: links down, every process in it SIGKILLed, the daemon included);
4. measured: the VIP move time (kill -> VIP address on lb2, from `ip -j addr`), the prober's gap
   (the longest time without a successful answer, from just before the kill), the share of sticky
   clients whose next connection lands on the same backend, the share of streams that survived
   (no reset, no EOF, no missing line, one backend, data flowing again: longest silence under
   3 s with ≥ 4 s of stream after the kill), and how long keepalived's notify took to promote
   lb2's daemon (from the notify log).

Then min/median/max over the runs. `--no-daemon` runs the same without the sync daemons (the
baseline the daemon exists to beat). Everything is bounded; the lab, keepalived and the daemons
are stopped by pid and the lab's namespaces deleted at the end, also on failure or ^C.

Run as root: `.venv/bin/python benchmarks/bench_failover.py [--runs 5] [--clients 100]
[--streams 4] [--advert-int 0.1] [--no-daemon] [--json FILE]`.
"""

from __future__ import annotations

import argparse
import json
import re
import select
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "kernel"))

import netns  # noqa: E402
from daemons import SYNC4, DaemonProc, make_key, wait_for  # noqa: E402
from ha import Ha  # noqa: E402
from helpers import RULESETS, map_elements, reset_node  # noqa: E402
from lab import CLIENT_PY, STREAM_PORT, VIP4, Lab, client4  # noqa: E402

NODES = ("lb1", "lb2")
PEER = {"lb1": "lb2", "lb2": "lb1"}
STREAM_SECONDS = 8.0   # streams start ~2 s before the kill: ≥ 4 s of stream after it
PROBE_SECONDS = 7.0
PROBE_SRC = 250
STREAM_SRC0 = 200      # streams from 10.10.1.201 ...
PROMOTE_RE = re.compile(r"ok \((\d+) ms\)")

# rtnetlink: multicast groups and message types (linux/rtnetlink.h)
RTMGRP_LINK, RTMGRP_IPV4_IFADDR = 0x1, 0x10
RTM_NEWLINK, RTM_NEWADDR = 16, 20
IFF_UP = 0x1
NLMSG_HDR = struct.Struct("=IHHII")
IFINFOMSG = struct.Struct("=BxHiII")


class MoveWatcher:
    """Kernel timestamps of the failover, from rtnetlink events rather than polling `ip`: when
    lb1's `front` link goes down (the crash, as the network sees it) and when the VIP address
    appears on lb2. Polling with `ip netns exec` costs tens of ms per look on a busy host, and
    the VIP stays listed on the dead node until `ha.sh kill` has finished reaping it."""

    def __init__(self, lab: Lab):
        with netns.entered(lab.ns("lb1")):
            self.links = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        with netns.entered(lab.ns("lb2")):
            self.addrs = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self.links.bind((0, RTMGRP_LINK))
        self.addrs.bind((0, RTMGRP_IPV4_IFADDR))
        self.down_at: float | None = None
        self.vip_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        vip = socket.inet_aton(VIP4)
        deadline = time.monotonic() + 120
        while not self._stop.is_set() and time.monotonic() < deadline:
            ready, _, _ = select.select([self.links, self.addrs], [], [], 0.1)
            for sock in ready:
                data, now = sock.recv(65536), time.time()
                for kind, body in messages(data):
                    if (sock is self.links and kind == RTM_NEWLINK and self.down_at is None
                            and b"front\0" in body
                            and not IFINFOMSG.unpack_from(body)[3] & IFF_UP):
                        self.down_at = now
                    elif (sock is self.addrs and kind == RTM_NEWADDR and self.vip_at is None
                            and vip in body):
                        self.vip_at = now

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.links.close()
        self.addrs.close()


def messages(data: bytes):
    """(type, payload) of each netlink message in one datagram (bounded by its own lengths)."""
    off = 0
    while off + NLMSG_HDR.size <= len(data):
        length, kind, _, _, _ = NLMSG_HDR.unpack_from(data, off)
        if length < NLMSG_HDR.size or off + length > len(data):
            return
        yield kind, data[off + NLMSG_HDR.size:off + length]
        off += (length + 3) & ~3


@dataclass
class Run:
    vip_move_ms: float                # lb1's front link down -> VIP on lb2 (rtnetlink events)
    kill_to_vip_ms: float             # `ha.sh kill lb1` started -> VIP on lb2
    gap_ms: float
    sticky_kept_pct: float
    streams_kept_pct: float
    stream_silence_ms: float          # the longest silence of the worst surviving stream
    promote_ms: float | None          # notify script: `nftsync ctl promote` on lb2
    probes_failed: int
    sticky_moved: list[str]
    streams_broken: list[dict]


def sessions(lab: Lab, node: str) -> dict[str, int]:
    farm = map_elements(lab, node, "ip", "nftsync_http", "http_sessions")
    return {k: v["mark"] for k, v in farm.items()}


def stream_sources_on(lab: Lab, node: str, sources: list[str]) -> set[str]:
    out = lab.exec(node, "conntrack", "-L", "-p", "tcp", "--dport", str(STREAM_PORT),
                   check=False).stdout
    return {s for s in sources for ln in out.splitlines()
            if "ESTABLISHED" in ln and f"src={s} " in ln}


def links_up(lab: Lab, node: str) -> None:
    for dev in ("front", "back", "sync"):
        lab.exec(node, "ip", "link", "set", dev, "up")


def one_run(lab: Lab, farm: Path, key: Path, n_clients: int, n_streams: int,
            advert_int: float, with_daemon: bool) -> Run:
    ha = Ha(lab, advert_int=advert_int)
    daemons: list[DaemonProc] = []
    prober = None
    try:
        for node in NODES:
            links_up(lab, node)
            reset_node(lab, node)
            lab.exec(node, sys.executable, "-m", "nftsync", "apply", str(farm))
            (lab.state_dir / f"{node}.sock").unlink(missing_ok=True)
        if with_daemon:
            for i, node in enumerate(NODES, 1):
                d = DaemonProc(lab.ns(node), node, i, SYNC4[node], [SYNC4[PEER[node]]], key,
                               lab.state_dir)
                daemons.append(d.start())
            for d in daemons:
                d.wait(lambda d=d: d.peers_up() >= 1, 20, "peer connected")
        ha.up()
        if with_daemon:
            wait_for(lambda: daemons[0].ctl("status")["role"] == "active", 10, "lb1 promoted")

        sticky = [client4(i) for i in range(1, n_clients + 1)]
        before = {s: b[0] for s, b in lab.request(port=80, sources=sticky, parallel=32).items()}
        failed = [s for s, b in before.items() if b is None]
        if failed:
            raise RuntimeError(f"requests failed before the kill: {failed}")
        t_streams = time.time()
        stream_srcs = [client4(STREAM_SRC0 + k) for k in range(1, n_streams + 1)]
        streams = [lab.stream(source=s, seconds=STREAM_SECONDS) for s in stream_srcs]
        prober = subprocess.Popen(
            ["ip", "netns", "exec", lab.ns("client"), sys.executable, str(CLIENT_PY), "probe",
             "--vip", VIP4, "--source", client4(PROBE_SRC), "--seconds", str(PROBE_SECONDS)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        if with_daemon:
            wait_for(lambda: set(sessions(lab, "lb2")) >= set(sticky), 20, "sessions on lb2")
            wait_for(lambda: stream_sources_on(lab, "lb2", stream_srcs) == set(stream_srcs), 20,
                     "stream conntrack entries on lb2")
        # The kill comes 2 s after the streams started (or at once if syncing took longer).
        time.sleep(max(0.0, t_streams + 2.0 - time.time()))

        watcher = MoveWatcher(lab)
        try:
            t_kill = time.time()
            ha.kill("lb1")
            wait_for(lambda: watcher.vip_at and watcher.down_at, 10, "VIP on lb2", 0.01)
        finally:
            watcher.close()
        move = watcher.vip_at - watcher.down_at
        promote_ms = None
        if with_daemon:
            ha.wait_notified("lb2", "MASTER", timeout=10)
            m = PROMOTE_RE.search(ha.notify_calls("lb2")[-1].outcome)
            promote_ms = float(m.group(1)) if m else None

        out, err = prober.communicate(timeout=PROBE_SECONDS + 30)
        probe = json.loads(out)
        prober = None
        results = [h.result(timeout=STREAM_SECONDS + 30) for h in streams]
        after = {s: b[0] for s, b in lab.request(port=80, sources=sticky, parallel=32).items()}
    finally:
        if prober is not None and prober.poll() is None:
            prober.kill()
            prober.communicate()
        for d in daemons:
            d.stop()
        ha.down()

    moved = sorted(s for s in sticky if after.get(s) != before[s])
    # The outage as a client sees it: the longest wait between two answers, from just before the
    # kill (requests in flight then) to the end.
    oks = [done for start, done, ok in probe if ok and done > t_kill - 0.5]
    gap = max((b - a for a, b in zip(oks, oks[1:], strict=False)), default=float("inf"))
    after_kill = STREAM_SECONDS - (t_kill - t_streams)
    broken, silences = [], []
    for src, r in zip(stream_srcs, results, strict=True):
        alive = (r["error"] is None and not r["reset"] and not r["eof"] and r["missing"] == 0
                 and len(r["backends_seen"]) == 1 and r["longest_silence_ms"] < 3000
                 and after_kill >= 4)
        (silences if alive else broken).append(r["longest_silence_ms"] if alive else
                                               {"src": src, **r})
    return Run(vip_move_ms=round(move * 1000, 1),
               kill_to_vip_ms=round((watcher.vip_at - t_kill) * 1000, 1),
               gap_ms=round(gap * 1000, 1),
               sticky_kept_pct=round(100 * (len(sticky) - len(moved)) / len(sticky), 1),
               streams_kept_pct=round(100 * len(silences) / len(stream_srcs), 1),
               stream_silence_ms=max(silences, default=float("nan")), promote_ms=promote_ms,
               probes_failed=sum(1 for _, _, ok in probe if not ok),
               sticky_moved=moved, streams_broken=broken)


def summary(runs: list[Run]) -> dict[str, dict[str, float]]:
    out = {}
    for name in ("vip_move_ms", "kill_to_vip_ms", "gap_ms", "sticky_kept_pct", "streams_kept_pct",
                 "stream_silence_ms", "promote_ms", "probes_failed"):
        vals = [getattr(r, name) for r in runs if getattr(r, name) is not None]
        vals = [v for v in vals if v == v]  # no NaN (a run where every stream broke)
        if vals:
            out[name] = {"min": min(vals), "median": statistics.median(vals), "max": max(vals)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, choices=range(1, 51), metavar="1..50")
    ap.add_argument("--clients", type=int, default=100, choices=range(1, 200), metavar="1..199")
    ap.add_argument("--streams", type=int, default=4, choices=range(1, 41), metavar="1..40")
    ap.add_argument("--advert-int", type=float, default=0.1)
    ap.add_argument("--no-daemon", action="store_true", help="baseline: no sync daemons")
    ap.add_argument("--json", type=Path, help="also write the runs and the summary here")
    a = ap.parse_args()

    lab = Lab.up(prefix="bf" + uuid.uuid4().hex[:6], clients=250, backends=2)
    runs: list[Run] = []
    try:
        farm = lab.state_dir / "bench-farm.nft"
        farm.write_text((RULESETS / "farm-http.nft").read_text()
                        .replace("tcp dport 80 jump", f"tcp dport {{ 80, {STREAM_PORT} }} jump"))
        key = make_key(lab.state_dir)
        print(f"failover bench: {a.runs} runs, {a.clients} sticky clients, {a.streams} streams, "
              f"advert_int {a.advert_int} s, daemon {'off' if a.no_daemon else 'on'}", flush=True)
        for i in range(1, a.runs + 1):
            r = one_run(lab, farm, key, a.clients, a.streams, a.advert_int, not a.no_daemon)
            runs.append(r)
            print(f"run {i}: VIP move {r.vip_move_ms:.0f} ms (from the kill command "
                  f"{r.kill_to_vip_ms:.0f} ms), gap {r.gap_ms:.0f} ms "
                  f"({r.probes_failed} probes failed), sticky kept {r.sticky_kept_pct}%, "
                  f"streams kept {r.streams_kept_pct}% (longest silence "
                  f"{r.stream_silence_ms} ms), promote {r.promote_ms} ms", flush=True)
            if r.sticky_moved or r.streams_broken:
                print(f"  moved: {r.sticky_moved[:20]}; broken streams: {r.streams_broken}",
                      flush=True)
    finally:
        lab.down()
    s = summary(runs)
    print("\nmetric               min      median   max")
    for name, v in s.items():
        print(f"{name:<20} {v['min']:<8g} {v['median']:<8g} {v['max']:<8g}")
    if a.json:
        a.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()},
                                      "runs": [asdict(r) for r in runs], "summary": s},
                                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
