"""`[[haproxy]]` in the daemon configuration: what an operator writes, and every refusal as one
line naming the file, the entry and the key (docs/l7.md, "In the daemon")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nftsync.daemon.config import ConfigError, HaproxyConfig, load_config

HEX_KEY = "3f9a1c2b7d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8"
ENTRY = """
[[haproxy]]
name = "lb-haproxy"
admin_socket = "/run/haproxy/admin.sock"
peer_listen = "127.0.0.1:10100"
local_peer = "nftsync"
haproxy_peer = "lb1"
tables = ["web", "web_cookie"]
"""


def config_file(tmp_path: Path, body: str) -> Path:
    key = tmp_path / "key"
    key.write_text(HEX_KEY + "\n")
    key.chmod(0o600)
    p = tmp_path / "nftsync.toml"
    p.write_text(f'node_name = "lb1"\nkey_file = "key"\n{body}')
    p.chmod(0o644)
    return p


def test_a_declared_haproxy_is_loaded(tmp_path: Path) -> None:
    cfg = load_config(str(config_file(tmp_path, ENTRY)))
    assert cfg.haproxy == [HaproxyConfig("lb-haproxy", "/run/haproxy/admin.sock", "127.0.0.1",
                                         10100, "nftsync", "lb1", ("web", "web_cookie"))]


def test_no_haproxy_by_default(tmp_path: Path) -> None:
    assert load_config(str(config_file(tmp_path, ""))).haproxy == []


def test_two_haproxies(tmp_path: Path) -> None:
    second = ENTRY.replace("lb-haproxy", "other").replace("10100", "10101") \
        .replace('["web", "web_cookie"]', '["api"]')
    cfg = load_config(str(config_file(tmp_path, ENTRY + second)))
    assert [h.name for h in cfg.haproxy] == ["lb-haproxy", "other"]


@pytest.mark.parametrize(("change", "message"), [
    (("127.0.0.1:10100", "10.0.0.1:10100"),
     "haproxy[0].peer_listen: 10.0.0.1 is not a loopback address: HAProxy's peers protocol "
     "has no authentication, so nftsync listens for it on 127.0.0.1 (or ::1) only"),
    (("127.0.0.1:10100", "127.0.0.1"),
     "haproxy[0].peer_listen: '127.0.0.1' has no port; expected e.g. \"127.0.0.1:10100\""),
    (('"lb1"', '"nftsync"'),
     "haproxy[0].local_peer: 'nftsync' is also haproxy_peer: nftsync and HAProxy are two "
     "peers with two names"),
    (('["web", "web_cookie"]', "[]"),
     "haproxy[0].tables: must be a non-empty list of stick table names (the backends that "
     "declare them), e.g. [\"web\"]"),
    (('["web", "web_cookie"]', '["web", "web"]'),
     "haproxy[0].tables[1]: table 'web' is listed twice"),
    (('["web", "web_cookie"]', '["we b"]'),
     "haproxy[0].tables[0]: 'we b' is not a stick table name (1..64 letters, digits, '_', "
     "'.', ':' or '-')"),
    (('admin_socket = "/run/haproxy/admin.sock"', 'admin_sock = "/x"'),
     "haproxy[0]: unknown key 'admin_sock' (did you mean 'admin_socket'?)"),
    (('admin_socket = "/run/haproxy/admin.sock"', ""),
     "haproxy[0]: missing admin_socket (docs/l7.md, \"In the daemon\")"),
    (('"/run/haproxy/admin.sock"', '"admin.sock"'),
     "haproxy[0].admin_socket: 'admin.sock' must be an absolute path"),
])
def test_refusals_name_the_entry_and_key(tmp_path: Path, change: tuple[str, str],
                                         message: str) -> None:
    path = config_file(tmp_path, ENTRY.replace(*change))
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert str(err.value) == f"{path}: {message}"


def test_a_table_replicated_from_two_haproxies_is_refused(tmp_path: Path) -> None:
    second = ENTRY.replace("lb-haproxy", "other").replace("10100", "10101")
    path = config_file(tmp_path, ENTRY + second)
    with pytest.raises(ConfigError, match=r"haproxy\[1\]\.tables: table\(s\) web, web_cookie "
                       r"also replicated from \[\[haproxy\]\] 'lb-haproxy'"):
        load_config(str(path))


def test_haproxy_must_be_an_array_of_tables(tmp_path: Path) -> None:
    path = config_file(tmp_path, 'haproxy = "yes"\n')
    with pytest.raises(ConfigError, match=r"haproxy: must be one or more \[\[haproxy\]\] "
                       "tables"):
        load_config(str(path))


def test_daemon_check_shows_it(tmp_path: Path) -> None:
    path = config_file(tmp_path, ENTRY)
    run = [sys.executable, "-m", "nftsync", "daemon", "--check", "--config", str(path)]
    text = subprocess.run(run, capture_output=True, text=True, check=True).stdout
    assert ("haproxy                    lb-haproxy: tables web, web_cookie, HAProxy peer lb1 "
            "dials nftsync at 127.0.0.1:10100, admin socket /run/haproxy/admin.sock") in text
    data = json.loads(subprocess.run([*run, "--json"], capture_output=True, text=True,
                                     check=True).stdout)
    assert data["haproxy"] == [{"name": "lb-haproxy", "admin_socket": "/run/haproxy/admin.sock",
                                "peer_listen": "127.0.0.1:10100", "local_peer": "nftsync",
                                "haproxy_peer": "lb1", "tables": ["web", "web_cookie"]}]
