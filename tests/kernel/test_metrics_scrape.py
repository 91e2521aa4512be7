"""The metrics endpoint scraped by a real Prometheus server, in the netns lab.

lb1 and lb2 run daemons with `--metrics-listen`: lb1's on 127.0.0.1 of its namespace, lb2's on
its sync address. A Prometheus server (Debian's `prometheus`, its own config and storage in the
test's temp dir, listening on 127.0.0.1:9090 of lb1's namespace, scraping every second, with
contrib/prometheus/nftsync-alerts.yml loaded) scrapes both. The test makes sessions and
connections with real traffic and reads Prometheus' HTTP API from inside the namespace: what it
stored must be what `nftsync ctl stats|status|peers` say, counters only grow, and the shipped
alert rules react when a daemon stops.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemons import SYNC4, DaemonProc, make_key, wait_for
from helpers import RULESETS, nftsync, reset_node
from lab import Lab, client4

from nftsync import __version__
from nftsync.proto import PROTOCOL_VERSION

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None,
                                reason="Debian's prometheus is not installed (scripts/setup.sh)")

RULES = Path(__file__).parents[2] / "contrib" / "prometheus" / "nftsync-alerts.yml"
PROM = "127.0.0.1:9090"  # in lb1's namespace: its own port space, reachable from nowhere else
METRICS = {"lb1": "127.0.0.1:9477", "lb2": f"{SYNC4['lb2']}:9477"}
FARM = "http"
SIZE = 1000


class PrometheusProc:
    """One Prometheus server in a namespace, with its config and TSDB under `workdir`."""

    def __init__(self, netns: str, workdir: Path) -> None:
        self.netns, self.workdir = netns, workdir
        self.log = workdir / "prometheus.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> PrometheusProc:
        shutil.copy(RULES, self.workdir / RULES.name)
        config = self.workdir / "prometheus.yml"
        config.write_text(json.dumps({  # YAML is a superset of JSON
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "rule_files": [str(self.workdir / RULES.name)],
            "scrape_configs": [{"job_name": "nftsync", "static_configs": [
                {"targets": [METRICS[node]], "labels": {"node": node}}
                for node in ("lb1", "lb2")]}],
        }))
        cmd = ["ip", "netns", "exec", self.netns, "prometheus", f"--config.file={config}",
               f"--storage.tsdb.path={self.workdir / 'tsdb'}", f"--web.listen-address={PROM}",
               "--storage.tsdb.retention.time=1h", "--log.level=warn"]
        with open(self.log, "a") as logf:
            self.proc = subprocess.Popen(cmd, stdout=logf, stderr=logf, stdin=subprocess.DEVNULL)
        wait_for(lambda: self._ready(), 30, "Prometheus to answer")
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited ({self.proc.returncode}): "
                                 f"{self.log.read_text()[-2000:]}")
        return self._get("/-/ready", check=False) is not None

    def _get(self, path: str, check: bool = True) -> str | None:
        """GET from inside the namespace (Prometheus listens on its loopback)."""
        script = ("import sys, urllib.request\n"
                  "try:\n"
                  "    print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())\n"
                  "except OSError as exc:\n"
                  "    sys.exit(f'{exc}')\n")
        p = subprocess.run(["ip", "netns", "exec", self.netns, sys.executable, "-c", script,
                            f"http://{PROM}{path}"], capture_output=True, text=True, timeout=30)
        if p.returncode != 0:
            if check:
                raise AssertionError(f"GET {path}: {p.stderr.strip()}")
            return None
        return p.stdout

    def query(self, expr: str) -> list[dict]:
        """An instant query: the vector's samples as {"metric": {...}, "value": float}."""
        body = json.loads(self._get("/api/v1/query?" + urllib.parse.urlencode({"query": expr})))
        assert body["status"] == "success", body
        return [{"metric": r["metric"], "value": float(r["value"][1])}
                for r in body["data"]["result"]]

    def one(self, expr: str) -> float | None:
        """The value of a query that selects one series (None while it selects none)."""
        got = self.query(expr)
        assert len(got) <= 1, got
        return got[0]["value"] if got else None

    def range_values(self, expr: str) -> list[list[float]]:
        """A range-vector query (`metric[30s]`): each series' values, oldest first."""
        body = json.loads(self._get("/api/v1/query?" + urllib.parse.urlencode({"query": expr})))
        assert body["status"] == "success" and body["data"]["resultType"] == "matrix", body
        return [[float(v) for _, v in r["values"]] for r in body["data"]["result"]]

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def farm_file(tmp_path: Path) -> Path:
    path = tmp_path / "farm.nft"
    path.write_text((RULESETS / "farm-http.nft").read_text()
                    .replace("timeout 60s", f"timeout 60s\n\t\tsize {SIZE}"))
    return path


@pytest.fixture
def scraped(lab: Lab, tmp_path: Path, farm_file: Path) -> Iterator[tuple[dict, PrometheusProc]]:
    """Daemons on lb1 (active) and lb2 with metrics endpoints, connected, and Prometheus in
    lb1's namespace scraping both. Everything is stopped by pid afterwards, whatever happened."""
    key = make_key(tmp_path)
    lab.move_vip("lb1")
    for node in ("lb1", "lb2"):
        reset_node(lab, node)
        nftsync(lab, node, "apply", str(farm_file))
    d1 = DaemonProc(lab.ns("lb1"), "lb1", 1, SYNC4["lb1"], [SYNC4["lb2"]], key, tmp_path,
                    role="active", extra=("--metrics-listen", METRICS["lb1"]))
    d2 = DaemonProc(lab.ns("lb2"), "lb2", 2, SYNC4["lb2"], [SYNC4["lb1"]], key, tmp_path,
                    extra=("--metrics-listen", METRICS["lb2"]))
    prom = PrometheusProc(lab.ns("lb1"), tmp_path)
    daemons = {"lb1": d1, "lb2": d2}
    try:
        d1.start()
        d2.start()
        d1.wait(lambda: d1.peers_up() >= 1, 30, "lb2 connected")
        d2.wait(lambda: d2.peers_up() >= 1, 30, "lb1 connected")
        prom.start()
        yield daemons, prom
    finally:
        prom.stop()
        for d in daemons.values():
            d.stop()
        lab.restore_sync()
        for node in ("lb1", "lb2"):
            reset_node(lab, node)


def test_prometheus_stores_what_ctl_says(lab: Lab, scraped) -> None:
    daemons, prom = scraped
    d1, d2 = daemons["lb1"], daemons["lb2"]
    wait_for(lambda: prom.query('up{job="nftsync"} == 1') and
             len(prom.query('up{job="nftsync"} == 1')) == 2, 30, "both daemons scraped")
    sent_before = prom.one('nftsync_peer_records_sent_total{node="lb1"}')

    # Sessions and connections from real traffic through lb1.
    seen = lab.request(port=80, sources=[client4(i) for i in range(1, 21)])
    assert all(b[0] for b in seen.values())

    def ctl_sessions(d: DaemonProc) -> int:
        return d.ctl("stats")["sessions"][f"{FARM}/sessions"]

    wait_for(lambda: ctl_sessions(d1) == 20 and ctl_sessions(d2) == 20, 15,
             "20 sessions on both daemons")
    for node, d in daemons.items():
        sel = f'node="{node}",farm="{FARM}"'
        wait_for(lambda sel=sel: prom.one(f'nftsync_sessions{{{sel},kind="sessions"}}') == 20,
                 15, f"Prometheus to have {node}'s 20 sessions")
        assert prom.one(f'nftsync_sessions{{{sel},kind="static"}}') == 0
        assert prom.one(f'nftsync_map_size_limit{{{sel},kind="sessions"}}') == SIZE
        # The fill ratio the NftsyncMapNearlyFull rule computes.
        assert prom.one(f'nftsync_sessions{{{sel},kind="sessions"}} / '
                        f'nftsync_map_size_limit{{{sel}}}') == pytest.approx(20 / SIZE)
        # Connections: ctl's count, and by farm (every farm mark is http's). Entries appear
        # and time out on their own, so both are read until a scrape and ctl agree.
        wait_for(lambda d=d, node=node: d.ctl("stats")["conntrack"] >= 20 and
                 prom.one(f'nftsync_conntrack_entries{{node="{node}"}}') ==
                 d.ctl("stats")["conntrack"] ==
                 prom.one(f'nftsync_connections{{node="{node}",farm="{FARM}"}}'), 20,
                 f"{node}'s connections in Prometheus equal to ctl stats")
        status = d.ctl("status")
        assert prom.one(f'nftsync_health{{node="{node}",state="{status["health"]}"}}') == 1
        assert prom.one(f'sum(nftsync_health{{node="{node}"}})') == 1
        assert prom.one(f'nftsync_role{{node="{node}",role="{status["role"]}"}}') == 1
        assert prom.one(f'nftsync_build_info{{node="{node}",version="{__version__}",'
                        f'protocol="{PROTOCOL_VERSION}"}}') == 1
        started = prom.one(f'nftsync_start_time_seconds{{node="{node}"}}')
        assert started == pytest.approx(time.time() - status["uptime_s"], abs=30)
        for peer in d.ctl("peers"):
            assert prom.one(f'nftsync_peer_up{{node="{node}",peer="{peer["name"]}"}}') == \
                (peer["state"] in ("up", "served"))
            assert prom.one(f'nftsync_peer_state{{node="{node}",peer="{peer["name"]}",'
                            f'state="{peer["state"]}"}}') == 1
    # What lb1 learned left for lb2: sent grew; lb2 applied; lb1 measured the lag.
    wait_for(lambda: prom.one('nftsync_peer_records_sent_total{node="lb1"}') >= sent_before + 20,
             15, "lb1's records sent to grow by the 20 sessions")
    peer_of_lb1 = d1.ctl("peers")[0]
    wait_for(lambda: prom.one('nftsync_peer_records_sent_total{node="lb1"}') ==
             d1.ctl("peers")[0]["sent"], 15, "records sent in Prometheus equal to ctl peers")
    assert prom.one('nftsync_peer_records_applied_total{node="lb2"}') >= 20
    lag_count = prom.one('nftsync_peer_replication_lag_seconds_count{node="lb1"}')
    assert lag_count and lag_count >= 1 and peer_of_lb1["lag_ms"] is not None
    assert prom.one('nftsync_peer_replication_lag_seconds_bucket{node="lb1",le="+Inf"}') == \
        lag_count
    assert prom.one('histogram_quantile(0.5, nftsync_peer_replication_lag_seconds_bucket'
                    '{node="lb1"})') > 0
    learned = prom.one('nftsync_learned_total{node="lb1",kind="session"}')
    assert learned >= 20
    assert prom.one('nftsync_kernel_queue{node="lb2",lane="nft"}') is not None
    assert prom.one('nftsync_loop_pause_seconds_count{node="lb1"}') > 0

    # Counters only grow: every stored sample of the last 30 s, and no reset seen.
    time.sleep(2)
    for name in ("nftsync_peer_records_sent_total", "nftsync_peer_records_received_total",
                 "nftsync_learned_total", "nftsync_kernel_events_total",
                 "nftsync_peer_replication_lag_seconds_count", "nftsync_gc_collections_total"):
        series = prom.range_values(f'{name}{{job="nftsync"}}[30s]')
        assert series, name
        for values in series:
            assert values == sorted(values), (name, values)
        assert prom.one(f"sum(resets({name}[30s]))") == 0

    # The shipped rules, loaded by this Prometheus, react when lb2's daemon stops: lb2 is
    # not scraped, lb1's link to it is down; both alerts are pending (their `for` is 1 m).
    assert prom.query('ALERTS{alertname=~"NftsyncDown|NftsyncPeerDown"}') == []
    d2.stop()
    wait_for(lambda: prom.one('up{node="lb2"}') == 0, 15, "lb2 unscraped")
    wait_for(lambda: prom.one('nftsync_peer_up{node="lb1"}') == 0, 15, "lb1's peer down")
    wait_for(lambda: {a["metric"]["alertname"] for a in prom.query("ALERTS")} >=
             {"NftsyncDown", "NftsyncPeerDown"}, 15, "NftsyncDown and NftsyncPeerDown pending")
    assert d1.alive()


def test_a_metrics_port_in_use_stops_the_start_with_one_line(lab: Lab, tmp_path: Path) -> None:
    """Another process holds the metrics port: the daemon does not start, says why in one line
    and leaves no control socket behind."""
    key = make_key(tmp_path)
    holder = subprocess.Popen(
        ["ip", "netns", "exec", lab.ns("lb2"), sys.executable, "-c",
         "import socket, time\ns = socket.create_server(('127.0.0.1', 9477))\n"
         "print('listening', flush=True)\ntime.sleep(60)\n"],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        assert holder.stdout.readline().strip() == "listening"
        d = DaemonProc(lab.ns("lb2"), "lb2", 2, SYNC4["lb2"], [SYNC4["lb1"]], key, tmp_path,
                       extra=("--metrics-listen", "127.0.0.1:9477"))
        try:  # its control socket may answer for a moment before the metrics port is tried
            d.start()
        except AssertionError as exc:
            assert "exited (1)" in str(exc), exc
        assert d.proc.wait(timeout=30) == 1
        log = d.log.read_text()
        assert log.splitlines()[-1] == ("nftsync: error: cannot listen for metrics on "
                                        "127.0.0.1:9477: Address already in use"), log
        assert "Traceback" not in log and not d.socket.exists()
    finally:
        holder.kill()
        holder.wait(timeout=10)
