"""An nftables session map, through libnftables (the CLI's and `apply`'s adapter), and the one
builder of nft element text.

Writes are text transactions (for elements with an expiry 0.8-2.4x the JSON form's rate, noisy
machine: docs/kernels.md); reads are JSON. A key that already exists with another value cannot
be re-added (EEXIST), and before kernel 6.12 re-adding one with the same value does not refresh
its expiry, so replacing an entry is always "delete + add" inside one transaction, except on
kernels that refresh in place. Deletes of absent keys would fail the whole transaction, so
callers say which keys exist (the daemon knows from its replica), or try and fall back
(`replace`).
nft 1.0.6 prints `get element` as text even in JSON mode, so single lookups are not used.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from nftsync.errors import KernelError, SessionError
from nftsync.model import Session, SessionMap, key_from_json
from nftsync.nft import Nft

MAX_ELEMENTS_PER_TRANSACTION = 50_000


def kernel_refreshes_expiry() -> bool:
    """`add element` of an existing key with the same value refreshes its expiry from 6.12 on."""
    release = os.uname().release
    try:
        major, minor = (int(x) for x in release.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (6, 12)


def element_text(key: str, value: str, *, map_timeout_ms: int | None = None,
                 timeout_ms: int | None = None, expires_ms: int | None = None,
                 comment: str | None = None) -> str:
    """One element in nft syntax: `KEY [timeout T] [expires E] [comment "c"] : VALUE`; the one
    builder of element text (session maps, the daemon's libnftables path, backend states).

    The element inherits the map's timeout unless it has its own; an expiry longer than the
    timeout is refused by the kernel, so such an element gets a timeout as long as its expiry.
    """
    parts = [key]
    timeout = timeout_ms if timeout_ms is not None else map_timeout_ms
    if expires_ms is not None and timeout is not None and expires_ms > timeout:
        timeout = expires_ms
    if timeout is not None and timeout != map_timeout_ms:
        parts.append(f"timeout {_duration(timeout)}")
    if expires_ms is not None:
        parts.append(f"expires {_duration(expires_ms)}")
    if comment:
        parts.append('comment "' + comment.replace('"', "'")[:120] + '"')
    return " ".join(parts) + f" : {value}"


def _duration(ms: int) -> str:
    """nft's time syntax: whole seconds as `Ns` (as users write them), else `Nms`."""
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def session_text(s: Session, map_timeout: int | None = None) -> str:
    """A session as an element of its map (times in seconds, as sessions carry them)."""
    return element_text(s.key_text, f"{s.mark:#x}",
                        map_timeout_ms=None if map_timeout is None else map_timeout * 1000,
                        timeout_ms=None if s.timeout is None else s.timeout * 1000,
                        expires_ms=None if s.expires is None else max(1, s.expires) * 1000,
                        comment=s.comment)


def element_commands(where: str, *, delete: Sequence[str] = (), add: Sequence[str] = (),
                     chunk: int = 1000) -> list[str]:
    """`delete element` / `add element` commands for one transaction, deletions first (a
    replaced key frees its slot before it is added again), `chunk` elements per command."""
    cmds = []
    for i in range(0, len(delete), chunk):
        cmds.append(f"delete element {where} {{ {', '.join(delete[i:i + chunk])} }}")
    for i in range(0, len(add), chunk):
        cmds.append(f"add element {where} {{ {', '.join(add[i:i + chunk])} }}")
    return cmds


class NftSessionMap:
    """One nftsync session or static map in the kernel."""

    def __init__(self, smap: SessionMap, nft: Nft | None = None) -> None:
        self.smap = smap
        self.nft = nft or Nft()
        self._where = f"{smap.ref.family} {smap.ref.table} {smap.ref.name}"

    def list(self) -> list[Session]:
        objs = self.nft.list_json(f"map {self._where}")
        if not objs:
            return []
        return sessions_from_json(objs[0]["map"])

    def commands(self, *, add: Sequence[Session] = (), delete: Iterable[tuple[str, ...]] = (),
                 ) -> list[str]:
        """Text commands for one transaction: deletions first, then additions."""
        timeout = self.smap.timeout
        return element_commands(self._where, delete=[" . ".join(k) for k in delete],
                                add=[session_text(s, timeout) for s in add])

    def upsert(self, sessions: Iterable[Session], *, existing: Iterable[tuple[str, ...]] = (),
               ) -> int:
        """Add `sessions`, replacing those whose keys are in `existing`, atomically."""
        sessions = list(sessions)
        if len(sessions) > MAX_ELEMENTS_PER_TRANSACTION:
            raise SessionError(f"at most {MAX_ELEMENTS_PER_TRANSACTION} entries per transaction")
        cmds = self.commands(add=sessions, delete=existing)
        if cmds:
            self.nft.cmd("\n".join(cmds), what=f"update map {self._where}")
        return len(sessions)

    def replace(self, session: Session) -> bool:
        """Add or replace one entry atomically; True if it existed (and was replaced).

        Tries "delete + add" in one transaction, which fails as a whole with ENOENT when the key is
        absent; then a plain add. Correct whatever the old value and on every kernel version.
        """
        try:
            self.upsert([session], existing=[session.key])
            return True
        except KernelError as exc:
            if "No such file or directory" not in str(exc):
                raise
        self.upsert([session])
        return False

    def delete(self, keys: Iterable[tuple[str, ...]]) -> int:
        keys = list(keys)
        cmds = self.commands(delete=keys)
        if cmds:
            self.nft.cmd("\n".join(cmds), what=f"delete from map {self._where}")
        return len(keys)

    def flush(self) -> None:
        self.nft.cmd(f"flush map {self._where}", what=f"flush map {self._where}")


def sessions_from_json(obj: dict) -> list[Session]:
    out = []
    for item in obj.get("elem", []) or []:
        key, value = item
        attrs: dict = {}
        if isinstance(key, dict) and "elem" in key:
            attrs = key["elem"]
            key = attrs["val"]
        timeout = attrs.get("timeout", obj.get("timeout"))
        out.append(Session(key=key_from_json(key), mark=int(value),
                           expires=attrs.get("expires"), timeout=timeout,
                           comment=attrs.get("comment")))
    return out
