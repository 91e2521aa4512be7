"""Test layout: tests/unit needs no root and no kernel (proto, config, the replication core, codecs
on captured datagrams, CLI parsing: seconds); tests/kernel runs against the real kernel, each test
in network namespaces of its own (root). Slow soak/scale tests run only with NFTSYNC_SLOW=1."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # builders: test data for unit and kernel tests
KERNEL = Path(__file__).parent / "kernel"


def pytest_collection_modifyitems(config, items):
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="needs root: tests/kernel runs against the real kernel in "
                                "network namespaces (tests/unit runs without root)")
        for item in items:
            if KERNEL in Path(str(item.fspath)).parents:
                item.add_marker(skip)
    if os.environ.get("NFTSYNC_SLOW") != "1":
        slow = pytest.mark.skip(reason="slow soak/scale test: set NFTSYNC_SLOW=1 (CI does)")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(slow)
