#!/usr/bin/env bash
# Failover demo: kill the active load balancer under load and show what the clients noticed.
#
#   failover-demo.sh            (as root; ~20 s; everything is torn down on exit, even on Ctrl-C)
#
# Builds its own lab (LAB, default "hademo"), loads the HTTP farm (tcp/80, plus the lab's stream
# port 7000) on both load balancers with `nftsync apply`, starts `nftsync daemon` on both when the
# daemon is available, starts keepalived on both (netns-lab/ha.sh), then runs 50 sticky clients,
# one long-lived TCP stream and a request prober through the VIP, kills lb1 (links down, every
# process SIGKILLed) and prints: each client's backend before/after, whether the stream
# survived, the traffic gap, and how long the VIP took to move.
#
# Environment: LAB (default hademo), HA_ADVERT_INT (default 0.1), DEMO_NO_DAEMON=1 (run without
# the daemon even when it is available, to see the difference).
set -euo pipefail

export LAB="${LAB:-hademo}"
export LAB_CLIENTS=52 LAB_BACKENDS=2
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
RUN_SECONDS=9        # stream and prober duration

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

if [[ -n "$DAEMON" ]]; then
    step "nftsync daemon on lb1 (active) and lb2 (backup), over the sync link"
    (
        umask 077
        "$PY" -c 'import secrets; print(secrets.token_hex(32))' >"$STATE/cluster.key"
    )
    chmod 0600 "$STATE/cluster.key"
    declare -A SYNC=([lb1]=10.30.0.1 [lb2]=10.30.0.2) ROLE=([lb1]=active [lb2]=backup)
    declare -A PEER=([lb1]=lb2 [lb2]=lb1) ID=([lb1]=1 [lb2]=2)
    for n in lb1 lb2; do
        ip netns exec "$LAB-$n" "$PY" -m nftsync daemon --listen "${SYNC[$n]}:7777" \
            --peer "${SYNC[${PEER[$n]}]}:7777" --key-file "$STATE/cluster.key" \
            --socket "$STATE/$n.sock" --node-name "$n" --node-id "${ID[$n]}" --cluster "$LAB" \
            --role "${ROLE[$n]}" </dev/null >"$STATE/$n.daemon.log" 2>&1 &
        disown  # it dies with its namespace (ha.sh kill, lab.sh down): no "Killed" job notices
    done
    for n in lb1 lb2; do
        for ((i = 0; i < 150; i++)); do
            [[ -S "$STATE/$n.sock" ]] && (($(peers_up "$n") >= 1)) && break
            ((i < 149)) || die "$n: daemon not connected to its peer after 15 s: $(tail -n 3 "$STATE/$n.daemon.log")"
            sleep 0.1
        done
        echo "$n: daemon up, peer connected (log $STATE/$n.daemon.log)"
    done
else
    step "daemon not available: $NO_DAEMON"
    echo "Sessions and connections are NOT replicated: expect clients to be re-balanced and"
    echo "the stream to break when lb1 dies. That is what nftsync daemon is for."
fi

step "keepalived on lb1 and lb2 (netns-lab/ha.sh up)"
"$HERE/ha.sh" up
"$HERE/ha.sh" status

step "traffic through the VIP: $CLIENTS sticky clients, a stream from $STREAM_SRC, a prober from $PROBE_SRC"
"$HERE/lab.sh" exec client "$PY" "$HERE/client.py" request --vip "$VIP4" --port 80 \
    --sources "10.10.1.1-10.10.1.$CLIENTS" --timeout 1 >"$STATE/demo-before.json"
"$HERE/lab.sh" exec client "$PY" "$HERE/client.py" stream --vip "$VIP4" --port 7000 \
    --source "$STREAM_SRC" --seconds "$RUN_SECONDS" >"$STATE/demo-stream.json" 2>&1 &
STREAM_PID=$!
# The prober: one short request every ~10 ms from one source; each result with its wall-clock
# time, so the gap can be set against the moment of the kill.
"$HERE/lab.sh" exec client "$PY" "$HERE/client.py" probe --vip "$VIP4" --source "$PROBE_SRC" \
    --seconds "$RUN_SECONDS" >"$STATE/demo-probe.json" &
PROBE_PID=$!
sleep "$BEFORE_KILL"
count_sessions() { # node: client sessions in the node's kernel map
    "$HERE/lab.sh" exec "$1" "$PY" -m nftsync sessions list --json 2>/dev/null |
        "$PY" -c 'import json,sys; print(len(json.load(sys.stdin)))' 2>/dev/null || echo '?'
}
echo "sessions in the kernel maps before the kill: lb1 $(count_sessions lb1), lb2 $(count_sessions lb2)"

step "kill lb1 (links down, keepalived$([[ -n "$DAEMON" ]] && echo " and its daemon") SIGKILLed)"
T_KILL=$(date +%s%N)
"$HERE/ha.sh" kill lb1 >"$STATE/demo-kill.out" 2>&1 &
KILL_PID=$!
MOVE_MS=""
for ((i = 0; i < 2000; i++)); do
    if [[ "$(ip -n "$LAB-lb2" -br addr show dev front)" == *" $VIP4/"* ]]; then
        MOVE_MS=$((($(date +%s%N) - T_KILL) / 1000000))
        break
    fi
    sleep 0.002
done
wait "$KILL_PID" || die "ha.sh kill lb1 failed: $(cat "$STATE/demo-kill.out")"
echo "VIP on lb2 after ${MOVE_MS:-(not within 4 s)} ms; $(grep -m1 'Entering MASTER' <(tail -n 50 "$STATE/ha/lb2.log") || true)"

sleep 1
"$HERE/lab.sh" exec client "$PY" "$HERE/client.py" request --vip "$VIP4" --port 80 \
    --sources "10.10.1.1-10.10.1.$CLIENTS" --timeout 1 >"$STATE/demo-after.json"
wait "$STREAM_PID" || true
wait "$PROBE_PID" || true
STREAM_PID="" PROBE_PID=""

step "result"
"$PY" - "$STATE" "$T_KILL" "${MOVE_MS:--1}" "${DAEMON:+yes}" "${NO_DAEMON:-}" <<'EOF'
import json, sys
state, t_kill, move_ms, daemon, why = sys.argv[1], int(sys.argv[2]) / 1e9, int(sys.argv[3]), \
    sys.argv[4] == "yes", sys.argv[5]

def backends(name):
    out = {}
    for line in open(f"{state}/demo-{name}.json"):
        r = json.loads(line)
        if "src" in r:
            out[r["src"]] = r["backend"] or f"({r['error']})"
    return out

before, after = backends("before"), backends("after")
same = 0
print(f"{'client':<12} {'before':<8} {'after':<14} same?")
for src in sorted(before, key=lambda a: int(a.rsplit(".", 1)[1])):
    ok = before[src] == after.get(src)
    same += ok
    print(f"{src:<12} {before[src]:<8} {after.get(src, '-'):<14} {'yes' if ok else 'NO'}")
print(f"\nclients on the same backend after the failover: {same}/{len(before)}")

try:
    st = json.loads(open(f"{state}/demo-stream.json").read().strip().splitlines()[-1])
except (OSError, ValueError, IndexError) as e:
    st = {"error": f"no report ({e})"}
alive = (not st.get("reset") and not st.get("eof") and not st.get("error")
         and st.get("longest_silence_ms", 1e9) < 2000)
print(f"\nstream from the client to port 7000: {'ALIVE' if alive else 'BROKEN'}: "
      f"{st.get('lines', 0)} lines from {st.get('backends_seen')}, "
      f"{st.get('missing', 0)} missing {st.get('gaps', [])[:5]}, "
      f"longest silence {st.get('longest_silence_ms')} ms, reset={st.get('reset')}, "
      f"eof={st.get('eof')}, error={st.get('error')}")

probe = json.loads(open(f"{state}/demo-probe.json").read())
failed = sum(1 for start, done, ok in probe if not ok)
# The outage as a client sees it: the longest wait between two answers, from just before the kill
# (requests in flight then) to the end.
oks = [done for start, done, ok in probe if ok and done > t_kill - 0.5]
if len(oks) >= 2:
    gap, at = max((b - a, a) for a, b in zip(oks, oks[1:]))
    print(f"traffic gap (prober, one request every ~10 ms): {gap * 1000:.0f} ms without an "
          f"answer, from {1000 * (at - t_kill):+.0f} ms after the kill; "
          f"{failed} of {len(probe)} probe requests failed")
else:
    print(f"traffic gap: fewer than two answers after the kill ({len(probe)} probes, "
          f"{failed} failed)")
print(f"VIP move (kill -> VIP address on lb2): {move_ms} ms" if move_ms >= 0 else
      "VIP move: lb2 did not take the VIP within 4 s")
if not daemon:
    print(f"\ndaemon not available: {why}: sessions and connections were not replicated, "
          "so clients that moved and a broken stream are the expected outcome here.")
EOF
if [[ -n "$DAEMON" ]]; then
    step "lb2's daemon after the failover"
    "$PY" -m nftsync ctl --socket "$STATE/lb2.sock" status || true
fi
