"""contrib/prometheus and contrib/grafana against Prometheus' own tools and the daemon's real
exposition: the rules load (`promtool check rules`), their unit tests pass (`promtool test
rules`), and every metric the rules and the dashboard use is one the daemon exports."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_metrics import daemon

from nftsync.daemon.metrics import ConnectionCount, MetricsServer, _self_metrics, render

CONTRIB = Path(__file__).parents[2] / "contrib"
RULES = CONTRIB / "prometheus" / "nftsync-alerts.yml"
RULE_TESTS = CONTRIB / "prometheus" / "nftsync-alerts.test.yml"
DASHBOARD = CONTRIB / "grafana" / "nftsync-dashboard.json"

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool not installed (scripts/setup.sh installs "
                                    "Debian's prometheus)")


def _promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120,
                          cwd=RULES.parent)


@needs_promtool
def test_rules_load_and_their_unit_tests_pass() -> None:
    p = _promtool("check", "rules", RULES.name)
    assert p.returncode == 0 and "SUCCESS: 10 rules found" in p.stdout, p.stdout + p.stderr
    p = _promtool("test", "rules", RULE_TESTS.name)
    assert p.returncode == 0 and "SUCCESS" in p.stdout, p.stdout + p.stderr


def _exported() -> set[str]:
    d = daemon()

    async def text() -> str:
        server = MetricsServer(d, "127.0.0.1", 0)  # not started: only its own figures
        return render(d, await ConnectionCount().refresh(d.replica.conntrack)) + \
            _self_metrics(server)

    names = set()
    for line in asyncio.run(text()).splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            names |= {name + s for s in ("_bucket", "_sum", "_count")} if kind == \
                "histogram" else {name}
    return names


def _used(text: str) -> set[str]:
    return set(re.findall(r"\b(nftsync_[a-z0-9_]+)", text))


def test_rules_and_dashboard_use_only_exported_metrics() -> None:
    exported = _exported()
    assert _used(RULES.read_text()) - exported == set()
    assert _used(DASHBOARD.read_text()) - exported == set()


def test_the_dashboard_is_grafana_json_with_a_datasource_variable() -> None:
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert "instance" in variables
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, \
            panel["title"]
        assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]
    # Every family the daemon exports is on some panel, but the endpoint's own bookkeeping.
    families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in _exported()}
    shown = {re.sub(r"_(bucket|sum|count)$", "", n) for n in _used(DASHBOARD.read_text())}
    assert families - shown - {"nftsync_metrics_scrapes_total",
                               "nftsync_connections_count_seconds"} == set()


@needs_promtool
def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """Each panel's query, with Grafana's variables filled in as Grafana would, checked by
    Prometheus' own parser (as a recording rule: `promtool check rules` parses its expr)."""
    dash = json.loads(DASHBOARD.read_text())
    values = {"$__rate_interval": "1m", "$__range": "1h", "$job": "nftsync",
              "$instance": ".+"}
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for panel in dash["panels"]:
        for i, target in enumerate(panel.get("targets", [])):
            expr = target["expr"]
            for var, val in values.items():
                expr = expr.replace(var, val)
            assert "$" not in expr, expr
            lines += [f"      - record: panel_{panel['id']}_{i}",
                      f"        expr: {json.dumps(expr)}"]
    rules = tmp_path / "dashboard-rules.yml"
    rules.write_text("\n".join(lines) + "\n")
    p = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr


def test_the_dashboard_json_is_what_its_builder_writes(tmp_path: Path) -> None:
    out = tmp_path / "dashboard.json"
    subprocess.run([sys.executable, str(DASHBOARD.with_name("build-dashboard.py")), str(out)],
                   check=True, timeout=60)
    assert out.read_text() == DASHBOARD.read_text(), \
        "edit contrib/grafana/build-dashboard.py and run it, not the JSON"
