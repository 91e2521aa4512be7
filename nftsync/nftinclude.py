"""The files a ruleset brings in with nft's `include`, found the way libnftables finds them.

`nftsync apply` hands the farm file to libnftables, which reads every file it includes by
itself. A limit on the farm file alone is thus no limit (issue 13: 4.6 MB came in through an
include and took 12 s), and an included FIFO blocks nft's read. So before libnftables sees the
file, `read_sources` walks the includes itself, the way libnftables 1.0.x resolves them
(src/scanner.l):

* `include "NAME"`: a quoted string, no escapes, anywhere a statement may be (also inside a
  table or chain block); not inside a comment or another string;
* NAME starting with `/`, `./` or `../` is used as it is (relative to the working directory of
  the process, not of the including file); any other NAME is looked up in the include paths
  (libnftables' default, /etc; nftsync adds none): the first that has it wins;
* NAME with a wildcard (`*`, `?`, `[`) includes every match, in each include path, in
  alphabetical order, and no match is not an error; directories among the matches are skipped;
* nesting stops at 16 levels (MAX_INCLUDE_DEPTH).

Every file must be a regular file (opened without blocking, nftsync.files), and all of them
together, each counted as often as it is included, within the caller's byte limit.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass

from nftsync.errors import RulesetError
from nftsync.files import FileRefused, open_regular, read_fd, size_text

INCLUDE_PATHS = ("/etc",)  # libnftables' DEFAULT_INCLUDE_PATH on Debian (sysconfdir)
MAX_DEPTH = 16  # libnftables' MAX_INCLUDE_DEPTH: the top file is level 1
MAX_FILES = 1000  # files read in all: a wildcard inside a wildcard must not fan out for ever

# A string, a comment, or an include statement, whichever starts first: what is inside a
# string or a comment is never taken for an include.
_TOKENS = re.compile(r'"[^"]*"|#[^\n]*|(?<![\w-])include[ \t]+"([^"]*)"')
_WILDCARD = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class Source:
    """One file of a ruleset, as read (each inclusion of a file is one Source)."""

    path: str
    text: str
    included_at: str | None = None  # "FILE:LINE" of the include that brought it in
    depth: int = 1


def includes(text: str) -> list[tuple[int, str]]:
    """The include statements of a ruleset text: (line number, the quoted name)."""
    out = []
    for m in _TOKENS.finditer(text):
        if m.group(1) is not None:
            out.append((text.count("\n", 0, m.start()) + 1, m.group(1)))
    return out


def resolve(name: str, paths: tuple[str, ...] = INCLUDE_PATHS) -> list[str] | None:
    """The files `include "name"` reads, in order; None if nothing is found where libnftables
    would report "File not found" (a name without wildcard that exists nowhere)."""
    wildcard = bool(_WILDCARD.search(name))
    if name.startswith(("/", "./", "../")):
        patterns = [name]
    else:
        patterns = [os.path.join(p, name) for p in paths]
    found: list[str] = []
    for pattern in patterns:
        if wildcard:
            matches = sorted(glob.glob(pattern))
        elif os.path.lexists(pattern):
            matches = [pattern]
        else:
            continue
        found += [m for m in matches if not os.path.isdir(m)]
        if not wildcard:
            return found  # the first include path that has it: the search stops there
    return found if wildcard else None


def read_sources(path: str, limit: int) -> list[Source]:
    """The file at `path` and everything it includes, recursively; at most `limit` bytes and
    MAX_FILES files in all. Raises RulesetError naming the file, the line of the include and
    the reason (missing, not a regular file, too big, nested too deep)."""
    sources: list[Source] = []
    total = 0
    stack: list[tuple[str, str, int]] = [(path, "", 1)]  # (path, included at, depth)
    while stack:
        file, at, depth = stack.pop()
        where = f"{at}: " if at else ""
        what = "included file" if at else "ruleset file"
        if len(sources) >= MAX_FILES:
            raise RulesetError(f"{where}the ruleset includes more than {MAX_FILES} files")
        try:
            fd = open_regular(file, what)
        except FileRefused as exc:
            raise RulesetError(f"{where}{exc}") from None
        except OSError as exc:
            raise RulesetError(f"{where}{what} {file}: cannot open: {exc.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            data = read_fd(fd, limit - total)
        except OSError as exc:
            raise RulesetError(f"{where}{what} {file}: cannot read: {exc.strerror}") from None
        finally:
            os.close(fd)
        total += len(data)
        if total > limit:
            size = max(size, len(data))
            if not at:
                raise RulesetError(f"{file}: larger than {size_text(limit)} "
                                   f"({size_text(size)}); a farm file should not be")
            raise RulesetError(f"{at}: included file {file} ({size_text(size)}) takes the "
                               f"ruleset past {size_text(limit)} (the farm file and every file "
                               "it includes, together)")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise RulesetError(f"{where}{what} {file}: not UTF-8 text") from None
        sources.append(Source(file, text, at or None, depth))
        children = []
        for line, name in includes(text):
            here = f"{file}:{line}"
            if depth >= MAX_DEPTH:
                raise RulesetError(f'{here}: include "{name}" is nested deeper than '
                                   f"{MAX_DEPTH} levels (does a file include itself?)")
            files = resolve(name)
            if files is None:
                raise RulesetError(f'{here}: include "{name}": no such file (a name without '
                                   f"/, ./ or ../ is looked up in {', '.join(INCLUDE_PATHS)})")
            children += [(f, f'{here}: include "{name}"', depth + 1) for f in files]
        stack.extend(reversed(children))  # depth first, in the order nft reads them
    return sources
