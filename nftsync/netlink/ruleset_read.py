"""Read one nf_tables table's shape (chains, rules, set definitions) by netlink dumps, and reduce
it to a canonical form that two reads can be compared by.

Why: `nftsync apply` must notice when the kernel no longer holds what the file produced (a chain
flushed, a rule added or a map changed by hand), and nft's own listings cannot be used for that
beside a big map (`list table`/`list chain` fetch every set's elements first, seconds to minutes
at 1M). GETCHAIN, GETRULE and GETSET dumps never carry named sets' elements; only the anonymous
sets of rules (`{ 0 : 0x200, 1 : 0x201 }`, part of a rule, small) are dumped, because their
elements are the rule's content.

What the canonical form leaves out, because it changes without anyone editing the ruleset:
handles, use counts, a set's element count, chain and rule counters (the `counter`
expression's data), a `quota`'s consumed bytes, `last`'s timestamp, set elements and their
expiries (sessions, backend states: the packet path, the daemon and `nftsync backend` change
them), and anonymous set names, which the kernel numbers anew on each load (`__map0`,
`__map1`): a rule refers to its anonymous set by a digest of its definition and elements.

The dumps are not one snapshot of the table; a change committed during a dump flags it
NLM_F_DUMP_INTR (nf_tables does for chains, rules and sets) and the read is repeated, up to
`RETRIES` times (on a node whose daemon writes sessions all the time, the last read is taken
as it is: a change it half saw shows as drift, and repairing it re-applies the file).
"""

from __future__ import annotations

import errno
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from nftsync.datatypes import NFPROTO_NUMBERS
from nftsync.errors import NftsyncError
from nftsync.netlink.core import (
    NETLINK_NETFILTER,
    NFNL_SUBSYS_NFTABLES,
    NLM_F_DUMP,
    NLM_F_DUMP_INTR,
    NLM_F_REQUEST,
    NetlinkError,
    NetlinkSocket,
    iter_attrs,
    nfgenmsg,
    nfnl_type,
    nla_str,
    nlmsg,
)
from nftsync.netlink.nftables import (
    NFT_MSG_NEWCHAIN,
    NFT_MSG_NEWRULE,
    NFT_MSG_NEWSET,
    NFTA_CHAIN_HANDLE,
    NFTA_CHAIN_NAME,
    NFTA_CHAIN_TABLE,
    NFTA_LIST_ELEM,
    NFTA_RULE_CHAIN,
    NFTA_RULE_HANDLE,
    NFTA_RULE_TABLE,
    NFTA_SET_FLAGS,
    NFTA_SET_HANDLE,
    NFTA_SET_NAME,
    NFTA_SET_TABLE,
    Element,
)
from nftsync.netlink.setdump import SetElemDump

NFT_MSG_GETCHAIN = 4
NFT_MSG_GETRULE = 7
NFT_MSG_GETSET = 10
NFTA_CHAIN_USE, NFTA_CHAIN_COUNTERS, NFTA_CHAIN_ID = 6, 8, 10
NFTA_RULE_EXPRESSIONS, NFTA_RULE_POSITION, NFTA_RULE_ID = 4, 6, 8
NFTA_RULE_POSITION_ID, NFTA_RULE_CHAIN_ID = 9, 10
NFTA_SET_ID, NFTA_SET_PAD = 10, 14
NFTA_SET_COUNT = 20  # the number of elements (kernels >= 6.13 send it)
NFTA_EXPR_NAME, NFTA_EXPR_DATA = 1, 2
NFTA_QUOTA_CONSUMED = 3
NFT_SET_ANONYMOUS = 0x1

RETRIES = 3

# Attributes that change with no edit of the ruleset (see the module docstring).
_CHAIN_SKIP = frozenset({NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME, NFTA_CHAIN_HANDLE, NFTA_CHAIN_USE,
                         NFTA_CHAIN_COUNTERS, NFTA_CHAIN_ID})
_RULE_SKIP = frozenset({NFTA_RULE_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_HANDLE, NFTA_RULE_POSITION,
                        NFTA_RULE_ID, NFTA_RULE_POSITION_ID, NFTA_RULE_CHAIN_ID,
                        NFTA_RULE_EXPRESSIONS})
_SET_SKIP = frozenset({NFTA_SET_TABLE, NFTA_SET_NAME, NFTA_SET_HANDLE, NFTA_SET_ID,
                       NFTA_SET_PAD, NFTA_SET_COUNT})
_STATEFUL_DATA = frozenset({"counter", "last"})  # their whole data is state


class TableGone(NetlinkError):
    """The table does not exist (ENOENT)."""


@dataclass(frozen=True)
class RuleView:
    digest: str  # canonical content (12 hex digits of sha256)
    exprs: tuple[str, ...]  # expression names, to describe a rule nft text is not known for


@dataclass
class ChainView:
    name: str
    header: str  # digest of hook, priority, type, policy, flags, comment
    rules: list[RuleView] = field(default_factory=list)


@dataclass
class TableView:
    """A table's chains (with their rules, in order) and named sets' definitions."""

    family: str
    name: str
    chains: dict[str, ChainView] = field(default_factory=dict)
    sets: dict[str, str] = field(default_factory=dict)  # name -> definition digest
    interrupted: bool = False  # the last read was still flagged NLM_F_DUMP_INTR


def read_table(family: str, table: str) -> TableView | None:
    """The table's shape as the kernel holds it now, or None if it does not exist. Opens its
    socket in the calling thread's network namespace."""
    fam = NFPROTO_NUMBERS.get(family)
    if fam is None:
        raise NftsyncError(f"unknown nftables family {family!r}")
    view: TableView | None = None
    for _ in range(RETRIES):
        try:
            view, intr = _read_once(fam, family, table)
        except TableGone:
            return None
        if not intr:
            return view
    assert view is not None
    view.interrupted = True
    return view


def _read_once(fam: int, family: str, table: str) -> tuple[TableView, bool]:
    view = TableView(family, table)
    intr = False
    anon: dict[str, str] = {}  # anonymous set name -> digest of definition and elements
    with NetlinkSocket(NETLINK_NETFILTER, rcvbuf=1 << 20) as sock:
        for attrs, flags in _dump(sock, fam, NFT_MSG_GETSET, NFTA_SET_TABLE, table,
                                  NFT_MSG_NEWSET):
            intr |= bool(flags & NLM_F_DUMP_INTR)
            if _text(attrs.get(NFTA_SET_TABLE)) != table:
                continue
            name = _text(attrs.get(NFTA_SET_NAME))
            definition = _digest_attrs(attrs, _SET_SKIP)
            set_flags = int.from_bytes(attrs.get(NFTA_SET_FLAGS, b"\0\0\0\0"), "big")
            if set_flags & NFT_SET_ANONYMOUS:
                anon[name] = _digest(definition + _anon_elements(family, table, name))
            else:
                view.sets[name] = _digest(definition)
        for attrs, flags in _dump(sock, fam, NFT_MSG_GETCHAIN, NFTA_CHAIN_TABLE, table,
                                  NFT_MSG_NEWCHAIN):
            intr |= bool(flags & NLM_F_DUMP_INTR)
            if _text(attrs.get(NFTA_CHAIN_TABLE)) != table:
                continue
            name = _text(attrs.get(NFTA_CHAIN_NAME))
            view.chains[name] = ChainView(name, _digest(_digest_attrs(attrs, _CHAIN_SKIP)))
        for attrs, flags in _dump(sock, fam, NFT_MSG_GETRULE, NFTA_RULE_TABLE, table,
                                  NFT_MSG_NEWRULE):
            intr |= bool(flags & NLM_F_DUMP_INTR)
            if _text(attrs.get(NFTA_RULE_TABLE)) != table:
                continue
            chain = view.chains.get(_text(attrs.get(NFTA_RULE_CHAIN)))
            if chain is not None:
                chain.rules.append(_rule(attrs, anon))
    return view, intr


def _dump(sock: NetlinkSocket, fam: int, msg: int, table_attr: int, table: str,
          reply: int) -> Iterator[tuple[dict[int, bytes], int]]:
    """One dump of `msg` filtered to `table`: each reply's top-level attributes and its flags."""
    seq = sock.next_seq()
    body = nfgenmsg(fam) + nla_str(table_attr, table)
    want = nfnl_type(NFNL_SUBSYS_NFTABLES, reply)
    try:
        for mtype, flags, _seq, _pid, payload in sock.request(
                nlmsg(nfnl_type(NFNL_SUBSYS_NFTABLES, msg), NLM_F_REQUEST | NLM_F_DUMP, seq,
                      body), seq, timeout=10.0):
            if mtype != want:
                continue
            attrs = {t: bytes(v) for t, _nested, v in iter_attrs(payload[4:])}
            yield attrs, flags
    except NetlinkError as exc:
        if exc.errno == errno.ENOENT:
            raise TableGone(errno.ENOENT, f"table {table}") from None
        raise


def _rule(attrs: dict[int, bytes], anon: dict[str, str]) -> RuleView:
    parts = [_digest_attrs(attrs, _RULE_SKIP)]
    names = []
    for t, _nested, elem in iter_attrs(attrs.get(NFTA_RULE_EXPRESSIONS, b"")):
        if t != NFTA_LIST_ELEM:
            continue
        name, data = "", b""
        for et, _n, ev in iter_attrs(elem):
            if et == NFTA_EXPR_NAME:
                name = _text(bytes(ev))
            elif et == NFTA_EXPR_DATA:
                data = bytes(ev)
        names.append(name)
        parts.append(name.encode() + b"\0" + _canonical_expr(name, data, anon))
    return RuleView(_digest(b"\x01".join(parts)), tuple(names))


def _canonical_expr(name: str, data: bytes, anon: dict[str, str]) -> bytes:
    if name in _STATEFUL_DATA:
        return b""
    out = []
    for t, _nested, v in iter_attrs(data):
        if name == "quota" and t == NFTA_QUOTA_CONSUMED:
            continue
        value = bytes(v)
        ref = anon.get(_text(value)) if value.endswith(b"\0") else None
        out.append(t.to_bytes(2, "big") + (b"anon:" + ref.encode() if ref else value))
    return b"\x02".join(out)


def _anon_elements(family: str, table: str, name: str) -> bytes:
    """An anonymous set's elements, sorted (they belong to a rule: a handful, never sessions)."""
    with SetElemDump(family, table, name) as dump:
        items = sorted(_element_bytes(el) for batch in dump.batches() for el in batch)
    return b"\x03".join(items)


def _element_bytes(el: Element) -> bytes:
    return b"|".join((el.key, el.data or b"", (el.verdict or "").encode(),
                      str(el.timeout_ms).encode(), (el.comment or "").encode(),
                      str(el.flags).encode(), el.key_end or b"", (el.objref or "").encode()))


def _digest_attrs(attrs: dict[int, bytes], skip: frozenset[int]) -> bytes:
    return b"\x04".join(t.to_bytes(2, "big") + v for t, v in sorted(attrs.items())
                        if t not in skip)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


def _text(value: bytes | None) -> str:
    return (value or b"").split(b"\0", 1)[0].decode("utf-8", "replace")
