"""Per-record Python cost of the replication pipeline, and the replica's memory, without sockets.

No root, no kernel: what one conntrack NEW event costs on the active node and on its peer in
the daemon's own code, stage by stage, on one core:

  ctnetlink message bytes --parse--> CtEntry --learn--> session + conntrack records --encode-->
  frame body --decode--> records --merge--> kernel writes --build--> ctnetlink create bytes

(`--sessions`: the receiver's side of a snapshot of sessions: decode, merge, plan + encode the
nf_tables elements.) `--memory N`: RSS growth of one replica holding N connections and their
sessions (what the daemons' RSS per entry is made of, apart from queues and the kernel writers).

The figures move with the machine's noise: compare before/after pairs run back to back.
`.venv/bin/python benchmarks/bench_pipeline.py [--batches 200] [--sessions 300000]
[--memory 1000000]`
"""

from __future__ import annotations

import argparse
import gc
import struct
import time

from nftsync.conntrack import CtEntry
from nftsync.netlink.ctnetlink import CT_NEW, CtStats, build_create, parse_messages
from nftsync.netlink.nftwriter import encode_adds
from nftsync.proto.records import decode_records, encode_records
from nftsync.replication import MapPolicy, Replica

MAP = "bench/sessions"
MARKS = (0x200, 0x201)
_NLMSG = struct.Struct("=IHHII")
_NFGEN = struct.Struct("=BBH")
_MARK = struct.Struct("=I")


def entry(i: int) -> CtEntry:
    client = (0x0A000000 + i).to_bytes(4, "big")
    return CtEntry(2, 6, client, bytes([10, 0, 0, 100]), 40000 + i % 20000, 80,
                   bytes([10, 1, 0, 2]), client, 80, 40000 + i % 20000, MARKS[i % 2], 0x18E,
                   120, 3)


def new_event(ct: CtEntry) -> bytes:
    """A ctnetlink NEW message as the kernel sends it for a created entry (fewer attributes:
    no counters or timestamps, which the decoder skips anyway)."""
    body = build_create(ct)
    return _NLMSG.pack(20 + len(body), CT_NEW, 0x401 | 0x200, 0, 0) + \
        _NFGEN.pack(ct.family, 0, 0) + body


def replicas() -> tuple[Replica, Replica]:
    out = []
    for node in (1, 2):
        r = Replica(node)
        r.set_maps({MAP: MapPolicy(frozenset(MARKS), 1 << 22, 3_600_000)}, MARKS)
        out.append(r)
    return out[0], out[1]


def pipeline(batches: int, per_batch: int = 100) -> None:
    bufs = [b"".join(new_event(entry(b * per_batch + i)) for i in range(per_batch))
            for b in range(batches)]
    a, b = replicas()
    stats = CtStats()
    marks = frozenset(MARKS)
    t = dict.fromkeys(("parse", "learn", "encode", "decode", "merge", "build"), 0.0)
    for buf in bufs:
        t0 = time.perf_counter()
        events: list = []
        parse_messages(buf, len(buf), stats, events, marks)
        t1 = time.perf_counter()
        now, wall = time.monotonic(), int(time.time() * 1000)
        recs = []
        for _ev, ct in events:
            recs.append(a.session_from_ct(MAP, ct.orig_src, ct.mark, now + 3600, now, wall))
            recs.append(a.local_ct(ct, now + ct.timeout, now, wall)[1])
        t2 = time.perf_counter()
        data = encode_records(recs)
        t3 = time.perf_counter()
        got = decode_records(memoryview(data), len(recs))
        t4 = time.perf_counter()
        w = b.receive(got, 1, False, now, wall)
        t5 = time.perf_counter()
        for _op, ct in w.conntrack:
            build_create(ct)
        t6 = time.perf_counter()
        for k, x, y in (("parse", t0, t1), ("learn", t1, t2), ("encode", t2, t3),
                        ("decode", t3, t4), ("merge", t4, t5), ("build", t5, t6)):
            t[k] += y - x
    n = batches * per_batch
    print("per connection (µs): " + ", ".join(f"{k} {v / n * 1e6:.2f}" for k, v in t.items()) +
          f"; total {sum(t.values()) / n * 1e6:.2f}")


def sessions(n: int) -> None:
    a, b = replicas()
    now, wall = time.monotonic(), int(time.time() * 1000)
    for i in range(n):
        a.found_session(MAP, (0x0A800000 + i).to_bytes(4, "big"), MARKS[i % 2], now + 3000,
                        wall - 1000)
    t = dict.fromkeys(("snapshot", "encode", "decode", "merge", "plan+encode"), 0.0)
    t0 = time.perf_counter()
    chunks = list(a.snapshot(now))
    t["snapshot"] = time.perf_counter() - t0
    for chunk in chunks:
        t0 = time.perf_counter()
        data = encode_records(chunk)
        t1 = time.perf_counter()
        recs = decode_records(memoryview(data), len(chunk))
        t2 = time.perf_counter()
        w = b.receive(recs, 1, True, now, wall)
        t3 = time.perf_counter()
        encode_adds([(op.key, _MARK.pack(op.mark), None, op.remaining_ms)
                     for op in w.sessions[MAP]])
        t4 = time.perf_counter()
        for k, x, y in (("encode", t0, t1), ("decode", t1, t2), ("merge", t2, t3),
                        ("plan+encode", t3, t4)):
            t[k] += y - x
    print("per session of a snapshot (µs): " +
          ", ".join(f"{k} {v / n * 1e6:.2f}" for k, v in t.items()) +
          f"; total {sum(t.values()) / n * 1e6:.2f}")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def memory(n: int) -> None:
    a, _ = replicas()
    gc.collect()
    before = rss()
    now, wall = time.monotonic(), int(time.time() * 1000)
    for i in range(n):
        ct = entry(i)
        a.local_ct(ct, now + 120, now, wall + i)
        a.local_session(MAP, ct.orig_src, ct.mark, now + 3600, now, wall + i)
    gc.collect()
    print(f"replica RSS per connection and its session, {n}: {(rss() - before) / n:.0f} B")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=200, help="batches of 100 NEW events")
    ap.add_argument("--sessions", type=int, default=300_000, help="0: skip")
    ap.add_argument("--memory", type=int, default=1_000_000, help="0: skip")
    args = ap.parse_args()
    pipeline(args.batches)
    if args.sessions:
        sessions(args.sessions)
    if args.memory:
        memory(args.memory)


if __name__ == "__main__":
    main()
