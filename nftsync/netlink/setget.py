"""Look up one key of an nf_tables set in the kernel (NFT_MSG_GETSETELEM without NLM_F_DUMP).

Why not `nft get element`: nft 1.0.6 prints it as text even in JSON mode, and it dumps the
whole set before it asks for the key (1M sessions: 57 s, measured on this VM). Here the request
names the one key; the kernel looks it up in the set's hash (`set->ops->get`) and answers with
one NEWSETELEM message, or ENOENT when the key is absent or has expired: the cost does not
depend on the size of the map (`nftsync sessions get` at 1M: benchmarks/README.md).

Many keys (`sessions list --client` of a small prefix: every address of a /24) are asked in
batches, many requests to a datagram: ~10 µs a key. Replies are decoded by the dump's element
decoder (`setdump.iter_elements`), so a looked-up element and a dumped one are the same
`Element`.
"""

from __future__ import annotations

import errno
import itertools
from collections.abc import Iterable, Iterator

from nftsync.datatypes import NFPROTO_NUMBERS
from nftsync.errors import NftsyncError
from nftsync.netlink.core import (
    NETLINK_NETFILTER,
    NFNL_SUBSYS_NFTABLES,
    NLA_F_NESTED,
    NLM_F_ACK,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    NetlinkError,
    NetlinkSocket,
    iter_messages,
    nfgenmsg,
    nfnl_type,
    nla,
    nla_str,
    nlmsg,
    parse_error,
)
from nftsync.netlink.nftables import (
    NFTA_SET_ELEM_LIST_ELEMENTS,
    NFTA_SET_ELEM_LIST_SET,
    NFTA_SET_ELEM_LIST_TABLE,
    Element,
)
from nftsync.netlink.nftwriter import encode_delete
from nftsync.netlink.setdump import NFT_MSG_GETSETELEM, SetElemDump, SetGone, iter_elements

__all__ = ["get_element", "get_elements", "get_request", "SetGone"]


def get_request(family: int, table: str, set_name: str, key: bytes, seq: int) -> bytes:
    """The GETSETELEM request for one key (what `nft get element` sends), acknowledged."""
    elements = nla(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED, encode_delete(key))
    body = nfgenmsg(family) + nla_str(NFTA_SET_ELEM_LIST_TABLE, table) + \
        nla_str(NFTA_SET_ELEM_LIST_SET, set_name) + elements
    return nlmsg(nfnl_type(NFNL_SUBSYS_NFTABLES, NFT_MSG_GETSETELEM),
                 NLM_F_REQUEST | NLM_F_ACK, seq, body)


def get_element(family: str | int, table: str, set_name: str, key: bytes,
                timeout: float = 5.0) -> Element | None:
    """The element of `key` (kernel bytes, `nftsync.datatypes.join_concat`), or None if the set
    has none. Raises `SetGone` when the table or set does not exist, `NetlinkError` otherwise.
    Opened in the calling thread's network namespace."""
    return next(get_elements(family, table, set_name, [key], timeout=timeout))[1]


def get_elements(family: str | int, table: str, set_name: str, keys: Iterable[bytes], *,
                 window: int = 128, timeout: float = 5.0,
                 ) -> Iterator[tuple[bytes, Element | None]]:
    """Each key with its element or None, in the order of `keys`: `window` requests (one
    netlink message each) go in one datagram, and the kernel answers them all before the
    `send` returns, so a batch costs one system call each way (a /24: ~0.05 s, at any map size).

    ENOENT means both "no such key" and "no such set"; when a whole batch is absent, a dump of
    the set is opened to tell them apart (its first datagram says whether the set exists; it
    is closed at once) and `SetGone` raised if it does not. Opened in the calling thread's
    network namespace, when the iteration starts.
    """
    fam = NFPROTO_NUMBERS.get(family) if isinstance(family, str) else family
    if fam is None:
        raise NftsyncError(f"unknown nftables family {family!r}")
    what = f"lookup in {family} {table} {set_name}"
    pending = iter(keys)
    # Replies of a batch wait in the receive buffer until read: room for `window` of each.
    with NetlinkSocket(NETLINK_NETFILTER, rcvbuf=max(window, 1) * 8192) as sock:
        while batch := list(itertools.islice(pending, window)):
            first = sock.next_seq(len(batch))
            sock.send(b"".join(get_request(fam, table, set_name, k, first + i)
                               for i, k in enumerate(batch)))
            found = _answers(sock, first, len(batch), timeout, what)
            if not found and not set_exists(fam, table, set_name):
                raise SetGone(errno.ENOENT, what)
            for k in batch:
                yield k, found.get(k)


def _answers(sock: NetlinkSocket, first: int, count: int, timeout: float,
             what: str) -> dict[bytes, Element]:
    """Read the replies to requests `first`..`first + count - 1`: the elements found, by key.
    Each request ends with an NLMSG_ERROR: 0 (its element came before it) or ENOENT."""
    found: dict[bytes, Element] = {}
    done = 0
    while done < count:
        mv = sock.recv_blocking(timeout)
        if mv is None:
            raise NetlinkError(errno.ETIMEDOUT, what)
        data = bytes(mv)
        for mtype, _flags, seq, _pid, payload in iter_messages(data):
            if not first <= seq < first + count or mtype != NLMSG_ERROR:
                continue
            err = parse_error(payload)[0] if len(payload) >= 20 else errno.EPROTO
            if err not in (0, errno.ENOENT):
                raise NetlinkError(err, what)
            done += 1
        for el in iter_elements(data):
            found[el.key] = el
    return found


def set_exists(family: int, table: str, set_name: str) -> bool:
    """Whether the set exists: one dump request, closed after its first answer."""
    try:
        with SetElemDump(family, table, set_name) as dump:
            for _ in dump.datagrams():
                break
    except SetGone:
        return False
    return True
