#!/usr/bin/env bash
# nftsync lab: two L4 load balancers (lb1, lb2), one client namespace with many source addresses,
# M backends, all joined by two bridges in a "switch" namespace. Everything lives in network
# namespaces named "$LAB-<node>"; nothing is created in the root namespace and no namespace has a
# route out of the lab, so lab traffic cannot leave the machine.
#
#   lab.sh up | down | status | vip lb1|lb2|none | link sync down|up | exec NODE CMD...
#
# Environment: LAB (prefix, default nsl), LAB_CLIENTS (1..250, default 50),
# LAB_BACKENDS (1..8, default 2), LAB_PYTHON (interpreter for backend.py/client.py).
set -euo pipefail

LAB="${LAB:-nsl}"
LAB_CLIENTS="${LAB_CLIENTS:-50}"
LAB_BACKENDS="${LAB_BACKENDS:-2}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE_ROOT="${LAB_STATE_ROOT:-/run/nftsync-lab}"
STATE="$STATE_ROOT/$LAB"

VIP4=10.10.0.100
VIP6=fd00:10::100
GW4=10.20.0.1
GW6=fd00:20::1

PROG=lab.sh
# shellcheck source=netns-lab/common.sh
. "$HERE/common.sh"

usage() { # exit-status
    sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit "$1"
}

PY="${LAB_PYTHON:-$(default_python)}"

check_int() { # name value min max
    if ! [[ "$2" =~ ^[0-9]{1,3}$ ]] || (("10#$2" < $3 || "10#$2" > $4)); then
        die "$1 must be an integer in $3..$4, got '$2'"
    fi
}

check_name() {
    [[ "$LAB" =~ ^[A-Za-z0-9_]{1,12}$ ]] ||
        die "LAB must be 1-12 characters of [A-Za-z0-9_], got '$LAB'"
}

check_counts() {
    check_int LAB_CLIENTS "$LAB_CLIENTS" 1 250
    check_int LAB_BACKENDS "$LAB_BACKENDS" 1 8
    LAB_CLIENTS=$((10#$LAB_CLIENTS))
    LAB_BACKENDS=$((10#$LAB_BACKENDS))
}

need_root() { [[ "$(id -u)" == 0 ]] || die "needs root (network namespaces)"; }


nsx() { # node cmd...
    local node=$1
    shift
    ip netns exec "$LAB-$node" "$@"
}

# The lab's namespaces that exist now. Matched by exact node names, so a lab called "nsl" never
# touches the namespaces of a lab called "nsl2".
lab_namespaces() {
    ip netns list | awk '{print $1}' | grep -E "^${LAB}-(sw|client|lb1|lb2|be[1-8])\$" || true
}

ns_exists() { [[ -e "/run/netns/$LAB-$1" ]]; }

lab_is_up() { [[ -d "$STATE" ]] && ns_exists sw; }

require_up() { lab_is_up || die "lab '$LAB' is not up (run: LAB=$LAB $0 up)"; }


record_pid() { # pid name
    local start
    start=$(proc_starttime "$1") || start=0
    echo "$1 $start $2" >>"$STATE/pids"
}

# True when pid still is the process we started (same start time), so a recycled pid is never
# signalled.
pid_is_ours() { # pid starttime
    local now
    now=$(proc_starttime "$1") || return 1
    [[ "$now" == "$2" ]]
}

kill_recorded() {
    [[ -f "$STATE/pids" ]] || return 0
    local pid start name alive=()
    while read -r pid start name; do
        if pid_is_ours "$pid" "$start"; then
            kill -TERM "$pid" 2>/dev/null || true
            alive+=("$pid:$start")
        fi
    done <"$STATE/pids"
    local i entry
    for i in $(seq 20); do
        local still=()
        for entry in "${alive[@]}"; do
            pid_is_ours "${entry%%:*}" "${entry#*:}" && still+=("$entry")
        done
        alive=("${still[@]}")
        ((${#alive[@]} == 0)) && return 0
        ((i < 20)) && sleep 0.05
    done
    for entry in "${alive[@]}"; do
        pid_is_ours "${entry%%:*}" "${entry#*:}" && kill -KILL "${entry%%:*}" 2>/dev/null
    done
    return 0
}

teardown() {
    kill_recorded
    local ns pid
    for ns in $(lab_namespaces); do
        # Whatever still runs inside the lab (a test's stray client, an nftsync daemon) is the
        # lab's: it dies with its namespace.
        for pid in $(ip netns pids "$ns" 2>/dev/null); do
            kill -KILL "$pid" 2>/dev/null || true
        done
    done
    for ns in $(lab_namespaces); do
        ip netns del "$ns" 2>/dev/null || true
    done
    rm -rf "$STATE"
}

on_up_exit() {
    local rc=$?
    if ((rc != 0)); then
        echo "lab.sh: up failed (rc $rc); tearing down what it made" >&2
        teardown
    fi
}

veth() { # nsA ifA nsB ifB -- made directly inside both namespaces, never in the root one
    ip link add "$2" netns "$LAB-$1" type veth peer name "$4" netns "$LAB-$3"
}

# Make `node` the active LB: give it the VIP on front and the backends' gateway on back.
take_vip() {
    local node=$1
    ipn "$node" -b - <<EOF
addr replace $VIP4/16 dev front
addr replace $VIP6/64 dev front nodad
addr replace $GW4/24 dev back
addr replace $GW6/64 dev back nodad
EOF
}

drop_vip() {
    local node=$1 a
    for a in "$VIP4/16 front" "$VIP6/64 front" "$GW4/24 back" "$GW6/64 back"; do
        # shellcheck disable=SC2086
        set -- $a
        if [[ "$(ipn "$node" addr show dev "$2")" == *" $1 "* ]]; then
            ipn "$node" addr del "$1" dev "$2"
        fi
    done
}

# Tell the segment where the moved addresses live now: gratuitous ARP + unsolicited NA from the new
# holder (what keepalived does). Then flush those entries on the lab's own hosts as well, so they
# re-resolve even when an announcement is lost or not accepted (arp_accept, neigh locktime).
announce_and_flush() {
    local node=$1 k
    if [[ "$node" != none ]]; then
        nsx "$node" "$PY" "$HERE/client.py" announce --dev front --addr "$VIP4" --addr "$VIP6"
        nsx "$node" "$PY" "$HERE/client.py" announce --dev back --addr "$GW4" --addr "$GW6"
    fi
    ipn client neigh flush to "$VIP4" dev front
    ipn client -6 neigh flush to "$VIP6" dev front
    for ((k = 1; k <= $(backend_count); k++)); do
        ipn "be$k" neigh flush to "$GW4" dev back
        ipn "be$k" -6 neigh flush to "$GW6" dev back
    done
}

backend_count() {
    if [[ -f "$STATE/backends" ]]; then cat "$STATE/backends"; else echo "$LAB_BACKENDS"; fi
}

# The kernel activates a link's qdisc only when linkwatch reports its carrier (up to 1 s after
# "link set up"); until then the link drops what is sent. Wait, bounded to 2 s, until every given
# node:dev is operationally UP, so the first packet of a test is not lost.
wait_oper_up() { # node:dev...
    local i nd bad=""
    for i in $(seq 100); do
        bad=""
        for nd in "$@"; do
            [[ "$(ipn "${nd%%:*}" -br link show dev "${nd#*:}")" =~ ^[^[:space:]]+[[:space:]]+UP ]] ||
                bad="$bad $nd"
        done
        [[ -z "$bad" ]] && return 0
        ((i < 100)) && sleep 0.02
    done
    die "links not operational after 2 s:$bad"
}

cmd_up() {
    check_counts
    need_root
    [[ -z "$(lab_namespaces)" ]] ||
        die "lab '$LAB' already exists ($(lab_namespaces | tr '\n' ' ')); run 'LAB=$LAB $0 down' first"
    [[ -x "$PY" ]] || command -v "$PY" >/dev/null || die "python '$PY' not found (set LAB_PYTHON)"
    mkdir -p "$STATE_ROOT"
    mkdir "$STATE" 2>/dev/null || die "state dir $STATE exists; run 'LAB=$LAB $0 down' first"
    trap on_up_exit EXIT
    trap 'exit 130' INT TERM

    local nodes=(sw client lb1 lb2) k i n
    for ((k = 1; k <= LAB_BACKENDS; k++)); do nodes+=("be$k"); done
    echo "$LAB_BACKENDS" >"$STATE/backends"
    echo "$LAB_CLIENTS" >"$STATE/clients"

    for n in "${nodes[@]}"; do
        ip netns add "$LAB-$n"
        ipn "$n" link set lo up
        # Before any link exists, so every interface inherits it: no DAD delay, no RAs.
        nsx "$n" sysctl -qw net.ipv6.conf.default.accept_dad=0 net.ipv6.conf.all.accept_dad=0 \
            net.ipv6.conf.default.accept_ra=0 net.ipv6.conf.all.accept_ra=0
    done
    # The switch forwards frames only; IPv6 off there so bridges send no MLD/RS of their own.
    nsx sw sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
    for n in lb1 lb2; do
        nsx "$n" sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 \
            net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0 \
            net.ipv6.conf.default.keep_addr_on_down=1 net.ipv6.conf.all.keep_addr_on_down=1
    done

    ipn sw -b - <<EOF
link add front type bridge stp_state 0 forward_delay 0 mcast_snooping 0
link add back type bridge stp_state 0 forward_delay 0 mcast_snooping 0
link set front up
link set back up
EOF
    veth client front sw c
    veth lb1 front sw lb1f
    veth lb2 front sw lb2f
    veth lb1 back sw lb1b
    veth lb2 back sw lb2b
    veth lb1 sync lb2 sync
    for ((k = 1; k <= LAB_BACKENDS; k++)); do veth "be$k" back sw "be$k"; done
    {
        for n in c lb1f lb2f; do echo "link set $n master front up"; done
        for n in lb1b lb2b; do echo "link set $n master back up"; done
        for ((k = 1; k <= LAB_BACKENDS; k++)); do echo "link set be$k master back up"; done
    } | ipn sw -b -

    # Client: many source addresses on one interface; reaches only the front segment, plus the
    # backends' subnet through the VIP (so "route get 1.1.1.1" has no answer).
    {
        for ((i = 1; i <= LAB_CLIENTS; i++)); do
            echo "addr add 10.10.1.$i/16 dev front"
            echo "addr add fd00:10::1:$i/64 dev front nodad"
        done
        echo "link set front up"
        echo "route add 10.20.0.0/24 via $VIP4 dev front"
        echo "route add fd00:20::/64 via $VIP6 dev front"
    } | ipn client -b -

    for i in 1 2; do
        ipn "lb$i" -b - <<EOF
addr add 10.10.0.$((i + 1))/16 dev front
addr add fd00:10::$((i + 1))/64 dev front nodad
addr add 10.20.0.$((i + 1))/24 dev back
addr add fd00:20::$((i + 1))/64 dev back nodad
addr add 10.30.0.$i/30 dev sync
addr add fd00:30::$i/64 dev sync nodad
link set front up
link set back up
link set sync up
EOF
    done
    take_vip lb1
    echo lb1 >"$STATE/active"

    for ((k = 1; k <= LAB_BACKENDS; k++)); do
        # No default route: replies to clients go back through the moving gateway, and nothing else
        # is routable.
        ipn "be$k" -b - <<EOF
addr add 10.20.0.$((10 + k))/24 dev back
addr add fd00:20::$((10 + k))/64 dev back nodad
link set back up
route add 10.10.0.0/16 via $GW4 dev back
route add fd00:10::/64 via $GW6 dev back
EOF
    done

    local pid
    for ((k = 1; k <= LAB_BACKENDS; k++)); do
        rm -f "$STATE/be$k.ready"
        # A plain command, not the nsx function: bash then forks once and `ip netns exec` execs
        # python, so $! is the server's own pid (a function would leave a bash subshell in between).
        ip netns exec "$LAB-be$k" "$PY" "$HERE/backend.py" --name "be$k" \
            --ready "$STATE/be$k.ready" </dev/null >"$STATE/be$k.log" 2>&1 &
        pid=$!
        record_pid "$pid" "be$k"
    done
    # Wait (bounded, 10 s) until every backend has bound all its sockets.
    local waited=0 ready
    while :; do
        ready=0
        for ((k = 1; k <= LAB_BACKENDS; k++)); do
            [[ -f "$STATE/be$k.ready" ]] && ready=$((ready + 1))
        done
        ((ready == LAB_BACKENDS)) && break
        while read -r pid _ n; do
            kill -0 "$pid" 2>/dev/null ||
                die "backend $n exited at start: $(tail -n 1 "$STATE/$n.log" 2>/dev/null)"
        done <"$STATE/pids"
        ((waited < 200)) || die "backends not ready after 10 s (logs in $STATE)"
        waited=$((waited + 1))
        sleep 0.05
    done
    local links=(client:front lb1:front lb1:back lb1:sync lb2:front lb2:back lb2:sync)
    for ((k = 1; k <= LAB_BACKENDS; k++)); do links+=("be$k:back"); done
    wait_oper_up "${links[@]}"
    trap - EXIT INT TERM
    echo "lab '$LAB' up: client (10.10.1.1-$LAB_CLIENTS), lb1 (active), lb2, be1-be$LAB_BACKENDS"
}

cmd_down() {
    need_root
    teardown
}

# keepalived pid of NODE (from ha.sh's "pid starttime" file) when that process still runs.
ha_keepalived_pid() { # node
    local f="$STATE/ha/$1.keepalived" pid start
    [[ -f "$f" ]] || return 1
    read -r pid start <"$f" || return 1
    pid_is_ours "$pid" "$start" || return 1
    echo "$pid"
}

cmd_vip() {
    local target=${1:-} n pid
    [[ "$target" =~ ^(lb1|lb2|none)$ ]] || die "vip needs lb1, lb2 or none, got '$target'"
    require_up
    # keepalived owns the VIP while it runs: a manual move would be undone (or fought) by VRRP and
    # leave both nodes holding the address.
    for n in lb1 lb2; do
        if pid=$(ha_keepalived_pid "$n"); then
            die "keepalived runs on $n (pid $pid) and owns the VIP; use netns-lab/ha.sh (stop/kill) or 'ha.sh down' first"
        fi
    done
    local n
    for n in lb1 lb2; do
        [[ "$n" == "$target" ]] || drop_vip "$n"
    done
    [[ "$target" == none ]] || take_vip "$target"
    echo "$target" >"$STATE/active"
    announce_and_flush "$target"
}

cmd_link() {
    local which=${1:-} state=${2:-}
    [[ "$which" == sync && "$state" =~ ^(up|down)$ ]] || die "usage: link sync up|down"
    require_up
    ipn lb1 link set sync "$state"
    ipn lb2 link set sync "$state"
    [[ "$state" == up ]] || return 0
    wait_oper_up lb1:sync lb2:sync
}

cmd_status() {
    if ! lab_is_up; then
        echo "lab '$LAB' is not up"
        local left
        left=$(lab_namespaces | tr '\n' ' ')
        [[ -z "$left" ]] || echo "  leftover namespaces: $left"
        return 3
    fi
    local m n pid start name nodes=(sw client lb1 lb2)
    m=$(backend_count)
    for ((k = 1; k <= m; k++)); do nodes+=("be$k"); done
    echo "lab '$LAB' (state $STATE): $(cat "$STATE/clients") client addresses, $m backends"
    echo "  active LB: $(cat "$STATE/active")  (VIP $VIP4 $VIP6, gateway $GW4 $GW6)"
    for n in lb1 lb2; do
        local holds="" sync front back
        front=$(ipn "$n" -br addr show dev front)
        back=$(ipn "$n" -br addr show dev back)
        [[ "$front" == *" $VIP4/"* ]] && holds="$holds VIP4"
        [[ "$front" == *" $VIP6/"* ]] && holds="$holds VIP6"
        [[ "$back" == *" $GW4/"* ]] && holds="$holds GW4"
        [[ "$back" == *" $GW6/"* ]] && holds="$holds GW6"
        sync=$(ipn "$n" -br link show dev sync | awk '{print $2}')
        echo "  $n: holds:${holds:- nothing}; sync link $sync; nft tables: $(nsx "$n" nft list tables 2>/dev/null | sed 's/^table //' | tr '\n' ' ')"
    done
    while read -r pid start name; do
        if pid_is_ours "$pid" "$start"; then
            echo "  $name: backend.py pid $pid running"
        else
            echo "  $name: backend.py pid $pid NOT running (log $STATE/$name.log)"
        fi
    done <"$STATE/pids"
    echo "  namespaces: $(lab_namespaces | tr '\n' ' ')"
    if [[ -d "$STATE/ha" ]]; then
        # keepalived's view (who is MASTER), when ha.sh has been used in this lab.
        LAB="$LAB" "$HERE/ha.sh" status | sed 's/^/  /' || echo "  (ha.sh status failed)"
    fi
}

cmd_exec() {
    local node=${1:-}
    [[ -n "$node" ]] || die "usage: exec NODE CMD..."
    shift
    (($# > 0)) || die "usage: exec NODE CMD..."
    [[ "$node" =~ ^(sw|client|lb1|lb2|be[1-8])$ ]] || die "unknown node '$node'"
    ns_exists "$node" || die "no namespace $LAB-$node"
    exec ip netns exec "$LAB-$node" "$@"
}

main() {
    local cmd=${1:-}
    (($# > 0)) && shift
    [[ "$cmd" =~ ^(-h|--help|help|)$ ]] || check_name
    case "$cmd" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    vip) cmd_vip "$@" ;;
    link) cmd_link "$@" ;;
    exec) cmd_exec "$@" ;;
    -h | --help | help) usage 0 ;;
    *) usage 2 ;;
    esac
}

main "$@"
