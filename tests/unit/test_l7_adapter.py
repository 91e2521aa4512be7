"""The daemon's side of the L7 adapter (nftsync.daemon.l7) on a real Replica and a real,
unstarted HaproxyPeer (its push queue is what HAProxy would get once connected); and the
admin socket's text parsers on HAProxy 2.6's answers."""

from __future__ import annotations

import time

from nftsync.daemon.config import HaproxyConfig
from nftsync.daemon.l7 import ANY_SERVER, HaproxyLink, L7Map
from nftsync.l7 import admin
from nftsync.l7.haproxy import HaproxyPeer, StickTable, StickUpdate
from nftsync.proto import Record, SessionRecord
from nftsync.replication import ElementOp, MapPolicy, Replica

CFG = HaproxyConfig("h", "/nonexistent/admin.sock", "127.0.0.1", 0, "nftsync", "lb1",
                    ("web",))
KEY = bytes([127, 0, 1, 7])
EXPIRE_MS = 1_800_000


def make_link() -> tuple[HaproxyLink, list[Record]]:
    replica = Replica(1)
    sent: list[Record] = []
    link = HaproxyLink(CFG, replica, sent.append)
    replica.set_maps({m: MapPolicy(ANY_SERVER, 1000, EXPIRE_MS, key_valid=lm.key_valid)
                      for m, lm in link.maps.items()}, ())
    link.peer = HaproxyPeer("127.0.0.1", 0, "nftsync", "lb1", link.on_update, link.snapshot)
    link.peer.tables["web"] = StickTable("web", "ip", 4, EXPIRE_MS)
    link.names = {1: "be1", 2: "be2"}
    return link, sent


def test_a_live_update_is_a_local_change_with_the_tables_expire() -> None:
    link, sent = make_link()
    link.on_update(StickUpdate("web", KEY, 2, "be2", None))
    (rec,) = sent
    assert isinstance(rec, SessionRecord)
    assert (rec.map_id, bytes(rec.key), rec.mark, rec.origin) == ("haproxy/web", KEY, 2, 1)
    assert EXPIRE_MS - 1000 <= rec.remaining_ms <= EXPIRE_MS
    link.on_update(StickUpdate("api", KEY, 2, "be2", None))  # not followed
    assert len(sent) == 1 and link.counters["not_followed"] == 1


def test_a_timed_update_we_already_hold_is_not_taken_again() -> None:
    """HAProxy's answer to our RESYNCREQ (after each reconnect) holds what we pushed: not an
    echo to the other node, and the entry stays the other node's."""
    link, sent = make_link()
    t = link.replica.sessions["haproxy/web"]
    t.put(KEY, 2, time.monotonic() + 60, 5, 7)  # node 7's entry
    link.on_update(StickUpdate("web", KEY, 2, "be2", 59_000))
    assert sent == [] and t.get(KEY).origin == 7
    link.on_update(StickUpdate("web", KEY, 1, "be1", EXPIRE_MS - 1000))  # newer, other server
    assert len(sent) == 1 and t.get(KEY).value == 1


def test_peer_records_are_pushed_by_name_and_snapshot_serves_the_table() -> None:
    link, _ = make_link()
    m: L7Map = link.maps["haproxy/web"]
    m.apply([ElementOp(KEY, 2, 45_000, None), ElementOp(KEY[:3] + b"\x08", 9, 1000, None)])
    assert link.peer is not None and link.peer.stats()["pending_pushes"] == 2
    assert link.counters["unknown_server"] == 1  # id 9: pushed with the id only
    link.on_update(StickUpdate("web", KEY, 1, "be1", None))
    got = list(link.snapshot("web"))
    assert [(u.key, u.server_id, u.server_name) for u in got] == [(KEY, 1, "be1")]
    assert EXPIRE_MS - 1000 <= got[0].expire_ms <= EXPIRE_MS
    assert m.key_text(KEY) == "127.0.1.7"


SERVERS_STATE = """1
# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight \
srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state \
srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl \
srv_check_port srv_check_addr srv_agent_addr srv_agent_port
3 web 1 be1 127.0.0.11 2 0 1 1 12 1 0 0 0 0 0 1 - 8001 - 0 0 - - 0
3 web 2 be2 127.0.0.12 2 8 1 1 12 1 0 0 0 0 0 1 - 8002 - 0 0 - - 0
"""

SHOW_TABLE = """# table: web_hdr, type: string, size:204800, used:2
0x55d0c4a1b0e8: key=sess\\ 43\\ x use=0 exp=1799123 server_id=2 server_key=be2
0x55d0c4a1b1f0: key=a;b use=1 exp=10 server_id=1 server_key=-

"""


def test_admin_parsers() -> None:
    assert admin.parse_servers_state(SERVERS_STATE) == [
        admin.Server("web", 1, "be1", "127.0.0.11", 8001, "up"),
        admin.Server("web", 2, "be2", "127.0.0.12", 8002, "drain")]
    assert admin.parse_show_table(SHOW_TABLE) == [
        admin.TableEntry("sess 43 x", 1799123, 2, "be2"),
        admin.TableEntry("a;b", 10, 1, None)]
