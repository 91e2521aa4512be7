"""nftsync.drift: what a re-apply reports when the kernel's table differs from its record."""

from __future__ import annotations

from nftsync.drift import Drift, compare, rule_texts, stamp_of
from nftsync.netlink.ruleset_read import ChainView, RuleView, TableView

T = "ip nftsync_web"


def _view(rules: list[str], *, header: str = "h1", timeout: str = "s1") -> TableView:
    chain = ChainView("web", header, [RuleView(d, ("meta", "nat")) for d in rules])
    return TableView("ip", "nftsync_web", {"web": chain}, {"web_sessions": timeout})


def _stamp() -> dict:
    texts = {"web": ["meta mark set 1", "meta mark 0 jump x", "dnat to meta mark map @b"]}
    return stamp_of(_view(["a", "b", "c"]), texts, {"web_sessions"})


def test_same_table_is_no_drift():
    assert compare(_stamp(), _view(["a", "b", "c"]), T) == []


def test_missing_added_and_changed_rules_are_named():
    assert compare(_stamp(), _view(["a", "b"]), T) == [
        Drift(T, "rule", "web", "rule 3 missing: dnat to meta mark map @b")]
    assert compare(_stamp(), _view(["x", "a", "b", "c"]), T) == [
        Drift(T, "rule", "web", "rule 1 not from the file: [meta, nat]")]
    assert compare(_stamp(), _view(["a", "y", "c"]), T) == [
        Drift(T, "rule", "web", "rule 2 changed: meta mark 0 jump x"),
        Drift(T, "rule", "web", "rule 2 not from the file: [meta, nat]")]


def test_chains_sets_and_table():
    assert compare(_stamp(), None, T) == [Drift(T, "table", "", "deleted")]
    assert compare(_stamp(), _view(["a", "b", "c"], header="h2"), T) == [
        Drift(T, "chain", "web", "type, hook, priority or policy changed")]
    assert compare(_stamp(), _view(["a", "b", "c"], timeout="s2"), T) == [
        Drift(T, "map", "web_sessions",
              "definition changed (type, flags, timeout, size or comment)")]
    empty = TableView("ip", "nftsync_web", {}, {})
    assert compare(_stamp(), empty, T) == [Drift(T, "chain", "web", "deleted"),
                                           Drift(T, "map", "web_sessions", "deleted")]


def test_rule_lines_of_a_listed_chain():
    body = "type nat hook prerouting priority dstnat; policy accept;\nip daddr 10.0.0.1 jump web"
    assert rule_texts(body) == ["ip daddr 10.0.0.1 jump web"]
    assert rule_texts(None) == []


def test_rules_named_by_expressions_when_the_file_has_another_count():
    stamp = stamp_of(_view(["a", "b"]), {"web": ["only one line"]}, set())
    assert compare(stamp, _view(["a"]), T) == [Drift(T, "rule", "web",
                                                     "rule 2 missing: [meta, nat]")]
    assert stamp["sets"] == {"web_sessions": {"digest": "s1", "map": False}}
