"""The one place that talks to libnftables.

Every call of `Nft.cmd` is one libnftables buffer, hence one atomic kernel transaction: either all
of it is committed or none of it (this is what makes `nftsync apply` safe). State is read
through the JSON output, never by scraping text, except where a text form is compared as a whole
(rulesets evaluated by the same libnftables print the same text).

Some listings are cheap and some are not: in nft 1.0.6, `list table`, `list tables`, `list chain`
and `list counters` fetch the elements of *every* set in the table first, which for a 200k-element
timeout map costs seconds (the kernel's set dump is quadratic). `list sets`, `list maps`,
`list chains`, `list flowtables` and `list map T M` of a small map are cheap. Callers stick to
those.
"""

from __future__ import annotations

import json
import re
from typing import Any

from nftsync.errors import KernelError, NotRootError, RulesetError

try:
    import nftables as _libnft
except ImportError:  # pragma: no cover - depends on the host
    _libnft = None

_LOCATION = re.compile(r"^(?P<where>\S+?:\d+:\d+(?:-\d+)?): Error: (?P<msg>.*)$")


def first_error(err: str, *, context: str | None = None) -> str:
    """Reduce libnftables' multi-line error text to one line: `file:line:col: problem`.

    libnftables prints the failing input line and a caret marker under it; the first line that says
    `Error:` carries the location (for files) and the problem. For buffers we built ourselves the
    location is meaningless to the user, so the failing command text is appended instead.
    """
    lines = [ln for ln in err.splitlines() if ln.strip()]
    for i, line in enumerate(lines):
        m = _LOCATION.match(line)
        if m:
            where = m["where"]
            if where.startswith("internal:") or where.startswith("/dev/stdin"):
                src = lines[i + 1].strip() if i + 1 < len(lines) else ""
                return f"{m['msg']} (in: {src[:200]})" if src else m["msg"]
            return f"{where}: {m['msg']}{_underlined(lines[i + 1:i + 3])}"
        if line.startswith("Error: "):
            src = lines[i + 1].strip() if i + 1 < len(lines) else ""
            msg = line[len("Error: "):]
            if context:
                return f"{context}: {msg}"
            return f"{msg} (in: {src[:200]})" if src else msg
    head = lines[0] if lines else "unknown libnftables error"
    return (context + ": " if context else "") + head


def _underlined(context: list[str]) -> str:
    """The text libnftables marks with ^^^ under the source line, as ` (at 'TEXT')`."""
    if len(context) < 2 or not set(context[1].strip()) <= {"^", "~"}:
        return ""
    src, marks = context
    picked = "".join(ch for ch, mk in zip(src, marks, strict=False) if mk in "^~").strip()
    return f" (at '{picked[:80]}')" if picked else ""


class Nft:
    """A libnftables context with the output flags nftsync needs."""

    def __init__(self) -> None:
        if _libnft is None:
            raise RulesetError(
                "the 'nftables' Python module is missing: install Debian's python3-nftables and "
                "create the venv with --system-site-packages"
            )
        self._ctx = _libnft.Nftables()
        self._ctx.set_handle_output(False)

    def _run(self, text: str, *, json_out: bool = False, terse: bool = False,
             stateless: bool = False, dry_run: bool = False) -> tuple[int, str, str]:
        ctx = self._ctx
        ctx.set_json_output(json_out)
        ctx.set_terse_output(terse)
        ctx.set_stateless_output(stateless)
        ctx.set_dry_run(dry_run)
        try:
            return ctx.cmd(text)
        finally:
            ctx.set_dry_run(False)

    def cmd(self, text: str, *, dry_run: bool = False, what: str | None = None) -> str:
        """Run `text` as one transaction (or only validate it in the kernel with dry_run)."""
        rc, out, err = self._run(text, dry_run=dry_run)
        if rc != 0:
            raise _error(err, what)
        return out

    def check_file(self, path: str) -> None:
        """Validate a ruleset file in the kernel without committing (like `nft -c -f`)."""
        ctx = self._ctx
        ctx.set_dry_run(True)
        try:
            rc, _out, err = ctx.cmd_from_file(path)
        finally:
            ctx.set_dry_run(False)
        if rc != 0:
            raise RulesetError(first_error(err, context=path))

    def list_json(self, what: str, *, terse: bool = False) -> list[dict[str, Any]]:
        """`nft -j list WHAT`, without the metainfo object."""
        return self.query_json(f"list {what}", terse=terse)

    def query_json(self, command: str, *, terse: bool = False) -> list[dict[str, Any]]:
        """A reading command (`list ...`, `get element ...`) with JSON output."""
        rc, out, err = self._run(command, json_out=True, terse=terse)
        if rc != 0:
            raise _error(err, command)
        if not out.strip():
            return []
        doc = json.loads(out)
        return [obj for obj in doc.get("nftables", []) if "metainfo" not in obj]

    def list_text(self, what: str, *, terse: bool = True) -> str:
        rc, out, err = self._run(f"list {what}", terse=terse, stateless=True)
        if rc != 0:
            raise _error(err, f"list {what}")
        return out


def _error(err: str, what: str | None) -> Exception:
    if "Operation not permitted" in err:
        return NotRootError("not permitted to change nftables: run as root")
    text = first_error(err, context=what)
    if what and what.startswith(("list", "get")):
        return RulesetError(text)
    return KernelError(text)
