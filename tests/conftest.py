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
        skip = pytest.mark.skip(reason="needs root: tests run against the real kernel in netns")
        for item in items:
            item.add_marker(skip)


@pytest.fixture
def ns() -> Iterator[str]:
    """A fresh, empty network namespace (only `lo`, up), deleted after the test."""
    name = netns.create()
    try:
        yield name
    finally:
        netns.delete(name)
