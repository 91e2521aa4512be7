"""Nothing before proof (issue 13): what a peer that has not proved the key can learn from us.

Protocol v2 binds the cluster name into the proof keys and tells node ids and names only in the
tagged AUTH_OK frames, after both proofs. These tests look at every byte an outsider receives,
at the refusals a wrong key and a wrong cluster get (identical), at what our own log says
(which of the two), and at the new handshake messages written by hand, malformed or forged.
Loopback only, no root; every await bounded by `run()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from nftsync.proto import auth, frames
from nftsync.proto.auth import AuthError
from nftsync.proto.channel import Channel, Identity
from nftsync.proto.frames import Auth, AuthOk, Hello, Refuse, RefuseReason, decode_payload
from nftsync.proto.frames import encode_frame as enc
from nftsync.proto.wire import HEADER, MAGIC, ConnectionClosed, ProtocolError

KEY = bytes.fromhex("c3" * 4 + "1c2d3e4f5a6b7c8d9eafb0c1d2e3f405162738495a6b7c8d9eafb0c1")
OTHER_KEY = bytes(reversed(KEY))
CLUSTER = "secret-cluster-name"
SERVER = Identity(CLUSTER, 0x5EC0DE42, "hostname-of-lb2")
BOUND = 20.0

#: What must never reach a peer that did not prove the key.
SECRETS = (CLUSTER.encode(), SERVER.node_name.encode(), SERVER.node_id.to_bytes(4, "big"))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, BOUND))


@contextlib.asynccontextmanager
async def responder(identity: Identity = SERVER, key: bytes = KEY,
                    ) -> AsyncIterator[tuple[int, asyncio.Queue]]:
    """A listening peer; each accept's Channel or error goes to the queue."""
    results: asyncio.Queue = asyncio.Queue()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            ch = await Channel.accept(reader, writer, identity, key, 5.0)
        except (ProtocolError, ConnectionClosed) as exc:
            await results.put(exc)
            return
        await results.put(ch)
        ch.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield srv.sockets[0].getsockname()[1], results
    finally:
        srv.close()
        await srv.wait_closed()


async def _recording_proxy(port: int, received: bytearray,
                           closed: asyncio.Event) -> asyncio.Server:
    """Forward one connection to 127.0.0.1:port, keeping every byte the responder sends until
    it closes (then `closed` is set)."""
    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                   record: bytearray | None) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await src.read(65536):
                if record is not None:
                    record += data
                dst.write(data)
                await dst.drain()
        dst.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.gather(pipe(reader, up_w, None), pipe(up_r, writer, received))
        closed.set()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


@dataclass
class Outsider:
    """What a client saw of our responder: every byte, our error, its error."""

    received: bytes
    server_error: BaseException | Channel
    client_error: AuthError


def _outsider(identity: Identity, key: bytes) -> Outsider:
    async def main() -> Outsider:
        received = bytearray()
        closed = asyncio.Event()
        async with responder() as (port, results):
            proxy = await _recording_proxy(port, received, closed)
            async with proxy:
                pport = proxy.sockets[0].getsockname()[1]
                with pytest.raises(AuthError) as cerr:
                    await Channel.connect("127.0.0.1", pport, identity, key, timeout=5)
                serr = await results.get()
                await closed.wait()  # everything the responder sent, up to its close
        return Outsider(bytes(received), serr, cerr.value)

    return run(main())


def _frames(data: bytes) -> list[tuple[frames.FrameHeader, bytes]]:
    """Split untagged handshake frames."""
    out = []
    while data:
        hdr = frames.parse_header(data[:20])
        out.append((hdr, data[20:20 + hdr.length]))
        data = data[20 + hdr.length:]
    return out


def test_wrong_key_and_wrong_cluster_look_the_same_and_reveal_nothing() -> None:
    wrong_key = _outsider(Identity(CLUSTER, 7, "outsider"), OTHER_KEY)
    wrong_cluster = _outsider(Identity("nftsync", 7, "outsider"), KEY)
    seen = []
    for o in (wrong_key, wrong_cluster):
        for secret in SECRETS:
            assert secret not in o.received, (secret, o.received)
        got = _frames(o.received)
        # exactly our HELLO, then one untagged REFUSE, then the close
        assert [(h.type, h.counter, h.version) for h, _ in got] == [(1, 0, 1), (4, 1, 1)]
        hello = decode_payload(1, got[0][1])
        assert isinstance(hello, Hello)
        assert (hello.cluster, hello.node_id, hello.node_name) == ("-", 0, "-")
        assert decode_payload(4, got[1][1]) == Refuse(RefuseReason.AUTH_FAILED,
                                                      "authentication failed")
        # all but the HELLO's fresh nonce (payload bytes 10..41) must be equal
        seen.append(o.received[:30] + o.received[62:])
        assert o.client_error.reason == RefuseReason.AUTH_FAILED and o.client_error.remote
        assert CLUSTER not in str(o.client_error)
    assert seen[0] == seen[1]
    # ... while our own error says which it was
    assert isinstance(wrong_key.server_error, AuthError)
    assert isinstance(wrong_cluster.server_error, AuthError)
    assert wrong_key.server_error.reason == RefuseReason.AUTH_FAILED
    assert "wrong key" in str(wrong_key.server_error)
    assert wrong_cluster.server_error.reason == RefuseReason.WRONG_CLUSTER
    assert "wrong cluster" in str(wrong_cluster.server_error)


def test_an_initiator_tells_nothing_before_the_responder_proved_the_key() -> None:
    """A fake responder (e.g. a spoofed peer address) gets our HELLO and proofs, no names."""
    async def main() -> bytes:
        got = bytearray()
        done = asyncio.Event()

        async def fake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            got.extend(await reader.readexactly(20 + 44 + 2))  # HELLO ("-" and "-")
            writer.write(enc(Hello(2, 2, "-", 0, "-", os.urandom(32)), 0, None, version=1))
            got.extend(await reader.readexactly(20 + 64))  # AUTH: proof + key check
            writer.write(enc(Auth(os.urandom(32)), 1, None, version=1))  # a guessed proof
            got.extend(await reader.read())  # whatever comes until the close
            writer.close()
            done.set()

        srv = await asyncio.start_server(fake, "127.0.0.1", 0)
        async with srv:
            with pytest.raises(AuthError, match="proof is wrong"):
                await Channel.connect("127.0.0.1", srv.sockets[0].getsockname()[1], SERVER,
                                      KEY, timeout=5)
            await done.wait()
        return bytes(got)

    got = run(main())
    for secret in SECRETS:
        assert secret not in got
    assert [h.type for h, _ in _frames(got[:66])] == [1]
    assert [h.type for h, _ in _frames(got[66:66 + 84])] == [2]  # proof + key check
    assert decode_payload(4, got[66 + 84 + 20:]) == Refuse(RefuseReason.AUTH_FAILED,
                                                           "authentication failed")


def test_the_daemon_log_says_wrong_key_or_wrong_cluster(caplog) -> None:
    """Links (the daemon's) log the responder's finding; the initiator's says only refused."""
    from nftsync.daemon.config import DaemonConfig, PeerConfig
    from nftsync.daemon.links import Links
    from tests.unit.test_daemon_logs import _free_port, _Replicator, _until

    caplog.set_level(logging.INFO, logger="nftsync")

    async def attempt(cluster: str, key: bytes) -> None:
        p1, p2 = _free_port("127.0.0.1"), _free_port("127.0.0.1")
        stop = asyncio.Event()
        nodes = []
        for node_id, port, peers, cl, k in ((1, p1, [p2], cluster, key), (2, p2, [], CLUSTER,
                                                                             KEY)):
            cfg = DaemonConfig(k, node_id, f"lb{node_id}", listen_host="127.0.0.1",
                               listen_port=port, peers=[PeerConfig("127.0.0.1", p)
                                                        for p in peers], reconnect_min=30.0)
            nodes.append(Links(cfg, Identity(cl, node_id, f"lb{node_id}"), _Replicator(cfg),
                               stop))
        a, b = nodes
        await b.start()
        await a.start()
        try:
            await _until(lambda: a.auth_failures == 1 and b.auth_failures == 1, "failures")
        finally:
            stop.set()
            await a.close()
            await b.close()

    lines = {}
    for what, cluster, key in (("key", CLUSTER, OTHER_KEY), ("cluster", "nftsync", KEY)):
        caplog.clear()
        run(attempt(cluster, key))
        lines[what] = sorted(r.getMessage() for r in caplog.records
                             if r.levelno >= logging.ERROR)
    for what, other in (("key", "cluster"), ("cluster", "key")):
        responder_line, initiator_line = lines[what]
        assert responder_line.startswith("connection from 127.0.0.1:"), responder_line
        assert f"(wrong {what})" in responder_line and f"wrong {other}" not in responder_line
        assert initiator_line.endswith("authentication failed: peer refused us: auth_failed: "
                                       "authentication failed"), initiator_line


# -- the v2 messages by hand ---------------------------------------------------------------------

class Manual:
    """The initiator side written from docs/protocol.md, to send what Channel never would."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 key: bytes = KEY, cluster: str = CLUSTER) -> None:
        self.reader, self.writer = reader, writer
        self.ck, self.chk = auth.cluster_key(key, cluster), auth.check_key(key)
        self.nonce = os.urandom(32)

    async def read(self, tag_key: bytes | None = None) -> tuple[frames.FrameHeader, object]:
        raw = await self.reader.readexactly(20)
        hdr = frames.parse_header(raw)
        payload = await self.reader.readexactly(hdr.length)
        if tag_key is not None:
            frames.verify_tag(tag_key, raw, payload, await self.reader.readexactly(16))
        return hdr, decode_payload(hdr.type, payload)

    async def prove(self, key_check: bool = True) -> tuple[bytes, bytes]:
        """HELLO and AUTH; returns the session keys (i->r, r->i) once the responder proved."""
        mine = enc(Hello(2, 2, "-", 0, "-", self.nonce), 0, None, version=1)
        self.writer.write(mine)
        raw = await self.reader.readexactly(20)
        payload = await self.reader.readexactly(frames.parse_header(raw).length)
        theirs = decode_payload(1, payload)
        assert isinstance(theirs, Hello)
        t = auth.transcript_hash(mine, raw + payload)
        check = auth.key_check_proof(self.chk, t) if key_check else b""
        self.writer.write(enc(Auth(auth.proof(self.ck, t, True), check), 1, None, version=1))
        hdr, msg = await self.read()
        if not isinstance(msg, Auth):
            return b"", b""
        assert auth.check_proof(self.ck, t, False, msg.proof)
        return auth.session_keys(self.ck, self.nonce, theirs.nonce, t)


async def _manual(script) -> BaseException | Channel:
    async with responder() as (port, results):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            await script(Manual(reader, writer))
        finally:
            writer.close()
        return await results.get()


def test_same_node_id_is_refused_after_the_proofs_with_a_tagged_refuse() -> None:
    async def script(m: Manual) -> None:
        k_i2r, k_r2i = await m.prove()
        m.writer.write(enc(AuthOk(SERVER.node_id, "twin"), 2, k_i2r))
        hdr, msg = await m.read(tag_key=k_r2i)  # tagged: nobody on the path could forge it
        assert (hdr.counter, msg) == (2, Refuse(RefuseReason.SAME_NODE_ID,
                                                "node id is the same as ours"))
        assert await m.reader.read() == b""  # and never its AUTH_OK: closed

    err = run(_manual(script))
    assert isinstance(err, AuthError) and err.reason == RefuseReason.SAME_NODE_ID
    assert "twin" in str(err) and not err.remote


@pytest.mark.parametrize("case", ["no key check", "auth_ok untagged", "auth_ok bad tag",
                                  "auth_ok node id 0", "auth_ok empty", "auth_ok long name",
                                  "auth_ok before auth", "second hello"])
def test_malformed_v2_handshake_messages_are_refused(case: str) -> None:
    async def script(m: Manual) -> None:
        if case == "auth_ok before auth":
            m.writer.write(enc(Hello(2, 2, "-", 0, "-", m.nonce), 0, None, version=1))
            m.writer.write(enc(AuthOk(7, "x"), 1, os.urandom(32)))
            m.writer.write_eof()
            await m.reader.read()
            return
        if case == "no key check":
            await m.prove(key_check=False)
            m.writer.write_eof()
            await m.reader.read()
            return
        k_i2r, _ = await m.prove()
        if case == "auth_ok untagged":
            frame = enc(AuthOk(7, "x"), 2, None)
        elif case == "auth_ok bad tag":
            frame = enc(AuthOk(7, "x"), 2, os.urandom(32))
        elif case == "auth_ok node id 0":
            frame = enc(AuthOk(0, "x"), 2, k_i2r)
        elif case == "second hello":
            frame = enc(Hello(2, 2, "-", 0, "-", m.nonce), 2, k_i2r)
        else:
            payload = b"" if case == "auth_ok empty" else b"\x00\x00\x00\x07\x41" + b"n" * 65
            hdr = HEADER.pack(MAGIC, 2, AuthOk.TYPE, 0, len(payload), 2)
            frame = hdr + payload + frames.compute_tag(k_i2r, hdr, payload)
        m.writer.write(frame)
        m.writer.write_eof()  # an untagged frame leaves the responder waiting for its tag
        await m.reader.read()

    err = run(_manual(script))
    assert isinstance(err, (ProtocolError, ConnectionClosed)), err
    # refused at once for what it is, never after waiting for the deadline
    assert not isinstance(err, AuthError) or err.reason in (RefuseReason.PROTOCOL_ERROR,
                                                            RefuseReason.BAD_VERSION), err


def test_a_forged_untagged_refuse_after_the_proofs_is_not_believed() -> None:
    """Once the responder proved the key, its REFUSE must be tagged: an injected untagged
    SAME_NODE_ID would otherwise make the initiator log a lie."""
    async def main() -> None:
        async def fake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            raw = await reader.readexactly(20)
            payload = await reader.readexactly(frames.parse_header(raw).length)
            nonce = os.urandom(32)
            mine = enc(Hello(2, 2, "-", 0, "-", nonce), 0, None, version=1)
            writer.write(mine)
            t = auth.transcript_hash(raw + payload, mine)
            await reader.readexactly(20 + 64)
            ck = auth.cluster_key(KEY, CLUSTER)
            writer.write(enc(Auth(auth.proof(ck, t, False)), 1, None, version=1))
            # untagged, so the 16 bytes a tag would take are a random guess at one
            writer.write(enc(Refuse(RefuseReason.SAME_NODE_ID, "forged"), 2, None, version=1) +
                         os.urandom(16))
            await reader.read()
            writer.close()

        srv = await asyncio.start_server(fake, "127.0.0.1", 0)
        async with srv:
            with pytest.raises(ProtocolError) as err:
                await Channel.connect("127.0.0.1", srv.sockets[0].getsockname()[1],
                                      Identity(CLUSTER, 1, "lb1"), KEY, timeout=5)
            assert not isinstance(err.value, AuthError)
            assert "tag" in str(err.value)

    run(main())


def test_the_responder_auth_must_not_carry_a_key_check() -> None:
    async def main() -> None:
        async def fake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            raw = await reader.readexactly(20)
            payload = await reader.readexactly(frames.parse_header(raw).length)
            mine = enc(Hello(2, 2, "-", 0, "-", os.urandom(32)), 0, None, version=1)
            writer.write(mine)
            t = auth.transcript_hash(raw + payload, mine)
            await reader.readexactly(20 + 64)
            ck = auth.cluster_key(KEY, CLUSTER)
            writer.write(enc(Auth(auth.proof(ck, t, False), bytes(32)), 1, None, version=1))
            await reader.read()
            writer.close()

        srv = await asyncio.start_server(fake, "127.0.0.1", 0)
        async with srv:
            with pytest.raises(ProtocolError, match="key check"):
                await Channel.connect("127.0.0.1", srv.sockets[0].getsockname()[1],
                                      Identity(CLUSTER, 1, "lb1"), KEY, timeout=5)

    run(main())


def test_a_v1_responder_refuses_us_cleanly_and_we_say_upgrade() -> None:
    """A node of protocol v1 can still parse our HELLO (its layout is frozen) and refuses it
    with BAD_VERSION, as v1's code did: version first. We log what to do."""
    async def main() -> None:
        async def v1_node(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            raw = await reader.readexactly(20)
            hello = Hello.decode_payload(memoryview(
                await reader.readexactly(frames.parse_header(raw).length)))
            assert (hello.version_min, hello.version_max) == (2, 2)
            writer.write(enc(Refuse(RefuseReason.BAD_VERSION,
                                    "unsupported protocol version (we speak 1..1)"), 0, None,
                             version=1))
            await reader.read()
            writer.close()

        srv = await asyncio.start_server(v1_node, "127.0.0.1", 0)
        async with srv:
            with pytest.raises(AuthError) as err:
                await Channel.connect("127.0.0.1", srv.sockets[0].getsockname()[1],
                                      Identity(CLUSTER, 1, "lb1"), KEY, timeout=5)
        assert err.value.reason == RefuseReason.BAD_VERSION and err.value.remote
        assert str(err.value) == ("peer refused our protocol version v2..2 (unsupported "
                                  "protocol version (we speak 1..1)): upgrade nftsync on the "
                                  "older node")

    run(main())


def test_a_good_pair_learns_each_other_after_the_proofs() -> None:
    async def main() -> None:
        async with responder() as (port, results):
            client = await Channel.connect("127.0.0.1", port, Identity(CLUSTER, 1, "lb1"), KEY,
                                           timeout=5)
            srv = await results.get()
            assert isinstance(srv, Channel)
            assert (client.peer.node_id, client.peer.node_name, client.peer.cluster) == \
                (SERVER.node_id, SERVER.node_name, CLUSTER)
            assert (srv.peer.node_id, srv.peer.node_name) == (1, "lb1")
            assert client.version == srv.version == 2
            client.close()

    run(main())


def test_cluster_key_binds_the_name_and_the_key_check_does_not() -> None:
    assert auth.cluster_key(KEY, "a") != auth.cluster_key(KEY, "b")
    assert auth.cluster_key(KEY, "a") != auth.cluster_key(OTHER_KEY, "a")
    assert auth.check_key(KEY) != auth.check_key(OTHER_KEY)
    assert auth.check_key(KEY) not in (auth.cluster_key(KEY, "a"), KEY)
    t = auth.transcript_hash(b"i", b"r")
    p = auth.key_check_proof(auth.check_key(KEY), t)
    assert auth.check_key_check_proof(auth.check_key(KEY), t, p)
    assert not auth.check_key_check_proof(auth.check_key(OTHER_KEY), t, p)
    assert p != auth.proof(auth.cluster_key(KEY, "a"), t, True)
