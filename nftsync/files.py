"""Opening the files nftsync reads (config, key, farm rulesets) without blocking and within bounds.

A plain open() of a FIFO blocks until some process opens it for writing: `nftsync daemon --check`
with a FIFO as its config or key file used to hang for ever (issue 13). So every such file is
opened with O_NONBLOCK (a FIFO then opens at once; for a regular file the flag changes nothing),
checked with fstat on the opened descriptor (a swap between a check and the open cannot slip
a FIFO or a device in), and read up to a bound. Symbolic links are followed: configuration
management commonly links /etc files to a store, and the target is what fstat checks.
"""

from __future__ import annotations

import os
import stat

from nftsync.errors import NftsyncError

#: O_NOCTTY: a terminal device named as a file must not become our controlling terminal.
OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"))


class FileRefused(NftsyncError):
    """A file that exists but must not be read: not a regular file, or larger than allowed.
    The message is one line that starts with what the file is for and its path."""

    exit_code = 2


def file_kind(mode: int) -> str:
    """'a FIFO (named pipe)', 'a directory', ... for the messages; 'a regular file' otherwise."""
    return next((name for test, name in _KINDS if test(mode)), "a regular file")


def open_regular(path: str | os.PathLike[str], what: str) -> int:
    """Open `path` for reading without blocking; its descriptor if it is a regular file.

    Raises FileRefused ("{what} {path} is a FIFO (named pipe), not a regular file") or the
    OSError of the open (FileNotFoundError, PermissionError...), for the caller to word.
    """
    fd = os.open(path, OPEN_FLAGS)
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise FileRefused(f"{what} {os.fspath(path)} is {file_kind(mode)}, not a regular file")
    return fd


def read_fd(fd: int, limit: int) -> bytes:
    """Up to limit + 1 bytes of an open file (one more than allowed shows that it is too big)."""
    chunks: list[bytes] = []
    left = limit + 1
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_regular(path: str | os.PathLike[str], what: str, limit: int) -> bytes:
    """The whole content of the regular file `path`, at most `limit` bytes.

    Raises FileRefused (not a regular file, or larger than `limit`: the size is checked before
    reading, and the read itself stops one byte past the limit, for a file that grows) or the
    OSError of the open or the read.
    """
    fd = open_regular(path, what)
    try:
        size = os.fstat(fd).st_size
        data = b"" if size > limit else read_fd(fd, limit)
    finally:
        os.close(fd)
    if size > limit or len(data) > limit:
        raise FileRefused(f"{what} {os.fspath(path)} is larger than {size_text(limit)} "
                          f"({size_text(max(size, len(data)))})")
    return data


def size_text(n: int) -> str:
    """Bytes in the unit a person would use: '4 MiB', '4.6 MiB', '900 KiB', '12 bytes'."""
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            value = n / (1 << shift)
            return f"{value:.1f} {unit}".replace(".0 ", " ")
    return f"{n} bytes"
