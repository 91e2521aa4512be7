"""HaproxyPeer's session against a scripted HAProxy on 127.0.0.1 (no root): the hello and its
refusals, acks, resyncs both ways, pushes (bounded queue), heartbeats, a dropped bad session.
The real HAProxy: tests/kernel/test_l7_haproxy_peer.py."""

from __future__ import annotations

import asyncio
import socket

import pytest

from nftsync.l7 import peerproto as pp
from nftsync.l7.haproxy import HaproxyPeer, StickTable, StickUpdate

WEB = pp.TableDef(1, "web", pp.KEY_IPV4, 4, (1 << 0) | (1 << 2) | (1 << 19), 1_800_000)
HELLO = pp.Hello("2.1", "nftsync", "lb1", 4242, 1)


class FakeHaproxy:
    """The dialling side, driven by the test."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.frames = pp.FrameDecoder()
        self.got: list[pp.Message] = []

    @classmethod
    async def dial(cls, peer: HaproxyPeer, hello: pp.Hello = HELLO) -> tuple[FakeHaproxy, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", peer.port)
        writer.write(pp.encode_hello(hello))
        status = await asyncio.wait_for(reader.readline(), 5)
        return cls(reader, writer), status

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def until(self, pred, seconds: float = 5.0) -> list[pp.Message]:
        async def loop() -> list[pp.Message]:
            while not pred(self.got):
                data = await self.reader.read(65536)
                if not data:
                    raise EOFError("peer closed")
                self.got += self.frames.feed(data)
            return self.got
        return await asyncio.wait_for(loop(), seconds)


def has(cls: int, typ: int):
    return lambda got: any((m.cls, m.type) == (cls, typ) for m in got)


def make_peer(**kw) -> tuple[HaproxyPeer, list[StickUpdate], dict[str, list[StickUpdate]]]:
    seen: list[StickUpdate] = []
    held: dict[str, list[StickUpdate]] = {}
    peer = HaproxyPeer("127.0.0.1", 0, "nftsync", "lb1", seen.append,
                       lambda t: held.get(t, []), **kw)
    return peer, seen, held


def run(coro) -> None:
    asyncio.run(asyncio.wait_for(coro, 20))


@pytest.mark.parametrize("host", ["10.0.0.1", "0.0.0.0", "::", "lb.example"])
def test_only_loopback(host: str) -> None:
    with pytest.raises(ValueError, match="127.0.0.1|not an IP"):
        make_peer_at(host)


def make_peer_at(host: str) -> HaproxyPeer:
    return HaproxyPeer(host, 10001, "nftsync", "lb1", lambda u: None, lambda t: [])


@pytest.mark.parametrize("hello,status", [
    (pp.Hello("2.1", "someone", "lb1"), b"503\n"),
    (pp.Hello("2.1", "nftsync", "lb2"), b"504\n"),
    (pp.Hello("2.0", "nftsync", "lb1"), b"502\n"),
])
def test_hello_refused(hello: pp.Hello, status: bytes) -> None:
    async def main() -> None:
        peer, _, _ = make_peer()
        await peer.start()
        try:
            fake, got = await FakeHaproxy.dial(peer, hello)
            assert got == status
            assert await fake.reader.read() == b""  # and hung up
            st = peer.stats()
            assert st["refused"] == 1 and st["connects"] == 0 and not st["connected"]
            assert status.decode().strip() in st["last_error"]
        finally:
            await peer.close()
    run(main())


def test_updates_acks_and_our_resync_request() -> None:
    async def main() -> None:
        peer, seen, _ = make_peer()
        await peer.start()
        try:
            fake, status = await FakeHaproxy.dial(peer)
            assert status == b"200\n"
            await fake.until(has(pp.CLASS_CONTROL, pp.CTRL_RESYNCREQ))  # nftsync asks
            tx = pp.TxDictCache()
            fake.send(pp.encode_define(WEB))
            for i, srv in ((7, "be1"), (8, "be2"), (9, "be1")):
                fake.send(pp.encode_update(WEB, i, socket.inet_aton(f"10.0.0.{i}"),
                                           expire_ms=60_000 if i == 9 else None, server_id=i,
                                           server_key=srv, cache=tx))
            fake.send(pp.control(pp.CTRL_RESYNCFINISHED))
            got = await fake.until(lambda g: any(m.type == pp.STKT_ACK
                                                 and pp.decode_ack(m.payload) == (1, 9)
                                                 for m in g)
                                   and has(pp.CLASS_CONTROL, pp.CTRL_RESYNCCONFIRM)(g))
            assert got
            assert seen == [StickUpdate("web", socket.inet_aton("10.0.0.7"), 7, "be1", None),
                            StickUpdate("web", socket.inet_aton("10.0.0.8"), 8, "be2", None),
                            StickUpdate("web", socket.inet_aton("10.0.0.9"), 9, "be1", 60_000)]
            assert peer.tables == {"web": StickTable("web", "ip", 4, 1_800_000)}
            st = peer.stats()
            assert st["updates_received"] == 3 and st["resyncs_requested"] == 1
            assert st["connected"] and st["haproxy_pid"] == 4242
        finally:
            await peer.close()
    run(main())


def test_haproxy_resync_request_served_and_pushes() -> None:
    async def main() -> None:
        peer, seen, held = make_peer(max_pending=3)
        held["web"] = [StickUpdate("web", socket.inet_aton("10.1.0.1"), 2, "be2", 45_000),
                       StickUpdate("web", socket.inet_aton("10.1.0.2"), 1, "be1", None)]
        # Queued before HAProxy is there: 5 keys, bound 3 -> the 2 oldest dropped.
        peer.push([StickUpdate("web", socket.inet_aton(f"10.2.0.{i}"), 1, "be1", 10_000)
                   for i in range(5)])
        await peer.start()
        try:
            fake, _ = await FakeHaproxy.dial(peer)
            fake.send(pp.control(pp.CTRL_RESYNCREQ))  # a new HAProxy asks
            fake.send(pp.encode_define(WEB))
            fake.send(pp.control(pp.CTRL_RESYNCPARTIAL))  # its own (empty) lesson
            await fake.until(has(pp.CLASS_CONTROL, pp.CTRL_RESYNCFINISHED))
            got = await fake.until(lambda g: sum(m.type in pp.UPDATE_TYPES for m in g) >= 5)
            defines = [pp.decode_define(m.payload) for m in got if m.type == pp.STKT_DEFINE]
            # Our DEFINE: HAProxy's type and length, only the stickiness data types.
            assert defines == [pp.TableDef(1, "web", pp.KEY_IPV4, 4, 0x80001, 1_800_000)]
            rx = pp.RxDictCache()
            ups, last = [], 0
            for m in got:
                if m.type in pp.UPDATE_TYPES:
                    u = pp.decode_update(m.type, m.payload, defines[0], rx, last)
                    ups.append(u)
                    last = u.update_id
            assert [(u.key, u.server_id, u.server_key, u.expire_ms) for u in ups] == [
                (socket.inet_aton("10.1.0.1"), 2, "be2", 45_000),
                (socket.inet_aton("10.1.0.2"), 1, "be1", 1_800_000),  # None: table expire
                *[(socket.inet_aton(f"10.2.0.{i}"), 1, "be1", 10_000) for i in (2, 3, 4)]]
            # The snapshot comes before RESYNCFINISHED, the queue after it.
            kinds = [(m.cls, m.type) for m in got]
            fin = kinds.index((pp.CLASS_CONTROL, pp.CTRL_RESYNCFINISHED))
            assert sum(t in pp.UPDATE_TYPES for _, t in kinds[:fin]) == 2
            fake.send(pp.encode_ack(1, ups[-1].update_id))
            await asyncio.sleep(0.2)
            st = peer.stats()
            assert st["resyncs_served"] == 1 and st["updates_pushed"] == 5
            assert st["pushes_dropped"] == 2 and st["pending_pushes"] == 0
            assert st["acks_received"] == 1 and seen == []  # nothing echoed to on_update
        finally:
            await peer.close()
    run(main())


def test_bad_message_drops_the_session_not_the_peer() -> None:
    async def main() -> None:
        peer, _, _ = make_peer()
        await peer.start()
        try:
            fake, _ = await FakeHaproxy.dial(peer)
            fake.send(pp.encode_message(pp.CLASS_STICKTABLE, pp.STKT_UPDATE, b"\x00" * 9))
            with pytest.raises(EOFError):
                await fake.until(lambda g: False)
            assert (pp.CLASS_ERROR, pp.ERR_PROTOCOL) in [(m.cls, m.type) for m in fake.got]
            st = peer.stats()
            assert st["bad_messages"] == 1 and "before any table" in st["last_error"]
            fake2, status = await FakeHaproxy.dial(peer)  # still listening
            assert status == b"200\n"
            fake2.writer.close()
        finally:
            await peer.close()
    run(main())


def test_heartbeats_and_silence() -> None:
    async def main() -> None:
        peer, _, _ = make_peer(heartbeat_s=0.2, silence_s=0.8, request_resync=False)
        await peer.start()
        try:
            fake, _ = await FakeHaproxy.dial(peer)
            await fake.until(lambda g: sum(m.type == pp.CTRL_HEARTBEAT for m in g) >= 2)
            with pytest.raises(EOFError):
                await fake.until(lambda g: False)  # silent HAProxy: dropped
            st = peer.stats()
            assert "silent" in st["last_error"] and not st["connected"]
        finally:
            await peer.close()
    run(main())


def test_new_session_replaces_the_old() -> None:
    async def main() -> None:
        peer, _, _ = make_peer()
        await peer.start()
        try:
            old, _ = await FakeHaproxy.dial(peer, pp.Hello("2.1", "nftsync", "lb1", 1))
            new, _ = await FakeHaproxy.dial(peer, pp.Hello("2.1", "nftsync", "lb1", 2))
            with pytest.raises(EOFError):
                await old.until(lambda g: False)
            await asyncio.sleep(0.05)
            st = peer.stats()
            assert st["connected"] and st["haproxy_pid"] == 2 and st["connects"] == 2
            new.writer.close()
        finally:
            await peer.close()
    run(main())
