"""Shared CLI plumbing: error reporting, --json output, root check, subcommand registration."""

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


def register(group: click.Group) -> None:
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"nftsync.cli.{name}")
        group.add_command(module.command)


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
