"""The node's replicated state and the kernel it is written into: what a peer link talks to.

`Replicator` joins the sans-I/O replication core (`nftsync.replication.Replica`: the copy, the
conflict rule, the checks) to this node's farms (which maps are replicated, and what each may
hold) and to the kernel writers (nft maps, legacy xt_recent tables, conntrack). A peer link sees
only this (peer.Replicator is the protocol it needs); learning from the kernel goes through
`replica` too (learn.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator

from nftsync.errors import NftsyncError
from nftsync.nft import Nft
from nftsync.proto import MAX_REMAINING_MS, Record
from nftsync.replication import DEFAULT_CAPACITY, MapPolicy, Replica
from nftsync.ruleset import current_farms

from .clock import now_ms
from .config import DaemonConfig
from .ctsink import CtSink
from .farms import FarmView
from .l7 import ANY_SERVER, L7Map
from .legacy import LegacyMap, load_legacy_maps
from .nftsink import NftSink
from .target import SessionTarget
from .writer import KernelWriter

log = logging.getLogger("nftsync.daemon")


class Replicator:
    """Replicated maps, the copy of their state, and the writers into this node's kernel."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.node_id = config.node_id
        self.replica = Replica(config.node_id)
        self.view = FarmView()
        self.legacy: dict[str, LegacyMap] = {}  # map_id -> xt_recent table of a legacy farm
        self.l7: dict[str, L7Map] = {}  # map_id (haproxy/<table>) -> HAProxy stick table
        self.nft = Nft()
        # The sink's own libnftables context: its writes run in the kernel writer thread.
        self.nft_sink = NftSink()
        self.ct_sink: CtSink | None = None
        self.kernel: KernelWriter | None = None
        self.farm_reloads = 0
        self.last_error = ""

    # -- kernel writers ------------------------------------------------------------------------
    def open(self, loop: asyncio.AbstractEventLoop) -> None:
        self.kernel = KernelWriter(loop)
        self.nft_sink.writer = self.kernel
        self.ct_sink = CtSink(self.kernel)

    def close(self) -> None:
        if self.kernel is not None:
            self.kernel.close()
        if self.ct_sink is not None:
            self.ct_sink.close()

    # -- what is replicated --------------------------------------------------------------------
    def load_farms(self) -> bool:
        """Read the farms from the kernel's ruleset; False (and last_error) if that failed."""
        try:
            farms = current_farms(self.nft)
        except NftsyncError as exc:
            self.last_error = f"reading farms: {exc}"
            log.error("%s", self.last_error)
            return False
        self.view = FarmView.build(farms, self.config.farms)
        self._set_policies()
        self.farm_reloads += 1
        log.info("farms: %s", ", ".join(f"{n} ({len(f.backends)} backends)"
                                        for n, f in self.view.farms.items()) or "none")
        return True

    def load_legacy(self) -> None:
        self.legacy = load_legacy_maps(self.config.legacy_farms)
        self._set_policies()
        if self.legacy:
            log.info("legacy xt_recent tables: %s", ", ".join(
                lm.table.name for lm in self.legacy.values()))

    def load_l7(self, maps: dict[str, L7Map]) -> None:
        """The HAProxy stick tables of [[haproxy]] (daemon/l7.py), fixed until a restart."""
        self.l7 = dict(maps)
        self._set_policies()
        if maps:
            log.info("HAProxy stick tables: %s", ", ".join(sorted(maps)))

    def _set_policies(self) -> None:
        """Tell the replica what each replicated map may hold: its farm's backend marks, its
        size, its timeout (peer records are checked against these)."""
        policies: dict[str, MapPolicy] = {}
        for map_id, rmap in self.view.maps.items():
            smap = rmap.smap
            farm = self.view.farms[smap.farm]
            timeout_ms = min((smap.timeout or 0) * 1000, MAX_REMAINING_MS)
            policies[map_id] = MapPolicy(
                marks=frozenset(farm.backends), capacity=smap.size or DEFAULT_CAPACITY,
                max_ms=timeout_ms or MAX_REMAINING_MS, static=not smap.timeout,
                key_valid=rmap.key_valid)
        for map_id, lm in self.legacy.items():
            policies[map_id] = MapPolicy(marks=frozenset((lm.mark,)),
                                         capacity=lm.table.capacity,
                                         max_ms=MAX_REMAINING_MS, key_valid=lm.key_valid)
        for map_id, m in self.l7.items():
            # Any server id: checked against this HAProxy when pushed, not on arrival (l7.py).
            policies[map_id] = MapPolicy(marks=ANY_SERVER, capacity=DEFAULT_CAPACITY,
                                         max_ms=MAX_REMAINING_MS, key_valid=m.key_valid)
        legacy_marks = {lm.mark for lm in self.legacy.values()}
        self.replica.set_maps(policies, self.view.marks | legacy_marks)

    def target(self, map_id: str) -> SessionTarget | None:
        """Where records of `map_id` go: an nft session map or a legacy xt_recent table (one
        kernel target interface, daemon/target.py)."""
        rmap = self.view.maps.get(map_id)
        if rmap is not None:
            return self.nft_sink.target(rmap)
        return self.legacy.get(map_id) or self.l7.get(map_id)

    # -- what a peer link calls ----------------------------------------------------------------
    def snapshot_records(self, chunk: int = 4000) -> Iterator[list[Record]]:
        """Everything this node holds (every origin, tombstones too), in chunks of records,
        copied now and built lazily (nftsync.replication.Replica.snapshot)."""
        return self.replica.snapshot(time.monotonic(), self.config.conntrack, chunk,
                                     clock=time.monotonic)

    def apply_remote(self, records: list[Record], sender: int,
                     in_snapshot: bool) -> tuple[int, int]:
        """Merge a peer's records; what wins goes into the kernel, batched. Returns (written,
        refused)."""
        w = self.replica.receive(records, sender, in_snapshot, time.monotonic(), now_ms())
        for map_id, ops in w.sessions.items():
            target = self.target(map_id)
            if target is not None:
                target.apply(ops)
        if w.conntrack and self.ct_sink is not None:
            self.ct_sink.apply(w.conntrack)
        return len(w), w.refused

    async def kernel_room(self) -> None:
        """Wait while the kernel writer is far behind (back-pressure on the peer's stream)."""
        if self.kernel is not None:
            await self.kernel.wait_room()

    def kernel_queued(self) -> int:
        """Changes handed to the kernel writer threads and not written yet."""
        return self.kernel.queued if self.kernel is not None else 0

    def after_kernel_writes(self, callback: Callable[[], None]) -> None:
        """Call `callback` in the loop once every kernel write queued so far is done: a
        marker goes through each writer lane, which runs its jobs in order (writer.py), so
        when the markers of all lanes are back, what was queued before them is written."""
        kernel = self.kernel
        if kernel is None:
            callback()
            return
        left = [len(kernel.lanes)]
        loop = kernel.loop

        def one_lane() -> None:  # in the loop
            left[0] -= 1
            if not left[0]:
                callback()

        for lane in kernel.lanes:
            kernel.submit(loop.call_soon_threadsafe, 0, one_lane, lane=lane)
