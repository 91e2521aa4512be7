"""ctnetlink sockets: the conntrack event subscriber, the table dump and the batched writer.

Declared apart from the messages (`ctnetlink`), the way pyroute2 separates message classes from
sockets: this module owns file descriptors, buffers and the request/ACK protocol; every byte of a
ctnetlink message is built or parsed by `ctnetlink`.
"""

from __future__ import annotations

import errno as _errno
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from nftsync.conntrack import CtEntry
from nftsync.netlink.core import (
    NETLINK_NETFILTER,
    NFGENMSG,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    NLMSG_HDR,
    NetlinkError,
    NetlinkSocket,
)
from nftsync.netlink.ctnetlink import (
    ALL_EVENTS,
    CT_DELETE,
    CT_GET,
    CT_NEW,
    CtStats,
    build_create,
    build_delete,
    build_dump,
    build_update,
    parse_messages,
)

_U16 = struct.Struct("<H").unpack_from  # host order (x86/arm little endian), nlmsg flags
_NLMSG = NLMSG_HDR.unpack_from
_ERR = struct.Struct("=i").unpack_from
_NFGEN = NFGENMSG.pack
_SEQ = struct.Struct("=I")
_FLAGS = struct.Struct("=H")


# --- event socket --------------------------------------------------------------------------------
class CtEvents(list):
    """The list `CtEventSocket.read()` returns, plus `overrun`: True if ENOBUFS was hit.

    On overrun the events before and after the loss are still returned; the caller must
    reconcile its view with a `dump()` because some events in between are gone.
    """

    __slots__ = ("overrun",)

    def __init__(self) -> None:
        super().__init__()
        self.overrun = False


class CtEventSocket:
    """Non-blocking subscriber to conntrack events (NEW/UPDATE/DESTROY groups).

    Use `fileno()` with `loop.add_reader`, then `read()` until it returns an empty list.
    The receive buffer is forced with SO_RCVBUFFORCE (64 MiB by default; net.core.rmem_max does
    not cap it), so bursts of ~100k events are absorbed.

    `marks`/`mark_mask`: keep only entries with `(ct mark & mark_mask) in marks`; tested before
    the tuples are decoded. `ignore_portids`: drop events caused by these netlink sockets
    (e.g. `{writer.portid}`, the echo of our own inserts).
    """

    def __init__(self, groups: int = ALL_EVENTS, rcvbuf: int = 64 << 20,
                 marks: Iterable[int] | None = None, mark_mask: int = 0xFFFFFFFF,
                 ignore_portids: Iterable[int] = (), max_events: int = 4096) -> None:
        self.sock = NetlinkSocket(NETLINK_NETFILTER, groups=groups, rcvbuf=rcvbuf,
                                  recv_buffer=1 << 16)
        self.marks = frozenset(marks) if marks is not None else None
        self.mark_mask = mark_mask
        self.ignore_portids = frozenset(ignore_portids)
        self.max_events = max_events
        self.stats = CtStats()

    @property
    def portid(self) -> int:
        return self.sock.pid

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self, max_events: int | None = None) -> CtEvents:
        """Drain queued events (at most about `max_events`, default from the constructor).

        Never raises for malformed kernel messages (they are counted in `stats.malformed`).
        ENOBUFS sets `.overrun` on the result and counts `stats.overruns`; the socket keeps
        working.
        """
        limit = self.max_events if max_events is None else max_events
        out = CtEvents()
        recv_into = self.sock.sock.recv_into
        buf = self.sock._buf
        stats = self.stats
        marks, mask, ign = self.marks, self.mark_mask, self.ignore_portids
        while len(out) < limit:
            try:
                n = recv_into(buf)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno != _errno.ENOBUFS:
                    raise
                stats.overruns += 1
                out.overrun = True
                continue
            try:
                parse_messages(buf, n, stats, out, marks, mask, ign)
            except NetlinkError:
                stats.errors += 1
        return out

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> CtEventSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- dump ----------------------------------------------------------------------------------------
def dump(mark: int | None = None, mask: int | None = None, family: int = 0,
         timeout: float = 10.0) -> Iterator[CtEntry]:
    """Iterate over the conntrack table of the calling thread's network namespace.

    With `mark` (and optionally `mask`) the kernel filters on `(ct mark & mask) == mark`
    (CTA_MARK/CTA_MARK_MASK). `family` 0 = IPv4 and IPv6. The socket is opened at call time
    (in the caller's namespace) and closed when the iterator ends or is closed.
    """
    sock = NetlinkSocket(NETLINK_NETFILTER, rcvbuf=8 << 20)
    try:
        attrs = build_dump(mark, mask)
        seq = sock.next_seq()
        body = _NFGEN(family, 0, 0) + attrs
        sock.send(NLMSG_HDR.pack(16 + len(body), CT_GET, NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
                  + body)
    except BaseException:
        sock.close()
        raise
    return _dump_iter(sock, timeout)


def _dump_iter(sock: NetlinkSocket, timeout: float) -> Iterator[CtEntry]:
    stats = CtStats()
    try:
        while True:
            mv = sock.recv_blocking(timeout)
            if mv is None:
                raise NetlinkError(_errno.ETIMEDOUT, "conntrack dump")
            out: list[CtEntry] = []
            done = parse_messages(sock._buf, len(mv), stats, out, with_event=False)
            yield from out
            if done:
                return
    finally:
        sock.close()


# --- writer --------------------------------------------------------------------------------------
@dataclass(slots=True)
class ApplyResult:
    """Outcome of `CtWriter.apply`: counts, and each failure as (op, entry, errno)."""

    applied: int = 0  # created, updated or deleted
    created: int = 0
    updated: int = 0
    deleted: int = 0
    absent: int = 0  # deletes of entries that were not there (ENOENT): not failures
    failed: list[tuple[str, CtEntry, int]] = field(default_factory=list)


class CtWriter:
    """Batched conntrack writer: many messages per sendmsg, errors only, one ACK per datagram.

    `apply([("upsert", ct), ("delete", ct), ...])`:
    * upsert = NEW with NLM_F_CREATE|NLM_F_EXCL and the full entry (tuples, timeout, status,
      mark, TCP state with BE_LIBERAL, NAT); the entries that answer EEXIST are then sent again
      as updates (NEW without CREATE: timeout, status, mark, TCP state; NAT cannot change).
    * delete = DELETE by original tuple; ENOENT counts as `absent`, not as a failure.

    The kernel handles a datagram to itself synchronously, so after each sendmsg all replies are
    queued; the last message of each datagram carries NLM_F_ACK as a barrier, then replies are
    drained before the next datagram (error replies never pile up past the receive buffer).
    """

    def __init__(self, batch_bytes: int = 64 << 10, rcvbuf: int = 16 << 20) -> None:
        self.batch_bytes = batch_bytes
        self.sock = NetlinkSocket(NETLINK_NETFILTER, rcvbuf=rcvbuf,
                                  sndbuf=max(4 * batch_bytes, 1 << 20))
        self.portid = self.sock.pid

    def fileno(self) -> int:
        return self.sock.fileno()

    def apply(self, ops: Iterable[tuple[str, CtEntry]]) -> ApplyResult:
        res = ApplyResult()
        retry: list[CtEntry] = []
        batch: list[bytes] = []
        meta: list[tuple[str, CtEntry]] = []
        size = 0
        limit = self.batch_bytes
        hdr = NLMSG_HDR.pack
        for op, ct in ops:
            if op == "upsert":
                body = build_create(ct)
                mtype, flags = CT_NEW, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL
            elif op == "delete":
                body = build_delete(ct)
                mtype, flags = CT_DELETE, NLM_F_REQUEST
            else:
                raise ValueError(f"CtWriter.apply: unknown op {op!r} (want 'upsert' or 'delete')")
            n = 20 + len(body)
            if size + n > limit and batch:
                self._flush(batch, meta, res, retry)
                batch, meta, size = [], [], 0
            batch.append(hdr(n, mtype, flags, 0, 0) + _NFGEN(ct.family, 0, 0) + body)
            meta.append((op, ct))
            size += n
        if batch:
            self._flush(batch, meta, res, retry)
        # Second pass: entries that already existed get an update.
        batch, meta, size = [], [], 0
        for ct in retry:
            body = build_update(ct)
            n = 20 + len(body)
            if size + n > limit and batch:
                self._flush(batch, meta, res, None)
                batch, meta, size = [], [], 0
            batch.append(hdr(n, CT_NEW, NLM_F_REQUEST, 0, 0) + _NFGEN(ct.family, 0, 0) + body)
            meta.append(("update", ct))
            size += n
        if batch:
            self._flush(batch, meta, res, None)
        return res

    def _flush(self, msgs: list[bytes], meta: list[tuple[str, CtEntry]], res: ApplyResult,
               retry: list[CtEntry] | None) -> None:
        """Number the messages, ACK the last, send as one datagram, collect errors by seq."""
        count = len(msgs)
        first = self.sock.next_seq(count)
        set_seq = _SEQ.pack_into
        data = bytearray(b"".join(msgs))
        off = 0
        for i, m in enumerate(msgs):
            set_seq(data, off + 8, first + i)
            off += len(m)
        last_off = off - len(msgs[-1])
        flags = _U16(data, last_off + 6)[0]
        _FLAGS.pack_into(data, last_off + 6, flags | NLM_F_ACK)
        self.sock.send(data)
        failed: dict[int, int] = {}
        last = first + count - 1
        finished = False
        while not finished:
            mv = self.sock.recv_blocking(10.0)
            if mv is None:
                raise NetlinkError(_errno.ETIMEDOUT, "conntrack write: no ACK")
            buf, end, off = self.sock._buf, len(mv), 0
            while end - off >= 16:
                mlen, mtype, _f, seq, _pid = _NLMSG(buf, off)
                if mlen < 16 or mlen > end - off:
                    break
                if mtype == NLMSG_ERROR and mlen >= 20 and first <= seq <= last:
                    err = -_ERR(buf, off + 16)[0]
                    if err:
                        failed[seq - first] = err
                    if seq == last:
                        finished = True
                off += (mlen + 3) & ~3
        for i, (op, ct) in enumerate(meta):
            err = failed.get(i, 0)
            if not err:
                res.applied += 1
                if op == "upsert":
                    res.created += 1
                elif op == "update":
                    res.updated += 1
                else:
                    res.deleted += 1
            elif op == "upsert" and err == _errno.EEXIST and retry is not None:
                retry.append(ct)
            elif op == "delete" and err == _errno.ENOENT:
                res.absent += 1
            else:
                res.failed.append((op, ct, err))

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> CtWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

__all__ = ["ApplyResult", "CtEventSocket", "CtEvents", "CtWriter", "dump"]
