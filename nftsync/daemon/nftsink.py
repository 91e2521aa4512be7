"""The nft map target: replicated session changes written into nftables maps.

Session map elements go through hand-built nf_tables netlink batches (`SetElemWriter`, one
transaction per map per batch: deletes, then adds), falling back to libnftables text
transactions for maps whose key or value types it does not encode. An element whose key exists
is replaced by "delete + add" in the same transaction, except where the kernel refreshes in
place (>= 6.12: `add` with the same value and an explicit `expires`).

A refused batch changes nothing, and the kernel says which element it refused (extended ACK,
see `SetElemError`), so a refusal costs about what an acceptance costs, never one round trip
per element:
* the map is full (ENFILE at add #i): everything before #i fitted, so the adds after it that
  need a new slot are refused at once, and the rest is sent again (two transactions in all);
* the replica was wrong about the kernel (the packet path added a key we had not heard of, the
  kernel expired one: EEXIST on an add, ENOENT on a delete): that element is corrected (delete +
  add, or a plain add) and the batch is sent again;
* the table or the set does not exist: the whole batch is refused;
* anything else: that one element is refused. Without a location (old kernels, libnftables
  text) the batch is bisected, so k refusals cost O(k log n) transactions.

A refused add is kept for retry (`refusals`): `retry_refused()` (the daemon calls it once a
second) probes each map with one waiting element and writes the rest only if that one was
accepted. `problems()` says in words what waits and why ("map ip nftsync_web web_sessions is
full (1000 of 1000)").

One `NftSink` writes every map (one netlink socket, one libnftables context, one writer lane);
`NftSink.target(rmap)` is that map as a `KernelTarget`.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
import time
from dataclasses import dataclass

from nftsync.errors import NftsyncError
from nftsync.model import MapRef
from nftsync.netlink.core import NetlinkError
from nftsync.netlink.nftwriter import SetElemError, SetElemWriter, key_length
from nftsync.nft import Nft
from nftsync.replication import ElementOp
from nftsync.tables.nftmap import element_commands, element_text, kernel_refreshes_expiry

from .echo import netfilter_ports, netlink_inodes
from .farms import ReplicatedMap
from .refusals import (
    EXISTS,
    MAP_FULL,
    MAX_WAITING,
    NO_SUCH_MAP,
    NO_SUCH_TABLE,
    OTHER,
    RETRY_FULL_S,
    RETRY_MAX_S,
    MapState,
    Refusals,
    Waiting,
    cause_of,
    count_refused,
    errno_of,
    map_words,
)
from .target import SinkStats
from .writer import KernelWriter

log = logging.getLogger("nftsync.daemon")

TARGETED_ROUNDS = 8  # corrected resends of one batch before it is bisected instead
RETRY_CHUNK = 4000  # waiting ops written per transaction by a retry


@dataclass(frozen=True, slots=True)
class NftMapTarget:
    """One replicated nft map as a `KernelTarget`: its writes go through the shared sink."""

    sink: NftSink
    rmap: ReplicatedMap

    @property
    def map_id(self) -> str:
        return self.rmap.map_id

    @property
    def stats(self) -> SinkStats:
        return self.sink.stats

    def apply(self, ops: list[ElementOp]) -> None:
        self.sink.apply(self.rmap, ops)

    def problems(self) -> list[str]:
        return self.sink.problems(self.rmap.smap.ref)


class NftSink:
    """Applies element changes to session maps. Our own transactions are recognised in the nft
    event stream by the committing thread id (NEWGEN pid), which `thread_id` records, and in
    the kernel by the port id of the socket that wrote them (`portid`, see `echo_filter`).

    `netlink=True` writes through a `SetElemWriter` of its own (the fast path); `portid` is
    then that socket's, the one almost every write goes through. The libnftables context stays
    for maps the netlink encoder does not cover; its rare echoes are dropped by thread id.
    """

    def __init__(self, nft: Nft | None = None, writer: KernelWriter | None = None,
                 netlink: bool = True, max_waiting: int = MAX_WAITING) -> None:
        # With a writer the context is used by its thread only: never share it (libnftables
        # contexts are not thread-safe).
        before = netlink_inodes()
        self.nft = nft or Nft()
        self.refresh_in_place = kernel_refreshes_expiry()
        self.stats = SinkStats()
        self.thread_ids: set[int] = set()
        self.writer = writer
        self.portid: int | None = None
        self.nft_portid: int | None = None  # the libnftables context's
        self._sock: tuple[int, int] | None = None  # (fd, inode) of the socket `portid` is of
        self.elem_writer: SetElemWriter | None = None
        self.max_waiting = max_waiting
        # Refused ops by map. Written by the writer thread, read by the event loop
        # (`problems`, `retry_refused`): every access holds the lock.
        self._maps: dict[MapRef, MapState] = {}
        self._lock = threading.Lock()
        self._query: SetElemWriter | None = None  # set GETs when not writing by netlink
        if nft is None:
            self._find_portid(before)
            self.nft_portid = self.portid
        if netlink:
            self.elem_writer = SetElemWriter()
            fd = self.elem_writer.fileno()
            self._sock = (fd, os.fstat(fd).st_ino)
            self.portid = self.elem_writer.portid

    def target(self, rmap: ReplicatedMap) -> NftMapTarget:
        """Map `rmap` as a `KernelTarget` (what the daemon writes a map's records into)."""
        return NftMapTarget(self, rmap)

    @property
    def portids(self) -> set[int]:
        """Every port id our writes can carry (for an echo filter that takes several)."""
        return {p for p in (self.portid, self.nft_portid) if p is not None}

    def close(self) -> None:
        for w in (self.elem_writer, self._query):
            if w is not None:
                w.close()
        self.elem_writer = self._query = None

    def _find_portid(self, before: dict[int, int]) -> None:
        """The netlink port id of our libnftables context's socket: our transactions' events
        carry it in their headers, so the event socket can drop them in the kernel (see
        `echo_filter`). libnftables does not expose its socket: it is the netfilter socket that
        appeared with the context; it gets its port id when it first sends (autobind).
        None when that cannot be told for sure (then events are told apart by thread id)."""
        try:
            # Any command binds the socket; not `list tables`: nft 1.0.6 fetches every set's
            # elements for it (36 s and 1 GB beside a 1M-element map, docs/kernels.md).
            self.nft.cmd("list chains")
            ports = netfilter_ports()
        except (NftsyncError, OSError):
            return
        new = {fd: ino for fd, ino in netlink_inodes().items() if fd not in before}
        mine = [(fd, ino) for fd, ino in new.items() if ports.get(ino)]
        if len(mine) == 1:
            self._sock = mine[0]
            self.portid = ports[mine[0][1]]

    def echo_filter_valid(self) -> bool:
        """Whether the socket the port id was read from is still the context's (a reopened
        socket would have another port id, and the old one could be reused by anyone)."""
        if self._sock is None:
            return False
        fd, ino = self._sock
        try:
            return os.readlink(f"/proc/self/fd/{fd}") == f"socket:[{ino}]"
        except OSError:
            return False

    # == writing ==============================================================================
    def apply(self, rmap: ReplicatedMap, ops: list[ElementOp]) -> None:
        """Write `ops` now, or queue them for the writer thread if there is one."""
        if not ops:
            return
        if self.writer is not None:
            self.writer.submit(self._apply_now, len(ops), rmap, ops, lane="nft")
            return
        self._apply_now(rmap, ops)

    def _apply_now(self, rmap: ReplicatedMap, ops: list[ElementOp]) -> None:
        self.thread_ids.add(threading.get_native_id())
        ops = self._supersede(rmap, _last_per_key(ops))
        if ops:
            refusals = Refusals()
            self._write(rmap, ops, refusals, fresh=True)
            self._log_refusals(rmap, refusals)

    def _supersede(self, rmap: ReplicatedMap, ops: list[ElementOp]) -> list[ElementOp]:
        """Newer ops replace waiting ones of the same key (a delete cancels it); the kernel does
        not hold a waiting key, whatever the replica believes, so its new op is a plain add."""
        with self._lock:
            st = self._maps.get(rmap.smap.ref)
            if st is None or not st.waiting:
                return ops
            st.rmap = rmap
            out = []
            for op in ops:
                w = self._unwait(st, op.key)
                if w is None:
                    out.append(op)
                elif op.mark is not None:
                    out.append(ElementOp(op.key, op.mark, op.remaining_ms, None))
            return out

    def _unwait(self, st: MapState, key: bytes) -> Waiting | None:
        """Remove `key` from the waiting ops (lock held)."""
        w = st.waiting.pop(key, None)
        if w is not None:
            st.by_cause[w.cause] -= 1
            self.stats.waiting -= 1
        return w

    def _write(self, rmap: ReplicatedMap, ops: list[ElementOp], refusals: Refusals,
               fresh: bool) -> None:
        """Write `ops`; whatever the kernel refuses goes to `_refuse` (counted if `fresh`)."""
        if self.elem_writer is not None and _netlink_ok(rmap):
            self._write_netlink(rmap, ops, refusals, fresh)
        else:
            self._write_text(rmap, ops, refusals, fresh, full=False)

    def _write_netlink(self, rmap: ReplicatedMap, ops: list[ElementOp], refusals: Refusals,
                       fresh: bool) -> None:
        """One transaction; on a refusal, act on the element the kernel named and send the
        rest again (bounded: after TARGETED_ROUNDS, or without a location, bisect)."""
        assert self.elem_writer is not None
        pending = list(ops)
        corrected: set[bytes] = set()  # keys whose existence belief was flipped once already
        for _round in range(TARGETED_ROUNDS):
            if not pending:
                return
            plan = self._netlink_plan(rmap, pending)
            if plan is None:  # a key of another length: nft text handles (and explains) it
                self._write_text(rmap, pending, refusals, fresh, full=False)
                return
            dels, adds, del_ops, add_ops = plan
            ref = rmap.smap.ref
            try:
                self.elem_writer.apply(ref.family, ref.table, ref.name, dels, adds)
            except SetElemError as exc:
                self.stats.retries += 1
                if exc.where in ("table", "set"):
                    cause = NO_SUCH_TABLE if exc.where == "table" else NO_SUCH_MAP
                    self._refuse_all(rmap, pending, cause, self._explain(rmap, exc.errno, cause),
                                     refusals, fresh)
                    return
                if exc.where is None:
                    self._bisect(rmap, pending, exc, refusals, fresh)
                    return
                i = (del_ops if exc.where == "delete" else add_ops)[exc.index]
                pending = self._handle(rmap, pending, i, exc, add_ops[exc.index:] if
                                       exc.where == "add" else [], corrected, refusals, fresh)
                continue
            except NetlinkError as exc:  # no answer: what happened is unknown, try later
                self._refuse_all(rmap, pending, OTHER, self._explain(rmap, exc.errno, OTHER),
                                 refusals, fresh)
                return
            except OSError as exc:  # not sent (e.g. larger than the send buffer): nft text
                log.warning("netlink element batch for %s not sent (%s): using libnftables",
                            ref, exc)
                self._write_text(rmap, pending, refusals, fresh, full=False)
                return
            self.stats.transactions += 1
            self.stats.applied += len(pending)
            return
        mid = len(pending) // 2  # many surprises in one batch: halves, each resilient again
        for part in (pending[:mid], pending[mid:]):
            self._write_netlink(rmap, part, refusals, fresh)

    def _handle(self, rmap: ReplicatedMap, pending: list[ElementOp], i: int, exc: SetElemError,
                later_adds: list[int], corrected: set[bytes], refusals: Refusals,
                fresh: bool) -> list[ElementOp]:
        """React to the kernel refusing element `pending[i]`; returns what to send again."""
        op = pending[i]
        err = exc.errno
        if exc.where == "add" and err == errno.ENFILE:
            # Everything before this add fitted: from here on, no add that needs a new slot
            # does (a replacement frees its own slot first, in the same transaction).
            drop = {j for j in later_adds if pending[j].old_mark is None}
            drop.add(i)
            self._note_full(rmap)
            detail = self._explain(rmap, err, MAP_FULL)
            for j in sorted(drop):
                self._refuse(rmap, pending[j], MAP_FULL, detail, refusals, fresh)
            return [o for j, o in enumerate(pending) if j not in drop]
        if exc.where == "delete" and err == errno.ENOENT:
            # Not in the kernel (it expired, or it was never written): a delete is done, a
            # replacement becomes a plain add.
            rest = pending[:i] + pending[i + 1:]
            if op.mark is not None:
                rest.insert(i, ElementOp(op.key, op.mark, op.remaining_ms, None))
            return rest
        if exc.where == "add" and err in (errno.EEXIST, errno.EBUSY) and \
                op.old_mark is None and op.key not in corrected:
            # The packet path added this key with another value: replace it (delete + add).
            corrected.add(op.key)
            return pending[:i] + [ElementOp(op.key, op.mark, op.remaining_ms, -1)] + \
                pending[i + 1:]
        cause = cause_of(err)
        self._refuse(rmap, op, cause, self._explain(rmap, err, cause, op), refusals, fresh)
        return pending[:i] + pending[i + 1:]

    def _bisect(self, rmap: ReplicatedMap, ops: list[ElementOp], exc: NftsyncError,
                refusals: Refusals, fresh: bool) -> None:
        """The kernel refused `ops` without saying which element: halve until it is one."""
        err = getattr(exc, "errno", None) or errno_of(str(exc))
        if err == errno.ENOENT:
            missing = self._missing(rmap)
            if missing is not None:
                self._refuse_all(rmap, ops, missing, self._explain(rmap, err, missing),
                                 refusals, fresh)
                return
        if len(ops) == 1:
            cause = cause_of(err)
            self._refuse(rmap, ops[0], cause, self._explain(rmap, err, cause, ops[0]),
                         refusals, fresh)
            return
        mid = len(ops) // 2
        for part in (ops[:mid], ops[mid:]):
            self._write(rmap, part, refusals, fresh)

    def _write_text(self, rmap: ReplicatedMap, ops: list[ElementOp], refusals: Refusals,
                    fresh: bool, full: bool) -> bool:
        """The libnftables path: one text transaction; bisection on a refusal (its errors
        carry no location). Once an add found the map full, the adds that need a new slot
        are refused without trying. Returns whether the map was found full."""
        if full:
            drop = [op for op in ops if op.mark is not None and op.old_mark is None]
            if drop:
                detail = self._explain(rmap, errno.ENFILE, MAP_FULL)
                for op in drop:
                    self._refuse(rmap, op, MAP_FULL, detail, refusals, fresh)
                ops = [op for op in ops if op.mark is None or op.old_mark is not None]
                if not ops:
                    return True
        try:
            self.nft.cmd(self._commands(rmap, ops), what=f"replicate into {rmap.smap.ref}")
        except NftsyncError as exc:
            self.stats.retries += 1
            err = errno_of(str(exc))
            if len(ops) > 1:
                if err == errno.ENOENT and (missing := self._missing(rmap)) is not None:
                    self._refuse_all(rmap, ops, missing, self._explain(rmap, err, missing),
                                     refusals, fresh)
                    return full
                mid = len(ops) // 2
                for part in (ops[:mid], ops[mid:]):
                    full = self._write_text(rmap, part, refusals, fresh, full)
                return full
            return self._text_one(rmap, ops[0], exc, err, refusals, fresh) or full
        self.stats.transactions += 1
        self.stats.applied += len(ops)
        return full

    def _text_one(self, rmap: ReplicatedMap, op: ElementOp, exc: NftsyncError, err: int | None,
                  refusals: Refusals, fresh: bool) -> bool:
        """One element refused as text: try the other belief about the kernel once (absent /
        present with an unknown value), then refuse it. Returns whether the map is full."""
        if err == errno.ENOENT and op.mark is None:
            return False  # deleting what the kernel already expired: nothing to do
        if err in (errno.ENOENT, errno.EEXIST, errno.EBUSY):
            other = ElementOp(op.key, op.mark, op.remaining_ms, None if op.exists else -1)
            try:
                self.nft.cmd(self._commands(rmap, [other]), what=f"replicate into "
                             f"{rmap.smap.ref}")
            except NftsyncError as again:
                exc, err = again, errno_of(str(again))
            else:
                self.stats.transactions += 1
                self.stats.applied += 1
                return False
        if err == errno.ENOENT and (missing := self._missing(rmap)) is not None:
            self._refuse(rmap, op, missing, self._explain(rmap, err, missing), refusals, fresh)
            return False
        cause = cause_of(err)
        if cause == MAP_FULL:
            self._note_full(rmap)
        detail = self._explain(rmap, err, cause, op) if err else \
            f"map {rmap.smap.ref}: {rmap.key_text(op.key)}: {exc}"
        self._refuse(rmap, op, cause, detail, refusals, fresh)
        return cause == MAP_FULL

    def _netlink_plan(self, rmap: ReplicatedMap, ops: list[ElementOp]) -> tuple[
            list[bytes], list[tuple[bytes, bytes, int | None, int | None]], list[int],
            list[int]] | None:
        """The same transaction as `_commands` builds, as SetElemWriter elements, with the
        index of the op each delete / add comes from. None if a key does not have the
        kernel's length for the map (the kernel would refuse the whole batch: EINVAL)."""
        timeout_ms = rmap.smap.timeout * 1000 if rmap.smap.timeout is not None else None
        klen = key_length(rmap.smap.key_type)
        in_place = self.refresh_in_place
        pack = _MARK.pack
        dels: list[bytes] = []
        adds: list[tuple[bytes, bytes, int | None, int | None]] = []
        del_ops: list[int] = []
        add_ops: list[int] = []
        # Adds that need a new slot go last: in a full map, the slot a replacement frees
        # (its delete, earlier in the transaction) must go to that replacement's add.
        grow: list[tuple[bytes, bytes, int | None, int | None]] = []
        grow_ops: list[int] = []
        for i, op in enumerate(ops):
            key = op.key
            if len(key) != klen:
                return None
            if op.mark is None:
                if op.old_mark is not None:
                    dels.append(key)
                    del_ops.append(i)
                continue
            ms = op.remaining_ms
            if op.old_mark is not None and (not in_place or ms == 0 or op.old_mark != op.mark):
                dels.append(key)
                del_ops.append(i)
            if ms == 0 or timeout_ms is None:
                elem = (key, pack(op.mark), None, None)
            elif ms > timeout_ms:
                elem = (key, pack(op.mark), ms, ms)
            else:
                elem = (key, pack(op.mark), None, ms)
            if op.old_mark is None:
                grow.append(elem)
                grow_ops.append(i)
            else:
                adds.append(elem)
                add_ops.append(i)
        return dels, adds + grow, del_ops, add_ops + grow_ops

    def _commands(self, rmap: ReplicatedMap, ops: list[ElementOp]) -> str:
        ref = rmap.smap.ref
        timeout_ms = rmap.smap.timeout * 1000 if rmap.smap.timeout is not None else None
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
            # The expiry as `_netlink_plan` writes it: none for a static entry or map.
            timed = op.remaining_ms != 0 and timeout_ms is not None
            adds.append(element_text(text, f"{op.mark:#x}", map_timeout_ms=timeout_ms,
                                     expires_ms=op.remaining_ms if timed else None))
        return "\n".join(element_commands(str(ref), delete=dels, add=adds, chunk=2000))

    def thread_is_ours(self, pid: int | None) -> bool:
        return pid is not None and pid in self.thread_ids

    # == refusals =============================================================================
    def _state(self, rmap: ReplicatedMap) -> MapState:
        """The map's state (lock held)."""
        ref = rmap.smap.ref
        st = self._maps.get(ref)
        if st is None:
            st = self._maps[ref] = MapState(rmap, rmap.smap.size)
        elif st.rmap is not rmap:
            st.rmap = rmap
            if rmap.smap.size is not None:
                st.size = rmap.smap.size
        return st

    def _refuse(self, rmap: ReplicatedMap, op: ElementOp, cause: str, detail: str,
                refusals: Refusals, fresh: bool) -> None:
        """Count a refused op (if `fresh`) and keep it for retry (adds only: a refused delete
        has nothing left to remove)."""
        refusals.add(cause, detail)
        evicted: list[Waiting] = []
        with self._lock:
            if fresh:
                count_refused(self.stats, cause)
            self.stats.last_error = detail
            if op.mark is None:
                return
            st = self._state(rmap)
            st.detail = detail
            self._unwait(st, op.key)
            st.waiting[op.key] = Waiting(ElementOp(op.key, op.mark, op.remaining_ms, None),
                                          cause, time.monotonic())
            st.by_cause[cause] = st.by_cause.get(cause, 0) + 1
            self.stats.waiting += 1
            if self.stats.waiting > self.max_waiting:
                evicted = self._evict_oldest(self.stats.waiting - self.max_waiting)
        if evicted:
            self.stats.failed += len(evicted)
            log.warning("%d refused change(s) dropped: more than %d wait for retry",
                        len(evicted), self.max_waiting)

    def _evict_oldest(self, n: int) -> list[Waiting]:
        """Drop the `n` oldest waiting ops (lock held): the bound on what a refusal keeps."""
        out: list[Waiting] = []
        for st in self._maps.values():
            while st.waiting and len(out) < n:
                out.append(self._unwait(st, next(iter(st.waiting))))
        return [w for w in out if w is not None]

    def _refuse_all(self, rmap: ReplicatedMap, ops: list[ElementOp], cause: str, detail: str,
                    refusals: Refusals, fresh: bool) -> None:
        for op in ops:
            self._refuse(rmap, op, cause, detail, refusals, fresh)

    def _note_full(self, rmap: ReplicatedMap) -> None:
        """The map is full: learn its size (for the words) if the ruleset did not say it."""
        with self._lock:
            st = self._state(rmap)
            known = st.size
        if known is None:
            size = self._set_size(rmap)
            with self._lock:
                st.size = size

    def _set_size(self, rmap: ReplicatedMap) -> int | None:
        ref = rmap.smap.ref
        try:
            return self._querier().set_size(ref.family, ref.table, ref.name)
        except (NftsyncError, OSError):
            return None

    def _missing(self, rmap: ReplicatedMap) -> str | None:
        """NO_SUCH_TABLE / NO_SUCH_MAP if the map is not in the kernel (one set GET)."""
        ref = rmap.smap.ref
        try:
            self._querier().set_size(ref.family, ref.table, ref.name)
        except SetElemError as exc:
            if exc.errno == errno.ENOENT:
                return NO_SUCH_TABLE if exc.where == "table" else NO_SUCH_MAP
            return None
        except (NftsyncError, OSError):
            return None
        return None

    def _querier(self) -> SetElemWriter:
        if self.elem_writer is not None:
            return self.elem_writer
        if self._query is None:
            self._query = SetElemWriter(sndbuf=1 << 16, rcvbuf=1 << 16)
        return self._query

    def _explain(self, rmap: ReplicatedMap, err: int | None, cause: str,
                 op: ElementOp | None = None) -> str:
        """A refusal in words, by what the errno means for a set (ENFILE on a set is "map
        full", not "too many open files in system")."""
        ref = rmap.smap.ref
        size = None
        if cause == MAP_FULL:
            with self._lock:
                size = self._state(rmap).size
        whole = map_words(ref, cause, size)
        if whole is not None:
            return whole
        key = f" {rmap.key_text(op.key)}" if op is not None else ""
        if cause == EXISTS:
            return f"map {ref}:{key} another value is already there"
        what = os.strerror(err) if err else "refused"
        return f"map {ref}:{key} {what.lower()} (errno {err})"

    def _log_refusals(self, rmap: ReplicatedMap, refusals: Refusals) -> None:
        for cause, n in refusals.counts.items():
            log.warning("%s: %d change(s) refused, kept for retry when that changes",
                        refusals.first[cause], n)

    def retry_refused(self) -> int:
        """Hand the waiting ops of each map whose cause may have gone away back to the kernel
        (now, or queued for the writer thread); returns how many. Cheap when nothing waits.

        A full or missing map is probed once a second with one element; the rest follows only
        if that one was accepted. Other causes back off (doubling, up to RETRY_MAX_S)."""
        if not self.stats.waiting:
            return 0
        now = time.monotonic()
        due: list[MapRef] = []
        n = 0
        with self._lock:
            for ref, st in self._maps.items():
                if st.waiting and not st.retry_queued and st.next_retry <= now:
                    st.retry_queued = True
                    due.append(ref)
                    n += len(st.waiting)
        if not due:
            return 0
        if self.writer is not None:
            self.writer.submit(self._retry_now, 0, due, lane="nft")
        else:
            self._retry_now(due)
        return n

    def _retry_now(self, refs: list[MapRef]) -> None:
        self.thread_ids.add(threading.get_native_id())
        for ref in refs:
            with self._lock:
                st = self._maps[ref]
                st.retry_queued = False
                probe = self._take(st, 1)
                rmap = st.rmap
            if not probe:
                continue
            refusals = Refusals()
            before = self.stats.applied
            self._write(rmap, probe, refusals, fresh=False)
            self._retried(st)
            ok = self.stats.applied > before
            if ok:
                while True:
                    with self._lock:
                        chunk = self._take(st, RETRY_CHUNK)
                    if not chunk:
                        break
                    left = len(chunk)
                    self._write(rmap, chunk, refusals, fresh=False)
                    self._retried(st)
                    with self._lock:
                        refused_again = any(op.key in st.waiting for op in chunk)
                    if refused_again or left < RETRY_CHUNK:
                        break
            recovered = self.stats.applied - before
            with self._lock:
                self.stats.recovered += recovered
                full = bool(st.by_cause.get(MAP_FULL) or st.by_cause.get(NO_SUCH_MAP) or
                            st.by_cause.get(NO_SUCH_TABLE))
                if ok:
                    st.backoff = RETRY_FULL_S
                elif not full:
                    st.backoff = min(RETRY_MAX_S, st.backoff * 2)
                st.next_retry = time.monotonic() + (RETRY_FULL_S if full else st.backoff)
            if recovered:
                log.info("map %s: %d refused change(s) written on retry, %d still waiting",
                         ref, recovered, len(st.waiting))

    def _retried(self, st: MapState) -> None:
        """The kernel answered the ops `_take` handed out: what it refused is waiting again."""
        with self._lock:
            self.stats.waiting -= sum(st.in_retry.values())
            st.in_retry.clear()

    def _take(self, st: MapState, n: int) -> list[ElementOp]:
        """Up to `n` of the oldest waiting ops, out of the store, with the expiry they have
        left now (those that expired while waiting are dropped) (lock held)."""
        out: list[ElementOp] = []
        now = time.monotonic()
        while st.waiting and len(out) < n:
            w = self._unwait(st, next(iter(st.waiting)))
            assert w is not None
            op = w.op
            if op.remaining_ms:
                left = op.remaining_ms - int((now - w.since) * 1000)
                if left <= 0:
                    continue
                op = ElementOp(op.key, op.mark, left, None)
            st.in_retry[w.cause] = st.in_retry.get(w.cause, 0) + 1
            self.stats.waiting += 1
            out.append(op)
        return out

    def problems(self, ref: MapRef | None = None) -> list[str]:
        """What waits for retry, and why, in words (one line per map and cause); only map
        `ref`'s if given."""
        out: list[str] = []
        with self._lock:
            for mref, st in self._maps.items():
                if ref is not None and mref != ref:
                    continue
                causes = set(st.by_cause) | set(st.in_retry)
                for cause in sorted(causes):
                    n = st.by_cause.get(cause, 0) + st.in_retry.get(cause, 0)
                    if n <= 0:
                        continue
                    what = map_words(mref, cause, st.size)
                    if what is None:
                        what = f"map {mref}: another value is already there" \
                            if cause == EXISTS else \
                            st.detail or f"map {mref}: refused by the kernel"
                    out.append(f"{what}: {n} session(s) waiting")
        return out


_MARK = struct.Struct("=I")  # meta mark values are host order in the kernel


def _last_per_key(ops: list[ElementOp]) -> list[ElementOp]:
    """One op per key: the last one wins, with the first one's belief about the kernel (what
    it held before this batch). Two ops of one key in one transaction would contradict each
    other (deletes go first), and the kernel would refuse the batch for nothing."""
    if len({op.key for op in ops}) == len(ops):
        return ops
    out: dict[bytes, ElementOp] = {}
    for op in ops:
        prev = out.get(op.key)
        out[op.key] = op if prev is None else \
            ElementOp(op.key, op.mark, op.remaining_ms, prev.old_mark)
    return list(out.values())



def _netlink_ok(rmap: ReplicatedMap) -> bool:
    """Whether `SetElemWriter` can encode this map's elements: mark values and keys of
    datatypes whose byte size we know (anything else goes through libnftables)."""
    return rmap.smap.value_type == "mark" and key_length(rmap.smap.key_type) is not None

