"""sd_notify(3) from the standard library: tell systemd (or whatever set $NOTIFY_SOCKET) when
the daemon is ready, what it is doing, that its event loop still runs, and that it stops.

Why not libsystemd or python3-systemd: the protocol is one datagram of `KEY=VALUE` lines to a
unix socket, and the daemon must not depend on systemd being there. Without $NOTIFY_SOCKET
every call is a no-op, so the daemon behaves the same under a terminal, a test or Type=simple.

A notification is best effort and must never stop the daemon: a send that fails (systemd
restarting, a full socket queue, an address that does not exist) is logged once at WARNING and
then only at DEBUG, and the message is dropped. The watchdog keep-alive (`WATCHDOG=1`) is sent
by a task of the event loop itself (`Notifier.watchdog`), not by a thread: a loop that stops
turning stops the keep-alives, and systemd kills and restarts the daemon after WatchdogSec.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("nftsync.daemon")

#: The keep-alive is sent every WATCHDOG_USEC * this (sd_watchdog_enabled(3) advises half).
WATCHDOG_FRACTION = 0.5


def notify_address(value: str) -> str | bytes | None:
    """$NOTIFY_SOCKET as a socket address: a path, or '@name' for the abstract namespace
    (a leading NUL byte). None for what this module cannot reach (e.g. systemd's `vsock:`)."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between keep-alives, or None when no watchdog is asked of this process.

    $WATCHDOG_USEC is the deadline; $WATCHDOG_PID, when set, names the process it is meant for
    (a child that inherited the environment must not feed its parent's watchdog)."""
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    owner = environ.get("WATCHDOG_PID", "")
    if owner and (not owner.isdigit() or int(owner) != pid):
        return None
    return int(usec) / 1e6 * WATCHDOG_FRACTION


class Notifier:
    """The daemon's end of $NOTIFY_SOCKET. `enabled` is False (and every call a no-op) when the
    variable is unset or names an address this module cannot use."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self.address = notify_address(raw) if raw else None
        if raw and self.address is None:
            log.warning("NOTIFY_SOCKET=%s: not a path or an abstract '@' address; systemd "
                        "will not be notified", raw)
        self.interval = watchdog_interval(env, os.getpid()) if self.address else None
        self.sent = 0  # datagrams sent, for tests and `ctl stats`
        self.failed = 0
        self._warned = False
        self._status = ""
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """One datagram of `KEY=VALUE` lines; True if it left. Never raises."""
        if self.address is None:
            return False
        data = "\n".join(fields).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX,
                                           socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)  # a full queue drops the message, never blocks
            self._sock.sendto(data, self.address)
        except OSError as exc:
            self.failed += 1
            level = logging.DEBUG if self._warned else logging.WARNING
            self._warned = True
            log.log(level, "cannot notify systemd on %s (%s): %s", _shown(self.address),
                    fields[0].partition("=")[0], exc.strerror or exc)
            return False
        self.sent += 1
        return True

    def ready(self, status: str = "") -> None:
        """READY=1: the daemon serves (Type=notify: `systemctl start` returns now)."""
        fields = ["READY=1"]
        if status:
            self._status = status
            fields.append(f"STATUS={status}")
        self.send(*fields)

    def status(self, text: str) -> None:
        """STATUS=text (what `systemctl status` shows), sent only when it changed."""
        if text != self._status:
            self._status = text
            self.send(f"STATUS={text}")

    def reloading(self) -> None:
        # MONOTONIC_USEC: systemd >= 253 (Type=notify-reload) wants it; older ones ignore it.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping")

    async def watchdog(self) -> None:
        """WATCHDOG=1 every `interval`, from the event loop: if the loop stalls, so do these."""
        if self.interval is None:
            return
        log.info("systemd watchdog: a keep-alive every %.1fs", self.interval)
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(self.interval)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _shown(address: str | bytes) -> str:
    return "@" + address[1:].decode(errors="replace") if isinstance(address, bytes) else address
