#!/usr/bin/env bash
# keepalived notify script for nftsync: tell the local sync daemon which role VRRP gave this node.
#
#   nftsync-notify.sh [--defaults FILE] TYPE NAME STATE PRIORITY
#
# keepalived appends TYPE (INSTANCE|GROUP), NAME, STATE and PRIORITY to the configured `notify`
# command. STATE MASTER -> `nftsync ctl promote`; BACKUP, FAULT, STOP, DELETED -> `nftsync ctl
# demote`. Anything else is logged and ignored.
#
# Settings (KEY=VALUE lines in the defaults file, default /etc/default/nftsync-notify; an
# environment variable of the same name wins over the file):
#   NFTSYNC_CMD             the nftsync command, split on spaces (default: nftsync)
#   NFTSYNC_SOCKET          the daemon's control socket (default: /run/nftsync/nftsync.sock)
#   NFTSYNC_NOTIFY_TIMEOUT  seconds one ctl call may take before it is killed (default: 5)
#   NFTSYNC_NOTIFY_LOG      also append one line per call to this file (default: none)
#   NFTSYNC_NOTIFY_STATE    file holding the last notified state (default: /run/nftsync-notify/vrrp.state)
#   NFTSYNC_NOTIFY_SYSLOG   1: log through logger(1) with tag nftsync-notify (default: 1)
#   NFTSYNC_REQUIRE_DAEMON  1: a missing control socket is an error (exit 1); 0: log it and exit 0,
#                           so VRRP works before the daemon is installed (default: 1)
#
# Why the state file and the lock: keepalived forks one notify process per transition and does not
# wait for it, so a quick MASTER -> BACKUP flap can run two of these at once. Each call first records
# the state it was given (atomic rename), then takes a lock and applies whatever state was recorded
# *last*; promote and demote are idempotent in the daemon, so the node always ends in the role VRRP
# gave it last. keepalived's notify_fifo gives strict ordering too, at the cost of a long-running
# reader; this script keeps the plain `notify` interface.
set -uo pipefail

PROG=nftsync-notify
KEYS=(NFTSYNC_CMD NFTSYNC_SOCKET NFTSYNC_NOTIFY_TIMEOUT NFTSYNC_NOTIFY_LOG NFTSYNC_NOTIFY_STATE
    NFTSYNC_NOTIFY_SYSLOG NFTSYNC_REQUIRE_DAEMON)
MAX_DEFAULTS_BYTES=16384

log() { # message
    local line
    line="$(date -u +%Y-%m-%dT%H:%M:%S.%3NZ) ${PROG}[$$]: $*"
    echo "$line" >&2
    if [[ -n "${NFTSYNC_NOTIFY_LOG:-}" ]]; then
        echo "$line" >>"$NFTSYNC_NOTIFY_LOG" 2>/dev/null || true
    fi
    if [[ "${NFTSYNC_NOTIFY_SYSLOG:-1}" == 1 ]] && command -v logger >/dev/null; then
        logger -t "$PROG" -- "$*" 2>/dev/null || true
    fi
}

die() { # status message
    local rc=$1
    shift
    log "error: $*"
    exit "$rc"
}

is_key() {
    local k
    for k in "${KEYS[@]}"; do [[ "$k" == "$1" ]] && return 0; done
    return 1
}

# Read KEY=VALUE lines without executing the file: only known keys, one optional level of quotes,
# bounded size. Values already in the environment win.
load_defaults() { # file
    local file=$1 line key value size
    [[ -f "$file" ]] || return 0
    size=$(stat -c %s -- "$file" 2>/dev/null) || die 1 "cannot stat defaults file $file"
    ((size <= MAX_DEFAULTS_BYTES)) || die 1 "defaults file $file is larger than $MAX_DEFAULTS_BYTES bytes"
    while IFS= read -r line || [[ -n "$line" ]]; do
        line="${line#"${line%%[![:space:]]*}"}"
        [[ -z "$line" || "$line" == \#* ]] && continue
        [[ "$line" =~ ^([A-Z_]+)=(.*)$ ]] || die 1 "defaults file $file: bad line '$line'"
        key=${BASH_REMATCH[1]}
        value=${BASH_REMATCH[2]}
        is_key "$key" || die 1 "defaults file $file: unknown setting $key"
        if [[ "$value" =~ ^\"(.*)\"$ || "$value" =~ ^\'(.*)\'$ ]]; then
            value=${BASH_REMATCH[1]}
        fi
        [[ "${FROM_ENV[$key]:-}" == 1 ]] && continue
        printf -v "$key" '%s' "$value"
    done <"$file"
}

declare -A FROM_ENV=()
for k in "${KEYS[@]}"; do
    [[ -n "${!k+set}" ]] && FROM_ENV[$k]=1
done

defaults=/etc/default/nftsync-notify
if [[ "${1:-}" == --defaults ]]; then
    [[ $# -ge 2 ]] || die 2 "--defaults needs a file"
    defaults=$2
    [[ -f "$defaults" ]] || die 1 "defaults file $defaults not found"
    shift 2
fi
load_defaults "$defaults"

NFTSYNC_CMD=${NFTSYNC_CMD:-nftsync}
NFTSYNC_SOCKET=${NFTSYNC_SOCKET:-/run/nftsync/nftsync.sock}
NFTSYNC_NOTIFY_TIMEOUT=${NFTSYNC_NOTIFY_TIMEOUT:-5}
NFTSYNC_NOTIFY_STATE=${NFTSYNC_NOTIFY_STATE:-/run/nftsync-notify/vrrp.state}
NFTSYNC_REQUIRE_DAEMON=${NFTSYNC_REQUIRE_DAEMON:-1}
[[ "$NFTSYNC_NOTIFY_TIMEOUT" =~ ^[0-9]{1,3}(\.[0-9]{1,3})?$ ]] ||
    die 2 "NFTSYNC_NOTIFY_TIMEOUT must be seconds (e.g. 5 or 0.5), got '$NFTSYNC_NOTIFY_TIMEOUT'"

(($# == 4)) || die 2 "usage: $PROG [--defaults FILE] TYPE NAME STATE PRIORITY (got $# arguments: $*)"
TYPE=$1 NAME=$2 STATE=$3 PRIO=$4
[[ "$TYPE" =~ ^(INSTANCE|GROUP)$ ]] || die 2 "TYPE must be INSTANCE or GROUP, got '$TYPE'"
[[ "$NAME" =~ ^[A-Za-z0-9_.:-]{1,64}$ ]] || die 2 "bad instance name '$NAME'"
[[ "$PRIO" =~ ^[0-9]{1,3}$ ]] || die 2 "bad priority '$PRIO'"

action_for() { # state
    case "$1" in
    MASTER) echo promote ;;
    BACKUP | FAULT | STOP | DELETED) echo demote ;;
    *) echo "" ;;
    esac
}

action=$(action_for "$STATE")
if [[ -z "$action" ]]; then
    log "$TYPE $NAME $STATE $PRIO: unknown state, ignored"
    exit 0
fi

# Record the state we were given, then apply the latest recorded one under the lock.
state_dir=$(dirname -- "$NFTSYNC_NOTIFY_STATE")
mkdir -p -- "$state_dir" 2>/dev/null || die 1 "cannot create $state_dir"
tmp="$NFTSYNC_NOTIFY_STATE.$$"
if ! printf '%s %s %s %s\n' "$STATE" "$TYPE" "$NAME" "$PRIO" >"$tmp" ||
    ! mv -f -- "$tmp" "$NFTSYNC_NOTIFY_STATE"; then
    rm -f -- "$tmp"
    die 1 "cannot write $NFTSYNC_NOTIFY_STATE"
fi

exec 9>>"$NFTSYNC_NOTIFY_STATE.lock" || die 1 "cannot open $NFTSYNC_NOTIFY_STATE.lock"
# Wait at most long enough for one earlier call to finish its ctl command.
lock_wait=$(awk -v t="$NFTSYNC_NOTIFY_TIMEOUT" 'BEGIN { print t + 2 }')
flock -w "$lock_wait" 9 || die 1 "$TYPE $NAME $STATE: another notify call holds the lock; gave up"

read -r latest _ <"$NFTSYNC_NOTIFY_STATE" || latest=$STATE
if [[ "$latest" != "$STATE" ]]; then
    log "$TYPE $NAME $STATE $PRIO: superseded by $latest, applying that instead"
    action=$(action_for "$latest")
    [[ -n "$action" ]] || exit 0
fi

if [[ ! -S "$NFTSYNC_SOCKET" ]]; then
    if [[ "$NFTSYNC_REQUIRE_DAEMON" == 1 ]]; then
        die 1 "$TYPE $NAME $STATE $PRIO -> $action: daemon not running (no socket $NFTSYNC_SOCKET)"
    fi
    log "$TYPE $NAME $STATE $PRIO -> $action: skipped, daemon not running (no socket $NFTSYNC_SOCKET)"
    exit 0
fi

# shellcheck disable=SC2206 # NFTSYNC_CMD is a command line on purpose ("python3 -m nftsync").
cmd=($NFTSYNC_CMD ctl --socket "$NFTSYNC_SOCKET" "$action")
# Say what is being done before doing it: keepalived kills notify scripts that outlive its own
# shutdown (~1 s), and a STOP notification must leave a trace even then.
log "begin: $TYPE $NAME $STATE $PRIO -> $action (calling nftsync ctl)"
start=$(date +%s%N)
out=$(NFTSYNC_SOCKET="$NFTSYNC_SOCKET" timeout -k 1 "$NFTSYNC_NOTIFY_TIMEOUT" "${cmd[@]}" 2>&1)
rc=$?
ms=$((($(date +%s%N) - start) / 1000000))
out=$(printf '%s' "$out" | tr '\n' ' ' | cut -c1-300)
if ((rc == 124 || rc == 137)); then
    die 1 "$TYPE $NAME $STATE $PRIO -> $action: timed out after ${NFTSYNC_NOTIFY_TIMEOUT}s: $out"
elif ((rc != 0)); then
    die 1 "$TYPE $NAME $STATE $PRIO -> $action: failed (rc $rc, ${ms} ms): $out"
fi
log "$TYPE $NAME $STATE $PRIO -> $action: ok (${ms} ms)${out:+: $out}"
exit 0
