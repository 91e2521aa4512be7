"""The node's peer links: dial the configured peers, accept inbound ones, keep one connection per
peer, and fan local changes out to every link's send queue.

Both sides of a pair dial each other (either may start first); when both connections complete,
the one the lower node id initiated is kept and the other is refused as DUPLICATE_PEER
(docs/protocol.md, "Overview"). What runs over a connection is peer.PeerLink's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from nftsync.endpoint import format_endpoint
from nftsync.errors import NftsyncError
from nftsync.proto import (
    AuthError,
    Channel,
    ConnectionClosed,
    Identity,
    ProtocolError,
    Record,
    RefuseReason,
    ResyncRequest,
)

from .config import DaemonConfig
from .gate import Gate, GatedListener, Ticket
from .peer import PeerLink, Replicator, record_key
from .tls import TlsSettings, describe_failure, start_server_tls, tls_failure

log = logging.getLogger("nftsync.daemon")


class Links:
    """Every peer link of this node: dialled ones by configured name, and inbound ones."""

    def __init__(self, config: DaemonConfig, identity: Identity, replicator: Replicator,
                 stop: asyncio.Event) -> None:
        self.config = config
        self.identity = identity
        self.replicator = replicator
        self.stop = stop
        self.dialled: dict[str, PeerLink] = {}
        self.inbound: list[PeerLink] = []
        self.auth_failures = 0
        # Node id -> when a snapshot of that peer was last in our kernel (its first one since
        # the start ends our wait for it: the `syncing` health, docs/daemon.md "Health").
        self.synced: dict[int, float] = {}
        # Inbound connections until they prove the key: caps, deadline, fd budget, counts.
        self.gate = Gate()
        self._listener: GatedListener | None = None
        # Mutual TLS (None: plain TCP). Turned on or off only by a restart; a reload re-reads
        # the files (set_peers), for the connections made from then on.
        self.tls: TlsSettings | None = config.tls

    def all(self) -> list[PeerLink]:
        return [*self.dialled.values(), *self.inbound]

    def _applied(self, link: PeerLink, node_id: int) -> None:
        self.synced[node_id] = time.monotonic()

    def awaited(self, in_grace: bool) -> tuple[list[str], int, int]:
        """Whose state this node is still waiting for: (one line per awaited peer, peers whose
        snapshot is in our kernel, peers counted). A configured peer is awaited while it is
        connected (directly or by its own inbound connection) and its first snapshot since our
        start is not in our kernel yet, or while `in_grace` (the first moments after we began
        listening) if it has not connected yet; one that stays away past the grace is not
        awaited: it is down, which health says as `degraded`. A peer that dialled us without
        being configured is awaited while it is connected, until its snapshot is in."""
        waiting: list[str] = []
        done = total = 0
        configured: set[int] = set()
        for link in self.dialled.values():
            total += 1
            if link.node_id is not None:
                configured.add(link.node_id)
                if link.node_id in self.synced:
                    done += 1
                    continue
            serving = self._serving(link) if link.state == "served" else None
            live = serving or link
            if live.state == "up":
                waiting.append(f"peer {link.name}: {live.snapshot_progress()}")
            elif in_grace:
                waiting.append(f"peer {link.name}: not connected yet"
                               + (f" ({link.last_error})" if link.last_error else ""))
        for link in self.inbound:
            if link.node_id is None or link.node_id in configured or link.state != "up":
                continue
            total += 1
            if link.node_id in self.synced:
                done += 1
            else:
                waiting.append(f"peer {link.name}: {link.snapshot_progress()}")
        return waiting, done, total

    def enqueue(self, rec: Record) -> None:
        """A local change, for every peer (the queues coalesce by key)."""
        qkey = record_key(rec)
        for link in self.all():
            link.enqueue(qkey, rec)

    # -- life cycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.config
        self.gate.set_peers(p.host for p in cfg.peers)
        try:
            self._listener = GatedListener(self.gate, cfg.listen_host, cfg.listen_port,
                                           self._accept)
            self._listener.start()
        except OSError as exc:
            raise NftsyncError(f"cannot listen on "
                               f"{format_endpoint(cfg.listen_host, cfg.listen_port)}: "
                               f"{exc.strerror}") from None
        for peer in cfg.peers:
            self.add_dialer(str(peer), peer.host, peer.port)

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
        dialers = []
        for link in self.all():
            link.close("stopping", RefuseReason.SHUTDOWN)
            if link.dialer is not None:
                link.dialer.cancel()
                dialers.append(link.dialer)
        await asyncio.gather(*dialers, return_exceptions=True)

    def set_peers(self, config: DaemonConfig) -> tuple[list[str], list[str]]:
        """A reload: dial the peers that were added, drop those that were removed."""
        self.config = config
        self.gate.set_peers(p.host for p in config.peers)
        if (config.tls is None) != (self.tls is None):
            log.warning("TLS on the sync link is turned %s only on restart; still %s",
                        "off" if config.tls is None else "on",
                        "plain TCP" if self.tls is None else "TLS")
        else:
            self.tls = config.tls
        old = set(self.dialled)
        new = {str(p): p for p in config.peers}
        for name in old - set(new):
            link = self.dialled.pop(name)
            link.close("removed from the configuration")
            if link.dialer:
                link.dialer.cancel()
        for name in set(new) - old:
            self.add_dialer(name, new[name].host, new[name].port)
        return sorted(set(new) - old), sorted(old - set(new))

    async def resync(self, peer: str | None = None) -> list[str]:
        """Ask `peer` (a name, node name or node id; every peer if None) for a new snapshot,
        and send ours."""
        links = [lk for lk in self.all() if peer is None or peer in
                 (lk.name, lk.node_name, str(lk.node_id))]
        if peer is not None and not links:
            raise NftsyncError(f"no peer {peer!r} (peers: "
                               f"{', '.join(lk.name for lk in self.all()) or 'none'})")
        done = []
        for lk in links:
            if lk.channel is None:
                continue
            lk.request_snapshot("operator resync")
            await lk.channel.send(ResyncRequest(RefuseReason.OPERATOR, "operator resync"))
            done.append(lk.name)
        return done

    # -- dialling and accepting ----------------------------------------------------------------
    def add_dialer(self, name: str, host: str, port: int) -> None:
        link = PeerLink(self.replicator, name, host, port, on_applied=self._applied)
        self.dialled[name] = link
        link.dialer = asyncio.create_task(self._dial(link))

    async def _dial(self, link: PeerLink) -> None:
        delay = self.config.reconnect_min
        while not self.stop.is_set():
            cfg = self.config
            if link.channel is not None:  # the peer dialled us: that connection serves
                await self._pause(cfg.reconnect_min)
                continue
            if self._serving(link) is not None:  # ... or did, and that is an inbound link
                link.state, link.last_error = "served", ""
                await self._pause(cfg.reconnect_min)
                continue
            link.state = "connecting"
            try:
                ch = await Channel.connect(link.host, link.port, self.identity, cfg.key,
                                           timeout=max(2.0, cfg.peer_timeout),
                                           ssl_context=self.tls and self.tls.client)
            except AuthError as exc:
                link.stats.auth_failures += 1
                self.auth_failures += 1
                link.last_error = f"authentication failed: {exc}"
                log.error("peer %s: %s", link.name, link.last_error)
            except (ConnectionClosed, ProtocolError, OSError) as exc:
                error = str(exc)
                if self.tls is not None and tls_failure(exc):
                    error = f"TLS: {describe_failure(exc, link.host)}"
                    if error != link.last_error:  # once, not at every redial
                        log.error("peer %s: %s", link.name, error)
                link.last_error = error
            else:
                link.node_id = ch.peer.node_id  # who this address is, from now on
                other = self._serving(link)
                if self._duplicate(ch, link) or (other is not None and
                                                 self._duplicate(ch, other)):
                    await ch.refuse(RefuseReason.DUPLICATE_PEER)
                    if other is not None:  # the peer's own connection serves: no redial
                        link.state, link.last_error = "served", ""
                        await self._pause(cfg.reconnect_min)
                        continue
                else:
                    delay = cfg.reconnect_min
                    await link.take_over(ch)  # the peer's own dial may have won meanwhile
            link.state = "down"
            await self._pause(delay)
            delay = min(self.config.reconnect_max, delay * 2)

    async def _pause(self, seconds: float) -> None:
        """Sleep, but return at once when the daemon stops."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.stop.wait()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      ticket: Ticket) -> None:
        """An inbound connection the gate admitted (daemon/gate.py): everything before the key
        is proved runs within the gate's deadline, and a failure is one line (rate-bounded)."""
        peername = writer.get_extra_info("peername")
        try:
            async with asyncio.timeout(self.gate.deadline):
                if self.tls is not None:  # unauthenticated too: within the gate's deadline
                    await start_server_tls(writer, self.tls)
                ch = await Channel.accept(reader, writer, self.identity, self.config.key,
                                          timeout=self.gate.deadline)
        except (AuthError, ConnectionClosed, ProtocolError, OSError) as exc:
            writer.close()  # after the REFUSE the handshake sent, if any
            if isinstance(exc, (AuthError, TimeoutError)):
                self.auth_failures += 1
            self.gate.failed(ticket, exc)
            return
        self.gate.passed(ticket)
        link = next((lk for lk in self.all() if lk.node_id == ch.peer.node_id), None)
        if link is not None and self._duplicate(ch, link):
            await ch.refuse(RefuseReason.DUPLICATE_PEER)
            return
        if link is None:
            link = PeerLink(self.replicator, f"{ch.peer.node_name}@{peername[0]}",
                            on_applied=self._applied)
            self.inbound.append(link)
        try:
            # The new connection wins (the old one is half-dead, or loses the tie-break).
            await link.take_over(ch)
        finally:
            if link in self.inbound and link.channel is None:
                self.inbound.remove(link)

    def _serving(self, link: PeerLink) -> PeerLink | None:
        """The inbound link (if any) that serves the node `link` dials, over a connection the
        peer opened: when the higher node id starts first, the lower one's dial arrives before
        the higher one's dialer ever reached it, and becomes an inbound link."""
        if link.node_id is None:
            return None
        return next((lk for lk in self.inbound if lk.node_id == link.node_id and
                     lk.channel is not None and not lk.channel.closed), None)

    def _duplicate(self, ch: Channel, link: PeerLink) -> bool:
        """Both sides dialled: keep the connection that the lower node id initiated."""
        if link.channel is None or link.channel.closed:
            return False
        lower_initiated = ch.peer.we_initiated == (self.identity.node_id < ch.peer.node_id)
        return not lower_initiated
