"""Python handle on the netns lab (netns-lab/lab.sh): two load balancers, a client with many source
addresses, backends that answer with their name.

Tests drive the lab through lab.sh itself, so what a test sets up is what a person gets with
`netns-lab/lab.sh up`; traffic comes from netns-lab/client.py run inside the client namespace with
this interpreter (`sys.executable`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from nftsync.errors import NftsyncError

LAB_DIR = Path(__file__).resolve().parents[2] / "netns-lab"
LAB_SH = LAB_DIR / "lab.sh"
CLIENT_PY = LAB_DIR / "client.py"
STATE_ROOT = Path("/run/nftsync-lab")

VIP4 = "10.10.0.100"
VIP6 = "fd00:10::100"
GW4 = "10.20.0.1"
GW6 = "fd00:20::1"
LB_FRONT4 = {"lb1": "10.10.0.2", "lb2": "10.10.0.3"}
LB_FRONT6 = {"lb1": "fd00:10::2", "lb2": "fd00:10::3"}
LB_BACK4 = {"lb1": "10.20.0.2", "lb2": "10.20.0.3"}
LB_BACK6 = {"lb1": "fd00:20::2", "lb2": "fd00:20::3"}
SYNC4 = {"lb1": "10.30.0.1", "lb2": "10.30.0.2"}
SYNC6 = {"lb1": "fd00:30::1", "lb2": "fd00:30::2"}
HTTP_PORTS = (60, 80, 443, 8080)
UDP_PORTS = (60, 5353)
STREAM_PORT = 7000
MAX_BACKENDS = 8


def backend4(k: int) -> str:
    """Address of backend `bek` (1-based): 10.20.0.(10+k)."""
    return f"10.20.0.{10 + k}"


def backend6(k: int) -> str:
    """IPv6 of backend `bek`: fd00:20::(10+k), the v4 last octet written as the last group."""
    return f"fd00:20::{10 + k}"


def client4(i: int) -> str:
    """Client source address i (1-based): 10.10.1.i."""
    return f"10.10.1.{i}"


def client6(i: int) -> str:
    """IPv6 client source i: fd00:10::1:i (i written in decimal digits, as in the v4 octet)."""
    return f"fd00:10::1:{i}"


BACKENDS4 = {f"be{k}": backend4(k) for k in range(1, MAX_BACKENDS + 1)}
BACKENDS6 = {f"be{k}": backend6(k) for k in range(1, MAX_BACKENDS + 1)}


class LabError(NftsyncError):
    """lab.sh refused or failed (bad parameters, a lab of that name exists, a node is missing)."""


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def lab_sh(prefix: str, *args: str, env: dict[str, str] | None = None,
           timeout: float = 60) -> subprocess.CompletedProcess:
    """Run lab.sh for lab `prefix`; raises LabError with lab.sh's own message when it fails."""
    full_env = {**os.environ, "LAB": prefix, "LAB_PYTHON": sys.executable, **(env or {})}
    p = subprocess.run([str(LAB_SH), *args], env=full_env, text=True, capture_output=True,
                       timeout=timeout, check=False)
    if p.returncode != 0:
        # lab.sh's own diagnosis comes first; "tearing down" follows it on a failed up.
        said = [ln for ln in p.stderr.splitlines() if ln.startswith("lab.sh: ")]
        why = said[0].removeprefix("lab.sh: ") if said else _last_line(p.stderr or p.stdout)
        raise LabError(f"lab.sh {' '.join(args)}: {why}")
    return p


def unique_prefix() -> str:
    """Short and unique, so parallel labs (and parallel test runs) never share a namespace."""
    return "t" + uuid.uuid4().hex[:7]


@dataclass
class StreamHandle:
    """A `client.py stream` running in the background; `result()` waits for its JSON summary."""

    proc: subprocess.Popen
    seconds: float

    def result(self, timeout: float | None = None) -> dict:
        out, err = self.proc.communicate(timeout=timeout if timeout else self.seconds + 15)
        if self.proc.returncode != 0 or not out.strip():
            raise LabError(f"stream failed (rc {self.proc.returncode}): {_last_line(err)}")
        return json.loads(out.strip().splitlines()[-1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@dataclass
class Lab:
    """One running lab. Make it with `Lab.up(...)`; always `down()` it (the fixtures do)."""

    prefix: str
    clients: int = 50
    backends: int = 2
    streams: list[StreamHandle] = field(default_factory=list)

    # --- life cycle ----------------------------------------------------------------------------
    @classmethod
    def up(cls, prefix: str | None = None, clients: int = 50, backends: int = 2) -> Lab:
        prefix = prefix or unique_prefix()
        env = {"LAB_CLIENTS": str(clients), "LAB_BACKENDS": str(backends)}
        try:
            lab_sh(prefix, "up", env=env)
        except subprocess.TimeoutExpired:
            # lab.sh was SIGKILLed, so its own cleanup trap never ran: clean up for it.
            lab_sh(prefix, "down")
            raise LabError(f"lab.sh up for {prefix} timed out; torn down") from None
        return cls(prefix, clients, backends)

    def down(self) -> None:
        """Stop our background streams, then everything of the lab (lab.sh down is idempotent)."""
        for h in self.streams:
            h.kill()
        self.streams.clear()
        lab_sh(self.prefix, "down")
        left = lab_namespaces(self.prefix)
        if left:
            raise LabError(f"lab.sh down left namespaces behind: {' '.join(left)}")

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    # --- names and commands --------------------------------------------------------------------
    @property
    def nodes(self) -> list[str]:
        return ["sw", "client", "lb1", "lb2", *self.backend_names]

    @property
    def backend_names(self) -> list[str]:
        return [f"be{k}" for k in range(1, self.backends + 1)]

    def ns(self, node: str) -> str:
        """Full namespace name of a node (`lb1` -> `<prefix>-lb1`)."""
        if node not in self.nodes:
            nodes = ", ".join(self.nodes)
            raise LabError(f"no node {node!r} in lab {self.prefix} (nodes: {nodes})")
        return f"{self.prefix}-{node}"

    def exec(self, node: str, *cmd: str, check: bool = True, timeout: float = 60,
             input: str | None = None) -> subprocess.CompletedProcess:
        """Run a command inside a node; with check, a failure raises with the command's stderr."""
        p = subprocess.run(["ip", "netns", "exec", self.ns(node), *cmd], text=True,
                           capture_output=True, timeout=timeout, input=input, check=False)
        if check and p.returncode != 0:
            raise LabError(f"{node}: {' '.join(cmd)} (rc {p.returncode}): "
                           f"{_last_line(p.stderr or p.stdout)}")
        return p

    def nft(self, node: str, *args: str, input: str | None = None) -> str:
        """`nft ARGS` inside a node (with `input`, e.g. `nft("lb1", "-f", "-", input=ruleset)`)."""
        return self.exec(node, "nft", *args, input=input).stdout

    def nft_json(self, node: str, *args: str) -> list:
        """`nft -j ARGS` inside a node: the list under "nftables" (metainfo included)."""
        out = self.nft(node, "-j", *args)
        return json.loads(out)["nftables"] if out.strip() else []

    def python(self, node: str, script: Path, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.exec(node, sys.executable, str(script), *args, **kw)

    # --- traffic -------------------------------------------------------------------------------
    def request_raw(self, port: int = 80, sources: str | list[str] | None = None, repeat: int = 1,
                    proto: str = "tcp", vip: str = VIP4, timeout: float = 2.0,
                    parallel: int = 16, node: str = "client",
                    max_seconds: float = 120.0) -> tuple[list[dict], dict]:
        """Every request's record ({"src", "backend", "error"}) and the summary.

        `node` other than the client (e.g. lb1 with its back address as source, a backend as
        `vip`) reaches the servers without NAT in the path.
        """
        if sources is None:
            sources = [client6(i) if ":" in vip else client4(i) for i in range(1, self.clients + 1)]
        spec = sources if isinstance(sources, str) else ",".join(sources)
        n = max(1, len(spec.split(","))) * repeat
        budget = min(max_seconds, timeout * (n / parallel + 2)) + timeout + 15
        p = self.python(node, CLIENT_PY, "request", "--vip", vip, "--port", str(port),
                        "--proto", proto, "--sources", spec, "--repeat", str(repeat),
                        "--timeout", str(timeout), "--parallel", str(parallel),
                        "--max-seconds", str(max_seconds), timeout=budget)
        records = [json.loads(ln) for ln in p.stdout.splitlines() if ln.strip()]
        summary = records.pop()["summary"]
        return records, summary

    def request(self, port: int = 80, sources: str | list[str] | None = None, repeat: int = 1,
                proto: str = "tcp", vip: str = VIP4, timeout: float = 2.0,
                parallel: int = 16) -> dict[str, list[str | None]]:
        """Source address -> the backend of each of its requests (None for a failed one).

        Default sources: every client address of the VIP's family.
        """
        records, _ = self.request_raw(port, sources, repeat, proto, vip, timeout, parallel)
        out: dict[str, list[str | None]] = {}
        for r in records:
            out.setdefault(r["src"], []).append(r["backend"])
        return out

    def stream(self, source: str = "10.10.1.1", seconds: float = 2.0, vip: str = VIP4,
               port: int = STREAM_PORT) -> StreamHandle:
        """Start one long-lived stream connection in the background."""
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns("client"), sys.executable, str(CLIENT_PY), "stream",
             "--vip", vip, "--port", str(port), "--source", source, "--seconds", str(seconds)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        h = StreamHandle(proc, seconds)
        self.streams.append(h)
        return h

    def ping(self, node: str, dst: str, count: int = 1, timeout: float = 1.0) -> bool:
        """True when `dst` answered an ICMP echo from `node` (client.py ping; no iputils needed)."""
        p = self.python(node, CLIENT_PY, "ping", dst, "--count", str(count),
                        "--timeout", str(timeout), check=False, timeout=count * timeout + 10)
        if p.returncode not in (0, 1):
            raise LabError(f"ping from {node}: {_last_line(p.stderr)}")
        return p.returncode == 0

    # --- failover knobs ------------------------------------------------------------------------
    def move_vip(self, node: str) -> None:
        """Move VIP + backends' gateway to `lb1`/`lb2`, or remove them (`none`)."""
        lab_sh(self.prefix, "vip", node)

    def cut_sync(self) -> None:
        lab_sh(self.prefix, "link", "sync", "down")

    def restore_sync(self) -> None:
        lab_sh(self.prefix, "link", "sync", "up")

    def reset(self) -> None:
        """Back to the state right after `up`: lb1 active, sync link up, no ruleset and no
        conntrack entries on either LB. For tests that share the module's lab."""
        if self.active() != "lb1":
            self.move_vip("lb1")
        self.restore_sync()
        for node in ("lb1", "lb2"):
            self.nft(node, "flush", "ruleset")
            self.exec(node, "conntrack", "-F")

    @property
    def state_dir(self) -> Path:
        """The lab's state directory (/run/nftsync-lab/PREFIX): pids, logs, ha/, daemon sockets."""
        return STATE_ROOT / self.prefix

    def status(self) -> str:
        return lab_sh(self.prefix, "status").stdout

    def active(self) -> str:
        return (STATE_ROOT / self.prefix / "active").read_text().strip()

    def recorded_pids(self) -> list[int]:
        path = STATE_ROOT / self.prefix / "pids"
        return [int(ln.split()[0]) for ln in path.read_text().splitlines() if ln.strip()]


def lab_namespaces(prefix: str) -> list[str]:
    """Namespaces of lab `prefix` that exist now."""
    out = subprocess.run(["ip", "netns", "list"], text=True, capture_output=True,
                         check=True).stdout
    names = [ln.split()[0] for ln in out.splitlines() if ln.strip()]
    return [n for n in names if n.startswith(f"{prefix}-")]
