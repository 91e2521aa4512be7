"""Daemon configuration: what `nftsync daemon` needs to run, after the file and flags are merged.

`load_config` (below) reads /etc/nftsync/nftsync.toml and applies command-line overrides; the
daemon core only ever sees a validated `DaemonConfig`.
"""

from __future__ import annotations

import difflib
import grp
import ipaddress
import os
import re
import socket
import stat
import tomllib
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nftsync.endpoint import format_endpoint
from nftsync.errors import NftsyncError
from nftsync.files import FileRefused, open_regular
from nftsync.proto.auth import KeyFileError, load_key

from .logformat import LOG_FORMATS
from .tls import KEYS as TLS_KEYS
from .tls import TlsError, TlsSettings, load_tls

DEFAULT_PORT = 7777
DEFAULT_METRICS_PORT = 9477  # docs/metrics.md; not in Prometheus' list of allocated ports
DEFAULT_SOCKET = "/run/nftsync/nftsync.sock"
DEFAULT_CONFIG = "/etc/nftsync/nftsync.toml"
HAPROXY_PREFIX = "haproxy/"  # map_id of a replicated HAProxy stick table: haproxy/<table>


@dataclass(frozen=True, slots=True)
class PeerConfig:
    host: str
    port: int = DEFAULT_PORT

    def __str__(self) -> str:
        return format_endpoint(self.host, self.port)


@dataclass(frozen=True, slots=True)
class HaproxyConfig:
    """One `[[haproxy]]`: a local HAProxy whose stick tables nftsync replicates, as a peer of
    it on loopback (docs/l7.md)."""

    name: str  # a label for logs and `ctl`
    admin_socket: str  # its `stats socket ... level admin`: server names, `show table`
    peer_host: str  # where nftsync listens for HAProxy's peers connection (loopback only)
    peer_port: int
    local_peer: str  # nftsync's name in HAProxy's `peers` section
    haproxy_peer: str  # HAProxy's own local peer name (`localpeer`, or its hostname)
    tables: tuple[str, ...]  # the stick tables replicated, as map_id haproxy/<table>


@dataclass(slots=True)
class DaemonConfig:
    key: bytes  # the pre-shared key (already loaded and checked from key_file)
    node_id: int  # u32, unique in the cluster, never 0
    node_name: str
    cluster: str = "nftsync"
    key_file: str = ""
    listen_host: str = "0.0.0.0"
    listen_port: int = DEFAULT_PORT
    peers: list[PeerConfig] = field(default_factory=list)
    role: str = "backup"  # "active" | "backup" (the seed's -M / -B)
    socket: str = DEFAULT_SOCKET
    farms: list[str] | None = None  # replicate only these farms (None: every nftsync farm)
    conntrack: bool = True  # replicate the farms' conntrack entries too
    legacy_farms: list[str] = field(default_factory=list)  # iptables-recent farm files (compat/)
    heartbeat_interval: float = 1.0  # seconds between heartbeats on an idle connection
    peer_timeout: float = 5.0  # no frame for this long -> the connection is dead
    reconnect_min: float = 0.2  # reconnect backoff, doubling up to reconnect_max
    reconnect_max: float = 10.0
    queue_limit: int = 500_000  # records queued per peer before it is resnapshotted instead
    # records per UPDATES frame: a frame is decoded in one step (~1 us a record), so this
    # bounds that step of the receiver's loop (~1 ms)
    batch_records: int = 1_000
    event_buffer: int = 256 << 20  # bytes of kernel buffer for conntrack events (SO_RCVBUFFORCE)
    # Seconds to wait for more records before sending a batch. 0: none, the batch leaves at the
    # end of the event-loop tick that queued its first record (everything learned from one
    # read of the event socket goes out together; a fixed 2 ms wait only added latency).
    batch_delay: float = 0.0
    stall_after: float = 10.0  # un-acked updates older than this -> health "degraded"
    config_file: str | None = None
    log_level: str = "info"  # the front-end's logging level (debug, info, warning, error)
    log_format: str = "text"  # "text" (people, journald) or "json" (one object per line)
    # SCHED_RR priority of the event-loop thread (docs/daemon.md, "Real-time scheduling");
    # 0: SCHED_OTHER, like every other process. Applied at start only.
    realtime_priority: int = 0
    # The Prometheus endpoint (docs/metrics.md): off unless an address is given. Read at start
    # only, like `listen`.
    metrics_host: str | None = None
    metrics_port: int = DEFAULT_METRICS_PORT
    # A group whose members may use the control socket besides root (socket 0660 root:GROUP;
    # docs/daemon.md "The control protocol"). None: root only. Read at start only.
    control_group: str | None = None
    # Mutual TLS on the sync link (tls_cert, tls_key, tls_ca; docs/daemon.md "TLS on the sync
    # link"): the files checked and both contexts built at load time. None: plain TCP.
    tls: TlsSettings | None = None
    # Local HAProxies whose stick tables are replicated too ([[haproxy]]; docs/l7.md).
    haproxy: list[HaproxyConfig] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Loading: TOML file + command-line overrides -> a validated DaemonConfig
# --------------------------------------------------------------------------------------------

class ConfigError(NftsyncError):
    """The daemon configuration (file or flags) is missing, malformed or out of range.

    The message always starts with where the bad value came from (`FILE: key:` or `--flag:`), so
    an operator can go straight to the line to fix.
    """

    exit_code = 2


MAX_CONFIG_FILE = 1 << 20  # a config file is a few hundred bytes; refuse to parse anything huge
MAX_NAME_BYTES = 64  # cluster and node names travel in HELLO (docs/protocol.md), 1..64 bytes
MAX_SOCKET_PATH = 107  # sun_path is 108 bytes including the terminating NUL
LOG_LEVELS = ("debug", "info", "warning", "error")
ROLES = ("active", "backup")
#: Highest realtime_priority: the kernel runs threaded interrupt handlers (all of them under
#: PREEMPT_RT or `threadirqs`, with the softirq work they raise) at SCHED_FIFO 50; a Python event
#: loop must never be able to outrank the packet path of the load balancer it replicates for.
MAX_REALTIME_PRIORITY = 49

_CLUSTER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_FARM_RE = re.compile(r"[A-Za-z0-9_.-]{1,32}")  # the same rule as `farm=` in map comments
_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_PORT_RE = re.compile(r"[0-9]{1,5}")

#: Top-level keys of the file, in the order they are validated (so a typo in `peers` is reported
#: before a missing key file: the cheap, syntactic errors first).
TOP_KEYS = ("node_name", "node_id", "cluster", "role", "listen", "metrics_listen", "peers",
            "farms", "conntrack", "legacy_farms", "socket", "log_level", "log_format",
            "realtime_priority", "control_group", "haproxy", *TLS_KEYS,
            "key_file")
#: Keys of one [[haproxy]] table; all required but `name` (default haproxy, haproxy2...).
HAPROXY_KEYS = ("name", "admin_socket", "peer_listen", "local_peer", "haproxy_peer", "tables")
#: [timing] keys: (lowest, highest) in seconds; lowest is exclusive except for batch_delay.
TIMING_KEYS: dict[str, tuple[float, float]] = {
    "heartbeat_interval": (0.0, 60.0),
    "peer_timeout": (0.0, 3600.0),
    "reconnect_min": (0.0, 60.0),
    "reconnect_max": (0.0, 3600.0),
    "batch_delay": (0.0, 1.0),
    "stall_after": (0.0, 86400.0),
}
#: [limits] keys: inclusive integer ranges. A record is at most ~160 bytes and a frame 1 MiB, so
#: 6000 records always fit in one UPDATES frame.
LIMIT_KEYS: dict[str, tuple[int, int]] = {
    "queue_limit": (1_000, 100_000_000),
    "batch_records": (1, 6_000),
    # A burst of N new connections needs about N x 300 bytes before the daemon reads them; an
    # overrun is recovered from a dump, so this trades memory against dumps.
    "event_buffer": (64 << 10, 2 << 30),
}
TABLES: dict[str, tuple[str, ...]] = {"timing": tuple(TIMING_KEYS), "limits": tuple(LIMIT_KEYS)}

#: Command-line flag that overrides each key (for error messages).
FLAGS = {"peers": "--peer", "farms": "--farm", "conntrack": "--conntrack/--no-conntrack",
         "legacy_farms": "--legacy-farm"}


def flag_for(key: str) -> str:
    return FLAGS.get(key, "--" + key.replace("_", "-"))


@dataclass(slots=True)
class _Value:
    value: Any
    where: str  # "FILE: key" or "--flag", prefixed to every error about this value
    base: Path | None = None  # directory that relative paths in this value are relative to


def load_config(path: str | None, overrides: dict[str, Any] | None = None) -> DaemonConfig:
    """Read the TOML file at `path` (or DEFAULT_CONFIG if it exists), apply `overrides`, validate.

    `overrides` uses the file's top-level key names (`listen`, `peers`, `role`, ...) with the raw
    values the command line gave (strings for addresses); None means "not given". An explicitly
    given path that does not exist is an error; the default one is optional, so a daemon can run
    from flags alone. Raises ConfigError (or, never silently, a KeyFileError wrapped in one).
    """
    values: dict[str, _Value] = {}
    config_file: str | None = None
    if path is None and os.path.exists(DEFAULT_CONFIG):
        path = DEFAULT_CONFIG
    if path is not None:
        config_file = os.path.abspath(path)
        values.update(_read_file(path))
    for key, value in (overrides or {}).items():
        if key not in TOP_KEYS:
            raise ValueError(f"unknown override {key!r}")  # a bug in the caller, not user input
        if value is None or (isinstance(value, (list, tuple)) and not value):
            continue
        values[key] = _Value(list(value) if isinstance(value, tuple) else value, flag_for(key),
                             Path.cwd())
    return _build(values, config_file)


def _read_file(path: str) -> dict[str, _Value]:
    p = Path(path)
    try:
        fd = open_regular(p, "config file")  # a FIFO must not hang the start (issue 13)
        with open(fd, "rb") as f:
            st = os.fstat(fd)
            # Whoever can write the file chooses the peers and the key file: like the key
            # itself, it must not be writable by group or others.
            if st.st_mode & 0o022:
                raise ConfigError(f"config file {p} has mode {stat.S_IMODE(st.st_mode):04o}: "
                                  f"group/others must not be able to write it (chmod go-w {p})")
            raw = f.read(MAX_CONFIG_FILE + 1)
    except FileRefused as exc:
        raise ConfigError(str(exc)) from None
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from None
    if len(raw) > MAX_CONFIG_FILE:
        raise ConfigError(f"{p}: larger than {MAX_CONFIG_FILE} bytes, not a config file")
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from None
    base = p.resolve().parent
    out: dict[str, _Value] = {}
    for key, value in doc.items():
        if key in TABLES:
            if not isinstance(value, dict):
                raise ConfigError(f"{p}: {key}: must be a table ([{key}]), got {_kind(value)}")
            for sub, subval in value.items():
                if sub not in TABLES[key]:
                    raise ConfigError(f"{p}: unknown key '{key}.{sub}'"
                                      f"{_suggest(sub, TABLES[key])}")
                out[sub] = _Value(subval, f"{p}: {key}.{sub}", base)
        elif key in TOP_KEYS:
            out[key] = _Value(value, f"{p}: {key}", base)
        else:
            where = [k for k, subs in TABLES.items() if key in subs]
            hint = f" (it belongs in the [{where[0]}] table)" if where else _suggest(
                key, TOP_KEYS + tuple(TABLES))
            raise ConfigError(f"{p}: unknown key '{key}'{hint}")
    return out


def _suggest(word: str, choices: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _kind(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "a list", dict: "a table"}
    return names.get(type(value), type(value).__name__)


def _build(values: dict[str, _Value], config_file: str | None) -> DaemonConfig:
    """Validate every value in TOP_KEYS order, then the tunables, then load the key last."""
    kw: dict[str, Any] = {"config_file": config_file}
    got = values.get

    node_name = _node_name(got("node_name"))
    kw["node_name"] = node_name
    kw["node_id"] = _node_id(got("node_id"), node_name)
    if (v := got("cluster")) is not None:
        kw["cluster"] = _cluster(v)
    if (v := got("role")) is not None:
        kw["role"] = _choice(v, ROLES)
    if (v := got("listen")) is not None:
        kw["listen_host"], kw["listen_port"] = _listen(v)
    if (v := got("metrics_listen")) is not None:
        kw["metrics_host"], kw["metrics_port"] = _metrics_listen(v)
    if (v := got("peers")) is not None:
        kw["peers"] = _peers(v)
    if (v := got("farms")) is not None:
        kw["farms"] = _farms(v)
    if (v := got("conntrack")) is not None:
        kw["conntrack"] = _bool(v)
    if (v := got("legacy_farms")) is not None:
        kw["legacy_farms"] = _legacy_farms(v)
    if (v := got("socket")) is not None:
        kw["socket"] = _socket_path(v)
    if (v := got("log_level")) is not None:
        kw["log_level"] = _choice(v, LOG_LEVELS, lower=True)
    if (v := got("log_format")) is not None:
        kw["log_format"] = _choice(v, LOG_FORMATS, lower=True)
    if (v := got("realtime_priority")) is not None:
        kw["realtime_priority"] = _realtime_priority(v)
    if (v := got("control_group")) is not None:
        kw["control_group"] = _control_group(v)
    if (v := got("haproxy")) is not None:
        kw["haproxy"] = _haproxy(v)
    for key, (lo, hi) in TIMING_KEYS.items():
        if (v := got(key)) is not None:
            kw[key] = _seconds(v, lo, hi, inclusive_low=key == "batch_delay")
    for key, (ilo, ihi) in LIMIT_KEYS.items():
        if (v := got(key)) is not None:
            kw[key] = _int(v, ilo, ihi)
    _cross_check(kw, values)
    if "peers" in kw and "listen_host" in kw:
        me = PeerConfig(kw["listen_host"], kw["listen_port"])
        if me in kw["peers"]:
            raise ConfigError(f"{values['peers'].where}: {me} is this node's own listen address")

    key_value = got("key_file")
    if key_value is None:
        where = f"{config_file}: key_file" if config_file else "--key-file"
        raise ConfigError(f"{where}: the cluster's pre-shared key file is required "
                          "(create one with: umask 077; head -c 32 /dev/urandom | xxd -p -c 64 "
                          "> /etc/nftsync/key)")
    key_file = _path(key_value)
    try:
        kw["key"] = load_key(key_file)
    except KeyFileError as exc:
        raise ConfigError(f"{key_value.where}: {exc}") from None
    kw["key_file"] = key_file
    kw["tls"] = _tls(values, kw.get("listen_host"))
    return DaemonConfig(**kw)


def _tls(values: dict[str, _Value], listen_host: str | None) -> TlsSettings | None:
    """tls_cert, tls_key and tls_ca: all three or none. Loaded here, contexts and all, so a bad
    certificate, key or CA is one line at `--check`, start-up or reload, never a refusal later."""
    given = {k: values[k] for k in TLS_KEYS if k in values}
    if not given:
        return None
    if len(given) < len(TLS_KEYS):
        missing = [k for k in TLS_KEYS if k not in given]
        raise ConfigError(f"{next(iter(given.values())).where}: TLS needs all three of "
                          f"{', '.join(TLS_KEYS)}; missing {', '.join(missing)}")
    paths = {k: _path(v) for k, v in given.items()}
    try:
        return load_tls(paths["tls_cert"], paths["tls_key"], paths["tls_ca"], listen_host)
    except TlsError as exc:
        raise ConfigError(f"{given[exc.key].where}: {exc}") from None


def _fail(v: _Value, problem: str) -> ConfigError:
    return ConfigError(f"{v.where}: {problem}")


def _str(v: _Value) -> str:
    if not isinstance(v.value, str):
        raise _fail(v, f"must be a string, got {_kind(v.value)}")
    return v.value


def _name_ok(name: str) -> bool:
    raw = name.encode("utf-8")
    return 0 < len(raw) <= MAX_NAME_BYTES and name.isprintable() and not any(
        c.isspace() for c in name)


def _node_name(v: _Value | None) -> str:
    if v is None:
        host = socket.gethostname()
        if not _name_ok(host):
            raise ConfigError(f"the hostname {host!r} is not a usable node name "
                              f"(1..{MAX_NAME_BYTES} bytes, no spaces): set node_name")
        return host
    name = _str(v)
    if not _name_ok(name):
        raise _fail(v, f"{name!r} must be 1..{MAX_NAME_BYTES} UTF-8 bytes of printable text "
                    "without spaces")
    return name


def derive_node_id(node_name: str) -> int:
    """A stable node id from the node name (CRC-32), never 0: the same host keeps its id across
    restarts without configuration, and distinct hostnames collide only with 1-in-4e9 odds."""
    return zlib.crc32(node_name.encode("utf-8")) or 1


def _node_id(v: _Value | None, node_name: str) -> int:
    if v is None:
        return derive_node_id(node_name)
    return _int(v, 1, 2**32 - 1)


def _int(v: _Value, lo: int, hi: int) -> int:
    value = v.value
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(v, f"must be an integer, got {_kind(value)}")
    if not lo <= value <= hi:
        raise _fail(v, f"{value} is out of range {lo}..{hi}")
    return value


def _realtime_priority(v: _Value) -> int:
    """0 (SCHED_OTHER) or a SCHED_RR priority 1..MAX_REALTIME_PRIORITY. Only an integer: the
    policy is always SCHED_RR (docs/daemon.md says why), so there is nothing else to choose."""
    value, top = v.value, MAX_REALTIME_PRIORITY
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(v, f"must be an integer (a SCHED_RR priority 1..{top}, or 0 for normal "
                    f"scheduling), got {_kind(value)}")
    if not 0 <= value <= top:
        why = (f": above {top} the daemon would outrank the kernel's threaded interrupt "
               "handlers (SCHED_FIFO 50)" if value > top else "")
        raise _fail(v, f"{value} is out of range 0..{top} (0: normal scheduling, 1..{top}: "
                    f"SCHED_RR priority){why}")
    return value


def _seconds(v: _Value, lo: float, hi: float, inclusive_low: bool = False) -> float:
    value = v.value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(v, f"must be a number of seconds, got {_kind(value)}")
    value = float(value)
    low_ok = value >= lo if inclusive_low else value > lo
    if not (low_ok and value <= hi):  # also refuses nan and inf
        low = f">= {lo:g}" if inclusive_low else f"> {lo:g}"
        raise _fail(v, f"{value:g} s is out of range (must be {low} and <= {hi:g})")
    return value


def _bool(v: _Value) -> bool:
    if not isinstance(v.value, bool):
        raise _fail(v, f"must be true or false, got {_kind(v.value)}")
    return v.value


def _choice(v: _Value, choices: tuple[str, ...], lower: bool = False) -> str:
    value = _str(v)
    if lower:
        value = value.lower()
    if value not in choices:
        raise _fail(v, f"{v.value!r} is not one of: {', '.join(choices)}")
    return value


def _cluster(v: _Value) -> str:
    name = _str(v)
    if not _CLUSTER_RE.fullmatch(name):
        raise _fail(v, f"{name!r} must be 1..64 letters, digits, '_', '.' or '-', starting with "
                    "a letter or digit")
    return name


def _path(v: _Value) -> str:
    text = _str(v)
    if not text or "\0" in text:
        raise _fail(v, "must be a non-empty path")
    p = Path(text)
    if not p.is_absolute() and v.base is not None:
        p = v.base / p
    return str(p)


def _control_group(v: _Value) -> str:
    """An existing group (checked now: a typo must not leave the socket root's only, or fail
    only at start)."""
    name = _str(v)
    try:
        grp.getgrnam(name)
    except KeyError:
        raise _fail(v, f"no group {name!r} on this system (create it: groupadd --system "
                    f"{name})") from None
    return name


def _socket_path(v: _Value) -> str:
    text = _str(v)
    if not text.startswith("/"):
        raise _fail(v, f"{text!r} must be an absolute path")
    if "\0" in text or len(os.fsencode(text)) > MAX_SOCKET_PATH:
        raise _fail(v, f"must be at most {MAX_SOCKET_PATH} bytes (the unix socket limit)")
    return text


def _legacy_farms(v: _Value) -> list[str]:
    """Legacy farm description files (compat/farms/*.toml): loaded now, so errors show at start."""
    from nftsync.compat.iptables import load_farm

    items = v.value if isinstance(v.value, list) else None
    if items is None:
        raise _fail(v, f"must be a list of legacy farm files, got {_kind(v.value)}")
    out: list[str] = []
    for i, item in enumerate(items):
        if not isinstance(item, str) or not item:
            raise ConfigError(f"{v.where}[{i}]: must be a file name")
        path = Path(item)
        if not path.is_absolute() and v.base is not None:
            path = v.base / path  # like key_file: relative to the config file
        try:
            load_farm(path)
        except NftsyncError as exc:
            raise ConfigError(f"{v.where}[{i}]: {exc}") from None
        out.append(str(path.resolve()))
    return out


def _farms(v: _Value) -> list[str]:
    items = v.value if isinstance(v.value, list) else None
    if items is None:
        raise _fail(v, f"must be a list of farm names, got {_kind(v.value)}")
    if not items:
        raise _fail(v, "an empty list would replicate no farm; leave the key out to replicate "
                    "every nftsync farm")
    return _unique_names(v, items, _FARM_RE, "farm", "a farm name (letters, digits, _ . -, at "
                         "most 32)")


def _unique_names(v: _Value, items: list, pattern: re.Pattern[str], kind: str,
                  rule: str) -> list[str]:
    """The items of a list of names, each matching `pattern` and none twice."""
    out: list[str] = []
    for i, item in enumerate(items):
        if not isinstance(item, str) or not pattern.fullmatch(item):
            raise ConfigError(f"{v.where}[{i}]: {item!r} is not {rule}")
        if item in out:
            raise ConfigError(f"{v.where}[{i}]: {kind} {item!r} is listed twice")
        out.append(item)
    return out


_PEER_NAME_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")  # a `peer` name in HAProxy's config
_TABLE_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")  # HAProxy's proxy/table names


def _haproxy(v: _Value) -> list[HaproxyConfig]:
    """`[[haproxy]]` tables: each HAProxy's admin socket, nftsync's loopback listener for its
    peers connection, both peer names and the stick tables to replicate (docs/l7.md)."""
    items = v.value if isinstance(v.value, list) else None
    if items is None or not all(isinstance(i, dict) for i in items):
        raise _fail(v, "must be one or more [[haproxy]] tables (admin_socket, peer_listen, "
                    f"local_peer, haproxy_peer, tables), got {_kind(v.value)}")
    out: list[HaproxyConfig] = []
    for i, item in enumerate(items):
        where = f"{v.where}[{i}]"
        for key in item:
            if key not in HAPROXY_KEYS:
                raise ConfigError(f"{where}: unknown key '{key}'{_suggest(key, HAPROXY_KEYS)}")
        missing = [k for k in HAPROXY_KEYS[1:] if k not in item]
        if missing:
            raise ConfigError(f"{where}: missing {', '.join(missing)} (docs/l7.md, \"In the "
                              "daemon\")")

        def val(key: str, item: dict = item, where: str = where) -> _Value:
            return _Value(item[key], f"{where}.{key}", v.base)

        name = _str(val("name")) if "name" in item else f"haproxy{i + 1 if i else ''}"
        if not _CLUSTER_RE.fullmatch(name):
            raise _fail(val("name"), f"{name!r} must be 1..64 letters, digits, '_', '.' or '-'")
        admin = _socket_path(val("admin_socket"))
        host, port = _peer_listen(val("peer_listen"))
        names = {}
        for key in ("local_peer", "haproxy_peer"):
            text = _str(val(key))
            if not _PEER_NAME_RE.fullmatch(text):
                raise _fail(val(key), f"{text!r} is not a peer name as HAProxy's `peers` "
                            "section has it (1..64 letters, digits, '_', '.', ':' or '-')")
            names[key] = text
        if names["local_peer"] == names["haproxy_peer"]:
            raise _fail(val("local_peer"), f"{names['local_peer']!r} is also haproxy_peer: "
                        "nftsync and HAProxy are two peers with two names")
        tables = _haproxy_tables(val("tables"))
        for other in out:
            if other.name == name:
                raise _fail(val("name") if "name" in item else val("tables"),
                            f"a second [[haproxy]] named {name!r}")
            if (other.peer_host, other.peer_port) == (host, port):
                raise _fail(val("peer_listen"), f"{format_endpoint(host, port)} is already "
                            f"the peer_listen of [[haproxy]] {other.name!r}")
            both = sorted(set(other.tables) & set(tables))
            if both:
                raise _fail(val("tables"), f"table(s) {', '.join(both)} also replicated from "
                            f"[[haproxy]] {other.name!r}: map ids {HAPROXY_PREFIX}<table> must "
                            "be unique")
        out.append(HaproxyConfig(name, admin, host, port, names["local_peer"],
                                 names["haproxy_peer"], tables))
    return out


def _peer_listen(v: _Value) -> tuple[str, int]:
    """A loopback IP and an explicit port: HAProxy's peers protocol has no authentication, so
    nothing but this host may reach the listener."""
    text = _str(v).strip()
    try:
        host, port = parse_endpoint(text, 0)
        addr = ipaddress.ip_address(host)
    except ValueError as exc:
        raise _fail(v, f"{exc}; expected a loopback IP:PORT such as \"127.0.0.1:10100\"") \
            from None
    if not port:
        raise _fail(v, f"{text!r} has no port; expected e.g. \"127.0.0.1:10100\"")
    if not addr.is_loopback:
        raise _fail(v, f"{host} is not a loopback address: HAProxy's peers protocol has no "
                    "authentication, so nftsync listens for it on 127.0.0.1 (or ::1) only")
    return host, port


def _haproxy_tables(v: _Value) -> tuple[str, ...]:
    items = v.value if isinstance(v.value, list) else None
    if not items:
        raise _fail(v, "must be a non-empty list of stick table names (the backends that "
                    "declare them), e.g. [\"web\"]")
    return tuple(_unique_names(v, items, _TABLE_RE, "table", "a stick table name (1..64 "
                               "letters, digits, '_', '.', ':' or '-')"))


def parse_endpoint(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """`ADDR:PORT`, `[IPv6]:PORT`, `ADDR`, `[IPv6]` or a bare IPv6 address -> (host, port).

    ADDR is an IPv4 address, an IPv6 address or a host name. Raises ValueError with the reason.
    """
    text = text.strip()
    port_text: str | None = None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"{text!r}: missing ']' after the IPv6 address")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{text!r}: expected ':PORT' after ']'")
            port_text = rest[1:]
        _ipv6(host)
    elif text.count(":") > 1:
        host = text
        try:
            _ipv6(host)
        except ValueError:
            raise ValueError(f"{text!r} has too many ':' for ADDR:PORT and is not an IPv6 "
                             "address (with a port, IPv6 is written [ADDR]:PORT)") from None
    else:
        host, sep, port_part = text.partition(":")
        if sep:
            port_text = port_part
        if not host:
            raise ValueError(f"{text!r}: the address is empty")
        _host(host)
    port = default_port
    if port_text is not None:
        if not _PORT_RE.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"{text!r}: port {port_text!r} is not a number in 1..65535")
        port = int(port_text)
    return host, port


def _ipv6(host: str) -> None:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IPv6 address") from None


def _host(host: str) -> None:
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv4 address") from None
        return
    labels = host.rstrip(".").split(".")
    if len(host) > 253 or not all(_LABEL_RE.fullmatch(label) for label in labels):
        raise ValueError(f"{host!r} is not an IP address or host name")


_ENDPOINT_HELP = "expected ADDR:PORT, [IPv6]:PORT or ADDR (default port 7777)"


def parse_peer(text: str) -> PeerConfig:
    """One `--peer`/`peers` entry -> PeerConfig; ValueError says what is wrong."""
    host, port = parse_endpoint(text)
    return PeerConfig(host, port)


def _peers(v: _Value) -> list[PeerConfig]:
    items = v.value if isinstance(v.value, list) else None
    if items is None:
        raise _fail(v, f"must be a list of \"ADDR:PORT\" strings, got {_kind(v.value)}")
    out: list[PeerConfig] = []
    for i, item in enumerate(items):
        where = f"{v.where}[{i}]" if v.where != "--peer" else v.where
        if not isinstance(item, str):
            raise ConfigError(f"{where}: must be a string \"ADDR:PORT\", got {_kind(item)}")
        try:
            peer = parse_peer(item)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}; {_ENDPOINT_HELP}") from None
        if peer in out:
            raise ConfigError(f"{where}: peer {peer} is listed twice")
        out.append(peer)
    return out


def _listen(v: _Value) -> tuple[str, int]:
    return _local_endpoint(v, DEFAULT_PORT, _ENDPOINT_HELP, "the listen address")


def _metrics_listen(v: _Value) -> tuple[str | None, int]:
    """`IP:PORT`, `[IPv6]:PORT`, `IP` (port 9477) or `:PORT`; "" turns the endpoint off (a flag
    can so override a file that turns it on)."""
    if not _str(v).strip():
        return None, DEFAULT_METRICS_PORT
    return _local_endpoint(
        v, DEFAULT_METRICS_PORT, f"expected IP:PORT, [IPv6]:PORT or IP (default port "
        f"{DEFAULT_METRICS_PORT}), e.g. \"127.0.0.1:{DEFAULT_METRICS_PORT}\"",
        "the metrics address", "127.0.0.1 for this host only, ")


def _local_endpoint(v: _Value, default_port: int, usage: str, what: str,
                    hint: str = "") -> tuple[str, int]:
    """An address of this host to listen on: an IP literal (never a name: what it resolves to
    could change under a running daemon) and a port; `:PORT` means every IPv4 address."""
    text = _str(v).strip()
    if text.startswith(":") and text.count(":") == 1:
        text = "0.0.0.0" + text
    try:
        host, port = parse_endpoint(text, default_port)
    except ValueError as exc:
        raise _fail(v, f"{exc}; {usage}") from None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise _fail(v, f"{v.value!r}: {what} must be an IP address ({hint}0.0.0.0 or :: for "
                    "all), not a host name") from None
    return host, port


def _cross_check(kw: dict[str, Any], values: dict[str, _Value]) -> None:
    """Relations between tunables that each look fine alone but do not work together."""
    d = DaemonConfig(key=b"", node_id=1, node_name="x")  # the defaults

    def get(k: str) -> Any:
        return kw.get(k, getattr(d, k))

    def where(*keys: str) -> str:
        for k in keys:
            if k in values:
                return values[k].where
        return keys[0]

    hb, timeout = get("heartbeat_interval"), get("peer_timeout")
    if timeout < 2 * hb:
        raise ConfigError(f"{where('peer_timeout', 'heartbeat_interval')}: peer_timeout "
                          f"({timeout:g} s) must be at least twice heartbeat_interval ({hb:g} s), "
                          "or idle connections would time out between heartbeats")
    if get("reconnect_min") > get("reconnect_max"):
        raise ConfigError(f"{where('reconnect_min', 'reconnect_max')}: reconnect_min "
                          f"({get('reconnect_min'):g} s) is larger than reconnect_max "
                          f"({get('reconnect_max'):g} s)")
    mhost, mport = get("metrics_host"), get("metrics_port")
    lhost, lport = get("listen_host"), get("listen_port")
    if mhost is not None and mport == lport and (
            mhost == lhost or _wildcard(mhost) or _wildcard(lhost)):
        raise ConfigError(f"{where('metrics_listen', 'listen')}: metrics_listen "
                          f"({format_endpoint(mhost, mport)}) and listen "
                          f"({format_endpoint(lhost, lport)}) would share a port; give the "
                          "metrics endpoint its own")
    if get("stall_after") <= hb:
        raise ConfigError(f"{where('stall_after', 'heartbeat_interval')}: stall_after "
                          f"({get('stall_after'):g} s) must be longer than heartbeat_interval "
                          f"({hb:g} s)")


def _wildcard(host: str) -> bool:
    return ipaddress.ip_address(host).is_unspecified
