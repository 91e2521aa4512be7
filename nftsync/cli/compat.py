"""`nftsync compat`: legacy iptables-recent farms and their xt_recent session tables."""

from __future__ import annotations

import click

from nftsync.cli.common import emit, handle_errors, json_option, require_root
from nftsync.cli.progress import Progress
from nftsync.compat import iptables as legacy
from nftsync.compat.clock import KernelClock, read_timer_list_jiffies
from nftsync.compat.xtrecent import (
    XtRecentError,
    XtRecentTable,
    ip_list_tot,
    probe_patched,
    read_param,
    tables,
)

iptables_option = click.option(
    "--iptables", "iptables_bin", default="iptables", show_default=True, metavar="BIN",
    help="iptables binary: iptables (the host's choice), iptables-nft or iptables-legacy.",
)
seconds_option = click.option(
    "--seconds", type=click.FloatRange(min=0, min_open=True), metavar="T",
    help="The farm's --rcheck --seconds, to show/accept remaining time.",
)


@click.group("compat")
def command() -> None:
    """Legacy farms: iptables `recent` tables per backend, MARK + DNAT (the seed talk's scheme).

    \b
    A farm file (TOML or JSON, see compat/farms/legacy-farm.toml) names the VIP, ports,
    persistence seconds and the backends (mark + address[:port]). Each backend has an xt_recent
    table _FARM_MARK_sessions listing the clients that stick to it.
    \b
      nftsync compat rules farm.toml                 print the iptables rules
      nftsync compat rules farm.toml --apply         load them atomically (chain FARM_<name>)
      nftsync compat recent list _F_0x200_sessions --seconds 120
      nftsync compat recent add _F_0x200_sessions 10.0.0.7 --remaining 60 --seconds 120
      nftsync compat probe                           HZ, ip_list_tot, patched kernel or not
      nftsync compat migrate farm.toml farm.nft      move the farm to nftables, clients stay
    """


@command.command("rules")
@click.argument("farm_file", type=click.Path(dir_okay=False))
@click.option("--apply", "do_apply", is_flag=True, help="Load the rules (iptables-restore "
              "--noflush: only the farm's chain is replaced, atomically).")
@click.option("--remove", "do_remove", is_flag=True,
              help="Delete the farm's jumps and chain (this also drops its recent tables).")
@iptables_option
@json_option
@handle_errors
def rules_cmd(farm_file: str, do_apply: bool, do_remove: bool, iptables_bin: str,
              as_json: bool) -> None:
    """Show, apply or remove the iptables rules of the legacy farm in FARM_FILE."""
    if do_apply and do_remove:
        raise legacy.FarmError("--apply and --remove exclude each other")
    farm = legacy.load_farm(farm_file)
    data = legacy.describe(farm)
    if do_apply or do_remove:
        require_root()
        runner = legacy.IptablesRunner(iptables=iptables_bin)
        if do_apply:
            legacy.apply_farm(farm, runner)
            data["applied"] = True
        else:
            data["removed"] = legacy.remove_farm(farm, runner)
        data["rules"] = runner.chain_rules(farm.chain)
    else:
        data["rules"] = legacy.rules_as_commands(farm, iptables_bin)

    def text(d: dict) -> str:
        head = ""
        if d.get("applied"):
            head = f"# applied: chain {d['chain']} in table nat\n"
        elif "removed" in d:
            head = f"# removed chain {d['chain']}\n" if d["removed"] else \
                f"# farm {d['name']} was not loaded\n"
        return head + "\n".join(d["rules"])

    emit(as_json, data, text)


@command.group("recent")
def recent() -> None:
    """Read and write xt_recent tables (/proc/net/xt_recent/NAME) of this network namespace.

    \b
    Stamps are this host's jiffies; remaining time = --seconds - (now - last_seen) / HZ.
    `add` inserts with exact stamps on a kernel with compat/kernel's patch; on a stock kernel it
    falls back to +addr, which stamps now (remaining time restarts at --seconds, hits = 1).
    """


def _table(name: str, seconds: float | None) -> XtRecentTable:
    return XtRecentTable(name, seconds)


@recent.command("list")
@click.argument("name")
@seconds_option
@json_option
@handle_errors
def recent_list(name: str, seconds: float | None, as_json: bool) -> None:
    """List the entries of table NAME (with remaining time when --seconds is given)."""
    table = _table(name, seconds)
    entries = table.list()
    clock = table.clock
    now = clock.now()
    rows = []
    for e in entries:
        row = {"addr": e.addr, "ttl": e.ttl, "hits": e.hits, "last_seen": e.last_seen,
               "age_s": round(clock.age_s(e.last_seen, now), 3), "stamps": list(e.stamps)}
        if seconds is not None:
            row["remaining_s"] = round(e.remaining_s(seconds, clock, now), 3)
        rows.append(row)
    data = {"table": name, "path": table.path, "hz": clock.hz, "now_jiffies": now,
            "entries": rows, "count": len(rows), "ip_list_tot": table.capacity}

    def text(d: dict) -> str:
        out = [f"# {d['path']}: {d['count']} of {d['ip_list_tot']} entries, HZ={d['hz']}"]
        if d["count"] >= d["ip_list_tot"]:
            out.append("# FULL: a new client evicts the least recently seen one")
        for r in d["entries"]:
            rem = f" remaining {r['remaining_s']:.1f}s" if "remaining_s" in r else ""
            out.append(f"{r['addr']} ttl {r['ttl']} hits {r['hits']} "
                       f"last seen {r['age_s']:.1f}s ago{rem}")
        return "\n".join(out)

    emit(as_json, data, text)


@recent.command("add")
@click.argument("name")
@click.argument("addr")
@click.option("--remaining", type=click.FloatRange(min=0), metavar="S",
              help="Seconds the session has left (needs --seconds).")
@click.option("--ages", metavar="S,S,...",
              help="Seconds since each packet, comma-separated (oldest first).")
@click.option("--stamps", metavar="J,J,...", help="Raw jiffies of this host, oldest first.")
@click.option("--ttl", type=click.IntRange(0, 255), default=0, show_default=True)
@click.option("--allow-evict", is_flag=True,
              help="Add even to a full table (the kernel then drops its oldest entry).")
@seconds_option
@json_option
@handle_errors
def recent_add(name: str, addr: str, remaining: float | None, ages: str | None,
               stamps: str | None, ttl: int, allow_evict: bool, seconds: float | None,
               as_json: bool) -> None:
    """Insert or replace ADDR in table NAME. Without --remaining/--ages/--stamps: a stamp of now."""
    require_root()
    table = _table(name, seconds)
    try:
        age_list = [float(a) for a in ages.split(",")] if ages else None
        stamp_list = [int(s) for s in stamps.split(",")] if stamps else None
    except ValueError:
        raise XtRecentError("--ages takes seconds, --stamps whole jiffies, comma-separated") \
            from None
    if remaining is None and age_list is None and stamp_list is None:
        age_list = [0.0]
    res = table.add(addr, remaining, ages_s=age_list, stamps=stamp_list, ttl=ttl,
                    allow_evict=allow_evict)
    data = {"table": name, "addr": addr, "method": res.method, "exact": res.exact,
            "replaced": res.replaced, "evicted": res.evicted, "stamps": list(res.stamps)}

    def text(d: dict) -> str:
        how = "with its stamps" if d["exact"] else \
            "with +addr (stock kernel: stamped now, hits 1, ttl 0)"
        extra = " (evicted the oldest entry)" if d["evicted"] else ""
        return f"{'replaced' if d['replaced'] else 'added'} {d['addr']} {how}{extra}"

    emit(as_json, data, text)


@recent.command("del")
@click.argument("name")
@click.argument("addr")
@json_option
@handle_errors
def recent_del(name: str, addr: str, as_json: bool) -> None:
    """Remove ADDR from table NAME."""
    require_root()
    found = _table(name, None).delete(addr)
    emit(as_json, {"table": name, "addr": addr, "deleted": found},
         lambda d: f"deleted {d['addr']}" if d["deleted"] else f"{d['addr']} was not there")


@recent.command("flush")
@click.argument("name")
@json_option
@handle_errors
def recent_flush(name: str, as_json: bool) -> None:
    """Remove every entry of table NAME."""
    require_root()
    _table(name, None).flush()
    emit(as_json, {"table": name, "flushed": True}, lambda d: f"flushed {d['table']}")


@recent.command("tables")
@json_option
@handle_errors
def recent_tables(as_json: bool) -> None:
    """List the xt_recent tables of this network namespace."""
    names = tables()
    emit(as_json, {"tables": names}, lambda d: "\n".join(d["tables"]))


@command.command("probe")
@iptables_option
@json_option
@handle_errors
def probe_cmd(iptables_bin: str, as_json: bool) -> None:
    """Report HZ, ip_list_tot and whether the kernel takes '*addr;ttl;stamps;' writes.

    The patch probe runs in a throw-away network namespace (needs root, unshare and iptables),
    so it never touches a live table.
    """
    clock = KernelClock.detect()
    patched, why = probe_patched(iptables_bin)
    data = {
        "hz": clock.hz, "hz_source": clock.hz_source,
        "jiffies": read_timer_list_jiffies(), "jiffies_exact": clock.exact,
        "ip_list_tot": ip_list_tot(), "ip_pkt_list_tot": read_param("ip_pkt_list_tot"),
        "patched": patched, "patched_reason": why,
    }

    def text(d: dict) -> str:
        state = {True: "present", False: "absent", None: "unknown"}[d["patched"]]
        return "\n".join([
            f"HZ {d['hz']} (from {d['hz_source']})",
            f"jiffies {d['jiffies'] if d['jiffies'] is not None else 'unreadable: estimated'}",
            f"ip_list_tot {d['ip_list_tot']} addresses per table",
            f"ip_pkt_list_tot {d['ip_pkt_list_tot']}",
            f"patched '*addr;ttl;stamps;' command: {state} ({d['patched_reason']})",
        ])

    emit(as_json, data, text)


@command.command("migrate")
@click.argument("legacy_file", type=click.Path(dir_okay=False))
@click.argument("nft_file", type=click.Path(dir_okay=False))
@click.option("--farm", "farm_name", help="The farm of NFT_FILE to migrate to (default: the one "
              "with the legacy farm's backend marks).")
@click.option("--dry-run", is_flag=True, help="Show the plan: nft changes and sessions per "
              "backend; change nothing.")
@iptables_option
@json_option
@handle_errors
def migrate_cmd(legacy_file: str, nft_file: str, farm_name: str | None, dry_run: bool,
                iptables_bin: str, as_json: bool) -> None:
    """Move the running legacy farm LEGACY_FILE to the nft farm NFT_FILE, keeping every client
    on its backend.

    \b
    1. every live xt_recent session is read (client, backend mark, remaining time);
    2. one nft transaction loads NFT_FILE and puts those sessions in its session map;
    3. sessions that appeared meanwhile are added;
    4. the legacy chain and its jumps are removed in one iptables-restore.
    The nft farm must have the same backend marks and addresses, and a session map keyed by
    the source address (key=saddr, or saddr/N for a legacy --mask).

    \b
      nftsync compat migrate --dry-run compat/farms/legacy-farm.toml rulesets/farm.nft
      nftsync compat migrate compat/farms/legacy-farm.toml rulesets/farm.nft
    """
    from nftsync.migrate import migrate

    require_root()
    farm = legacy.load_farm(legacy_file)
    # The result is printed only when the migration is over, after the progress line is
    # cleared, so the two never share the terminal.
    with Progress.for_cli(as_json) as progress:
        result = migrate(farm, legacy_file, nft_file, farm_name=farm_name, dry_run=dry_run,
                         runner=legacy.IptablesRunner(iptables=iptables_bin), progress=progress)

    def text(r) -> str:
        total = sum(r["sessions"].values())
        head = "would migrate" if r["dry_run"] else "migrated"
        lines = [f"{head} legacy farm {r['legacy']} to farm {r['farm']} of {r['nft_file']}",
                 f"  sessions carried over: {total} ("
                 + ", ".join(f"{m}: {n}" for m, n in sorted(r["sessions"].items())) + ")"]
        if r["expired_skipped"]:
            lines.append(f"  expired entries skipped: {r['expired_skipped']}")
        if r["moved_clients"]:
            lines.append(f"  clients in two tables (newest kept): {r['moved_clients']}")
        if not r["dry_run"]:
            lines.append(f"  sessions added after the switch: {r['late']}")
            lines.append(f"  legacy rules removed: {'yes' if r['rules_removed'] else 'no'}")
        lines += [f"  {c['action']:9} {c['kind']:9} {c['name']}" for c in r["nft_changes"]]
        return "\n".join(lines)

    emit(as_json, result.as_dict(), text)
