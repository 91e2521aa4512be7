"""Peer protocol codec throughput: session/conntrack records encoded and decoded per second.

Measures what the daemon pays per replicated record: building UPDATES payloads (records -> bytes,
plus the frame with its HMAC) and parsing them back. Prints figures; asserts nothing about time.
Run: .venv/bin/python benchmarks/bench_proto.py [--records N] [--rounds R]
"""

from __future__ import annotations

import argparse
import random
import time

from nftsync.proto.frames import (
    OP_ADD,
    ConntrackRecord,
    SessionRecord,
    Updates,
    decode_payload,
    encode_frame,
    split_records,
)


def make_sessions(n: int) -> list[SessionRecord]:
    rnd = random.Random(1)
    maps = ["web/sessions", "api/sessions", "smtp/sessions"]
    # ipv4 client address (4 bytes) + port (2, padded to 4 in nft's concatenation)
    return [SessionRecord(OP_ADD, maps[i % 3], rnd.randbytes(8), rnd.randrange(1, 64),
                          rnd.randrange(0, 3_600_000), 1_700_000_000_000 + i, 1 + i % 4)
            for i in range(n)]


def make_ct(n: int) -> list[ConntrackRecord]:
    rnd = random.Random(2)
    return [ConntrackRecord(OP_ADD, 1, 1_700_000_000_000 + i, rnd.randbytes(64)) for i in range(n)]


def bench(name: str, records: list, rounds: int) -> None:
    chunks = split_records(records)
    best_enc = best_dec = best_frame = float("inf")
    payloads: list[bytes] = []
    key = b"k" * 32
    for _ in range(rounds):
        t0 = time.perf_counter()
        payloads = [Updates(i, c).encode_payload() for i, c in enumerate(chunks)]
        best_enc = min(best_enc, time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i, c in enumerate(chunks):
            encode_frame(Updates(i, c), i, key)
        best_frame = min(best_frame, time.perf_counter() - t0)
        t0 = time.perf_counter()
        out = 0
        for p in payloads:
            out += len(decode_payload(Updates.TYPE, p).records)
        best_dec = min(best_dec, time.perf_counter() - t0)
        assert out == len(records)
    n = len(records)
    size = sum(len(p) for p in payloads)
    print(f"{name:<18} {n:>8} records in {len(chunks)} frames, {size / n:5.1f} B/record: "
          f"encode {n / best_enc / 1e3:7.0f}k rec/s, encode+frame+HMAC "
          f"{n / best_frame / 1e3:7.0f}k rec/s, decode {n / best_dec / 1e3:7.0f}k rec/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    bench("session records", make_sessions(args.records), args.rounds)
    bench("conntrack records", make_ct(args.records), args.rounds)


if __name__ == "__main__":
    main()
