"""Look up one key of an nf_tables set in the kernel (NFT_MSG_GETSETELEM without NLM_F_DUMP).

Why not `nft get element`: nft 1.0.6 prints it as text even in JSON mode, and libnftables first
builds its cache of the table (for a map of sessions that is every element). Here the request
names the one key; the kernel looks it up in the set's hash (`set->ops->get`) and answers with
one NEWSETELEM message, or ENOENT when the key is absent or has expired: the cost does not
depend on the size of the map (`nftsync sessions get` at 1M: benchmarks/README.md).

The reply is decoded by the dump's element decoder (`setdump.iter_elements`), so a looked-up
element and a dumped one are the same `Element`.
"""

from __future__ import annotations

import errno

from nftsync.datatypes import NFPROTO_NUMBERS
from nftsync.errors import NftsyncError
from nftsync.netlink.core import (
    NETLINK_NETFILTER,
    NFNL_SUBSYS_NFTABLES,
    NLA_F_NESTED,
    NLM_F_ACK,
    NLM_F_REQUEST,
    NetlinkError,
    NetlinkSocket,
    nfgenmsg,
    nfnl_type,
    nla,
    nla_str,
    nlmsg,
)
from nftsync.netlink.nftables import (
    NFTA_SET_ELEM_LIST_ELEMENTS,
    NFTA_SET_ELEM_LIST_SET,
    NFTA_SET_ELEM_LIST_TABLE,
    Element,
)
from nftsync.netlink.nftwriter import encode_delete
from nftsync.netlink.setdump import NFT_MSG_GETSETELEM, SetGone, iter_elements, scan

__all__ = ["get_element", "get_request", "SetGone"]


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

    ENOENT means both "no such key" and "no such set"; the two are told apart by asking for the
    set with a dump of it when the key is missing (the dump's first datagram says whether it
    exists and is closed at once, before the kernel walks further than one datagram).
    Opened in the calling thread's network namespace.
    """
    fam = NFPROTO_NUMBERS.get(family) if isinstance(family, str) else family
    if fam is None:
        raise NftsyncError(f"unknown nftables family {family!r}")
    what = f"lookup in {family} {table} {set_name}"
    with NetlinkSocket(NETLINK_NETFILTER) as sock:
        seq = sock.next_seq()
        sock.send(get_request(fam, table, set_name, key, seq))
        found: Element | None = None
        while True:
            mv = sock.recv_blocking(timeout)
            if mv is None:
                raise NetlinkError(errno.ETIMEDOUT, what)
            data = bytes(mv)
            _messages, _intr, done, err = scan(data, seq)
            for el in iter_elements(data):
                if found is None and el.key == key:
                    found = el
            if not done:
                continue
            if err == errno.ENOENT:
                if not set_exists(fam, table, set_name):
                    raise SetGone(err, what)
                return None
            if err:
                raise NetlinkError(err, what)
            return found


def set_exists(family: int, table: str, set_name: str) -> bool:
    """Whether the set exists: one dump request, closed after its first answer."""
    from nftsync.netlink.setdump import SetElemDump

    try:
        with SetElemDump(family, table, set_name) as dump:
            for _ in dump.datagrams():
                break
    except SetGone:
        return False
    return True
