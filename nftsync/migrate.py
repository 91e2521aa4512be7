"""`nftsync compat migrate`: move a running iptables-recent farm to its nftables farm.

A use case beside `apply` (which it calls), over the legacy adapters in `nftsync.compat`.

Order, chosen so that no client changes backend:
1. Read every xt_recent table of the legacy farm: client -> backend mark (from the table the
   client is in) and its remaining time (persistence seconds - age of its last packet).
2. One nft transaction loads the nft farm *and* those sessions (`apply(extra_sessions=...)`).
   From here on both farms would send a known client to the same backend.
3. Read the xt_recent tables again and add what appeared in between (new clients that the
   legacy rules scheduled during step 2), so the nft map misses nobody.
4. Remove the legacy chain and its jumps in one iptables-restore: the nft farm alone serves.

The nft farm must have the legacy farm's backend marks with the same addresses, and its session
map must be keyed by the source address (`key=saddr`, or `saddr/N` matching the legacy `--mask`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from nftsync import apply as applier
from nftsync.compat.iptables import IptablesRunner, LegacyFarm, remove_farm
from nftsync.compat.xtrecent import XtRecentTable
from nftsync.errors import NftsyncError
from nftsync.model import Farm, Role, Session
from nftsync.ruleset import discover_farms, evaluate_file
from nftsync.tables.nftmap import NftSessionMap

#: Progress of a long migration (nftsync.cli.progress.Report): what, done, expected or None.
Report = Callable[[str, int, "int | None"], None]


class MigrationError(NftsyncError):
    exit_code = 2


@dataclass
class Migration:
    legacy: str
    nft_file: str
    farm: str
    sessions: dict[str, int] = field(default_factory=dict)  # backend mark -> clients
    expired_skipped: int = 0
    moved_clients: int = 0  # found in two tables: the newest wins
    late: int = 0  # sessions that appeared while the nft farm was loaded
    rules_removed: bool = False
    dry_run: bool = False
    nft_changes: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pick_farm(legacy: LegacyFarm, farms: dict[str, Farm], name: str | None, path: str) -> Farm:
    if name is not None:
        if name not in farms:
            raise MigrationError(f"{path}: has no farm {name!r} (farms: "
                                 f"{', '.join(sorted(farms)) or 'none'})")
        return farms[name]
    marks = {b.mark for b in legacy.backends}
    fits = [f for f in farms.values() if marks <= set(f.backends)]
    if len(fits) != 1:
        raise MigrationError(f"{path}: {len(fits)} farms have the backend marks "
                             f"{', '.join(f'{m:#x}' for m in sorted(marks))}: choose with --farm")
    return fits[0]


def _check_fit(legacy: LegacyFarm, farm: Farm, path: str) -> None:
    for b in legacy.backends:
        addr = farm.backends.get(b.mark)
        want = b.address.rsplit(":", 1)[0] if b.address.count(":") == 1 else b.address
        if addr is None:
            raise MigrationError(f"{path}: farm {farm.name} has no backend {b.mark:#x} "
                                 f"(the legacy farm sends it to {b.address})")
        if addr.split(" . ")[0] != want:
            raise MigrationError(f"{path}: backend {b.mark:#x} is {addr} in farm {farm.name} but "
                                 f"{b.address} in the legacy farm: clients would change backend")
    smap = farm.require(Role.SESSIONS)
    if smap.key_type != ("ipv4_addr",):
        raise MigrationError(f"{path}: the session map of farm {farm.name} is keyed by "
                             f"{' . '.join(smap.key_type)}; xt_recent keys are source addresses")
    prefix = ipaddress.IPv4Network(f"0.0.0.0/{legacy.mask}").prefixlen
    want_spec = "saddr" if prefix == 32 else f"saddr/{prefix}"
    if smap.key_spec not in (want_spec, f"saddr/{prefix}"):
        raise MigrationError(f"{path}: farm {farm.name}'s sessions are keyed by "
                             f"{smap.key_spec}, the legacy farm's by {want_spec} (--mask "
                             f"{legacy.mask})")


def read_legacy(legacy: LegacyFarm, result: Migration | None = None,
                progress: Report | None = None) -> dict[str, Session]:
    """Client address -> session (mark, remaining seconds) from the farm's recent tables."""
    best: dict[str, tuple[float, Session]] = {}
    for i, backend in enumerate(legacy.backends):
        if progress is not None:
            progress("migrate: xt_recent tables read", i, len(legacy.backends))
        table = XtRecentTable(legacy.table_name(backend), legacy.seconds)
        for s in table.sessions(include_expired=True):
            remaining = s.remaining_s or 0
            if remaining < 1:
                if result is not None:
                    result.expired_skipped += 1
                continue
            session = Session(key=(s.addr,), mark=backend.mark, expires=int(remaining))
            if s.addr in best:
                if result is not None:
                    result.moved_clients += 1
                if best[s.addr][0] >= remaining:
                    continue
            best[s.addr] = (remaining, session)
    return {addr: sess for addr, (_, sess) in best.items()}


def migrate(legacy: LegacyFarm, legacy_path: str, nft_file: str, *, farm_name: str | None = None,
            dry_run: bool = False, runner: IptablesRunner | None = None,
            progress: Report | None = None) -> Migration:
    """Steps 1-4 of the module docstring. `progress` (a terminal's progress line, or None) is
    told each step as it starts, with its count: the tables read, the sessions going into the
    nft transaction, the late sessions added one transaction each (the slow part when many
    clients arrived during the switch)."""
    desired = evaluate_file(nft_file)
    farms = discover_farms(desired.maps)
    farm = _pick_farm(legacy, farms, farm_name, nft_file)
    _check_fit(legacy, farm, nft_file)
    result = Migration(legacy=legacy_path, nft_file=nft_file, farm=farm.name, dry_run=dry_run)
    first = read_legacy(legacy, result, progress)
    for s in first.values():
        result.sessions[f"{s.mark:#x}"] = result.sessions.get(f"{s.mark:#x}", 0) + 1
    map_id = f"{farm.name}/{Role.SESSIONS.value}"
    if progress is not None:  # a whole count: drawn at once, shown while the transaction runs
        progress(f"migrate: sessions read, {'planning' if dry_run else 'loading'} {nft_file} "
                 "with them", len(first), len(first))
    plan = applier.apply(nft_file, dry_run=dry_run, force=True,
                         extra_sessions={map_id: list(first.values())})
    result.nft_changes = [asdict(c) for c in plan.changes]
    if dry_run:
        return result
    # Clients the legacy rules scheduled while the nft farm was being loaded.
    late = {a: s for a, s in read_legacy(legacy).items()
            if a not in first or first[a].mark != s.mark}
    if late:
        from nftsync.ruleset import current_farms

        table = NftSessionMap(current_farms()[farm.name].require(Role.SESSIONS))
        for i, s in enumerate(late.values()):
            if progress is not None:
                progress("migrate: sessions that came meanwhile added", i, len(late))
            table.replace(s)
        result.late = len(late)
    result.rules_removed = remove_farm(legacy, runner)
    return result
