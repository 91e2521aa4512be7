"""The conntrack target: replicated conntrack entries through one batched ctnetlink writer."""

from __future__ import annotations

import logging

from nftsync.conntrack import CtEntry
from nftsync.errors import NftsyncError
from nftsync.netlink.ctsocket import CtWriter

from .target import SinkStats
from .writer import KernelWriter

log = logging.getLogger("nftsync.daemon")


class CtSink:
    """Applies conntrack upserts/deletes through one batched ctnetlink writer."""

    def __init__(self, writer: KernelWriter | None = None) -> None:
        self.ct_writer = CtWriter()
        self.stats = SinkStats()
        self.writer = writer

    @property
    def portid(self) -> int:
        return self.ct_writer.portid

    def apply(self, ops: list[tuple[str, CtEntry]]) -> None:
        """Write `ops` now, or queue them for the writer thread if there is one."""
        if not ops:
            return
        if self.writer is not None:
            self.writer.submit(self._apply_queued, len(ops), ops, lane="ct")
            return
        self._apply_now(ops)

    def _apply_queued(self, ops: list[tuple[str, CtEntry]]) -> None:
        try:
            self._apply_now(ops)
        except NftsyncError as exc:  # e.g. no ACK from the kernel: these changes are lost
            self.stats.failed += len(ops)
            self.stats.last_error = f"conntrack write: {exc}"
            log.warning("%s", self.stats.last_error)

    def _apply_now(self, ops: list[tuple[str, CtEntry]]) -> None:
        res = self.ct_writer.apply(ops)
        self.stats.transactions += 1
        self.stats.applied += res.applied
        real = res.failed  # deletes of absent entries are counted apart, not as failures
        self.stats.failed += len(real)
        if real:
            op, ct, err = real[0]
            self.stats.last_error = f"conntrack {op} {ct}: errno {err}"
            log.warning("%d conntrack change(s) failed, first: %s", len(real),
                        self.stats.last_error)

    def close(self) -> None:
        self.ct_writer.close()

    def problems(self) -> list[str]:
        """Nothing waits for retry: a refused conntrack change is counted failed and dropped
        (the peer's next update of that connection carries it again)."""
        return []
