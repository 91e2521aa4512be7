#!/usr/bin/env bash
# keepalived (VRRP) on the lab's two load balancers: it owns the VIP and the backends' gateway.
#
#   ha.sh up | down | status | owner | start NODE | stop NODE | kill NODE | wait-owner NODE [SECS]
#
#   up          generate per-node configs, start keepalived on lb1, wait until it is MASTER, then
#               start it on lb2 (BACKUP). Replaces lab.sh's manual VIP (do not use `lab.sh vip`
#               while keepalived runs: keepalived owns the VIP)
#   down        stop keepalived on both nodes (no node holds the VIP afterwards); links of killed
#               nodes come back up
#   start NODE  start keepalived on lb1|lb2 (after `kill`, bring its links up first)
#   stop NODE   graceful stop (SIGTERM): a MASTER sends priority 0, the peer takes over at once
#   kill NODE   node crash: its links go down, every process in its namespace gets SIGKILL (the
#               nftsync daemon too), its VIPs are gone as after a reboot; the peer notices by
#               missing adverts
#   owner       print the node holding the VIP (lb1, lb2, none, or "lb1 lb2" in a split brain)
#   wait-owner  wait (default 5 s) until NODE holds the VIP; prints the time waited in ms
#
# The configuration is the shipped recipe, contrib/keepalived/keepalived.conf, with its example
# interfaces and addresses replaced by the lab's (see "configuration" below).
#
# Environment: LAB (as lab.sh), HA_ADVERT_INT (VRRP advert interval in seconds, default 0.1),
# HA_VRID (default 51), LAB_PYTHON (interpreter running `-m nftsync` for the notify script),
# HA_RECIPE (the keepalived.conf to run, default the shipped one).
# State in /run/nftsync-lab/$LAB/ha/: lbN.conf, lbN.notify.env, lbN.log (keepalived),
# lbN.notify.log (notify script), lbN.state, lbN.keepalived (pid + start time).
set -euo pipefail

LAB="${LAB:-nsl}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
STATE_ROOT="${LAB_STATE_ROOT:-/run/nftsync-lab}"
STATE="$STATE_ROOT/$LAB"
HA="$STATE/ha"
NOTIFY="$ROOT/contrib/keepalived/nftsync-notify.sh"
RECIPE="${HA_RECIPE:-$ROOT/contrib/keepalived/keepalived.conf}"
HA_ADVERT_INT="${HA_ADVERT_INT:-0.1}"
HA_VRID="${HA_VRID:-51}"

VIP4=10.10.0.100
VIP6=fd00:10::100
GW4=10.20.0.1
GW6=fd00:20::1
declare -A FRONT4=([lb1]=10.10.0.2 [lb2]=10.10.0.3)

PROG=ha.sh
# shellcheck source=netns-lab/common.sh
. "$HERE/common.sh"

usage() { # exit-status
    # The header comment, up to the first line that is not a comment.
    awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}" >&2
    exit "$1"
}

PY="${LAB_PYTHON:-$(default_python)}"

check_settings() {
    [[ "$LAB" =~ ^[A-Za-z0-9_]{1,12}$ ]] ||
        die "LAB must be 1-12 characters of [A-Za-z0-9_], got '$LAB'"
    if ! [[ "$HA_ADVERT_INT" =~ ^([0-9]{1,3}|[0-9]{0,3}\.[0-9]{1,2})$ ]] ||
        ! awk -v a="$HA_ADVERT_INT" 'BEGIN { exit !(a >= 0.01 && a <= 40) }'; then
        die "HA_ADVERT_INT must be seconds in 0.01..40 with at most 2 decimals, got '$HA_ADVERT_INT'"
    fi
    if ! [[ "$HA_VRID" =~ ^[0-9]{1,3}$ ]] || ((10#$HA_VRID < 1 || 10#$HA_VRID > 255)); then
        die "HA_VRID must be 1..255, got '$HA_VRID'"
    fi
}

check_node() {
    [[ "${1:-}" =~ ^(lb1|lb2)$ ]] || die "NODE must be lb1 or lb2, got '${1:-}'"
}

need_lab() {
    [[ "$(id -u)" == 0 ]] || die "needs root (network namespaces)"
    [[ -d "$STATE" && -e "/run/netns/$LAB-lb1" && -e "/run/netns/$LAB-lb2" ]] ||
        die "lab '$LAB' is not up (run: LAB=$LAB netns-lab/lab.sh up)"
    command -v keepalived >/dev/null || die "keepalived is not installed"
    mkdir -p "$HA"
}


# --- processes (pid + start time, so a recycled pid is never signalled) -----------------------

# The recorded keepalived parent of NODE, if it is still that process; prints its pid.
running_pid() { # node
    local f="$HA/$1.keepalived" pid start
    [[ -f "$f" ]] || return 1
    read -r pid start <"$f" || return 1
    [[ "$(proc_starttime "$pid")" == "$start" ]] || return 1
    echo "$pid"
}

wait_gone() { # pid start seconds
    local i n=$(($3 * 50))
    for ((i = 0; i < n; i++)); do
        [[ "$(proc_starttime "$1" || true)" == "$2" ]] || return 0
        sleep 0.02
    done
    return 1
}

# --- configuration ----------------------------------------------------------------------------
# The lab runs the shipped recipe itself (contrib/keepalived/keepalived.conf, or HA_RECIPE), not a
# copy of it: ha.sh only replaces the recipe's example values by the lab's, and keepalived starts
# with `-i lbN`, so the recipe's @lb1/@lb2 lines pick the node as they do in production. Every
# substitution must match a directive and no example value may remain: a recipe that changes
# shape makes `ha.sh start` fail with the reason instead of silently testing something else.

# The recipe without comments and blank lines: what keepalived reads.
directives() { # file
    sed -E 's/[[:space:]]*[#!].*$//; /^[[:space:]]*$/d' "$1"
}

# sed expressions (ERE), each with what it replaces, for NODE.
recipe_subs() { # node
    local node=$1
    RECIPE_SUBS=(
        's/\beth0\b/front/g' 'interface eth0 (client side)'
        's/\beth1\b/back/g' 'interface eth1 (backend side)'
        "s#\\b192\\.0\\.2\\.100/24\\b#$VIP4/16#g" 'the VIP 192.0.2.100/24'
        "s#\\b198\\.51\\.100\\.1/24\\b#$GW4/24#g" "the backends' gateway 198.51.100.1/24"
        "s#\\b2001:db8:10::100/64\\b#$VIP6/64#g" 'the VIP 2001:db8:10::100/64'
        "s#\\b2001:db8:20::1/64\\b#$GW6/64#g" "the backends' gateway 2001:db8:20::1/64"
        "s/\\b192\\.0\\.2\\.2\\b/${FRONT4[lb1]}/g" "lb1's address 192.0.2.2"
        "s/\\b192\\.0\\.2\\.3\\b/${FRONT4[lb2]}/g" "lb2's address 192.0.2.3"
        "s/^([[:space:]]*virtual_router_id )51\$/\\1$HA_VRID/" 'virtual_router_id 51'
        "s/^([[:space:]]*advert_int )0\\.2\$/\\1$HA_ADVERT_INT/" 'advert_int 0.2'
        # The notify script: the root-owned copy in the state dir, with the lab's settings.
        "s#^([[:space:]]*notify )/usr/lib/nftsync/nftsync-notify\\.sh\$#\\1\"$HA/nftsync-notify.sh --defaults $HA/$node.notify.env\"#"
        'notify /usr/lib/nftsync/nftsync-notify.sh'
    )
}

write_conf() { # node
    local node=$1 i expr what plain left
    [[ -f "$RECIPE" ]] || die "recipe $RECIPE not found"
    cat >"$HA/$node.notify.env" <<EOF_ENV
# nftsync-notify.sh settings for $node of lab $LAB (generated by ha.sh)
NFTSYNC_CMD=$PY -m nftsync
NFTSYNC_SOCKET=$STATE/$node.sock
NFTSYNC_NOTIFY_LOG=$HA/$node.notify.log
NFTSYNC_NOTIFY_STATE=$HA/$node.state
NFTSYNC_NOTIFY_SYSLOG=0
NFTSYNC_NOTIFY_TIMEOUT=5
NFTSYNC_REQUIRE_DAEMON=0
EOF_ENV
    recipe_subs "$node"
    plain=$(directives "$RECIPE")
    local -a sed_args=()
    for ((i = 0; i < ${#RECIPE_SUBS[@]}; i += 2)); do
        expr=${RECIPE_SUBS[i]} what=${RECIPE_SUBS[i + 1]}
        # (the p flag prints the lines it substituted in: a match, even where the value stays)
        [[ -n "$(sed -nE "${expr}p" <<<"$plain")" ]] ||
            die "recipe $RECIPE has no directive with $what: ha.sh cannot map it onto the lab"
        sed_args+=(-e "$expr")
    done
    {
        echo "# Generated by ha.sh for $node of lab $LAB from $RECIPE:"
        echo "# its example interfaces, addresses, VRID and advert_int replaced by the lab's."
        echo "# Run as \`keepalived -i $node\` (the @$node lines)."
        sed -E "${sed_args[@]}" "$RECIPE"
    } >"$HA/$node.conf.tmp"
    # Production values left in a directive would make the lab run something it does not test.
    left=$(directives "$HA/$node.conf.tmp" |
        grep -nE '192\.0\.2\.|198\.51\.100\.|203\.0\.113\.|2001:db8|\beth[0-9]+\b|/usr/lib/nftsync' || true)
    if [[ -n "$left" ]]; then
        rm -f "$HA/$node.conf.tmp"
        die "recipe $RECIPE: example values ha.sh does not map onto the lab: $(head -n 1 <<<"$left")"
    fi
    mv -f "$HA/$node.conf.tmp" "$HA/$node.conf"
}

# --- commands ---------------------------------------------------------------------------------
holds_vip() { # node
    [[ "$(ipn "$1" -br addr show dev front 2>/dev/null)" == *" $VIP4/"* ]]
}

owner() {
    local n out=()
    for n in lb1 lb2; do holds_vip "$n" && out+=("$n"); done
    ((${#out[@]})) || out=(none)
    echo "${out[*]}"
}

last_state() { # node: keepalived's own word, from its log
    local s
    s=$(grep -oE 'Entering [A-Z]+ STATE' "$HA/$1.log" 2>/dev/null | tail -n 1 | awk '{print $2}')
    echo "${s:-unknown}"
}

links_up() { # node
    local dev i
    for dev in front back sync; do ipn "$1" link set "$dev" up; done
    for ((i = 0; i < 100; i++)); do
        local bad=0
        for dev in front back sync; do
            [[ "$(ipn "$1" -br link show dev "$dev")" =~ ^[^[:space:]]+[[:space:]]+UP ]] || bad=1
        done
        ((bad == 0)) && return 0
        sleep 0.02
    done
    die "$1: links not operational after 2 s"
}

cmd_start() { # node
    local node=$1 pid log lines i
    check_node "$node"
    need_lab
    if pid=$(running_pid "$node"); then die "$node: keepalived already running (pid $pid)"; fi
    if [[ -f "$HA/$node.killed" ]]; then
        links_up "$node"
        rm -f "$HA/$node.killed"
    fi
    install -m 0755 "$NOTIFY" "$HA/nftsync-notify.sh"
    write_conf "$node"
    ip netns exec "$LAB-$node" keepalived -t -i "$node" -f "$HA/$node.conf" 2>"$HA/$node.check" ||
        die "$node: keepalived refuses $HA/$node.conf: $(tail -n 1 "$HA/$node.check")"
    log="$HA/$node.log"
    touch "$log"
    lines=$(wc -l <"$log")
    rm -f "$HA/$node.pid" "$HA/$node.vrrp.pid"
    # -n: stay in the foreground so $! is keepalived itself (ip netns exec execs it); -l -G: log to
    # the console (our log file), not syslog; -P: VRRP only; -i: the recipe's @lbN lines. Pid files
    # in the lab's state dir, so keepalived never meets another lab's (or the host's)
    # /run/keepalived.pid.
    ip netns exec "$LAB-$node" keepalived -n -l -D -G -P -i "$node" -f "$HA/$node.conf" \
        -p "$HA/$node.pid" -r "$HA/$node.vrrp.pid" </dev/null >>"$log" 2>&1 &
    pid=$!
    echo "$pid $(proc_starttime "$pid" || echo 0)" >"$HA/$node.keepalived"
    for ((i = 0; i < 250; i++)); do
        if tail -n +"$((lines + 1))" "$log" | grep -qE 'Entering (BACKUP|MASTER|FAULT) STATE'; then
            echo "$node: keepalived pid $pid, $(last_state "$node")"
            return 0
        fi
        running_pid "$node" >/dev/null ||
            die "$node: keepalived exited at start: $(tail -n 3 "$log" | tr '\n' ' ')"
        sleep 0.02
    done
    die "$node: keepalived did not enter a VRRP state within 5 s (log $log)"
}

cmd_stop() { # node
    local node=$1 pid start
    check_node "$node"
    need_lab
    if ! pid=$(running_pid "$node"); then
        echo "$node: keepalived not running"
        return 0
    fi
    read -r _ start <"$HA/$node.keepalived"
    kill -TERM "$pid" 2>/dev/null || true
    # keepalived waits for its VRRP child (child_wait_time, 5 s) after sending priority 0.
    if ! wait_gone "$pid" "$start" 8; then
        echo "ha.sh: $node: keepalived pid $pid ignored SIGTERM for 8 s; SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
        local p
        for p in $(ip netns pids "$LAB-$node" 2>/dev/null); do
            [[ "$(cat "/proc/$p/comm" 2>/dev/null)" == keepalived ]] && kill -KILL "$p"
        done
        wait_gone "$pid" "$start" 2 || die "$node: keepalived pid $pid survives SIGKILL"
    fi
    wait_notify_done "$node"
    echo "$node: keepalived stopped"
}

# keepalived does not wait for its notify scripts: wait (bounded) until the STOP notification of a
# stopped node has finished too, so "stopped" means the sync daemon has been told.
wait_notify_done() { # node
    local i p busy
    for ((i = 0; i < 500; i++)); do
        busy=0
        for p in $(ip netns pids "$LAB-$1" 2>/dev/null); do
            if tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -q nftsync-notify; then busy=1; fi
        done
        ((busy == 0)) && return 0
        sleep 0.02
    done
    echo "ha.sh: $1: notify script still running after 10 s" >&2
}

cmd_kill() { # node
    local node=$1 dev pid pids start i a
    check_node "$node"
    need_lab
    touch "$HA/$node.killed"
    # The network goes first, as when power is lost: no priority-0 advert, no goodbye to peers.
    for dev in front back sync; do ipn "$node" link set "$dev" down; done
    # Several rounds: keepalived may fork a notify script (FAULT, its links just went down)
    # between listing and signalling. Only what we signalled must be gone: a short-lived tool
    # run into the namespace from outside (`ip -n`, a test polling addresses) may appear at any
    # time and is killed in a round or simply ends.
    local -A signalled=()
    for ((i = 0; i < 5; i++)); do
        for pid in $(ip netns pids "$LAB-$node"); do
            [[ -n "${signalled[$pid]:-}" ]] && continue
            start=$(proc_starttime "$pid") || continue
            signalled[$pid]=$start
            kill -KILL "$pid" 2>/dev/null || true
        done
        sleep 0.02
    done
    for ((i = 0; i < 100; i++)); do
        pids=""
        for pid in "${!signalled[@]}"; do
            [[ "$(proc_starttime "$pid" || true)" == "${signalled[$pid]}" ]] && pids="$pids $pid"
        done
        [[ -z "$pids" ]] && break
        sleep 0.02
    done
    if [[ -n "$pids" ]]; then
        die "$node: processes survive SIGKILL for 2 s:$(for pid in $pids; do
            printf ' %s(%s)' "$pid" "$(cat "/proc/$pid/comm" 2>/dev/null)"
        done)"
    fi
    # A rebooted node holds no VIP; without this it would answer ARP for the VIP when its links
    # come back, before keepalived starts and removes it.
    for a in "$VIP4/16 front" "$VIP6/64 front" "$GW4/24 back" "$GW6/64 back"; do
        # shellcheck disable=SC2086
        set -- $a
        ipn "$node" addr del "$1" dev "$2" 2>/dev/null || true
    done
    echo "$node: killed (links down, processes gone)"
}

# Wait until NODE holds the VIP; print how long that took.
cmd_wait_owner() { # node [seconds]
    local node=$1 secs=${2:-5} t0 i n
    check_node "$node"
    need_lab
    [[ "$secs" =~ ^[0-9]{1,3}$ ]] || die "seconds must be an integer, got '$secs'"
    t0=$(date +%s%N)
    n=$((secs * 200))
    for ((i = 0; i <= n; i++)); do
        if holds_vip "$node"; then
            echo "$node holds the VIP after $((($(date +%s%N) - t0) / 1000000)) ms"
            return 0
        fi
        sleep 0.005
    done
    die "$node does not hold the VIP after $secs s (owner: $(owner))"
}

cmd_up() {
    need_lab
    local n
    for n in lb1 lb2; do
        if running_pid "$n" >/dev/null; then die "keepalived already runs in $n (ha.sh down first)"; fi
    done
    # Hand the VIP over from lab.sh's manual mode: nobody holds it, neighbour caches flushed.
    LAB="$LAB" "$HERE/lab.sh" vip none
    cmd_start lb1
    cmd_wait_owner lb1 5
    cmd_start lb2
}

cmd_down() {
    [[ "$(id -u)" == 0 ]] || die "needs root (network namespaces)"
    [[ -d "$HA" ]] || return 0
    local n first=lb2 second=lb1
    # Stop the backup first, so the master's priority-0 advert has nobody to hand the VIP to.
    holds_vip lb2 2>/dev/null && first=lb1 second=lb2
    for n in $first $second; do
        [[ -e "/run/netns/$LAB-$n" ]] || continue
        cmd_stop "$n"
        if [[ -f "$HA/$n.killed" ]]; then
            links_up "$n"
            rm -f "$HA/$n.killed"
        fi
    done
}

cmd_status() {
    need_lab
    local n pid
    echo "keepalived in lab '$LAB' (advert_int $HA_ADVERT_INT s, state $HA); VIP owner: $(owner)"
    for n in lb1 lb2; do
        if [[ -f "$HA/$n.killed" ]]; then
            echo "  $n: killed (links down)"
        elif pid=$(running_pid "$n"); then
            echo "  $n: keepalived pid $pid, $(last_state "$n")"
        else
            echo "  $n: keepalived not running"
        fi
    done
}

main() {
    local cmd=${1:-}
    (($# > 0)) && shift
    case "$cmd" in
    -h | --help | help) usage 0 ;;
    "") usage 2 ;;
    esac
    check_settings
    case "$cmd" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    owner) need_lab && owner ;;
    start | stop | kill)
        (($# == 1)) || die "usage: $cmd lb1|lb2"
        "cmd_$cmd" "$1"
        ;;
    wait-owner)
        (($# >= 1 && $# <= 2)) || die "usage: wait-owner lb1|lb2 [SECONDS]"
        cmd_wait_owner "$@"
        ;;
    *) usage 2 ;;
    esac
}

main "$@"
