"""The conntrack entry as a value: what the daemon learns, replicates and writes back.

`CtEntry` lives here, apart from the two places that turn it into bytes, so that neither depends
on the other: `nftsync.netlink.ctnetlink` translates kernel messages to and from it, and
`nftsync.proto.conntrack` owns its peer-protocol form. Before, the wire layout sat next to the
kernel decoder, and editing one could silently change the other. This module imports nothing of
nftsync, and it is not `nftsync.model` because that module is about farms, maps and sessions
(the nft side); a conntrack entry is the kernel's connection state, shared by both codecs.

Field meanings and numbers are netfilter's own (nf_conntrack_common.h, nf_conntrack_tcp.h), so a
value read here means the same as in `conntrack -L` and the kernel sources.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field

AF_INET = socket.AF_INET  # 2
AF_INET6 = socket.AF_INET6  # 10
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ICMPV6 = 58

# ip_conntrack_status bits (the `status` field)
IPS_EXPECTED = 1 << 0
IPS_SEEN_REPLY = 1 << 1
IPS_ASSURED = 1 << 2
IPS_CONFIRMED = 1 << 3
IPS_SRC_NAT = 1 << 4
IPS_DST_NAT = 1 << 5
IPS_NAT_MASK = IPS_SRC_NAT | IPS_DST_NAT
IPS_SEQ_ADJUST = 1 << 6
IPS_SRC_NAT_DONE = 1 << 7
IPS_DST_NAT_DONE = 1 << 8
IPS_DYING = 1 << 9
IPS_FIXED_TIMEOUT = 1 << 10
IPS_TEMPLATE = 1 << 11
IPS_HELPER = 1 << 13
IPS_OFFLOAD = 1 << 14
IPS_HW_OFFLOAD = 1 << 15

# enum tcp_conntrack (the `tcp_state` field)
TCP_CONNTRACK_STATES = (
    "NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT", "LAST_ACK",
    "TIME_WAIT", "CLOSE", "SYN_SENT2",
)
TCP_CONNTRACK_ESTABLISHED = 3
TCP_CONNTRACK_MAX = len(TCP_CONNTRACK_STATES)

MAX_TIMEOUT = 0x7FFFFFFF // 1000  # the kernel caps jiffies at INT_MAX; keep well inside

PORT_PROTOS = frozenset((IPPROTO_TCP, IPPROTO_UDP))  # protocols whose tuples carry real ports


@dataclass(slots=True)
class CtEntry:
    """One conntrack entry, as the kernel reports it (reply tuple already NATed).

    Addresses are packed `bytes` (4 for IPv4, 16 for IPv6). For ICMP/ICMPv6 the "ports" carry
    the echo id (sport) and `type << 8 | code` (dport) of that direction.
    `timeout` is seconds remaining. `ct_id` is the kernel's id: host-local, never sent to peers.
    """

    family: int
    l4proto: int
    orig_src: bytes
    orig_dst: bytes
    orig_sport: int
    orig_dport: int
    reply_src: bytes
    reply_dst: bytes
    reply_sport: int
    reply_dport: int
    mark: int = 0
    status: int = 0
    timeout: int = 0
    tcp_state: int | None = None
    zone: int = 0
    ct_id: int | None = field(default=None, compare=False)

    # -- views --
    @property
    def is_dnat(self) -> bool:
        """The reply comes from somewhere else than the original destination (DNAT/LB).

        Ports count only for TCP/UDP (ICMP "ports" are id and type/code, which differ anyway).
        """
        if self.reply_src != self.orig_dst:
            return True
        return self.l4proto in PORT_PROTOS and self.reply_sport != self.orig_dport

    @property
    def is_snat(self) -> bool:
        if self.reply_dst != self.orig_src:
            return True
        return self.l4proto in PORT_PROTOS and self.reply_dport != self.orig_sport

    @property
    def backend(self) -> tuple[str, int] | None:
        """(address, port) the connection was DNATed to, or None if it was not DNATed."""
        if not self.is_dnat:
            return None
        return _ntop(self.family, self.reply_src), self.reply_sport

    @property
    def key(self) -> tuple[int, int, bytes, bytes, int, int, int]:
        """Identity of the entry on any node: original tuple and zone."""
        return (self.family, self.l4proto, self.orig_src, self.orig_dst, self.orig_sport,
                self.orig_dport, self.zone)

    @property
    def state_name(self) -> str | None:
        if self.tcp_state is None:
            return None
        return TCP_CONNTRACK_STATES[self.tcp_state] if self.tcp_state < TCP_CONNTRACK_MAX else "?"

    def __str__(self) -> str:
        f = self.family
        return (f"{self.l4proto} {_ntop(f, self.orig_src)}:{self.orig_sport}->"
                f"{_ntop(f, self.orig_dst)}:{self.orig_dport} reply "
                f"{_ntop(f, self.reply_src)}:{self.reply_sport}->"
                f"{_ntop(f, self.reply_dst)}:{self.reply_dport} mark={self.mark:#x} "
                f"timeout={self.timeout} state={self.state_name}")

    @classmethod
    def make(cls, client: str, client_port: int, vip: str, vip_port: int, backend: str,
             backend_port: int, *, l4proto: int = IPPROTO_TCP, mark: int = 0,
             timeout: int = 600, tcp_state: int | None = TCP_CONNTRACK_ESTABLISHED,
             status: int = IPS_ASSURED | IPS_SEEN_REPLY, zone: int = 0) -> CtEntry:
        """A DNATed entry client→vip whose reply comes from backend (for tests and tools)."""
        c, v, b = (ipaddress.ip_address(a) for a in (client, vip, backend))
        if not c.version == v.version == b.version:
            raise ValueError("client, vip and backend must be the same address family")
        fam = AF_INET if c.version == 4 else AF_INET6
        if l4proto != IPPROTO_TCP:
            tcp_state = None
        return cls(fam, l4proto, c.packed, v.packed, client_port, vip_port, b.packed, c.packed,
                   backend_port, client_port, mark, status, timeout, tcp_state, zone)


def _ntop(family: int, addr: bytes) -> str:
    try:
        return socket.inet_ntop(family, addr)
    except (ValueError, OSError):
        return addr.hex()


__all__ = [
    "AF_INET", "AF_INET6", "IPPROTO_ICMP", "IPPROTO_ICMPV6", "IPPROTO_TCP", "IPPROTO_UDP",
    "IPS_ASSURED", "IPS_CONFIRMED", "IPS_DST_NAT", "IPS_DST_NAT_DONE", "IPS_DYING",
    "IPS_EXPECTED", "IPS_FIXED_TIMEOUT", "IPS_HELPER", "IPS_HW_OFFLOAD", "IPS_NAT_MASK",
    "IPS_OFFLOAD", "IPS_SEEN_REPLY", "IPS_SEQ_ADJUST", "IPS_SRC_NAT", "IPS_SRC_NAT_DONE",
    "IPS_TEMPLATE", "MAX_TIMEOUT", "PORT_PROTOS", "TCP_CONNTRACK_ESTABLISHED",
    "TCP_CONNTRACK_MAX", "TCP_CONNTRACK_STATES", "CtEntry",
]
