"""The sessions `nftsync apply` carries from a map it re-creates into the new map.

Why a module of its own: the old map is read with the project's streamed set-element dump
(`nftsync.netlink.setdump`), one datagram (≤ ~800 elements) at a time, into a compact table
(one int per session: its expiry deadline and mark), instead of libnftables' JSON listing, which
built the whole map as JSON and Python objects first (200k sessions: 2.8 s and ~450 MB of the
apply's 500 MB peak). The element text for the new map is then written from that table.

**No session is lost to the dump, few to the gap before the commit.** A set-element dump is no
snapshot: an element removed behind the dump's position (expiry's garbage collection runs all
the time in a session map) makes one not yet sent be skipped, silently (setdump.SetElemDump).
The daemon has other sources for what a dump skips; apply has none, so it reads the map again
until a pass finds no key the earlier ones missed (at least two passes, at most `MAX_PASSES`),
keeping each key's latest reading. The old map keeps serving clients until the one transaction
commits: a session the packet path creates after the last pass read its slot is not carried
(its client's next new connection is scheduled afresh; its established connections go on, NAT
is in conntrack), and one refreshed meanwhile is carried with its older expiry. The caller
therefore reads as the very last step before it commits: the gap is the last pass plus the
commit (a second at 200k sessions, ~35 s for a pass at 1M: the kernel's walk is quadratic).
"""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from nftsync.datatypes import DatatypeError, format_value, key_length
from nftsync.model import SessionMap
from nftsync.netlink.setdump import SetElemDump, SetGone, iter_elements
from nftsync.tables.nftmap import element_commands, element_text

#: At most this many dumps of one map: each pass at 1M sessions costs ~35 s of kernel walk.
MAX_PASSES = 3

#: (what, done, total or None): how the layers below the CLI report progress.
Report = Callable[[str, int, "int | None"], None]

_MARK_BITS = 32
_MARK_MASK = (1 << _MARK_BITS) - 1
_NO_EXPIRY = 0


def _ignore(_what: str, _done: int, _total: int | None = None) -> None:
    return None


@dataclass
class MapRead:
    """The sessions of one map as read: key bytes -> (deadline_ms << 32) | mark.

    The deadline is on the monotonic clock (ms), taken from when the kernel built the datagram
    that carried the element, so the remaining time is exact whenever the text is written; 0
    means the element has no expiry (a static map). One int per session keeps 1M sessions at
    ~110 MB where tuples or `Session` objects cost 2-3x that.
    """

    smap: SessionMap
    entries: dict[bytes, int] = field(default_factory=dict)
    comments: dict[bytes, str] = field(default_factory=dict)
    passes: int = 0
    skipped_by_first: int = 0  # keys a later pass found that the first one had not sent
    malformed: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.entries)

    def marks(self) -> dict[bytes, int]:
        return {k: v & _MARK_MASK for k, v in self.entries.items()}


def read_map(smap: SessionMap, report: Report = _ignore) -> MapRead:
    """Read `smap`'s sessions in passes (see the module docstring); a map that does not exist
    (any more) reads as empty."""
    out = MapRead(smap)
    ref = smap.ref
    for n in range(1, MAX_PASSES + 1):
        what = f"reading {ref}" + (f" (pass {n})" if n > 1 else "")
        new = _one_pass(out, what, report)
        out.passes = n
        if n > 1:
            out.skipped_by_first += new
        if n >= 2 and new == 0:
            break
    return out


def _one_pass(out: MapRead, what: str, report: Report) -> int:
    ref = out.smap.ref
    entries = out.entries
    comments = out.comments
    seen = 0
    new = 0
    try:
        with SetElemDump(ref.family, ref.table, ref.name) as dump:
            for data, mono, _wall in dump.datagrams():
                base = int(mono * 1000)
                for el in iter_elements(data, out.malformed):
                    if el.data is None or len(el.data) != 4 or el.catchall:
                        continue
                    mark = int.from_bytes(el.data, sys.byteorder)  # nft marks: host order
                    deadline = _NO_EXPIRY if el.expiration_ms is None else \
                        max(base + el.expiration_ms, 1)
                    key = el.key
                    if key not in entries:
                        new += 1
                    entries[key] = (deadline << _MARK_BITS) | mark
                    if el.comment:
                        comments[key] = el.comment
                    seen += 1
                report(what, seen, None)
    except SetGone:
        return new  # no such map (any more): nothing (more) to carry, as read_map says
    return new


@dataclass
class Carried:
    """What one read becomes in the new map: the element commands and what was left out."""

    commands: list[str]
    kept: int
    keys: list[bytes]  # of the sessions kept
    dropped: list[tuple[str, int, str]]  # (key text, mark, reason)
    expired: int  # sessions whose expiry passed between the read and now


def carry_commands(read: MapRead, target: SessionMap, backends: set[int]) -> Carried:
    """`add element` commands putting `read`'s sessions into `target` with their remaining time
    (capped at its timeout), leaving out those of removed backends and keys that do not fit.
    The remaining time is computed now, just before the commit."""
    src_types = read.smap.key_type
    fits = src_types == target.key_type and key_length(target.key_type) is not None
    text_of = key_formatter(src_types)
    timeout_ms = None if target.timeout is None else target.timeout * 1000
    static = target.timeout is None
    now = int(time.monotonic() * 1000)
    adds: list[str] = []
    keys: list[bytes] = []
    dropped: list[tuple[str, int, str]] = []
    expired = 0
    for key, packed in read.entries.items():
        mark = packed & _MARK_MASK
        try:
            key_text = text_of(key)
        except DatatypeError:
            key_text = key.hex()
            fits_key = False
        else:
            fits_key = fits
        if not fits_key:
            dropped.append((key_text, mark, f"key does not fit {' . '.join(target.key_type)}"))
            continue
        if mark not in backends:
            dropped.append((key_text, mark, f"backend {mark:#x} no longer exists"))
            continue
        deadline = packed >> _MARK_BITS
        expires_ms = None
        if not static:
            if deadline == _NO_EXPIRY:
                expires_ms = timeout_ms
            else:
                expires_ms = deadline - now
                if expires_ms <= 0:
                    expired += 1
                    continue
                if timeout_ms is not None:
                    expires_ms = min(expires_ms, timeout_ms)
        keys.append(key)
        adds.append(element_text(key_text, f"{mark:#x}", map_timeout_ms=timeout_ms,
                                 expires_ms=expires_ms, comment=read.comments.get(key)))
    ref = target.ref
    cmds = element_commands(f"{ref.family} {ref.table} {ref.name}", add=adds)
    return Carried(cmds, len(adds), keys, dropped, expired)


def prune_commands(read: MapRead, gone: set[int]) -> tuple[list[str], list[tuple[str, int]]]:
    """`delete element` commands for the sessions of removed backends in a kept map, and
    (key text, mark) of each."""
    text_of = key_formatter(read.smap.key_type)
    doomed = [(text_of(k), v & _MARK_MASK) for k, v in read.entries.items()
              if v & _MARK_MASK in gone]
    ref = read.smap.ref
    cmds = element_commands(f"{ref.family} {ref.table} {ref.name}",
                            delete=[k for k, _m in doomed])
    return cmds, doomed


def key_formatter(types: tuple[str, ...]) -> Callable[[bytes], str]:
    """Key bytes -> nft text; IPv4 addresses (most farms) through the C formatter."""
    if types == ("ipv4_addr",):
        def ipv4(key: bytes) -> str:
            if len(key) != 4:
                raise DatatypeError(f"{len(key)}-byte key for ipv4_addr")
            return socket.inet_ntoa(key)
        return ipv4
    return lambda key: format_value(key, types)
