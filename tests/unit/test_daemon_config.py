"""`load_config` and `nftsync daemon --check`: the file format, overrides and every refusal.

No kernel involved: these test the parsing of what an operator writes. Each bad input must give
one line that names the file (or flag) and the key, so the tests compare whole messages.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from nftsync.daemon import config as cfgmod
from nftsync.daemon.config import (
    DEFAULT_PORT,
    ConfigError,
    DaemonConfig,
    PeerConfig,
    derive_node_id,
    load_config,
    parse_endpoint,
)

HEX_KEY = "3f9a1c2b7d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8"
NFTSYNC = [sys.executable, "-m", "nftsync"]


@pytest.fixture
def key(tmp_path: Path) -> Path:
    p = tmp_path / "key"
    p.write_text(HEX_KEY + "\n")
    p.chmod(0o600)
    return p


def write(tmp_path: Path, text: str, name: str = "nftsync.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


GOOD = """
node_name = "lb1"
node_id = 11
cluster = "prod-l4"
role = "active"
listen = "[::]:7001"
peers = ["10.0.0.2", "[fd00::2]:7002", "lb3.example.net:7003"]
key_file = "key"            # relative: next to this file
farms = ["web", "mail"]
conntrack = false
socket = "/run/nftsync/test.sock"
log_level = "DEBUG"

[timing]
heartbeat_interval = 0.5
peer_timeout = 2
reconnect_min = 0.1
reconnect_max = 5
batch_delay = 0
stall_after = 30

[limits]
queue_limit = 10000
batch_records = 1000
"""


def test_good_file(tmp_path: Path, key: Path) -> None:
    path = write(tmp_path, GOOD)
    c = load_config(str(path), {})
    assert c == DaemonConfig(
        key=bytes.fromhex(HEX_KEY), node_id=11, node_name="lb1", cluster="prod-l4",
        key_file=str(key), listen_host="::", listen_port=7001,
        peers=[PeerConfig("10.0.0.2", DEFAULT_PORT), PeerConfig("fd00::2", 7002),
               PeerConfig("lb3.example.net", 7003)],
        role="active", socket="/run/nftsync/test.sock", farms=["web", "mail"], conntrack=False,
        heartbeat_interval=0.5, peer_timeout=2.0, reconnect_min=0.1, reconnect_max=5.0,
        queue_limit=10000, batch_records=1000, batch_delay=0.0, stall_after=30.0,
        config_file=str(path), log_level="debug")
    assert str(c.peers[1]) == "[fd00::2]:7002"


def test_overrides_win(tmp_path: Path, key: Path) -> None:
    path = write(tmp_path, GOOD)
    c = load_config(str(path), {
        "role": "backup", "peers": ["192.0.2.9:7777"], "listen": ":7100", "node_id": 5,
        "farms": ("web",), "conntrack": True, "node_name": None, "cluster": None})
    assert c.role == "backup"
    assert c.peers == [PeerConfig("192.0.2.9", 7777)]
    assert (c.listen_host, c.listen_port) == ("0.0.0.0", 7100)
    assert c.node_id == 5 and c.farms == ["web"] and c.conntrack is True
    assert c.node_name == "lb1" and c.cluster == "prod-l4"  # None = not given: the file's value


def test_flags_only_and_defaults(tmp_path: Path, key: Path, monkeypatch) -> None:
    monkeypatch.setattr(cfgmod, "DEFAULT_CONFIG", str(tmp_path / "absent.toml"))
    c = load_config(None, {"key_file": str(key)})
    host = socket.gethostname()
    assert c.config_file is None
    assert c.node_name == host
    assert c.node_id == (zlib.crc32(host.encode()) or 1)
    assert (c.role, c.cluster, c.listen_host, c.listen_port) == ("backup", "nftsync",
                                                                 "0.0.0.0", 7777)
    assert c.peers == [] and c.farms is None and c.conntrack is True


def test_default_file_used_when_present(tmp_path: Path, key: Path, monkeypatch) -> None:
    path = write(tmp_path, f'key_file = "{key}"\nnode_name = "fromdefault"\n')
    monkeypatch.setattr(cfgmod, "DEFAULT_CONFIG", str(path))
    c = load_config(None, {})
    assert c.node_name == "fromdefault" and c.config_file == str(path)


def test_node_id_derivation_is_stable_and_nonzero() -> None:
    assert derive_node_id("lb1") == derive_node_id("lb1") == zlib.crc32(b"lb1")
    assert derive_node_id("lb1") != derive_node_id("lb2")
    assert all(derive_node_id(f"n{i}") != 0 for i in range(1000))


@pytest.mark.parametrize("text,expected", [
    ("10.0.0.1", ("10.0.0.1", 7777)),
    ("10.0.0.1:1", ("10.0.0.1", 1)),
    ("[fd00::1]:65535", ("fd00::1", 65535)),
    ("[fd00::1]", ("fd00::1", 7777)),
    ("fd00::1", ("fd00::1", 7777)),
    ("lb2.example.net:8000", ("lb2.example.net", 8000)),
])
def test_parse_endpoint(text: str, expected: tuple[str, int]) -> None:
    assert parse_endpoint(text) == expected


def _err(tmp_path: Path, text: str, overrides: dict | None = None) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(str(path), overrides or {})
    msg = str(info.value)
    assert "\n" not in msg
    return msg.replace(str(tmp_path), "T")


def test_unknown_key_with_suggestion(tmp_path: Path, key: Path) -> None:
    assert _err(tmp_path, 'peer = ["10.0.0.2"]\nkey_file = "key"\n') == \
        "T/nftsync.toml: unknown key 'peer' (did you mean 'peers'?)"
    assert _err(tmp_path, 'key_file = "key"\n[timing]\nheartbeat = 1\n') == \
        "T/nftsync.toml: unknown key 'timing.heartbeat' (did you mean 'heartbeat_interval'?)"
    assert _err(tmp_path, 'key_file = "key"\npeer_timeout = 3\n') == \
        "T/nftsync.toml: unknown key 'peer_timeout' (it belongs in the [timing] table)"


def test_bad_port(tmp_path: Path, key: Path) -> None:
    assert _err(tmp_path, 'key_file = "key"\nlisten = "0.0.0.0:70000"\n') == (
        "T/nftsync.toml: listen: '0.0.0.0:70000': port '70000' is not a number in 1..65535; "
        "expected ADDR:PORT, [IPv6]:PORT or ADDR (default port 7777)")
    assert _err(tmp_path, 'key_file = "key"\npeers = ["10.0.0.2:0"]\n') == (
        "T/nftsync.toml: peers[0]: '10.0.0.2:0': port '0' is not a number in 1..65535; "
        "expected ADDR:PORT, [IPv6]:PORT or ADDR (default port 7777)")


def test_bad_peer(tmp_path: Path, key: Path) -> None:
    assert _err(tmp_path, 'key_file = "key"\npeers = ["10.0.0.2", "bad:port:x"]\n') == (
        "T/nftsync.toml: peers[1]: 'bad:port:x' has too many ':' for ADDR:PORT and is not an "
        "IPv6 address (with a port, IPv6 is written [ADDR]:PORT); expected ADDR:PORT, "
        "[IPv6]:PORT or ADDR (default port 7777)")
    assert _err(tmp_path, 'key_file = "key"\npeers = ["10.0.0.256"]\n').startswith(
        "T/nftsync.toml: peers[0]: '10.0.0.256' is not an IPv4 address")
    assert _err(tmp_path, 'key_file = "key"\npeers = ["a", "a:7777"]\n') == \
        "T/nftsync.toml: peers[1]: peer a:7777 is listed twice"
    assert _err(tmp_path, 'key_file = "key"\npeers = "10.0.0.2"\n') == \
        'T/nftsync.toml: peers: must be a list of "ADDR:PORT" strings, got a string'
    assert _err(tmp_path, 'key_file = "key"\n', {"peers": ["[fd00::1"]}) == (
        "--peer: '[fd00::1': missing ']' after the IPv6 address; expected ADDR:PORT, "
        "[IPv6]:PORT or ADDR (default port 7777)")


def test_bad_role_and_types(tmp_path: Path, key: Path) -> None:
    assert _err(tmp_path, 'key_file = "key"\nrole = "master"\n') == \
        "T/nftsync.toml: role: 'master' is not one of: active, backup"
    assert _err(tmp_path, 'key_file = "key"\n', {"role": "slave"}) == \
        "--role: 'slave' is not one of: active, backup"
    assert _err(tmp_path, 'key_file = "key"\nconntrack = "yes"\n') == \
        "T/nftsync.toml: conntrack: must be true or false, got a string"
    assert _err(tmp_path, 'key_file = "key"\nnode_id = "7"\n') == \
        "T/nftsync.toml: node_id: must be an integer, got a string"
    assert _err(tmp_path, 'key_file = "key"\ntiming = 3\n') == \
        "T/nftsync.toml: timing: must be a table ([timing]), got an integer"


def test_node_id_range(tmp_path: Path, key: Path) -> None:
    assert _err(tmp_path, 'key_file = "key"\nnode_id = 0\n') == \
        "T/nftsync.toml: node_id: 0 is out of range 1..4294967295"
    assert _err(tmp_path, 'key_file = "key"\nnode_id = 4294967296\n') == \
        "T/nftsync.toml: node_id: 4294967296 is out of range 1..4294967295"
    assert _err(tmp_path, 'key_file = "key"\n', {"node_id": 0}) == \
        "--node-id: 0 is out of range 1..4294967295"


def test_names(tmp_path: Path, key: Path) -> None:
    assert _err(tmp_path, 'key_file = "key"\ncluster = "prod l4"\n') == (
        "T/nftsync.toml: cluster: 'prod l4' must be 1..64 letters, digits, '_', '.' or '-', "
        "starting with a letter or digit")
    assert _err(tmp_path, 'key_file = "key"\nnode_name = ""\n') == (
        "T/nftsync.toml: node_name: '' must be 1..64 UTF-8 bytes of printable text without "
        "spaces")
    assert _err(tmp_path, 'key_file = "key"\nfarms = ["web", "we b"]\n') == (
        "T/nftsync.toml: farms[1]: 'we b' is not a farm name (letters, digits, _ . -, at most "
        "32)")
    assert _err(tmp_path, 'key_file = "key"\nfarms = []\n').startswith(
        "T/nftsync.toml: farms: an empty list would replicate no farm")


def test_timing_sanity(tmp_path: Path, key: Path) -> None:
    assert _err(tmp_path, 'key_file = "key"\n[timing]\nheartbeat_interval = 0\n') == (
        "T/nftsync.toml: timing.heartbeat_interval: 0 s is out of range (must be > 0 and <= "
        "60)")
    assert _err(tmp_path, 'key_file = "key"\n[timing]\npeer_timeout = -1\n').startswith(
        "T/nftsync.toml: timing.peer_timeout: -1 s is out of range")
    assert _err(tmp_path, 'key_file = "key"\n[timing]\npeer_timeout = nan\n').startswith(
        "T/nftsync.toml: timing.peer_timeout: nan s is out of range")
    assert _err(tmp_path, 'key_file = "key"\n[timing]\npeer_timeout = 1.5\n') == (
        "T/nftsync.toml: timing.peer_timeout: peer_timeout (1.5 s) must be at least twice "
        "heartbeat_interval (1 s), or idle connections would time out between heartbeats")
    assert _err(tmp_path, 'key_file = "key"\n[timing]\nreconnect_min = 20\n') == (
        "T/nftsync.toml: timing.reconnect_min: reconnect_min (20 s) is larger than "
        "reconnect_max (10 s)")
    assert _err(tmp_path, 'key_file = "key"\n[limits]\nbatch_records = 0\n') == \
        "T/nftsync.toml: limits.batch_records: 0 is out of range 1..6000"


def test_key_file_errors(tmp_path: Path, key: Path) -> None:
    assert _err(tmp_path, 'node_name = "lb1"\n') == (
        "T/nftsync.toml: key_file: the cluster's pre-shared key file is required (create one "
        "with: umask 077; head -c 32 /dev/urandom | xxd -p -c 64 > /etc/nftsync/key)")
    assert _err(tmp_path, 'key_file = "missing"\n') == (
        "T/nftsync.toml: key_file: cannot open key file T/missing: No such file or directory")
    key.chmod(0o644)
    assert _err(tmp_path, 'key_file = "key"\n') == (
        "T/nftsync.toml: key_file: key file T/key has mode 0644, which is too open: "
        "group/others must have no access (chmod 600 T/key)")
    short = tmp_path / "short"
    short.write_text("abcdefghijklmnop\n")
    short.chmod(0o600)
    assert _err(tmp_path, 'key_file = "short"\n') == (
        "T/nftsync.toml: key_file: key file T/short: key is 16 characters, at least 32 "
        "required; generate one with: openssl rand -hex 32")


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^config file .*/nope.toml does not exist$"):
        load_config(str(tmp_path / "nope.toml"), {})
    msg = _err(tmp_path, 'key_file = "key"\nrole = active\n')
    assert msg.startswith("T/nftsync.toml: invalid TOML: ") and "line 2" in msg


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*NFTSYNC, "daemon", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


def test_cli_bad_peer_is_one_line(tmp_path: Path, key: Path) -> None:
    r = _cli("--config", str(write(tmp_path, "")), "--key-file", str(key),
             "--peer", "bad:port:x")
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1
    assert r.stderr.startswith("nftsync: error: --peer: 'bad:port:x' has too many ':'")
    # the same without any file or key: the syntactic error is reported first
    r = _cli("--config", str(write(tmp_path, "")), "--peer", "bad:port:x")
    assert r.returncode == 2 and r.stderr.startswith("nftsync: error: --peer: 'bad:port:x'")


def test_cli_check_prints_effective_config(tmp_path: Path, key: Path) -> None:
    path = write(tmp_path, GOOD)
    r = _cli("--config", str(path), "--check", "--json", "--role", "backup")
    assert r.returncode == 0, r.stderr
    import json
    d = json.loads(r.stdout)
    assert d["role"] == "backup" and d["listen"] == "[::]:7001" and d["key_bytes"] == 32
    assert d["peers"] == ["10.0.0.2:7777", "[fd00::2]:7002", "lb3.example.net:7003"]
    assert HEX_KEY not in r.stdout and bytes.fromhex(HEX_KEY).hex() not in r.stdout
    r = _cli("--config", str(path), "--check")
    assert r.returncode == 0 and r.stdout.startswith("configuration is valid")


EXAMPLE = Path(__file__).parents[2] / "contrib" / "nftsync.toml.example"
LEGACY_EXAMPLE = Path(__file__).parents[2] / "compat" / "farms" / "legacy-farm.toml"


def test_example_documents_every_key_and_is_valid(tmp_path: Path, key: Path) -> None:
    """contrib/nftsync.toml.example: each key appears; with every `#key = value` uncommented
    (and the key file pointed at a test key) it loads, so the documented values are valid."""
    text = EXAMPLE.read_text()
    for k in (*cfgmod.TOP_KEYS, *cfgmod.TIMING_KEYS, *cfgmod.LIMIT_KEYS):
        assert f"\n#{k} = " in text or f"\n{k} = " in text, k
    lines = []
    for line in text.splitlines():
        if line.startswith("#") and " = " in line and line[1:2].isalpha():
            line = line[1:]
        if line.startswith("key_file = "):
            line = f'key_file = "{key}"'
        if line.startswith("legacy_farms = "):
            line = f'legacy_farms = ["{LEGACY_EXAMPLE}"]'
        if line.startswith("control_group = "):
            line = 'control_group = "root"'  # a group that exists on every test host
        if line.startswith("tls_"):
            continue  # the files must exist: test_tls_config.py loads the example's TLS keys
        lines.append(line)
    c = load_config(str(write(tmp_path, "\n".join(lines))), {})
    assert c.peers == [PeerConfig("10.0.0.2", 7777), PeerConfig("fd00:10::3", 7777)]
    assert c.farms == ["web", "mail"] and c.node_name == "lb1" and c.node_id == 1
    assert c.legacy_farms == [str(LEGACY_EXAMPLE)]
    # and the example as shipped (only key_file set) loads too
    shipped = text.replace('key_file = "/etc/nftsync/key"', f'key_file = "{key}"')
    assert load_config(str(write(tmp_path, shipped, "shipped.toml")), {}).role == "backup"


def test_config_file_must_not_be_writable_by_others(tmp_path: Path, key: Path) -> None:
    path = write(tmp_path, 'key_file = "key"\n')
    path.chmod(0o666)
    with pytest.raises(ConfigError) as info:
        load_config(str(path), {})
    assert str(info.value) == (f"config file {path} has mode 0666: group/others must not be "
                               f"able to write it (chmod go-w {path})")
    path.chmod(0o644)
    assert load_config(str(path), {}).key == bytes.fromhex(HEX_KEY)
    with pytest.raises(ConfigError, match="^config file .* is a directory, not a regular file$"):
        load_config(str(tmp_path), {})


def test_own_address_is_not_a_peer(tmp_path: Path, key: Path) -> None:
    assert _err(tmp_path, 'key_file = "key"\nlisten = "10.0.0.1:7777"\npeers = ["10.0.0.1"]\n') \
        == "T/nftsync.toml: peers: 10.0.0.1:7777 is this node's own listen address"


def test_legacy_farm_files_are_checked_at_load(tmp_path: Path, key: Path) -> None:
    """A legacy farm file that is missing or malformed stops the daemon at start, by name."""
    bad = tmp_path / "bad.toml"
    bad.write_text('[farm]\nname = "x"\n')
    for value, msg in ((str(tmp_path / "nope.toml"), "No such file"), (str(bad), "bad.toml")):
        path = write(tmp_path, f'key_file = "{key}"\nlegacy_farms = ["{value}"]\n')
        with pytest.raises(ConfigError) as info:
            load_config(str(path), {})
        assert "legacy_farms[0]" in str(info.value) and msg in str(info.value)
    # Relative names are relative to the config file, like key_file.
    (tmp_path / "ok.toml").write_text(LEGACY_EXAMPLE.read_text())
    path = write(tmp_path, f'key_file = "{key}"\nlegacy_farms = ["ok.toml"]\n')
    assert load_config(str(path), {}).legacy_farms == [str((tmp_path / "ok.toml").resolve())]


def test_realtime_priority(tmp_path: Path, key: Path) -> None:
    """0 or absent: SCHED_OTHER; 1..49: SCHED_RR at that priority; nothing else, said why."""
    assert load_config(str(write(tmp_path, 'key_file = "key"\n')), {}).realtime_priority == 0
    for value in (0, 1, 10, 49):
        path = write(tmp_path, f'key_file = "key"\nrealtime_priority = {value}\n')
        assert load_config(str(path), {}).realtime_priority == value
    assert _err(tmp_path, 'key_file = "key"\nrealtime_priority = 50\n') == (
        "T/nftsync.toml: realtime_priority: 50 is out of range 0..49 (0: normal scheduling, "
        "1..49: SCHED_RR priority): above 49 the daemon would outrank the kernel's threaded "
        "interrupt handlers (SCHED_FIFO 50)")
    assert _err(tmp_path, 'key_file = "key"\nrealtime_priority = 99\n').startswith(
        "T/nftsync.toml: realtime_priority: 99 is out of range 0..49")
    assert _err(tmp_path, 'key_file = "key"\nrealtime_priority = -1\n') == (
        "T/nftsync.toml: realtime_priority: -1 is out of range 0..49 (0: normal scheduling, "
        "1..49: SCHED_RR priority)")
    for text, kind in (('"rr:10"', "a string"), ("true", "a boolean"), ("10.0", "a number")):
        assert _err(tmp_path, f'key_file = "key"\nrealtime_priority = {text}\n') == (
            "T/nftsync.toml: realtime_priority: must be an integer (a SCHED_RR priority 1..49, "
            f"or 0 for normal scheduling), got {kind}")
    # A top-level key like log_level: not in a table.
    assert _err(tmp_path, 'key_file = "key"\n[limits]\nrealtime_priority = 10\n').startswith(
        "T/nftsync.toml: unknown key 'limits.realtime_priority'")
    # Checked before the key file, like the other syntactic errors.
    assert _err(tmp_path, 'realtime_priority = "high"\n').startswith(
        "T/nftsync.toml: realtime_priority: must be an integer")


def test_cli_check_validates_realtime_priority(tmp_path: Path, key: Path) -> None:
    r = _cli("--check", "--config", str(write(tmp_path, f'key_file = "{key}"\n'
                                               "realtime_priority = 60\n")))
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith(f"nftsync: error: {tmp_path}/nftsync.toml: realtime_priority: "
                               "60 is out of range 0..49")
    r = _cli("--check", "--config", str(write(tmp_path, f'key_file = "{key}"\n'
                                               "realtime_priority = 10\n")))
    assert r.returncode == 0, r.stderr
