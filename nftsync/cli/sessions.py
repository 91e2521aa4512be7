"""`nftsync sessions get|list|add|del|flush`."""

from __future__ import annotations

import json
import os
import sys

import click

from nftsync import sessionread as read
from nftsync import sessions as admin
from nftsync.cli.common import emit, handle_errors, json_option, require_root
from nftsync.cli.progress import Progress

farm_option = click.option("--farm", help="Farm name (from the map comments); needed only when "
                           "several farms are loaded.")
static_option = click.option("--static", is_flag=True,
                             help="Use the farm's static (pinned, never expiring) map.")


@click.group("sessions")
def command() -> None:
    """Show and change client->backend sessions in a farm's session maps.

    A client is given as the map's key: an address (10.10.1.7), or its parts joined by ' . ' or
    ',' for composite keys (10.10.1.7,40000). A backend is given by mark (0x201) or by address.

    \b
    Examples:
      nftsync sessions get 10.10.1.7
      nftsync sessions list --client 10.10.0.0/16 --backend 0x201 --limit 20
      nftsync sessions list --json
      nftsync sessions add 10.10.1.7 0x201 --expires 90s
      nftsync sessions add --static 10.10.1.8 10.20.0.12
      nftsync sessions del 10.10.1.7
      nftsync sessions flush --farm web
    """


@command.command("get")
@click.argument("client")
@farm_option
@json_option
@handle_errors
def get(client: str, farm: str | None, as_json: bool) -> None:
    """Show CLIENT's session in the static and the timed map (as HAProxy's `show table T key K`).

    CLIENT is the whole key (10.10.1.7, or 10.10.1.7,40000 for a composite key); it is looked
    up in the kernel by that key alone, so it costs the same in a map of ten sessions or of a
    million. Without --farm, every farm whose key CLIENT fits is asked.

    \b
    Exit status: 0 found, 1 no session for CLIENT (message on stderr, and [] with --json),
    2 a key that fits no farm, an unknown farm, or another usage error.
    --json prints a JSON array of the rows (fields as in `sessions list --json`).

    \b
    Examples:
      nftsync sessions get 10.10.1.7
      nftsync sessions get 10.10.1.7,40000 --farm srcport --json
    """
    require_root()
    try:
        rows = read.get_sessions(farm, client)
    except read.SessionAbsent:
        if as_json:
            click.echo("[]")
        raise
    emit(as_json, rows, lambda rs: "\n".join([_HEADER, *map(_line, rs)]))


@command.command("list")
@farm_option
@click.option("--client", "prefix", metavar="PREFIX",
              help="Only clients in this address or network (10.10.1.7, 10.10.0.0/16, "
              "fd00::/64); for composite keys, the key's first part (its address).")
@click.option("--backend", metavar="BACKEND",
              help="Only sessions to this backend, by mark (0x201) or address (10.20.0.12).")
@click.option("--limit", type=click.IntRange(min=1), metavar="N",
              help="Stop after N sessions (the dump ends there: quick on any map size).")
@click.option("--static/--timed", "static", default=None,
              help="Only the static map, or only the timed one (default: both).")
@click.option("--config", "config_path", metavar="PATH",
              help="The daemon's TOML config, for --farm haproxy/TABLE: its [[haproxy]] "
              "admin socket (default: /etc/nftsync/nftsync.toml).")
@json_option
@handle_errors
def list_(farm: str | None, prefix: str | None, backend: str | None, limit: int | None,
          static: bool | None, config_path: str | None, as_json: bool) -> None:
    """List sessions: client, backend mark and address, backend state, seconds left.

    Rows are printed as the kernel hands them out (static map first, then the timed one, in
    the kernel's hash order), so memory stays small at any map size; filters are applied in
    the kernel's bytes before anything is decoded. --json prints one JSON array, one object
    per line, written as the rows come (fields: farm, map, client, backend, address, state,
    expires, timeout; expires and timeout in seconds, null for static entries); if the
    listing fails part-way the array is left unterminated and the exit status is non-zero.

    A --client prefix of at most 65536 addresses (a /16) on a map keyed by the address alone
    is read by looking up each address, in address order: quick at any map size. Otherwise
    the whole map is dumped (a 1M map: ~40 s, the kernel's walk) and filtered.

    A dumped listing of a map that changes meanwhile (new clients, expiries, deletes) is no
    snapshot: the kernel's dump may then skip or repeat a few sessions. Lookups are exact for
    each address when it is asked; so is, for one client: nftsync sessions get CLIENT.

    On a terminal (not with --json) a progress line on stderr counts what has been read; rows
    are printed above it.

    \b
    Examples:
      nftsync sessions list --client 10.10.0.0/16 --backend 0x201
      nftsync sessions list --limit 10 --timed
      nftsync sessions list --farm web --json > sessions.json
      nftsync sessions list --farm haproxy/web   # HAProxy's own stick table (docs/l7.md)
    """
    require_root()
    if farm is not None and farm.startswith("haproxy/"):
        _list_haproxy(farm, config_path, prefix, backend, limit, as_json)
        return
    with Progress.for_cli(as_json) as progress:
        out = _Rows(as_json, progress)
        try:
            for row in read.iter_sessions(farm, static=static, client=prefix, backend=backend,
                                          limit=limit, progress=progress):
                out.write(row)
            out.end()
        except BrokenPipeError:
            # The reader went away (`| head`): stop quietly, as a pipe's writer does.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(141)


def _list_haproxy(farm: str, config_path: str | None, prefix: str | None,
                  backend: str | None, limit: int | None, as_json: bool) -> None:
    """`--farm haproxy/TABLE`: the table as this node's HAProxy holds it (`show table` on the
    admin socket of the [[haproxy]] that replicates TABLE); --client is an exact key here."""
    from nftsync.daemon.config import load_config
    from nftsync.errors import SessionError
    from nftsync.l7 import admin as l7admin

    table = farm.removeprefix("haproxy/")
    config = load_config(config_path)
    found = [h for h in config.haproxy if table in h.tables]
    if not found:
        known = [f"haproxy/{t}" for h in config.haproxy for t in h.tables]
        raise SessionError(f"no [[haproxy]] in {config_path or 'the config'} replicates table "
                         f"{table!r} (known: {', '.join(known) or 'none'})")
    rows = [r for r in l7admin.session_rows(found[0].admin_socket, table)
            if (prefix is None or r["client"] == prefix) and
            (backend is None or backend in (r["backend"], r["address"]))]
    emit(as_json, rows[:limit] if limit else rows,
         lambda rs: "\n".join([_HEADER, *map(_line, rs)]) if rs else "no sessions")


_HEADER = f"{'FARM':10} {'MAP':8} {'CLIENT':28} {'BACKEND':10} {'ADDRESS':24} {'STATE':6} EXPIRES"


def _line(r: dict) -> str:
    exp = "never" if r["expires"] is None else f"{r['expires']}s"
    return (f"{r['farm']:10} {r['map']:8} {r['client']:28} {r['backend']:10} "
            f"{r['address'] or '?':24} {r['state']:6} {exp}")


class _Rows:
    """Writes rows to stdout as they come: text lines under a header, or one JSON array with
    an object per line (valid JSON once `end()` is written, held in memory one row at a time).

    When stdout is the terminal the progress line is on too, the line is cleared before a row
    is written, so rows scroll above it and never share a line with it: a filtered listing
    of a big map can print nothing for many seconds, and the count shows it is working.
    """

    def __init__(self, as_json: bool, progress: Progress) -> None:
        self.stream = sys.stdout
        self.as_json = as_json
        self.progress = progress
        self.clear = progress.enabled and self.stream.isatty()
        self.count = 0

    def write(self, row: dict) -> None:
        if self.clear:
            self.progress.clear()
        if self.as_json:
            sep = ",\n" if self.count else "[\n"
            self.stream.write(sep + json.dumps(row, sort_keys=True))
        else:
            if not self.count:
                self.stream.write(_HEADER + "\n")
            self.stream.write(_line(row) + "\n")
        self.count += 1

    def end(self) -> None:
        if self.clear:
            self.progress.clear()
        if self.as_json:
            self.stream.write("\n]\n" if self.count else "[]\n")
        elif not self.count:
            self.stream.write("no sessions\n")
        self.stream.flush()


@command.command("add")
@click.argument("client")
@click.argument("backend")
@farm_option
@static_option
@click.option("--expires", help="Time left for the session (90, 90s, 2m, 1h30m), at most the "
              "map's timeout (peers cap sessions at it); default: the map's timeout.")
@json_option
@handle_errors
def add(client: str, backend: str, farm: str | None, static: bool, expires: str | None,
        as_json: bool) -> None:
    """Stick CLIENT to BACKEND (replacing any session it has)."""
    require_root()
    row = admin.add_session(farm, client, backend, expires=expires, static=static)
    emit(as_json, row, lambda r: f"{'replaced' if r['replaced'] else 'added'} {r['client']} -> "
         f"{r['backend']} ({r['address']}) in farm {r['farm']}"
         + (f", expires in {r['expires']}s" if r["expires"] is not None else ""))


@command.command("del")
@click.argument("client")
@farm_option
@static_option
@json_option
@handle_errors
def delete(client: str, farm: str | None, static: bool, as_json: bool) -> None:
    """Forget CLIENT's session; its next connection is scheduled afresh."""
    require_root()
    row = admin.del_session(farm, client, static=static)
    emit(as_json, row,
         lambda r: f"deleted {r['client']} from the {r['map']} map of farm {r['farm']}")


@command.command("flush")
@farm_option
@static_option
@json_option
@handle_errors
def flush(farm: str | None, static: bool, as_json: bool) -> None:
    """Remove every session of the farm's session map (or static map)."""
    require_root()
    row = admin.flush_sessions(farm, static=static)
    emit(as_json, row, lambda r: f"flushed the {r['map']} map of farm {r['farm']}")
