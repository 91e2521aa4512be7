"""NODE_INFO (type 23): a peer's software version, told only after the handshake.

Codec (round trip, extension bytes, hostile lengths), and over real loopback channels: a
receiver that does not know type 23 (an nftsync of before this message) skips the frame because
it carries FLAG_IGNORABLE and goes on with the next one, and nothing of the version is in the
HELLO that an unauthenticated side receives.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from nftsync import __version__
from nftsync.proto import frames
from nftsync.proto.channel import Channel, Identity
from nftsync.proto.frames import Ack, Hello, MsgType, NodeInfo, decode_payload, encode_frame
from nftsync.proto.wire import FLAG_IGNORABLE, ProtocolError

KEY = bytes.fromhex("3c" * 8 + "0123456789abcdef" * 3)
A = Identity("lab", 1, "lb1")
B = Identity("lab", 2, "lb2")


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20.0))


def test_round_trip() -> None:
    for text in ("0.1.0", "1.2.3+deb12u1", "é" * 32):
        msg = NodeInfo(text)
        assert decode_payload(MsgType.NODE_INFO, msg.encode_payload()) == msg
    assert NodeInfo("0.1.0").encode_payload() == b"\x050.1.0"


def test_later_fields_are_ignored() -> None:
    assert decode_payload(MsgType.NODE_INFO, b"\x050.1.0" + b"\x00\x01later") == \
        NodeInfo("0.1.0")


@pytest.mark.parametrize("payload", [b"", b"\x00", b"\x05abc", b"\x41" + b"a" * 65,
                                     b"\x02\xff\xfe", b"\x020\n"])
def test_hostile_payloads(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_payload(MsgType.NODE_INFO, payload)


@pytest.mark.parametrize("text", ["", "x" * 65])
def test_out_of_range_is_not_sent(text: str) -> None:
    with pytest.raises(ValueError):
        encode_frame(NodeInfo(text), 0, KEY)


@contextlib.asynccontextmanager
async def channels():
    accepted: asyncio.Queue = asyncio.Queue()

    async def on_client(reader, writer):
        try:
            await accepted.put(await Channel.accept(reader, writer, B, KEY, timeout=5))
        except Exception as exc:  # noqa: BLE001 - handed to the test, which fails on it
            await accepted.put(exc)

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = await Channel.connect("127.0.0.1", port, A, KEY, timeout=5)
    srv = await accepted.get()
    assert isinstance(srv, Channel), srv
    try:
        yield client, srv
    finally:
        client.close()
        srv.close()
        server.close()
        await server.wait_closed()


def test_known_receiver_reads_it() -> None:
    async def main() -> None:
        async with channels() as (client, srv):
            await client.send(NodeInfo(__version__), FLAG_IGNORABLE)
            assert await srv.recv() == NodeInfo(__version__)

    run(main())


def test_receiver_without_type_23_skips_it(monkeypatch) -> None:
    """An older node: type 23 unknown. The frame is skipped (IGNORABLE), its counter and tag
    still checked, and the next frame arrives as usual: no version bump was needed."""
    async def main() -> None:
        async with channels() as (client, srv):
            monkeypatch.delitem(frames.MESSAGE_CLASSES, MsgType.NODE_INFO)
            await client.send(NodeInfo("9.9.9"), FLAG_IGNORABLE)
            await client.send(Ack(5))
            assert await srv.recv() == Ack(5)

    run(main())


def test_without_the_flag_an_older_receiver_would_close(monkeypatch) -> None:
    """Why the flag is needed: the same frame without it breaks an older node's connection."""
    async def main() -> None:
        async with channels() as (client, srv):
            monkeypatch.delitem(frames.MESSAGE_CLASSES, MsgType.NODE_INFO)
            await client.send(NodeInfo("9.9.9"))
            with pytest.raises(ProtocolError):
                await srv.recv()

    run(main())


def test_hello_tells_no_version() -> None:
    """What an unauthenticated side sees of us: the HELLO, which holds no software version."""
    hello = Hello(2, 2, "-", 0, "-", bytes(32))  # all a v2 HELLO holds besides the nonce
    assert __version__.encode() not in hello.encode_payload()
