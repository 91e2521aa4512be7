"""An authenticated asyncio connection to one peer: handshake, then MAC-tagged counted frames.

One task may call `recv()` at a time; any number of tasks may call `send()` (each frame is
built and written synchronously, so counters stay in wire order). Every failure closes the
connection: a peer that broke the protocol once is not trusted again on that connection.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
from collections.abc import Iterable
from dataclasses import dataclass

from nftsync.endpoint import format_endpoint
from nftsync.proto import auth
from nftsync.proto.auth import AuthError
from nftsync.proto.frames import (
    CAP_DEFAULT,
    HELLO_NO_NAME,
    HELLO_NO_NODE_ID,
    MESSAGE_CLASSES,
    Auth,
    AuthOk,
    FrameHeader,
    Hello,
    Message,
    MsgType,
    Refuse,
    RefuseReason,
    decode_payload,
    encode_frame,
    parse_header,
    verify_tag,
)
from nftsync.proto.wire import (
    FLAG_IGNORABLE,
    HEADER_LEN,
    MAX_HANDSHAKE_PAYLOAD,
    MAX_NAME,
    NONCE_LEN,
    PROTOCOL_VERSION,
    TAG_LEN,
    U32_MAX,
    VERSION_MAX,
    VERSION_MIN,
    ConnectionClosed,
    ProtocolError,
)

log = logging.getLogger("nftsync.proto")

#: Frames whose type may only appear during the handshake.
_HANDSHAKE_TYPES = frozenset({MsgType.HELLO, MsgType.AUTH, MsgType.AUTH_OK})
#: Version of the header of HELLO frames and of untagged handshake frames: frozen forever.
HANDSHAKE_HEADER_VERSION = 1
DEFAULT_HANDSHAKE_TIMEOUT = 10.0


class PeerRefused(ConnectionClosed):  # noqa: N818 - an event, like ConnectionClosed
    """The authenticated peer sent REFUSE and is closing; `reason` is a RefuseReason code."""

    def __init__(self, reason: int, text: str) -> None:
        name = RefuseReason.NAMES.get(reason, str(reason))
        super().__init__(f"peer closed the connection: {name}" + (f": {text}" if text else ""))
        self.reason = reason
        self.text = text


@dataclass(frozen=True, slots=True)
class Identity:
    """Who we are in the cluster. The cluster name is bound into the handshake's keys; node id
    and name are told in AUTH_OK, to a peer that proved the key. node_id: unique, non-zero."""

    cluster: str
    node_id: int
    node_name: str
    capabilities: int = CAP_DEFAULT

    def __post_init__(self) -> None:
        if not 0 < self.node_id <= U32_MAX:
            raise ValueError(f"node id must be 1..{U32_MAX}, got {self.node_id}")
        if not 0 <= self.capabilities <= U32_MAX:
            raise ValueError("capabilities must fit in 32 bits")
        for what, value in (("cluster name", self.cluster), ("node name", self.node_name)):
            if not 0 < len(value.encode("utf-8")) <= MAX_NAME:
                raise ValueError(f"{what} must be 1..{MAX_NAME} UTF-8 bytes")


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """The authenticated peer: its cluster (ours: its proof was keyed with it), node id and name
    from its AUTH_OK, capabilities from its HELLO, and what we negotiated."""

    cluster: str
    node_id: int
    node_name: str
    capabilities: int
    version: int
    we_initiated: bool
    address: tuple[str, int] | None


def _peername(writer: asyncio.StreamWriter) -> tuple[str, int] | None:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return (str(peer[0]), int(peer[1]))
    return None


async def _read_exact(reader: asyncio.StreamReader, n: int, frame_start: bool) -> bytes:
    try:
        return await reader.readexactly(n)
    except asyncio.IncompleteReadError as exc:
        if frame_start and not exc.partial:
            raise ConnectionClosed("peer closed the connection") from None
        raise ConnectionClosed("peer closed the connection in the middle of a frame") from None
    except (ConnectionError, ssl.SSLError) as exc:
        raise ConnectionClosed(f"connection lost: {exc}") from None


def _negotiate(hello: Hello) -> int:
    """The version to speak with the peer whose HELLO this is, or AuthError(BAD_VERSION).

    A HELLO holds nothing else to check: cluster and node id are checked after the proofs.
    """
    theirs = f"{hello.version_min}..{hello.version_max}"
    ours = f"{VERSION_MIN}..{VERSION_MAX}"
    if hello.version_min > hello.version_max:
        raise AuthError(f"peer advertised an empty protocol version range {theirs}",
                        RefuseReason.BAD_VERSION)
    common = min(VERSION_MAX, hello.version_max)
    if common < max(VERSION_MIN, hello.version_min):
        older = "the peer" if hello.version_max < VERSION_MIN else "this node"
        raise AuthError(f"peer speaks handshake v{theirs}, we speak v{ours}: upgrade nftsync "
                        f"on {older}", RefuseReason.BAD_VERSION,
                        refuse_text=f"unsupported protocol version: we speak v{ours}, you "
                                    f"v{theirs}; upgrade nftsync on the older node")
    return common


def _check_peer(mine: Identity, ok: AuthOk) -> None:
    """Checks on the identity an authenticated peer told us in its AUTH_OK."""
    if ok.node_id == HELLO_NO_NODE_ID:
        raise AuthError(f"peer {ok.node_name!r} uses the reserved node id 0",
                        RefuseReason.PROTOCOL_ERROR)
    if ok.node_id == mine.node_id:
        raise AuthError(f"peer {ok.node_name!r} uses our node id {mine.node_id}",
                        RefuseReason.SAME_NODE_ID)


# What a REFUSE tells the peer: the reason code and a fixed text, never our cluster name, node
# id or anything about the key. Before the peer proved the key the only refusals are
# BAD_VERSION, AUTH_FAILED and PROTOCOL_ERROR; SAME_NODE_ID comes after the proofs.
_REFUSE_TEXT = {
    RefuseReason.BAD_VERSION: f"unsupported protocol version (we speak v{VERSION_MIN}.."
                              f"{VERSION_MAX})",
    RefuseReason.AUTH_FAILED: "authentication failed",
    RefuseReason.SAME_NODE_ID: "node id is the same as ours",
    RefuseReason.PROTOCOL_ERROR: "protocol error",
}
#: What we really found -> what the peer is told. A wrong cluster name is refused as a wrong key:
#: otherwise an outsider could confirm a guessed name (docs/protocol.md "Handshake").
_PUBLIC_REASON = {RefuseReason.WRONG_CLUSTER: RefuseReason.AUTH_FAILED}


class _Handshake:
    """State of one handshake; both roles share the frame I/O and refusal handling."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 identity: Identity, key: bytes, initiator: bool) -> None:
        self.reader = reader
        self.writer = writer
        self.me = identity
        self.cluster_key = auth.cluster_key(key, identity.cluster)
        self.check_key = auth.check_key(key)
        self.initiator = initiator
        self.sent = 0  # our next frame counter
        self.received = 0  # peer's next frame counter
        self.nonce = secrets.token_bytes(NONCE_LEN)
        # Set once the peer proved the key: from then on our frames (a REFUSE too) are tagged.
        self.send_key: bytes | None = None
        self.version = HANDSHAKE_HEADER_VERSION

    async def send(self, msg: Message, key: bytes | None = None, version: int = 1) -> bytes:
        frame = encode_frame(msg, self.sent, key, version)
        self.sent += 1
        self.writer.write(frame)
        await self.writer.drain()
        return frame

    async def refuse(self, reason: int, text: str | None = None) -> None:
        """Tell the peer why, best effort: untagged while no session key is trusted, tagged
        once the peer proved the key (so nobody on the path can forge a later refusal)."""
        reason = _PUBLIC_REASON.get(reason, reason)
        msg = Refuse(reason, text if text is not None else _REFUSE_TEXT.get(reason, "refused"))
        try:
            if self.send_key is None:
                await self.send(msg)
            else:
                await self.send(msg, self.send_key, self.version)
        except (ConnectionError, ssl.SSLError) as exc:
            log.debug("could not send REFUSE: %s", exc)

    async def recv(self, allowed: tuple[int, ...], key: bytes | None = None,
                   version: int = HANDSHAKE_HEADER_VERSION,
                   tagged_refuse: bool = False) -> tuple[Message, bytes]:
        """Next handshake frame: one of `allowed`, or a REFUSE -> AuthError(remote). With `key`
        the frame must be tagged; a REFUSE too if `tagged_refuse` (the peer proved the key
        before it could refuse), else a REFUSE is untagged."""
        raw_hdr = await _read_exact(self.reader, HEADER_LEN, True)
        hdr = parse_header(raw_hdr)
        if hdr.length > MAX_HANDSHAKE_PAYLOAD:
            raise ProtocolError(f"handshake frame of {hdr.length} bytes exceeds the "
                                f"{MAX_HANDSHAKE_PAYLOAD} limit")
        tagged = key is not None and (hdr.type != MsgType.REFUSE or tagged_refuse)
        body = await _read_exact(self.reader, hdr.length + (TAG_LEN if tagged else 0), False)
        payload = body[:hdr.length]
        if tagged:
            assert key is not None
            verify_tag(key, raw_hdr, payload, body[hdr.length:])
        if hdr.counter != self.received:
            raise ProtocolError(f"handshake frame counter {hdr.counter}, "
                                f"expected {self.received}")
        self.received += 1
        if hdr.type == MsgType.REFUSE:
            ref = decode_payload(hdr.type, payload)
            assert isinstance(ref, Refuse)
            name = RefuseReason.NAMES.get(ref.reason, str(ref.reason))
            if ref.reason == RefuseReason.BAD_VERSION:
                raise AuthError(f"peer refused our protocol version v{VERSION_MIN}.."
                                f"{VERSION_MAX} ({ref.text}): upgrade nftsync on the older "
                                "node", ref.reason, remote=True)
            raise AuthError(f"peer refused us: {name}: {ref.text}", ref.reason, remote=True)
        if hdr.type == MsgType.HELLO:
            version = HANDSHAKE_HEADER_VERSION
        if hdr.version != version:
            raise AuthError(f"handshake frame has version {hdr.version}, expected {version}",
                            RefuseReason.BAD_VERSION)
        if hdr.type not in allowed:
            raise ProtocolError(f"unexpected message type {hdr.type} during the handshake")
        return decode_payload(hdr.type, payload), raw_hdr + payload

    def hello(self) -> Hello:
        """Our HELLO: versions, nonce, capabilities, and nothing that names us or the cluster."""
        return Hello(VERSION_MIN, VERSION_MAX, HELLO_NO_NAME, HELLO_NO_NODE_ID, HELLO_NO_NAME,
                     self.nonce, self.me.capabilities)

    async def run(self) -> Channel:
        try:
            return await (self._initiate() if self.initiator else self._respond())
        except AuthError as exc:
            if not exc.remote:
                await self.refuse(exc.reason, exc.refuse_text)
            raise
        except ProtocolError:
            await self.refuse(RefuseReason.PROTOCOL_ERROR)
            raise

    async def _initiate(self) -> Channel:
        my_hello = await self.send(self.hello())
        hello, peer_hello_frame = await self.recv((MsgType.HELLO,))
        assert isinstance(hello, Hello)
        self.version = _negotiate(hello)
        transcript = auth.transcript_hash(my_hello, peer_hello_frame)
        await self.send(Auth(auth.proof(self.cluster_key, transcript, initiator=True),
                             auth.key_check_proof(self.check_key, transcript)))
        proof_msg, _ = await self.recv((MsgType.AUTH,))
        assert isinstance(proof_msg, Auth)
        if proof_msg.key_check:
            raise ProtocolError("the responder's AUTH carries a key check")
        if not auth.check_proof(self.cluster_key, transcript, False, proof_msg.proof):
            raise AuthError("peer's proof is wrong: it does not hold our key and cluster name "
                            "(or reflected our proof)")
        k_i2r, k_r2i = auth.session_keys(self.cluster_key, self.nonce, hello.nonce, transcript)
        self.send_key = k_i2r
        await self.send(AuthOk(self.me.node_id, self.me.node_name), k_i2r, self.version)
        ok, _ = await self.recv((MsgType.AUTH_OK,), k_r2i, self.version, tagged_refuse=True)
        assert isinstance(ok, AuthOk)
        _check_peer(self.me, ok)
        return self._channel(hello, ok, k_i2r, k_r2i)

    async def _respond(self) -> Channel:
        hello, peer_hello_frame = await self.recv((MsgType.HELLO,))
        assert isinstance(hello, Hello)
        self.version = _negotiate(hello)
        my_hello = await self.send(self.hello())
        transcript = auth.transcript_hash(peer_hello_frame, my_hello)
        proof_msg, _ = await self.recv((MsgType.AUTH,))
        assert isinstance(proof_msg, Auth)
        if not proof_msg.key_check:
            raise ProtocolError("the initiator's AUTH lacks its key check")
        # Both checks always run, so a wrong key and a wrong cluster take the same path and
        # time up to the (identical) refusal; only our log tells them apart.
        proved = auth.check_proof(self.cluster_key, transcript, True, proof_msg.proof)
        key_right = auth.check_key_check_proof(self.check_key, transcript, proof_msg.key_check)
        if not proved:
            if key_right:
                raise AuthError("peer holds our key but not our cluster name (wrong cluster)",
                                RefuseReason.WRONG_CLUSTER)
            raise AuthError("peer's proof is wrong: it does not hold our key (wrong key)")
        # Only now do we prove ourselves, so a peer without the key never gets a proof of ours.
        await self.send(Auth(auth.proof(self.cluster_key, transcript, initiator=False)))
        k_i2r, k_r2i = auth.session_keys(self.cluster_key, hello.nonce, self.nonce, transcript)
        self.send_key = k_r2i
        # An untagged REFUSE may come instead: the initiator rejected our proof.
        ok, _ = await self.recv((MsgType.AUTH_OK,), k_i2r, self.version)
        assert isinstance(ok, AuthOk)
        _check_peer(self.me, ok)
        await self.send(AuthOk(self.me.node_id, self.me.node_name), k_r2i, self.version)
        return self._channel(hello, ok, k_r2i, k_i2r)

    def _channel(self, hello: Hello, ok: AuthOk, send_key: bytes, recv_key: bytes) -> Channel:
        peer = PeerInfo(self.me.cluster, ok.node_id, ok.node_name, hello.capabilities,
                        self.version, self.initiator, _peername(self.writer))
        return Channel(self.reader, self.writer, peer, send_key, recv_key, self.sent,
                       self.received)


class Channel:
    """An authenticated connection to one peer. Build with `connect()` or `accept()`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 peer: PeerInfo, send_key: bytes, recv_key: bytes, send_counter: int,
                 recv_counter: int) -> None:
        self._reader = reader
        self._writer = writer
        self.peer = peer
        self.version = peer.version
        self._send_key = send_key
        self._recv_key = recv_key
        self._send_counter = send_counter
        self._recv_counter = recv_counter
        self._closed = False
        self._pending: tuple[bytes, FrameHeader] | None = None

    @classmethod
    async def connect(cls, host: str, port: int, identity: Identity, key: bytes,
                      timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
                      ssl_context: ssl.SSLContext | None = None) -> Channel:
        """Open a TCP (optionally TLS) connection and authenticate; `timeout` bounds the two
        together (connect errors -> ConnectionClosed, handshake failures -> AuthError)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            async with asyncio.timeout_at(deadline):
                reader, writer = await asyncio.open_connection(host, port, ssl=ssl_context)
        except TimeoutError:
            raise ConnectionClosed(f"connecting to {format_endpoint(host, port)} timed out") \
                from None
        except (OSError, ssl.SSLError) as exc:
            raise ConnectionClosed(f"cannot connect to {format_endpoint(host, port)}: {exc}") \
                from None
        return await cls._handshake(reader, writer, identity, key, deadline - loop.time(),
                                    initiator=True)

    @classmethod
    async def accept(cls, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     identity: Identity, key: bytes,
                     timeout: float = DEFAULT_HANDSHAKE_TIMEOUT) -> Channel:
        """Authenticate a connection a server accepted (e.g. from asyncio.start_server)."""
        return await cls._handshake(reader, writer, identity, key, timeout, initiator=False)

    @classmethod
    async def _handshake(cls, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         identity: Identity, key: bytes, timeout: float,
                         initiator: bool) -> Channel:
        hs = _Handshake(reader, writer, identity, key, initiator)
        where = format_endpoint(_peername(writer))
        # A failed handshake is logged once, by the caller when it can: an inbound one by the
        # daemon's gate (rate-bounded: a flood of strangers must not flood the log), an
        # AuthError of a dial (a timeout is one) by the dialler, who knows the peer's name;
        # what else breaks a dial's handshake, here.
        level = logging.WARNING if initiator else logging.DEBUG
        try:
            async with asyncio.timeout(timeout):
                channel = await hs.run()
        except TimeoutError:
            writer.close()
            log.debug("peer %s: handshake timed out after %.1fs", where, timeout)
            raise AuthError(f"handshake timed out after {timeout:.1f}s",
                            RefuseReason.TIMEOUT) from None
        except AuthError as exc:
            writer.close()
            log.debug("peer %s: handshake failed: %s", where, exc)
            raise
        except (ProtocolError, ConnectionClosed) as exc:
            writer.close()
            log.log(level, "peer %s: handshake failed: %s", where, exc)
            raise
        except (ConnectionError, ssl.SSLError) as exc:
            writer.close()
            log.log(level, "peer %s: handshake failed: %s", where, exc)
            raise ConnectionClosed(f"connection lost during the handshake: {exc}") from None
        log.info("peer %s: authenticated as node %d (%s), protocol v%d", where,
                 channel.peer.node_id, channel.peer.node_name, channel.version)
        return channel

    @property
    def closed(self) -> bool:
        return self._closed

    def _frame(self, message: Message, flags: int) -> bytes:
        if message.TYPE in _HANDSHAKE_TYPES:
            raise ValueError(f"{type(message).__name__} is only valid during the handshake")
        frame = encode_frame(message, self._send_counter, self._send_key, self.version, flags)
        self._send_counter += 1
        return frame

    async def send(self, message: Message, flags: int = 0) -> None:
        """Send one message (ValueError if it cannot be encoded, e.g. a frame over 1 MiB)."""
        await self.send_many((message,), flags)

    async def send_many(self, messages: Iterable[Message], flags: int = 0) -> None:
        """Send several messages with one drain: fewer wakeups for snapshot chunks."""
        if self._closed:
            raise ConnectionClosed("channel is closed")
        start = self._send_counter
        try:
            frames = [self._frame(m, flags) for m in messages]
        except ValueError:
            self._send_counter = start  # nothing was written: keep counters in step with the wire
            raise
        try:
            self._writer.writelines(frames)
            await self._writer.drain()
        except (ConnectionError, ssl.SSLError) as exc:
            self.close()
            raise ConnectionClosed(f"connection lost: {exc}") from None

    async def _read_frame(self) -> tuple[FrameHeader, bytes]:
        """Read one tagged frame: size checked before reading the body, then tag, counter,
        version. The tag is checked before the counter so that a replayed frame (valid tag, old
        counter) is reported as such, and nothing unauthenticated is ever interpreted.

        Cancellation-safe: `readexactly` consumes nothing unless it completes, and a header
        already consumed is kept in `_pending` for the next call, so `wait_for(recv(), t)`
        timing out never desynchronises the stream.
        """
        if self._pending is None:
            raw_hdr = await _read_exact(self._reader, HEADER_LEN, True)
            self._pending = (raw_hdr, parse_header(raw_hdr))  # oversize raises here
        raw_hdr, hdr = self._pending
        body = await _read_exact(self._reader, hdr.length + TAG_LEN, False)
        self._pending = None
        payload = body[:hdr.length]
        verify_tag(self._recv_key, raw_hdr, payload, body[hdr.length:])
        if hdr.counter != self._recv_counter:
            raise ProtocolError(f"frame counter {hdr.counter}, expected {self._recv_counter}: "
                                "replayed, reordered or dropped frame")
        if hdr.version != self.version:
            raise ProtocolError(f"frame version {hdr.version}, negotiated {self.version}")
        self._recv_counter += 1
        return hdr, payload

    async def recv(self) -> Message:
        """Next message. Raises ProtocolError (connection now closed), PeerRefused or
        ConnectionClosed. Frames of unknown type flagged IGNORABLE are skipped. One task at a
        time; may be cancelled (e.g. by asyncio.wait_for) without losing stream position."""
        if self._closed:
            raise ConnectionClosed("channel is closed")
        while True:
            try:
                hdr, payload = await self._read_frame()
                if hdr.type not in MESSAGE_CLASSES:
                    if hdr.flags & FLAG_IGNORABLE:
                        continue
                    raise ProtocolError(f"unknown message type {hdr.type}")
                if hdr.type in _HANDSHAKE_TYPES:
                    raise ProtocolError(f"handshake message type {hdr.type} after the handshake")
                msg = decode_payload(hdr.type, payload)
            except ProtocolError as exc:
                log.warning("peer %d (%s): %s; closing", self.peer.node_id,
                            self.peer.node_name, exc)
                self._refuse_and_close(RefuseReason.PROTOCOL_ERROR, str(exc))
                raise
            except ConnectionClosed:
                self.close()
                raise
            if isinstance(msg, Refuse):
                self.close()
                raise PeerRefused(msg.reason, msg.text)
            return msg

    def _refuse_and_close(self, reason: int, text: str) -> None:
        if not self._closed and not self._writer.is_closing():
            try:
                self._writer.write(self._frame(Refuse(reason, text), 0))
            except (ConnectionError, ssl.SSLError) as exc:
                log.debug("could not send REFUSE: %s", exc)
        self.close()

    async def refuse(self, reason: int, text: str = "") -> None:
        """Tell the peer why we are closing (e.g. RefuseReason.SHUTDOWN), then close."""
        self._refuse_and_close(reason, text)
        await self.wait_closed()

    def close(self, refuse: int | None = None, text: str = "") -> None:
        """Close now; with a RefuseReason `refuse`, send the peer a REFUSE first (best effort:
        nothing waits for it to leave)."""
        if refuse is not None:
            self._refuse_and_close(refuse, text)
        elif not self._closed:
            self._closed = True
            self._writer.close()

    async def wait_closed(self) -> None:
        try:
            await self._writer.wait_closed()
        except (ConnectionError, ssl.SSLError) as exc:
            log.debug("peer %d: %s while closing", self.peer.node_id, exc)

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()

    def __repr__(self) -> str:
        return (f"<Channel peer={self.peer.node_id}:{self.peer.node_name} v{self.version} "
                f"{'closed' if self._closed else 'open'}>")


__all__ = ["Channel", "ConnectionClosed", "Identity", "PeerInfo", "PeerRefused",
           "PROTOCOL_VERSION"]
