"""xt_recent tables (/proc/net/xt_recent/NAME) behind a session-table shape.

The legacy farms keep one `recent` table per backend: an address in `_FARM_MARK_sessions` means
"this client sticks to backend MARK" for as long as its newest stamp is younger than the farm's
`--seconds`. This module reads those tables exactly, and writes them:

- `+addr` (stock): add, or add a stamp of *now* to an existing entry; `-addr`: delete; `/`: flush.
- `*addr;ttl;stamp;...;` (compat/kernel/xt_recent-set-timestamps.patch): insert or replace an entry
  with exactly these stamps. Without the patch we fall back to `-addr` + `+addr`: the entry gets one
  stamp of now, so the remaining time restarts at the full `--seconds`, the hit history is one
  packet (a `--hitcount N` farm forgets it), and the TTL is 0 (`--rttl` stops matching).

Stamps are this host's jiffies. What goes to another host is `RecentSession`: ages in seconds, from
which each side derives remaining time (`--seconds - newest age`) against its own clock.

A table holds at most `ip_list_tot` addresses (module parameter, default 100, one value for all
tables); a new address in a full table makes the kernel *silently evict* the least recently seen
one. `add` refuses that unless asked (`allow_evict=True`) and says so.

The table file exists only while some iptables rule names it (`-m recent --name NAME`). Paths go
through /proc/thread-self so a thread that entered a network namespace sees that namespace's tables.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from nftsync.compat.clock import KernelClock
from nftsync.compat.probe import kernel_has_stamps_command, probe_patched
from nftsync.compat.procfmt import (
    MAX_ENTRIES,
    MAX_LINE,
    MAX_STAMPS,
    ProcFormatError,
    RecentEntry,
    RecentSession,
    XtRecentError,
    canonical_addr,
    parse_line,
    parse_proc,
)

__all__ = [
    "MAX_LINE", "AddResult", "ProcFormatError", "RecentEntry", "RecentSession", "TableFullError",
    "XtRecentError", "XtRecentTable", "canonical_addr", "format_stamps_command", "ip_list_tot",
    "kernel_has_stamps_command", "parse_line", "parse_proc", "probe_patched", "read_param",
    "tables", "TableDiff", "diff_entries", "entries_by_addr",
]

PROC_DIR = "/proc/thread-self/net/xt_recent"
PARAMS_DIR = "/sys/module/xt_recent/parameters"
DEFAULT_IP_LIST_TOT = 100

_NAME = re.compile(r"[A-Za-z0-9_.:\-]{1,199}")


class TableFullError(XtRecentError):
    """Adding a new address would make the kernel evict the oldest entry."""


@dataclass(frozen=True, slots=True)
class AddResult:
    """How an add went: `exact` is False when the stock `+addr` fallback reset age/hits/ttl."""

    method: str  # "stamps" (patched *addr command) or "plus" (stock +addr)
    exact: bool
    replaced: bool
    evicted: bool
    stamps: tuple[int, ...] = field(default=())


def read_param(name: str, params_dir: str = PARAMS_DIR) -> int | None:
    """An xt_recent module parameter (ip_list_tot, ip_pkt_list_tot...), None if not exposed."""
    try:
        with open(os.path.join(params_dir, name)) as f:
            return int(f.read(32).strip())
    except (OSError, ValueError):
        return None


def ip_list_tot(params_dir: str = PARAMS_DIR) -> int:
    return read_param("ip_list_tot", params_dir) or DEFAULT_IP_LIST_TOT


def format_stamps_command(addr: str, ttl: int, stamps: Sequence[int]) -> bytes:
    """The patched kernel's `*addr;ttl;stamp;...;` line."""
    if not stamps:
        raise XtRecentError("an entry needs at least one stamp")
    if not 0 <= ttl <= 255:
        raise XtRecentError(f"ttl {ttl} is not 0..255")
    return ("*" + addr + ";" + str(ttl) + ";" + "".join(f"{s};" for s in stamps)).encode()


class XtRecentTable:
    """One xt_recent table as a session table: client address -> packet stamps.

    `seconds` is the farm's `--rcheck --seconds`, used for remaining time and to skip expired
    entries in `sessions()`. `patched` None means: probe the kernel once (see probe_patched).
    """

    def __init__(self, name: str, seconds: float | None = None, *,
                 clock: KernelClock | None = None, patched: bool | None = None,
                 proc_dir: str = PROC_DIR, params_dir: str = PARAMS_DIR) -> None:
        if not _NAME.fullmatch(name):
            raise XtRecentError(
                f"bad xt_recent table name {name!r} (1..199 of A-Z a-z 0-9 _ . : -)")
        self.name = name
        self.seconds = seconds
        self.path = os.path.join(proc_dir, name)
        self._clock = clock
        self._patched = patched
        self._params_dir = params_dir

    # -- reading ------------------------------------------------------------------------------

    @property
    def clock(self) -> KernelClock:
        if self._clock is None:
            self._clock = KernelClock.detect()
        return self._clock

    @property
    def patched(self) -> bool:
        if self._patched is None:
            self._patched = kernel_has_stamps_command()
        return self._patched

    @property
    def capacity(self) -> int:
        """ip_list_tot: how many addresses the table keeps before it evicts the oldest."""
        return ip_list_tot(self._params_dir)

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def read_text(self) -> str:
        limit = min(MAX_ENTRIES, max(self.capacity, 1)) * MAX_LINE
        try:
            with open(self.path, "rb") as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            raise XtRecentError(self._missing()) from None
        except OSError as exc:
            raise XtRecentError(f"cannot read {self.path}: {exc.strerror}") from exc
        if len(data) > limit:
            raise ProcFormatError(f"{self.path}: more than {limit} bytes")
        try:
            return data.decode("ascii")
        except UnicodeDecodeError as exc:
            raise ProcFormatError(f"{self.path}: non-ASCII byte at offset {exc.start}") from None

    def list(self) -> list[RecentEntry]:
        return parse_proc(self.read_text(), source=self.path,
                          max_entries=max(self.capacity, 1))

    def get(self, addr: str) -> RecentEntry | None:
        want = canonical_addr(addr)
        return next((e for e in self.list() if e.addr == want), None)

    def sessions(self, *, include_expired: bool = False) -> list[RecentSession]:
        """Entries as host-independent sessions; without --seconds nothing counts as expired."""
        entries = self.list()
        now = self.clock.now()
        out = [e.session(self.clock, now, self.seconds) for e in entries]
        if self.seconds is None or include_expired:
            return out
        return [s for s in out if s.remaining_s is not None and s.remaining_s > 0]

    # -- writing ------------------------------------------------------------------------------

    def add(self, addr: str, remaining_s: float | None = None, *,
            ages_s: Sequence[float] | None = None, stamps: Sequence[int] | None = None,
            ttl: int = 0, allow_evict: bool = False) -> AddResult:
        """Insert or replace `addr`, given exactly one of:

        - `remaining_s`: seconds the session has left (needs the table's `seconds`); capped to
          `seconds`, i.e. one stamp of `now - (seconds - remaining_s)`;
        - `ages_s`: seconds since each packet, oldest first (a RecentSession's history);
        - `stamps`: raw jiffies of *this* host, oldest first (restoring a local snapshot).

        With the stock kernel the entry gets one stamp of now instead (see the module docstring)
        and the result says `exact=False`.
        """
        given = [x is not None for x in (remaining_s, ages_s, stamps)]
        if sum(given) != 1:
            raise XtRecentError("add needs exactly one of remaining_s, ages_s, stamps")
        if remaining_s is not None and self.seconds is None:
            raise XtRecentError("remaining time needs the table's --seconds")
        addr = canonical_addr(addr)
        if not 0 <= ttl <= 255:
            raise XtRecentError(f"ttl {ttl} is not 0..255")
        entries = self.list()
        existing = any(e.addr == addr for e in entries)
        evicts = not existing and len(entries) >= self.capacity
        if evicts and not allow_evict:
            raise TableFullError(
                f"{self.path} is full ({len(entries)} of ip_list_tot={self.capacity} addresses): "
                f"adding {addr} would make the kernel silently evict the least recently seen "
                "client (raise xt_recent's ip_list_tot, or allow eviction)")
        if not self.patched:
            if existing:
                self._write(f"-{addr}".encode())
            self._write(f"+{addr}".encode())
            return AddResult("plus", exact=False, replaced=existing, evicted=evicts)
        want = self._stamps_for(remaining_s, ages_s, stamps)
        self._write(format_stamps_command(addr, ttl, want))
        return AddResult("stamps", exact=True, replaced=existing, evicted=evicts,
                         stamps=tuple(want))

    def add_session(self, session: RecentSession, *, allow_evict: bool = False) -> AddResult:
        return self.add(session.addr, ages_s=session.ages_s, ttl=session.ttl,
                        allow_evict=allow_evict)

    def add_many(self, sessions: Iterable[RecentSession], *,
                 allow_evict: bool = False) -> list[AddResult]:
        """Insert or replace many sessions: one read of the table, one `now`, one open file
        (lseek to 0 between commands, which the kernel requires; ~10x faster than reopening).
        The full-table check covers the whole batch before anything is written."""
        batch = [(canonical_addr(s.addr), s) for s in sessions]
        present = {e.addr for e in self.list()}
        new = {a for a, _ in batch} - present
        overflow = len(present) + len(new) - self.capacity
        if overflow > 0 and not allow_evict:
            raise TableFullError(
                f"{self.path}: {len(new)} new addresses do not fit ({len(present)} of "
                f"ip_list_tot={self.capacity} used): the kernel would silently evict the "
                f"{overflow} least recently seen clients (raise ip_list_tot, or allow eviction)")
        patched = self.patched
        now = self.clock.now() if patched else 0
        results: list[AddResult] = []
        seen = set(present)
        with self._opened() as fd:
            for addr, sess in batch:
                existing = addr in seen
                evicts = not existing and len(seen) >= self.capacity
                seen.add(addr)
                if patched:
                    ages = sorted((max(0.0, a) for a in sess.ages_s), reverse=True)
                    stamps = [self.clock.stamp_for_age(a, now) for a in ages]
                    self._write_fd(fd, format_stamps_command(addr, sess.ttl, stamps))
                    results.append(AddResult("stamps", True, existing, evicts, tuple(stamps)))
                else:
                    if existing:
                        self._write_fd(fd, f"-{addr}".encode())
                    self._write_fd(fd, f"+{addr}".encode())
                    results.append(AddResult("plus", False, existing, evicts))
        return results

    def delete(self, addr: str) -> bool:
        """Remove `addr`; False if it was not there (the kernel says nothing either way)."""
        addr = canonical_addr(addr)
        present = any(e.addr == addr for e in self.list())
        self._write(f"-{addr}".encode())
        return present

    def flush(self) -> None:
        self._write(b"/")

    # -- internals ----------------------------------------------------------------------------

    def _stamps_for(self, remaining_s: float | None, ages_s: Sequence[float] | None,
                    stamps: Sequence[int] | None) -> list[int]:
        if stamps is not None:
            out = [int(s) for s in stamps]
        else:
            clock = self.clock
            now = clock.now()
            if remaining_s is not None:
                if self.seconds is None:
                    raise XtRecentError("remaining time needs the table's --seconds")
                age = max(0.0, self.seconds - min(remaining_s, self.seconds))
                out = [clock.stamp_for_age(age, now)]
            else:
                ordered = sorted((max(0.0, a) for a in ages_s or ()), reverse=True)  # oldest 1st
                out = [clock.stamp_for_age(a, now) for a in ordered]
        if not out:
            raise XtRecentError("an entry needs at least one stamp")
        if len(out) > MAX_STAMPS:
            raise XtRecentError(f"{len(out)} stamps: the kernel keeps at most {MAX_STAMPS}")
        return out

    def _missing(self) -> str:
        return (f"no xt_recent table {self.name!r} ({self.path}): a table exists only while an "
                "iptables rule names it with -m recent --name, in this network namespace")

    @contextlib.contextmanager
    def _opened(self) -> Iterator[int]:
        try:
            fd = os.open(self.path, os.O_WRONLY)
        except FileNotFoundError:
            raise XtRecentError(self._missing()) from None
        except OSError as exc:
            raise XtRecentError(f"cannot open {self.path}: {exc.strerror}") from exc
        try:
            yield fd
        finally:
            os.close(fd)

    def _write(self, line: bytes) -> None:
        with self._opened() as fd:
            self._write_fd(fd, line)

    def _write_fd(self, fd: int, line: bytes) -> None:
        """One command in one write(2) at offset 0: the kernel refuses a write at a non-zero
        offset (so we seek back; pwrite is not allowed on seq files), and a '*' line must
        arrive whole."""
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            n = os.write(fd, line)
        except OSError as exc:
            raise XtRecentError(self._explain(line, exc)) from exc
        if line[:1] == b"*" and n != len(line):
            raise XtRecentError(f"{self.path}: short write ({n} of {len(line)} bytes)")

    def _explain(self, line: bytes, exc: OSError) -> str:
        cmd = line[:60].decode(errors="replace") + ("..." if len(line) > 60 else "")
        hint = {
            errno.EINVAL: "malformed, or (for '*') a kernel without the timestamps patch",
            errno.E2BIG: "more stamps than the table's ring holds (ip_pkt_list_tot/--hitcount)",
            errno.ERANGE: "a stamp in the future, a number too large, or a ttl above 255",
        }.get(exc.errno or 0, "")
        return f"{self.path}: the kernel refused {cmd!r}: {exc.strerror}" + (
            f" ({hint})" if hint else "")


def tables(proc_dir: str = PROC_DIR) -> list[str]:
    """Names of the xt_recent tables in this (thread's) network namespace."""
    try:
        return sorted(os.listdir(proc_dir))
    except FileNotFoundError:
        return []


def entries_by_addr(entries: Iterable[RecentEntry]) -> dict[str, RecentEntry]:
    return {e.addr: e for e in entries}


@dataclass(frozen=True, slots=True)
class TableDiff:
    """What changed between two reads of one table: xt_recent sends no events, so a replicator
    polls (list() of 100 entries ≈ 1.3 ms) and ships only this."""

    upserted: tuple[RecentEntry, ...]  # new addresses, or new stamps/ttl on known ones
    deleted: tuple[str, ...]  # addresses gone (deleted, evicted, or reaped by --reap)


def diff_entries(old: Iterable[RecentEntry], new: Iterable[RecentEntry]) -> TableDiff:
    before = entries_by_addr(old)
    after = entries_by_addr(new)
    upserted = tuple(e for a, e in after.items()
                     if a not in before or before[a].stamps != e.stamps
                     or before[a].ttl != e.ttl)
    deleted = tuple(a for a in before if a not in after)
    return TableDiff(upserted, deleted)
