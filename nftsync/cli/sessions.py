"""`nftsync sessions list|add|del|flush`."""

from __future__ import annotations

import click

from nftsync import sessions as admin
from nftsync.cli.common import emit, handle_errors, json_option, require_root

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
      nftsync sessions list --json
      nftsync sessions add 10.10.1.7 0x201 --expires 90s
      nftsync sessions add --static 10.10.1.8 10.20.0.12
      nftsync sessions del 10.10.1.7
      nftsync sessions flush --farm web
    """


@command.command("list")
@farm_option
@click.option("--static/--timed", "static", default=None,
              help="Only the static map, or only the timed one (default: both).")
@json_option
@handle_errors
def list_(farm: str | None, static: bool | None, as_json: bool) -> None:
    """List sessions: client, backend mark and address, backend state, seconds left."""
    require_root()
    rows = admin.list_sessions(farm, static=static)
    emit(as_json, rows, _table)


def _table(rows: list[dict]) -> str:
    if not rows:
        return "no sessions"
    out = [f"{'FARM':10} {'MAP':8} {'CLIENT':28} {'BACKEND':10} {'ADDRESS':24} {'STATE':6} EXPIRES"]
    for r in rows:
        exp = "never" if r["expires"] is None else f"{r['expires']}s"
        out.append(f"{r['farm']:10} {r['map']:8} {r['client']:28} {r['backend']:10} "
                   f"{r['address'] or '?':24} {r['state']:6} {exp}")
    return "\n".join(out)


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
