"""`nftsync apply`: load a farm file in one transaction and keep its live sessions.

The transaction, for each table the file declares:

    add table F T; flush table F T          every rule goes; sets, maps and chains stay
    delete chain/map/set ...                what the file no longer has, or has redefined
    flush map/set ...                       the user's own static sets: the file re-adds them
    include "FILE"                          the farm as written
    add element ...                         sessions carried over from re-created maps
    delete element ...                      sessions of backends the file removed
    flush map <states>; add element ...     backend states, recomputed for the new backends

Session maps whose definition did not change are never dumped (a big timeout map is slow to dump):
`flush table` leaves them and their elements alone. Maps that must be re-created (timeout, size,
flags, key type, renamed) are read with the streamed netlink dump as the last step before the
commit, and their sessions re-added with their remaining expiry (`nftsync.carryover` says why it
reads in passes and what the gap between the read and the commit can miss).

Each apply records per table under /run/nftsync/applied/ the digest of the file's evaluated
ruleset and the kernel's own view of the table after the commit (chains, rules, set definitions,
read by netlink: `nftsync.netlink.ruleset_read`). A re-apply compares a fresh read with it: an
unchanged file on an unchanged kernel changes nothing; anything edited by hand (`nftsync.drift`)
is reported and repaired by the same one transaction as any apply, which keeps the sessions.
`--force` re-applies regardless.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nftsync import backends as backend_states
from nftsync import carryover
from nftsync.datatypes import DatatypeError, join_concat
from nftsync.drift import Drift, compare, rule_texts, stamp_of
from nftsync.errors import RulesetError
from nftsync.model import Farm, Role, Session, SessionMap
from nftsync.netlink.ruleset_read import TableView, read_table
from nftsync.nft import Nft
from nftsync.proto.wire import MAX_REMAINING_MS
from nftsync.ruleset import (
    Desired,
    TableBlocks,
    TableId,
    chain_header,
    current_farms,
    current_tables,
    discover_farms,
    evaluate_file,
    line_of_long_time,
)
from nftsync.sessions import WIRE_LIMIT_TEXT, format_duration
from nftsync.tables.nftmap import NftSessionMap

STAMP_DIR = Path(os.environ.get("NFTSYNC_STATE_DIR", "/run/nftsync")) / "applied"
OWNED = (Role.SESSIONS, Role.STATIC, Role.STATES)

#: Progress of long steps: (what, done, total or None); the CLI draws it on a terminal.
Report = Callable[[str, int, "int | None"], None]


def _silent(_what: str, _done: int, _total: int | None = None) -> None:
    return None


@dataclass
class Change:
    action: str  # create, delete, redefine, flush, keep, replace
    kind: str  # table, chain, map, set, rules, flowtable
    name: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.action:9} {self.kind:9} {self.name}" + (f"  ({self.detail})"
                                                               if self.detail else "")


@dataclass
class Plan:
    path: str
    changes: list[Change] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    restored: dict[str, int] = field(default_factory=dict)  # map -> sessions carried over
    dropped: list[dict[str, Any]] = field(default_factory=list)
    drift: list[Drift] = field(default_factory=list)
    farms: list[str] = field(default_factory=list)
    changed: bool = True
    applied: bool = False
    # Filled by _plan, carried out by _carry just before the commit:
    restores: list[tuple[SessionMap, SessionMap | None, Change]] = field(default_factory=list)
    prunes: list[tuple[SessionMap, set[int]]] = field(default_factory=list)
    tail: list[str] = field(default_factory=list)  # backend states, after the sessions
    carried: dict[str, set[bytes]] = field(default_factory=dict)  # map_id -> keys (raw)

    def as_dict(self) -> dict[str, Any]:
        """The report (not the internals: `asdict` would deep-copy every carried key)."""
        return {"path": self.path, "changes": [asdict(c) for c in self.changes],
                "restored": self.restored, "dropped": self.dropped,
                "drift": [x.as_dict() for x in self.drift], "farms": self.farms,
                "changed": self.changed, "applied": self.applied}


def check(path: str) -> Desired:
    """Validate only: syntax and kernel checks, then the nftsync map convention."""
    desired = evaluate_file(path)
    try:
        farms = discover_farms(desired.maps)
    except RulesetError as exc:
        raise RulesetError(f"{path}: {exc}") from None
    check_wire_limits(path, desired, farms)
    return desired


def apply(path: str, *, dry_run: bool = False, force: bool = False, nft: Nft | None = None,
          extra_sessions: dict[str, list[Session]] | None = None,
          report: Report = _silent) -> Plan:
    """Load `path` in one transaction. `extra_sessions` ({"farm/role": sessions}) are added to
    those maps in the same transaction, replacing entries with the same key (used by
    `nftsync compat migrate` so the legacy sessions and the new farm arrive together).
    `report` hears of the long steps (reading maps to carry over, the commit)."""
    nft = nft or Nft()
    desired = evaluate_file(path)
    try:
        new_farms = discover_farms(desired.maps)
    except RulesetError as exc:
        raise RulesetError(f"{path}: {exc}") from None
    check_wire_limits(path, desired, new_farms)
    plan = Plan(path=path, farms=sorted(new_farms))
    wanted = set(desired.tables)
    if not wanted:
        raise RulesetError(f"{path}: declares no table; a farm file declares its table(s)")
    current = current_tables(nft, wanted)
    old_farms = current_farms(nft)
    _plan(plan, desired, current, old_farms, new_farms)
    digests = {tid: _table_digest(desired, tid) for tid in wanted}
    stamps_ok = _check_stamps(plan, digests, wanted)
    structural = any(c.action not in ("keep", "flush") for c in plan.changes)
    plan.changed = force or structural or bool(plan.prunes) or bool(plan.drift) or \
        not stamps_ok or not _static_elements_match(desired, nft, current)
    if not plan.changed:
        plan.changes = [c for c in plan.changes if c.action == "keep"]
        return plan
    plan.changes.extend(Change("replace", "rules", f"{f} {t}") for f, t in sorted(wanted))
    # Read what must be carried over as late as possible: the old maps serve until the commit.
    carry = _carry(plan, new_farms, report, keep_keys=bool(extra_sessions))
    if extra_sessions:
        carry += _add_extra(plan, extra_sessions, old_farms, new_farms, nft)
    if dry_run:
        return plan
    text = "\n".join(plan.commands + carry + plan.tail)
    del carry
    report(f"committing {path} in one transaction, sessions carried",
           sum(plan.restored.values()), None)
    nft.cmd(text, what=f"apply {path}")
    plan.applied = True
    _write_stamps(desired, digests, wanted)
    return plan


def check_wire_limits(path: str, desired: Desired, farms: dict[str, Farm]) -> None:
    """Refuse a session map whose timeout, or an element's timeout/expiry, is longer than a
    peer can be told (`remaining_ms` is a u32 of ms, ~49.7 days).

    Why at apply time: the kernel takes such a map, but replicating its first client used to
    stop the peer link for good (issue 9), and clamping silently would leave the cluster
    disagreeing about expiries. The error names the file, the line and the limit.
    """
    for farm in sorted(farms.values(), key=lambda f: f.name):
        smap = farm.maps.get(Role.SESSIONS)
        if smap is None:
            continue
        ref = smap.ref
        found = None
        obj = next((w["map"] for w in desired.maps if "map" in w and
                    (w["map"]["family"], w["map"]["table"], w["map"]["name"]) ==
                    (ref.family, ref.table, ref.name)), {})
        if (obj.get("timeout") or 0) * 1000 > MAX_REMAINING_MS:
            found = f"timeout {format_duration(obj['timeout'] * 1000)}"
        for item in obj.get("elem", []) or []:
            key = item[0] if isinstance(item, list) else item
            attrs = key.get("elem", {}) if isinstance(key, dict) else {}
            for word in ("timeout", "expires"):
                if found is None and (attrs.get(word) or 0) * 1000 > MAX_REMAINING_MS:
                    found = f"element {attrs.get('val')}: {word} " \
                            f"{format_duration(attrs[word] * 1000)}"
        where = line_of_long_time(path, ref.family, ref.table, ref.name, MAX_REMAINING_MS)
        if where is not None and where[1] is not None:
            found = where[1]  # the words as the user wrote them, on their own line
        if found is None:
            continue
        at = f"{path}:{where[0]}" if where is not None else path
        raise RulesetError(f"{at}: map {ref}: {found} is longer than replication can carry "
                           f"({WIRE_LIMIT_TEXT}); nothing was changed")


def _plan(plan: Plan, desired: Desired, current: dict[TableId, TableBlocks],
          old_farms: dict[str, Farm], new_farms: dict[str, Farm]) -> None:
    """The transaction's commands up to the file's `include`, and what `_carry` must read."""
    cmds = plan.commands
    for fam, name in sorted(desired.tables):
        if (fam, name) not in current:
            plan.changes.append(Change("create", "table", f"{fam} {name}"))
        cmds += [f"add table {fam} {name}", f"flush table {fam} {name}"]

    owned_old = {(m.ref.family, m.ref.table, m.ref.name): m
                 for farm in old_farms.values() for m in farm.maps.values()}

    desired_chains = {(c["chain"]["family"], c["chain"]["table"], c["chain"]["name"]):
                      chain_header(c["chain"]) for c in desired.chains if "chain" in c}
    for tid, blk in sorted(current.items()):
        fam, table = tid
        want = desired.tables.get(tid)
        for (kind, name), body in sorted(blk.objects.items()):
            full = f"{fam} {table} {name}"
            if kind == "chain":
                new_head = desired_chains.get((fam, table, name))
                if new_head is None:
                    cmds.append(f"delete chain {full}")
                    plan.changes.append(Change("delete", "chain", full))
                elif new_head != body:
                    cmds.append(f"delete chain {full}")
                    plan.changes.append(Change("redefine", "chain", full, f"{body} -> {new_head}"))
                continue
            if kind == "flowtable":
                if want is None or (kind, name) not in want.objects:
                    cmds.append(f"delete flowtable {full}")
                    plan.changes.append(Change("delete", "flowtable", full))
                continue
            if kind not in ("set", "map"):
                continue
            new_body = want.objects.get((kind, name)) if want else None
            old = owned_old.get((fam, table, name))
            if old is not None and old.role in OWNED:
                target = _target_map(old, new_farms)
                same = target is not None and target.ref == old.ref and new_body == body
                if same:
                    plan.changes.append(Change("keep", kind, full, f"{old.role.value} of farm "
                                               f"{old.farm}, elements kept without a dump"))
                    gone = _removed_backends(old, old_farms, new_farms)
                    if old.role is not Role.STATES and gone:
                        plan.prunes.append((old, gone))
                    continue
                cmds.append(f"delete {kind} {full}")
                if target is None:
                    change = Change("delete", kind, full, f"{old.role.value} of farm {old.farm}")
                else:
                    change = Change("redefine", kind, full, "" if target.ref == old.ref
                                    else f"into {target.ref}")
                plan.changes.append(change)
                if old.role is not Role.STATES:
                    plan.restores.append((old, target, change))
                continue
            if new_body is None:
                cmds.append(f"delete {kind} {full}")
                plan.changes.append(Change("delete", kind, full))
            elif new_body != body:
                cmds.append(f"delete {kind} {full}")
                plan.changes.append(Change("redefine", kind, full))
            elif "timeout" in body or "dynamic" in body:
                plan.changes.append(Change("keep", kind, full, "dynamic, elements kept"))
            else:
                cmds.append(f"flush {kind} {full}")
                plan.changes.append(Change("flush", kind, full, "elements reloaded from the file"))

    for tid, blk in sorted(desired.tables.items()):
        have = current.get(tid)
        for (kind, name) in sorted(blk.objects):
            if kind in ("set", "map", "chain") and (have is None or (kind, name) not in
                                                    have.objects):
                plan.changes.append(Change("create", kind, f"{tid[0]} {tid[1]} {name}"))

    cmds.append(f'include "{_quoted_path(plan.path)}"')
    for farm in new_farms.values():
        if Role.STATES not in farm.maps:
            continue
        old = old_farms.get(farm.name)
        states = {m: s for m, s in (old.states if old else {}).items() if m in farm.backends}
        farm.states = states
        plan.tail += backend_states.states_commands(farm, states)


def _carry(plan: Plan, new_farms: dict[str, Farm], report: Report,
           keep_keys: bool = False) -> list[str]:
    """Read the maps to carry over or prune (streamed, see nftsync.carryover) and return their
    element commands; fills in the plan's counts and dropped sessions."""
    cmds: list[str] = []
    for old, target, change in plan.restores:
        read = carryover.read_map(old, report)
        if target is None:
            plan.dropped += [_dropped_raw(old, k, m, "map removed from the file")
                             for k, m in _texts(read)]
            change.detail += f", {len(read)} session(s) dropped"
            continue
        backends = set(new_farms[target.farm].backends)
        done = carryover.carry_commands(read, target, backends)
        del read
        cmds += done.commands
        plan.dropped += [_dropped_raw(target, k, m, why) for k, m, why in done.dropped]
        plan.restored[str(target.ref)] = done.kept
        if keep_keys:
            plan.carried[target.map_id] = set(done.keys)
        detail = f"{done.kept} session(s) carried over"
        if done.expired:
            detail += f", {done.expired} expired meanwhile"
        change.detail = detail + (f" {change.detail}" if change.detail else "")
    for smap, gone in plan.prunes:
        read = carryover.read_map(smap, report)
        prune, doomed = carryover.prune_commands(read, gone)
        cmds += prune
        plan.dropped += [_dropped_raw(smap, k, m, f"backend {m:#x} no longer exists")
                         for k, m in doomed]
    return cmds


def _texts(read: carryover.MapRead) -> list[tuple[str, int]]:
    fmt = carryover.key_formatter(read.smap.key_type)
    out = []
    for key, mark in read.marks().items():
        try:
            out.append((fmt(key), mark))
        except DatatypeError:
            out.append((key.hex(), mark))
    return out


def _removed_backends(smap: SessionMap, old_farms: dict[str, Farm],
                      new_farms: dict[str, Farm]) -> set[int]:
    old = old_farms.get(smap.farm)
    new = new_farms.get(smap.farm)
    return set(old.backends) - set(new.backends) if old and new else set()


def _add_extra(plan: Plan, extra: dict[str, list[Session]], old_farms: dict[str, Farm],
               new_farms: dict[str, Farm], nft: Nft) -> list[str]:
    cmds: list[str] = []
    for map_id, sessions in extra.items():
        farm_name, _, role_name = map_id.partition("/")
        farm = new_farms.get(farm_name)
        target = farm.maps.get(Role(role_name)) if farm else None
        if target is None:
            raise RulesetError(f"{plan.path}: no {role_name} map of farm {farm_name!r} for the "
                               "sessions to carry over")
        # Keys the transaction will already hold there: kept elements or carried-over ones.
        have: set[bytes] = set(plan.carried.get(map_id, ()))
        old = old_farms.get(farm_name)
        old_map = old.maps.get(target.role) if old else None
        if old_map is not None and old_map.ref == target.ref and map_id not in plan.carried:
            have |= set(carryover.read_map(old_map).entries)
        clash = [s.key for s in sessions if _raw_key(s.key, target) in have]
        cmds += NftSessionMap(target, nft).commands(add=sessions, delete=clash)
        plan.restored[str(target.ref)] = plan.restored.get(str(target.ref), 0) + len(sessions)
        plan.changes.append(Change("add", "sessions", str(target.ref),
                                   f"{len(sessions)} session(s) carried in"))
    return cmds


def _raw_key(key: tuple[str, ...], smap: SessionMap) -> bytes | None:
    try:
        return join_concat(key, smap.key_type)
    except DatatypeError:
        return None


def _target_map(old: SessionMap, new_farms: dict[str, Farm]) -> SessionMap | None:
    farm = new_farms.get(old.farm)
    return farm.maps.get(old.role) if farm else None


def _dropped_raw(smap: SessionMap, key_text: str, mark: int, why: str) -> dict[str, Any]:
    return {"map": str(smap.ref), "farm": smap.farm, "key": key_text, "backend": f"{mark:#x}",
            "reason": why}


def _quoted_path(path: str) -> str:
    full = os.path.abspath(path)
    if '"' in full or "\n" in full:
        raise RulesetError(f"{path}: a file name with quotes or newlines cannot be included")
    return full


def _table_digest(desired: Desired, tid: TableId) -> str:
    blk = desired.tables[tid]
    text = json.dumps([blk.attrs, sorted(blk.objects.items())])
    return hashlib.sha256(text.encode()).hexdigest()


def _stamp_path(tid: TableId) -> Path:
    """Per network namespace (its inode), since each namespace has a ruleset of its own."""
    netns = os.stat("/proc/self/ns/net").st_ino
    return STAMP_DIR / f"netns-{netns}" / f"{tid[0]}-{tid[1]}.json"


def _check_stamps(plan: Plan, digests: dict[TableId, str], wanted: set[TableId]) -> bool:
    """True if every table was applied from this very file and the kernel still holds what that
    apply left (else False); what differs from the last apply's record goes to `plan.drift`.
    A table without a record (never applied, or by an older nftsync) is applied, silently."""
    same = True
    for tid in sorted(wanted):
        try:
            stamp = json.loads(_stamp_path(tid).read_text())
        except (OSError, ValueError):
            same = False
            continue
        kernel = stamp.get("kernel")
        if stamp.get("digest") != digests[tid] or not isinstance(kernel, dict):
            same = False
        if isinstance(kernel, dict):
            plan.drift += compare(kernel, read_table(*tid), f"{tid[0]} {tid[1]}")
    return same and not plan.drift


def _write_stamps(desired: Desired, digests: dict[TableId, str], wanted: set[TableId]) -> None:
    """Record the file's digest and the kernel's view of each table right after the commit."""
    map_names = {w["map"]["name"] for w in desired.maps if "map" in w}
    for tid in wanted:
        view: TableView | None = read_table(*tid)
        if view is None:
            continue
        blk = desired.tables[tid]
        texts = {name: rule_texts(body) for (kind, name), body in blk.objects.items()
                 if kind == "chain"}
        doc = {"digest": digests[tid], "kernel": stamp_of(view, texts, map_names),
               "time": time.time()}
        path = _stamp_path(tid)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        tmp.replace(path)


def _static_elements_match(desired: Desired, nft: Nft,
                           current: dict[TableId, TableBlocks]) -> bool:
    """The file's own elements (non-dynamic sets, backends, static pins) are all in the kernel."""
    for wrapper in desired.maps + desired.sets:
        kind = "map" if "map" in wrapper else "set"
        obj = wrapper[kind]
        if not obj.get("elem") or "timeout" in obj.get("flags", []):
            continue
        tid = (obj["family"], obj["table"])
        if tid not in current or (kind, obj["name"]) not in current[tid].objects:
            return False
        have = nft.list_json(f"{kind} {obj['family']} {obj['table']} {obj['name']}")
        have_elems = have[0][kind].get("elem", []) if have else []
        want = {json.dumps(e, sort_keys=True) for e in obj["elem"]}
        got = {json.dumps(e, sort_keys=True) for e in have_elems}
        if comment_is_states(obj):
            continue
        if not want <= got or (not comment_is_owned(obj) and want != got):
            return False
    return True


def comment_is_owned(obj: dict[str, Any]) -> bool:
    c = obj.get("comment") or ""
    return c.startswith(("nftsync:sessions", "nftsync:static", "nftsync:states"))


def comment_is_states(obj: dict[str, Any]) -> bool:
    return (obj.get("comment") or "").startswith("nftsync:states")
