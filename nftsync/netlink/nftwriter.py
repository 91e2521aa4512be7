"""Write nf_tables map elements by hand-built netlink batches.

Why: the daemon's replication sink used to send nft *text* through libnftables, which parses,
evaluates and serialises every element in C but still tops out at ~70-90k elements/s in the
writer thread (the 1M-session resync bottleneck). The kernel needs much less than nft does: a
batch of NFT_MSG_DELSETELEM / NFT_MSG_NEWSETELEM messages whose elements are already in the
kernel's byte layout, which is exactly what the daemon's replica holds.

A call to `SetElemWriter.apply` is one nf_tables transaction, like one libnftables command
buffer: NFNL_MSG_BATCH_BEGIN, all deletes, then all adds, NFNL_MSG_BATCH_END, in one sendmsg.
If any element fails the kernel aborts the whole transaction and reports the errno for the
message holding it; `apply` then raises `NetlinkError` and nothing changed.

Only the last element message asks for an ACK: the kernel reports errors for every message
anyway, and it handles a datagram to itself synchronously, so when sendmsg returns every reply
is already queued (the ACK of the last message is the barrier, as in `CtWriter`).

Element layout (as libnftnl builds it): NFTA_LIST_ELEM { NFTA_SET_ELEM_KEY { NFTA_DATA_VALUE },
NFTA_SET_ELEM_DATA { NFTA_DATA_VALUE }, NFTA_SET_ELEM_TIMEOUT (be64 ms),
NFTA_SET_ELEM_EXPIRATION (be64 ms) }. Messages are filled up to ~64 KiB because the nested
NFTA_SET_ELEM_LIST_ELEMENTS attribute has a 16-bit length.

When the kernel refuses a batch it names the errno, the message and (extended ACK,
NETLINK_EXT_ACK) the attribute at fault: `apply` turns that into a `SetElemError` saying whether
the table, the set, or which delete/add element was refused, so a caller can drop or fix that one
element and resend the rest instead of retrying every element alone (a full map refused
thousands of elements at ~50/s that way, stalling everything queued behind them).

Events of these transactions carry this socket's port id (`portid`) in their nlmsg_pid and the
writing thread's id in NEWGEN, so the daemon drops its own echo exactly as for libnftables.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Sequence

from nftsync.datatypes import NFPROTO_NUMBERS, key_length
from nftsync.netlink.core import (
    NETLINK_EXT_ACK,
    NETLINK_NETFILTER,
    NFNL_MSG_BATCH_BEGIN,
    NFNL_MSG_BATCH_END,
    NFNL_SUBSYS_NFTABLES,
    NLA_F_NESTED,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    SOL_NETLINK,
    NetlinkError,
    NetlinkSocket,
    iter_attrs,
    iter_messages,
    nfgenmsg,
    nfnl_type,
    nla_str,
    nlmsg,
    parse_error_ext,
)
from nftsync.netlink.nftables import (
    NFT_DATA_VALUE_MAXLEN,
    NFT_MSG_DELSETELEM,
    NFT_MSG_NEWSETELEM,
    NFTA_DATA_VALUE,
    NFTA_LIST_ELEM,
    NFTA_SET_ELEM_DATA,
    NFTA_SET_ELEM_EXPIRATION,
    NFTA_SET_ELEM_KEY,
    NFTA_SET_ELEM_LIST_ELEMENTS,
    NFTA_SET_ELEM_LIST_SET,
    NFTA_SET_ELEM_LIST_TABLE,
    NFTA_SET_ELEM_TIMEOUT,
    NFTA_SET_NAME,
    NFTA_SET_TABLE,
)

NFT_MSG_GETSET = 10
NFTA_SET_DESC = 9
NFTA_SET_DESC_SIZE = 1
_NLMSG_HDRLEN = 16

_NLA = struct.Struct("=HH").pack
_BE64_ATTR = struct.Struct("=HHQ").pack  # an attribute holding one u64 (value pre-swapped)
_HOST_LITTLE = struct.pack("=H", 1) == b"\x01\x00"
_MAX_ELEMENTS_BYTES = 65535 - 4  # payload of NFTA_SET_ELEM_LIST_ELEMENTS (u16 nla_len)
_KEY_NESTED = NFTA_SET_ELEM_KEY | NLA_F_NESTED
_DATA_NESTED = NFTA_SET_ELEM_DATA | NLA_F_NESTED
_LIST_NESTED = NFTA_LIST_ELEM | NLA_F_NESTED

# One element to add: (key bytes, data bytes or None, timeout ms or None, expiration ms or None)
AddElem = tuple[bytes, "bytes | None", "int | None", "int | None"]


class SetElemError(NetlinkError):
    """The kernel refused an element batch (nothing of it changed), and what it blamed.

    `where`: "table" or "set" (that object does not exist, for ENOENT), "delete" or "add"
    (the element `index` of the `deletes` / `adds` passed to `apply`), or None when the kernel
    did not say (no extended ACK, or an error outside the element lists).
    """

    def __init__(self, err: int, where: str | None = None, index: int = -1,
                 detail: str | None = None) -> None:
        self.where = where
        self.index = index
        self.detail = detail
        self.seq = 0  # the refused message's sequence number (earliest wins)
        what = "nft element batch"
        if where in ("delete", "add"):
            what += f" ({where} #{index})"
        elif where is not None:
            what += f" ({where})"
        super().__init__(err, what)


class _Layout:
    """Where each element of one sent batch sits, to map the kernel's (seq, offset) back to it."""

    def __init__(self, first_seq: int, head: bytes, bodies: list[tuple[int, list[bytes]]],
                 table_attr_len: int) -> None:
        self.first_seq = first_seq
        self.head_len = len(head)
        self.table_end = _NLMSG_HDRLEN + 4 + table_attr_len  # nlmsghdr, nfgenmsg, table
        self.bodies = bodies

    def locate(self, seq: int, offset: int | None) -> tuple[str | None, int]:
        i = seq - self.first_seq - 1  # message i of bodies (BATCH_BEGIN is first_seq)
        if offset is None or not 0 <= i < len(self.bodies):
            return None, -1
        if offset < self.table_end:
            return "table", -1
        head_end = _NLMSG_HDRLEN + self.head_len
        if offset < head_end:
            return "set", -1
        msg, elems = self.bodies[i]
        where = "delete" if msg == NFT_MSG_DELSETELEM else "add"
        base = sum(len(e) for m, e in self.bodies[:i] if m == msg)  # earlier messages' elements
        pos = head_end + 4  # after the NFTA_SET_ELEM_LIST_ELEMENTS header
        for j, e in enumerate(elems):
            if pos <= offset < pos + len(e):
                return where, base + j
            pos += len(e)
        return None, -1


def _value_attr(outer: int, value: bytes) -> bytes:
    """outer { NFTA_DATA_VALUE value } (nested, padded)."""
    n = len(value)
    inner = _NLA(4 + n, NFTA_DATA_VALUE) + value + b"\0" * (-n % 4)
    return _NLA(4 + len(inner), outer) + inner


def _swap64(v: int) -> int:
    """A u64 in host order whose bytes are `v` in network order (for struct '=Q')."""
    return int.from_bytes(v.to_bytes(8, "big"), "little" if _HOST_LITTLE else "big")


def encode_delete(key: bytes) -> bytes:
    """One NFTA_LIST_ELEM naming `key` (what a delete needs)."""
    body = _value_attr(_KEY_NESTED, key)
    return _NLA(4 + len(body), _LIST_NESTED) + body


def encode_add(key: bytes, data: bytes | None, timeout_ms: int | None,
               expiration_ms: int | None) -> bytes:
    """One NFTA_LIST_ELEM for an add: key, optional data, optional timeout/expiration (ms)."""
    body = _value_attr(_KEY_NESTED, key)
    if data is not None:
        body += _value_attr(_DATA_NESTED, data)
    if timeout_ms is not None:
        body += _BE64_ATTR(12, NFTA_SET_ELEM_TIMEOUT, _swap64(timeout_ms))
    if expiration_ms is not None:
        body += _BE64_ATTR(12, NFTA_SET_ELEM_EXPIRATION, _swap64(expiration_ms))
    return _NLA(4 + len(body), _LIST_NESTED) + body


def _shape(klen: int, dlen: int, timeout: bool, expiration: bool) -> tuple[bytes, ...]:
    """Constant bytes around the variable parts of an element of this shape (dlen -1: no
    data): element = c0 + key + c1 + data + c2 + timeout + c3 + expiration."""
    kpad = b"\0" * (-klen % 4)
    key_attr = 8 + klen + len(kpad)
    data_attr = 0 if dlen < 0 else 8 + dlen + (-dlen % 4)
    total = 4 + key_attr + data_attr + 12 * timeout + 12 * expiration
    c0 = _NLA(total, _LIST_NESTED) + _NLA(key_attr, _KEY_NESTED) + _NLA(4 + klen, NFTA_DATA_VALUE)
    c1 = kpad + (_NLA(data_attr, _DATA_NESTED) + _NLA(4 + dlen, NFTA_DATA_VALUE)
                 if dlen >= 0 else b"")
    c2 = (b"\0" * (-dlen % 4) if dlen >= 0 else b"") + \
        (_NLA(12, NFTA_SET_ELEM_TIMEOUT) if timeout else b"")
    c3 = _NLA(12, NFTA_SET_ELEM_EXPIRATION) if expiration else b""
    return c0, c1, c2, c3


def encode_adds(adds: Sequence[AddElem]) -> list[bytes]:
    """`encode_add` for many elements, the hot path: constant headers are built once per
    element shape, so an element costs a few concatenations."""
    shapes: dict[tuple[int, int, bool, bool], tuple[bytes, ...]] = {}
    out: list[bytes] = []
    append = out.append
    for key, data, timeout, expiration in adds:
        shape = (len(key), -1 if data is None else len(data), timeout is not None,
                 expiration is not None)
        c = shapes.get(shape)
        if c is None:
            c = shapes[shape] = _shape(*shape)
        e = c[0] + key + c[1]
        if data is not None:
            e += data
        e += c[2]
        if timeout is not None:
            e += timeout.to_bytes(8, "big")
        if expiration is not None:
            e += c[3] + expiration.to_bytes(8, "big")
        append(e)
    return out


class SetElemWriter:
    """Batched nf_tables set/map element writer on a socket of its own.

    One instance per writer thread (the socket is not locked). Open it in the network namespace
    whose ruleset it writes (the calling thread's).
    """

    def __init__(self, sndbuf: int = 64 << 20, rcvbuf: int = 4 << 20,
                 timeout: float = 30.0) -> None:
        # sndbuf: netlink refuses a datagram larger than the send buffer, and one transaction is
        # one datagram (~40 bytes per IPv4 element: 1M elements fit in 64 MiB).
        self.sock = NetlinkSocket(NETLINK_NETFILTER, rcvbuf=rcvbuf, sndbuf=sndbuf)
        self.timeout = timeout
        self.transactions = 0
        # Extended ACK: the kernel says which attribute (element) it refused. Without it
        # (very old kernels) errors carry no location and callers fall back to bisection.
        try:
            self.sock.sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
            self.ext_ack = True
        except OSError:
            self.ext_ack = False

    @property
    def portid(self) -> int:
        """The netlink port id our transactions' events carry in nlmsg_pid."""
        return self.sock.pid

    def fileno(self) -> int:
        return self.sock.fileno()

    def apply(self, family: str, table: str, set_name: str, deletes: Sequence[bytes],
              adds: Sequence[AddElem]) -> None:
        """Delete `deletes` then add `adds` in `family table set_name`, as one transaction.

        Raises `SetElemError` (errno of the first failure, and which element or object it
        was, see there) if the kernel refused any of it, in which case it changed nothing.
        Raises OSError if the batch could not be sent (e.g. EMSGSIZE beyond the send buffer).
        """
        if not deletes and not adds:
            return
        fam = NFPROTO_NUMBERS.get(family)
        if fam is None:
            raise NetlinkError(errno.EAFNOSUPPORT, f"nft family {family!r}")
        table_attr = nla_str(NFTA_SET_ELEM_LIST_TABLE, table)
        head = nfgenmsg(fam) + table_attr + nla_str(NFTA_SET_ELEM_LIST_SET, set_name)
        bodies: list[tuple[int, list[bytes]]] = []
        if deletes:
            _chunk(bodies, NFT_MSG_DELSETELEM, [encode_delete(k) for k in deletes])
        if adds:
            _chunk(bodies, NFT_MSG_NEWSETELEM, encode_adds(adds))
        self._send(head, bodies, len(table_attr))

    def set_size(self, family: str, table: str, set_name: str) -> int:
        """The set's maximum number of elements (`size`; 0: no limit), from one NFT_MSG_GETSET
        (a few hundred bytes, however many elements the set holds: never a dump of them).
        Raises `SetElemError` (ENOENT, where "table" or "set") when it does not exist."""
        fam = NFPROTO_NUMBERS.get(family)
        if fam is None:
            raise NetlinkError(errno.EAFNOSUPPORT, f"nft family {family!r}")
        table_attr = nla_str(NFTA_SET_TABLE, table)
        seq = self.sock.next_seq()
        msg = nlmsg(nfnl_type(NFNL_SUBSYS_NFTABLES, NFT_MSG_GETSET), NLM_F_REQUEST | NLM_F_ACK,
                    seq, nfgenmsg(fam) + table_attr + nla_str(NFTA_SET_NAME, set_name))
        self._drain()
        self.sock.send(msg)
        table_end = _NLMSG_HDRLEN + 4 + len(table_attr)
        size = 0
        while True:
            mv = self.sock.recv_blocking(self.timeout)
            if mv is None:
                raise NetlinkError(errno.ETIMEDOUT, "nft set query: no answer")
            for mtype, flags, mseq, _pid, payload in iter_messages(mv):
                if mseq != seq:
                    continue
                if mtype == NLMSG_ERROR:
                    err, _, offset, detail = parse_error_ext(payload, flags)
                    if err:
                        where = None if offset is None else \
                            "table" if offset < table_end else "set"
                        raise SetElemError(err, where, detail=detail)
                    return size
                for atype, _n, data in iter_attrs(payload[4:]):
                    if atype != NFTA_SET_DESC:
                        continue
                    for dtype, _n2, d in iter_attrs(data):
                        if dtype == NFTA_SET_DESC_SIZE and len(d) >= 4:
                            size = int.from_bytes(d[:4], "big")

    def _send(self, head: bytes, bodies: list[tuple[int, list[bytes]]],
              table_attr_len: int) -> None:
        sock = self.sock
        seq = sock.next_seq(len(bodies) + 2)
        last = seq + len(bodies)  # the last element message: the one that is ACKed
        parts = [nlmsg(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq,
                       nfgenmsg(0, res_id=NFNL_SUBSYS_NFTABLES))]
        for i, (msg, elems) in enumerate(bodies, 1):
            body = b"".join(elems)
            flags = NLM_F_REQUEST | (NLM_F_CREATE if msg == NFT_MSG_NEWSETELEM else 0)
            if seq + i == last:
                flags |= NLM_F_ACK
            parts.append(nlmsg(nfnl_type(NFNL_SUBSYS_NFTABLES, msg), flags, seq + i,
                               head + _NLA(4 + len(body), NFTA_SET_ELEM_LIST_ELEMENTS |
                                           NLA_F_NESTED) + body))
        parts.append(nlmsg(NFNL_MSG_BATCH_END, NLM_F_REQUEST, last + 1,
                           nfgenmsg(0, res_id=NFNL_SUBSYS_NFTABLES)))
        self._drain()  # stale replies of an earlier, timed-out call must not be read as ours
        sock.send(b"".join(parts))
        self.transactions += 1
        self._collect(seq, last + 1, last, _Layout(seq, head, bodies, table_attr_len))

    def _collect(self, first: int, end: int, last: int, layout: _Layout) -> None:
        """Read the replies for sequence numbers first..end: raise on the first error, return at
        the ACK of `last`. The kernel queued them all before sendmsg returned, so an empty socket
        after an error means the report is complete (a batch refused as a whole may never
        reach the message that carries the ACK request)."""
        error: SetElemError | None = None  # the first failure in transaction order
        while True:
            mv = self.sock.recv() if error else self.sock.recv_blocking(self.timeout)
            if mv is None:
                if error:
                    raise error
                raise NetlinkError(errno.ETIMEDOUT, "nft element batch: no ACK")
            acked = False
            for mtype, flags, mseq, _pid, payload in iter_messages(mv):
                if mtype != NLMSG_ERROR or not first <= mseq <= end:
                    continue
                try:
                    err, _, offset, detail = parse_error_ext(payload, flags)
                except ValueError:
                    err, offset, detail = errno.EPROTO, None, None
                if err and (error is None or mseq < error.seq):
                    where, index = layout.locate(mseq, offset)
                    error = SetElemError(err, where, index, detail)
                    error.seq = mseq
                if mseq == last:
                    acked = True
            if acked:
                if error:
                    self._drain()
                    raise error
                return

    def _drain(self) -> None:
        for _ in self.sock:
            pass

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> SetElemWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _chunk(out: list[tuple[int, list[bytes]]], msg: int, elems: list[bytes]) -> None:
    """Split encoded elements into messages whose element list fits a 16-bit attribute."""
    cur: list[bytes] = []
    size = 0
    for e in elems:
        if cur and size + len(e) > _MAX_ELEMENTS_BYTES:
            out.append((msg, cur))
            cur, size = [], 0
        cur.append(e)
        size += len(e)
    if cur:
        out.append((msg, cur))


__all__ = ["NFT_DATA_VALUE_MAXLEN", "SetElemError", "SetElemWriter", "encode_add",
           "encode_adds", "encode_delete", "key_length"]
