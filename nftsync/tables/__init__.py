"""Kernel adapters behind one "session table" shape.

A session table is something in the kernel that maps a client key to a backend and forgets it after
a while: an nftables map (`nftmap`), the conntrack table, or a legacy xt_recent table. The daemon
and the CLI use them through the same small protocol, so replication does not care which it is.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from nftsync.model import Session


class SessionTable(Protocol):
    def list(self) -> list[Session]:
        """Every entry, with its remaining time. May be costly for big tables: not a hot path."""

    def upsert(self, sessions: Iterable[Session]) -> int:
        """Insert or replace entries (value and remaining time) in one kernel transaction."""

    def delete(self, keys: Iterable[tuple[str, ...]]) -> int:
        """Remove entries by key in one transaction; keys that are absent are ignored."""

    def flush(self) -> None:
        """Remove every entry."""
