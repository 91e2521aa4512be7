"""HAProxy's runtime API (the admin socket): the server names and the tables, read as text.

nftsync follows and writes stick tables as HAProxy's peer (nftsync.l7.haproxy, docs/l7.md);
the admin socket serves only what the peers protocol does not carry:

* `show servers state`: which name each server id has, so an entry replicated from the other
  node (which carries the id) is pushed to this HAProxy with the name, what routing looks
  servers up by first;
* `show table T`: what HAProxy itself holds, for `nftsync sessions list --farm haproxy/T`
  and for tests (the data plane, as `sessions list` reads the kernel, not the daemon).

One command per connection (HAProxy closes it after the answer); answers are a few hundred
bytes per server, ~75 bytes per table entry.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from nftsync.errors import NftsyncError

MAX_ANSWER = 64 << 20  # `show table` of 100k entries is ~7.5 MB; bound the read anyway
#: srv_op_state of `show servers state` (HAProxy's enum srv_state).
OP_STATES = {0: "down", 1: "starting", 2: "up", 3: "stopping"}
SRV_ADMF_DRAIN = 0x08  # srv_admin_state bit: drained by the admin (no new clients)


class AdminError(NftsyncError):
    """The admin socket could not be reached or answered an error."""

    exit_code = 2


def command(path: str, line: str, timeout: float = 5.0) -> str:
    """Send one command on the admin socket at `path`, return the whole answer."""
    if "\n" in line or ";" in line:
        raise ValueError(f"one command without ';' or newline: {line!r}")  # a caller's bug
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
            s.sendall(line.encode() + b"\n")
            chunks: list[bytes] = []
            size = 0
            while size <= MAX_ANSWER:
                data = s.recv(1 << 16)
                if not data:
                    break
                chunks.append(data)
                size += len(data)
        except OSError as exc:
            raise AdminError(f"HAProxy admin socket {path}: {exc.strerror or exc}") from None
    text = b"".join(chunks).decode("utf-8", "replace")
    if text.startswith(("Unknown command", "Permission denied")):
        raise AdminError(f"HAProxy admin socket {path}: {line!r}: "
                         f"{text.splitlines()[0]}")
    return text


@dataclass(frozen=True, slots=True)
class Server:
    backend: str
    server_id: int
    name: str
    address: str
    port: int
    state: str  # up, down, drain, starting, stopping


def parse_servers_state(text: str) -> list[Server]:
    """`show servers state` (format version 1): one line per server, `#` comments."""
    out = []
    lines = text.splitlines()
    for ln in lines[1:]:  # the first line is the format version
        f = ln.split()
        if not f or ln.startswith("#") or len(f) < 7:
            continue
        try:
            op, admin = int(f[5]), int(f[6])
            port = int(f[18]) if len(f) > 18 else 0
            state = "drain" if admin & SRV_ADMF_DRAIN else OP_STATES.get(op, str(op))
            out.append(Server(f[1], int(f[2]), f[3], f[4], port, state))
        except ValueError:
            continue
    return out


def servers(path: str, timeout: float = 5.0) -> list[Server]:
    return parse_servers_state(command(path, "show servers state", timeout))


@dataclass(frozen=True, slots=True)
class TableEntry:
    key: str  # as HAProxy prints it, unescaped
    expires_ms: int | None
    server_id: int | None
    server_name: str | None


def _split_key(rest: str) -> tuple[str, str]:
    """`key=` value up to the first unescaped space (HAProxy escapes spaces as `\\ `)."""
    out = []
    i = 0
    while i < len(rest):
        c = rest[i]
        if c == "\\" and i + 1 < len(rest):
            out.append(rest[i + 1])
            i += 2
            continue
        if c == " ":
            break
        out.append(c)
        i += 1
    return "".join(out), rest[i:]


def parse_show_table(text: str) -> list[TableEntry]:
    """`show table T`: `# table: ...` then `0x...: key=K use=0 exp=MS server_id=1
    server_key=be1` per entry."""
    out = []
    for ln in text.splitlines():
        head, sep, rest = ln.partition(": key=")
        if not sep or not head.startswith("0x"):
            continue
        key, rest = _split_key(rest)
        fields = dict(f.split("=", 1) for f in rest.split() if "=" in f)
        exp = fields.get("exp")
        sid = fields.get("server_id")
        name = fields.get("server_key")
        out.append(TableEntry(key, int(exp) if exp and exp.isdigit() else None,
                              int(sid) if sid and sid.lstrip("-").isdigit() else None,
                              None if name in (None, "-") else name))
    return out


def show_table(path: str, table: str, timeout: float = 10.0) -> list[TableEntry]:
    text = command(path, f"show table {table}", timeout)
    if not text.startswith("# table:"):
        raise AdminError(f"HAProxy admin socket {path}: show table {table}: "
                         f"{text.strip().splitlines()[0] if text.strip() else 'no answer'}")
    return parse_show_table(text)


def session_rows(path: str, table: str, timeout: float = 10.0) -> list[dict]:
    """HAProxy's own stick table `table` as `nftsync sessions list` rows (the data plane, as
    `sessions list` reads the kernel's maps): the server's address and state come from `show
    servers state` (the first server of that name; names are the same in every backend that
    shares the table's servers)."""
    by_name: dict[str, Server] = {}
    for srv in servers(path, timeout):
        by_name.setdefault(srv.name, srv)
    rows = []
    for e in show_table(path, table, timeout):
        srv = by_name.get(e.server_name or "") if e.server_name else None
        if srv is None and e.server_id is not None:
            srv = next((s for s in by_name.values() if s.server_id == e.server_id), None)
        rows.append({"farm": f"haproxy/{table}", "map": "stick", "client": e.key,
                     "backend": e.server_name or (f"id {e.server_id}"
                                                  if e.server_id is not None else "-"),
                     "address": f"{srv.address}:{srv.port}" if srv is not None else None,
                     "state": srv.state if srv is not None else "?",
                     "expires": None if e.expires_ms is None else round(e.expires_ms / 1000),
                     "timeout": None})
    return rows
