"""ctnetlink codec against the real kernel, each test in its own namespace (`ns` fixture).

What is checked is the kernel's own view: `conntrack -L` output, events the kernel sends for
real traffic, packets that are (or are not) translated.
"""

from __future__ import annotations

import ipaddress
import re
import select
import socket
import struct
import tempfile
import time

import netns
import pytest
from builders import make_entries

from nftsync.conntrack import (
    IPPROTO_UDP,
    IPS_ASSURED,
    IPS_DST_NAT,
    IPS_SEEN_REPLY,
    IPS_SRC_NAT,
    CtEntry,
)
from nftsync.netlink.core import NetlinkError, nfgenmsg, nlmsg
from nftsync.netlink.ctnetlink import (
    CT_NEW,
    CtEvent,
)
from nftsync.netlink.ctsocket import CtEventSocket, CtWriter, dump
from nftsync.proto.conntrack import CT_ENTRY_SIZE, decode_ct, encode_ct

_FIELD = re.compile(r"(\w+)=(\S+)")


def conntrack_list(ns: str, *args: str) -> list[dict]:
    """`conntrack -L -o extended` parsed: orig/reply tuples, state, timeout, mark, flags."""
    out = netns.run(ns, "conntrack", "-L", "-o", "extended", *args).stdout
    rows = []
    for line in out.splitlines():
        tok = line.split()
        if len(tok) < 6:
            continue
        fields = _FIELD.findall(line)
        src = [v for k, v in fields if k == "src"]
        dst = [v for k, v in fields if k == "dst"]
        sport = [int(v) for k, v in fields if k == "sport"]
        dport = [int(v) for k, v in fields if k == "dport"]
        mark = next((int(v) for k, v in fields if k == "mark"), 0)
        has_state = not tok[5].startswith("src=")
        rows.append({
            "family": tok[0], "proto": tok[2], "timeout": int(tok[4]),
            "state": tok[5] if has_state else None,
            "orig": (src[0], dst[0], sport[0], dport[0]),
            "reply": (src[1], dst[1], sport[1], dport[1]),
            "mark": mark, "assured": "[ASSURED]" in line,
        })
    return rows


def addr(ip: bytes) -> str:
    return str(ipaddress.ip_address(ip))


def expected_row(e: CtEntry) -> tuple:
    return ((addr(e.orig_src), addr(e.orig_dst), e.orig_sport, e.orig_dport),
            (addr(e.reply_src), addr(e.reply_dst), e.reply_sport, e.reply_dport))


def check_table(ns: str, entries: list[CtEntry]) -> None:
    rows = {(r["orig"], r["reply"]): r for r in conntrack_list(ns)}
    assert len(rows) == len(entries)
    for e in entries:
        r = rows[expected_row(e)]
        assert r["mark"] == e.mark
        assert r["state"] == "ESTABLISHED"
        assert r["assured"]
        assert abs(r["timeout"] - e.timeout) <= 2


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_upsert_update_delete(ns: str, v6: bool) -> None:
    entries = make_entries(1000, v6=v6)
    with netns.entered(ns):
        events = CtEventSocket()
        writer = CtWriter()
    try:
        res = writer.apply([("upsert", e) for e in entries])
        assert (res.created, res.failed) == (1000, [])
        check_table(ns, entries)

        # Our own inserts come back as NEW events carrying the writer's port id.
        got = events.read(10_000)
        assert [ev for ev, _ in got] == [CtEvent.NEW] * 1000
        assert {ct.key for _, ct in got} == {e.key for e in entries}
        assert all(ct.is_dnat and ct.status & IPS_DST_NAT for _, ct in got)

        # Upsert again with a new mark and timeout: the existing entries are updated.
        updated = make_entries(1000, mark_of=lambda i: 0x300 + i % 5, timeout=300, v6=v6)
        res = writer.apply([("upsert", e) for e in updated])
        assert (res.created, res.updated, res.failed) == (0, 1000, [])
        check_table(ns, updated)

        res = writer.apply([("delete", e) for e in updated[:600]])
        assert (res.deleted, res.absent, res.failed) == (600, 0, [])
        check_table(ns, updated[600:])
        res = writer.apply([("delete", e) for e in updated])
        assert (res.deleted, res.absent, res.failed) == (400, 600, [])
        assert conntrack_list(ns) == []
    finally:
        events.close()
        writer.close()


def test_echo_filter_and_mark_prefilter(ns: str) -> None:
    entries = make_entries(300, mark_of=lambda i: (0x200, 0x201, 0x1200)[i % 3])
    with netns.entered(ns):
        writer = CtWriter()
        by_mark = CtEventSocket(marks={0x200}, mark_mask=0xFFF)
        not_ours = CtEventSocket(ignore_portids={writer.portid})
    try:
        assert writer.apply([("upsert", e) for e in entries]).created == 300
        got = by_mark.read(10_000)
        assert len(got) == 200  # 0x200 and 0x1200 & 0xfff
        assert {ct.mark for _, ct in got} == {0x200, 0x1200}
        assert by_mark.stats.filtered == 100
        assert not_ours.read(10_000) == []
        assert not_ours.stats.filtered == 300
        # A delete by another process (conntrack -D) is not our echo: it is seen.
        netns.run(ns, "conntrack", "-D", "-m", "0x201")
        got = not_ours.read(10_000)
        assert len(got) == 100 and {ev for ev, _ in got} == {CtEvent.DESTROY}
    finally:
        writer.close()
        by_mark.close()
        not_ours.close()


def test_write_failures_are_reported_per_entry(ns: str) -> None:
    good = make_entries(50)
    bad = CtEntry.make("10.9.9.9", 1, "10.0.0.100", 80, "10.0.1.1", 8080)
    bad.tcp_state = 200  # the kernel refuses TCP states >= TCP_CONNTRACK_MAX (EINVAL)
    ops = [("upsert", e) for e in good[:20]] + [("upsert", bad)] + \
        [("upsert", e) for e in good[20:]]
    with netns.entered(ns), CtWriter() as writer:
        res = writer.apply(ops)
    assert res.created == 50
    assert len(res.failed) == 1 and res.failed[0][1] is bad and res.failed[0][2] > 0
    assert len(conntrack_list(ns)) == 50


def _nat_ruleset(ns: str) -> None:
    rules = """
    table ip nat {
        chain output {
            type nat hook output priority -100; policy accept;
            ip daddr 127.0.0.5 tcp dport 80 ct mark set 0x2a5 dnat to 127.0.0.2:8080
        }
        chain postrouting { type nat hook postrouting priority 100; policy accept; }
    }
    """
    with tempfile.NamedTemporaryFile("w", suffix=".nft") as f:
        f.write(rules)
        f.flush()
        netns.run(ns, "nft", "-f", f.name)


def _wait_events(sock: CtEventSocket, want, timeout: float = 5.0) -> list:
    got: list = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        select.select([sock], [], [], 0.2)
        got += sock.read()
        if want(got):
            break
    return got


def test_real_traffic_dnat_events(ns: str) -> None:
    _nat_ruleset(ns)
    netns.run(ns, "sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_timeout_time_wait=1")
    with netns.entered(ns):
        events = CtEventSocket(marks={0x2A5})
        listener = socket.create_server(("127.0.0.2", 8080))
        client = socket.create_connection(("127.0.0.5", 80), timeout=5)
    try:
        server, _ = listener.accept()
        client.sendall(b"ping")
        assert server.recv(4) == b"ping"
        cport = client.getsockname()[1]

        new = _wait_events(events, lambda g: any(ev == CtEvent.NEW for ev, _ in g))
        ct = next(ct for ev, ct in new if ev == CtEvent.NEW)
        assert ct.is_dnat
        assert ct.mark == 0x2A5
        assert ct.backend == ("127.0.0.2", 8080)
        assert (addr(ct.orig_src), addr(ct.orig_dst), ct.orig_sport, ct.orig_dport) == \
            ("127.0.0.1", "127.0.0.5", cport, 80)
        (row,) = conntrack_list(ns, "-m", "0x2a5")
        assert row["orig"] == ("127.0.0.1", "127.0.0.5", cport, 80)
        assert row["reply"] == (addr(ct.reply_src), addr(ct.reply_dst), ct.reply_sport,
                                ct.reply_dport) == ("127.0.0.2", "127.0.0.1", 8080, cport)

        client.close()
        server.close()
        time.sleep(1.5)  # TIME_WAIT is 1 s in this namespace; listing reaps expired entries
        netns.run(ns, "conntrack", "-L")
        got = _wait_events(events, lambda g: any(ev == CtEvent.DESTROY for ev, _ in g))
        gone = [ct for ev, ct in got if ev == CtEvent.DESTROY]
        assert len(gone) == 1 and gone[0].key == ct.key and gone[0].mark == 0x2A5
        assert gone[0].backend == ("127.0.0.2", 8080)
    finally:
        events.close()
        listener.close()


def test_inserted_nat_translates_packets(ns: str) -> None:
    """An entry written by CtWriter DNATs real packets (UDP 127.0.0.5:53 → 127.0.0.2:5353)."""
    _nat_ruleset(ns)  # NAT hooks must be registered in the namespace for translation
    with netns.entered(ns):
        backend = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        backend.bind(("127.0.0.2", 5353))
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.bind(("127.0.0.1", 40053))
        e = CtEntry.make("127.0.0.1", 40053, "127.0.0.5", 53, "127.0.0.2", 5353,
                         l4proto=IPPROTO_UDP, mark=0x77, timeout=60)
        with CtWriter() as w:
            assert w.apply([("upsert", e)]).created == 1
    try:
        client.sendto(b"query", ("127.0.0.5", 53))
        backend.settimeout(3)
        data, peer = backend.recvfrom(100)
        assert data == b"query" and peer == ("127.0.0.1", 40053)
        backend.sendto(b"answer", peer)
        client.settimeout(3)
        data, peer = client.recvfrom(100)
        assert data == b"answer" and peer == ("127.0.0.5", 53)  # reply un-NATed too
    finally:
        backend.close()
        client.close()


def test_dump_with_and_without_mark_filter(ns: str) -> None:
    entries = make_entries(500, mark_of=lambda i: (0x200, 0x201, 0x1201)[i % 3])
    entries += make_entries(50, v6=True)
    with netns.entered(ns), CtWriter() as w:
        assert w.apply([("upsert", e) for e in entries]).created == 550
        everything = list(dump())
        only_201 = list(dump(mark=0x201))
        low_201 = list(dump(mark=0x201, mask=0xFFF))
        v6 = list(dump(family=socket.AF_INET6))
    assert {e.key for e in everything} == {e.key for e in entries}
    by_key = {e.key: e for e in entries}
    for got in everything:
        want = by_key[got.key]
        assert (got.reply_src, got.reply_sport, got.mark, got.tcp_state) == \
            (want.reply_src, want.reply_sport, want.mark, want.tcp_state)
        assert got.status & (IPS_ASSURED | IPS_SEEN_REPLY | IPS_DST_NAT) == \
            IPS_ASSURED | IPS_SEEN_REPLY | IPS_DST_NAT
    assert len(only_201) == len([e for e in entries if e.mark == 0x201])
    assert {e.mark for e in only_201} == {0x201}
    assert {e.mark for e in low_201} == {0x201, 0x1201}
    assert len(v6) == 50


def test_enobufs_overrun_is_reported(ns: str) -> None:
    n = 3000
    lines = [
        f"-A -t 600 -u ASSURED -s 10.2.{i >> 8}.{i & 255} -d 10.0.0.100 -r 10.0.1.1 "
        f"-q 10.2.{i >> 8}.{i & 255} -p tcp --sport {10000 + i} --dport 80 --reply-port-src 80 "
        f"--reply-port-dst {10000 + i} --state ESTABLISHED -m 0x200"
        for i in range(n)
    ]
    with netns.entered(ns):
        events = CtEventSocket(rcvbuf=16 << 10)
    try:
        with tempfile.NamedTemporaryFile("w") as f:
            f.write("\n".join(lines) + "\n")
            f.flush()
            netns.run(ns, "conntrack", "-R", f.name)
        total: list = []
        overrun = False
        while True:
            got = events.read()
            overrun |= got.overrun
            if not got and not got.overrun:
                break
            total += got
        assert overrun and events.stats.overruns >= 1
        assert 0 < len(total) < n
        # The socket still works after the overrun.
        netns.run(ns, "conntrack", "-D", "-s", "10.2.0.1")
        got = _wait_events(events, lambda g: len(g) >= 1)
        assert [(ev, addr(ct.orig_src)) for ev, ct in got] == [(CtEvent.DESTROY, "10.2.0.1")]
    finally:
        events.close()


def test_zones_are_distinct_entries(ns: str) -> None:
    base = make_entries(5)
    zoned = [decode_ct(encode_ct(e)) for e in base]
    for e in zoned:
        e.zone = 7
        e.mark = 0x700
    with netns.entered(ns):
        events = CtEventSocket()
        writer = CtWriter()
    try:
        res = writer.apply([("upsert", e) for e in base + zoned])
        assert (res.created, res.failed) == (10, [])
        out = netns.run(ns, "conntrack", "-L", "-o", "extended").stdout
        assert out.count("zone=7") == 5
        got = events.read()
        assert sorted(ct.zone for _, ct in got) == [0] * 5 + [7] * 5
        with netns.entered(ns):
            assert {(e.key, e.mark) for e in dump()} == \
                {(e.key, e.mark) for e in base + zoned}
        res = writer.apply([("delete", e) for e in zoned])
        assert res.deleted == 5
        rows = conntrack_list(ns)
        assert len(rows) == 5 and "zone=" not in netns.run(ns, "conntrack", "-L").stdout
    finally:
        events.close()
        writer.close()


def _icmp_echo(ident: int) -> bytes:
    hdr = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"nftsync!"  # even length
    total = sum(struct.unpack(f"!{len(hdr) // 2}H", hdr))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return hdr[:2] + struct.pack("!H", ~total & 0xFFFF) + hdr[4:]


def test_icmp_entries_are_decoded(ns: str) -> None:
    # Conntrack hooks are registered on demand: a rule that uses ct state turns tracking on.
    netns.run(ns, "nft", "add table inet t; add chain inet t out "
              "{ type filter hook output priority 0; ct state new accept; }")
    with netns.entered(ns):
        events = CtEventSocket(groups=1)  # NEW only
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    try:
        raw.sendto(_icmp_echo(0x4242), ("127.0.0.1", 0))
        got = _wait_events(events, lambda g: len(g) >= 1)
        (ev, ct), = got
        assert ev == CtEvent.NEW and ct.l4proto == 1
        assert (addr(ct.orig_src), addr(ct.orig_dst)) == ("127.0.0.1", "127.0.0.1")
        assert ct.orig_dport == 8 << 8  # echo request, code 0
        assert ct.orig_sport == 0x4242  # echo id
        assert ct.reply_dport == 0  # echo reply
        assert not ct.is_dnat and ct.tcp_state is None
        assert decode_ct(encode_ct(ct)).key == ct.key
    finally:
        events.close()
        raw.close()


def test_core_request_reports_kernel_errno(ns: str) -> None:
    """A GET of a missing entry answers ENOENT through NetlinkSocket.request."""
    from nftsync.netlink.core import NLM_F_ACK, NLM_F_REQUEST, NetlinkSocket
    from nftsync.netlink.ctnetlink import CT_GET, build_delete

    e = make_entries(1)[0]
    with netns.entered(ns):
        sock = NetlinkSocket()
    try:
        seq = sock.next_seq()
        msg = nlmsg(CT_GET, NLM_F_REQUEST | NLM_F_ACK, seq, nfgenmsg(e.family) + build_delete(e))
        with pytest.raises(NetlinkError) as exc:
            list(sock.request(msg, seq))
        assert exc.value.errno == 2
        with netns.entered(ns), CtWriter() as w:
            w.apply([("upsert", e)])
        seq = sock.next_seq()
        msg = nlmsg(CT_GET, NLM_F_REQUEST | NLM_F_ACK, seq, nfgenmsg(e.family) + build_delete(e))
        replies = list(sock.request(msg, seq))
        assert len(replies) == 1 and replies[0][0] == CT_NEW
    finally:
        sock.close()


def test_replicate_between_namespaces(ns: str) -> None:
    """dump on node A → wire form → CtWriter on node B gives B the same table (incl. full NAT)."""
    entries = make_entries(200) + make_entries(20, v6=True)
    fullnat = CtEntry.make("10.5.0.1", 33333, "10.0.0.100", 443, "10.0.1.9", 8443, mark=0x209)
    fullnat.reply_dst = ipaddress.ip_address("10.0.1.254").packed  # LB source address (SNAT)
    fullnat.reply_dport = 61000
    entries.append(fullnat)
    peer = netns.create("nst-peer")
    try:
        with netns.entered(ns), CtWriter() as w:
            assert w.apply([("upsert", e) for e in entries]).created == len(entries)
            wire = b"".join(encode_ct(e) for e in dump())
        received = [decode_ct(wire[off:off + CT_ENTRY_SIZE])
                    for off in range(0, len(wire), CT_ENTRY_SIZE)]
        with netns.entered(peer), CtWriter() as w:
            res = w.apply([("upsert", e) for e in received])
            assert (res.created, res.failed) == (len(entries), [])
            on_peer = list(dump())

        def view(rows: list[dict]) -> set:
            return {(r["orig"], r["reply"], r["mark"], r["state"], r["assured"]) for r in rows}

        assert view(conntrack_list(peer)) == view(conntrack_list(ns))
        got = next(e for e in on_peer if e.key == fullnat.key)
        assert got.is_dnat and got.is_snat
        assert got.status & IPS_DST_NAT and got.status & IPS_SRC_NAT
        assert (got.reply_dst, got.reply_dport) == (fullnat.reply_dst, 61000)
    finally:
        netns.delete(peer)
