#!/usr/bin/env python3
"""A lab backend: answers every request with its own name, so a client sees which backend the load
balancer picked.

One process, one thread, one `selectors` loop for all ports and both address families: a lab
starts one per backend namespace, and start-up time and per-connection cost both stay small when a
test fires hundreds of short connections. Standard library only (it runs with any python3).

- TCP 60, 80, 443, 8080: reads one line (a full HTTP request or any single line), answers
  `HTTP/1.0 200 OK` with body `<name>\\n`, then closes its side and drains the client's.
- UDP 60, 5353: answers `<name>\\n` to every datagram.
- TCP 7000: a stream of lines `<name> <n>\\n`, n = 1, 2, 3, ..., one every 20 ms, until the client
  closes or 300 s have passed; tests use it to see that a long-lived connection survives a failover
  with no gap and no reset.
"""

from __future__ import annotations

import argparse
import os
import selectors
import socket
import sys
import time
from dataclasses import dataclass, field

HTTP_PORTS = (60, 80, 443, 8080)
UDP_PORTS = (60, 5353)
STREAM_PORT = 7000
STREAM_INTERVAL = 0.020
STREAM_MAX_SECONDS = 300.0
REQUEST_MAX = 8192  # bytes read before answering anyway: a request is never parsed beyond a line
IDLE_MAX = 10.0  # seconds a short connection may sit silent before it is dropped
STREAM_BACKLOG_MAX = 65536  # unsent stream bytes: beyond this the client is not reading; drop it
LISTEN_BACKLOG = 1024


@dataclass(slots=True)
class Conn:
    """One accepted connection and what it still has to do."""

    sock: socket.socket
    kind: str  # "http" or "stream"
    started: float
    last: float
    buf: bytearray = field(default_factory=bytearray)
    out: bytearray = field(default_factory=bytearray)
    answered: bool = False
    n: int = 0  # stream: last line number sent


class Backend:
    def __init__(self, name: str) -> None:
        self.name = name
        self.body = f"{name}\n".encode()
        self.http_reply = (
            b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
            + f"Content-Length: {len(self.body)}\r\n\r\n".encode()
            + self.body
        )
        self.sel = selectors.DefaultSelector()
        self.conns: dict[int, Conn] = {}
        self.streams: dict[int, Conn] = {}
        self.next_idle_check = 0.0

    # --- sockets -------------------------------------------------------------------------------
    def bind_all(self) -> None:
        for family, any_addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            for port in (*HTTP_PORTS, STREAM_PORT):
                s = self._sock(family, socket.SOCK_STREAM)
                s.bind((any_addr, port))
                s.listen(LISTEN_BACKLOG)
                kind = "stream" if port == STREAM_PORT else "http"
                self.sel.register(s, selectors.EVENT_READ, ("listen", kind))
            for port in UDP_PORTS:
                s = self._sock(family, socket.SOCK_DGRAM)
                s.bind((any_addr, port))
                self.sel.register(s, selectors.EVENT_READ, ("udp", None))

    @staticmethod
    def _sock(family: int, type_: int) -> socket.socket:
        s = socket.socket(family, type_)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # Separate v4 and v6 sockets: a v4-mapped peer address would confuse the logs.
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.setblocking(False)
        return s

    # --- event loop ----------------------------------------------------------------------------
    def run(self) -> None:
        while True:
            now = time.monotonic()
            timeout = self._tick(now)
            for key, events in self.sel.select(timeout):
                role, arg = key.data  # ("listen", kind) | ("udp", None) | ("conn", fd)
                if role == "listen":
                    self._accept(key.fileobj, arg)
                elif role == "udp":
                    self._udp(key.fileobj)
                else:
                    self._conn_event(arg, events)

    def _tick(self, now: float) -> float:
        """Send due stream lines, drop idle or expired connections; return the select timeout."""
        wait = 1.0
        for fd, c in list(self.streams.items()):
            if now - c.started >= STREAM_MAX_SECONDS:
                self._close(fd)
                continue
            due = int((now - c.started) / STREAM_INTERVAL) + 1
            if due > c.n:
                c.out += b"".join(f"{self.name} {i}\n".encode() for i in range(c.n + 1, due + 1))
                c.n = due
                if not self._flush(fd, c):
                    continue
            wait = min(wait, c.started + c.n * STREAM_INTERVAL - now)
        if now >= self.next_idle_check:  # once a second, not per event: cheap under load
            self.next_idle_check = now + 1.0
            for fd, c in list(self.conns.items()):
                if c.kind == "http" and now - c.last > IDLE_MAX:
                    self._close(fd)
        return max(wait, 0.0)

    def _accept(self, lsock: socket.socket, kind: str) -> None:
        for _ in range(64):  # accept a burst, but let other sockets have a turn
            try:
                s, _peer = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # e.g. EMFILE: say so, keep serving the others
                print(f"{self.name}: accept: {e}", file=sys.stderr)
                return
            s.setblocking(False)
            now = time.monotonic()
            c = Conn(s, kind, now, now)
            fd = s.fileno()
            self.conns[fd] = c
            self.sel.register(s, selectors.EVENT_READ, ("conn", fd))
            if kind == "stream":
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.streams[fd] = c

    def _udp(self, s: socket.socket) -> None:
        for _ in range(64):
            try:
                _data, peer = s.recvfrom(REQUEST_MAX)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # an ICMP error from an earlier reply, reported on this socket
                print(f"{self.name}: udp: {e}", file=sys.stderr)
                continue
            try:
                s.sendto(self.body, peer)
            except OSError as e:
                print(f"{self.name}: udp reply to {peer[0]}: {e}", file=sys.stderr)

    def _conn_event(self, fd: int, events: int) -> None:
        c = self.conns.get(fd)
        if c is None:
            return
        if events & selectors.EVENT_WRITE and not self._flush(fd, c):
            return
        if not events & selectors.EVENT_READ:
            return
        try:
            data = c.sock.recv(REQUEST_MAX)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(fd)
            return
        if not data:
            self._close(fd)
            return
        c.last = time.monotonic()
        if c.kind == "stream" or c.answered:
            return  # stream clients' bytes, and what follows a request, are read and ignored
        c.buf += data
        if b"\n" in c.buf or len(c.buf) >= REQUEST_MAX:
            c.answered = True
            c.buf.clear()
            c.out += self.http_reply
            self._flush(fd, c)

    def _flush(self, fd: int, c: Conn) -> bool:
        """Send what is pending; False when the connection was closed."""
        try:
            sent = c.sock.send(c.out) if c.out else 0
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(fd)
            return False
        del c.out[:sent]
        if len(c.out) > STREAM_BACKLOG_MAX:
            self._close(fd)
            return False
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if c.out else 0)
        self.sel.modify(c.sock, want, ("conn", fd))
        if c.kind == "http" and c.answered and not c.out:
            # Our FIN first, then read the client's rest until its FIN, so the answer is never
            # lost to a reset caused by unread request bytes.
            try:
                c.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self._close(fd)
                return False
        return True

    def _close(self, fd: int) -> None:
        c = self.conns.pop(fd, None)
        self.streams.pop(fd, None)
        if c is None:
            return
        self.sel.unregister(c.sock)
        c.sock.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True, help="what to answer with, e.g. be1")
    ap.add_argument("--ready", help="file to create once every socket is bound")
    args = ap.parse_args()
    if not args.name.isascii() or not args.name.replace("_", "").replace("-", "").isalnum():
        ap.error("--name must be ASCII letters, digits, '-' or '_'")
    b = Backend(args.name)
    try:
        b.bind_all()
    except OSError as e:
        print(f"backend {args.name}: cannot bind: {e}", file=sys.stderr)
        return 1
    if args.ready:
        tmp = f"{args.ready}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, args.ready)
    print(f"backend {args.name} pid {os.getpid()} serving", file=sys.stderr, flush=True)
    try:
        b.run()
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
