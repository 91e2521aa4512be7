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
import ipaddress
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from nftsync.compat.clock import KernelClock
from nftsync.errors import NftsyncError

PROC_DIR = "/proc/thread-self/net/xt_recent"
PARAMS_DIR = "/sys/module/xt_recent/parameters"
DEFAULT_IP_LIST_TOT = 100

# Bounds for parsing untrusted /proc text. The kernel keeps at most 65535 stamps per entry
# (u16 nstamps); a line is "src=<39> ttl: <3> last_seen: <20> oldest_pkt: <5>" + stamps of
# ", <20>" each. Tables beyond a million entries are not something this tool reads.
MAX_STAMPS = 65535
MAX_LINE = 4 + 39 + 6 + 3 + 12 + 20 + 13 + 5 + 1 + MAX_STAMPS * 22 + 1
MAX_ENTRIES = 1_000_000
NAME_LEN = 200  # XT_RECENT_NAME_LEN, NUL included

_LINE = re.compile(
    r"src=(?P<addr>[0-9A-Fa-f:.]{2,45}) ttl: (?P<ttl>\d{1,3}) last_seen: (?P<last>\d{1,20}) "
    r"oldest_pkt: (?P<index>\d{1,5}) (?P<stamps>\d{1,20}(?:, \d{1,20})*)"
)
_NAME = re.compile(r"[A-Za-z0-9_.:\-]{1,199}")


class XtRecentError(NftsyncError):
    """An xt_recent table is missing, malformed, full, or refused a write."""

    exit_code = 2


class ProcFormatError(XtRecentError):
    """A /proc/net/xt_recent line does not have the kernel's format."""


class TableFullError(XtRecentError):
    """Adding a new address would make the kernel evict the oldest entry."""


@dataclass(frozen=True, slots=True)
class RecentEntry:
    """One /proc/net/xt_recent line. `stamps` are jiffies, oldest first (the kernel prints its
    ring buffer in slot order; `index` = "oldest_pkt", really the ring's next write slot)."""

    addr: str
    ttl: int
    last_seen: int
    index: int
    stamps: tuple[int, ...]

    @property
    def family(self) -> int:
        return 6 if ":" in self.addr else 4

    @property
    def hits(self) -> int:
        return len(self.stamps)

    def remaining_s(self, seconds: float, clock: KernelClock, now: int) -> float:
        """Seconds until a `--rcheck --seconds SECONDS` stops matching (<= 0: expired)."""
        return seconds - clock.age_s(self.last_seen, now)

    def session(self, clock: KernelClock, now: int, seconds: float | None = None) -> RecentSession:
        ages = tuple(clock.age_s(s, now) for s in self.stamps)
        remaining = None if seconds is None else seconds - ages[-1]
        return RecentSession(self.addr, ages, self.ttl, remaining)


@dataclass(frozen=True, slots=True)
class RecentSession:
    """A host-independent entry: ages (seconds since each packet, oldest first) instead of jiffies.
    This is what replication and migration exchange; `remaining_s` is for display and needs the
    farm's --seconds."""

    addr: str
    ages_s: tuple[float, ...]
    ttl: int = 0
    remaining_s: float | None = None

    def to_json(self) -> dict:
        return {"addr": self.addr, "ages_s": list(self.ages_s), "ttl": self.ttl,
                "remaining_s": self.remaining_s}


@dataclass(frozen=True, slots=True)
class AddResult:
    """How an add went: `exact` is False when the stock `+addr` fallback reset age/hits/ttl."""

    method: str  # "stamps" (patched *addr command) or "plus" (stock +addr)
    exact: bool
    replaced: bool
    evicted: bool
    stamps: tuple[int, ...] = field(default=())


def canonical_addr(text: str) -> str:
    """The address as Python writes it (IPv6 compressed); raises XtRecentError if it is none."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError as exc:
        raise XtRecentError(f"not an IPv4/IPv6 address: {text!r}") from exc


def parse_line(line: str, *, source: str = "<text>", lineno: int = 0) -> RecentEntry:
    where = f"{source}:{lineno}"
    if len(line) > MAX_LINE:
        raise ProcFormatError(f"{where}: line of {len(line)} characters is longer than any the "
                              "kernel writes")
    m = _LINE.fullmatch(line)
    if not m:
        shown = line if len(line) <= 80 else line[:77] + "..."
        raise ProcFormatError(f"{where}: not an xt_recent entry: {shown!r}")
    try:
        addr = str(ipaddress.ip_address(m["addr"]))
    except ValueError:
        raise ProcFormatError(f"{where}: bad address {m['addr']!r}") from None
    ttl, last, index = int(m["ttl"]), int(m["last"]), int(m["index"])
    ring = [int(s) for s in m["stamps"].split(", ")]
    if ttl > 255:
        raise ProcFormatError(f"{where}: ttl {ttl} above 255")
    if len(ring) > MAX_STAMPS or index > len(ring):
        raise ProcFormatError(f"{where}: oldest_pkt {index} does not fit {len(ring)} stamps")
    # Slots index.. hold the older, wrapped-around stamps; 0..index-1 the newer ones. Unwrapped
    # (index == count) this is the slot order. index 0 only after a u8/u16 index wraps.
    stamps = tuple(ring[index:] + ring[:index])
    if stamps[-1] != last:
        raise ProcFormatError(f"{where}: last_seen {last} is not the newest stamp {stamps[-1]}")
    return RecentEntry(addr, ttl, last, index, stamps)


def parse_proc(text: str, *, source: str = "<text>",
               max_entries: int = MAX_ENTRIES) -> list[RecentEntry]:
    """All entries of a /proc/net/xt_recent file's text; a bad line raises ProcFormatError that
    names `source` and the line number."""
    entries: list[RecentEntry] = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line:
            continue
        if len(entries) >= max_entries:
            raise ProcFormatError(f"{source}: more than {max_entries} entries")
        entries.append(parse_line(line, source=source, lineno=lineno))
    return entries


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


_PROBE_SCRIPT = r"""
set -e
P=/proc/net/xt_recent/nftsync_probe
"$1" -w -A INPUT -m recent --name nftsync_probe --rcheck
echo +192.0.2.1 > $P
N=$(sed -n 's/^src=192\.0\.2\.1 ttl: 0 last_seen: \([0-9]*\) .*/\1/p' $P)
[ -n "$N" ]
if echo "*192.0.2.1;9;$N;" > $P 2>/dev/null; then
    grep -q "^src=192\.0\.2\.1 ttl: 9 last_seen: $N oldest_pkt: 1 $N\$" $P && echo present && exit 0
    echo broken
else
    echo absent
fi
"""


def probe_patched(iptables: str = "iptables", timeout: float = 10.0) -> tuple[bool | None, str]:
    """Whether the running kernel's xt_recent takes `*addr;ttl;stamps;` writes.

    The probe runs in a throw-away network namespace (`unshare --net`), so the only table it
    touches is one it creates there: an iptables rule `-m recent --name nftsync_probe` makes it,
    `+192.0.2.1` gives a valid current stamp, and `*192.0.2.1;9;<that stamp>;` must then read back
    exactly. A stock kernel refuses any `*` line with EINVAL and changes nothing, so there is no
    harm either way. Returns (answer, reason); answer None when the probe could not run.
    """
    unshare = shutil.which("unshare")
    ipt = shutil.which(iptables)
    if unshare is None or ipt is None:
        return None, f"needs unshare and {iptables}"
    try:
        proc = subprocess.run([unshare, "--net", "sh", "-c", _PROBE_SCRIPT, "probe", ipt],
                              capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"probe did not run: {exc}"
    out = proc.stdout.strip().splitlines()
    word = out[-1] if out else ""
    if word == "present":
        return True, "the '*addr;ttl;stamps;' command inserted an entry with its stamps"
    if word == "absent":
        return False, "the kernel refused '*addr;ttl;stamps;' (stock xt_recent)"
    if word == "broken":
        return None, "the kernel took '*addr;...' but did not store the stamps given"
    err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return None, f"probe failed in a scratch namespace: {err}"


_probe_cache: dict[str, bool | None] = {}


def kernel_has_stamps_command(iptables: Sequence[str] = ("iptables", "iptables-legacy")) -> bool:
    """Cached probe_patched() with the first iptables that gives an answer (iptables-nft needs
    nf_tables, iptables-legacy the legacy tables: a host may have only one). An inconclusive
    probe counts as absent: the +addr fallback is always safe."""
    key = ",".join(iptables)
    if key not in _probe_cache:
        answer = None
        for binary in iptables:
            answer = probe_patched(binary)[0]
            if answer is not None:
                break
        _probe_cache[key] = answer
    return bool(_probe_cache[key])


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
