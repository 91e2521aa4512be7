# shellcheck shell=bash
# Helpers shared by the lab scripts (lab.sh, ha.sh). Sourced, not run: the caller sets HERE (this
# directory) and PROG (its name for messages) first.

die() {
    echo "$PROG: $*" >&2
    exit 1
}

default_python() {
    # The project venv when there is one (tests pass LAB_PYTHON=sys.executable anyway): the system
    # python3 on PATH may be a slow shim.
    if [[ -x "$HERE/../.venv/bin/python" ]]; then
        echo "$HERE/../.venv/bin/python"
    elif [[ -x /usr/bin/python3 ]]; then
        echo /usr/bin/python3
    else
        command -v python3
    fi
}

ipn() { # node ip-args...
    local node=$1
    shift
    ip -n "$LAB-$node" "$@"
}

# Field 22 of /proc/pid/stat (comm may hold spaces: cut after the last ')'); fails for a pid that
# is gone or a zombie (dead, only not reaped yet by whoever inherited it). With the pid, it
# identifies a process we started, so a recycled pid is never signalled.
proc_starttime() { # pid
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    # shellcheck disable=SC2086
    set -- $stat
    [[ "$1" != Z ]] || return 1
    echo "${20}"
}
