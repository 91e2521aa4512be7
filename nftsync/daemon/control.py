"""The daemon's control socket: `nftsync ctl` talks to a running `nftsync daemon` through it.

A unix stream socket (default /run/nftsync/nftsync.sock, mode 0600 in a 0750 directory: only root
may steer replication). The protocol is line-delimited JSON so that `socat` or a monitoring
script can speak it too:

    -> {"cmd": "status", "args": {}}
    <- {"ok": true, "result": {...}}          or    {"ok": false, "error": "one line"}

A client may send several requests on one connection; each gets exactly one response line, in
order. Requests are bounded (MAX_REQUEST), commands and their arguments are checked against a
fixed table before the daemon sees them, and nothing a client sends can stop the server: bad JSON,
an oversized line, an unknown command, a client that vanishes mid-answer or an exception inside
the daemon all end as an error response (or a closed connection) for that client only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import grp
import inspect
import json
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from nftsync import __version__
from nftsync.daemon.config import DEFAULT_SOCKET
from nftsync.errors import NftsyncError

log = logging.getLogger("nftsync.control")

MAX_REQUEST = 64 * 1024  # a request is a command name and a few small arguments
MAX_RESPONSE = 64 * 1024 * 1024  # `show` of a big farm; the client refuses anything larger
MAX_CLIENTS = 32  # control connections served at once; more wait for a slot (bursts) ...
SLOT_WAIT = 5.0  # ... for at most this many seconds, then get an error and are closed
REFUSED_READ_S = 1.0  # how long a refused client may take to send its request line
MAX_WAITING = 4 * MAX_CLIENTS  # beyond this many connections, refuse at once (a flood)
CLIENT_IDLE = 60.0  # seconds a connection may sit without sending a request
DEFAULT_TIMEOUT = 10.0
MAX_SHOW_LIMIT = 100_000
MAX_ARG_TEXT = 255
#: Characters of one JSON number, in a request or an answer. A u64 has 20 digits and a float's
#: repr at most 24; Python's int() of a few thousand digits raises (int_max_str_digits) or
#: costs quadratic time, so longer numbers are refused before they are converted.
MAX_NUMBER_TEXT = 40

_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid (SO_PEERCRED)
#: SO_PEERGROUPS (Linux 4.13): the peer's supplementary groups when it connected. Python's
#: getsockopt reads at most 1024 bytes: 256 groups; a process in more is judged by its
#: primary group alone.
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
REFUSAL_LOG_INTERVAL = 10.0  # seconds between two log lines about refused control clients


class ControlError(NftsyncError):
    """The control socket cannot be served or reached, or the daemon refused a request."""

    exit_code = 1


class DaemonNotRunning(ControlError):
    """Nothing listens on the control socket: `nftsync ctl` has no daemon to talk to."""

    exit_code = 3


class UntrustedDaemon(ControlError):
    """The process serving the control socket is neither root nor the caller's own user: it
    may be an impostor that took the path first (a socket in a world-writable directory), so
    `nftsync ctl` believes none of its answers."""

    exit_code = 5


@dataclasses.dataclass(frozen=True, slots=True)
class PeerCred:
    """The credentials of the process at the other end of a unix socket, when it connected
    (or, for a listening socket, when it called listen): SO_PEERCRED, set by the kernel."""

    pid: int
    uid: int
    gid: int

    @classmethod
    def of(cls, sock: Any) -> PeerCred:
        return cls(*_UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                  _UCRED.size)))


def peer_groups(sock: Any) -> tuple[int, ...] | None:
    """The peer's supplementary group ids (SO_PEERGROUPS); None if they cannot be read."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)
    except OSError:  # ERANGE: more than 256 groups; ENOPROTOOPT: a kernel before 4.13
        return None
    return struct.unpack(f"{len(raw) // 4}I", raw[:len(raw) // 4 * 4])


# --------------------------------------------------------------------------------------------
# Commands: name -> (daemon method, {argument: checker}). The checkers turn untrusted JSON into
# the method's keyword arguments or raise ValueError with a one-line reason.
# --------------------------------------------------------------------------------------------

def _opt_text(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ARG_TEXT:
        raise ValueError(f"must be a string of 1..{MAX_ARG_TEXT} characters")
    if not value.isprintable():  # it may end up in a log line: no newlines, no escapes
        raise ValueError("must be printable text (no control characters)")
    return value


def _limit(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SHOW_LIMIT:
        raise ValueError(f"must be an integer in 1..{MAX_SHOW_LIMIT}")
    return value


COMMANDS: dict[str, dict[str, Callable[[Any], Any]]] = {
    "ping": {},  # answered by the server itself: is a daemon there, which pid and version
    "status": {},
    "peers": {},
    "stats": {},
    "resync": {"peer": _opt_text},
    "promote": {},
    "demote": {},
    "show": {"farm": _opt_text, "limit": _limit},
}


def _jsonable(obj: Any) -> Any:
    """json.dumps fallback for the few non-JSON types a daemon result may reasonably hold."""
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    if isinstance(obj, enum.Enum):
        return obj.value
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj).hex()
    return str(obj)


class _BadJSON(ValueError):
    """A JSON value that parses but is refused: an over-long number, NaN/Infinity, a duplicate
    key (whose meaning would depend on which copy the reader keeps)."""


def _number_text(text: str) -> str:
    if len(text) > MAX_NUMBER_TEXT:
        raise _BadJSON(f"a number longer than {MAX_NUMBER_TEXT} characters")
    return text


def _parse_int(text: str) -> int:
    return int(_number_text(text))


def _parse_float(text: str) -> float:
    value = float(_number_text(text))
    if value in (float("inf"), float("-inf")):  # 1e999: out of a double's range
        raise _BadJSON(f"the number {text} is out of range")
    return value


def _parse_constant(name: str) -> Any:
    raise _BadJSON(f"{name} is not a JSON number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _BadJSON(f"the key {key[:64]!r} appears twice in one object")
        out[key] = value
    return out


def loads(data: bytes, *, constants: bool = False) -> Any:
    """json.loads for untrusted lines (requests, and answers read by `ctl`): numbers are
    bounded before they are converted, duplicate keys are refused, and so are NaN/Infinity
    unless `constants` (an answer: a daemon's statistic may be NaN, which json.dumps writes).
    Raises ValueError (with the reason) or RecursionError (nesting beyond the interpreter's
    bound)."""
    return json.loads(data, parse_int=_parse_int, parse_float=_parse_float,
                      parse_constant=float if constants else _parse_constant,
                      object_pairs_hook=_unique_keys)


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), default=_jsonable).encode() + b"\n"


def error_response(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}


# --------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------

async def _take_request(reader: asyncio.StreamReader) -> None:
    """Read (and drop) the request a refused client sent, within REFUSED_READ_S, before the
    refusal is answered: a client whose request was still on its way when the server answered
    and closed would get EPIPE on its send instead of reading why it was refused."""
    try:
        async with asyncio.timeout(REFUSED_READ_S):
            await reader.readline()
    except (TimeoutError, ValueError, ConnectionError, asyncio.IncompleteReadError,
            asyncio.LimitOverrunError):
        return  # nothing (whole) came: the refusal is answered all the same


class ControlServer:
    """Serves the control protocol on `path`: `ops` maps each command of COMMANDS (but ping,
    which the server answers itself) to the function that runs it (Daemon.control_ops())."""

    def __init__(self, ops: Mapping[str, Callable[..., Any]],
                 path: str = DEFAULT_SOCKET, group: str | None = None) -> None:
        missing = set(COMMANDS) - {"ping"} - set(ops)
        if missing:
            raise ValueError(f"no operation for command(s) {', '.join(sorted(missing))}")
        self.ops = dict(ops)
        self.path = path
        self.group = group  # control_group: its members may use the socket too
        self._gid: int | None = None  # the group's id, resolved at start()
        self.refused = 0  # clients refused for their credentials
        self._refusal_logged = 0.0  # monotonic time of the last log line about them
        self._refusals_unlogged = 0
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(MAX_CLIENTS)
        self._ident: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket we bound
        self.started = time.monotonic()

    async def start(self) -> None:
        """Create the directory (0750) and socket (0600, or 0660 for control_group); refuse if
        a daemon already listens."""
        if self.group is not None:
            try:
                self._gid = grp.getgrnam(self.group).gr_gid
            except KeyError:
                raise ControlError(f"control_group {self.group!r}: no such group") from None
        self._prepare_path()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Bind under a umask so the socket never exists with wider permissions, even
            # briefly; the chmod after it is for file systems that ignore the umask.
            old = os.umask(0o177)
            try:
                sock.bind(self.path)
            finally:
                os.umask(old)
            if self._gid is not None:
                os.chown(self.path, -1, self._gid)
            os.chmod(self.path, 0o600 if self._gid is None else 0o660)
            st = os.lstat(self.path)
            self._ident = (st.st_dev, st.st_ino)
            sock.listen(MAX_WAITING)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise ControlError(f"cannot listen on control socket {self.path}: "
                               f"{exc.strerror or exc}") from None
        self._server = await asyncio.start_unix_server(self._client, sock=sock,
                                                       limit=MAX_REQUEST)
        log.info("control socket listening on %s%s", self.path,
                 f" (root and group {self.group})" if self.group else "")

    def _prepare_path(self) -> None:
        parent = Path(self.path).parent
        if not parent.is_dir():
            try:
                parent.mkdir(mode=0o750, parents=True)
                os.chmod(parent, 0o750)  # mkdir's mode is filtered by the umask
            except OSError as exc:
                raise ControlError(f"cannot create the control socket directory {parent}: "
                                   f"{exc.strerror}") from None
        if self._gid is not None:
            self._open_directory_to_group(parent)
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(f"{self.path} exists and is not a socket: remove it or give "
                               "another --socket")
        pid = _listener_pid(self.path)
        if pid is not None:
            who = f" (pid {pid})" if pid > 0 else ""
            raise ControlError(f"another nftsync daemon{who} is already listening on "
                               f"{self.path}: stop it first, or give this one another --socket")
        log.info("removing stale control socket %s left by a daemon that is gone", self.path)
        with contextlib.suppress(FileNotFoundError):  # another process removed it: fine too
            os.unlink(self.path)

    def _open_directory_to_group(self, parent: Path) -> None:
        """Let control_group's members reach the socket: a directory that is the daemon's own
        (owned by its user, writable by nobody else, such as /run/nftsync) gets that group,
        mode 0750. Any other directory is left as it is: it is not ours to change."""
        st = os.stat(parent)
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            log.warning("control socket directory %s is not the daemon's own: members of "
                        "control_group %s need search (x) permission on it", parent, self.group)
            return
        assert self._gid is not None
        try:
            os.chown(parent, -1, self._gid)
            os.chmod(parent, 0o750)
        except OSError as exc:
            raise ControlError(f"cannot give the control socket directory {parent} to group "
                               f"{self.group}: {exc.strerror}") from None

    def _allowed(self, sock: Any) -> PeerCred | None:
        """The client's credentials if it may use the socket (root, the daemon's own user, or
        a member of control_group when it connected), else None. Checked although the socket's
        mode already keeps others out: the mode is only as good as every directory above it."""
        cred = PeerCred.of(sock)
        if cred.uid in (0, os.geteuid()):
            return cred
        if self._gid is not None and (cred.gid == self._gid
                                      or self._gid in (peer_groups(sock) or ())):
            return cred
        self._log_refusal(cred)
        return None

    def _log_refusal(self, cred: PeerCred) -> None:
        """One line per REFUSAL_LOG_INTERVAL at most, with a count of those not logged."""
        self.refused += 1
        now = time.monotonic()
        if self._refusal_logged and now - self._refusal_logged < REFUSAL_LOG_INTERVAL:
            self._refusals_unlogged += 1
            return
        more = (f" ({self._refusals_unlogged} more refused since the last such line)"
                if self._refusals_unlogged else "")
        who = "root" + (f" or group {self.group}" if self.group else "")
        log.warning("control socket: refused pid %d uid %d gid %d: not %s%s", cred.pid,
                    cred.uid, cred.gid, who, more)
        self._refusal_logged, self._refusals_unlogged = now, 0

    async def close(self) -> None:
        """Stop accepting, drop connected clients, remove our socket file (only if still ours)."""
        if self._server is None:
            return
        self._server.close()
        for task in list(self._clients):
            task.cancel()
        if self._clients:
            await asyncio.gather(*self._clients, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) == self._ident:
            os.unlink(self.path)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        slot = False
        try:
            if self._allowed(writer.get_extra_info("socket")) is None:
                await _take_request(reader)
                writer.write(encode(error_response(
                    "permission denied: the control socket serves root"
                    + (f" and group {self.group}" if self.group else "") + " only")))
                await writer.drain()
                return
            # A connection that waits for a slot costs a task and a socket, no more; a burst
            # (monitoring scripts firing together, clients that already hung up but are not
            # yet reaped) is absorbed, a flood is refused.
            slot = len(self._clients) <= MAX_WAITING and await self._acquire_slot()
            if not slot:
                await _take_request(reader)
                writer.write(encode(error_response(
                    f"too many control connections (at most {MAX_CLIENTS})")))
                await writer.drain()
                return
            await self._serve(reader, writer)
        except ConnectionError as exc:
            log.debug("control client went away: %s", exc)
        finally:
            if slot:
                self._slots.release()
            self._clients.discard(task)
            writer.close()
            # asyncio.timeout rather than wait_for: no inner task, so a cancellation from
            # close() cannot get stuck behind one (seen with wait_for on Python 3.11).
            try:  # close() waits for unsent data; a client that never reads gets cut off
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()
            except (TimeoutError, ConnectionError):
                writer.transport.abort()

    async def _acquire_slot(self) -> bool:
        try:
            async with asyncio.timeout(SLOT_WAIT):
                await self._slots.acquire()
        except TimeoutError:
            return False
        return True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                async with asyncio.timeout(CLIENT_IDLE):
                    line = await reader.readline()
            except TimeoutError:
                return
            except ValueError:
                # StreamReader hit `limit` before a newline; the rest of the line cannot be
                # told from the next request, so answer and hang up.
                writer.write(encode(error_response(
                    f"request larger than {MAX_REQUEST} bytes")))
                await writer.drain()
                return
            if not line:
                return
            if not line.strip():
                continue
            response = await self.handle(line)
            writer.write(encode(response))
            try:
                # A client that stops reading must not hold its slot (and our buffer) forever.
                async with asyncio.timeout(CLIENT_IDLE):
                    await writer.drain()
            except TimeoutError:
                log.warning("control client stopped reading its answer; disconnected")
                writer.transport.abort()  # close() would wait for the unsent answer forever
                return

    async def handle(self, line: bytes) -> dict[str, Any]:
        """One request line -> one response object. Never raises for anything a client sends:
        whatever escapes the checks below is a bug, logged with its traceback and answered."""
        try:
            return await self._handle(line)
        except Exception as exc:
            log.exception("control request could not be handled")
            return error_response(f"internal error: {type(exc).__name__} (details in the "
                                  "daemon's log)")

    async def _handle(self, line: bytes) -> dict[str, Any]:
        try:
            request = loads(line)
        except _BadJSON as exc:
            return error_response(f"malformed request: {exc}")
        except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError are ValueError
            return error_response('malformed request: expected one JSON object per line, '
                                  'e.g. {"cmd": "status", "args": {}}')
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            return error_response('malformed request: expected {"cmd": NAME, "args": {...}}')
        extra = set(request) - {"cmd", "args"}
        if extra:
            return error_response(f"malformed request: unknown field(s) {', '.join(sorted(extra))}")
        cmd = request["cmd"]
        spec = COMMANDS.get(cmd)
        if spec is None:
            return error_response(f"unknown command {cmd[:64]!r} "
                                  f"(one of: {', '.join(COMMANDS)})")
        args = request.get("args")
        if args is None:
            args = {}
        if not isinstance(args, dict):
            return error_response(f"{cmd}: args must be a JSON object")
        kwargs: dict[str, Any] = {}
        for name, value in args.items():
            check = spec.get(name)
            if check is None:
                known = ", ".join(spec) or "none"
                return error_response(f"{cmd}: unknown argument {name[:64]!r} "
                                      f"(accepted: {known})")
            try:
                kwargs[name] = check(value)
            except ValueError as exc:
                return error_response(f"{cmd}: argument {name!r} {exc}")
        try:
            result = await self._run(cmd, kwargs)
            # Serialise here, so a result that cannot be encoded is this command's error.
            encode({"ok": True, "result": result})
        except NftsyncError as exc:
            return error_response(str(exc))
        except Exception as exc:
            log.exception("control command %s failed", cmd)
            return error_response(f"internal error in {cmd}: {type(exc).__name__}: {exc} "
                                  "(details in the daemon's log)")
        return {"ok": True, "result": result}

    async def _run(self, cmd: str, kwargs: dict[str, Any]) -> Any:
        if cmd == "ping":
            return {"pid": os.getpid(), "version": __version__,
                    "uptime_s": round(time.monotonic() - self.started, 3)}
        result = self.ops[cmd](**kwargs)
        if inspect.isawaitable(result):
            result = await result
        return result


def _listener_pid(path: str) -> int | None:
    """Pid of the process listening on `path` (0 if unknown), None if nobody listens (stale)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:  # closed on every path
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return None
        except OSError as exc:
            raise ControlError(f"cannot check the existing control socket {path}: "
                               f"{exc.strerror or exc}") from None
        try:
            cred = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
            return _UCRED.unpack(cred)[0]
        except OSError:
            return 0


# --------------------------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------------------------

def encode_request(cmd: str, args: dict[str, Any] | None) -> bytes:
    line = encode({"cmd": cmd, "args": args or {}})
    if len(line) > MAX_REQUEST:
        raise ControlError(f"request larger than {MAX_REQUEST} bytes")
    return line


def _not_running(path: str) -> DaemonNotRunning:
    return DaemonNotRunning(f"no daemon is listening on {path}: start it with `nftsync daemon "
                            "--config /etc/nftsync/nftsync.toml` (or `systemctl start nftsync`), "
                            "or give its --socket")


def _connect_error(path: str, exc: OSError) -> ControlError:
    if isinstance(exc, (FileNotFoundError, ConnectionRefusedError)):
        return _not_running(path)
    if isinstance(exc, PermissionError):
        return ControlError(f"permission denied on {path}: the control socket is root's "
                            "(run nftsync ctl as root, or as a member of the daemon's "
                            "control_group)")
    return ControlError(f"cannot connect to {path}: {exc.strerror or exc}")


def check_daemon(sock: Any, path: str) -> PeerCred:
    """Refuse (UntrustedDaemon) a socket served by anyone but root or the caller's own user.

    Why: whoever binds a path first owns it. With --socket (or $NFTSYNC_SOCKET) in a
    world-writable directory, another local user can be listening there and answer "health
    ok" to a keepalived check. The kernel's SO_PEERCRED of the connected socket names the
    process that called listen(); only root (the daemon's user) and we ourselves (a daemon
    we started, e.g. in tests) are believed.
    """
    cred = PeerCred.of(sock)
    if cred.uid not in (0, os.geteuid()):
        raise UntrustedDaemon(f"{path} is served by uid {cred.uid} (pid {cred.pid}), not by "
                              "root: not trusting its answers (is it an impostor? check who "
                              f"created {path})")
    return cred


def decode_response(line: bytes, path: str) -> Any:
    """The daemon's response line -> its result; its error as ControlError."""
    if not line:
        raise ControlError(f"the daemon on {path} closed the connection without answering "
                           "(see its log: journalctl -u nftsync)")
    try:
        response = loads(line, constants=True)
    except (ValueError, RecursionError) as exc:
        why = f": {exc}" if isinstance(exc, _BadJSON) else ""
        raise ControlError(f"the daemon on {path} sent a malformed response{why}") from None
    if not isinstance(response, dict) or not isinstance(response.get("ok"), bool):
        raise ControlError(f"the daemon on {path} sent a malformed response")
    if not response["ok"]:
        raise ControlError(str(response.get("error") or "the daemon refused the request"))
    return response.get("result")


async def request(path: str, cmd: str, args: dict[str, Any] | None = None,
                  timeout: float = DEFAULT_TIMEOUT) -> Any:
    """Send one command to the daemon on `path` and return its result (asyncio)."""
    line = encode_request(cmd, args)
    try:
        async with asyncio.timeout(timeout):
            try:
                reader, writer = await asyncio.open_unix_connection(path, limit=MAX_RESPONSE)
            except OSError as exc:
                raise _connect_error(path, exc) from None
            try:
                check_daemon(writer.get_extra_info("socket"), path)
                writer.write(line)
                await writer.drain()
                answer = await reader.readline()
            finally:
                writer.close()  # nothing left to send: the transport closes at once
    except TimeoutError:
        raise ControlError(f"the daemon on {path} did not answer {cmd!r} within "
                           f"{timeout:g} s") from None
    except ValueError:
        raise ControlError(f"the daemon's answer is larger than {MAX_RESPONSE} bytes") from None
    except ConnectionError as exc:
        raise ControlError(f"lost the connection to the daemon on {path}: {exc}") from None
    return decode_response(answer, path)


def call(path: str, cmd: str, args: dict[str, Any] | None = None,
         timeout: float = DEFAULT_TIMEOUT) -> Any:
    """Blocking `request`: what `nftsync ctl` uses (no event loop to start for one line)."""
    line = encode_request(cmd, args)
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except TimeoutError:
            raise ControlError(f"the daemon on {path} did not accept within {timeout:g} s") \
                from None
        except OSError as exc:
            raise _connect_error(path, exc) from None
        check_daemon(sock, path)  # before a byte of the request goes out
        buf = bytearray()
        try:
            sock.sendall(line)
            while not buf.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(left)
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > MAX_RESPONSE:
                    raise ControlError(f"the daemon's answer is larger than {MAX_RESPONSE} "
                                       "bytes")
        except TimeoutError:
            raise ControlError(f"the daemon on {path} did not answer {cmd!r} within "
                               f"{timeout:g} s") from None
        except OSError as exc:
            raise ControlError(f"lost the connection to the daemon on {path}: "
                               f"{exc.strerror or exc}") from None
    finally:
        sock.close()
    return decode_response(bytes(buf), path)
