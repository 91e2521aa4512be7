"""A simulated cluster around nftsync.replication: nodes with a kernel, a daemon and links.

The kernel is modelled as the daemon sees it: a session map (client -> backend mark, expiry)
and a conntrack table; the packet path updates the map at each new connection and raises a
conntrack NEW event; admin changes raise nft events; the kernel expires entries on its own (a
conntrack timeout raises DESTROY, a map expiry raises nothing). The daemon is the Replica plus
the same few lines the real daemon has around it (learn from events, send to connected peers,
write what wins into the kernel, dump the kernel at start-up). Links are FIFO queues that a
cut or a crash empties; a new connection starts with a snapshot both ways.

Changes that a node's kernel really made (traffic, admin, a connection closed where it was
served, state found at start-up) are logged as claims with their version, so a test can tell
whether a change it sees is backed by a newer claim or is a loss.
"""

from __future__ import annotations

import random
import socket
from collections import deque
from dataclasses import dataclass, field

from nftsync.conntrack import CtEntry
from nftsync.proto import MAX_REMAINING_MS, Record, SessionRecord, decode_ct
from nftsync.proto.conntrack import ct_key
from nftsync.replication import MapPolicy, Replica, newer

MAP = "web/sessions"
T = 120  # the map's timeout, s
CT_T = 300  # conntrack timeout, s
MARKS = (0x200, 0x201, 0x202)
CLIENTS = [bytes([10, 10, 1, i]) for i in range(1, 9)]
WALL0 = 1_800_000_000_000


def policies() -> dict[str, MapPolicy]:
    return {MAP: MapPolicy(frozenset(MARKS), 10_000, T * 1000)}


def conn(client: bytes, port: int, mark: int) -> CtEntry:
    return CtEntry(socket.AF_INET, socket.IPPROTO_TCP, client, bytes([10, 10, 0, 100]), port,
                   60, bytes([10, 20, 0, 11]), client, 60, port, mark=mark, status=0x1ba,
                   timeout=CT_T, tcp_state=3)


@dataclass
class Node:
    id: int
    skew_ms: int
    sessions: dict[bytes, tuple[int, float]] = field(default_factory=dict)  # kernel map
    ct: dict[tuple, tuple[CtEntry, float]] = field(default_factory=dict)  # kernel conntrack
    replica: Replica | None = None

    @property
    def up(self) -> bool:
        return self.replica is not None


class Cluster:
    def __init__(self, n: int, rng: random.Random) -> None:
        self.rng = rng
        self.now = 1000.0
        self.nodes = [Node(i + 1, rng.randint(-50, 50)) for i in range(n)]
        self.cut: set[frozenset[int]] = set()
        self.queues: dict[tuple[int, int], deque[tuple[bool, list[Record]]]] = {}
        self.claims: dict[object, list[tuple[int, int, object]]] = {}  # key -> (ms, origin, value)
        self.next_port = 1024
        self.author: dict[tuple, int] = {}  # connection -> the node whose traffic made it
        self.down_since: dict[int, float] = {}  # node id -> when its daemon last went down
        # Live session deletions: (client, version, node, when), for the resurrection check.
        self.deletes: list[tuple[bytes, tuple[int, int], int, float]] = []
        self.log: list[str] = []
        for node in self.nodes:
            self.start(node)

    # -- clocks and claims -------------------------------------------------------------------
    def wall(self, node: Node) -> int:
        return WALL0 + int(self.now * 1000) + node.skew_ms

    def node(self, node_id: int) -> Node:
        return self.nodes[node_id - 1]

    def claim(self, key: object, ms: int, origin: int, value: object) -> None:
        self.claims.setdefault(key, []).append((ms, origin, value))

    def claim_found(self, node: Node) -> None:
        """What a starting daemon found in its kernel counts as a change of unknown author."""
        assert node.replica is not None
        for table in (node.replica.sessions[MAP], node.replica.conntrack):
            for k, e in table.entries():
                self.claim(k, e.updated_ms, e.origin, e.value)

    def newer_claim(self, key: object, ms: int, origin: int, value: object) -> bool:
        """Whether some node made (or found) a change of `key` that wins over this version."""
        return any(newer(*c, ms, origin, value) for c in self.claims.get(key, ()))

    # -- links -------------------------------------------------------------------------------
    def connected(self, a: Node, b: Node) -> bool:
        return a.up and b.up and frozenset((a.id, b.id)) not in self.cut

    def connect(self, a: Node, b: Node) -> None:
        """A new connection: fresh queues, and a snapshot both ways."""
        for src, dst in ((a, b), (b, a)):
            assert src.replica is not None
            recs = [r for chunk in src.replica.snapshot(self.now) for r in chunk]
            self.queues[(src.id, dst.id)] = deque([(True, recs)])

    def disconnect(self, a: Node, b: Node) -> None:
        self.queues.pop((a.id, b.id), None)
        self.queues.pop((b.id, a.id), None)

    def send(self, src: Node, rec: Record | None, live: bool = True) -> None:
        """Queue a local change for the connected peers; `live`: it is a change this node's
        kernel really made (only those count as claims: see _destroyed)."""
        if rec is None:
            return
        if live:
            if isinstance(rec, SessionRecord):
                key: object = rec.key
                value: object = rec.mark
            else:
                key, value = ct_key(decode_ct(rec.entry)), bytes(rec.entry)
            self.claim(key, rec.updated_ms, rec.origin, value if rec.op == 1 else None)
        for dst in self.nodes:
            if dst is not src and (src.id, dst.id) in self.queues:
                self.queues[(src.id, dst.id)].append((False, [rec]))

    def deliver(self, src_id: int, dst_id: int) -> bool:
        q = self.queues.get((src_id, dst_id))
        if not q:
            return False
        in_snapshot, recs = q.popleft()
        dst = self.node(dst_id)
        assert dst.replica is not None
        w = dst.replica.receive(recs, src_id, in_snapshot, self.now, self.wall(dst))
        for ops in w.sessions.values():
            for op in ops:
                if op.mark is None:
                    dst.sessions.pop(op.key, None)
                else:
                    assert 0 < op.remaining_ms <= MAX_REMAINING_MS
                    dst.sessions[op.key] = (op.mark, self.now + op.remaining_ms / 1000)
        for what, entry in w.conntrack:
            if what == "delete":
                dst.ct.pop(ct_key(entry), None)
            else:
                dst.ct[ct_key(entry)] = (entry, self.now + entry.timeout)
        return True

    def flush_network(self) -> None:
        moved = True
        while moved:
            moved = False
            for src, dst in list(self.queues):
                while self.deliver(src, dst):
                    moved = True

    # -- daemons -----------------------------------------------------------------------------
    def start(self, node: Node) -> None:
        """Start the daemon: dump the kernel (as nft lists it: whole seconds), connect."""
        r = Replica(node.id)
        r.set_maps(policies(), MARKS)
        wall = self.wall(node)
        for key, (mark, exp) in node.sessions.items():
            left = int(exp - self.now)
            if left <= 0:
                continue
            r.found_session(MAP, key, mark, self.now + left, wall - (T - left) * 1000)
        for entry, exp in node.ct.values():
            r.found_ct(entry, exp)
        node.replica = r
        self.claim_found(node)
        for other in self.nodes:
            if other is not node and self.connected(node, other):
                self.connect(node, other)

    def crash(self, node: Node, lose_kernel: bool) -> None:
        for other in self.nodes:
            if other is not node:
                self.disconnect(node, other)
        node.replica = None
        self.down_since[node.id] = self.now
        if lose_kernel:
            node.sessions.clear()
            node.ct.clear()

    # -- what happens on a node --------------------------------------------------------------
    def traffic(self, node: Node, client: bytes) -> None:
        """A new connection: the packet path sticks or schedules, updates the map, NEW event."""
        cur = node.sessions.get(client)
        mark = cur[0] if cur is not None and cur[1] > self.now else self.rng.choice(MARKS)
        node.sessions[client] = (mark, self.now + T)
        self.next_port += 1
        entry = conn(client, self.next_port, mark)
        node.ct[ct_key(entry)] = (entry, self.now + CT_T)
        self.author[ct_key(entry)] = node.id
        r = node.replica
        if r is None:
            return
        wall = self.wall(node)
        self.send(node, r.session_from_ct(MAP, client, mark, self.now + T, self.now, wall))
        self.send(node, r.local_ct(entry, self.now + CT_T, self.now, wall)[1])

    def admin_add(self, node: Node, client: bytes, mark: int) -> None:
        node.sessions[client] = (mark, self.now + T)
        if node.replica is not None:
            self.send(node, node.replica.local_session(MAP, client, mark, self.now + T,
                                                       self.now, self.wall(node)))

    def admin_delete(self, node: Node, clients: list[bytes]) -> None:
        for client in clients:
            if node.sessions.pop(client, None) is None:
                continue
            if node.replica is not None:
                rec = node.replica.local_session_delete(MAP, client, self.now, self.wall(node))
                self.deletes.append((client, (rec.updated_ms, rec.origin), node.id, self.now))
                self.send(node, rec)

    def close(self, node: Node, key: tuple) -> None:
        entry, _ = node.ct.pop(key)
        self._destroyed(node, entry, live=True)

    def _destroyed(self, node: Node, entry: CtEntry, live: bool) -> None:
        """A DESTROY event. A timeout is a live deletion only on the node whose traffic made
        the connection (elsewhere a copy ran out, while the serving node may refresh it)."""
        if node.replica is not None:
            self.send(node, node.replica.local_ct_destroy(ct_key(entry), self.now,
                                                             self.wall(node)),
                      live=live)

    def advance(self, dt: float) -> None:
        """Time passes: links deliver what they carry first, then the kernels expire entries
        (conntrack timeouts raise DESTROY) and the daemons sweep their copies."""
        self.flush_network()
        self.now += dt
        for node in self.nodes:
            for key in [k for k, (_, exp) in node.sessions.items() if exp <= self.now]:
                del node.sessions[key]
            for key in [k for k, (_, exp) in node.ct.items() if exp <= self.now]:
                entry, _ = node.ct.pop(key)
                self._destroyed(node, entry, live=self.author.get(key) == node.id)
            if node.replica is not None:
                node.replica.sweep(self.now, 1 << 30)
                node.replica.sweep(self.now, 1 << 30)

    # -- views -------------------------------------------------------------------------------
    def kernel_view(self, node: Node) -> dict[object, int]:
        """What a node's kernel holds now, unexpired: sessions by client, connections by tuple."""
        out: dict[object, int] = {k: m for k, (m, exp) in node.sessions.items()
                                  if exp > self.now}
        out.update({k: e.mark for k, (e, exp) in node.ct.items() if exp > self.now})
        return out

    def replica_view(self, node: Node) -> dict[object, int]:
        assert node.replica is not None
        out: dict[object, int] = {}
        for table in (node.replica.sessions[MAP], node.replica.conntrack):
            for k, e in table.entries():
                if e.expires_at is None or e.expires_at > self.now:
                    out[k] = e.value if isinstance(e.value, int) else decode_ct(e.value).mark
        return out

    def version(self, node: Node, key: object) -> tuple[int, int] | None:
        assert node.replica is not None
        for table in (node.replica.sessions[MAP], node.replica.conntrack):
            e = table.get(key)
            if e is not None:
                return e.updated_ms, e.origin
        return None

