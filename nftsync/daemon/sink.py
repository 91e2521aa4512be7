"""Writing replicated state into the local kernel, in batches.

Session map elements go through libnftables text transactions (one per map per batch; text is
~2.5x faster than JSON). An element whose key exists is replaced by "delete + add" in the same
transaction, except where the kernel refreshes in place (>= 6.12: `add` with the same value and
an explicit `expires`). The daemon's mirror says which keys exist; when it is wrong (the packet
path added a key we had not heard of yet, or the kernel expired one) the transaction fails as a
whole and is retried element by element, so one surprise never loses the rest of the batch.

Conntrack entries go through `CtWriter` (ctnetlink messages built by hand, many per sendmsg).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from nftsync.errors import NftsyncError
from nftsync.netlink.ctnetlink import CtEntry, CtWriter
from nftsync.nft import Nft
from nftsync.tables.nftmap import kernel_refreshes_expiry

from .farms import ReplicatedMap

log = logging.getLogger("nftsync.daemon")


@dataclass(slots=True)
class SinkStats:
    applied: int = 0
    failed: int = 0
    transactions: int = 0
    retries: int = 0
    last_error: str = ""
    errors: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class ElementOp:
    key: bytes
    mark: int | None  # None: delete
    remaining_ms: int  # 0: no timeout
    old_mark: int | None  # what the mirror believes the kernel has for this key (None: absent)

    @property
    def exists(self) -> bool:
        return self.old_mark is not None


class NftSink:
    """Applies element changes to session maps. Our own transactions are recognised in the nft
    event stream by the committing thread id (NEWGEN pid), which `thread_id` records."""

    def __init__(self, nft: Nft | None = None) -> None:
        self.nft = nft or Nft()
        self.refresh_in_place = kernel_refreshes_expiry()
        self.stats = SinkStats()
        self.thread_ids: set[int] = set()

    def apply(self, rmap: ReplicatedMap, ops: list[ElementOp]) -> None:
        if not ops:
            return
        self.thread_ids.add(threading.get_native_id())
        cmds = self._commands(rmap, ops)
        try:
            self.nft.cmd(cmds, what=f"replicate into {rmap.smap.ref}")
            self.stats.transactions += 1
            self.stats.applied += len(ops)
            return
        except NftsyncError as exc:
            if len(ops) == 1:
                self._fail(rmap, ops[0], exc)
                return
            self.stats.retries += 1
        for op in ops:  # one surprise must not lose the batch: element by element
            self._apply_one(rmap, op)

    def _apply_one(self, rmap: ReplicatedMap, op: ElementOp) -> None:
        # The mirror may be wrong about the kernel (packet path, expiry): try the other belief.
        other = None if op.exists else (op.mark if op.mark is not None else 0)
        variants = [op, ElementOp(op.key, op.mark, op.remaining_ms, other)]
        last: Exception | None = None
        for variant in variants:
            try:
                self.nft.cmd(self._commands(rmap, [variant]), what=f"replicate into "
                             f"{rmap.smap.ref}")
                self.stats.transactions += 1
                self.stats.applied += 1
                return
            except NftsyncError as exc:
                last = exc
        if op.mark is None and last is not None and "No such file" in str(last):
            return  # deleting what the kernel already expired: nothing to do
        self._fail(rmap, op, last)

    def _fail(self, rmap: ReplicatedMap, op: ElementOp, exc: Exception | None) -> None:
        self.stats.failed += 1
        self.stats.last_error = f"{rmap.map_id} {rmap.key_text(op.key)}: {exc}"
        log.warning("could not apply %s", self.stats.last_error)

    def _commands(self, rmap: ReplicatedMap, ops: list[ElementOp]) -> str:
        ref = rmap.smap.ref
        where = f"{ref.family} {ref.table} {ref.name}"
        timeout_s = rmap.smap.timeout
        dels: list[str] = []
        adds: list[str] = []
        for op in ops:
            text = rmap.key_text(op.key)
            if op.mark is None:
                if op.exists:
                    dels.append(text)
                continue
            # Replace by delete + add, unless the kernel refreshes a timed element in place,
            # which it does only for the same value (another value is EEXIST).
            if op.exists and (not self.refresh_in_place or op.remaining_ms == 0 or
                              op.old_mark != op.mark):
                dels.append(text)
            adds.append(_element(text, op, timeout_s))
        lines = []
        for i in range(0, len(dels), 2000):
            lines.append(f"delete element {where} {{ {', '.join(dels[i:i + 2000])} }}")
        for i in range(0, len(adds), 2000):
            lines.append(f"add element {where} {{ {', '.join(adds[i:i + 2000])} }}")
        return "\n".join(lines)

    def thread_is_ours(self, pid: int | None) -> bool:
        return pid is not None and pid in self.thread_ids


def _element(text: str, op: ElementOp, map_timeout: int | None) -> str:
    if op.remaining_ms == 0 or map_timeout is None:
        return f"{text} : {op.mark:#x}"
    ms = op.remaining_ms
    if ms > map_timeout * 1000:
        return f"{text} timeout {ms}ms expires {ms}ms : {op.mark:#x}"
    return f"{text} expires {ms}ms : {op.mark:#x}"


class CtSink:
    """Applies conntrack upserts/deletes through one batched ctnetlink writer."""

    def __init__(self) -> None:
        self.writer = CtWriter()
        self.stats = SinkStats()

    @property
    def portid(self) -> int:
        return self.writer.portid

    def apply(self, ops: list[tuple[str, CtEntry]]) -> None:
        if not ops:
            return
        res = self.writer.apply(ops)
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
        self.writer.close()
