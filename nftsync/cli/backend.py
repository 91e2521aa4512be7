"""`nftsync backend list|set`."""

from __future__ import annotations

import click

from nftsync import backends
from nftsync.cli.common import emit, handle_errors, json_option, require_root
from nftsync.model import BackendState
from nftsync.sessions import select_farm


@click.group("backend")
def command() -> None:
    """Show backends and set them up, drain or down.

    \b
    up     gets new clients from the farm's scheduler
    drain  keeps its sessions and connections, gets no new clients
    down   its sessions and connections are removed, so its clients re-balance

    New clients scheduled to a drained or down backend go to an up backend instead, through the
    farm's states map (see rulesets/README.md). States survive `nftsync apply`.

    \b
    Examples:
      nftsync backend list
      nftsync backend set 0x201 drain --farm web
      nftsync backend set 10.20.0.12 up
    """


@command.command("list")
@click.option("--farm", help="Only this farm.")
@json_option
@handle_errors
def list_(farm: str | None, as_json: bool) -> None:
    """List each farm's backends: mark, address, state."""
    require_root()
    from nftsync.ruleset import current_farms

    farms = [select_farm(farm)] if farm else list(current_farms().values())
    rows = [{"farm": f.name, "backend": f"{m:#x}", "address": a, "state": f.state_of(m).value}
            for f in farms for m, a in sorted(f.backends.items())]
    emit(as_json, rows, lambda rs: "\n".join(
        [f"{'FARM':12} {'BACKEND':10} {'ADDRESS':24} STATE"] +
        [f"{r['farm']:12} {r['backend']:10} {r['address']:24} {r['state']}" for r in rs])
        if rs else "no backends")


@command.command("set")
@click.argument("backend")
@click.argument("state", type=click.Choice([s.value for s in BackendState]))
@click.option("--farm", help="Farm name; needed only when several farms are loaded.")
@json_option
@handle_errors
def set_(backend: str, state: str, farm: str | None, as_json: bool) -> None:
    """Set BACKEND (mark or address) to STATE: up, drain or down."""
    require_root()
    f = select_farm(farm)
    result = backends.set_state(f, f.resolve_backend(backend), BackendState(state))
    emit(as_json, result, lambda r: f"farm {r['farm']}: backend {r['backend']} ({r['address']}) "
         f"is now {r['state']}" + (f"; removed {r['sessions_removed']} session(s) and "
                                   f"{r['connections_removed']} connection(s)"
                                   if r["state"] == "down" else ""))
