"""A daemon that starts beside a big session map (issue 11), on the real kernel.

Two namespaces of their own (`sur-<id>-a`, `sur-<id>-b`) joined by a veth, `rulesets/large.nft`
applied in both, daemons on port 7791. A's map is filled before A's daemon starts (B's runs
already); then, while A reads its map in the background:

* A answers `ctl status` (its start() waits for that) and a session made on A after its start
  (a conntrack entry with a farm mark, and an admin `nft add element`) reaches B's kernel map;
* keys of the map are deleted on A live, again and again until A's read is done;
* in the end B's kernel map holds every element of A's map, and none of the deleted keys (a
  found element never wins over a live delete), in A's replica neither.

Nothing here asserts a duration: waits are bounded, and how far A's read had got when things
happened is only printed.
"""

from __future__ import annotations

import ipaddress
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import netns
import pytest
from daemons import DaemonProc, make_key, wait_for
from helpers import RULESETS

from nftsync.conntrack import CtEntry
from nftsync.daemon import control
from nftsync.netlink.ctsocket import CtWriter
from nftsync.netlink.setdump import SetElemDump

PORT = 7791
ADDR = {"a": "10.231.0.1", "b": "10.231.0.2"}
TABLE, MAP = "nftsync_big", "big_sessions"
MAP_ID = "big/sessions"
MARKS = (0x200, 0x201)
N = 100_000  # elements of A's map before A starts
DELETE_BATCH = 25  # keys per live `nft delete element` on A during its read


class Daemon(DaemonProc):
    """DaemonProc on this module's port and cluster."""

    port = PORT
    cluster = "sur"
    start_timeout = 30.0

    def call(self, cmd: str, args: dict | None = None):
        """The control protocol in-process (no `nftsync ctl` process: fast enough to poll)."""
        return control.call(str(self.socket), cmd, args, 30.0)


def client(i: int) -> str:
    """Client i of the big map: 10.128.0.0/12 (never a client of the lab)."""
    return f"10.{128 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}"


def kernel_map(ns: str) -> dict[str, int]:
    """Client -> mark of a node's big map, read with our own streamed dump."""
    with netns.entered(ns):
        dump = SetElemDump("ip", TABLE, MAP)
    return {str(ipaddress.IPv4Address(el.key)): int.from_bytes(el.data, sys.byteorder)
            for batch in dump.batches() for el in batch}


@pytest.fixture
def pair_ns() -> Iterator[dict[str, str]]:
    """Namespaces a and b, a veth between them, rulesets/large.nft in both; deleted after."""
    with netns.linked_pair("sur", ADDR["a"], ADDR["b"], str(RULESETS / "large.nft")) as names:
        yield names


@pytest.fixture
def daemons(pair_ns: dict[str, str], tmp_path: Path) -> Iterator[dict[str, Daemon]]:
    key = make_key(tmp_path)
    made = {
        "a": Daemon(pair_ns["a"], "a", 1, ADDR["a"], [ADDR["b"]], key, tmp_path, "active"),
        "b": Daemon(pair_ns["b"], "b", 2, ADDR["b"], [ADDR["a"]], key, tmp_path),
    }
    try:
        yield made
    finally:
        for d in made.values():
            d.stop()


def fill(ns: str, n: int) -> dict[str, int]:
    """n sessions in the big map (expires 500 s, far below the 600 s timeout), one `nft -f`."""
    sessions = {client(i): MARKS[i % 2] for i in range(n)}
    lines = []
    items = list(sessions.items())
    for s in range(0, n, 10_000):
        elems = ", ".join(f"{k} expires 500s : {m:#x}" for k, m in items[s:s + 10_000])
        lines.append(f"add element ip {TABLE} {MAP} {{ {elems} }}\n")
    netns.run(ns, "nft", "-f", "-", input="".join(lines), timeout=120)
    return sessions


def read_state(d: Daemon) -> dict:
    return d.call("stats")["reads"]["maps"].get(MAP_ID, {})


def test_start_beside_a_big_map(pair_ns: dict[str, str], daemons: dict[str, Daemon]) -> None:
    a, b = daemons["a"], daemons["b"]
    b.start()
    sessions = fill(pair_ns["a"], N)
    a.start()  # returns once A answers `ctl status`
    status = a.call("status")
    print("A's status at its first answer:", status.get("startup_read"))

    # Sessions made on A after its start: a connection (conntrack NEW with a farm mark) and an
    # admin add. New clients, outside the map.
    conn_client, admin_client = client(N + 1), client(N + 2)
    with netns.entered(pair_ns["a"]):
        writer = CtWriter()
    try:
        writer.apply([("upsert", CtEntry.make(conn_client, 40000, "10.10.0.100", 80,
                                              "10.20.0.11", 80, mark=MARKS[0], timeout=600))])
    finally:
        writer.close()
    netns.run(pair_ns["a"], "nft", "add", "element", "ip", TABLE, MAP,
              f"{{ {admin_client} expires 500s : {MARKS[1]:#x} }}")
    made_during = read_state(a)
    print("A's map read when the new sessions were made:", made_during)

    # Live deletes on A, batch after batch, during the first pass of A's read (what it has
    # read of the map is applied after the deletes; its later passes must not see them either),
    # and then a few after the read. A delete during a read's last pass can make the kernel's
    # dump skip another element for good (nftsync.netlink.setdump), so none are made then.
    deleted: list[str] = []
    during_read = 0
    stop = threading.Event()

    def delete_while_reading() -> None:
        nonlocal during_read
        i, after = 7, 0
        while not stop.is_set() and i < N and after < 4:
            state = read_state(a)
            first_pass = state.get("pass") == 1 and not state.get("done")
            if not first_pass and not state.get("done"):
                time.sleep(0.05)  # a later pass: wait for the end of the read
                continue
            keys = [client(k) for k in range(i, min(N, i + DELETE_BATCH * 97), 97)]
            i += DELETE_BATCH * 97 + 13
            netns.run(pair_ns["a"], "nft", "delete", "element", "ip", TABLE, MAP,
                      "{ " + ", ".join(keys) + " }")
            deleted.extend(keys)
            if first_pass:
                during_read += len(keys)
            else:
                after += 1

    deleter = threading.Thread(target=delete_while_reading, daemon=True)
    deleter.start()
    try:
        wait_for(lambda: {conn_client, admin_client} <= kernel_map(pair_ns["b"]).keys(), 60,
                 "the sessions made on A after its start to reach B's kernel")
        wait_for(lambda: read_state(a).get("done"), 300, "A's start-up read to finish")
        deleter.join(60)
        assert not deleter.is_alive()
    finally:
        stop.set()
        deleter.join(10)
    state = read_state(a)
    print(f"A's read: {state}; {len(deleted)} keys deleted, {during_read} while it ran")
    assert state["error"] == "" and state["elements"] >= N - len(deleted)

    want = {k: m for k, m in sessions.items() if k not in set(deleted)}
    want[conn_client], want[admin_client] = MARKS[0], MARKS[1]
    gone = set(deleted)

    def b_lacks() -> str:
        have = kernel_map(pair_ns["b"])
        lost = {k: (m, have.get(k)) for k, m in want.items() if have.get(k) != m}
        back = sorted(gone & have.keys())
        if not lost and not back:
            return ""
        return (f"{len(lost)} missing or wrong (e.g. {dict(list(lost.items())[:5])}), "
                f"{len(back)} deleted keys present (e.g. {back[:5]})")

    deadline = time.monotonic() + 120  # B's kernel map holds A's map, less what was deleted
    while (why := b_lacks()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not why, f"B's kernel map: {why}"
    # Stable: a later snapshot of A (its read done) brings nothing deleted back.
    for _ in range(3):
        time.sleep(1.0)
        have_b = kernel_map(pair_ns["b"])
        back = sorted(gone & have_b.keys())
        assert not back, f"deleted keys back on B: {back[:5]}"
        assert all(have_b.get(k) == m for k, m in want.items())
    have_a = kernel_map(pair_ns["a"])
    assert not gone & have_a.keys()
    shown = a.call("show", {"farm": "big", "limit": 100_000})["farms"]["big"]["sessions"]
    replica_a = {e["client"] for e in shown["entries"]}
    assert shown["count"] == len(want), (shown["count"], len(want))
    assert not gone & replica_a, f"deleted keys in A's replica: {sorted(gone & replica_a)[:5]}"


def test_sessions_derived_from_conntrack(pair_ns: dict[str, str],
                                         daemons: dict[str, Daemon]) -> None:
    """Before listening, A derives its clients' sessions from the farms' conntrack entries
    (found state dated "long ago"); its map, once read, says more: an element with another
    backend wins, one with the same backend brings its own expiry, and a session the map does
    not hold (the client's session expired while its connection lived on) is forgotten."""
    a, b = daemons["a"], daemons["b"]
    b.start()
    other, same, gone = client(1), client(2), client(3)
    netns.run(pair_ns["a"], "nft", "add", "element", "ip", TABLE, MAP,
              f"{{ {other} expires 400s : {MARKS[1]:#x}, {same} expires 300s : {MARKS[0]:#x} }}")
    with netns.entered(pair_ns["a"]):
        writer = CtWriter()
    try:
        writer.apply([("upsert", CtEntry.make(c, 40000, "10.10.0.100", 80, "10.20.0.11", 80,
                                              mark=MARKS[0], timeout=600))
                      for c in (other, same, gone)])
    finally:
        writer.close()
    a.start()
    wait_for(lambda: read_state(a).get("done"), 120, "A's start-up read to finish")
    reads = a.call("stats")["reads"]
    assert (reads["conntrack"]["entries"], reads["conntrack"]["sessions"]) == (3, 3)
    assert reads["maps"][MAP_ID]["dropped"] == 1
    shown = a.call("show", {"farm": "big"})["farms"]["big"]["sessions"]["entries"]
    replica_a = {e["client"]: (int(e["backend"], 16), e["expires_s"]) for e in shown}
    assert replica_a.keys() == {other, same}
    assert replica_a[other][0] == MARKS[1] and replica_a[same][0] == MARKS[0]
    assert replica_a[same][1] <= 300  # the element's own expiry, not the map's 600 s

    def b_has() -> dict:
        with netns.entered(pair_ns["b"]):
            dump = SetElemDump("ip", TABLE, MAP)
        return {str(ipaddress.IPv4Address(el.key)):
                (int.from_bytes(el.data, sys.byteorder), el.expiration_ms)
                for batch in dump.batches() for el in batch}

    def b_agrees() -> bool:
        have = b_has()
        return (have.get(other, (0,))[0] == MARKS[1] and same in have
                and have[same][0] == MARKS[0] and have[same][1] <= 301_000)

    wait_for(b_agrees, 60, f"B's kernel map to hold {other} on {MARKS[1]:#x} and {same} with "
             "the map's own expiry")


def test_a_peer_change_that_comes_before_the_read_reaches_the_element(
        pair_ns: dict[str, str], daemons: dict[str, Daemon]) -> None:
    """A's daemon is away; on B keys are deleted and others moved to the other backend, live.
    A comes back: B's snapshot (the deletes as tombstones, the moves) arrives while A is still
    reading its map, before the read reaches most of those keys, so when it merged them A did
    not know its kernel held them and wrote nothing. When the read then finds them, the
    replica does not take them (what B says is newer): A's kernel must be made to agree."""
    a, b = daemons["a"], daemons["b"]
    b.start()
    sessions = fill(pair_ns["a"], N)
    a.start()
    wait_for(lambda: len(kernel_map(pair_ns["b"])) >= N, 180, f"B holding A's {N} sessions")
    a.stop()
    keys = sorted(sessions)
    deleted, moved = keys[:300:3], keys[1:300:3]
    lines = [f"delete element ip {TABLE} {MAP} {{ {', '.join(deleted + moved)} }}\n"]
    lines.append(f"add element ip {TABLE} {MAP} {{ " + ", ".join(
        f"{k} expires 500s : {MARKS[0] if sessions[k] == MARKS[1] else MARKS[1]:#x}"
        for k in moved) + " }\n")
    netns.run(pair_ns["b"], "nft", "-f", "-", input="".join(lines))
    want = {k: m for k, m in sessions.items() if k not in deleted}
    want.update({k: MARKS[0] if sessions[k] == MARKS[1] else MARKS[1] for k in moved})
    a.start()
    wait_for(lambda: read_state(a).get("done"), 300, "A's start-up read to finish")
    print("A's read:", read_state(a))

    def disagreement(node: str) -> str:
        have = kernel_map(pair_ns[node])
        back = sorted(set(deleted) & have.keys())
        wrong = sorted(k for k in moved if have.get(k) != want[k])
        return "" if not back and not wrong else \
            f"on {node}: {len(back)} deleted key(s) back ({back[:3]}), {len(wrong)} moved " \
            f"key(s) on the old backend ({wrong[:3]})"

    try:
        wait_for(lambda: not disagreement("a") and not disagreement("b"), 60,
                 "both kernels to agree with B's live deletes and moves")
    except AssertionError:
        raise AssertionError(f"{disagreement('a')} {disagreement('b')}") from None
    assert read_state(a)["corrected"] > 0  # the path under test was taken
