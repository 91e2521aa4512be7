"""What every HAProxy lab here shares: the configuration, the backends, the admin socket, the
process and the waits.

The L7 tests (test_l7_haproxy_peer, test_l7_replication, test_l7_failover) and benchmarks
(bench_haproxy, bench_l7_replication) run Debian's HAProxy in a network namespace with the same
farms (`web`: stick on src; `web_hdr`: stick on a header; `web_cookie`: on a cookie), the same
two servers be1/be2 (ids 1 and 2: replication relies on both nodes agreeing) and a `peers`
section listing HAProxy itself and nftsync. One renderer keeps them from drifting apart.

The admin socket is read with a parser of its own rather than nftsync.l7.admin's: the tests
check HAProxy's state, so they should not read it through the code under test, and they compare
HAProxy's raw text (`server_key=-`, ids as printed).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import netns
from daemons import DaemonProc

HAPROXY_PEER_PORT = 10000  # HAProxy's own (local) peer
PEER_PORT = 10001  # the peer "nftsync" HAProxy dials
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Farm:
    """A frontend and its backend with a stick table."""

    frontend: str
    port: int
    backend: str
    table: str  # the stick-table's arguments, before `peers`
    stick: str  # what `stick on` takes


SRC = Farm("fe_src", 8080, "web", "type ip size 200k expire 30m store server_id", "src")
COOKIE = Farm("fe_cookie", 8081, "web_cookie", "type string len 64 size 200k expire 30m",
              "req.cook(SRV)")
HDR = Farm("fe_hdr", 8082, "web_hdr", "type string len 64 size 200k expire 30m",
           "req.hdr(X-Session)")

#: (name, address, port): the tiny backends on 127/8 of a namespace of its own.
LOCAL_SERVERS = (("be1", "127.0.0.11", 8001), ("be2", "127.0.0.12", 8002))


def haproxy_config(tmp: Path | str, lb: str = "lb1", *, peers: str = "nftsync_peers",
                   farms: Sequence[Farm] = (SRC, HDR), bind: str = "127.0.0.1",
                   servers: Sequence[tuple[str, str, int]] = LOCAL_SERVERS,
                   local_port: int = HAPROXY_PEER_PORT, nftsync_port: int = PEER_PORT,
                   pidfile: bool = False) -> str:
    """HAProxy's configuration: admin socket in `tmp`, peer `lb` (HAProxy, as `-L lb`) and
    nftsync, one frontend on `bind` per farm (`bind=""`: every address)."""
    out = ["global",
           f"    stats socket {tmp}/admin.sock mode 600 level admin",
           "    stats timeout 2m"]
    if pidfile:
        out.append(f"    pidfile {tmp}/haproxy.pid")
    out += ["", "defaults", "    mode http", "    timeout connect 2s", "    timeout client 10s",
            "    timeout server 10s", "",
            f"peers {peers}",
            f"    peer {lb} 127.0.0.1:{local_port}",
            f"    peer nftsync 127.0.0.1:{nftsync_port}"]
    for f in farms:
        out += ["", f"frontend {f.frontend}", f"    bind {bind}:{f.port}",
                f"    default_backend {f.backend}"]
    for f in farms:
        out += ["", f"backend {f.backend}", "    balance roundrobin",
                f"    stick-table {f.table} peers {peers}", f"    stick on {f.stick}"]
        out += [f"    server {name} {addr}:{port} id {i}"
                for i, (name, addr, port) in enumerate(servers, 1)]
    return "\n".join(out) + "\n"


def nftsync_config(tmp: Path | str, lb: str, key: Path | str,
                   tables: Sequence[str] = ("web", "web_hdr"), peer_port: int = PEER_PORT) -> str:
    """The daemon's configuration declaring the HAProxy of haproxy_config(tmp, lb)."""
    listed = ", ".join(f'"{t}"' for t in tables)
    return (f'key_file = "{key}"\n\n[[haproxy]]\nname = "{lb}-haproxy"\n'
            f'admin_socket = "{tmp}/admin.sock"\npeer_listen = "127.0.0.1:{peer_port}"\n'
            f'local_peer = "nftsync"\nhaproxy_peer = "{lb}"\ntables = [{listed}]\n')


BACKEND = """\
import http.server, sys
name, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = name.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer((addr, port), H).serve_forever()
"""


def start_backends(ns: str, tmp: Path) -> list[subprocess.Popen]:
    """be1 and be2 (LOCAL_SERVERS) in `ns`, each answering its name; stop them with stop_pid."""
    (tmp / "backend.py").write_text(BACKEND)
    return [subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, str(tmp / "backend.py"),
                              name, addr, str(port)]) for name, addr, port in LOCAL_SERVERS]


def stop_pid(proc: subprocess.Popen, seconds: float = 5.0) -> None:
    """SIGTERM, then SIGKILL when it has not ended within `seconds`; reaped either way."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(seconds)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def check_config(ns: str, cfg: Path, error: type[Exception] = AssertionError) -> None:
    """`haproxy -c` in `ns`: a configuration HAProxy refuses fails here, with its words."""
    check = netns.run(ns, "haproxy", "-c", "-q", "-f", str(cfg), check=False)
    if check.returncode != 0:
        raise error(f"haproxy -c: {check.stderr.strip() or check.stdout.strip()}")


def wait_for(what: str, check: Callable[[], object], seconds: float = 10.0,
             interval: float = 0.05, error: type[Exception] = AssertionError) -> object:
    """Poll `check` until truthy (an OSError counts as not yet: a socket not up); its value."""
    deadline = time.monotonic() + seconds
    last: object = None
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            last = check()
            if last:
                return last
        time.sleep(interval)
    raise error(f"{what}: not within {seconds:.0f} s (last: {last!r})")


def read_to_eof(s: socket.socket, deadline: float) -> bytes:
    """The whole answer: HAProxy closes the connection after it (bounded by `deadline`)."""
    chunks = []
    while data := s.recv(1 << 20):
        chunks.append(data)
        if time.monotonic() > deadline:
            raise TimeoutError("HAProxy's answer did not end in time")
    return b"".join(chunks)


SHOWN = re.compile(r"key=((?:\\.|\S)+) use=\d+ exp=(\d+)(.*)")


def parse_show_table(text: str) -> dict[str, tuple[int, dict[str, str]]]:
    """`show table T` -> key (unescaped) -> (exp ms, data as printed: server_id, ...)."""
    out = {}
    for m in SHOWN.finditer(text):
        key = re.sub(r"\\(.)", r"\1", m.group(1))
        out[key] = (int(m.group(2)), dict(kv.split("=", 1) for kv in m.group(3).split()))
    return out


def cpu_seconds(pid: int) -> float:
    """user+system CPU of a process so far (all its threads), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def ip_key(i: int) -> str:
    """The i-th IPv4 key of a filled `type ip` table."""
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


@dataclass
class HaproxyNode:
    """HAProxy in namespace `ns` as peer `lb`, its files in `tmp` (haproxy.cfg, admin.sock,
    haproxy.log); `haproxy` is the pid it is stopped by (the master's with `-W`)."""

    ns: str
    lb: str
    tmp: Path
    haproxy: subprocess.Popen | None = field(default=None, kw_only=True)

    master_worker: ClassVar[bool] = True  # `-W`, as Debian's unit runs it
    start_seconds: ClassVar[float] = 10.0
    cli_timeout: ClassVar[float] = 5.0
    error: ClassVar[type[Exception]] = AssertionError

    @property
    def admin(self) -> str:
        return str(self.tmp / "admin.sock")

    def start_haproxy(self, extra_args: Sequence[str] = ()) -> None:
        log = open(self.tmp / "haproxy.log", "a")  # noqa: SIM115 (HAProxy keeps it)
        # `ip netns exec` execs HAProxy: this pid is HAProxy's (the master's with -W).
        self.haproxy = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, "haproxy", *(["-W"] if self.master_worker else []),
             "-db", "-L", self.lb, *extra_args, "-f", str(self.tmp / "haproxy.cfg")],
            stdout=subprocess.DEVNULL, stderr=log)
        log.close()
        wait_for(f"{self.lb}: HAProxy's admin socket", lambda: "Name: HAProxy" in
                 self.cli("show info"), self.start_seconds, error=self.error)

    def stop_haproxy(self) -> None:
        if self.haproxy is not None:
            stop_pid(self.haproxy, 10)
        self.haproxy = None

    def command(self, line: str, timeout: float | None = None) -> bytes:
        """One line (one or `;`-joined commands) on a fresh connection; the answer to EOF."""
        timeout = self.cli_timeout if timeout is None else timeout
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(self.admin)
            s.sendall(line.encode() + b"\n")
            return read_to_eof(s, time.monotonic() + timeout)

    def cli(self, line: str, timeout: float | None = None) -> str:
        return self.command(line, timeout).decode()

    def show_table(self, table: str, timeout: float | None = None
                   ) -> dict[str, tuple[int, dict[str, str]]]:
        """key -> (exp ms, data) from `show table` (keys unescaped)."""
        return parse_show_table(self.cli(f"show table {table}", timeout))

    def get(self, port: int, src: str, headers: dict[str, str] | None = None) -> str:
        """One HTTP request from `src` (a 127/8 address of the namespace) through this HAProxy:
        the server's name."""
        with netns.entered(self.ns):
            s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(src, 0))
        with s:
            extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
            s.sendall(f"GET / HTTP/1.0\r\nHost: lab\r\n{extra}\r\n".encode())
            data = b""
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and (chunk := s.recv(4096)):
                data += chunk
        return data.split(b"\r\n\r\n", 1)[1].decode()


@dataclass
class ReplicaNode(HaproxyNode):
    """A load balancer whose nftsync daemon replicates its HAProxy's tables (`[[haproxy]]`)."""

    daemon: DaemonProc
    procs: list[subprocess.Popen] = field(default_factory=list)

    def haproxy_status(self) -> dict:
        return self.daemon.ctl("status")["haproxy"][0]


def write_replica_files(ns: str, tmp: Path, lb: str, key: Path | str,
                        farms: Sequence[Farm] = (SRC, HDR),
                        error: type[Exception] = AssertionError) -> Path:
    """haproxy.cfg (checked by HAProxy) and nftsync.toml declaring that HAProxy, in `tmp` (made
    here); the latter's path, the daemon's --config."""
    tmp.mkdir(exist_ok=True)
    (tmp / "haproxy.cfg").write_text(haproxy_config(tmp, lb, farms=farms))
    check_config(ns, tmp / "haproxy.cfg", error)
    toml = tmp / "nftsync.toml"
    toml.write_text(nftsync_config(tmp, lb, key, [f.backend for f in farms]))
    return toml


def start_replicas(nodes: Sequence[ReplicaNode], seconds: float, interval: float) -> None:
    """Daemons first (listening for HAProxy before it dials), then the HAProxies; wait until
    each HAProxy is connected to its nftsync and the daemons to each other."""
    for n in nodes:
        n.daemon.start()
    for n in nodes:
        n.start_haproxy()
    for n in nodes:
        wait_for(f"{n.lb}: HAProxy connected to nftsync",
                 lambda n=n: n.haproxy_status()["connected"], seconds, interval, n.error)
        wait_for(f"{n.lb}: peer up", lambda n=n: n.daemon.peers_up() >= 1, seconds, interval,
                 n.error)
