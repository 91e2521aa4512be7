"""`nftsync apply` re-creating a session map that holds N sessions: wall time and peak RSS.

In a namespace of its own (deleted at the end, also on failure): `rulesets/large.nft` (its map
`size` raised to hold 2M) is applied, N sessions (`ipv4_addr : mark`, expiring in ~500 s) are
written into its session map, and the same file with another map timeout (600 s -> 900 s) is
applied by `nftsync apply --json` in a child process under `/usr/bin/time -v`: the map must be
re-created and every session carried over. Printed: wall time, peak RSS of the nftsync process,
and how many sessions the new map holds (counted by a streamed dump, not by nft).

`--code DIR` runs the nftsync package found in DIR instead of this tree's (e.g. an export of an
older commit: `git archive COMMIT nftsync | tar -x -C /tmp/old`), for before/after figures.

Run as root: `.venv/bin/python benchmarks/bench_apply.py [--n 200000 1000000] [--code DIR]`.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "kernel"))

import netns  # noqa: E402

from nftsync.netlink.nftwriter import SetElemWriter  # noqa: E402
from nftsync.netlink.setdump import SetElemDump  # noqa: E402

MAP = ("ip", "nftsync_big", "big_sessions")
CHUNK = 50_000


def farm_files(tmp: Path) -> tuple[Path, Path]:
    src = (ROOT / "rulesets" / "large.nft").read_text().replace("size 1048576", "size 2000000")
    first, second = tmp / "big-600.nft", tmp / "big-900.nft"
    first.write_text(src)
    second.write_text(src.replace("timeout 600s", "timeout 900s"))
    return first, second


def fill(ns: str, n: int) -> None:
    """N sessions 11.0.0.0 + i -> 0x200/0x201, expiring in 500 s, by netlink batches."""
    with netns.entered(ns):
        writer = SetElemWriter()
    try:
        marks = [m.to_bytes(4, sys.byteorder) for m in (0x200, 0x201)]
        for i in range(0, n, CHUNK):
            adds = [((0x0B000000 + k).to_bytes(4, "big"), marks[k & 1], None, 500_000)
                    for k in range(i, min(i + CHUNK, n))]
            writer.apply(*MAP, [], adds)
    finally:
        writer.close()


def count(ns: str) -> int:
    with netns.entered(ns):
        dump = SetElemDump(*MAP, timeout=120)
    return sum(len(batch) for batch in dump.batches())


def run(n: int, code: str | None) -> dict[str, object]:
    ns = netns.create("applybench")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            first, second = farm_files(Path(tmp))
            env = dict(os.environ, NFTSYNC_STATE_DIR=tmp)
            if code:
                env["PYTHONPATH"] = code
            python = [sys.executable, "-m", "nftsync", "apply", "--json"]
            subprocess.run(["ip", "netns", "exec", ns, *python, str(first)], check=True,
                           capture_output=True, env=env, cwd=tmp)
            fill(ns, n)
            t0 = time.monotonic()
            p = subprocess.run(["ip", "netns", "exec", ns, "/usr/bin/time", "-v", *python,
                                str(second)], capture_output=True, text=True, env=env, cwd=tmp)
            wall = time.monotonic() - t0
            if p.returncode != 0:
                raise SystemExit(f"apply failed (rc {p.returncode}): {p.stderr[-500:]}")
            rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
            return {"n": n, "wall_s": round(wall, 1),
                    "peak_rss_mib": int(rss.group(1)) // 1024 if rss else None,
                    "in_new_map": count(ns)}
    finally:
        netns.delete(ns)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--n", type=int, nargs="+", default=[200_000, 1_000_000])
    ap.add_argument("--code", help="directory holding the nftsync package to run")
    args = ap.parse_args()
    label = args.code or "this tree"
    for n in args.n:
        r = run(n, args.code)
        print(f"apply re-creating a map of {n:>9,} sessions ({label}): {r['wall_s']} s, "
              f"peak RSS {r['peak_rss_mib']} MiB, {r['in_new_map']:,} in the new map",
              flush=True)


if __name__ == "__main__":
    main()
