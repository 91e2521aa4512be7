"""Benchmark of the ctnetlink codec (prints figures; not a test).

In a namespace of its own (created here and always deleted):
* decode: 100k conntrack NEW events from a `conntrack -R` load, (a) live with
  `CtEventSocket.read()` while the load runs, (b) decode-only over the captured datagrams,
  (c) pyroute2's nfct_msg parser over the same datagrams (for comparison);
* insert: 100k entries via `CtWriter.apply` vs `conntrack -R` vs pyroute2
  `Conntrack().entry('add')` (pyroute2 on 5k only, extrapolated).

Run as root: `.venv/bin/python benchmarks/bench_ctnetlink.py [--entries 100000]`.
No traffic is sent; the entries are conntrack table rows only.
"""

from __future__ import annotations

import argparse
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "kernel"))

import netns  # noqa: E402

from nftsync.conntrack import CtEntry  # noqa: E402
from nftsync.netlink.ctnetlink import CtStats, parse_messages  # noqa: E402
from nftsync.netlink.ctsocket import CtEventSocket, CtWriter  # noqa: E402


def client(i: int) -> str:
    return f"10.{64 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}"


def restore_lines(n: int) -> str:
    return "".join(
        f"-A -t 600 -u ASSURED -s {client(i)} -d 10.0.0.100 -r 10.0.1.{1 + i % 4} "
        f"-q {client(i)} -p tcp --sport {1024 + i % 60000} --dport 80 --reply-port-src 80 "
        f"--reply-port-dst {1024 + i % 60000} --state ESTABLISHED -m 0x{0x200 + i % 4:x}\n"
        for i in range(n)
    )


def entries(n: int) -> list[CtEntry]:
    return [CtEntry.make(client(i), 1024 + i % 60000, "10.0.0.100", 80, f"10.0.1.{1 + i % 4}",
                         80, mark=0x200 + i % 4, timeout=600) for i in range(n)]


def flush(ns: str) -> None:
    netns.run(ns, "conntrack", "-F", check=False)


def count(ns: str) -> int:
    return int(netns.run(ns, "conntrack", "-C").stdout.strip())


def bench_decode(ns: str, restore_file: str, n: int) -> dict[str, float]:
    res: dict[str, float] = {}
    # (a) live: read() while `conntrack -R` produces the events.
    with netns.entered(ns):
        sock = CtEventSocket(rcvbuf=64 << 20, max_events=100_000)
    got = 0
    first = last = 0.0
    t_load = time.perf_counter()
    proc = subprocess.Popen(["ip", "netns", "exec", ns, "conntrack", "-R", restore_file],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    overrun = False
    busy = 0.0
    while got < n and time.monotonic() < deadline:
        select.select([sock], [], [], 0.5)
        t0 = time.perf_counter()
        batch = sock.read()
        busy += time.perf_counter() - t0
        overrun |= batch.overrun
        if batch:
            if not got:
                first = t0
            got += len(batch)
            last = time.perf_counter()
    proc.wait(timeout=60)
    load_s = time.perf_counter() - t_load
    sock.close()
    res["live_events"] = got
    res["live_overrun"] = float(overrun)
    res["live_span_s"] = last - first
    res["live_read_busy_s"] = busy
    res["load_s"] = load_s
    flush(ns)

    # (b)+(c): capture the raw datagrams of a second identical load, then decode offline.
    with netns.entered(ns):
        sock = CtEventSocket(rcvbuf=64 << 20)
    raw: list[bytes] = []
    proc = subprocess.Popen(["ip", "netns", "exec", ns, "conntrack", "-R", restore_file],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rsock = sock.sock
    deadline = time.monotonic() + 60
    while len(raw) < n and time.monotonic() < deadline:
        select.select([sock], [], [], 0.5)
        while True:
            mv = rsock.recv()
            if mv is None:
                break
            raw.append(bytes(mv))
    proc.wait(timeout=60)
    sock.close()
    flush(ns)

    stats = CtStats()
    out: list = []
    t0 = time.perf_counter()
    for b in raw:
        parse_messages(b, len(b), stats, out)
    res["ours_decode_s"] = time.perf_counter() - t0
    res["ours_decoded"] = len(out)
    assert stats.malformed == 0, stats

    marks = frozenset({0x200})
    stats = CtStats()
    out2: list = []
    t0 = time.perf_counter()
    for b in raw:
        parse_messages(b, len(b), stats, out2, marks)
    res["ours_filtered_decode_s"] = time.perf_counter() - t0
    res["ours_filtered_kept"] = len(out2)

    from pyroute2.conntrack import ConntrackEntry
    from pyroute2.netlink.nfnetlink.nfctsocket import nfct_msg

    t0 = time.perf_counter()
    done = 0
    for b in raw:
        msg = nfct_msg(b)
        msg.decode()
        ConntrackEntry(msg["nfgen_family"], msg.get_attr("CTA_TUPLE_ORIG"),
                       msg.get_attr("CTA_TUPLE_REPLY"), msg.get_attr("CTA_STATUS"),
                       msg.get_attr("CTA_TIMEOUT"), msg.get_attr("CTA_PROTOINFO"),
                       msg.get_attr("CTA_MARK"), msg.get_attr("CTA_ID"),
                       msg.get_attr("CTA_USE"), msg.get_attr("CTA_ZONE"))
        done += 1
    res["pyroute2_decode_s"] = time.perf_counter() - t0
    res["pyroute2_decoded"] = done
    return res


def bench_insert(ns: str, restore_file: str, n: int, n_pyroute2: int) -> dict[str, float]:
    res: dict[str, float] = {}
    ents = entries(n)
    with netns.entered(ns):
        writer = CtWriter()
    t0 = time.perf_counter()
    r = writer.apply([("upsert", e) for e in ents])
    res["ours_insert_s"] = time.perf_counter() - t0
    res["ours_created"] = r.created
    res["ours_failed"] = len(r.failed)
    res["ours_count"] = count(ns)
    t0 = time.perf_counter()
    r = writer.apply([("upsert", e) for e in ents])
    res["ours_update_s"] = time.perf_counter() - t0
    res["ours_updated"] = r.updated
    t0 = time.perf_counter()
    r = writer.apply([("delete", e) for e in ents])
    res["ours_delete_s"] = time.perf_counter() - t0
    res["ours_deleted"] = r.deleted
    writer.close()
    flush(ns)

    t0 = time.perf_counter()
    netns.run(ns, "conntrack", "-R", restore_file)
    res["conntrack_R_s"] = time.perf_counter() - t0
    res["conntrack_R_count"] = count(ns)
    flush(ns)

    # pyroute2 runs its netlink socket from a helper thread, which a per-thread setns() does
    # not move: run it in a child process started inside the namespace instead.
    out = netns.run(ns, sys.executable, "-c", _PYROUTE2_INSERT, str(n_pyroute2)).stdout
    res["pyroute2_insert_s"] = float(out.strip())
    res["pyroute2_count"] = count(ns)
    flush(ns)
    return res


_PYROUTE2_INSERT = f"""
import sys, time
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from bench_ctnetlink import entries
from pyroute2 import Conntrack
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple
import ipaddress
ip = lambda b: str(ipaddress.ip_address(b))
ents = entries(int(sys.argv[1]))
ct = Conntrack()
t0 = time.perf_counter()
for e in ents:
    o = NFCTAttrTuple(saddr=ip(e.orig_src), daddr=ip(e.orig_dst), proto=6,
                      sport=e.orig_sport, dport=e.orig_dport)
    r = NFCTAttrTuple(saddr=ip(e.reply_src), daddr=ip(e.reply_dst), proto=6,
                      sport=e.reply_sport, dport=e.reply_dport)
    ct.entry("add", timeout=600, tuple_orig=o, tuple_reply=r, mark=e.mark)
print(time.perf_counter() - t0)
ct.close()
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--pyroute2-entries", type=int, default=5_000)
    args = ap.parse_args()
    n = args.entries
    ns = netns.create("bench-ct")
    try:
        netns.run(ns, "sysctl", "-qw", f"net.netfilter.nf_conntrack_max={4 * n}")
        with tempfile.NamedTemporaryFile("w", suffix=".ct") as f:
            f.write(restore_lines(n))
            f.flush()
            d = bench_decode(ns, f.name, n)
            i = bench_insert(ns, f.name, n, args.pyroute2_entries)
    finally:
        netns.delete(ns)

    print(f"ctnetlink codec benchmark, {n} entries (IPv4 TCP, DNAT, ESTABLISHED, marks)")
    print("decode:")
    print(f"  live CtEventSocket.read() during `conntrack -R`: {int(d['live_events'])} events, "
          f"overrun={bool(d['live_overrun'])}, load took {d['load_s']:.2f} s, "
          f"read() busy {d['live_read_busy_s']:.2f} s "
          f"=> {d['live_events'] / d['live_read_busy_s']:,.0f} events/s of read() time")
    print(f"  decode-only (captured datagrams): {d['ours_decoded']:.0f} in "
          f"{d['ours_decode_s']:.3f} s => {d['ours_decoded'] / d['ours_decode_s']:,.0f} events/s")
    print(f"  with mark pre-filter (1 mark of 4 kept): {d['ours_filtered_kept']:.0f} kept, "
          f"{n / d['ours_filtered_decode_s']:,.0f} events/s")
    print(f"  pyroute2 nfct_msg parse of the same: {d['pyroute2_decoded']:.0f} in "
          f"{d['pyroute2_decode_s']:.2f} s => "
          f"{d['pyroute2_decoded'] / d['pyroute2_decode_s']:,.0f} events/s")
    print("insert:")
    print(f"  CtWriter upsert (create): {i['ours_created']:.0f} created, {i['ours_failed']:.0f} "
          f"failed, table {i['ours_count']:.0f}, {i['ours_insert_s']:.2f} s => "
          f"{n / i['ours_insert_s']:,.0f} entries/s")
    print(f"  CtWriter upsert (existing -> update): {i['ours_updated']:.0f} in "
          f"{i['ours_update_s']:.2f} s => {n / i['ours_update_s']:,.0f} entries/s")
    print(f"  CtWriter delete: {i['ours_deleted']:.0f} in {i['ours_delete_s']:.2f} s => "
          f"{n / i['ours_delete_s']:,.0f} entries/s")
    print(f"  conntrack -R: table {i['conntrack_R_count']:.0f}, {i['conntrack_R_s']:.2f} s => "
          f"{n / i['conntrack_R_s']:,.0f} entries/s")
    pn = args.pyroute2_entries
    print(f"  pyroute2 Conntrack().entry('add') on {pn}: table {i['pyroute2_count']:.0f}, "
          f"{i['pyroute2_insert_s']:.2f} s => {pn / i['pyroute2_insert_s']:,.0f} entries/s "
          f"(extrapolated to {n}: {i['pyroute2_insert_s'] * n / pn:.1f} s)")


if __name__ == "__main__":
    main()
