"""The replication core, sans-I/O: tables, the conflict rule, snapshots, peer record checks.

`table` holds one replicated table (entries and bounded tombstones), `replica` the rules that
change a node's tables: local learning, merging peers' records, snapshots, expiry. The daemon
(`nftsync.daemon`) does the I/O around it; docs/protocol.md "Replication semantics" is the
specification.
"""

from __future__ import annotations

from nftsync.replication.replica import (
    CT_TABLE,
    DEFAULT_CAPACITY,
    FOUND_CT_MS,
    FOUND_PENALTY_MS,
    MAX_FUTURE_MS,
    ElementOp,
    MapPolicy,
    Replica,
    Writes,
)
from nftsync.replication.table import UNVERIFIED, Entry, Table, newer

__all__ = ["CT_TABLE", "DEFAULT_CAPACITY", "FOUND_CT_MS", "FOUND_PENALTY_MS", "MAX_FUTURE_MS",
           "UNVERIFIED", "ElementOp", "Entry", "MapPolicy", "Replica", "Table", "Writes", "newer"]
