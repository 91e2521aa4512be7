"""Our own transactions' events, dropped in the kernel: a classic BPF filter by port id.

Every nf_tables notification carries the port id of the socket whose transaction caused it, and
so does every ctnetlink event of a change made over ctnetlink; the daemon's event sockets drop
the echo of its own writes with this filter instead of reading and decoding them (1M elements or
entries written = 1M events). Also how the port id of a libnftables
context's socket is found (libnftables does not expose its socket).
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
from collections.abc import Iterable

SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27
NETLINK_NETFILTER = 12


def _fd_links() -> dict[int, str]:
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
    return out


def netlink_inodes() -> dict[int, int]:
    """fd -> socket inode of this process's sockets."""
    return {fd: int(link[8:-1]) for fd, link in _fd_links().items()
            if link.startswith("socket:[")}


def netfilter_ports() -> dict[int, int]:
    """socket inode -> port id of the NETLINK_NETFILTER sockets in our network namespace."""
    out = {}
    with open("/proc/self/net/netlink") as fh:
        next(fh, None)
        for line in fh:
            f = line.split()
            if len(f) >= 10 and f[1] == str(NETLINK_NETFILTER):
                out[int(f[9])] = int(f[2])
    return out


def attach_echo_filter(sock_fd: int, portid: int | Iterable[int]) -> ctypes.Array:
    """Classic BPF on the nft event socket: drop datagrams whose first message was sent by
    `portid` (one port id or several, e.g. `NftSink.portids`). nf_tables puts the sender's
    port id in every notification of a transaction and never mixes transactions in one
    datagram, so this drops exactly our own writes' echo (1M elements written = 1M events to
    decode, and an overrun of the event socket).
    Returns the filter buffer (keep it alive while attached)."""
    # BPF absolute loads are big endian; nlmsg_pid (offset 12) is host order.
    ports = sorted({portid} if isinstance(portid, int) else set(portid))
    if not ports or len(ports) > 8:
        raise ValueError(f"echo filter: 1 to 8 port ids, not {len(ports)}")
    n = len(ports)
    insns = [(0x20, 0, 0, 12)]  # ld [12]
    for i, p in enumerate(ports):
        k = int.from_bytes(p.to_bytes(4, "little" if _LITTLE else "big"), "big")
        insns.append((0x15, n - i, 0, k))  # jeq #k: jump to the drop after the last test
    insns += [(0x06, 0, 0, 0xFFFFFFFF),  # ret #-1: accept
              (0x06, 0, 0, 0)]  # ret #0: drop
    prog = b"".join(struct.pack("=HBBI", *i) for i in insns)
    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = struct.pack("@HP", len(insns), ctypes.addressof(buf))
    sock = socket.socket(fileno=os.dup(sock_fd))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    finally:
        sock.close()
    return buf


def detach_echo_filter(sock_fd: int) -> None:
    sock = socket.socket(fileno=os.dup(sock_fd))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
    finally:
        sock.close()


_LITTLE = struct.pack("=H", 1) == b"\x01\x00"
