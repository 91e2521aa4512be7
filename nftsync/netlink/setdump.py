"""Stream one nf_tables set's elements out of the kernel (NFT_MSG_GETSETELEM, NLM_F_DUMP).

Why our own dump rather than `nft -j list map`: libnftables builds the whole listing (1M
elements: gigabytes of JSON and Python objects) before returning anything, and it runs where it
is called. Here each datagram is handed out as the kernel sends it, so a caller holds one
datagram at a time (at most 32 KiB, ~800 elements) and can read a big map in a thread while it
works on what came in.

The kernel's side cannot be made fast: each datagram of a set-element dump walks the set's hash
table again from its start to skip what it already sent (docs/kernels.md: ~50 s for 1M elements).
That time is spent inside `recvmsg`, which releases the GIL: the reading thread costs the rest
of the process almost nothing while it waits.

A dump reply is NEWSETELEM messages in the same format as the events `nftables` decodes, so the
element decoder (`nftables._element`) is shared. `SetElemDump` opens its socket and sends the
request in the calling thread (so in that thread's network namespace); iterating it may then
happen in any one thread.
"""

from __future__ import annotations

import collections
import errno
import queue
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from nftsync.datatypes import NFPROTO_NUMBERS
from nftsync.errors import NftsyncError
from nftsync.netlink.core import (
    NETLINK_NETFILTER,
    NFNL_SUBSYS_NFTABLES,
    NLM_F_DUMP,
    NLM_F_DUMP_INTR,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSG_HDR,
    NetlinkError,
    NetlinkSocket,
    nfgenmsg,
    nfnl_type,
    nla_str,
    nlmsg,
    parse_error,
)
from nftsync.netlink.nftables import (
    NFT_MSG_NEWSETELEM,
    NFTA_LIST_ELEM,
    NFTA_SET_ELEM_LIST_ELEMENTS,
    NFTA_SET_ELEM_LIST_SET,
    NFTA_SET_ELEM_LIST_TABLE,
    Element,
    _element,
    _Malformed,
)

NFT_MSG_GETSETELEM = 13
_NEWSETELEM = nfnl_type(NFNL_SUBSYS_NFTABLES, NFT_MSG_NEWSETELEM)
_NLA = struct.Struct("=HH").unpack_from
_NLHDR = NLMSG_HDR.unpack_from
_ERRNO = struct.Struct("=i").unpack_from


class SetGone(NetlinkError):
    """The set (or its table) does not exist: ENOENT from the kernel."""


def request(family: int, table: str, set_name: str, seq: int) -> bytes:
    """The GETSETELEM dump request for one set (what `nft list map` sends)."""
    body = nfgenmsg(family) + nla_str(NFTA_SET_ELEM_LIST_TABLE, table) + \
        nla_str(NFTA_SET_ELEM_LIST_SET, set_name)
    return nlmsg(nfnl_type(NFNL_SUBSYS_NFTABLES, NFT_MSG_GETSETELEM),
                 NLM_F_REQUEST | NLM_F_DUMP, seq, body)


def iter_elements(data: bytes, bad: list[str] | None = None) -> Iterator[Element]:
    """The elements of one dump datagram, one at a time (a caller can stop between any two,
    e.g. to give its event loop back). Messages other than NEWSETELEM are skipped; a malformed
    element or message ends its message's walk and is reported in `bad` (never raised)."""
    end = len(data)
    off = 0
    nla = _NLA
    while end - off >= 16:
        length, mtype, _flags, _seq, _pid = _NLHDR(data, off)
        if length < 16 or length > end - off:
            if bad is not None:
                bad.append(f"bad nlmsg length {length}")
            return
        mend = off + length
        if mtype == _NEWSETELEM:
            a = off + 20  # nlmsghdr + nfgenmsg
            while mend - a >= 4:
                alen, t = nla(data, a)
                if alen < 4 or alen > mend - a:
                    if bad is not None:
                        bad.append(f"bad attribute length {alen}")
                    break
                if t & 0x3FFF == NFTA_SET_ELEM_LIST_ELEMENTS:
                    x = a + 4
                    lend = a + alen
                    while lend - x >= 4:
                        llen, lt = nla(data, x)
                        if llen < 4 or llen > lend - x:
                            if bad is not None:
                                bad.append(f"bad list attribute length {llen}")
                            break
                        if lt & 0x3FFF == NFTA_LIST_ELEM:
                            try:
                                el = _element(data, x + 4, x + llen)
                            except (_Malformed, struct.error, IndexError) as e:
                                if bad is not None:
                                    bad.append(f"element: {e}")
                            else:
                                yield el
                        x += (llen + 3) & ~3
                a += (alen + 3) & ~3
        off += (length + 3) & ~3


def scan(data: bytes, seq: int) -> tuple[int, int, bool, int]:
    """The headers of one dump datagram (messages of other sequence numbers are not ours):
    (NEWSETELEM messages, messages flagged NLM_F_DUMP_INTR, whether the dump ended, its errno
    or 0). The dump ends with NLMSG_DONE, which carries a negative errno if the dump failed
    part-way, or with NLMSG_ERROR when the request itself was refused (ENOENT: no such table
    or set)."""
    end = len(data)
    off = 0
    messages = interrupted = err = 0
    done = False
    while end - off >= 16:
        length, mtype, flags, mseq, _pid = _NLHDR(data, off)
        if length < 16 or length > end - off:
            break
        if mseq == seq:
            if mtype == NLMSG_ERROR:
                done = True
                err = parse_error(data[off + 16:off + length])[0] if length >= 36 else \
                    errno.EPROTO
            else:
                interrupted += bool(flags & NLM_F_DUMP_INTR)
                if mtype == NLMSG_DONE:
                    done = True
                    if length >= 20:
                        (code,) = _ERRNO(data, off + 16)
                        err = -code if code < 0 else 0
                elif mtype == _NEWSETELEM:
                    messages += 1
        off += (length + 3) & ~3
    return messages, interrupted, done, err


class SetElemDump:
    """One streamed dump of a set's elements.

    `datagrams()` yields `(data, mono, wall_ms)` per reply datagram: a copy of its bytes (decode
    them with `iter_elements`) and when the kernel built it (monotonic seconds, wall-clock ms),
    so that each element's remaining expiry can be turned into a point in time however long the
    caller keeps the datagram. `batches()` yields the decoded elements of each datagram.

    The kernel builds the next datagram at the end of the `recvmsg` that takes the previous one,
    so a reader that stops reading stops the dump: nothing piles up in the kernel or here.

    **A dump is not a snapshot, and NLM_F_DUMP_INTR does not say so.** Each datagram walks the
    hash table from its start and skips as many elements as were sent before; an element
    removed behind that point (a delete, or expiry's garbage collection) makes one not yet sent
    be skipped, one inserted there (also by the packet path) makes one be sent again, and a
    resize of the table (a map far below its `size` shrinks on a delete) reorders it: measured
    on 6.18, deleting 500 already-sent elements of 20k during a dump lost 2286 others and
    repeated 1786. The kernel flags none of it: nf_tables sets no NLM_F_DUMP_INTR on
    set-element dumps (6.18: 0 flagged datagrams with a transaction committed mid-dump). If a
    kernel sets it, it is counted in `interrupted` and the dump goes on: it would say no more
    than the above. Why that is safe for the daemon: what it reads is found state, which only
    fills what the replica lacks (a repeat is taken once, absence deletes nothing); it reads a
    map again until a pass finds nothing new (daemon.kernelread); and an element still missed is in
    the kernel serving its client, whose next connection learns it live, while what the daemon
    derived from conntrack and the peers' snapshots cover it meanwhile. Restarting a dump on a
    change would not help: on a busy node every dump sees changes.

    Errors: ENOENT (no such table or set) raises `SetGone`, others `NetlinkError`, from the
    first iteration step that meets them.
    """

    def __init__(self, family: str | int, table: str, set_name: str, timeout: float = 30.0,
                 rcvbuf: int = 1 << 20) -> None:
        fam = NFPROTO_NUMBERS.get(family) if isinstance(family, str) else family
        if fam is None:
            raise NftsyncError(f"unknown nftables family {family!r}")
        self.what = f"{family} {table} {set_name}"
        self.timeout = timeout  # a datagram must come within this (the walk of one: < 1 s)
        self.messages = 0  # NEWSETELEM messages received
        self.interrupted = 0  # of which flagged NLM_F_DUMP_INTR
        self.done = False
        self._sock = NetlinkSocket(NETLINK_NETFILTER, rcvbuf=rcvbuf)
        try:
            self._seq = self._sock.next_seq()
            self._sock.send(request(fam, table, set_name, self._seq))
        except BaseException:
            self._sock.close()
            raise
        self._built = (time.monotonic(), time.time_ns() // 1_000_000)

    def datagrams(self) -> Iterator[tuple[bytes, float, int]]:
        try:
            while not self.done:
                mv = self._sock.recv_blocking(self.timeout)
                if mv is None:
                    raise NetlinkError(errno.ETIMEDOUT, f"dump of {self.what}")
                built = self._built
                # The next datagram is built during the recvmsg that just returned.
                self._built = (time.monotonic(), time.time_ns() // 1_000_000)
                data = bytes(mv)
                if self._scan(data):
                    yield data, built[0], built[1]
        finally:
            self.close()

    def _scan(self, data: bytes) -> bool:
        """True if the datagram holds elements of our dump; notes DONE and DUMP_INTR, raises
        an error."""
        messages, interrupted, done, err = scan(data, self._seq)
        self.messages += messages
        self.interrupted += interrupted
        if done:
            self.done = True
        if err == errno.ENOENT:
            raise SetGone(err, f"dump of {self.what}")
        if err:
            raise NetlinkError(err, f"dump of {self.what}")
        return messages > 0

    def batches(self) -> Iterator[list[Element]]:
        """The elements of each datagram, as the kernel sends them (≤ ~800 at a time)."""
        for data, _mono, _wall in self.datagrams():
            yield list(iter_elements(data))

    def close(self) -> None:
        """Stop: the kernel drops the rest of the dump with the socket."""
        self.done = True
        self._sock.close()

    def __enter__(self) -> SetElemDump:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DumpThread:
    """Reads dumps one after another in a thread of its own, for an event loop that polls it.

    `submit(job, open_dump)` queues a dump; `take()` returns, without blocking, what came since
    the last call, in order: `(job, data, mono, wall_ms)` for each datagram (see
    `SetElemDump.datagrams`) and `(job, None, dump, error)` once a dump has ended (error None,
    or what ended it; dump None if it could not be opened).

    Backpressure: at most `window` datagrams are taken or waiting and not yet `release()`d; past
    that the thread waits, and so does the kernel's dump (it builds the next datagram only when
    we read). Memory stays at `window` x 32 KiB, however big the set and however slow the loop.

    Why polled, not handed over with `call_soon_threadsafe`: waking the loop for each datagram
    makes it wait for the GIL just as this thread gives it up to enter `recvmsg`, and the
    kernel's walk of a big set, which then runs for tens of milliseconds on that CPU without
    yielding it, is where the woken loop thread is often placed: measured at 1M, pauses of the
    loop grew with the walk (up to 50 ms, every few seconds). The thread's own Python work per
    datagram is a copy and a header scan (microseconds); decoding is the loop's, which can stop
    between any two elements.
    """

    def __init__(self, window: int = 8) -> None:
        self._room = threading.Semaphore(window)
        self._jobs: queue.SimpleQueue[tuple[object, Callable[[], SetElemDump]] | None] = \
            queue.SimpleQueue()
        self._out: collections.deque[tuple[Any, ...]] = collections.deque()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def submit(self, job: object, open_dump: Callable[[], SetElemDump]) -> None:
        """Read the dump that `open_dump()` opens, after those submitted before. It is called
        in the thread when the dump's turn comes (so the dump shows the set as it is then,
        not as it was when it was queued), in the process's network namespace."""
        self._jobs.put((job, open_dump))
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="nftsync-setdump",
                                            daemon=True)
            self._thread.start()

    def take(self) -> list[tuple[Any, ...]]:
        out = []
        while self._out:
            out.append(self._out.popleft())
        return out

    def release(self) -> None:
        """One taken datagram is done with."""
        self._room.release()

    def close(self, wait: float = 1.0) -> None:
        self._stop.set()
        self._jobs.put(None)
        if self._thread is not None:
            self._thread.join(wait)

    def _run(self) -> None:
        while not self._stop.is_set():
            item = self._jobs.get()
            if item is None:
                return
            job, open_dump = item
            dump: SetElemDump | None = None
            error: BaseException | None = None
            try:
                dump = open_dump()
                for data, mono, wall in dump.datagrams():
                    while not self._room.acquire(timeout=0.2):
                        if self._stop.is_set():
                            return
                    self._out.append((job, data, mono, wall))
            except Exception as exc:  # noqa: BLE001 - whatever ended it is the loop's to report
                error = exc
            finally:
                if dump is not None:
                    dump.close()
            self._out.append((job, None, dump, error))
