"""Prometheus' text exposition format (version 0.0.4), and the histogram the daemon counts into.

Pure: no I/O, no clock, no daemon state. `daemon.metrics` reads the daemon and writes through
`Exposition`; `Histogram` is what the hot paths observe into (peer.py: replication lag and
snapshot durations), so its `observe` must stay a few hundred nanoseconds: one `bisect` over a
fixed tuple of bounds and two additions, no allocation. The format itself is Prometheus' (see
its "Exposition formats" page): `# HELP`, `# TYPE`, then `name{label="value",...} number`
lines, histograms as cumulative `_bucket{le=...}` series plus `_sum` and `_count`.

Why not python3-prometheus-client: docs/metrics.md, "Why the standard library".
"""

from __future__ import annotations

import math
import re
from bisect import bisect_left
from collections.abc import Iterable, Mapping

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
TYPES = ("counter", "gauge", "histogram", "untyped")


class Histogram:
    """Counts of observations by upper bound (`le`), their sum and number.

    `bounds` are in the unit of the metric (seconds for the daemon's); an observation equal to a
    bound falls in that bound's bucket, as Prometheus' `le` says. Counts are per bucket, not
    cumulative (the exposition accumulates them), so `observe` touches one slot only.
    """

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = tuple(float(b) for b in bounds)
        if not self.bounds or list(self.bounds) != sorted(set(self.bounds)) or \
                not all(math.isfinite(b) for b in self.bounds):
            raise ValueError(f"histogram bounds must be finite and strictly increasing: "
                             f"{self.bounds}")
        self.counts = [0] * (len(self.bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= it) for every bound and +Inf, as exposed."""
        out, n = [], 0
        for bound, c in zip((*self.bounds, math.inf), self.counts, strict=True):
            n += c
            out.append((bound, n))
        return out


def format_value(value: float | int | bool) -> str:
    """A sample value as Prometheus writes it: integers without a fraction, +Inf/-Inf/NaN."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


Labels = Mapping[str, str]


class Exposition:
    """Builds one scrape's text: each metric family once (HELP, TYPE), then its samples.

    Families must be declared before their samples and each only once: Prometheus refuses a
    scrape that repeats a family or interleaves two (`promtool check metrics` says so too).
    """

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._families: dict[str, str] = {}
        self._current = ""

    def family(self, name: str, kind: str, help_text: str) -> None:
        if not _NAME_RE.fullmatch(name):
            raise ValueError(f"bad metric name {name!r}")
        if kind not in TYPES:
            raise ValueError(f"bad metric type {kind!r}")
        if name in self._families:
            raise ValueError(f"metric family {name} declared twice")
        if kind == "counter" and not name.endswith("_total"):
            raise ValueError(f"counter {name} must end in _total")
        self._families[name] = kind
        self._current = name
        self._lines.append(f"# HELP {name} {_escape_help(help_text)}")
        self._lines.append(f"# TYPE {name} {kind}")

    def sample(self, value: float | int | bool, labels: Labels | None = None,
               suffix: str = "") -> None:
        """A sample of the family declared last (`suffix`: `_bucket`, `_sum`, `_count`)."""
        if not self._current:
            raise ValueError("sample before any family")
        self._lines.append(f"{self._current}{suffix}{_labels(labels)} {format_value(value)}")

    def metric(self, name: str, kind: str, help_text: str,
               samples: Iterable[tuple[Labels | None, float | int | bool]]) -> None:
        """A family and its samples in one call (a family without samples is still declared:
        dashboards then see the metric exists)."""
        self.family(name, kind, help_text)
        for labels, value in samples:
            self.sample(value, labels)

    def histogram(self, hist: Histogram, labels: Labels | None = None) -> None:
        """One histogram's series, for the (histogram) family declared last."""
        base = dict(labels or {})
        for bound, n in hist.cumulative():
            self.sample(n, {**base, "le": format_value(bound)}, "_bucket")
        self.sample(hist.sum, base or None, "_sum")
        self.sample(hist.count, base or None, "_count")

    def text(self) -> str:
        return "\n".join(self._lines) + "\n"


def _labels(labels: Labels | None) -> str:
    if not labels:
        return ""
    parts = []
    for key, value in labels.items():
        if not _LABEL_RE.fullmatch(key) or key.startswith("__"):
            raise ValueError(f"bad label name {key!r}")
        parts.append(f'{key}="{escape_label(str(value))}"')
    return "{" + ",".join(parts) + "}"


#: Replication lag (an update frame sent -> its ACK): ~1 ms on a quiet LAN link, tens of ms
#: under load, seconds when the peer or its kernel writer falls behind (stall_after: 10 s).
LAG_BOUNDS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                30.0)
#: A full snapshot, sent or received: ms for a few sessions, ~a minute for a million.
SNAPSHOT_BOUNDS_S = (0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
