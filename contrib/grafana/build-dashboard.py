"""Writes nftsync-dashboard.json, the Grafana dashboard of nftsync's metrics (docs/metrics.md).

The JSON is what Grafana imports; this is where it is edited (a panel is one call below), so
that every query names a real metric and the layout stays on the grid. Run from anywhere:
    python3 contrib/grafana/build-dashboard.py
tests/unit/test_metrics_rules.py checks the JSON is its output.
"""
import json

DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'job="$job",instance=~"$instance"'
panels = []
pid = 0
y = 0


def nid():
    global pid
    pid += 1
    return pid


def row(title):
    global y
    panels.append({"type": "row", "title": title, "id": nid(), "collapsed": False,
                   "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
    y += 1


x_cursor = 0
row_h = 0


def panel(kind, title, targets, w=12, h=8, unit=None, desc="", **extra):
    global x_cursor, y, row_h
    if x_cursor + w > 24:
        x_cursor = 0
        y += row_h
        row_h = 0
    p = {"type": kind, "title": title, "id": nid(), "datasource": DS, "description": desc,
         "gridPos": {"h": h, "w": w, "x": x_cursor, "y": y},
         "targets": [{"datasource": DS, "refId": chr(65 + i), "expr": e, "legendFormat": legend}
                     for i, (e, legend) in enumerate(targets)],
         "fieldConfig": {"defaults": {}, "overrides": []}, "options": {}}
    if unit:
        p["fieldConfig"]["defaults"]["unit"] = unit
    if kind == "timeseries":
        p["fieldConfig"]["defaults"]["custom"] = {"drawStyle": "line", "lineWidth": 1,
                                                  "fillOpacity": 10, "showPoints": "never"}
        p["options"] = {"legend": {"displayMode": "list", "placement": "bottom",
                                   "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "desc"}}
    for k, v in extra.items():
        if k == "defaults":
            p["fieldConfig"]["defaults"].update(v)
        else:
            p[k] = v
    panels.append(p)
    x_cursor += w
    row_h = max(row_h, h)


def endrow():
    global x_cursor, y, row_h
    y += row_h
    x_cursor = 0
    row_h = 0


R = "[$__rate_interval]"
OUT = "{{instance}} → {{peer}}"  # legends: this node to its peer
IN = "{{instance}} ← {{peer}}"  # ... and from it
health_map = [{"type": "value", "options": {
    "0": {"text": "ok", "color": "green", "index": 0},
    "1": {"text": "degraded", "color": "orange", "index": 1},
    "2": {"text": "failing", "color": "red", "index": 2},
    "3": {"text": "starting/syncing", "color": "blue", "index": 3}}}]

row("Overview")
panel("stat", "Health", [(f'sum by (instance) (nftsync_health{{{SEL},state="degraded"}}) + 2 * '
                          f'sum by (instance) (nftsync_health{{{SEL},state="failing"}}) + 3 * '
                          f'sum by (instance) (nftsync_health{{{SEL},state=~"starting|syncing"}})',
                          "{{instance}}")], w=4, h=4,
      desc="nftsync ctl status: ok, degraded, failing, or starting/syncing (nftsync_health).",
      defaults={"mappings": health_map, "thresholds": {"mode": "absolute", "steps": [
          {"color": "green", "value": None}, {"color": "orange", "value": 1},
          {"color": "red", "value": 2}]}},
      options={"colorMode": "background", "textMode": "value_and_name",
               "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}})
panel("stat", "Health reasons", [(f"nftsync_health_reasons{{{SEL}}}", "{{instance}}")], w=3,
      h=4, desc="How many reasons `nftsync ctl status` gives (0 when ok).",
      options={"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}})
panel("stat", "Scraped", [(f"up{{{SEL}}}", "{{instance}}")], w=3, h=4,
      desc="Prometheus' up: 1 when the endpoint answered the last scrape.",
      defaults={"mappings": [{"type": "value", "options": {
          "0": {"text": "DOWN", "color": "red", "index": 0},
          "1": {"text": "up", "color": "green", "index": 1}}}]},
      options={"colorMode": "background", "textMode": "value_and_name",
               "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}})
panel("stat", "Role", [(f"nftsync_role{{{SEL}}} == 1", "{{instance}}: {{role}}")], w=4, h=4,
      desc="active (holds the VIP) or backup.",
      options={"textMode": "name", "colorMode": "none",
               "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}})
panel("stat", "Peers up", [(f"sum by (instance) (nftsync_peer_up{{{SEL}}})", "{{instance}} up"),
                           (f"nftsync_configured_peers{{{SEL}}}", "{{instance}} configured")],
      w=4, h=4, desc="Peer links up, and peers in the configuration.",
      options={"textMode": "value_and_name",
               "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}})
panel("stat", "Uptime", [(f"time() - nftsync_start_time_seconds{{{SEL}}}", "{{instance}}")],
      w=3, h=4, unit="s", desc="Since the daemon started (nftsync_start_time_seconds).",
      options={"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}})
panel("stat", "Version", [(f"nftsync_build_info{{{SEL}}}",
                           "{{instance}}: {{version}} (protocol {{protocol}})")], w=3, h=4,
      options={"textMode": "name", "colorMode": "none",
               "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}})
endrow()

row("Sessions and connections")
panel("timeseries", "Sessions per map", [(f"nftsync_sessions{{{SEL}}}",
                                          "{{instance}} {{farm}} {{map}} ({{kind}})")],
      desc="Live sessions the daemon holds per replicated map (the kernel's map holds the same).")
panel("bargauge", "Map fill (sessions / size limit)", [
    (f"nftsync_sessions{{{SEL}}} / nftsync_map_size_limit{{{SEL}}}",
     "{{instance}} {{farm}} {{map}}")], unit="percentunit",
    desc="A full map takes no new sessions: alert NftsyncMapNearlyFull above 90%. Maps without a "
    "size limit are not shown.",
    defaults={"min": 0, "max": 1, "thresholds": {"mode": "absolute", "steps": [
        {"color": "green", "value": None}, {"color": "orange", "value": 0.8},
        {"color": "red", "value": 0.9}]}},
    options={"displayMode": "gradient", "orientation": "horizontal",
             "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}})
panel("timeseries", "Connections per farm", [
    (f"nftsync_connections{{{SEL}}}", "{{instance}} {{farm}}"),
    (f"nftsync_conntrack_entries{{{SEL}}}", "{{instance}} all farms")],
    desc="Replicated conntrack entries, per farm by backend mark, and in all.")
panel("stat", "Start-up read of the maps", [
    (f"min by (instance) (nftsync_map_startup_read_done{{{SEL}}})", "{{instance}}")],
    w=6, desc="1 once every map's kernel elements have been read after the start.",
    defaults={"mappings": [{"type": "value", "options": {
        "0": {"text": "reading", "color": "orange", "index": 0},
        "1": {"text": "done", "color": "green", "index": 1}}}]},
    options={"colorMode": "background", "textMode": "value_and_name",
             "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}})
panel("timeseries", "Learned changes /s", [
    (f"rate(nftsync_learned_total{{{SEL}}}{R})", "{{instance}} {{kind}}"),
    (f"rate(nftsync_expired_total{{{SEL}}}{R})", "{{instance}} expired")], w=6, unit="ops",
    desc="Local changes learned from the kernel (sessions, conntrack, admin) and sent to the "
    "peers; replica entries expired.")
endrow()

row("Replication")
panel("timeseries", "Replication lag (p50, p99)", [
    (f"histogram_quantile(0.5, sum by (instance, peer, le) "
     f"(rate(nftsync_peer_replication_lag_seconds_bucket{{{SEL}}}{R})))", OUT + " p50"),
    (f"histogram_quantile(0.99, sum by (instance, peer, le) "
     f"(rate(nftsync_peer_replication_lag_seconds_bucket{{{SEL}}}{R})))", OUT + " p99"),
    (f"rate(nftsync_peer_replication_lag_seconds_sum{{{SEL}}}{R}) / "
     f"rate(nftsync_peer_replication_lag_seconds_count{{{SEL}}}{R})", OUT + " mean")],
    unit="s", desc="An update frame sent to its acknowledgement.")
panel("state-timeline", "Peer links", [(f"nftsync_peer_up{{{SEL}}}", OUT)],
      desc="1: connected (or served by the peer's own connection).",
      defaults={"mappings": [{"type": "value", "options": {
          "0": {"text": "down", "color": "red", "index": 0},
          "1": {"text": "up", "color": "green", "index": 1}}}]})
panel("timeseries", "Records /s", [
    (f"rate(nftsync_peer_records_sent_total{{{SEL}}}{R})", OUT + " sent"),
    (f"rate(nftsync_peer_records_received_total{{{SEL}}}{R})", IN + " received"),
    (f"rate(nftsync_peer_records_applied_total{{{SEL}}}{R})", IN + " applied"),
    (f"rate(nftsync_peer_records_rejected_total{{{SEL}}}{R})", IN + " rejected")],
    unit="ops")
panel("timeseries", "Send queues", [
    (f"nftsync_peer_send_queue{{{SEL}}}", OUT + " queued records"),
    (f"nftsync_peer_unacked_frames{{{SEL}}}", OUT + " unacked frames")],
    desc="Records waiting to be sent, frames waiting for an acknowledgement.")
panel("timeseries", "Oldest unacknowledged update", [
    (f"nftsync_peer_unacked_age_seconds{{{SEL}}}", OUT)], unit="s",
    desc="Above stall_after (10 s) the health is degraded: alert NftsyncSyncStalled.")
panel("table", "Peer states", [
    (f"nftsync_peer_state{{{SEL}}} == 1", ""),
    (f"nftsync_peer_state_seconds{{{SEL}}}", "")],
    desc="Each peer link's state and how long it has been in it.",
    transformations=[{"id": "merge", "options": {}},
                     {"id": "organize", "options": {
                         "excludeByName": {"Time": True, "Value #A": True, "__name__": True,
                                           "job": True},
                         "renameByName": {"Value #B": "in state for (s)"}}}],
    targets_format="table")
panel("timeseries", "Snapshots (resyncs)", [
    (f"increase(nftsync_peer_snapshots_sent_total{{{SEL}}}{R})", OUT + " sent"),
    (f"increase(nftsync_peer_snapshots_received_total{{{SEL}}}{R})", IN + " received"),
    (f"increase(nftsync_peer_resnapshots_total{{{SEL}}}{R})", OUT + " sent again"),
    (f"increase(nftsync_peer_connects_total{{{SEL}}}{R})", OUT + " connects")],
    desc="A connection starts with a snapshot each way; more mean overflows, gaps or resync "
    "requests.")
panel("timeseries", "Snapshot durations (p90)", [
    (f"histogram_quantile(0.9, sum by (instance, peer, le) "
     f"(rate(nftsync_peer_snapshot_send_duration_seconds_bucket{{{SEL}}}[$__range])))",
     OUT + " send"),
    (f"histogram_quantile(0.9, sum by (instance, peer, le) "
     f"(rate(nftsync_peer_snapshot_receive_duration_seconds_bucket{{{SEL}}}[$__range])))",
     IN + " receive"),
    (f"rate(nftsync_peer_snapshot_receive_duration_seconds_sum{{{SEL}}}[$__range]) / "
     f"rate(nftsync_peer_snapshot_receive_duration_seconds_count{{{SEL}}}[$__range])",
     IN + " receive, mean"),
    (f"rate(nftsync_peer_snapshot_send_duration_seconds_sum{{{SEL}}}[$__range]) / "
     f"rate(nftsync_peer_snapshot_send_duration_seconds_count{{{SEL}}}[$__range])",
     OUT + " send, mean")], unit="s")
panel("timeseries", "Link problems", [
    (f"increase(nftsync_peer_queue_overflows_total{{{SEL}}}{R})", OUT + " queue overflows"),
    (f"increase(nftsync_peer_sequence_gaps_total{{{SEL}}}{R})", IN + " sequence gaps"),
    (f"increase(nftsync_peer_auth_failures_total{{{SEL}}}{R})", OUT + " auth failures"),
    (f"increase(nftsync_auth_failures_total{{{SEL}}}{R})", "{{instance}} auth failures (all)")])
panel("timeseries", "Frames /s", [
    (f"rate(nftsync_peer_frames_sent_total{{{SEL}}}{R})", OUT + " sent"),
    (f"rate(nftsync_peer_frames_received_total{{{SEL}}}{R})", IN + " received")],
    unit="ops")
panel("timeseries", "Peer records refused, by cause", [
    (f"increase(nftsync_peer_records_refused_total{{{SEL}}}{R})", "{{instance}} {{cause}}"),
    (f"increase(nftsync_capped_expiry_total{{{SEL}}}{R})", "{{instance}} expiry capped")],
    desc="Records from peers the replica refused (docs/protocol.md, Replication semantics).")
panel("timeseries", "Inbound connections: strangers", [
    (f"increase(nftsync_inbound_refused_total{{{SEL}}}{R})", "{{instance}} refused: {{cause}}"),
    (f"increase(nftsync_inbound_authenticated_total{{{SEL}}}{R})", "{{instance}} authenticated"),
    (f"nftsync_inbound_unauthenticated{{{SEL}}}", "{{instance}} in handshake now")],
    desc="Connections to the sync port refused before or during the handshake, by cause "
    "(docs/daemon.md, Exposure to strangers).")
panel("timeseries", "File descriptors", [
    (f"nftsync_open_fds{{{SEL}}}", "{{instance}} open"),
    (f"nftsync_fd_limit{{{SEL}}}", "{{instance}} limit")],
    desc="Inbound connections are refused while fewer than 128 would remain, so the control "
    "socket always answers.")
endrow()

row("Kernel")
panel("timeseries", "Kernel writer queue",
      [(f"nftsync_kernel_queue{{{SEL}}}", "{{instance}} {{lane}}")],
      desc="Changes handed to the writer threads and not written yet; the peer stream is "
      "slowed down above 20000.")
panel("timeseries", "Kernel writes /s", [
    (f"rate(nftsync_kernel_writes_applied_total{{{SEL}}}{R})", "{{instance}} {{sink}} applied"),
    (f"rate(nftsync_kernel_writes_failed_total{{{SEL}}}{R})", "{{instance}} {{sink}} failed"),
    (f"rate(nftsync_kernel_writes_retries_total{{{SEL}}}{R})", "{{instance}} {{sink}} retries"),
    (f"rate(nftsync_kernel_writes_recovered_total{{{SEL}}}{R})", "{{instance}} {{sink}} recovered"),
    (f"rate(nftsync_kernel_transactions_total{{{SEL}}}{R})", "{{instance}} {{sink}} transactions")],
    unit="ops")
panel("timeseries", "Kernel refusals", [
    (f"increase(nftsync_kernel_writes_refused_total{{{SEL}}}{R})",
     "{{instance}} {{sink}} {{cause}}"),
    (f"nftsync_kernel_writes_waiting{{{SEL}}}", "{{instance}} {{sink}} waiting for retry"),
    (f"nftsync_kernel_problems{{{SEL}}}", "{{instance}} problems")],
    desc="Changes the kernel refused (map_full: a full map), kept for a retry.")
panel("timeseries", "Kernel events /s", [
    (f"rate(nftsync_kernel_events_total{{{SEL}}}{R})", "{{instance}} {{source}}"),
    (f"increase(nftsync_kernel_event_overruns_total{{{SEL}}}{R})",
     "{{instance}} {{source}} overruns"),
    (f"increase(nftsync_reconciles_total{{{SEL}}}{R})", "{{instance}} reconciles"),
    (f"increase(nftsync_farm_reloads_total{{{SEL}}}{R})", "{{instance}} farm reloads"),
    (f"increase(nftsync_ct_mark_conflicts_total{{{SEL}}}{R})", "{{instance}} ct mark conflicts")])
endrow()

row("Event loop")
panel("timeseries", "Loop pauses", [
    (f"histogram_quantile(0.99, sum by (instance, le) "
     f"(rate(nftsync_loop_pause_seconds_bucket{{{SEL}}}{R})))", "{{instance}} p99"),
    (f"1 - sum by (instance) (rate(nftsync_loop_pause_seconds_bucket{{{SEL},le=\"0.002\"}}{R})) "
     f"/ sum by (instance) (rate(nftsync_loop_pause_seconds_count{{{SEL}}}{R}))",
     "{{instance}} share over 2 ms"),
    (f"nftsync_loop_pause_max_seconds{{{SEL}}}", "{{instance}} max since start"),
    (f"rate(nftsync_loop_pause_seconds_sum{{{SEL}}}{R})", "{{instance}} paused s/s")],
    unit="s", desc="How late the loop's 10 ms ticker woke up: time nothing else could run.")
panel("timeseries", "Garbage collector", [
    (f"rate(nftsync_gc_seconds_total{{{SEL}}}{R})", "{{instance}} gen {{generation}} s/s"),
    (f"rate(nftsync_gc_collections_total{{{SEL}}}{R})",
     "{{instance}} gen {{generation}} collections/s"),
    (f"nftsync_gc_max_seconds{{{SEL}}}", "{{instance}} gen {{generation}} longest")])
panel("timeseries", "Metrics endpoint", [
    (f"increase(nftsync_metrics_bad_requests_total{{{SEL}}}{R})", "{{instance}} bad requests"),
    (f"scrape_duration_seconds{{{SEL}}}", "{{instance}} scrape duration")], w=24, h=6)
endrow()

# The peer states panel: one instant query per column, as a table.
for p in panels:
    if p.get("targets_format"):
        for t in p["targets"]:
            t["format"] = "table"
            t["instant"] = True
        del p["targets_format"]

dash = {
    "title": "nftsync",
    "uid": "nftsync",
    "description": "nftsync daemons: health, sessions and connections, replication to the peers, "
                   "kernel writes, event loop (docs/metrics.md).",
    "tags": ["nftsync", "load balancer", "nftables"],
    "timezone": "browser",
    "schemaVersion": 38,
    "version": 1,
    "editable": True,
    "graphTooltip": 1,
    "refresh": "30s",
    "time": {"from": "now-3h", "to": "now"},
    "annotations": {"list": []},
    "links": [],
    "templating": {"list": [
        {"name": "datasource", "label": "Data source", "type": "datasource",
         "query": "prometheus", "current": {}, "hide": 0, "refresh": 1, "regex": "",
         "options": []},
        {"name": "job", "label": "Job", "type": "query", "datasource": DS,
         "query": {"query": "label_values(nftsync_build_info, job)", "refId": "job"},
         "definition": "label_values(nftsync_build_info, job)", "refresh": 2,
         "current": {"text": "nftsync", "value": "nftsync"}, "hide": 0, "includeAll": False,
         "multi": False, "sort": 1, "options": []},
        {"name": "instance", "label": "Instance", "type": "query", "datasource": DS,
         "query": {"query": 'label_values(nftsync_build_info{job="$job"}, instance)',
                   "refId": "instance"},
         "definition": 'label_values(nftsync_build_info{job="$job"}, instance)', "refresh": 2,
         "current": {"text": "All", "value": "$__all"}, "hide": 0, "includeAll": True,
         "allValue": ".+", "multi": True, "sort": 1, "options": []},
    ]},
    "panels": panels,
}
if __name__ == "__main__":
    import sys
    from pathlib import Path

    out = Path(sys.argv[1]) if len(sys.argv) > 1 else \
        Path(__file__).with_name("nftsync-dashboard.json")
    out.write_text(json.dumps(dash, indent=2) + "\n")
