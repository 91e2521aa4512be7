"""`metrics_listen` / `--metrics-listen`: parsed, refused with one line naming the key, off by
default, and kept on reload (it changes only on restart)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nftsync.daemon.config import DEFAULT_METRICS_PORT, ConfigError, load_config

HEX_KEY = "3f9a1c2b7d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8"


@pytest.fixture
def key(tmp_path: Path) -> Path:
    p = tmp_path / "key"
    p.write_text(HEX_KEY + "\n")
    p.chmod(0o600)
    return p


def conf(tmp_path: Path, key: Path, extra: str) -> str:
    p = tmp_path / "nftsync.toml"
    p.write_text(f'key_file = "{key}"\n{extra}\n')
    return str(p)


@pytest.mark.parametrize(("text", "host", "port"), [
    ("127.0.0.1:9100", "127.0.0.1", 9100),
    ("127.0.0.1", "127.0.0.1", DEFAULT_METRICS_PORT),
    (":9100", "0.0.0.0", 9100),
    ("[::1]:9100", "::1", 9100),
    ("::1", "::1", DEFAULT_METRICS_PORT),
    ("", None, DEFAULT_METRICS_PORT),
])
def test_accepted(tmp_path: Path, key: Path, text: str, host: str | None, port: int) -> None:
    c = load_config(conf(tmp_path, key, f'metrics_listen = "{text}"'), {})
    assert (c.metrics_host, c.metrics_port) == (host, port)


def test_off_by_default_and_the_flag_wins(tmp_path: Path, key: Path) -> None:
    path = conf(tmp_path, key, "")
    assert load_config(path, {}).metrics_host is None
    on = conf(tmp_path, key, 'metrics_listen = "127.0.0.1:9100"')
    assert load_config(on, {"metrics_listen": "127.0.0.2:9200"}).metrics_port == 9200
    assert load_config(on, {"metrics_listen": ""}).metrics_host is None  # the flag turns it off


@pytest.mark.parametrize(("text", "message"), [
    ('"localhost:9477"', "metrics_listen: 'localhost:9477': the metrics address must be an IP "
     "address (127.0.0.1 for this host only, 0.0.0.0 or :: for all), not a host name"),
    ('"127.0.0.1:99999"', "metrics_listen: '127.0.0.1:99999': port '99999' is not a number in "
     "1..65535; expected IP:PORT, [IPv6]:PORT or IP (default port 9477), e.g. "
     "\"127.0.0.1:9477\""),
    ("9477", "metrics_listen: must be a string, got an integer"),
    ('"0.0.0.0:7777"', "metrics_listen: metrics_listen (0.0.0.0:7777) and listen "
     "(0.0.0.0:7777) would share a port; give the metrics endpoint its own"),
])
def test_refused_with_one_line(tmp_path: Path, key: Path, text: str, message: str) -> None:
    path = conf(tmp_path, key, f"metrics_listen = {text}")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert str(info.value) == f"{path}: {message}"


def test_the_flag_and_check(tmp_path: Path, key: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "nftsync", "daemon", "--key-file", str(key),
                               "--config", conf(tmp_path, key, ""), "--check", *args],
                              capture_output=True, text=True, timeout=60, env=os.environ)

    r = run("--json", "--metrics-listen", "127.0.0.1:9300")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["metrics_listen"] == "127.0.0.1:9300"
    assert json.loads(run("--json").stdout)["metrics_listen"] == "off"
    r = run("--metrics-listen", "10.0.0.1:x")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == ("nftsync: error: --metrics-listen: '10.0.0.1:x': port 'x' is not a "
                        "number in 1..65535; expected IP:PORT, [IPv6]:PORT or IP (default port "
                        "9477), e.g. \"127.0.0.1:9477\"\n")


def test_reload_keeps_the_running_address(tmp_path: Path, key: Path, caplog) -> None:
    """SIGHUP's path (service._Runner.reload) with a file that moves the endpoint: the running
    address stays, and the log says so."""
    import asyncio
    import logging

    from nftsync.daemon.service import _Runner

    path = conf(tmp_path, key, 'metrics_listen = "127.0.0.1:9100"')
    runner = _Runner(load_config(path, {}), path, {})
    Path(path).write_text(f'key_file = "{key}"\nmetrics_listen = "127.0.0.1:9200"\n')

    class Core:
        got = None

        phase = "starting"  # not running yet: no readiness notices (service.reload)

        async def reload(self, new):  # what the daemon core is handed
            Core.got = new
            return {}

    with caplog.at_level(logging.WARNING, "nftsync.daemon"):
        asyncio.run(runner.reload(Core()))
    assert (Core.got.metrics_host, Core.got.metrics_port) == ("127.0.0.1", 9100)
    assert "metrics_listen changes only on restart; still 127.0.0.1:9100" in caplog.text
