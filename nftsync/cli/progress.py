"""Progress of long CLI work on a terminal: one line on stderr, rewritten in place.

Why a module of its own: apply carrying over many sessions, listing a 1M map, migrating and a
resync through ctl all take seconds; an operator at a terminal wants to see that they move, while
scripts (`--json`, stderr not a TTY) must get nothing but their output. The layers below the CLI
report through a plain callable (`Report`) and know nothing of terminals.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

#: What the layers below call: (what is being done, items done, items expected or None).
Report = Callable[[str, int, "int | None"], None]

#: Redraw at most this often (s): a redraw per item would cost more than the work.
_INTERVAL = 0.2


class Progress:
    """`Progress(enabled)(what, done, total)` draws `what: done/total (pct)` when enabled.

    Use as a context manager so the line is cleared when the work ends, also on an error (the
    error message then starts on a clean line).
    """

    def __init__(self, enabled: bool, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self._last = 0.0
        self._width = 0

    @classmethod
    def for_cli(cls, as_json: bool) -> Progress:
        """Enabled only for a person: not with --json, and only when stderr is a terminal."""
        return cls(not as_json and sys.stderr.isatty())

    def __call__(self, what: str, done: int, total: int | None = None) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < _INTERVAL and (total is None or done < total):
            return
        self._last = now
        text = f"{what}: {done:,}" if total is None else (
            f"{what}: {done:,}/{total:,} ({100 * done // max(total, 1)}%)")
        pad = max(self._width - len(text), 0)
        self._width = len(text)
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()

    def clear(self) -> None:
        if self.enabled and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.clear()
