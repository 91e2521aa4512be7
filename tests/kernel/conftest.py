"""Fixtures of the kernel tests: throw-away namespaces and the netns lab (netns-lab/lab.sh).
Every test that touches the kernel does so in namespaces of its own."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the helpers: lab, netns, daemons, ha, helpers

import netns  # noqa: E402


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
