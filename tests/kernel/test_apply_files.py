"""`nftsync apply` and the files it reads, in a namespace of its own (root; issue 13).

A FIFO as the farm file or among its includes must be refused at once (nft would block on it),
and apply's 4 MiB limit covers every file the farm includes; each refusal names the file (and
the line of the include) and leaves the kernel as it was. A farm split over includes that nft
resolves (absolute, ./ relative to the working directory) still applies.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FARM = Path(__file__).parents[2] / "rulesets" / "farm.nft"
NFTSYNC = [sys.executable, "-m", "nftsync"]
HANG = 60  # a refusal takes well under a second; a hang fails the test after this


def apply(ns: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["ip", "netns", "exec", ns, *NFTSYNC, "apply", *args],
                              capture_output=True, text=True, timeout=HANG, cwd=cwd)
    except subprocess.TimeoutExpired:
        pytest.fail(f"nftsync apply {' '.join(args)} hung (more than {HANG} s)")


def tables(ns: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "exec", ns, "nft", "-j", "list", "tables"],
                         capture_output=True, text=True, check=True).stdout
    return sorted(o["table"]["name"] for o in json.loads(out)["nftables"] if "table" in o)


def test_fifo_as_farm_or_include(ns: str, tmp_path: Path) -> None:
    fifo = tmp_path / "farm.nft"
    os.mkfifo(fifo)
    p = apply(ns, str(fifo))
    assert p.returncode != 0 and p.stderr == (f"nftsync: error: ruleset file {fifo} is a FIFO "
                                              "(named pipe), not a regular file\n"), p
    main = tmp_path / "main.nft"
    main.write_text(f'include "{FARM}"\ninclude "{fifo}"\n')
    for args in ([str(main)], ["--check", str(main)], ["--dry-run", str(main)]):
        p = apply(ns, *args)
        assert p.returncode != 0 and p.stderr == (
            f'nftsync: error: {main}:2: include "{fifo}": included file {fifo} is a FIFO '
            "(named pipe), not a regular file\n"), p
    assert tables(ns) == []


def test_huge_include_is_refused(ns: str, tmp_path: Path) -> None:
    big = tmp_path / "pins.nft"
    with open(big, "w") as f:  # 4.6 MB of comments: valid nft, refused for its size
        for i in range(46_000):
            f.write(f"# pin {i:06d} " + "x" * 87 + "\n")
    main = tmp_path / "main.nft"
    main.write_text(f'include "{FARM}"\n\ninclude "{big}"\n')
    p = apply(ns, str(main))
    assert p.returncode != 0 and p.stderr == (
        f'nftsync: error: {main}:3: include "{big}": included file {big} (4.4 MiB) takes the '
        "ruleset past 4 MiB (the farm file and every file it includes, together)\n"), p
    assert tables(ns) == []


def test_farm_split_over_includes_applies(ns: str, tmp_path: Path) -> None:
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "farm.nft").write_text(FARM.read_text())
    main = tmp_path / "main.nft"
    main.write_text('# the farm, from a file relative to the working directory\n'
                    'include "./parts/*.nft"\n')
    p = apply(ns, str(main), "--json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["applied"] is True
    assert tables(ns) == ["nftsync_web"]
