"""Shared CLI plumbing: error reporting, --json output, root check, lazy subcommands."""

from __future__ import annotations

import functools
import importlib
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from nftsync.errors import NftsyncError, NotRootError

# Subcommand modules, each exporting `command` (a click command or group).
SUBCOMMANDS: tuple[str, ...] = ("apply", "sessions", "backend", "compat", "daemon", "ctl")

json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout instead of text."
)


class LazyGroup(click.Group):
    """Imports a subcommand's module only when that subcommand runs.

    Why: `nftsync ctl promote` is called from keepalived's notify script during a failover, and
    keepalived kills notify scripts that outlive its shutdown; importing every subcommand (and
    libnftables, asyncio, the netlink codecs...) for it cost ~0.2 s of a ~0.4 s run.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in SUBCOMMANDS:
            return None
        return importlib.import_module(f"nftsync.cli.{cmd_name}").command


def require_root() -> None:
    if os.geteuid() != 0:
        raise NotRootError("must run as root (nftables and conntrack are changed over netlink)")


def emit(as_json: bool, data: Any, text: Callable[[Any], str]) -> None:
    """Print `data` as JSON, or as the human text `text(data)` builds."""
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        out = text(data)
        if out:
            click.echo(out)


def handle_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn NftsyncError into one line on stderr and its exit code; bugs still show a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except NftsyncError as exc:
            click.echo(f"nftsync: error: {exc}", err=True)
            sys.exit(exc.exit_code)

    return wrapper
