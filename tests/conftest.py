"""Shared pytest fixtures. Every test that touches the kernel does so in a namespace of its own."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import netns  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if os.geteuid() != 0:
        # tests/unit needs no kernel and no root; everything else runs in namespaces.
        unit = Path(__file__).parent / "unit"
        skip = pytest.mark.skip(reason="needs root: tests run against the real kernel in netns")
        for item in items:
            if unit not in Path(str(item.fspath)).parents:
                item.add_marker(skip)
    if os.environ.get("NFTSYNC_SLOW") != "1":
        slow = pytest.mark.skip(reason="slow soak/scale test: set NFTSYNC_SLOW=1 (CI does)")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(slow)


@pytest.fixture
def ns() -> Iterator[str]:
    """A fresh, empty network namespace (only `lo`, up), deleted after the test."""
    name = netns.create()
    try:
        yield name
    finally:
        netns.delete(name)


# --- netns lab (netns-lab/lab.sh): two LBs, a many-address client, backends -------------------
import contextlib as _contextlib  # noqa: E402

import lab as _lab  # noqa: E402


@pytest.fixture(scope="module")
def lab() -> Iterator[_lab.Lab]:
    """A default lab (50 clients, 2 backends, lb1 active) shared by a module; torn down always.

    Tests that move the VIP or cut the sync link put them back (lab.move_vip("lb1"),
    lab.restore_sync()) in a finally, so the next test in the module starts from the default.
    """
    running = _lab.Lab.up()
    try:
        yield running
    finally:
        running.down()


@pytest.fixture
def lab_factory() -> Iterator:
    """`lab_factory(clients=..., backends=...)` -> a fresh Lab of its own, down after the test."""
    with _contextlib.ExitStack() as stack:

        def make(clients: int = 50, backends: int = 2) -> _lab.Lab:
            made = _lab.Lab.up(clients=clients, backends=backends)
            stack.callback(made.down)
            return made

        yield make
