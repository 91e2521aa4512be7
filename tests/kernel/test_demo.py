"""The README's first command, netns-lab/failover-demo.sh, run as a user runs it.

Why a test: the demo is the product's first impression and its figures are quoted in the README;
a demo that silently stopped showing what it claims (clients kept, a stream kept, across a
failover and a failback) would mislead more than a missing one.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from lab import unique_prefix

ROOT = Path(__file__).resolve().parents[2]


def _run_demo(**env: str) -> str:
    prefix = unique_prefix()
    p = subprocess.run(
        [str(ROOT / "netns-lab" / "failover-demo.sh")], capture_output=True, text=True,
        timeout=240, stdin=subprocess.DEVNULL,
        env={**os.environ, "LAB": prefix, "LAB_PYTHON": sys.executable, **env})
    # The demo tears its lab down itself, also on failure: nothing of it may be left.
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert prefix not in left, f"the demo left namespaces behind: {left}"
    assert p.returncode == 0, f"failover-demo.sh exited {p.returncode}:\n{p.stdout}\n{p.stderr}"
    return p.stdout


def test_failover_demo_keeps_every_client_and_the_stream_through_failover_and_failback():
    out = _run_demo()
    assert "clients on the same backend after the failover: 50/50" in out, out
    assert "clients on the same backend after the failback: 50/50" in out, out
    assert re.search(r"arrived while lb1 was down, on the same backend after the failback: "
                     r"(\d+)/\1\b", out), out
    assert "held through both moves: ALIVE" in out, out
    assert re.search(r"lb1: ready .*: (\d+) of lb2's \1 sessions in its kernel", out), out
    # Both daemons end healthy, lb1 serving again.
    tail = out[out.index("== the daemons at the end"):]
    assert tail.count("health    ok") == 2, tail
    assert re.search(r"-- lb1\n.*\nrole +active", tail), tail
