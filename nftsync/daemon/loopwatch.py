"""How long the event loop could not run: the daemon's stall detector.

Everything the daemon does (learning, sending, merging, the control socket) runs on one asyncio
loop, so a slow step anywhere delays everything else, and replication lag grows by that much. A
task sleeps for a short interval over and over and records how late it woke up; the histogram
of those pauses is in `nftsync ctl stats` ("loop"), cheap enough to run always.

The cyclic garbage collector is one known cause of pauses (it walks every tracked object of the
generations it collects): `GcWatch` times each collection through `gc.callbacks`, so a pause in
the histogram can be told apart from one of the GC ("gc" in `ctl stats`).
"""

from __future__ import annotations

import asyncio
import gc
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


class GcWatch:
    """Time spent in the cyclic GC, per generation, from `gc.callbacks` (while installed)."""

    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.total_ms = [0.0, 0.0, 0.0]
        self.max_ms = [0.0, 0.0, 0.0]
        self._t0 = 0.0

    def install(self) -> None:
        gc.callbacks.append(self._callback)

    def remove(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
            return
        gen = min(int(info.get("generation", 2)), 2)
        ms = (time.perf_counter() - self._t0) * 1000
        self.collections[gen] += 1
        self.total_ms[gen] += ms
        self.max_ms[gen] = max(self.max_ms[gen], ms)

    def as_dict(self) -> dict:
        return {f"gen{g}": {"collections": self.collections[g],
                            "sum_ms": round(self.total_ms[g], 3),
                            "max_ms": round(self.max_ms[g], 3)} for g in range(3)}
