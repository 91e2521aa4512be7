"""The daemon's log formats: one record is one line, in text and in JSON, also with a traceback."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

from nftsync.daemon.config import load_config
from nftsync.daemon.logformat import formatter


def _emit(fmt: logging.Formatter, level: int, msg: str, exc: bool = False) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(fmt)
    log = logging.getLogger(f"nftsync.test.{id(stream)}")
    log.propagate = False
    log.setLevel(logging.DEBUG)
    log.addHandler(handler)
    try:
        if exc:
            try:
                raise ValueError("bad\nthing")
            except ValueError:
                log.exception(msg)
        else:
            log.log(level, msg)
    finally:
        log.removeHandler(handler)
    return stream.getvalue()


def test_json_is_one_parsable_line_per_record_even_with_newlines_and_a_traceback():
    out = _emit(formatter("json", journal=False), logging.ERROR, "peer [fd00::1]:7777\ndown",
                exc=True)
    lines = out.splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert rec["level"] == "error" and rec["message"] == "peer [fd00::1]:7777\ndown"
    assert "ValueError: bad" in rec["exception"] and rec["logger"].startswith("nftsync.test")
    assert rec["time"].endswith("Z") and isinstance(rec["pid"], int)


def test_json_on_journald_keeps_the_priority_prefix():
    out = _emit(formatter("json", journal=True), logging.WARNING, "lag high")
    assert out.startswith("<4>{")
    assert json.loads(out[3:])["level"] == "warning"


def test_text_on_journald_prefixes_every_line_of_a_traceback():
    out = _emit(formatter("text", journal=True), logging.ERROR, "failed", exc=True)
    assert all(line.startswith("<3>") for line in out.splitlines())
    assert len(out.splitlines()) > 2


def test_text_on_a_terminal_has_time_level_and_logger():
    out = _emit(formatter("text", journal=False), logging.INFO, "listening on [::1]:7777")
    assert " INFO nftsync.test." in out and out.rstrip().endswith("listening on [::1]:7777")


def _config(tmp_path: Path, extra: str) -> Path:
    key = tmp_path / "key"
    key.write_text("0123456789abcdef" * 4 + "\n")
    key.chmod(0o600)
    conf = tmp_path / "nftsync.toml"
    conf.write_text(f'key_file = "key"\npeers = ["10.0.0.2"]\n{extra}\n')
    return conf


def test_log_format_from_the_file_and_the_flag_wins(tmp_path: Path):
    conf = _config(tmp_path, 'log_format = "JSON"')
    assert load_config(str(conf), {}).log_format == "json"
    assert load_config(str(conf), {"log_format": "text"}).log_format == "text"
    assert load_config(str(_config(tmp_path, "")), {}).log_format == "text"


def test_an_unknown_log_format_is_refused_with_file_and_choices(tmp_path: Path):
    conf = _config(tmp_path, 'log_format = "xml"')
    p = subprocess.run([sys.executable, "-m", "nftsync", "daemon", "--check", "--config",
                        str(conf)], capture_output=True, text=True)
    assert p.returncode == 2
    assert "log_format" in p.stderr and "xml" in p.stderr and "json" in p.stderr, p.stderr
    assert str(conf) in p.stderr
