"""Map element writes: hand-built netlink batches (`SetElemWriter`) vs libnftables text.

Both through `NftSink._apply_now`, i.e. what the daemon's kernel writer thread does per batch:
N new sessions (`ipv4_addr : mark`, expires 60 s, a 3600 s timeout map) in batches of B, then
the same N keys replaced with another mark (delete + add), then deleted. One fresh namespace,
the map flushed between runs; the namespace is deleted at the end, also on failure.

Run as root: `.venv/bin/python benchmarks/bench_nft_writer.py [--n 100000] [--batch 5000]`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "kernel"))

import netns  # noqa: E402

from nftsync.daemon.farms import ReplicatedMap  # noqa: E402
from nftsync.daemon.nftsink import NftSink  # noqa: E402
from nftsync.model import MapRef, Role, SessionMap  # noqa: E402
from nftsync.replication import ElementOp  # noqa: E402

TABLE = """table ip bench {
    map sessions { type ipv4_addr : mark; flags dynamic, timeout; timeout 3600s; size 4000000; }
}"""


def run(sink: NftSink, rmap: ReplicatedMap, keys: list[bytes], batch: int) -> dict[str, float]:
    out = {}
    phases = (("add", lambda k: ElementOp(k, 0x200, 60_000, None)),
              ("replace", lambda k: ElementOp(k, 0x201, 60_000, 0x200)),
              ("delete", lambda k: ElementOp(k, None, 0, 0x201)))
    for name, make in phases:
        ops = [make(k) for k in keys]
        t0 = time.perf_counter()
        for i in range(0, len(ops), batch):
            sink._apply_now(rmap, ops[i:i + batch])
        out[name] = time.perf_counter() - t0
    if sink.stats.failed or sink.stats.retries:
        raise SystemExit(f"writes failed: {sink.stats}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=5000)
    args = ap.parse_args()
    keys = [(0x0A000000 + i).to_bytes(4, "big") for i in range(args.n)]
    smap = SessionMap(MapRef("ip", "bench", "sessions"), Role.SESSIONS, "bench",
                      ("ipv4_addr",), "mark", timeout=3600)
    rmap = ReplicatedMap(smap, None)
    ns = netns.create("nftwbench")
    try:
        netns.run(ns, "nft", "-f", "-", input=TABLE)
        for label, netlink in (("libnftables text", False), ("netlink batch", True)):
            with netns.entered(ns):
                sink = NftSink(netlink=netlink)
            res = run(sink, rmap, keys, args.batch)
            sink.close()
            figures = ", ".join(f"{k} {args.n / v / 1000:.0f}k/s ({v:.2f} s)"
                                for k, v in res.items())
            print(f"{label:17} n={args.n} batch={args.batch}: {figures}")
            netns.run(ns, "nft", "flush", "map", "ip", "bench", "sessions")
    finally:
        netns.delete(ns)


if __name__ == "__main__":
    main()
