#!/usr/bin/env bash
# What nftsync is for, in one run: a failover and a failback under load, and what clients noticed.
#
#   failover-demo.sh            (as root; ~40 s; everything is torn down on exit, even on Ctrl-C)
#
# Builds its own lab (LAB, default "hademo"), loads the HTTP farm (tcp/80, plus the lab's stream
# port 7000) on both load balancers with `nftsync apply`, starts `nftsync daemon` on both when the
# daemon is available, starts keepalived on both (netns-lab/ha.sh), then runs 50 sticky clients,
# one long-lived TCP stream and a request prober through the VIP and
#   1. failover: kills lb1 (links down, every process SIGKILLed); keepalived moves the VIP to lb2;
#   2. failback (with the daemon): lb1 boots again with an empty kernel (farm applied at boot, its
#      daemon as backup resynchronises from lb2, keepalived stays BACKUP: nopreempt), then the
#      VIP is moved back by hand (keepalived stopped on lb2, the documented failback);
# and prints after each step each client's backend before/after, whether the stream survived,
# the traffic gap, and how long the VIP took to move.
#
# Environment: LAB (default hademo), HA_ADVERT_INT (default 0.1), DEMO_NO_DAEMON=1 (run without
# the daemon even when it is available, to see the difference; no failback then),
# DEMO_NO_FAILBACK=1 (stop after the failover).
set -euo pipefail

export LAB="${LAB:-hademo}"
export LAB_CLIENTS=60 LAB_BACKENDS=2   # 1-50 sticky, 51 stream, 52 prober, 53-60 arrive during the failover
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
STATE="${LAB_STATE_ROOT:-/run/nftsync-lab}/$LAB"
if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY=/usr/bin/python3; fi
export LAB_PYTHON="${LAB_PYTHON:-$PY}"
PY=$LAB_PYTHON
CLIENTS=50           # sticky clients 10.10.1.1-50
STREAM_SRC=10.10.1.51
PROBE_SRC=10.10.1.52
VIP4=10.10.0.100
BEFORE_KILL=2        # seconds of traffic before the kill
RUN_SECONDS=9        # stream and prober duration (failover only)
RUN_SECONDS_FB=40    # ... with the failback (they stop early once the failback is shown)

die() {
    echo "failover-demo: $*" >&2
    exit 1
}

[[ "$(id -u)" == 0 ]] || die "needs root (network namespaces)"

cleanup() {
    local rc=$?
    [[ -n "${STREAM_PID:-}" ]] && kill "$STREAM_PID" 2>/dev/null
    [[ -n "${PROBE_PID:-}" ]] && kill "$PROBE_PID" 2>/dev/null
    "$HERE/ha.sh" down >/dev/null 2>&1 || true
    "$HERE/lab.sh" down || true
    exit "$rc"
}

step() { printf '\n== %s\n' "$*"; }

"$HERE/lab.sh" up
trap cleanup EXIT
trap 'exit 130' INT TERM

step "farm: rulesets/farm-http.nft, also balancing the stream port 7000, on lb1 and lb2"
sed 's/tcp dport 80 jump/tcp dport { 80, 7000 } jump/' "$ROOT/rulesets/farm-http.nft" \
    >"$STATE/demo-farm.nft"
for n in lb1 lb2; do
    "$HERE/lab.sh" exec "$n" "$PY" -m nftsync apply "$STATE/demo-farm.nft" >/dev/null
    echo "$n: applied"
done

# --- the sync daemon, when there is one ----------------------------------------------------------
DAEMON=""
if [[ "${DEMO_NO_DAEMON:-0}" == 1 ]]; then
    NO_DAEMON="DEMO_NO_DAEMON=1"
elif [[ ! -f "$ROOT/nftsync/daemon/core.py" ]]; then
    NO_DAEMON="nftsync/daemon/core.py does not exist yet"
elif ! "$PY" -m nftsync daemon --help >/dev/null 2>&1; then
    NO_DAEMON="'python -m nftsync daemon --help' fails"
else
    DAEMON=1
fi

peers_up() { # node
    "$PY" -m nftsync ctl --socket "$STATE/$1.sock" peers --json 2>/dev/null |
        "$PY" -c 'import json,sys; print(sum(p["state"] == "up" for p in json.load(sys.stdin)))' \
            2>/dev/null || echo 0
}

declare -A SYNC=([lb1]=10.30.0.1 [lb2]=10.30.0.2) ROLE=([lb1]=active [lb2]=backup)
declare -A PEER=([lb1]=lb2 [lb2]=lb1) ID=([lb1]=1 [lb2]=2)
start_daemon() { # node role
    local n=$1
    rm -f "$STATE/$n.sock"
    ip netns exec "$LAB-$n" "$PY" -m nftsync daemon --listen "${SYNC[$n]}:7777" \
        --peer "${SYNC[${PEER[$n]}]}:7777" --key-file "$STATE/cluster.key" \
        --socket "$STATE/$n.sock" --node-name "$n" --node-id "${ID[$n]}" --cluster "$LAB" \
        --role "$2" </dev/null >>"$STATE/$n.daemon.log" 2>&1 &
    disown  # it dies with its namespace (ha.sh kill, lab.sh down): no "Killed" job notices
}
wait_peer() { # node
    local n=$1 i
    for ((i = 0; i < 150; i++)); do
        [[ -S "$STATE/$n.sock" ]] && (($(peers_up "$n") >= 1)) && break
        ((i < 149)) || die "$n: daemon not connected to its peer after 15 s: $(tail -n 3 "$STATE/$n.daemon.log")"
        sleep 0.1
    done
    echo "$n: daemon up, peer connected (log $STATE/$n.daemon.log)"
}

if [[ -n "$DAEMON" ]]; then
    step "nftsync daemon on lb1 (active) and lb2 (backup), over the sync link"
    (
        umask 077
        "$PY" -c 'import secrets; print(secrets.token_hex(32))' >"$STATE/cluster.key"
    )
    chmod 0600 "$STATE/cluster.key"
    for n in lb1 lb2; do start_daemon "$n" "${ROLE[$n]}"; done
    for n in lb1 lb2; do wait_peer "$n"; done
else
    step "daemon not available: $NO_DAEMON"
    echo "Sessions and connections are NOT replicated: expect clients to be re-balanced and"
    echo "the stream to break when lb1 dies. That is what nftsync daemon is for."
fi

step "keepalived on lb1 and lb2 (netns-lab/ha.sh up)"
"$HERE/ha.sh" up
"$HERE/ha.sh" status

FAILBACK=""
[[ -n "$DAEMON" && "${DEMO_NO_FAILBACK:-0}" != 1 ]] && FAILBACK=1 && RUN_SECONDS=$RUN_SECONDS_FB

requests() { # file: one request from each sticky client through the VIP
    "$HERE/lab.sh" exec client "$PY" "$HERE/client.py" request --vip "$VIP4" --port 80 \
        --sources "10.10.1.1-10.10.1.$CLIENTS" --timeout 1 >"$STATE/$1"
}
count_sessions() { # node: client sessions in the node's kernel map
    "$HERE/lab.sh" exec "$1" "$PY" -m nftsync sessions list --json 2>/dev/null |
        "$PY" -c 'import json,sys; print(len(json.load(sys.stdin)))' 2>/dev/null || echo '?'
}
vip_on() { [[ "$(ip -n "$LAB-$1" -br addr show dev front)" == *" $VIP4/"* ]]; }
wait_vip() { # node: prints ms since $T_EVENT when the VIP shows up on node (bounded: 8 s)
    local i
    for ((i = 0; i < 4000; i++)); do
        if vip_on "$1"; then
            echo $((($(date +%s%N) - T_EVENT) / 1000000))
            return
        fi
        sleep 0.002
    done
    echo -1
}

step "traffic through the VIP: $CLIENTS sticky clients, a stream from $STREAM_SRC, a prober from $PROBE_SRC"
requests demo-before.json
# ip netns exec execs the command: $! is the python process (SIGUSR1 ends it early, with report).
ip netns exec "$LAB-client" "$PY" "$HERE/client.py" stream --vip "$VIP4" --port 7000 \
    --source "$STREAM_SRC" --seconds "$RUN_SECONDS" >"$STATE/demo-stream.json" 2>&1 &
STREAM_PID=$!
# The prober: one short request every ~10 ms from one source; each result with its wall-clock
# time, so the gap can be set against the moments of the kill and of the failback.
ip netns exec "$LAB-client" "$PY" "$HERE/client.py" probe --vip "$VIP4" --source "$PROBE_SRC" \
    --seconds "$RUN_SECONDS" >"$STATE/demo-probe.json" &
PROBE_PID=$!
sleep "$BEFORE_KILL"
echo "sessions in the kernel maps before the kill: lb1 $(count_sessions lb1), lb2 $(count_sessions lb2)"

step "1. failover: kill lb1 (links down, keepalived$([[ -n "$DAEMON" ]] && echo " and its daemon") SIGKILLed)"
T_EVENT=$(date +%s%N)
T_KILL=$T_EVENT
"$HERE/ha.sh" kill lb1 >"$STATE/demo-kill.out" 2>&1 &
KILL_PID=$!
MOVE_MS=$(wait_vip lb2)
wait "$KILL_PID" || die "ha.sh kill lb1 failed: $(cat "$STATE/demo-kill.out")"
echo "VIP on lb2 after $MOVE_MS ms; $(grep -m1 'Entering MASTER' <(tail -n 50 "$STATE/ha/lb2.log") || true)"
sleep 1
requests demo-after.json

T_BACK=0 BACK_MS=-1
if [[ -n "$FAILBACK" ]]; then
    step "2. failback: lb1 boots (empty kernel), resynchronises from lb2, takes the VIP back"
    # Clients that arrive while lb1 is down get their sessions on lb2 alone.
    "$HERE/lab.sh" exec client "$PY" "$HERE/client.py" request --vip "$VIP4" --port 80 \
        --sources 10.10.1.53-10.10.1.60 --timeout 1 >"$STATE/demo-new.json"
    for dev in front back sync; do ip -n "$LAB-lb1" link set "$dev" up; done
    ip netns exec "$LAB-lb1" nft flush ruleset
    ip netns exec "$LAB-lb1" conntrack -F >/dev/null 2>&1 || true
    "$HERE/lab.sh" exec lb1 "$PY" -m nftsync apply "$STATE/demo-farm.nft" >/dev/null
    echo "lb1: links up, kernel empty, farm applied at boot: $(count_sessions lb1) sessions"
    T0=$(date +%s%N)
    start_daemon lb1 backup
    wait_peer lb1
    # Ready = past `syncing`: lb2's snapshot is in lb1's kernel (what to wait for before a failback).
    "$PY" -m nftsync ctl --socket "$STATE/lb1.sock" status --wait-ready --timeout 30 >/dev/null ||
        die "lb1: not ready after 30 s: $("$PY" -m nftsync ctl --socket "$STATE/lb1.sock" status)"
    echo "lb1: ready (ctl status --wait-ready) $((($(date +%s%N) - T0) / 1000000)) ms after its daemon started:" \
        "$(count_sessions lb1) of lb2's $(count_sessions lb2) sessions in its kernel"
    "$HERE/ha.sh" start lb1 >/dev/null
    echo "lb1: keepalived started, $("$HERE/ha.sh" owner) keeps the VIP (nopreempt)"
    T_EVENT=$(date +%s%N)
    T_BACK=$T_EVENT
    "$HERE/ha.sh" stop lb2 >"$STATE/demo-back.out" 2>&1 &
    STOP_PID=$!
    BACK_MS=$(wait_vip lb1)
    wait "$STOP_PID" || die "ha.sh stop lb2 failed: $(cat "$STATE/demo-back.out")"
    "$HERE/ha.sh" start lb2 >/dev/null
    echo "VIP back on lb1 after $BACK_MS ms (keepalived stopped on lb2, then restarted as BACKUP)"
    sleep 1
    requests demo-back.json
    "$HERE/lab.sh" exec client "$PY" "$HERE/client.py" request --vip "$VIP4" --port 80 \
        --sources 10.10.1.53-10.10.1.60 --timeout 1 >"$STATE/demo-new-back.json"
fi
kill -USR1 "$STREAM_PID" "$PROBE_PID" 2>/dev/null || true
wait "$STREAM_PID" || true
wait "$PROBE_PID" || true
STREAM_PID="" PROBE_PID=""

step "result"
"$PY" - "$STATE" "$T_KILL" "$MOVE_MS" "$T_BACK" "$BACK_MS" "${DAEMON:+yes}" "${NO_DAEMON:-}" <<'EOF'
import json, sys
state = sys.argv[1]
t_kill, move_ms, t_back, back_ms = int(sys.argv[2]) / 1e9, int(sys.argv[3]), \
    int(sys.argv[4]) / 1e9, int(sys.argv[5])
daemon, why = sys.argv[6] == "yes", sys.argv[7]
failback = t_back > 0

def backends(name):
    out = {}
    try:
        lines = open(f"{state}/demo-{name}.json").readlines()
    except OSError:
        return out
    for line in lines:
        r = json.loads(line)
        if "src" in r:
            out[r["src"]] = r["backend"] or f"({r['error']})"
    return out

before, after, back = backends("before"), backends("after"), backends("back")
cols = ["before", "after failover"] + (["after failback"] if failback else [])
same_fo = same_fb = 0
shown = 0
print(f"{'client':<12} " + " ".join(f"{c:<15}" for c in cols) + " same?")
for src in sorted(before, key=lambda a: int(a.rsplit(".", 1)[1])):
    row = [before[src], after.get(src, "-")] + ([back.get(src, "-")] if failback else [])
    same_fo += before[src] == after.get(src)
    same_fb += before[src] == back.get(src)
    kept = len(set(row)) == 1
    # The first few rows show the shape; every client that changed backend is shown.
    if shown < 5 or not kept:
        shown += 1
        print(f"{src:<12} " + " ".join(f"{c:<15}" for c in row) + f" {'yes' if kept else 'NO'}")
if shown < len(before):
    print(f"... and {len(before) - shown} more clients, all on the same backend throughout")
print(f"\nclients on the same backend after the failover: {same_fo}/{len(before)}")
if failback:
    print(f"clients on the same backend after the failback: {same_fb}/{len(before)}")
    new, new_back = backends("new"), backends("new-back")
    print("clients that arrived while lb1 was down, on the same backend after the failback: "
          f"{sum(new[s] == new_back.get(s) for s in new)}/{len(new)}")

try:
    st = json.loads(open(f"{state}/demo-stream.json").read().strip().splitlines()[-1])
except (OSError, ValueError, IndexError) as e:
    st = {"error": f"no report ({e})"}
alive = (not st.get("reset") and not st.get("eof") and not st.get("error")
         and st.get("longest_silence_ms", 1e9) < 2000)
print(f"\nstream from the client to port 7000, held through "
      f"{'both moves' if failback else 'the failover'}: {'ALIVE' if alive else 'BROKEN'}: "
      f"{st.get('lines', 0)} lines from {st.get('backends_seen')}, "
      f"{st.get('missing', 0)} missing {st.get('gaps', [])[:5]}, "
      f"longest silence {st.get('longest_silence_ms')} ms, reset={st.get('reset')}, "
      f"eof={st.get('eof')}, error={st.get('error')}")

probe = json.loads(open(f"{state}/demo-probe.json").read())


def gap(t0, t1):
    """The outage as a client sees it: the longest wait between two answers, from just before
    the event (requests in flight then) to t1."""
    oks = [done for start, done, ok in probe if ok and t0 - 0.5 < done <= t1]
    if len(oks) < 2:
        return "fewer than two answers"
    g, at = max((b - a, a) for a, b in zip(oks, oks[1:]))
    return f"{g * 1000:.0f} ms without an answer (starting at {1000 * (at - t0):+.0f} ms)"


failed = sum(1 for start, done, ok in probe if not ok)
print("traffic gap (prober, one request every ~10 ms), failover: "
      + gap(t_kill, t_back if failback else float("inf")))
if failback:
    print(f"traffic gap, failback: {gap(t_back, float('inf'))}")
print(f"{failed} of {len(probe)} probe requests failed")
print(f"VIP move, failover (kill lb1 -> VIP on lb2): {move_ms} ms" if move_ms >= 0 else
      "VIP move, failover: lb2 did not take the VIP within 8 s")
if failback:
    print(f"VIP move, failback (stop keepalived on lb2 -> VIP on lb1): {back_ms} ms"
          if back_ms >= 0 else "VIP move, failback: lb1 did not take the VIP within 8 s")
if not daemon:
    print(f"\ndaemon not available: {why}: sessions and connections were not replicated, "
          "so clients that moved and a broken stream are the expected outcome here.")
EOF
if [[ -n "$DAEMON" ]]; then
    step "the daemons at the end"
    for n in lb1 lb2; do
        echo "-- $n"
        "$PY" -m nftsync ctl --socket "$STATE/$n.sock" status || true
    done
fi
