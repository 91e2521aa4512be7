"""CLI parsing without a kernel: every command and subcommand teaches through --help, and what a
user can get wrong before anything touches the kernel is one line on stderr and exit 2."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from nftsync import __version__
from nftsync.cli import main
from nftsync.cli.common import SUBCOMMANDS


def _runner() -> CliRunner:
    """stdout and stderr apart: click 8.1 (Debian 12's python3-click, what the package runs on)
    mixes them unless told not to; click >= 8.2 keeps them apart and has no such switch."""
    try:
        return CliRunner(mix_stderr=False)  # type: ignore[call-arg]
    except TypeError:
        return CliRunner()


def run(*args: str) -> tuple[int, str, str]:
    r = _runner().invoke(main, list(args), prog_name="nftsync")
    return r.exit_code, r.stdout, r.stderr


def _commands() -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = [()]
    for name in SUBCOMMANDS:
        out.append((name,))
        cmd = main.get_command(None, name)  # type: ignore[arg-type]
        for sub in getattr(cmd, "commands", {}):
            out.append((name, sub))
            for subsub in getattr(cmd.commands[sub], "commands", {}):  # type: ignore[union-attr]
                out.append((name, sub, subsub))
    return out


@pytest.mark.parametrize("path", _commands(), ids=lambda p: " ".join(p) or "nftsync")
def test_every_command_has_help(path: tuple[str, ...]) -> None:
    rc, out, _ = run(*path, "--help")
    assert rc == 0 and out.startswith("Usage: nftsync"), out
    # A help text that teaches: more than the usage line and the option list.
    assert len(out.splitlines()) > 4, out


def test_version() -> None:
    rc, out, _ = run("--version")
    assert rc == 0 and __version__ in out


@pytest.mark.parametrize("args, words", [
    (("nope",), "No such command"),
    (("apply",), "Missing argument"),
    (("sessions", "add", "10.0.0.1"), "Missing argument"),
    (("sessions", "get"), "Missing argument"),
    (("sessions", "list", "--limit", "0"), "not in the range"),
    (("ctl", "show", "--limit", "zero"), "not a valid integer"),
    (("daemon", "--node-id", "x"), "not a valid integer"),
])
def test_usage_errors_are_one_clear_line_and_exit_2(args: tuple[str, ...], words: str) -> None:
    rc, out, err = run(*args)
    assert rc == 2 and out == "", (rc, out, err)
    assert words in err
    assert [line for line in err.splitlines() if line.startswith("Error:")] != []
