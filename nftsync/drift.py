"""Drift: how a farm table in the kernel differs from what the last `nftsync apply` left there.

Why: apply used to trust its stamp (a digest of the file) alone, so after `nft flush chain ...`
by hand it answered "already applied" and left the farm without its DNAT rule. Now the stamp
also holds the kernel's own view of each table right after the commit (`TableView`, read by
netlink: chains, rules in order, named sets' definitions; no elements, handles or counters), and
a re-apply compares a fresh read with it. What the comparison cannot see is only what it leaves
out on purpose: elements (sessions, backend states, the file's own elements are checked apart)
and counters.

A rule is named in a report by its line in the file's evaluated listing when the chain had as
many rules as that listing (always, right after an apply), else by its expression names.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass
from typing import Any

from nftsync.netlink.ruleset_read import ChainView, RuleView, TableView

STAMP_VERSION = 2


@dataclass(frozen=True)
class Drift:
    """One difference: `kind` is table, chain, rule, set or map; `what` says it in words."""

    table: str  # "ip nftsync_web"
    kind: str
    name: str  # chain or set name ("" for the table)
    what: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)

    def __str__(self) -> str:
        where = f"{self.kind} {self.table} {self.name}".rstrip()
        return f"{where}: {self.what}"


def rule_texts(body: str | None) -> list[str]:
    """The rule lines of a chain block of nft's terse listing (its header lines dropped)."""
    if not body:
        return []
    return [ln for ln in body.splitlines()
            if ln and not ln.startswith(("type ", "comment ", "devices ", "policy "))]


def stamp_of(view: TableView, texts: dict[str, list[str]], map_names: set[str]) -> dict[str, Any]:
    """The table's record for the stamp: per chain its header digest and rules (digest and how
    to name it), per named set its definition digest and whether it is a map."""
    chains = {}
    for name, chain in view.chains.items():
        lines = texts.get(name, [])
        use_text = len(lines) == len(chain.rules)
        chains[name] = {"header": chain.header,
                        "rules": [[r.digest, lines[i] if use_text else _exprs(r)]
                                  for i, r in enumerate(chain.rules)]}
    sets = {name: {"digest": d, "map": name in map_names} for name, d in view.sets.items()}
    return {"version": STAMP_VERSION, "chains": chains, "sets": sets}


def compare(stamp: dict[str, Any], view: TableView | None, table: str) -> list[Drift]:
    """What differs between the recorded table and the kernel's table now (empty: nothing)."""
    if view is None:
        return [Drift(table, "table", "", "deleted")]
    out: list[Drift] = []
    old_chains: dict[str, Any] = stamp.get("chains", {})
    for name in sorted(old_chains.keys() - view.chains.keys()):
        out.append(Drift(table, "chain", name, "deleted"))
    for name in sorted(view.chains.keys() - old_chains.keys()):
        n = len(view.chains[name].rules)
        out.append(Drift(table, "chain", name, f"added ({n} rule{'s' * (n != 1)})"))
    for name in sorted(view.chains.keys() & old_chains.keys()):
        out += _compare_chain(table, old_chains[name], view.chains[name])
    old_sets: dict[str, Any] = stamp.get("sets", {})
    for name in sorted(old_sets.keys() - view.sets.keys()):
        out.append(Drift(table, _kind(old_sets[name]), name, "deleted"))
    for name in sorted(view.sets.keys() - old_sets.keys()):
        out.append(Drift(table, "set", name, "added"))
    for name in sorted(view.sets.keys() & old_sets.keys()):
        if view.sets[name] != old_sets[name]["digest"]:
            out.append(Drift(table, _kind(old_sets[name]), name,
                             "definition changed (type, flags, timeout, size or comment)"))
    return out


def _compare_chain(table: str, old: dict[str, Any], now: ChainView) -> list[Drift]:
    out = []
    if old["header"] != now.header:
        out.append(Drift(table, "chain", now.name, "type, hook, priority or policy changed"))
    before = [d for d, _label in old["rules"]]
    after = [r.digest for r in now.rules]
    matcher = difflib.SequenceMatcher(a=before, b=after, autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op in ("delete", "replace"):
            for i in range(i1, i2):
                verb = "changed" if op == "replace" else "missing"
                out.append(Drift(table, "rule", now.name,
                                 f"rule {i + 1} {verb}: {old['rules'][i][1]}"))
        if op in ("insert", "replace"):
            for j in range(j1, j2):
                out.append(Drift(table, "rule", now.name,
                                 f"rule {j + 1} not from the file: {_exprs(now.rules[j])}"))
    return out


def _exprs(rule: RuleView) -> str:
    return "[" + ", ".join(rule.exprs) + "]"


def _kind(entry: dict[str, Any]) -> str:
    return "map" if entry.get("map") else "set"
