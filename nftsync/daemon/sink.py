"""Writing replicated state into the local kernel, in batches.

Session map elements go through hand-built nf_tables netlink batches (`SetElemWriter`, one
transaction per map per batch: deletes, then adds), falling back to libnftables text
transactions for maps whose key or value types it does not encode, and element by element
after a failure. An element whose key exists is replaced by "delete + add" in the same
transaction, except where the kernel refreshes in place (>= 6.12: `add` with the same value and
an explicit `expires`). The daemon's mirror says which keys exist; when it is wrong (the packet
path added a key we had not heard of yet, or the kernel expired one) the transaction fails as a
whole and is retried element by element, so one surprise never loses the rest of the batch.

Conntrack entries go through `CtWriter` (ctnetlink messages built by hand, many per sendmsg).

Both sinks can hand their writes to one `KernelWriter` thread: the kernel work (the nft commit,
the conntrack inserts inside sendmsg) then runs while the event loop decodes the next frames, as
libnftables (ctypes) and socket calls release the GIL. Writes stay in submission order.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import queue
import socket
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from nftsync.errors import NftsyncError
from nftsync.netlink.ctnetlink import CtEntry, CtWriter
from nftsync.netlink.nftwriter import SetElemWriter, key_length
from nftsync.nft import Nft
from nftsync.tables.nftmap import kernel_refreshes_expiry

from .farms import ReplicatedMap

log = logging.getLogger("nftsync.daemon")


@dataclass(slots=True)
class SinkStats:
    applied: int = 0
    failed: int = 0
    transactions: int = 0
    retries: int = 0
    last_error: str = ""
    errors: dict[str, int] = field(default_factory=dict)


class KernelWriter:
    """One worker thread that performs the sinks' kernel writes in submission order.

    `submit` never blocks; the event loop calls `wait_room()` after submitting a frame's worth,
    which waits while more than `high` changes are queued, so a slow kernel slows the peer's
    TCP stream down instead of growing the queue without bound.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, high: int = 40_000,
                 low: int = 10_000) -> None:
        self.loop = loop
        self.high, self.low = high, low
        self.queued = 0
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._room = asyncio.Event()
        self._room.set()
        self._waiting = False
        self.thread = threading.Thread(target=self._run, name="nftsync-kernel", daemon=True)
        self.thread.start()

    def submit(self, fn: Callable[..., None], count: int, *args: object) -> None:
        with self._lock:
            self.queued += count
        self._jobs.put((fn, count, args))

    async def wait_room(self) -> None:
        with self._lock:
            if self.queued <= self.high:
                return
            self._waiting = True
            self._room.clear()
        await self._room.wait()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, count, args = job
            try:
                fn(*args)
            except Exception:  # a bug must not kill the writer: log it, keep writing
                log.exception("kernel write failed")
            with self._lock:
                self.queued -= count
                wake = self._waiting and self.queued <= self.low
                if wake:
                    self._waiting = False
            if wake:
                self.loop.call_soon_threadsafe(self._room.set)

    def close(self, timeout: float = 10.0) -> None:
        """Finish what is queued (bounded by `timeout`), then stop the thread."""
        self._jobs.put(None)
        self.thread.join(timeout)
        if self.thread.is_alive():
            log.warning("kernel writer: %d change(s) still queued at shutdown", self.queued)


@dataclass(slots=True)
class ElementOp:
    key: bytes
    mark: int | None  # None: delete
    remaining_ms: int  # 0: no timeout
    old_mark: int | None  # what the mirror believes the kernel has (None: absent, -1: unknown)

    @property
    def exists(self) -> bool:
        return self.old_mark is not None


class NftSink:
    """Applies element changes to session maps. Our own transactions are recognised in the nft
    event stream by the committing thread id (NEWGEN pid), which `thread_id` records, and in
    the kernel by the port id of the socket that wrote them (`portid`, see `echo_filter`).

    `netlink=True` writes through a `SetElemWriter` of its own (the fast path); `portid` is
    then that socket's, the one almost every write goes through. The libnftables context stays
    for per-element retries and unsupported maps; its rare echoes are dropped by thread id.
    """

    def __init__(self, nft: Nft | None = None, writer: KernelWriter | None = None,
                 netlink: bool = True) -> None:
        # With a writer the context is used by its thread only: never share it (libnftables
        # contexts are not thread-safe).
        before = _netlink_inodes()
        self.nft = nft or Nft()
        self.refresh_in_place = kernel_refreshes_expiry()
        self.stats = SinkStats()
        self.thread_ids: set[int] = set()
        self.writer = writer
        self.portid: int | None = None
        self.nft_portid: int | None = None  # the libnftables context's
        self._sock: tuple[int, int] | None = None  # (fd, inode) of the socket `portid` is of
        self.elem_writer: SetElemWriter | None = None
        if nft is None:
            self._find_portid(before)
            self.nft_portid = self.portid
        if netlink:
            self.elem_writer = SetElemWriter()
            fd = self.elem_writer.fileno()
            self._sock = (fd, os.fstat(fd).st_ino)
            self.portid = self.elem_writer.portid

    @property
    def portids(self) -> set[int]:
        """Every port id our writes can carry (for an echo filter that takes several)."""
        return {p for p in (self.portid, self.nft_portid) if p is not None}

    def close(self) -> None:
        if self.elem_writer is not None:
            self.elem_writer.close()
            self.elem_writer = None

    def _find_portid(self, before: dict[int, int]) -> None:
        """The netlink port id of our libnftables context's socket: our transactions' events
        carry it in their headers, so the event socket can drop them in the kernel (see
        `echo_filter`). libnftables does not expose its socket: it is the netfilter socket that
        appeared with the context; it gets its port id when it first sends (autobind).
        None when that cannot be told for sure (then events are told apart by thread id)."""
        try:
            self.nft.cmd("list tables")
            ports = _netfilter_ports()
        except (NftsyncError, OSError):
            return
        new = {fd: ino for fd, ino in _netlink_inodes().items() if fd not in before}
        mine = [(fd, ino) for fd, ino in new.items() if ports.get(ino)]
        if len(mine) == 1:
            self._sock = mine[0]
            self.portid = ports[mine[0][1]]

    def echo_filter_valid(self) -> bool:
        """Whether the socket the port id was read from is still the context's (a reopened
        socket would have another port id, and the old one could be reused by anyone)."""
        if self._sock is None:
            return False
        fd, ino = self._sock
        try:
            return os.readlink(f"/proc/self/fd/{fd}") == f"socket:[{ino}]"
        except OSError:
            return False

    def apply(self, rmap: ReplicatedMap, ops: list[ElementOp]) -> None:
        """Write `ops` now, or queue them for the writer thread if there is one."""
        if not ops:
            return
        if self.writer is not None:
            self.writer.submit(self._apply_now, len(ops), rmap, ops)
            return
        self._apply_now(rmap, ops)

    def _apply_now(self, rmap: ReplicatedMap, ops: list[ElementOp]) -> None:
        self.thread_ids.add(threading.get_native_id())
        try:
            self._write_batch(rmap, ops)
        except NftsyncError as exc:  # the kernel refused the transaction: nothing changed
            if len(ops) == 1:
                self._fail(rmap, ops[0], exc)
                return
            self.stats.retries += 1
            for op in ops:  # one surprise must not lose the batch: element by element
                self._apply_one(rmap, op)
            return
        self.stats.transactions += 1
        self.stats.applied += len(ops)

    def _write_batch(self, rmap: ReplicatedMap, ops: list[ElementOp]) -> None:
        """`ops` as one transaction: a hand-built netlink batch where the map allows it, else
        libnftables text. Raises NftsyncError (NetlinkError included) if the kernel refuses."""
        if self.elem_writer is not None and _netlink_ok(rmap):
            try:
                if self._apply_netlink(rmap, ops):
                    return
            except OSError as exc:  # not sent (e.g. larger than the send buffer): nft text
                log.warning("netlink element batch for %s not sent (%s): using libnftables",
                            rmap.smap.ref, exc)
        self.nft.cmd(self._commands(rmap, ops), what=f"replicate into {rmap.smap.ref}")

    def _apply_one(self, rmap: ReplicatedMap, op: ElementOp) -> None:
        # The mirror may be wrong about the kernel (packet path, expiry): try the other belief.
        # "Present" with a value we do not know (-1, never a mark) means delete + add, which
        # holds whatever the kernel has (refresh in place would be EEXIST for another value).
        other = None if op.exists else -1
        variants = [op, ElementOp(op.key, op.mark, op.remaining_ms, other)]
        last: Exception | None = None
        for variant in variants:
            try:
                self.nft.cmd(self._commands(rmap, [variant]), what=f"replicate into "
                             f"{rmap.smap.ref}")
                self.stats.transactions += 1
                self.stats.applied += 1
                return
            except NftsyncError as exc:
                last = exc
        if op.mark is None and last is not None and "No such file" in str(last):
            return  # deleting what the kernel already expired: nothing to do
        self._fail(rmap, op, last)

    def _fail(self, rmap: ReplicatedMap, op: ElementOp, exc: Exception | None) -> None:
        self.stats.failed += 1
        self.stats.last_error = f"{rmap.map_id} {rmap.key_text(op.key)}: {exc}"
        log.warning("could not apply %s", self.stats.last_error)

    def _apply_netlink(self, rmap: ReplicatedMap, ops: list[ElementOp]) -> bool:
        """The same transaction as `_commands` builds, as netlink messages. False (nothing
        sent) if a key does not have the kernel's length for the map: nft text handles it."""
        assert self.elem_writer is not None
        ref = rmap.smap.ref
        timeout_ms = rmap.smap.timeout * 1000 if rmap.smap.timeout is not None else None
        klen = key_length(rmap.smap.key_type)
        in_place = self.refresh_in_place
        pack = _MARK.pack
        dels: list[bytes] = []
        adds: list[tuple[bytes, bytes, int | None, int | None]] = []
        for op in ops:
            key = op.key
            if len(key) != klen:  # the kernel would refuse the whole batch (EINVAL)
                return False
            if op.mark is None:
                if op.old_mark is not None:
                    dels.append(key)
                continue
            ms = op.remaining_ms
            if op.old_mark is not None and (not in_place or ms == 0 or op.old_mark != op.mark):
                dels.append(key)
            if ms == 0 or timeout_ms is None:
                adds.append((key, pack(op.mark), None, None))
            elif ms > timeout_ms:
                adds.append((key, pack(op.mark), ms, ms))
            else:
                adds.append((key, pack(op.mark), None, ms))
        self.elem_writer.apply(ref.family, ref.table, ref.name, dels, adds)
        return True

    def _commands(self, rmap: ReplicatedMap, ops: list[ElementOp]) -> str:
        ref = rmap.smap.ref
        where = f"{ref.family} {ref.table} {ref.name}"
        timeout_s = rmap.smap.timeout
        dels: list[str] = []
        adds: list[str] = []
        for op in ops:
            text = rmap.key_text(op.key)
            if op.mark is None:
                if op.exists:
                    dels.append(text)
                continue
            # Replace by delete + add, unless the kernel refreshes a timed element in place,
            # which it does only for the same value (another value is EEXIST).
            if op.exists and (not self.refresh_in_place or op.remaining_ms == 0 or
                              op.old_mark != op.mark):
                dels.append(text)
            adds.append(_element(text, op, timeout_s))
        lines = []
        for i in range(0, len(dels), 2000):
            lines.append(f"delete element {where} {{ {', '.join(dels[i:i + 2000])} }}")
        for i in range(0, len(adds), 2000):
            lines.append(f"add element {where} {{ {', '.join(adds[i:i + 2000])} }}")
        return "\n".join(lines)

    def thread_is_ours(self, pid: int | None) -> bool:
        return pid is not None and pid in self.thread_ids


_MARK = struct.Struct("=I")  # meta mark values are host order in the kernel


def _netlink_ok(rmap: ReplicatedMap) -> bool:
    """Whether `SetElemWriter` can encode this map's elements: mark values and keys of
    datatypes whose byte size we know (anything else goes through libnftables)."""
    return rmap.smap.value_type == "mark" and key_length(rmap.smap.key_type) is not None


def _element(text: str, op: ElementOp, map_timeout: int | None) -> str:
    if op.remaining_ms == 0 or map_timeout is None:
        return f"{text} : {op.mark:#x}"
    ms = op.remaining_ms
    if ms > map_timeout * 1000:
        return f"{text} timeout {ms}ms expires {ms}ms : {op.mark:#x}"
    return f"{text} expires {ms}ms : {op.mark:#x}"


class CtSink:
    """Applies conntrack upserts/deletes through one batched ctnetlink writer."""

    def __init__(self, writer: KernelWriter | None = None) -> None:
        self.ct_writer = CtWriter()
        self.stats = SinkStats()
        self.writer = writer

    @property
    def portid(self) -> int:
        return self.ct_writer.portid

    def apply(self, ops: list[tuple[str, CtEntry]]) -> None:
        """Write `ops` now, or queue them for the writer thread if there is one."""
        if not ops:
            return
        if self.writer is not None:
            self.writer.submit(self._apply_queued, len(ops), ops)
            return
        self._apply_now(ops)

    def _apply_queued(self, ops: list[tuple[str, CtEntry]]) -> None:
        try:
            self._apply_now(ops)
        except NftsyncError as exc:  # e.g. no ACK from the kernel: these changes are lost
            self.stats.failed += len(ops)
            self.stats.last_error = f"conntrack write: {exc}"
            log.warning("%s", self.stats.last_error)

    def _apply_now(self, ops: list[tuple[str, CtEntry]]) -> None:
        res = self.ct_writer.apply(ops)
        self.stats.transactions += 1
        self.stats.applied += res.applied
        real = res.failed  # deletes of absent entries are counted apart, not as failures
        self.stats.failed += len(real)
        if real:
            op, ct, err = real[0]
            self.stats.last_error = f"conntrack {op} {ct}: errno {err}"
            log.warning("%d conntrack change(s) failed, first: %s", len(real),
                        self.stats.last_error)

    def close(self) -> None:
        self.ct_writer.close()


# --- our own transactions' events, dropped in the kernel ----------------------------------------
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


def _netlink_inodes() -> dict[int, int]:
    """fd -> socket inode of this process's sockets."""
    return {fd: int(link[8:-1]) for fd, link in _fd_links().items()
            if link.startswith("socket:[")}


def _netfilter_ports() -> dict[int, int]:
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
