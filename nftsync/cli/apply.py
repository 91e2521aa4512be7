"""`nftsync apply FILE`."""

from __future__ import annotations

import click

from nftsync import apply as applier
from nftsync.cli.common import emit, handle_errors, json_option, require_root
from nftsync.cli.progress import Progress


@click.command("apply")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--check", is_flag=True, help="Only validate the file (syntax, kernel, conventions).")
@click.option("--dry-run", is_flag=True, help="Show what would change; change nothing.")
@click.option("--force", is_flag=True,
              help="Re-apply even if the file looks already applied (e.g. after hand edits).")
@json_option
@handle_errors
def command(file: str, check: bool, dry_run: bool, force: bool, as_json: bool) -> None:
    """Load the farm ruleset FILE in one atomic nftables transaction.

    FILE is plain nft syntax (see rulesets/). Its tables are replaced as a whole in a single
    transaction, so the VIP is never without rules; if anything is wrong, nothing changes.

    Live sessions survive: session maps whose definition is unchanged keep their elements (they
    are not even read); maps that must be re-created (new timeout, size, key, name) are carried
    over with each session's remaining time. Sessions of backends the file no longer has are
    dropped and listed. Re-applying an unchanged file changes nothing; if the farm's tables were
    changed by hand since the last apply (a chain flushed or deleted, a rule added, a map
    redefined), that drift is reported and repaired in the same transaction, sessions kept.

    \b
    Examples:
      nftsync apply rulesets/farm.nft
      nftsync apply --dry-run rulesets/farm.nft
      nftsync apply --check --json rulesets/farm.nft
    """
    require_root()
    if check:
        desired = applier.check(file)
        tables = sorted(f"{f} {t}" for f, t in desired.tables)
        emit(as_json, {"file": file, "valid": True, "tables": tables},
             lambda d: f"{file}: valid ({', '.join(tables)})")
        return
    with Progress.for_cli(as_json) as progress:
        plan = applier.apply(file, dry_run=dry_run, force=force, report=progress)
    emit(as_json, plan.as_dict() | {"dry_run": dry_run}, lambda _: _text(plan, dry_run))


def _text(plan: applier.Plan, dry_run: bool) -> str:
    if not plan.changed:
        return f"{plan.path}: already applied, nothing changed"
    head = "would apply" if dry_run else "applied"
    lines = [f"{head} {plan.path} in one transaction (farms: {', '.join(plan.farms) or 'none'})"]
    if plan.drift:
        verb = "would be repaired" if dry_run else "repaired"
        lines.append(f"  drift since the last apply ({verb}):")
        lines += [f"    {d}" for d in plan.drift]
    lines += [f"  {c}" for c in plan.changes]
    for where, n in plan.restored.items():
        lines.append(f"  sessions carried over into {where}: {n}")
    if plan.dropped:
        lines.append(f"  sessions dropped: {len(plan.dropped)}")
        lines += [f"    {d['key']} -> {d['backend']} ({d['reason']})" for d in plan.dropped[:50]]
        if len(plan.dropped) > 50:
            lines.append(f"    ... and {len(plan.dropped) - 50} more (see --json)")
    return "\n".join(lines)
