"""The wall clock the replication records carry (ms since the epoch), read in one place."""

from __future__ import annotations

import time


def now_ms() -> int:
    return int(time.time() * 1000)
