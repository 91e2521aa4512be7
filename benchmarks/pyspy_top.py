"""Summarise py-spy raw (collapsed) stacks: self time and inclusive time per function."""

from __future__ import annotations

import sys
from collections import Counter


def main(path: str, top: int = 25) -> None:
    selfc: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    with open(path) as fh:
        for line in fh:
            stack, _, n = line.rstrip().rpartition(" ")
            if not stack:
                continue
            k = int(n)
            total += k
            frames = stack.split(";")
            selfc[frames[-1]] += k
            for f in set(frames):
                incl[f] += k
    print(f"{path}: {total} samples")
    print("-- self")
    for f, k in selfc.most_common(top):
        print(f"{100 * k / total:5.1f}%  {f}")
    print("-- inclusive")
    for f, k in incl.most_common(top):
        print(f"{100 * k / total:5.1f}%  {f}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 25)
