"""Peer protocol codec throughput: session/conntrack records encoded and decoded per second.

Measures what the daemon pays per replicated record: building UPDATES payloads (records -> bytes,
plus the frame with its HMAC) and parsing them back. Prints figures; asserts nothing about time.
Run: .venv/bin/python benchmarks/bench_proto.py [--records N] [--rounds R]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time

from nftsync.proto.channel import Channel, Identity
from nftsync.proto.frames import Updates, decode_payload, encode_frame
from nftsync.proto.records import OP_ADD, ConntrackRecord, SessionRecord, split_records


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


async def bench_channel(records: list, rounds: int) -> None:
    """Records/s through a real authenticated Channel on 127.0.0.1: encode, HMAC, TCP, verify,
    decode. This is the ceiling of one peer connection (one Python process each side here,
    both on one event loop, so it is pessimistic)."""
    key = bytes(range(32))
    chunks = split_records(records, budget=64 * 1024)  # 64 KiB frames: what a daemon would send
    got: asyncio.Queue = asyncio.Queue()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await got.put(await Channel.accept(reader, writer, Identity("b", 2, "srv"), key))

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    async with srv:
        client = await Channel.connect("127.0.0.1", port, Identity("b", 1, "cli"), key)
        server = await got.get()
        best = float("inf")
        for r in range(rounds):
            t0 = time.perf_counter()

            async def receive() -> int:
                n = 0
                for _ in chunks:
                    n += len((await server.recv()).records)
                return n

            rx = asyncio.create_task(receive())
            for i, c in enumerate(chunks):
                await client.send(Updates(r * len(chunks) + i, c))
            n = await rx
            best = min(best, time.perf_counter() - t0)
            assert n == len(records)
        client.close()
        server.close()
    print(f"{'channel loopback':<18} {len(records):>8} session records in {len(chunks)} frames "
          f"(64 KiB): {len(records) / best / 1e3:7.0f}k rec/s end to end")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    bench("session records", make_sessions(args.records), args.rounds)
    bench("conntrack records", make_ct(args.records), args.rounds)
    asyncio.run(bench_channel(make_sessions(args.records), args.rounds))


if __name__ == "__main__":
    main()
