"""How long the event loop could not run: the daemon's stall detector.

Everything the daemon does (learning, sending, merging, the control socket) runs on one asyncio
loop, so a slow step anywhere delays everything else, and replication lag grows by that much. A
task sleeps for a short interval over and over and records how late it woke up; the histogram
of those pauses is in `nftsync ctl stats` ("loop"), cheap enough to run always.
"""

from __future__ import annotations

import asyncio
import time

INTERVAL_S = 0.01
BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


class LoopWatch:
    def __init__(self, interval: float = INTERVAL_S) -> None:
        self.interval = interval
        self.counts = [0] * (len(BUCKETS_MS) + 1)  # the last: over the largest bucket
        self.samples = 0
        self.max_ms = 0.0
        self.total_ms = 0.0
        self.started = time.monotonic()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            self.record((loop.time() - due) * 1000)

    def record(self, late_ms: float) -> None:
        late_ms = max(0.0, late_ms)
        self.samples += 1
        self.total_ms += late_ms
        self.max_ms = max(self.max_ms, late_ms)
        for i, bound in enumerate(BUCKETS_MS):
            if late_ms <= bound:
                self.counts[i] += 1
                return
        self.counts[-1] += 1

    def as_dict(self) -> dict:
        """Pauses in ms as a cumulative histogram (Prometheus-style `le` buckets)."""
        cumulative: dict[str, int] = {}
        n = 0
        for bound, c in zip((*map(str, BUCKETS_MS), "+Inf"), self.counts, strict=True):
            n += c
            cumulative[bound] = n
        return {"interval_ms": self.interval * 1000, "samples": self.samples,
                "max_ms": round(self.max_ms, 3), "sum_ms": round(self.total_ms, 3),
                "le_ms": cumulative, "over_2ms": self.samples - cumulative["2"],
                "since_s": round(time.monotonic() - self.started, 1)}
