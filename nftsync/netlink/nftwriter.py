"""Write nf_tables map elements by hand-built netlink batches.

Why: the daemon's replication sink used to send nft *text* through libnftables, which parses,
evaluates and serialises every element in C but still tops out at ~70-90k elements/s in the
writer thread (the 1M-session resync bottleneck). The kernel needs much less than nft does: a
batch of NFT_MSG_DELSETELEM / NFT_MSG_NEWSETELEM messages whose elements are already in the
kernel's byte layout, which is exactly what the daemon's mirror holds.

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

Events of these transactions carry this socket's port id (`portid`) in their nlmsg_pid and the
writing thread's id in NEWGEN, so the daemon drops its own echo exactly as for libnftables.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Sequence

from nftsync.netlink.core import (
    NETLINK_NETFILTER,
    NFNL_MSG_BATCH_BEGIN,
    NFNL_MSG_BATCH_END,
    NFNL_SUBSYS_NFTABLES,
    NLA_F_NESTED,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    NetlinkError,
    NetlinkSocket,
    iter_messages,
    nfgenmsg,
    nfnl_type,
    nla_str,
    nlmsg,
    parse_error,
)
from nftsync.netlink.nftables import (
    DATATYPE_SIZES,
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
)

FAMILY_NUMBERS = {"inet": 1, "ip": 2, "arp": 3, "netdev": 5, "bridge": 7, "ip6": 10}

_NLA = struct.Struct("=HH").pack
_BE64_ATTR = struct.Struct("=HHQ").pack  # an attribute holding one u64 (value pre-swapped)
_HOST_LITTLE = struct.pack("=H", 1) == b"\x01\x00"
_MAX_ELEMENTS_BYTES = 65535 - 4  # payload of NFTA_SET_ELEM_LIST_ELEMENTS (u16 nla_len)
_KEY_NESTED = NFTA_SET_ELEM_KEY | NLA_F_NESTED
_DATA_NESTED = NFTA_SET_ELEM_DATA | NLA_F_NESTED
_LIST_NESTED = NFTA_LIST_ELEM | NLA_F_NESTED

# One element to add: (key bytes, data bytes or None, timeout ms or None, expiration ms or None)
AddElem = tuple[bytes, "bytes | None", "int | None", "int | None"]


def key_length(types: Sequence[str]) -> int | None:
    """Length in bytes of a key of nft datatypes `types` as the kernel stores it (components
    padded to 4 bytes when concatenated); None if a type is not one we know the size of."""
    try:
        sizes = [DATATYPE_SIZES[t] for t in types]
    except KeyError:
        return None
    if len(sizes) == 1:
        return sizes[0]
    return sum((s + 3) & ~3 for s in sizes)


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

    @property
    def portid(self) -> int:
        """The netlink port id our transactions' events carry in nlmsg_pid."""
        return self.sock.pid

    def fileno(self) -> int:
        return self.sock.fileno()

    def apply(self, family: str, table: str, set_name: str, deletes: Sequence[bytes],
              adds: Sequence[AddElem]) -> None:
        """Delete `deletes` then add `adds` in `family table set_name`, as one transaction.

        Raises `NetlinkError` (errno of the first failure) if the kernel refused any of it, in
        which case it changed nothing. Raises OSError if the batch could not be sent (e.g.
        EMSGSIZE beyond the send buffer).
        """
        if not deletes and not adds:
            return
        fam = FAMILY_NUMBERS.get(family)
        if fam is None:
            raise NetlinkError(errno.EAFNOSUPPORT, f"nft family {family!r}")
        head = nfgenmsg(fam) + nla_str(NFTA_SET_ELEM_LIST_TABLE, table) + \
            nla_str(NFTA_SET_ELEM_LIST_SET, set_name)
        bodies: list[tuple[int, list[bytes]]] = []
        if deletes:
            _chunk(bodies, NFT_MSG_DELSETELEM, [encode_delete(k) for k in deletes])
        if adds:
            _chunk(bodies, NFT_MSG_NEWSETELEM, encode_adds(adds))
        self._send(head, bodies)

    def _send(self, head: bytes, bodies: list[tuple[int, list[bytes]]]) -> None:
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
        self._collect(seq, last + 1, last)

    def _collect(self, first: int, end: int, last: int) -> None:
        """Read the replies for sequence numbers first..end: raise on the first error, return at
        the ACK of `last`. The kernel queued them all before sendmsg returned, so an empty socket
        after an error means the report is complete (a batch refused as a whole may never
        reach the message that carries the ACK request)."""
        error = 0
        while True:
            mv = self.sock.recv() if error else self.sock.recv_blocking(self.timeout)
            if mv is None:
                if error:
                    raise NetlinkError(error, "nft element batch")
                raise NetlinkError(errno.ETIMEDOUT, "nft element batch: no ACK")
            acked = False
            for mtype, _flags, mseq, _pid, payload in iter_messages(mv):
                if mtype != NLMSG_ERROR or not first <= mseq <= end:
                    continue
                try:
                    err, _ = parse_error(payload)
                except ValueError:
                    err = errno.EPROTO
                if err and not error:
                    error = err
                if mseq == last:
                    acked = True
            if acked:
                if error:
                    self._drain()
                    raise NetlinkError(error, "nft element batch")
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


__all__ = ["FAMILY_NUMBERS", "NFT_DATA_VALUE_MAXLEN", "SetElemWriter", "encode_add",
           "encode_adds", "encode_delete", "key_length"]
