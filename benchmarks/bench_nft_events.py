"""How fast can we follow nf_tables element events? Prints figures; asserts nothing about time.

In a throw-away namespace (always deleted): a session map receives N elements in one `nft -f`
transaction while an NftEventSocket reads the notifications (live: includes waiting on nft),
then the same transaction's raw datagrams are captured and decoded offline (decode cost only).

    sudo .venv/bin/python benchmarks/bench_nft_events.py [--elements 100000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import ipaddress
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kernel"))

import netns  # noqa: E402

from nftsync.netlink.core import NETLINK_NETFILTER, NetlinkSocket  # noqa: E402
from nftsync.netlink.nftables import (  # noqa: E402
    NFNLGRP_NFTABLES,
    DecodeStats,
    GenEvent,
    NftEventSocket,
    SetElemEvent,
    decode_datagram,
)

TABLE = """
table ip lb {
    map sessions {
        type ipv4_addr : mark
        flags dynamic,timeout
        timeout 600s
        size 1048576
        comment "nftsync:sessions farm=bench key=saddr"
    }
}
"""


def element_file(n: int, directory: str) -> str:
    path = Path(directory) / "elements.nft"
    base = int(ipaddress.IPv4Address("10.0.0.0"))
    with path.open("w") as f:
        f.write("add element ip lb sessions {\n")
        f.write(",\n".join(f"{ipaddress.IPv4Address(base + i)} timeout 300s : {0x200 + i % 16:#x}"
                           for i in range(n)))
        f.write("\n}\n")
    return str(path)


def run_nft(ns: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", ns, "nft", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def live(ns: str, path: str, n: int) -> tuple[float, float, int, DecodeStats]:
    """Read events while nft commits: (wall s until NEWGEN, s spent inside read(), elements)."""
    with netns.entered(ns):
        sock = NftEventSocket()
    try:
        elements = 0
        in_read = 0.0
        t0 = time.perf_counter()
        proc = run_nft(ns, "-f", path)
        done = False
        deadline = t0 + 120
        while not done and time.perf_counter() < deadline:
            select.select([sock], [], [], 0.5)
            r0 = time.perf_counter()
            evs = sock.read()
            in_read += time.perf_counter() - r0
            for ev in evs:
                if isinstance(ev, SetElemEvent):
                    elements += len(ev.elements)
                elif isinstance(ev, GenEvent):
                    done = True
        wall = time.perf_counter() - t0
        if proc.wait(timeout=120) != 0:
            raise SystemExit(f"nft failed: {proc.stderr.read() if proc.stderr else ''}")
        return wall, in_read, elements, sock.stats
    finally:
        sock.close()


def capture(ns: str, path: str) -> list[bytes]:
    """The raw datagrams of one transaction, for offline decoding."""
    with netns.entered(ns):
        raw = NetlinkSocket(NETLINK_NETFILTER, rcvbuf=64 << 20)
    try:
        raw.add_membership(NFNLGRP_NFTABLES)
        proc = run_nft(ns, "-f", path)
        if proc.wait(timeout=120) != 0:
            raise SystemExit("nft failed")
        out = []
        while (mv := raw.recv()) is not None:
            out.append(bytes(mv))
        return out
    finally:
        raw.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--elements", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    n = args.elements
    ns = netns.create("nftbench")
    try:
        netns.run(ns, "nft", "-f", "-", input=TABLE)
        with tempfile.TemporaryDirectory() as tmp:
            path = element_file(n, tmp)
            print(f"nft element events, {n} elements in one `nft -f` transaction")
            for i in range(args.repeat):
                wall, in_read, got, stats = live(ns, path, n)
                print(f"  live {i + 1}: {got} elements decoded; {wall:.3f} s until NEWGEN "
                      f"(nft included) = {got / wall:,.0f} ev/s; {in_read:.3f} s inside read() "
                      f"= {got / in_read:,.0f} ev/s; overruns {stats.overruns}, "
                      f"malformed {stats.malformed}")
                netns.run(ns, "nft", "flush", "map", "ip", "lb", "sessions")
            datagrams = capture(ns, path)
            size = sum(map(len, datagrams))
            print(f"  captured {len(datagrams)} datagrams, {size / 1e6:.1f} MB "
                  f"({size / n:.0f} bytes/element)")
            best = float("inf")
            for _ in range(args.repeat):
                stats = DecodeStats()
                out: list = []
                t0 = time.perf_counter()
                for d in datagrams:
                    decode_datagram(d, stats, out)
                best = min(best, time.perf_counter() - t0)
            print(f"  offline decode: {stats.elements} elements in {best:.3f} s "
                  f"= {stats.elements / best:,.0f} ev/s (best of {args.repeat})")
    finally:
        netns.delete(ns)


if __name__ == "__main__":
    main()
