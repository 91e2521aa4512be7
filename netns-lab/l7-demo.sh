#!/usr/bin/env bash
# HAProxy's sticky clients across a failover, with nftsync replicating its stick tables.
#
#   l7-demo.sh            (as root; ~20 s; everything is torn down on exit, even on Ctrl-C)
#
# Builds its own lab (LAB, default "l7demo"), runs on lb1 and lb2 Debian's HAProxy in HTTP mode
# on port 8080 of every address (so on the VIP wherever it is), `stick on src` (table `web`) and,
# on port 8082, `stick on req.hdr(X-Session)` (table `web_hdr`), servers be1/be2 with the same
# names and ids on both nodes. Each HAProxy's `peers` section lists itself and its local nftsync
# only (the HAProxies never talk to each other); `nftsync daemon` on each node declares it
# (`[[haproxy]]`, docs/l7.md) and carries the tables over the sync link. keepalived (ha.sh) holds
# the VIP. Then: 100 clients and 20 header sessions through the VIP (lb1), lb2's HAProxy shown
# filling, lb1 killed (links down, every process SIGKILLed), and each client's server after.
#
# Environment: LAB (default l7demo), HA_ADVERT_INT (default 0.1), DEMO_NO_HAPROXY_SYNC=1 (no
# [[haproxy]] in the daemons: see clients re-balanced instead).
set -euo pipefail

export LAB="${LAB:-l7demo}"
export LAB_CLIENTS=100 LAB_BACKENDS=2
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
STATE="${LAB_STATE_ROOT:-/run/nftsync-lab}/$LAB"
if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY=/usr/bin/python3; fi
export LAB_PYTHON="${LAB_PYTHON:-$PY}"
PY=$LAB_PYTHON
VIP4=10.10.0.100
SESSIONS=20

die() {
    echo "l7-demo: $*" >&2
    exit 1
}

[[ "$(id -u)" == 0 ]] || die "needs root (network namespaces)"
command -v haproxy >/dev/null || die "haproxy is not installed (scripts/setup.sh installs it)"

declare -A HAPROXY_PID=()
cleanup() {
    local rc=$? n
    for n in "${!HAPROXY_PID[@]}"; do # the masters, by pid; ha.sh kill may have done it already
        kill "${HAPROXY_PID[$n]}" 2>/dev/null || true
    done
    "$HERE/ha.sh" down >/dev/null 2>&1 || true
    "$HERE/lab.sh" down || true
    exit "$rc"
}

step() { printf '\n== %s\n' "$*"; }

"$HERE/lab.sh" up
trap cleanup EXIT
trap 'exit 130' INT TERM

step "farm rulesets/farm-http.nft (L4, port 80) on lb1 and lb2; HAProxy takes 8080 and 8082"
for n in lb1 lb2; do
    "$HERE/lab.sh" exec "$n" "$PY" -m nftsync apply "$ROOT/rulesets/farm-http.nft" >/dev/null
done
(
    umask 077
    "$PY" -c 'import secrets; print(secrets.token_hex(32))' >"$STATE/cluster.key"
)

write_configs() { # node
    local n=$1 d="$STATE/l7/$1"
    mkdir -p "$d"
    cat >"$d/haproxy.cfg" <<EOF
global
    stats socket $d/admin.sock mode 600 level admin

defaults
    mode http
    timeout connect 2s
    timeout client 10s
    timeout server 10s

peers nftsync_peers
    peer $n 127.0.0.1:10000
    peer nftsync 127.0.0.1:10001

frontend fe_src
    bind :8080
    default_backend web

frontend fe_hdr
    bind :8082
    default_backend web_hdr

backend web
    balance roundrobin
    stick-table type ip size 200k expire 30m store server_id peers nftsync_peers
    stick on src
    server be1 10.20.0.11:80 id 1
    server be2 10.20.0.12:80 id 2

backend web_hdr
    balance roundrobin
    stick-table type string len 64 size 200k expire 30m peers nftsync_peers
    stick on req.hdr(X-Session)
    server be1 10.20.0.11:80 id 1
    server be2 10.20.0.12:80 id 2
EOF
    echo "key_file = \"$STATE/cluster.key\"" >"$d/nftsync.toml"
    if [[ "${DEMO_NO_HAPROXY_SYNC:-0}" != 1 ]]; then
        cat >>"$d/nftsync.toml" <<EOF

[[haproxy]]
name = "$n-haproxy"
admin_socket = "$d/admin.sock"
peer_listen = "127.0.0.1:10001"
local_peer = "nftsync"
haproxy_peer = "$n"
tables = ["web", "web_hdr"]
EOF
    fi
}

declare -A SYNC=([lb1]=10.30.0.1 [lb2]=10.30.0.2) PEER=([lb1]=lb2 [lb2]=lb1) ID=([lb1]=1 [lb2]=2)
peers_up() { # node
    "$PY" -m nftsync ctl --socket "$STATE/$1.sock" peers --json 2>/dev/null |
        "$PY" -c 'import json,sys; print(sum(p["state"] == "up" for p in json.load(sys.stdin)))' \
            2>/dev/null || echo 0
}
haproxy_connected() { # node
    "$PY" -m nftsync ctl --socket "$STATE/$1.sock" status --json 2>/dev/null |
        "$PY" -c 'import json,sys; print(json.load(sys.stdin)["haproxy"][0]["connected"])' \
            2>/dev/null || echo False
}
entries() { # node table: entries in the node's HAProxy table (`show table` on its admin socket)
    "$PY" - "$STATE/l7/$1/admin.sock" "$2" <<'EOF' 2>/dev/null || echo 0
import socket, sys
with socket.socket(socket.AF_UNIX) as s:
    s.settimeout(5)
    s.connect(sys.argv[1])
    s.sendall(f"show table {sys.argv[2]}\n".encode())
    data = b""
    while len(data) < 1 << 24 and (chunk := s.recv(65536)):
        data += chunk
print(sum(line.startswith(b"0x") for line in data.splitlines()))
EOF
}
retry() { # what tries command...: every 0.1 s, at most 20 s
    local what=$1 i
    shift
    for ((i = 0; i < 200; i++)); do
        "$@" && return
        sleep 0.1
    done
    die "$what: not within 20 s"
}

step "nftsync daemon and HAProxy on lb1 and lb2 (daemon first: HAProxy dials it)"
for n in lb1 lb2; do
    write_configs "$n"
    rm -f "$STATE/$n.sock"
    ip netns exec "$LAB-$n" "$PY" -m nftsync daemon --listen "${SYNC[$n]}:7777" \
        --peer "${SYNC[${PEER[$n]}]}:7777" --key-file "$STATE/cluster.key" \
        --socket "$STATE/$n.sock" --node-name "$n" --node-id "${ID[$n]}" --cluster "$LAB" \
        --role backup --config "$STATE/l7/$n/nftsync.toml" </dev/null >>"$STATE/$n.daemon.log" 2>&1 &
    disown
done
for n in lb1 lb2; do
    retry "$n: daemon's peer" eval '(($(peers_up '"$n"') >= 1))'
    # ip netns exec execs HAProxy: $! is its master's pid.
    ip netns exec "$LAB-$n" haproxy -W -db -L "$n" -f "$STATE/l7/$n/haproxy.cfg" \
        </dev/null >/dev/null 2>>"$STATE/l7/$n/haproxy.log" &
    HAPROXY_PID[$n]=$!
    disown
done
for n in lb1 lb2; do
    if [[ "${DEMO_NO_HAPROXY_SYNC:-0}" == 1 ]]; then
        retry "$n: HAProxy's admin socket" test -S "$STATE/l7/$n/admin.sock"
        echo "$n: daemon up, HAProxy pid ${HAPROXY_PID[$n]} (NOT declared to the daemon)"
    else
        retry "$n: HAProxy connected to nftsync" eval '[[ $(haproxy_connected '"$n"') == True ]]'
        echo "$n: daemon up, HAProxy pid ${HAPROXY_PID[$n]} connected to it as its peer"
    fi
done

step "keepalived on lb1 and lb2 (netns-lab/ha.sh up)"
"$HERE/ha.sh" up >/dev/null
"$HERE/ha.sh" status

requests() { # file: one request from each of the 100 clients to VIP:8080
    "$HERE/lab.sh" exec client "$PY" "$HERE/client.py" request --vip "$VIP4" --port 8080 \
        --sources "10.10.1.1-10.10.1.$LAB_CLIENTS" --timeout 2 --parallel 32 >"$STATE/$1"
}
headers() { # file order: one request per X-Session value to VIP:8082 ("session server" lines);
    # order "down" asks in reverse: a fresh round robin would otherwise repeat the first answers
    ip netns exec "$LAB-client" "$PY" - "$VIP4" "$SESSIONS" "$2" >"$STATE/$1" <<'EOF'
import socket, sys
vip, n, order = sys.argv[1], int(sys.argv[2]), sys.argv[3]
for i in range(n, 0, -1) if order == "down" else range(1, n + 1):
    try:
        with socket.create_connection((vip, 8082), timeout=3) as s:
            s.sendall(f"GET / HTTP/1.0\r\nX-Session: user-{i:02d}\r\n\r\n".encode())
            data = b""
            while len(data) < 65536 and (chunk := s.recv(4096)):
                data += chunk
        print(f"user-{i:02d}", data.partition(b"\r\n\r\n")[2].decode().strip() or "(empty)")
    except OSError as e:
        print(f"user-{i:02d}", f"({e.__class__.__name__})")
EOF
}

step "traffic through the VIP (lb1): $LAB_CLIENTS clients to :8080, $SESSIONS X-Session values to :8082"
requests l7-before.json
headers l7-hdr-before.txt up
T0=$(date +%s%N)
for ((i = 0; i < 50; i++)); do
    a=$(entries lb2 web) h=$(entries lb2 web_hdr)
    ((a >= LAB_CLIENTS && h >= SESSIONS)) && break
    sleep 0.2
done
echo "HAProxy tables: lb1 web $(entries lb1 web), web_hdr $(entries lb1 web_hdr);" \
    "lb2 web $a, web_hdr $h ($((($(date +%s%N) - T0) / 1000000)) ms after the requests)"

step "failover: kill lb1 (links down, keepalived, nftsync and HAProxy SIGKILLed)"
T_EVENT=$(date +%s%N)
"$HERE/ha.sh" kill lb1 >"$STATE/l7-kill.out" 2>&1 &
KILL_PID=$!
MOVE_MS=-1
for ((i = 0; i < 4000; i++)); do
    if [[ "$(ip -n "$LAB-lb2" -br addr show dev front)" == *" $VIP4/"* ]]; then
        MOVE_MS=$((($(date +%s%N) - T_EVENT) / 1000000))
        break
    fi
    sleep 0.002
done
wait "$KILL_PID" || die "ha.sh kill lb1 failed: $(cat "$STATE/l7-kill.out")"
unset 'HAPROXY_PID[lb1]'
echo "VIP on lb2 after $MOVE_MS ms"
requests l7-after.json
headers l7-hdr-after.txt down

step "result"
"$PY" - "$STATE" "$MOVE_MS" <<'EOF'
import json, sys
state, move_ms = sys.argv[1], int(sys.argv[2])

def backends(name):
    out = {}
    for line in open(f"{state}/{name}"):
        r = json.loads(line)
        if "src" in r:
            out[r["src"]] = r["backend"] or f"({r['error']})"
    return out

def sessions(name):
    return dict(line.split(maxsplit=1) for line in open(f"{state}/{name}").read().splitlines())

before, after = backends("l7-before.json"), backends("l7-after.json")
hb, ha = sessions("l7-hdr-before.txt"), sessions("l7-hdr-after.txt")
print(f"{'client':<12} {'before':<10} {'after':<10} same?")
shown = 0
for src in sorted(before, key=lambda a: int(a.rsplit(".", 1)[1])):
    kept = before[src] == after.get(src)
    if shown < 5 or not kept:
        shown += 1
        print(f"{src:<12} {before[src]:<10} {after.get(src, '-'):<10} {'yes' if kept else 'NO'}")
if shown < len(before):
    print(f"... and {len(before) - shown} more clients, all on the same server")
print(f"\nservers used before: {sorted(set(before.values()))}")
print(f"clients (stick on src) on the same server after the failover: "
      f"{sum(before[s] == after.get(s) for s in before)}/{len(before)}")
print(f"sessions (stick on X-Session) on the same server after the failover: "
      f"{sum(hb[k] == ha.get(k) for k in hb)}/{len(hb)}")
print(f"VIP move (kill lb1 -> VIP on lb2): {move_ms} ms")
EOF
