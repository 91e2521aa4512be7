"""Generic netlink plumbing shared by the ctnetlink and nf_tables codecs.

Why hand-written: the daemon's hot paths (conntrack events, batched inserts) must run at tens of
thousands of messages per second in Python. A generic attribute-object parser (pyroute2) costs
~50 µs per message; `struct` + `memoryview` over one receive buffer costs a few µs.

What is here, and nothing more:

* `NetlinkSocket`: a non-blocking `AF_NETLINK` raw socket with a large receive buffer
  (`SO_RCVBUFFORCE`, not capped by `net.core.rmem_max`), multicast group membership, and a
  receive loop that hands out `memoryview`s of one reusable buffer. ENOBUFS (the kernel dropped
  messages because our buffer was full) is raised as `NetlinkOverrun`, distinct from other errors,
  because the only correct reaction is to resynchronise state by a dump.
* `iter_messages` / `iter_attrs`: defensive walkers over `nlmsghdr` / `nlattr` streams. Every
  length is bounds-checked; a malformed tail ends the walk (and is reported through an optional
  callback) instead of raising.
* Builders: `nlmsg`, `nfgenmsg`, `nla`, `nla_nested` and typed helpers, returning `bytes` so that
  callers can join many messages into one `sendmsg`.

Byte order: netlink headers and attribute headers are host order (little endian here);
netfilter attribute *payloads* are network order (big endian), hence the `_be` helpers.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Callable, Iterator

from nftsync.errors import NftsyncError

# --- protocol families and socket options -------------------------------------------------------
NETLINK_ROUTE = 0
NETLINK_NETFILTER = 12

SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_NO_ENOBUFS = 5
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32

# --- nlmsghdr ------------------------------------------------------------------------------------
NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4

NLM_F_REQUEST = 0x01
NLM_F_MULTI = 0x02
NLM_F_ACK = 0x04
NLM_F_ECHO = 0x08
NLM_F_DUMP_INTR = 0x10
# GET modifiers
NLM_F_ROOT = 0x100
NLM_F_MATCH = 0x200
NLM_F_DUMP = NLM_F_ROOT | NLM_F_MATCH
# NEW modifiers
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_APPEND = 0x800
# ACK modifiers
NLM_F_CAPPED = 0x100
NLM_F_ACK_TLVS = 0x200

# --- nlattr --------------------------------------------------------------------------------------
NLA_F_NESTED = 0x8000
NLA_F_NET_BYTEORDER = 0x4000
NLA_TYPE_MASK = 0x3FFF

# --- nfnetlink -----------------------------------------------------------------------------------
NFNETLINK_V0 = 0
NFNL_SUBSYS_CTNETLINK = 1
NFNL_SUBSYS_CTNETLINK_EXP = 2
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN = 0x10
NFNL_MSG_BATCH_END = 0x11

NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
NLA_HDR = struct.Struct("=HH")  # len, type
NFGENMSG = struct.Struct("=BBH")  # family, version, res_id (res_id is big endian: see nfgenmsg())
NLMSG_HDRLEN = NLMSG_HDR.size  # 16
NFGENMSG_LEN = NFGENMSG.size  # 4
_ERRNO = struct.Struct("=i")

DEFAULT_RECV_BUFFER = 1 << 18  # 256 KiB: larger than any dump datagram the kernel builds (≤ 32 KiB)


class NetlinkError(NftsyncError):
    """The kernel answered a netlink request with an error (errno in `.errno`)."""

    def __init__(self, err: int, what: str = "netlink request") -> None:
        self.errno = err
        super().__init__(f"{what}: {os.strerror(err)} (errno {err})")


class NetlinkOverrun(NftsyncError):
    """The kernel dropped messages for this socket (ENOBUFS): our view is now incomplete.

    Raised by `NetlinkSocket.recv()`. The socket stays usable, but every subscriber must
    reconcile its state from a dump, since it cannot know which messages were lost.
    """

    def __init__(self, what: str = "netlink socket") -> None:
        super().__init__(f"{what}: receive buffer overrun (ENOBUFS), messages were lost")


def align4(n: int) -> int:
    """NLMSG_ALIGN / NLA_ALIGN."""
    return (n + 3) & ~3


# --- builders ------------------------------------------------------------------------------------
_PAD = (b"", b"\0\0\0", b"\0\0", b"\0")


def nla(attr_type: int, data: bytes) -> bytes:
    """One attribute: header + payload + padding to 4 bytes."""
    n = 4 + len(data)
    return NLA_HDR.pack(n, attr_type) + data + _PAD[n & 3]


def nla_nested(attr_type: int, *parts: bytes) -> bytes:
    """A nested attribute holding already built attributes `parts` (sets NLA_F_NESTED)."""
    body = b"".join(parts)
    return NLA_HDR.pack(4 + len(body), attr_type | NLA_F_NESTED) + body


def nla_u8(attr_type: int, value: int) -> bytes:
    return nla(attr_type, bytes((value,)))


def nla_be16(attr_type: int, value: int) -> bytes:
    return nla(attr_type, value.to_bytes(2, "big"))


def nla_be32(attr_type: int, value: int) -> bytes:
    return nla(attr_type, value.to_bytes(4, "big"))


def nla_str(attr_type: int, value: str) -> bytes:
    """NUL-terminated string attribute (NLA_NUL_STRING / NLA_STRING both accept it)."""
    return nla(attr_type, value.encode() + b"\0")


def nfgenmsg(family: int, version: int = NFNETLINK_V0, res_id: int = 0) -> bytes:
    """The nfnetlink family header that follows nlmsghdr in every netfilter message.

    `res_id` is big endian on the wire (it carries the nf_tables generation / subsystem id).
    """
    return NFGENMSG.pack(family, version, socket.htons(res_id))


def nlmsg(msg_type: int, flags: int, seq: int, payload: bytes, pid: int = 0) -> bytes:
    """A complete netlink message (payload is padded to 4 bytes)."""
    n = NLMSG_HDRLEN + len(payload)
    return NLMSG_HDR.pack(n, msg_type, flags, seq, pid) + payload + _PAD[n & 3]


def nfnl_type(subsys: int, msg: int) -> int:
    """nlmsg_type of a netfilter message: subsystem id in the high byte, message in the low."""
    return (subsys << 8) | msg


# --- parsers -------------------------------------------------------------------------------------
Message = tuple[int, int, int, int, memoryview]  # type, flags, seq, pid, payload


def iter_messages(
    buf: memoryview | bytes | bytearray,
    on_error: Callable[[str], None] | None = None,
) -> Iterator[Message]:
    """Walk the netlink messages in one received datagram.

    Yields `(type, flags, seq, pid, payload)` where payload is a memoryview of the bytes after
    the 16-byte header (valid as long as `buf` is). A header whose length is smaller than the
    header or larger than what is left ends the walk and calls `on_error(reason)`; nothing raises.
    """
    mv = buf if isinstance(buf, memoryview) else memoryview(buf)
    end = len(mv)
    off = 0
    unpack = NLMSG_HDR.unpack_from
    while end - off >= NLMSG_HDRLEN:
        length, mtype, flags, seq, pid = unpack(mv, off)
        if length < NLMSG_HDRLEN or length > end - off:
            if on_error is not None:
                on_error(f"bad nlmsg length {length} at offset {off} of {end}")
            return
        yield mtype, flags, seq, pid, mv[off + NLMSG_HDRLEN : off + length]
        off += (length + 3) & ~3
    if off < end and on_error is not None and end - off >= 4:
        on_error(f"{end - off} trailing bytes after last nlmsg")


def iter_attrs(
    mv: memoryview | bytes | bytearray,
    on_error: Callable[[str], None] | None = None,
) -> Iterator[tuple[int, bool, memoryview]]:
    """Walk a run of attributes: yields `(type & NLA_TYPE_MASK, is_nested, payload)`.

    An attribute with a length below 4 or past the end stops the walk (reported to `on_error`).
    Unknown types are the caller's to skip; this walker knows no semantics.
    """
    if not isinstance(mv, memoryview):
        mv = memoryview(mv)
    end = len(mv)
    off = 0
    unpack = NLA_HDR.unpack_from
    while end - off >= 4:
        length, atype = unpack(mv, off)
        if length < 4 or length > end - off:
            if on_error is not None:
                on_error(f"bad nla length {length} at offset {off} of {end}")
            return
        yield atype & NLA_TYPE_MASK, bool(atype & NLA_F_NESTED), mv[off + 4 : off + length]
        off += (length + 3) & ~3


NLMSGERR_ATTR_MSG = 1  # extended ACK: the kernel's error string
NLMSGERR_ATTR_OFFS = 2  # extended ACK: offset of the offending attribute in the request


def parse_error_ext(payload: memoryview | bytes, flags: int) -> tuple[int, int, int | None,
                                                                      str | None]:
    """Decode an NLMSG_ERROR payload with its extended ACK (NETLINK_EXT_ACK): (errno, seq,
    offset of the attribute the kernel blames, counted from the start of the request's
    nlmsghdr, or None; the kernel's message or None).

    Why: a refused nf_tables batch names only an errno, and the same errno means different
    things (ENOENT: no such table, no such set, or no such element); the offset says which
    attribute, so the caller can tell them apart and find the one element at fault without
    trying the elements one by one.
    """
    err, seq = parse_error(payload)
    if not flags & NLM_F_ACK_TLVS:
        return err, seq, None, None
    if flags & NLM_F_CAPPED:
        tlv_start = 4 + NLMSG_HDRLEN
    else:  # the whole request is echoed: its own length says where the TLVs start
        tlv_start = 4 + align4(NLMSG_HDR.unpack_from(payload, 4)[0])
    offset = msg = None
    for atype, _nested, data in iter_attrs(payload[tlv_start:]):
        if atype == NLMSGERR_ATTR_OFFS and len(data) >= 4:
            offset = struct.unpack_from("=I", data)[0]
        elif atype == NLMSGERR_ATTR_MSG:
            msg = bytes(data).split(b"\0", 1)[0].decode(errors="replace")
    return err, seq, offset, msg


def parse_error(payload: memoryview | bytes) -> tuple[int, int]:
    """Decode an NLMSG_ERROR payload: returns (errno, seq of the request it answers).

    errno is 0 for an ACK. Raises ValueError if the payload is too short to hold the errno and
    the original header (which the kernel always includes, capped or not).
    """
    if len(payload) < 4 + NLMSG_HDRLEN:
        raise ValueError(f"NLMSG_ERROR payload too short ({len(payload)} bytes)")
    (err,) = _ERRNO.unpack_from(payload, 0)
    seq = NLMSG_HDR.unpack_from(payload, 4)[3]
    return -err, seq


# --- socket --------------------------------------------------------------------------------------
class NetlinkSocket:
    """A non-blocking raw netlink socket tuned for high message rates.

    `groups` is the legacy bind bitmask (bit g-1 = multicast group g, groups 1..32);
    `add_membership(g)` joins any group number. `rcvbuf` is forced with SO_RCVBUFFORCE (root)
    so it is not capped by net.core.rmem_max; if that is refused, SO_RCVBUF is used.
    Acks are capped (NETLINK_CAP_ACK) so an error reply does not echo the whole request.

    The socket is opened in the network namespace of the calling thread.
    """

    def __init__(
        self,
        protocol: int = NETLINK_NETFILTER,
        groups: int = 0,
        rcvbuf: int | None = None,
        sndbuf: int | None = None,
        recv_buffer: int = DEFAULT_RECV_BUFFER,
    ) -> None:
        self.sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
            protocol,
        )
        try:
            if rcvbuf:
                self.set_rcvbuf(rcvbuf)
            if sndbuf:
                self._force(SO_SNDBUFFORCE, socket.SO_SNDBUF, sndbuf)
            self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            self.sock.bind((0, groups))
        except OSError:
            self.sock.close()
            raise
        self.pid: int = self.sock.getsockname()[0]
        self._buf = bytearray(recv_buffer)
        self._view = memoryview(self._buf)
        self._seq = 0

    def _force(self, force_opt: int, opt: int, size: int) -> None:
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, force_opt, size)
        except PermissionError:
            self.sock.setsockopt(socket.SOL_SOCKET, opt, size)

    def set_rcvbuf(self, size: int) -> None:
        """Set the kernel receive buffer (the kernel doubles the value for bookkeeping)."""
        self._force(SO_RCVBUFFORCE, socket.SO_RCVBUF, size)

    @property
    def rcvbuf(self) -> int:
        return self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)

    def add_membership(self, group: int) -> None:
        self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)

    def fileno(self) -> int:
        return self.sock.fileno()

    def next_seq(self, count: int = 1) -> int:
        """Reserve `count` consecutive sequence numbers; returns the first (never 0)."""
        first = self._seq + 1
        self._seq = (self._seq + count) & 0x7FFFFFFF
        if self._seq < first:  # wrapped: restart so a reserved range is always contiguous
            first, self._seq = 1, count
        return first

    def send(self, data: bytes | bytearray | memoryview) -> int:
        """Send one datagram (any number of concatenated messages) to the kernel.

        The kernel processes a unicast to itself synchronously: when this returns, every reply
        (errors, acks) for these messages is already queued on our receive side.
        """
        return self.sock.sendto(data, (0, 0))

    def recv(self) -> memoryview | None:
        """Receive one datagram; returns None when nothing is queued (non-blocking).

        The returned view points into a buffer reused by the next `recv()`: parse it, or copy
        it, before receiving again. Raises `NetlinkOverrun` on ENOBUFS.
        """
        try:
            n = self.sock.recv_into(self._buf)
        except BlockingIOError:
            return None
        except OSError as e:
            if e.errno == errno.ENOBUFS:
                raise NetlinkOverrun() from None
            raise
        return self._view[:n]

    def recv_blocking(self, timeout: float | None = 5.0) -> memoryview | None:
        """Like `recv()` but wait up to `timeout` seconds for a datagram (None on timeout).

        poll(), not select(): select() cannot watch a descriptor numbered 1024 or more, which a
        daemon with a raised fd limit and many connections reaches.
        """
        import select

        mv = self.recv()
        if mv is not None:
            return mv
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        ready = poller.poll(None if timeout is None else max(timeout, 0.0) * 1000)
        return self.recv() if ready else None

    def __iter__(self) -> Iterator[memoryview]:
        """Drain: yield datagrams until nothing is queued (each view valid until the next)."""
        while True:
            mv = self.recv()
            if mv is None:
                return
            yield mv

    def request(self, payload_msgs: bytes, seq: int, timeout: float = 5.0) -> Iterator[Message]:
        """Send a request and yield the reply messages with sequence `seq` until it completes.

        Completion is NLMSG_DONE (dumps) or NLMSG_ERROR (ack/errno), so the request must carry
        NLM_F_DUMP or NLM_F_ACK (a plain GET that succeeds is otherwise never acknowledged).
        A nonzero errno raises `NetlinkError`. Replies for other sequence numbers are skipped.
        Each yielded payload is a view into the receive buffer, valid until the next item.
        """
        self.send(payload_msgs)
        while True:
            mv = self.recv_blocking(timeout)
            if mv is None:
                raise NetlinkError(errno.ETIMEDOUT, "netlink request timed out")
            for mtype, flags, mseq, pid, payload in iter_messages(mv):
                if mseq != seq:
                    continue
                if mtype == NLMSG_DONE:
                    return
                if mtype == NLMSG_ERROR:
                    err, _ = parse_error(payload)
                    if err:
                        raise NetlinkError(err)
                    return
                yield mtype, flags, mseq, pid, payload

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> NetlinkSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
