#!/usr/bin/env python3
"""Write nftsync's man pages, in groff man format, from the click command tree.

    scripts/manpages.py OUTDIR

One page per top-level command, as git and ip do: nftsync(8) lists the commands, nftsync-apply(8),
nftsync-sessions(8), nftsync-daemon(8), nftsync-ctl(8)... hold a command's usage, description and
options, with its subcommands (sessions add, ctl status...) as subsections.

Why generated: the --help texts are the reference (every command has examples there and the CLI
tests parse them); a hand-written page would drift from them. The Debian package builds the pages
with this script (debian/rules); nothing generated is committed. No dependency beyond click: the
groff is written by hand, following click's own help rules (a paragraph whose first line is `\\b`
is kept as typed; `\\f` ends the help). The date is SOURCE_DATE_EPOCH's when set (dpkg sets it from
debian/changelog), so a rebuild gives the same pages.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tree's nftsync, whatever is installed

import click  # noqa: E402

from nftsync import __version__  # noqa: E402
from nftsync.cli import main  # noqa: E402

SECTION = "8"
MANUAL = "System Administration"
DOCS = "/usr/share/doc/nftsync"

# What --help cannot say: installed paths (the Debian package's), per page.
FILES = {
    "nftsync": [
        ("/etc/nftsync/nftsync.toml", "configuration of nftsync daemon (example: "
         f"{DOCS}/examples/nftsync.toml.example)"),
        ("/etc/nftsync/key", "the cluster's pre-shared key, mode 0600"),
        ("/run/nftsync/nftsync.sock", "the daemon's control socket, used by nftsync ctl"),
        (f"{DOCS}/", "README.md, daemon.md, protocol.md, kernels.md; example farms in "
         "examples/rulesets/"),
    ],
    "daemon": [
        ("/etc/nftsync/nftsync.toml", "the configuration file, read if it exists (example: "
         f"{DOCS}/examples/nftsync.toml.example)"),
        ("/etc/nftsync/key", "the cluster's pre-shared key, mode 0600"),
        ("/run/nftsync/nftsync.sock", "the control socket"),
        ("/lib/systemd/system/nftsync.service", "the systemd unit (installed disabled)"),
        ("/usr/lib/nftsync/nftsync-notify.sh", "keepalived notify script: VRRP state to "
         "nftsync ctl promote|demote; settings in /etc/default/nftsync-notify"),
        (f"{DOCS}/daemon.md", "configuration keys, health states, signals"),
    ],
    "ctl": [
        ("/run/nftsync/nftsync.sock", "the daemon's control socket (default)"),
        ("/usr/lib/nftsync/nftsync-notify.sh", "keepalived notify script calling nftsync ctl "
         "promote|demote"),
    ],
    "apply": [(f"{DOCS}/examples/rulesets/", "example farms and the map convention (README.md)")],
    "compat": [(f"{DOCS}/examples/compat/", "example legacy farm files")],
}
SEE_ALSO_OTHERS = ["nft(8)", "conntrack(8)", "keepalived(8)"]


def escape(text: str) -> str:
    """Text as groff reads it literally: backslashes, minus signs (options must copy-paste as
    ASCII '-'), and anything outside ASCII as a named Unicode escape."""
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\e")
        elif ch == "-":
            out.append("\\-")
        elif ord(ch) > 126:
            out.append(f"\\[u{ord(ch):04X}]")
        else:
            out.append(ch)
    return "".join(out)


def inline(text: str) -> str:
    """Escaped prose with `code` in bold."""
    parts = text.split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick: keep it as typed
        return escape(text).replace("`", "\\(ga")
    return "".join(f"\\fB{escape(p)}\\fR" if i % 2 else escape(p) for i, p in enumerate(parts))


def line(text: str) -> str:
    """One input line that groff cannot take for a request (no leading '.' or ')."""
    return "\\&" + text if text[:1] in (".", "'") else text


def help_paragraphs(text: str | None) -> list[str]:
    """click's help text as groff paragraphs: rewrapped prose, `\\b` blocks kept as typed."""
    if not text:
        return []
    text = inspect.cleandoc(text).split("\f", 1)[0]
    out: list[str] = []
    for para in text.split("\n\n"):
        lines = para.splitlines()
        if not lines:
            continue
        if lines[0].strip() == "\b":
            body = [line(escape(ln)) for ln in lines[1:]]
            out.append(".PP\n.nf\n" + "\n".join(body) + "\n.fi")
        else:
            out.append(".PP\n" + line(inline(" ".join(ln.strip() for ln in lines))))
    return out


@dataclass
class Page:
    """One man page: its name (nftsync-apply), the command path (nftsync apply) and its text."""

    name: str
    sections: list[str] = field(default_factory=list)

    def add(self, *chunks: str) -> None:
        self.sections.extend(chunks)

    def render(self, date: str) -> str:
        head = (f'.TH "{self.name.upper()}" "{SECTION}" "{date}" "nftsync {__version__}" '
                f'"{MANUAL}"\n')
        head += f'.\\" Generated by scripts/manpages.py from the --help of nftsync {__version__}.\n'
        head += ".nh\n.ad l\n"  # paths and option names must not be hyphenated or stretched
        return head + "\n".join(self.sections) + "\n"


def usage(cmd: click.Command, ctx: click.Context) -> str:
    return " ".join([ctx.command_path, *cmd.collect_usage_pieces(ctx)])


def options(cmd: click.Command, ctx: click.Context, with_help: bool = False) -> list[str]:
    """Option entries as --help lists them; -h/--help itself only where asked (nftsync(8))."""
    out = []
    for param in cmd.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is None or (param.name == "help" and not with_help):
            continue
        names, text = record
        out.append(f".TP\n\\fB{escape(names)}\\fR\n{line(inline(text))}")
    return out


def environment(cmd: click.Command, ctx: click.Context) -> list[tuple[str, str]]:
    """Options that also read an environment variable (click's envvar=)."""
    found = []
    for param in cmd.get_params(ctx):
        if isinstance(param, click.Option) and param.envvar:
            envvars = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar)
            for var in envvars:
                found.append((var, f"default of {param.opts[-1]}"))
    return found


def context(cmd: click.Command, name: str, parent: click.Context | None) -> click.Context:
    """A context as click makes one when it runs `cmd` (help option names, width...)."""
    return click.Context(cmd, info_name=name, parent=parent, **cmd.context_settings)


def walk(cmd: click.Command, ctx: click.Context):
    """(command, its context) for `cmd` and every command under it, depth first, sorted."""
    yield cmd, ctx
    if isinstance(cmd, click.Group):
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                yield from walk(sub, context(sub, name, ctx))


def short(cmd: click.Command) -> str:
    return cmd.get_short_help_str(limit=200).rstrip(".")


def definitions(items: list[tuple[str, str]]) -> list[str]:
    return [f".TP\n\\fB{escape(k)}\\fR\n{line(inline(v))}" for k, v in items]


def command_page(cmd: click.Command, ctx: click.Context, names: list[str]) -> Page:
    """The page of one top-level command: its own text and options, then every subcommand."""
    page = Page(f"nftsync-{ctx.info_name}")
    page.add(".SH NAME", f"{escape(page.name)} \\- {inline(short(cmd))}")
    leaves = [(c, x) for c, x in walk(cmd, ctx) if not isinstance(c, click.Group)]
    page.add(".SH SYNOPSIS", ".nf", *(line(f"\\fB{escape(usage(c, x))}\\fR") for c, x in leaves),
             ".fi")
    page.add(".SH DESCRIPTION", *help_paragraphs(cmd.help))
    own = options(cmd, ctx)
    if own:
        page.add(".SH OPTIONS", *own)
    subs = [(c, x) for c, x in walk(cmd, ctx) if c is not cmd]
    if subs:
        page.add(".SH COMMANDS")
        for sub, sctx in subs:
            page.add(f'.SS "{escape(usage(sub, sctx))}"', *help_paragraphs(sub.help))
            if isinstance(sub, click.Group):
                continue
            opts = options(sub, sctx)
            if opts:
                page.add(".PP\nOptions:", ".RS", *opts, ".RE")
    env = [e for c, x in walk(cmd, ctx) for e in environment(c, x)]
    if env:
        page.add(".SH ENVIRONMENT", *definitions(sorted(set(env))))
    if ctx.info_name in FILES:
        page.add(".SH FILES", *definitions(FILES[ctx.info_name]))
    page.add(".SH SEE ALSO", see_also(names, page.name))
    return page


def see_also(names: list[str], this: str) -> str:
    refs = [f"\\fB{escape(n)}\\fR({SECTION})" for n in names if n != this]
    refs += [f"\\fB{escape(r.split('(')[0])}\\fR({r.split('(')[1]}" for r in SEE_ALSO_OTHERS]
    return ",\n".join(refs) + f"\n.PP\n{escape(DOCS)}/README.md"


def main_page(ctx: click.Context, names: list[str]) -> Page:
    page = Page("nftsync")
    page.add(".SH NAME", f"nftsync \\- {inline(short(main))}")
    page.add(".SH SYNOPSIS", ".nf", "\\fBnftsync\\fR [\\fIOPTIONS\\fR] \\fICOMMAND\\fR "
             "[\\fIARGS\\fR]...", ".fi")
    page.add(".SH DESCRIPTION", *help_paragraphs(main.help))
    page.add(".SH OPTIONS", *options(main, ctx, with_help=True))
    page.add(".SH COMMANDS")
    for name in main.list_commands(ctx):
        sub = main.get_command(ctx, name)
        page.add(f".TP\n\\fBnftsync\\-{escape(name)}\\fR({SECTION})\n{inline(short(sub))}.")
    page.add(".SH EXIT STATUS", ".PP\n0 on success; on an error, one line on standard error "
             "starting with \\fBnftsync: error:\\fR and a non\\-zero status (see each command).")
    page.add(".SH FILES", *definitions(FILES["nftsync"]))
    page.add(".SH SEE ALSO", see_also(names, page.name))
    return page


def build(outdir: Path, date: str) -> list[Path]:
    ctx = context(main, "nftsync", None)
    commands = main.list_commands(ctx)
    names = ["nftsync", *(f"nftsync-{c}" for c in commands)]
    pages = [main_page(ctx, names)]
    for name in commands:
        cmd = main.get_command(ctx, name)
        pages.append(command_page(cmd, context(cmd, name, ctx), names))
    outdir.mkdir(parents=True, exist_ok=True)
    written = []
    for page in pages:
        path = outdir / f"{page.name}.{SECTION}"
        path.write_text(page.render(date), encoding="ascii")
        written.append(path)
    return written


def build_date() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = (datetime.datetime.fromtimestamp(int(epoch), datetime.UTC) if epoch
            else datetime.datetime.now(datetime.UTC))
    return when.strftime("%Y-%m-%d")


def cli() -> int:
    parser = argparse.ArgumentParser(description="Write nftsync's man pages (section 8).")
    parser.add_argument("outdir", type=Path, help="directory to write nftsync*.8 into")
    args = parser.parse_args()
    for path in build(args.outdir, build_date()):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
