"""How an address is written in logs, messages and status: `host:port`, `[IPv6]:port`.

One function for every place that shows an address (configured peers, listen addresses, a
socket's peername), so an IPv6 address is always bracketed and never shown as a Python tuple.
The reverse, reading `ADDR:PORT` / `[IPv6]:PORT` text, is daemon.config.parse_endpoint.
"""

from __future__ import annotations

from typing import Any


def format_endpoint(address: Any, port: int | None = None) -> str:
    """`host:port` of (`address`, `port`), or of a socket's peername given alone: (host, port)
    for IPv4, (host, port, flowinfo, scope_id) for IPv6. An address with a colon (IPv6, with or
    without a %scope) is bracketed. Anything else given alone (None: the peer is unknown, or a
    Unix socket's path) is returned as text."""
    if port is None:
        if isinstance(address, tuple) and len(address) >= 2:
            address, port = address[0], address[1]
        else:
            return "unknown address" if address is None or address == "" else str(address)
    host = str(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


__all__ = ["format_endpoint"]
