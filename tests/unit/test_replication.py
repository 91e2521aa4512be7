"""The replication core's rules, one by one (no root, no kernel: the core is sans-I/O)."""

from __future__ import annotations

import socket

from nftsync.conntrack import CtEntry
from nftsync.proto import (
    MAX_REMAINING_MS,
    OP_ADD,
    OP_DELETE,
    OP_UPSERT,
    ConntrackRecord,
    SessionRecord,
    encode_ct,
)
from nftsync.proto.conntrack import ct_key
from nftsync.replication import (
    FOUND_CT_MS,
    MAX_FUTURE_MS,
    UNVERIFIED,
    MapPolicy,
    Replica,
)

MAP = "web/sessions"
PINS = "web/static"
WALL = 1_800_000_000_000
T_MS = 120_000
A, B = bytes([10, 10, 1, 1]), bytes([10, 10, 1, 2])


def replica(node: int, capacity: int = 1000) -> Replica:
    r = Replica(node)
    r.set_maps({MAP: MapPolicy(frozenset({0x200, 0x201}), capacity, T_MS),
                PINS: MapPolicy(frozenset({0x200, 0x201}), capacity, MAX_REMAINING_MS,
                                static=True)}, {0x200, 0x201})
    return r


def ct(client: bytes, mark: int = 0x200, timeout: int = 300) -> CtEntry:
    return CtEntry(socket.AF_INET, socket.IPPROTO_TCP, client, bytes([10, 10, 0, 100]), 40000,
                   60, bytes([10, 20, 0, 11]), client, 60, 40000, mark=mark, status=0x1ba,
                   timeout=timeout, tcp_state=3)


def sess(op: int, key: bytes, mark: int, updated: int, origin: int,
         remaining: int = 60_000) -> SessionRecord:
    return SessionRecord(op, MAP, key, mark, remaining, updated, origin)


def flat(r: Replica, now: float = 0.0) -> list:
    return [rec for chunk in r.snapshot(now) for rec in chunk]


def test_an_empty_snapshot_deletes_nothing() -> None:
    """The failback bug: a node that lost everything tells its peers nothing they must delete."""
    served = replica(2)
    served.receive([sess(OP_ADD, A, 0x200, WALL, 1)], sender=1, in_snapshot=False, now=0,
                   wall=WALL)
    rebooted = replica(1)
    assert flat(rebooted) == []
    w = served.receive(flat(rebooted), sender=1, in_snapshot=True, now=1, wall=WALL + 1000)
    assert len(w) == 0 and served.sessions[MAP].get(A).value == 0x200
    # ... and the serving node's snapshot gives the rebooted node its own record back.
    w = rebooted.receive(flat(served, 1), sender=2, in_snapshot=True, now=1, wall=WALL + 1000)
    assert [op.mark for op in w.sessions[MAP]] == [0x200]
    assert rebooted.sessions[MAP].get(A).origin == 1


def test_updates_carry_only_the_senders_own_changes() -> None:
    r = replica(2)
    w = r.receive([sess(OP_ADD, A, 0x200, WALL, 3)], sender=1, in_snapshot=False, now=0,
                  wall=WALL)
    assert w.refused == 1 and r.refused == {"foreign_origin": 1} and len(r.sessions[MAP]) == 0


def test_newest_change_wins_then_highest_origin() -> None:
    r = replica(3)
    r.receive([sess(OP_ADD, A, 0x200, WALL, 1)], 1, False, 0, WALL)
    r.receive([sess(OP_ADD, A, 0x201, WALL - 1, 2)], 2, False, 0, WALL)  # older: loses
    assert r.sessions[MAP].get(A).value == 0x200
    r.receive([sess(OP_ADD, A, 0x201, WALL, 2)], 2, False, 0, WALL)  # tie: node 2 > node 1
    assert r.sessions[MAP].get(A).value == 0x201


def test_a_live_delete_beats_an_older_add_and_is_passed_on_in_snapshots() -> None:
    a, b, c = replica(1), replica(2), replica(3)
    add = a.local_session(MAP, A, 0x200, 120.0, 0, WALL)
    b.receive([add], 1, False, 0, WALL)
    dele = a.local_session_delete(MAP, A, 1, WALL + 1000)
    assert dele.op == OP_DELETE and dele.updated_ms > add.updated_ms
    b.receive([dele], 1, False, 1, WALL + 1000)
    assert b.sessions[MAP].get(A) is None and b.sessions[MAP].is_dead(A)
    # c still holds the add (it missed the delete); b's snapshot carries the tombstone.
    c.receive([add], 1, False, 0, WALL)
    w = c.receive(flat(b, 2), 2, True, 2, WALL + 2000)
    assert [(op.key, op.mark) for op in w.sessions[MAP]] == [(A, None)]
    # ... and an older add arriving later cannot bring it back.
    w = c.receive([add], 1, False, 3, WALL + 3000)
    assert len(w) == 0 and c.sessions[MAP].get(A) is None


def test_a_local_change_is_newer_than_what_is_held_even_within_one_ms() -> None:
    r = replica(1)
    r.receive([sess(OP_ADD, A, 0x200, WALL + 5, 2)], 2, False, 0, WALL)
    d = r.local_session_delete(MAP, A, 0, WALL)
    rec = r.local_session(MAP, A, 0x201, 120.0, 0, WALL)
    assert WALL + 5 < d.updated_ms < rec.updated_ms


def test_found_state_yields_to_what_peers_saw_live_and_fills_what_they_lack() -> None:
    restarted = replica(2)
    restarted.found_session(MAP, A, 0x200, 100.0, WALL)  # kept by the kernel, deleted live
    restarted.found_session(MAP, B, 0x201, 100.0, WALL)  # made while the daemon was away
    assert restarted.sessions[MAP].get(A).origin == UNVERIFIED
    peer = replica(1)
    peer.receive([sess(OP_ADD, A, 0x200, WALL - 60_000, 1)], 1, False, 0, WALL)
    peer.local_session_delete(MAP, A, 0, WALL - 30_000)  # before the last refresh we found
    w = restarted.receive(flat(peer), 1, True, 0, WALL)
    assert [(op.key, op.mark) for op in w.sessions[MAP]] == [(A, None)]
    w = peer.receive(flat(restarted), 2, True, 0, WALL)
    assert [(op.key, op.mark) for op in w.sessions[MAP]] == [(B, 0x201)]


def test_peer_records_are_checked() -> None:
    r = replica(2, capacity=2)
    recs = [sess(OP_ADD, A, 0xDEADBEEF, WALL, 1),  # not a backend of the farm
            SessionRecord(OP_ADD, "nope/sessions", A, 0x200, 1000, WALL, 1),
            sess(OP_ADD, A, 0x200, WALL + MAX_FUTURE_MS + 1, 1),
            sess(OP_ADD, A, 0x200, WALL, 1, remaining=49 * 86400 * 1000),  # capped
            sess(OP_ADD, B, 0x201, WALL, 1),
            sess(OP_ADD, bytes([10, 10, 1, 3]), 0x201, WALL, 1)]  # over the bound of origin 1
    w = r.receive(recs, 1, False, 0, WALL)
    assert r.refused == {"unknown_backend": 1, "unknown_map": 1, "future_timestamp": 1,
                         "origin_full": 1}
    assert [(op.key, op.remaining_ms) for op in w.sessions[MAP]] == [(A, T_MS), (B, 60_000)]
    assert r.capped == 1
    w = r.receive([ConntrackRecord(OP_UPSERT, 1, WALL, encode_ct(ct(A, mark=0x300))),
                   ConntrackRecord(OP_UPSERT, 1, WALL, b"\x01garbage")], 1, False, 0, WALL)
    assert len(w) == 0 and r.refused["foreign_mark"] == 1 and r.refused["bad_record"] == 1


def test_static_pins_carry_no_timeout() -> None:
    r = replica(2)
    w = r.receive([SessionRecord(OP_ADD, PINS, A, 0x201, 5000, WALL, 1)], 1, False, 0, WALL)
    assert w.sessions[PINS][0].remaining_ms == 0 and r.sessions[PINS].get(A).expires_at is None


def test_local_records_fit_the_wire() -> None:
    """An admin element with an expiry longer than the map's timeout (or than u32 ms) is sent
    capped, never as a record the codec refuses (that reconnected the link for ever)."""
    r = replica(1)
    rec = r.local_session(MAP, A, 0x200, 100 * 86400.0, 0, WALL)
    assert rec.remaining_ms == T_MS
    rec.encode()
    r.receive([sess(OP_ADD, B, 0x200, WALL, 2)], 2, False, 0, WALL)
    assert r.refused == {}
    rec = r.local_session(MAP, B, 0x201, 120.0, 0, 2**64 - 1)  # a clock at the end of time
    assert rec.updated_ms == 2**64 - 1
    rec.encode()


def test_a_conntrack_copy_that_times_out_here_deletes_nothing_elsewhere() -> None:
    backup = replica(2)
    entry = ct(A)
    backup.receive([ConntrackRecord(OP_UPSERT, 1, WALL, encode_ct(entry))], 1, False, 0, WALL)
    assert backup.local_ct_destroy(ct_key(entry), 300, WALL + 300_000) is None
    assert len(backup.conntrack) == 0 and not backup.conntrack.is_dead(ct_key(entry))
    # The node that served it does send the deletion.
    active = replica(1)
    active.local_ct(entry, 300.0, 0, WALL)
    rec = active.local_ct_destroy(ct_key(entry), 1, WALL + 1000)
    assert rec is not None and rec.op == OP_DELETE


def test_later_found_state_replaces_earlier_found_state_not_live_state() -> None:
    """A session derived from a connection at start-up (dated long ago) gives way to the map's
    element read later (its real expiry, a later date), even with the same mark; a session
    learned live with that mark stays."""
    r = replica(1)
    assert r.found_session(MAP, A, 0x200, 50.0, FOUND_CT_MS)  # derived from a connection
    assert r.found_session(MAP, A, 0x200, 90.0, WALL)  # the element itself
    got = r.sessions[MAP].get(A)
    assert (got.value, got.expires_at, got.origin) == (0x200, 90.0, UNVERIFIED)
    assert got.updated_ms > FOUND_CT_MS
    r.local_session(MAP, B, 0x201, 120.0, 0, WALL)
    assert not r.found_session(MAP, B, 0x201, 30.0, WALL)
    assert r.sessions[MAP].get(B).origin == 1


def test_a_found_element_that_loses_gets_the_kernel_corrected() -> None:
    """A peer's delete (or move) merged before the start-up read reached the element wrote
    nothing (the replica did not know the kernel held it); when the read finds it and does not
    take it, `correction` says what the kernel must do."""
    r = replica(2)
    peer = replica(1)
    peer.local_session(MAP, A, 0x200, 120.0, 0, WALL)
    peer.local_session_delete(MAP, A, 0, WALL + 10)
    peer.local_session(MAP, B, 0x201, 120.0, 0, WALL + 20)
    w = r.receive(flat(peer, 0), 1, True, 0, WALL + 30)
    assert [op.key for op in w.sessions[MAP]] == [B]  # nothing to delete for A: not held
    for key, kernel_mark in ((A, 0x200), (B, 0x200)):
        assert not r.found_session(MAP, key, kernel_mark, 100.0, WALL - 5_000)
    fix_a = r.correction(MAP, A, 0x200, 0)
    assert (fix_a.mark, fix_a.old_mark) == (None, 0x200)  # delete it
    fix_b = r.correction(MAP, B, 0x200, 0)
    assert (fix_b.mark, fix_b.old_mark) == (0x201, 0x200) and fix_b.remaining_ms > 0
    assert r.correction(MAP, B, 0x201, 0) is None  # the kernel agrees
    assert r.correction(MAP, bytes([10, 0, 0, 9]), 0x200, 0) is None  # nothing known


def test_found_conntrack_is_long_ago() -> None:
    r = replica(2)
    entry = ct(A)
    assert r.found_ct(entry, 300.0)
    assert r.conntrack.get(ct_key(entry)).updated_ms == FOUND_CT_MS
    peer = replica(1)
    peer.local_ct(entry, 300.0, 0, WALL)
    peer.local_ct_destroy(ct_key(entry), 1, WALL + 1000)
    w = r.receive(flat(peer, 1), 1, True, 1, WALL + 1000)
    assert [op for op, _ in w.conntrack] == ["delete"]


def test_tombstones_are_bounded_in_time_and_count() -> None:
    r = replica(1, capacity=3)
    for i in range(5):
        r.local_session_delete(MAP, bytes([10, 0, 0, i]), 0, WALL + i)
    assert len(r.sessions[MAP].dead) == 3  # the oldest went first
    assert not r.sessions[MAP].is_dead(bytes([10, 0, 0, 0]))
    r.sweep(1000.0)
    r.sweep(1000.0)
    assert len(r.sessions[MAP].dead) == 0


def test_snapshot_skips_expired_and_sends_remaining_time() -> None:
    r = replica(1)
    r.local_session(MAP, A, 0x200, 10.0, 0, WALL)
    r.local_session(MAP, B, 0x200, 100.0, 0, WALL)
    recs = flat(r, 50.0)
    assert [(x.key, x.remaining_ms) for x in recs] == [(B, 50_000)]


def test_a_conntrack_entry_does_not_overrule_a_live_session() -> None:
    """Reproduction 5: an inserted entry whose mark contradicts the session leaves it as it is
    (the packet path would have used the session's mark); after expiry it is a new session."""
    r = replica(1)
    r.local_session(MAP, A, 0x201, 594.0, 0, WALL)
    assert r.session_from_ct(MAP, A, 0x200, 120.0, 1, WALL + 1000) is None
    assert r.sessions[MAP].get(A).value == 0x201 and r.ct_mark_conflicts == 1
    rec = r.session_from_ct(MAP, A, 0x201, 121.0, 1, WALL + 1000)  # a refresh agrees
    assert rec is not None and rec.mark == 0x201
    rec = r.session_from_ct(MAP, A, 0x200, 800.0, 600, WALL + 600_000)  # after its expiry
    assert rec is not None and r.sessions[MAP].get(A).value == 0x200
