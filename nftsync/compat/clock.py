"""The kernel's jiffies clock, as seen from user space, for xt_recent timestamps.

xt_recent stamps each packet with `jiffies`, which starts at INITIAL_JIFFIES = 2^32 - 300*HZ (so
that 32-bit wrap bugs show up five minutes after boot): that is why /proc/net/xt_recent shows values
near 2^32 on a fresh 64-bit host. Stamps are meaningful only on the host that made them, so anything
sent to another host is turned into ages/remaining seconds here, and turned back into local jiffies
on the receiving side.

`now()` must never be *ahead* of the kernel's jiffies: the patched `*addr;...` command refuses
stamps in the future. /proc/timer_list gives the exact value (root only); without it we estimate
from /proc/uptime, which runs about a quarter second ahead of jiffies, and step back one second.
"""

from __future__ import annotations

import gzip
import os
import re
from dataclasses import dataclass

from nftsync.errors import NftsyncError

TIMER_LIST = "/proc/timer_list"
UPTIME = "/proc/uptime"
CONFIG_GZ = "/proc/config.gz"
HZ_CANDIDATES = (100, 250, 300, 1000)
# How far the uptime-based estimate steps back so that it is never ahead of jiffies.
ESTIMATE_MARGIN_S = 1.0
_TIMER_LIST_MAX = 1 << 20  # the first "jiffies:" line is in cpu 0's section, a few KiB in
_JIFFIES_LINE = re.compile(rb"^jiffies: (\d{1,20})$", re.MULTILINE)
_CONFIG_HZ = re.compile(rb"^CONFIG_HZ=(\d{1,5})$", re.MULTILINE)


class ClockError(NftsyncError):
    """HZ or the current jiffies cannot be found on this host."""

    exit_code = 2


def initial_jiffies(hz: int, bits: int = 64) -> int:
    """INITIAL_JIFFIES: ((unsigned long)(unsigned int)(-300*HZ)), as include/linux/jiffies.h."""
    return ((-300 * hz) % (1 << 32)) % (1 << bits)


def jiffies_diff(a: int, b: int, bits: int = 64) -> int:
    """a - b as the kernel's time_after() sees it: signed, modulo 2^bits (handles wrap)."""
    mod = 1 << bits
    d = (a - b) % mod
    return d - mod if d >= mod // 2 else d


def read_timer_list_jiffies(path: str = TIMER_LIST) -> int | None:
    """The kernel's jiffies from /proc/timer_list, or None when it is unreadable (not root)."""
    try:
        with open(path, "rb") as f:
            buf = b""
            while len(buf) < _TIMER_LIST_MAX:
                chunk = f.read(16384)
                if not chunk:
                    break
                buf += chunk
                m = _JIFFIES_LINE.search(buf)
                if m:
                    return int(m.group(1))
    except OSError:
        return None
    return None


def read_uptime(path: str = UPTIME) -> float:
    try:
        with open(path) as f:
            return float(f.read(128).split()[0])
    except (OSError, ValueError, IndexError) as exc:
        raise ClockError(f"cannot read the uptime from {path}: {exc}") from exc


def _config_hz_from(data: bytes) -> int | None:
    m = _CONFIG_HZ.search(data)
    return int(m.group(1)) if m else None


def _config_hz(path: str) -> int | None:
    """CONFIG_HZ from a kernel config file (gzipped for /proc/config.gz), None if absent."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return _config_hz_from(f.read(1 << 22))
        with open(path, "rb") as f:
            return _config_hz_from(f.read(1 << 22))
    except (OSError, EOFError):
        return None


def detect_hz() -> tuple[int, str]:
    """(HZ, how it was found): CONFIG_HZ from /proc/config.gz or /boot/config-<release>, else by
    matching /proc/timer_list's jiffies against the uptime for the HZ values Linux offers."""
    for path in (CONFIG_GZ, f"/boot/config-{os.uname().release}"):
        hz = _config_hz(path)
        if hz:
            return hz, path
    j = read_timer_list_jiffies()
    if j is not None:
        up = read_uptime()
        best = min(HZ_CANDIDATES, key=lambda hz: abs((j - initial_jiffies(hz)) / hz - up))
        if abs((j - initial_jiffies(best)) / best - up) < 5.0:
            return best, f"{TIMER_LIST} vs {UPTIME}"
    raise ClockError(
        "cannot find the kernel's HZ: no CONFIG_HZ in /proc/config.gz or /boot/config-*, and "
        "/proc/timer_list is unreadable (run as root, or pass the HZ explicitly)"
    )


def kernel_bits() -> int:
    """Width of unsigned long in the kernel: 64 on the 64-bit machines, else 32."""
    machine = os.uname().machine
    return 64 if machine.endswith("64") or machine in ("s390x", "ppc64le") else 32


@dataclass(slots=True)
class KernelClock:
    """jiffies <-> seconds on this host. `exact` says whether now() reads the kernel's own value."""

    hz: int
    bits: int = 64
    hz_source: str = "given"

    @classmethod
    def detect(cls, hz: int | None = None) -> KernelClock:
        if hz is not None:
            if hz <= 0 or hz > 10000:
                raise ClockError(f"HZ {hz} is not a kernel tick rate")
            return cls(hz=hz, bits=kernel_bits())
        found, source = detect_hz()
        return cls(hz=found, bits=kernel_bits(), hz_source=source)

    @property
    def exact(self) -> bool:
        return read_timer_list_jiffies() is not None

    def now(self) -> int:
        """Current jiffies, never ahead of the kernel's (see the module docstring)."""
        j = read_timer_list_jiffies()
        if j is not None:
            return j
        up = read_uptime() - ESTIMATE_MARGIN_S
        est = initial_jiffies(self.hz, self.bits) + int(up * self.hz)
        return est % (1 << self.bits)

    def age_s(self, stamp: int, now: int) -> float:
        """Seconds since `stamp` (negative if it is after `now`)."""
        return jiffies_diff(now, stamp, self.bits) / self.hz

    def stamp_for_age(self, age_s: float, now: int) -> int:
        """The jiffies value `age_s` seconds before `now` (never after now)."""
        ticks = max(0, round(age_s * self.hz))
        return (now - ticks) % (1 << self.bits)
