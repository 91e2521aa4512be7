"""`nftsync sessions list|get` at 200k and 1M sessions: wall time and peak RSS of the nftsync
process, for this tree and (with --old) an older one, e.g. the code before the streamed listing:

    git worktree add /tmp/old-nftsync <commit before>      # never git stash: the tree is shared
    .venv/bin/python benchmarks/bench_sessions.py --old /tmp/old-nftsync [--sizes 200000,1000000]

For each size, one fresh namespace (`sbench-<id>`, deleted at the end, also on failure) holds
rulesets/large.nft with N timed sessions 10.64.0.0 + i (`expires 500s`), so nothing expires
during the runs and every listing is of an unchanging map. Each case is one `ip netns exec NS
python -m nftsync ...` with its stdout to /dev/null; `ip netns exec` execs the command, so the
child's own rusage (os.wait4) is nftsync's: peak RSS without the nft fills. The old code has no
`get`, `--limit` or `--client`: what it offered for them is the full listing (and grep), the
"list" rows. A --client prefix of at most 65536 addresses is read by lookups, a wider one by a
filtered dump (nftsync.sessionread): one case of each. Figures go to stdout;
benchmarks/README.md has them for this VM.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "kernel"))

import netns  # noqa: E402

NEW_CASES: list[tuple[str, tuple[str, ...]]] = [
    ("list (text)", ("sessions", "list")),
    ("list --json", ("sessions", "list", "--json")),
    ("list --limit 10", ("sessions", "list", "--limit", "10")),
    ("list --client /24 (lookups)", ("sessions", "list", "--client", "10.64.3.0/24")),
    ("list --client /16 (lookups)", ("sessions", "list", "--client", "10.64.0.0/16",
                                     "--backend", "0x201")),
    ("list --client /9 (dump, 0 rows)", ("sessions", "list", "--client", "10.128.0.0/9")),
    ("get (present)", ("sessions", "get", "10.64.3.7")),
    ("get (absent)", ("sessions", "get", "10.99.0.1")),
]
OLD_CASES = NEW_CASES[:2]


def client(i: int) -> str:
    return f"10.{64 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}"


def fill(ns: str, n: int, chunk: int = 20_000) -> float:
    netns.run(ns, "nft", "-f", str(ROOT / "rulesets" / "large.nft"))
    t0 = time.perf_counter()
    for start in range(0, n, chunk):
        elems = ", ".join(f"{client(i)} expires 500s : {0x200 + i % 2:#x}"
                          for i in range(start, min(n, start + chunk)))
        netns.run(ns, "nft", "-f", "-", timeout=600,
                  input=f"add element ip nftsync_big big_sessions {{ {elems} }}\n")
    return time.perf_counter() - t0


def measure(ns: str, tree: Path, args: tuple[str, ...]) -> tuple[float, int, int]:
    """(wall s, peak RSS KiB, exit status) of one nftsync run of `tree`'s code."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    with open(os.devnull, "w") as null:
        t0 = time.perf_counter()
        proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "nftsync",
                                 *args], stdout=null, stderr=subprocess.DEVNULL, env=env,
                                cwd=tree)
        _pid, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    return wall, usage.ru_maxrss, os.waitstatus_to_exitcode(status)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="200000,1000000",
                    help="comma-separated session counts (default: 200000,1000000)")
    ap.add_argument("--old", type=Path, help="a tree of older nftsync code to compare with")
    ap.add_argument("--runs", type=int, default=1, help="runs per case (the best is shown)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (namespaces, nftables)")
    trees = [("new", ROOT, NEW_CASES)]
    if args.old is not None:
        if not (args.old / "nftsync" / "__init__.py").exists():
            raise SystemExit(f"--old {args.old}: not an nftsync tree")
        trees.insert(0, ("old", args.old.resolve(), OLD_CASES))
    print(f"{'sessions':>9} {'code':4} {'case':32} {'wall s':>8} {'peak RSS MiB':>13} exit")
    for n in (int(s) for s in args.sizes.split(",")):
        ns = netns.create("sbench")
        try:
            took = fill(ns, n)
            print(f"# {n} sessions added in {took:.1f} s", flush=True)
            for code, tree, cases in trees:
                for label, cmd in cases:
                    best = min((measure(ns, tree, cmd) for _ in range(args.runs)),
                               key=lambda r: r[0])
                    wall, rss, rc = best
                    print(f"{n:>9} {code:4} {label:32} {wall:8.2f} {rss / 1024:13.1f} {rc}",
                          flush=True)
        finally:
            netns.delete(ns)


if __name__ == "__main__":
    main()
