"""The text of /proc/net/xt_recent/NAME: entries, parsed exactly and defensively.

A line is `src=ADDR ttl: T last_seen: J oldest_pkt: N j1, j2, ...` (recent_seq_show). The stamps are
the entry's ring buffer in slot order and `oldest_pkt` is really the ring's next write slot, so the
packet order is recovered from it; `last_seen` must be the newest stamp. IPv6 is printed
uncompressed; we keep Python's compressed form. Sizes are bounded by what the kernel can print.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from nftsync.compat.clock import KernelClock
from nftsync.errors import NftsyncError

# Bounds for parsing untrusted /proc text. The kernel keeps at most 65535 stamps per entry
# (u16 nstamps); a line is "src=<39> ttl: <3> last_seen: <20> oldest_pkt: <5>" + stamps of
# ", <20>" each. Tables beyond a million entries are not something this tool reads.
MAX_STAMPS = 65535
MAX_LINE = 4 + 39 + 6 + 3 + 12 + 20 + 13 + 5 + 1 + MAX_STAMPS * 22 + 1
MAX_ENTRIES = 1_000_000

_LINE = re.compile(
    r"src=(?P<addr>[0-9A-Fa-f:.]{2,45}) ttl: (?P<ttl>\d{1,3}) last_seen: (?P<last>\d{1,20}) "
    r"oldest_pkt: (?P<index>\d{1,5}) (?P<stamps>\d{1,20}(?:, \d{1,20})*)"
)


class XtRecentError(NftsyncError):
    """An xt_recent table is missing, malformed, full, or refused a write."""

    exit_code = 2


class ProcFormatError(XtRecentError):
    """A /proc/net/xt_recent line does not have the kernel's format."""


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
