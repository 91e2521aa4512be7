"""The kernel writer: worker threads that run the sinks' kernel writes, one per lane.

Both sinks hand their writes to one `KernelWriter`, which runs them on two threads, one per sink
(lanes "nft" and "ct"): the kernel work (the nft commit, the conntrack inserts inside sendmsg)
then runs while the event loop decodes the next frames, as libnftables (ctypes) and socket calls
release the GIL, and conntrack entries never wait behind session writes (a full map once
delayed the peer's conntrack entries by 30-60 s, a failover in that window dropped them).
Writes stay in submission order within a lane.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable

log = logging.getLogger("nftsync.daemon")


class _Lane:
    """One worker thread and its job queue."""

    def __init__(self, owner: KernelWriter, name: str) -> None:
        self.owner = owner
        self.name = name
        self.queued = 0
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=f"nftsync-kernel-{name}",
                                       daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            fn, count, args = job
            try:
                fn(*args)
            except Exception:  # a bug must not kill the writer: log it, keep writing
                log.exception("kernel write failed (%s)", self.name)
            self.owner._done(self, count)


class KernelWriter:
    """Worker threads that perform the sinks' kernel writes, one per lane ("nft" for session
    maps, "ct" for conntrack), each in submission order, so one kind never waits behind the
    other.

    `submit` never blocks; the event loop calls `wait_room()` after submitting a frame's worth,
    which waits while a lane has more than `high` changes queued (until it is back under
    `low`), so a slow kernel slows the peer's TCP stream down instead of growing the queue
    without bound.
    """

    LANES = ("nft", "ct")

    # Up to `high` changes per lane wait in memory (~350 B each for a conntrack entry): 40k
    # made ~180 B of RSS per connection of a 100k burst on the receiver, 20k keeps it within
    # the 300 B an entry aims at, as fast (same-run bench, benchmarks/README.md); 8k was slower.
    def __init__(self, loop: asyncio.AbstractEventLoop, high: int = 20_000,
                 low: int = 5_000) -> None:
        self.loop = loop
        self.high, self.low = high, low
        self._lock = threading.Lock()
        self._room = asyncio.Event()
        self._room.set()
        self._waiting = False
        self.lanes = {name: _Lane(self, name) for name in self.LANES}
        self.thread = self.lanes["nft"].thread

    @property
    def queued(self) -> int:
        """Changes submitted and not yet written, all lanes together."""
        return sum(lane.queued for lane in self.lanes.values())

    def submit(self, fn: Callable[..., None], count: int, *args: object,
               lane: str = "nft") -> None:
        target = self.lanes[lane]
        with self._lock:
            target.queued += count
        target.jobs.put((fn, count, args))

    async def wait_room(self) -> None:
        with self._lock:
            if all(lane.queued <= self.high for lane in self.lanes.values()):
                return
            self._waiting = True
            self._room.clear()
        await self._room.wait()

    def _done(self, lane: _Lane, count: int) -> None:
        with self._lock:
            lane.queued -= count
            wake = self._waiting and lane.queued <= self.low and \
                all(other.queued <= self.high for other in self.lanes.values())
            if wake:
                self._waiting = False
        if wake:
            self.loop.call_soon_threadsafe(self._room.set)

    def close(self, timeout: float = 10.0) -> None:
        """Finish what is queued (bounded by `timeout` in all), then stop the threads."""
        deadline = time.monotonic() + timeout
        for lane in self.lanes.values():
            lane.jobs.put(None)
        for lane in self.lanes.values():
            lane.thread.join(max(0.0, deadline - time.monotonic()))
            if lane.thread.is_alive():
                log.warning("kernel writer: %d change(s) still queued at shutdown (%s)",
                            lane.queued, lane.name)

