"""Property tests for the control socket: whatever a client sends, it gets one answer per request
line (an error or a valid result), never a traceback, and the server keeps serving.

Like tests/unit/test_proto_fuzz.py for the peer protocol. The request handler is driven directly
for the many-example properties, and a real ControlServer on a unix socket in a temporary directory
(no root) for the framing: one answer per line, the next client served. Behind the socket is
test_control_protocol's FakeDaemon, which records the calls that got through the checks.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import socket
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_control_protocol import FakeDaemon, Served, raw

from nftsync.daemon import control
from nftsync.daemon.control import COMMANDS, MAX_ARG_TEXT, MAX_SHOW_LIMIT, ControlServer

FAST = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def handle(line: bytes) -> tuple[dict[str, Any], FakeDaemon]:
    """One request through a fresh server's handler (no socket): the answer and the daemon."""
    daemon = FakeDaemon()
    server = ControlServer(daemon.control_ops(), "/nonexistent/never-bound.sock")
    answer = asyncio.run(server.handle(line))
    return answer, daemon


def assert_answer(answer: Any) -> None:
    """A well-formed response object that survives the trip back through the wire encoding."""
    assert isinstance(answer, dict) and isinstance(answer.get("ok"), bool), answer
    if not answer["ok"]:
        assert set(answer) == {"ok", "error"}
        assert isinstance(answer["error"], str) and answer["error"]
        assert "\n" not in answer["error"] and "Traceback" not in answer["error"]
        assert not answer["error"].startswith("internal error"), answer  # no bug was hit
    wire = control.encode(answer)
    assert wire.endswith(b"\n") and wire.count(b"\n") == 1
    if answer["ok"]:
        assert control.decode_response(wire, "x") == json.loads(wire)["result"]
    else:
        with pytest.raises(control.ControlError, match="^" + re.escape(answer["error"]) + "$"):
            control.decode_response(wire, "x")


# --- JSON values of every kind, requests of every shape --------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-10**60, 10**60),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=300))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)
arg_names = st.one_of(st.sampled_from(["peer", "farm", "limit"]), st.text(max_size=12))
cmd_names = st.one_of(st.sampled_from(list(COMMANDS)), st.text(max_size=20))


def arg_ok(name: str, value: Any) -> bool:
    """The contract of COMMANDS' checkers, written out independently."""
    if name == "limit":
        return type(value) is int and 1 <= value <= MAX_SHOW_LIMIT
    return value is None or (isinstance(value, str) and 0 < len(value) <= MAX_ARG_TEXT
                             and value.isprintable())


@FAST
@given(st.binary(max_size=2000))
def test_random_bytes_get_an_answer(data: bytes) -> None:
    answer, _ = handle(data)
    assert_answer(answer)


@FAST
@given(json_values)
def test_random_json_gets_an_answer(value: Any) -> None:
    answer, daemon = handle(json.dumps(value).encode())
    assert_answer(answer)
    if not isinstance(value, dict) or value.get("cmd") not in COMMANDS:
        assert answer["ok"] is False and daemon.calls == []


@FAST
@given(cmd_names, st.one_of(st.none(), json_values,
                            st.dictionaries(arg_names, json_values, max_size=3)))
def test_every_command_with_arguments_of_every_type(cmd: str, args: Any) -> None:
    request = {"cmd": cmd} if args is None else {"cmd": cmd, "args": args}
    answer, daemon = handle(json.dumps(request).encode())
    assert_answer(answer)
    spec = COMMANDS.get(cmd)
    valid = spec is not None and (args is None or (isinstance(args, dict) and all(
        name in spec and arg_ok(name, value) for name, value in args.items())))
    # FakeDaemon's show fails on purpose for farm "crash"; resync refuses peer "nope"
    special = isinstance(args, dict) and (args.get("farm") == "crash" or args.get("peer") == "nope")
    if not special:
        assert answer["ok"] is valid, (request, answer)
    if not valid:
        assert daemon.calls == [], "a refused request reached the daemon"
    elif cmd != "ping":
        (call,) = daemon.calls
        assert call[0] == cmd


# --- the cases the issue found, and their relatives -------------------------------------------

@pytest.mark.parametrize("number", [
    b"9" * 4301, b"-" + b"9" * 5000, b"1" * 41, b"1." + b"0" * 60, b"1e" + b"9" * 50,
    b"1e999", b"-1e999", b"NaN", b"Infinity", b"-Infinity",
])
@pytest.mark.parametrize("where", [
    b'{"cmd": "show", "args": {"limit": %s}}',
    b'{"cmd": "status", "args": {"x": [1, {"y": %s}]}}',
    b'[%s]',
    b'%s',
])
def test_huge_and_non_finite_numbers_are_refused(number: bytes, where: bytes) -> None:
    answer, daemon = handle(where.replace(b"%s", number))
    assert_answer(answer)
    assert answer["ok"] is False and daemon.calls == []
    assert answer["error"].startswith("malformed request: "), answer


def test_numbers_of_ordinary_size_still_parse() -> None:
    answer, daemon = handle(b'{"cmd": "show", "args": {"limit": 100000}}')
    assert answer["ok"] is True and daemon.calls == [("show", {"farm": None, "limit": 100000})]
    answer, _ = handle(b'{"cmd": "show", "args": {"limit": 2.0}}')
    assert answer == {"ok": False, "error": "show: argument 'limit' must be an integer in "
                      "1..100000"}


def test_duplicate_keys_are_refused() -> None:
    answer, daemon = handle(b'{"cmd": "status", "cmd": "promote"}')
    assert answer == {"ok": False, "error": "malformed request: the key 'cmd' appears twice in "
                      "one object"}
    assert daemon.calls == []


@pytest.mark.parametrize("opener,closer", [(b"[", b"]"), (b'{"a":', b"}")])
@pytest.mark.parametrize("depth", [1_000, 5_000, 12_000])
def test_deep_nesting_is_refused(opener: bytes, closer: bytes, depth: int) -> None:
    line = opener * depth + b"1" + closer * depth
    line = line[:control.MAX_REQUEST - 1]  # what a line can hold; unbalanced is fine too
    answer, daemon = handle(line)
    assert_answer(answer)
    assert answer["ok"] is False and daemon.calls == []


@pytest.mark.parametrize("peer", ["lb2\nFAKE LOG LINE", "a\x1b[31m", "\x00"])
def test_control_characters_in_arguments_are_refused(peer: str) -> None:
    answer, daemon = handle(json.dumps({"cmd": "resync", "args": {"peer": peer}}).encode())
    assert answer == {"ok": False, "error": "resync: argument 'peer' must be printable text "
                      "(no control characters)"}
    assert daemon.calls == []


def test_client_refuses_a_hostile_answer() -> None:
    """`ctl` parses the daemon's answer with the same bounds (a socket may be an impostor's)."""
    with pytest.raises(control.ControlError, match="malformed response: a number longer"):
        control.decode_response(b'{"ok": true, "result": ' + b"7" * 5000 + b"}\n", "x")
    with pytest.raises(control.ControlError, match="malformed response"):
        control.decode_response(b"[" * 100_000 + b"\n", "x")
    # NaN in a statistic is what json.dumps writes for a float('nan'): still an answer
    assert math.isnan(control.decode_response(b'{"ok": true, "result": NaN}', "x"))


# --- over a real socket: one answer per line, and the server keeps serving --------------------

HOSTILE_LINES = [
    b'{"cmd": "show", "args": {"limit": ' + b"9" * 5000 + b"}}",
    b"[" * 60_000,
    b'{"cmd": "status", "args": {"a": NaN}}',
    b"\xff\xfe\x00garbage",
    b'{"cmd": "resync", "args": {"peer": ["x"]}}',
    b'{"cmd": "show", "args": {"limit": true}}',
    b'{"cmd": "promote", "args": {"force": 1}}',
    b'"status"',
    b"null",
]


@pytest.fixture
def served(tmp_path: Path):
    with Served(str(tmp_path / "run" / "nftsync.sock"), FakeDaemon()) as s:
        yield s


def test_hostile_lines_on_one_connection(served: Served) -> None:
    answers = raw(served.path, b"\n".join(HOSTILE_LINES + [b'{"cmd": "status"}']) + b"\n")
    assert len(answers) == len(HOSTILE_LINES) + 1
    for answer in answers[:-1]:
        assert_answer(answer)
        assert answer["ok"] is False
    assert answers[-1]["ok"] is True and answers[-1]["result"]["node"] == "lb1"
    assert served.daemon.calls == [("status", {})]
    assert control.call(served.path, "status")["node"] == "lb1"


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.binary(max_size=300).map(lambda b: b.replace(b"\n", b" ")),
                      min_size=1, max_size=6))
def test_random_lines_over_the_socket(served: Served, lines: list[bytes]) -> None:
    sent = [line for line in lines if line.strip()]  # blank lines are skipped, not answered
    answers = raw(served.path, b"\n".join(lines) + b"\n")
    assert len(answers) == len(sent)
    for answer in answers:
        assert_answer(answer)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:  # still accepting
        s.settimeout(5)
        s.connect(served.path)
        s.sendall(b'{"cmd": "ping"}\n')
        assert json.loads(s.makefile("rb").readline())["ok"] is True
