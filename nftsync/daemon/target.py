"""One interface for what the daemon writes replicated changes into: the kernel targets.

After conntrack-tools' include/external.h (one interface, external_cache.c and
external_inject.c behind it): the daemon hands a target the changes that won the replica's
conflict rule and does not care what the target is. Three kinds implement it:

* an nft session map (`nftsink.NftMapTarget`: one map of the shared `NftSink`, netlink batches
  with refusal handling and retry);
* a legacy farm's xt_recent table (`legacy.LegacyMap`: /proc writes, folded into its next poll);
* the conntrack table (`ctsink.CtSink`: batched ctnetlink writes; ops are (op, CtEntry)).

Each counts what it wrote in a `SinkStats` and says in words what waits for a retry
(`problems()`, for health reasons and `nftsync ctl stats`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from nftsync.replication import ElementOp

Op = TypeVar("Op", contravariant=True)


@dataclass(slots=True)
class SinkStats:
    applied: int = 0  # changes the kernel accepted
    failed: int = 0  # changes given up (not kept for retry)
    transactions: int = 0
    retries: int = 0  # batches sent again after a refusal (corrected, or without the refused)
    last_error: str = ""
    errors: dict[str, int] = field(default_factory=dict)
    # Changes the kernel refused, by cause, each counted once (a retry refused again is not).
    # Replaced, never resized in place, by the writer thread: readers may iterate it.
    refused: dict[str, int] = field(default_factory=dict)
    waiting: int = 0  # refused changes kept for retry now
    recovered: int = 0  # refused changes that a retry wrote


class KernelTarget(Protocol[Op]):
    """Something in the kernel that replicated changes are written into."""

    @property
    def stats(self) -> SinkStats:
        """What was written, refused and given up (shared by the maps of one sink)."""
        ...

    def apply(self, ops: list[Op]) -> None:
        """Write `ops`, now or queued for a kernel writer thread; never raises for what the
        kernel refuses (that is counted in `stats` and, if kept for retry, in `problems`)."""
        ...

    def problems(self) -> list[str]:
        """What waits for a retry, and why, in words (one line per cause); [] if nothing."""
        ...


#: What session records (nft maps, xt_recent tables) are written into.
SessionTarget = KernelTarget[ElementOp]
