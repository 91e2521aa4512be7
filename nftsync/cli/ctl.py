"""`nftsync ctl`: query and steer a running `nftsync daemon` over its control socket."""

from __future__ import annotations

import sys
import time
from typing import Any

import click

from nftsync.cli.common import emit, handle_errors, json_option
from nftsync.cli.progress import Progress
from nftsync.daemon import control
from nftsync.daemon.config import DEFAULT_SOCKET

#: `nftsync ctl status` exit codes, as monitoring plugins (Nagios, Icinga checks; never a
#: keepalived track script: contrib/keepalived/README.md)
#: read them: 0 ok, 1 degraded, starting or syncing (warning: it serves, replication is not
#: whole), 2 failing (critical), 3 no answer (unknown).
HEALTH_EXIT = {"ok": 0, "degraded": 1, "starting": 1, "syncing": 1, "failing": 2}
EXIT_UNKNOWN = 3
#: `status --wait-ready`: the daemon answered, but was still starting or syncing at the timeout.
EXIT_NOT_READY = 4
#: Every command: the socket is served by a process that is neither root nor the caller's own
#: user (an impostor may have taken the path); its answer is not believed, not even printed.
EXIT_UNTRUSTED = control.UntrustedDaemon.exit_code
#: Health values that --wait-ready waits through.
NOT_READY = ("starting", "syncing")
WAIT_POLL_S = 0.5


@click.group("ctl")
@click.option("--socket", "socket_path", default=DEFAULT_SOCKET, show_default=True,
              envvar="NFTSYNC_SOCKET", metavar="PATH",
              help="The daemon's control socket (also $NFTSYNC_SOCKET).")
@click.option("--timeout", type=click.FloatRange(min=0.1, max=3600), default=10.0,
              show_default=True, metavar="SECONDS", help="How long to wait for the answer.")
@click.pass_context
def command(ctx: click.Context, socket_path: str, timeout: float) -> None:
    """Query and steer the running sync daemon (the seed's ssyncdctl).

    \b
    Examples:
      nftsync ctl status                # health, role, peers up; exit 0 ok, 1 degraded,
                                        # starting or syncing, 2 failing, 3 no daemon
                                        # (5 for any command: socket not served by root)
      nftsync ctl status --wait-ready   # wait until it has its peers' state (after a start)
      nftsync ctl peers                 # per peer: state, entries sent/applied, lag, errors
      nftsync ctl stats --json
      nftsync ctl resync --peer lb2     # ask for a full snapshot again (all peers if none)
      nftsync ctl promote               # this node is now the active one (keepalived notify)
      nftsync ctl demote
      nftsync ctl show --farm web --limit 20   # the replicated sessions held in memory
    """
    ctx.obj = (socket_path, timeout)


def _obj() -> tuple[str, float]:
    return click.get_current_context().obj


@command.command("status")
@click.option("--wait-ready", is_flag=True,
              help="Wait until the daemon is past starting and syncing, then report.")
@click.option("--timeout", "wait_timeout", type=click.FloatRange(min=0, max=86400),
              default=300.0, show_default=True, metavar="SECONDS",
              help="With --wait-ready: give up after this long (exit 4, or 3 if no daemon "
                   "ever answered).")
@json_option
@handle_errors
def status(wait_ready: bool, wait_timeout: float, as_json: bool) -> None:
    """Health, role and peers of this node; the exit code is the health.

    \b
    Health and exit code:
      0  ok        every peer connected, its state in our kernel
      1  starting  reading the kernel, not listening for peers yet
      1  syncing   listening; peers' snapshots still coming or going into the kernel
      1  degraded  serving, but a peer is down or stalled, or kernel writes failed
      2  failing   no peer connected at all, or no farm loaded
      3  no daemon answered (none running, wrong --socket, timeout)
      4  (--wait-ready only) still starting or syncing when --timeout ran out
      5  the socket is served by a process that is not root (an impostor?)

    \b
    With --wait-ready the control socket is polled (every 0.5 s, also while no daemon
    answers yet) until the health is neither starting nor syncing, then the status is
    printed and the exit code is that health's. On a terminal a progress line shows
    whose snapshots are awaited. For scripts, e.g. after `systemctl restart nftsync`:

    \b
      nftsync ctl status --wait-ready --timeout 120 || echo "not in sync yet"
      nftsync ctl status --wait-ready --json | jq .sync
    """
    path, timeout = _obj()
    source = click.get_current_context().get_parameter_source("wait_timeout")
    if not wait_ready and source == click.core.ParameterSource.COMMANDLINE:
        raise click.UsageError("--timeout SECONDS is for --wait-ready (the answer's own "
                               "timeout is `nftsync ctl --timeout S status`)")
    if wait_ready:
        data = _wait_ready(path, timeout, wait_timeout, as_json)
    else:
        try:
            data = control.call(path, "status", None, timeout)
        except control.ControlError as exc:
            click.echo(f"nftsync: error: {exc}", err=True)
            sys.exit(EXIT_UNTRUSTED if isinstance(exc, control.UntrustedDaemon)
                     else EXIT_UNKNOWN)
    emit(as_json, data, _status_text)
    health = str(data.get("health")) if isinstance(data, dict) else None
    if wait_ready and health in NOT_READY:
        click.echo(f"nftsync: error: the daemon is still {health} after {wait_timeout:g} s",
                   err=True)
        sys.exit(EXIT_NOT_READY)
    sys.exit(HEALTH_EXIT.get(str(health), EXIT_UNKNOWN))


def _wait_ready(path: str, timeout: float, wait_timeout: float, as_json: bool) -> Any:
    """Poll `status` until the health is past starting/syncing or `wait_timeout` ran out;
    the last answer (exit 3 if there never was one)."""
    deadline = time.monotonic() + wait_timeout
    data: Any = None
    error: control.ControlError | None = None
    with Progress.for_cli(as_json) as progress:
        while True:
            left = deadline - time.monotonic()
            try:
                data = control.call(path, "status", None, max(0.1, min(timeout, left)))
                error = None
            except control.UntrustedDaemon:
                raise  # not a daemon that is still starting: handle_errors, exit 5
            except control.ControlError as exc:
                error = exc  # not there yet, or busy: try again until the deadline
            if isinstance(data, dict) and error is None:
                if data.get("health") not in NOT_READY:
                    return data
                _show_wait(progress, data)
            if time.monotonic() + WAIT_POLL_S > deadline:
                break
            time.sleep(WAIT_POLL_S)
    if data is None:
        click.echo(f"nftsync: error: {error}" if error else
                   f"nftsync: error: no answer from {path} within {wait_timeout:g} s", err=True)
        sys.exit(EXIT_UNKNOWN)
    return data


def _show_wait(progress: Progress, data: dict) -> None:
    """The progress line while waiting: the start-up step, or the peers' snapshots applied."""
    if data.get("health") == "starting":
        start = data.get("starting") or {}
        read = start.get("conntrack_read")
        progress(f"starting: {start.get('step', '?')}", read if isinstance(read, int) else 0)
        return
    sync = data.get("sync") or {}
    done, total = sync.get("peers_applied"), sync.get("peers")
    if isinstance(done, int) and isinstance(total, int):
        queued = sync.get("kernel_queued", 0)
        progress(f"syncing ({queued:,} kernel writes queued): peers' snapshots applied", done,
                 total)


@command.command("peers")
@json_option
@handle_errors
def peers(as_json: bool) -> None:
    """Every peer: connection state and since when, entries sent/received/applied, lag, errors."""
    path, timeout = _obj()
    emit(as_json, control.call(path, "peers", None, timeout), _peers_text)


@command.command("stats")
@json_option
@handle_errors
def stats(as_json: bool) -> None:
    """Replication counters: entries, lag, overruns, resnapshots, auth failures, last errors."""
    path, timeout = _obj()
    emit(as_json, control.call(path, "stats", None, timeout), _stats_text)


@command.command("resync")
@click.option("--peer", metavar="NAME", help="Only this peer (name or address; default: all).")
@json_option
@handle_errors
def resync(peer: str | None, as_json: bool) -> None:
    """Ask for a full snapshot again, after a restore or when the state looks off.

    On a terminal (not with --json) it then follows the snapshots on one progress line
    until each is in this node's kernel (^C stops watching, not the resync); scripts get
    the answer at once.
    """
    path, timeout = _obj()
    args = {"peer": peer} if peer else {}
    progress = Progress.for_cli(as_json)
    before = _applied_by_peer(path, timeout) if progress.enabled else {}
    result = control.call(path, "resync", args, timeout)
    if progress.enabled and isinstance(result, dict):
        names = [n for n in result.get("resync") or [] if n in before]
        with progress:
            _follow_resync(path, timeout, names, before, progress)
    emit(as_json, result, _done("resync requested"))


RESYNC_POLL_S = 0.2
RESYNC_WATCH_S = 3600.0  # bound on watching (a 1M snapshot takes ~6-40 s)


def _applied_by_peer(path: str, timeout: float) -> dict[str, int]:
    rows = control.call(path, "peers", None, timeout)
    return {r["name"]: int(r.get("snapshots_applied") or 0) for r in rows
            if isinstance(r, dict) and "name" in r} if isinstance(rows, list) else {}


def _follow_resync(path: str, timeout: float, names: list[str], before: dict[str, int],
                   progress: Progress) -> None:
    """Poll `peers` until every resynced peer has one more snapshot in our kernel."""
    deadline = time.monotonic() + RESYNC_WATCH_S
    while names and time.monotonic() < deadline:
        rows = {r.get("name"): r for r in control.call(path, "peers", None, timeout)
                if isinstance(r, dict)}
        gone = [n for n in names if rows.get(n, {}).get("state") != "up"]
        for n in gone:  # its connection ended: its next one starts with a snapshot anyway
            names.remove(n)
            progress.clear()
            click.echo(f"peer {n} is no longer connected: not waiting for its snapshot",
                       err=True)
        done = sum(int(rows.get(n, {}).get("snapshots_applied") or 0) > before[n]
                   for n in names)
        if done == len(names):
            return
        entries = sum(int(rows.get(n, {}).get("snapshot_receiving") or 0) for n in names)
        progress(f"resync, {done}/{len(names)} snapshots applied, entries received", entries)
        time.sleep(RESYNC_POLL_S)


@command.command("promote")
@json_option
@handle_errors
def promote(as_json: bool) -> None:
    """Make this node the active one (call it from keepalived's notify_master)."""
    path, timeout = _obj()
    emit(as_json, control.call(path, "promote", None, timeout), _done("role: active"))


@command.command("demote")
@json_option
@handle_errors
def demote(as_json: bool) -> None:
    """Make this node a backup (call it from keepalived's notify_backup)."""
    path, timeout = _obj()
    emit(as_json, control.call(path, "demote", None, timeout), _done("role: backup"))


@command.command("show")
@click.option("--farm", metavar="NAME", help="Only this farm.")
@click.option("--limit", type=click.IntRange(1, control.MAX_SHOW_LIMIT), default=100,
              show_default=True, help="At most this many sessions per farm.")
@json_option
@handle_errors
def show(farm: str | None, limit: int, as_json: bool) -> None:
    """The daemon's replica (its in-memory copy): sessions per farm, conntrack entry count."""
    path, timeout = _obj()
    args: dict[str, Any] = {"limit": limit}
    if farm:
        args["farm"] = farm
    emit(as_json, control.call(path, "show", args, timeout), _show_text)


# --------------------------------------------------------------------------------------------
# Human output
# --------------------------------------------------------------------------------------------

def duration(seconds: Any) -> str:
    """3725 -> '1h02m05s'; short values keep a decimal ('1.5s')."""
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return "-" if seconds is None else str(seconds)
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds % 1 else f"{int(seconds)}s"
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d{h:02d}h{m:02d}m"
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def since(value: Any) -> str:
    """A peer's `since`: a Unix time (shown as an age) or already a number of seconds ago."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value > 1_000_000_000:  # a Unix timestamp
            return duration(max(0.0, time.time() - value)) + " ago"
        return duration(value) + " ago"
    return "-" if value is None else str(value)


def cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(cell(v) for v in value) or "-"
    if isinstance(value, dict):
        return " ".join(f"{k}={cell(v)}" for k, v in value.items()) or "-"
    return str(value)


def table(rows: list[dict[str, Any]], columns: list[str] | None = None,
          headers: dict[str, str] | None = None) -> str:
    """Left-aligned columns sized to their content; the last column is not padded."""
    if not rows:
        return "(none)"
    if columns is None:
        columns = []
        for r in rows:
            columns += [k for k in r if k not in columns]
    heads = [(headers or {}).get(c, c.upper()) for c in columns]
    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(heads)]
    lines = []
    for row in [heads, *cells]:
        lines.append("  ".join(v.ljust(w) for v, w in zip(row[:-1], widths[:-1], strict=True))
                     + ("  " if len(row) > 1 else "") + row[-1])
    return "\n".join(line.rstrip() for line in lines)


def render(data: Any, indent: str = "") -> str:
    """Generic human form of a JSON result: key/value lines, lists of objects as tables."""
    if isinstance(data, dict):
        if not data:
            return f"{indent}(empty)"
        width = max(len(str(k)) for k in data)
        lines = []
        for key, value in data.items():
            nested = isinstance(value, dict) or (
                isinstance(value, list) and all(isinstance(v, dict) for v in value))
            if nested and value:
                lines.append(f"{indent}{key}:")
                lines.append(render(value, indent + "  "))
            else:
                lines.append(f"{indent}{str(key).ljust(width)}  {cell(value)}")
        return "\n".join(lines)
    if isinstance(data, list):
        if data and all(isinstance(v, dict) for v in data):
            return "\n".join(indent + line for line in table(data).splitlines())
        return indent + (cell(data) if data else "(none)")
    return indent + cell(data)


def _status_text(d: Any) -> str:
    if not isinstance(d, dict):
        return render(d)
    farms = d.get("farms")
    lines = [
        f"node      {d.get('node', '?')} (id {d.get('node_id', '?')}), cluster "
        f"{d.get('cluster', '?')}",
        f"role      {d.get('role', '?')}",
        f"health    {d.get('health', '?')}",
    ]
    lines += [f"          - {r}" for r in d.get("reasons") or []]
    lines += [
        f"uptime    {duration(d.get('uptime_s'))}",
        f"peers     {d.get('peers_up', '?')}/{d.get('peers_total', '?')} up",
    ]
    sync = d.get("sync")
    if isinstance(sync, dict):
        lines.append(f"sync      {sync.get('peers_applied', '?')}/{sync.get('peers', '?')} "
                     "peers' snapshots applied, "
                     f"{cell(sync.get('kernel_queued'))} kernel writes queued")
    start = d.get("starting")
    if isinstance(start, dict):
        read = start.get("conntrack_read")
        lines.append(f"starting  {start.get('step', '?')}"
                     + (f" ({read:,} conntrack entries read)" if isinstance(read, int) else ""))
    lines.append(f"farms     {cell(farms) if farms else '(every nftsync farm)'}")
    if "version" in d:
        lines.append(f"version   {d.get('version')} (protocol {d.get('protocol', '?')})")
    known = {"node", "node_id", "cluster", "role", "health", "reasons", "uptime_s", "farms",
             "peers_up", "peers_total", "sync", "starting", "version", "protocol"}
    lines += [f"{k:9} {cell(v)}" for k, v in d.items() if k not in known]
    return "\n".join(lines)


_PEER_COLUMNS = ["name", "node_name", "node_id", "address", "state", "since", "version", "sent",
                 "received", "applied", "lag_ms", "resnapshots", "auth_failures", "last_error"]
_PEER_HEADERS = {"node_name": "NODE", "node_id": "ID", "lag_ms": "LAG p50/p99",
                 "resnapshots": "RESNAP", "auth_failures": "AUTHFAIL", "received": "RECV",
                 "last_error": "LAST ERROR"}


def lag(value: Any) -> str:
    """The core reports lag as {p50, p99, last} in ms (None until an update is acknowledged)."""
    if isinstance(value, dict):
        parts = [value.get("p50"), value.get("p99")]
        return "/".join(cell(p) for p in parts) + "ms"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:g}ms"
    return cell(value)


def _peers_text(rows: Any) -> str:
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        return render(rows)
    if not rows:
        return "no peers (none configured and none connected)"
    shown = []
    for r in rows:
        row = dict(r)
        row["since"] = since(r.get("since", r.get("since_s")))
        row["lag_ms"] = lag(r.get("lag_ms"))
        shown.append(row)
    # The table keeps to what fits a terminal; --json has every counter.
    return table(shown, _PEER_COLUMNS, _PEER_HEADERS)


_STATS_PEER_COLUMNS = ["name", "state", "sent", "received", "applied", "queued", "snapshots_sent",
                       "snapshots_received", "resnapshots", "overflows", "gaps", "rejected",
                       "auth_failures", "last_error"]
_STATS_PEER_HEADERS = {"snapshots_sent": "SNAP OUT", "snapshots_received": "SNAP IN",
                       "resnapshots": "RESNAP", "overflows": "OVERFLOW", "auth_failures":
                       "AUTHFAIL", "received": "RECV", "last_error": "LAST ERROR"}


def _stats_text(d: Any) -> str:
    """Counters as key/value sections; the per-peer counters as one table (--json has all)."""
    if not isinstance(d, dict):
        return render(d)
    rest = {k: v for k, v in d.items() if k != "peers"}
    out = render(rest)
    peers = d.get("peers")
    if isinstance(peers, dict) and all(isinstance(v, dict) for v in peers.values()):
        rows = [{"name": name, **v} for name, v in peers.items()]
        out += "\npeers:\n" + "\n".join(
            "  " + line for line in table(rows, _STATS_PEER_COLUMNS,
                                          _STATS_PEER_HEADERS).splitlines())
    elif peers is not None:
        out += "\n" + render({"peers": peers})
    return out


def _show_text(d: Any) -> str:
    """`show`: {"farms": {farm: {map role: {"count", "entries": [...]}}}, "conntrack": N}."""
    if not isinstance(d, dict) or not isinstance(d.get("farms"), dict):
        return render(d)
    out = []
    for farm, maps in d["farms"].items():
        if not isinstance(maps, dict):
            out.append(render({farm: maps}))
            continue
        for role, m in maps.items():
            if not isinstance(m, dict):
                out.append(render({f"{farm} {role}": m}))
                continue
            entries = m.get("entries") or []
            out.append(f"farm {farm}, {role} map: {m.get('count', len(entries))} entries"
                       + (f" (first {len(entries)} shown)"
                          if len(entries) < m.get("count", 0) else ""))
            if entries:
                out.append(table(entries))
            out.append("")
    if not d["farms"]:
        out.append("no replicated farm")
    out.append(f"conntrack entries: {cell(d.get('conntrack'))}")
    return "\n".join(out)


def _done(fallback: str):
    def text(result: Any) -> str:
        if isinstance(result, dict) and result:
            return render(result)
        return fallback if result in (None, {}, True) else cell(result)
    return text
