"""Refused session writes: why the kernel refused them, and what is kept for retry.

A refused add is not counted as applied; it is counted per cause (`SinkStats.refused`) and kept
(bounded, the latest op per key: a newer op for the key replaces it, a delete cancels it) until
its cause may have gone away. These are the records of that, and the words for each cause.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field

from nftsync.model import MapRef
from nftsync.replication import ElementOp

from .farms import ReplicatedMap
from .target import SinkStats

# Causes of a refusal, as counted in SinkStats.refused and said by NftSink.problems().
MAP_FULL = "map_full"
EXISTS = "exists"
NO_SUCH_MAP = "no_such_map"
NO_SUCH_TABLE = "no_such_table"
INVALID = "invalid"
OTHER = "other"

MAX_WAITING = 200_000  # refused session ops kept for retry, all maps together
RETRY_FULL_S = 1.0  # a full or missing map is probed this often (one element)
RETRY_MAX_S = 60.0  # other causes back off up to this

_ERRNOS = (errno.ENFILE, errno.ENOENT, errno.EEXIST, errno.EBUSY, errno.EINVAL, errno.ERANGE,
           errno.EOPNOTSUPP, errno.ENOSPC, errno.ENOMEM, errno.EPERM)


def count_refused(stats: SinkStats, cause: str, n: int = 1) -> None:
    refused = stats.refused
    if cause in refused:
        refused[cause] += n  # same size: a concurrent reader's iteration stays valid
    else:
        stats.refused = {**refused, cause: n}


@dataclass(slots=True)
class Waiting:
    """A refused add kept for retry."""

    op: ElementOp
    cause: str
    since: float  # monotonic time of the refusal: the remaining expiry runs down from here


@dataclass(slots=True)
class MapState:
    """What the sink knows of one kernel map it writes: its refused ops and why."""

    rmap: ReplicatedMap
    size: int | None  # the set's `size` (0: no limit; None: not known)
    waiting: dict[bytes, Waiting] = field(default_factory=dict)  # key -> op, oldest first
    by_cause: dict[str, int] = field(default_factory=dict)
    detail: str = ""  # the last refusal, in words
    next_retry: float = 0.0
    backoff: float = RETRY_FULL_S
    retry_queued: bool = False
    # Taken out of `waiting` for a retry that is being written now: still waiting as far as
    # anyone reading problems() or the stats is concerned, until the kernel has answered.
    in_retry: dict[str, int] = field(default_factory=dict)


class Refusals:
    """Refused ops of one write call, logged once per map and cause at its end (one line for
    2,000 refused elements, not 2,000 lines)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.first: dict[str, str] = {}

    def add(self, cause: str, detail: str) -> None:
        self.counts[cause] = self.counts.get(cause, 0) + 1
        self.first.setdefault(cause, detail)



def cause_of(err: int | None) -> str:
    """The cause of a refused element by its errno, in the context of a set element."""
    if err == errno.ENFILE:
        return MAP_FULL
    if err in (errno.EEXIST, errno.EBUSY):
        return EXISTS
    if err in (errno.EINVAL, errno.ERANGE, errno.EOPNOTSUPP):
        return INVALID
    return OTHER


def errno_of(text: str) -> int | None:
    """The errno behind an nft error text (libnftables prints only strerror)."""
    for e in _ERRNOS:
        if os.strerror(e) in text:
            return e
    return None


def map_words(ref: MapRef, cause: str, size: int | None) -> str | None:
    """A refusal that concerns the whole map, in words; None for causes of one element."""
    if cause == MAP_FULL:
        return f"map {ref} is full ({size} of {size})" if size else f"map {ref} is full"
    if cause == NO_SUCH_TABLE:
        return f"table {ref.family} {ref.table} does not exist (map {ref.name})"
    if cause == NO_SUCH_MAP:
        return f"map {ref} does not exist"
    return None
