"""Run `nftsync daemon` in lab namespaces for tests: start, query via `nftsync ctl`, stop."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from helpers import nftsync, reset_node
from lab import Lab

SYNC4 = {"lb1": "10.30.0.1", "lb2": "10.30.0.2"}


def make_key(directory: Path, name: str = "key") -> Path:
    path = directory / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32) + "\n")
    return path


class DaemonProc:
    """One daemon in one namespace; its log goes to a file next to its control socket.
    A test module with a lab of its own sets its own `port` and `cluster` in a subclass."""

    port = 7777
    cluster = "lab"
    start_timeout = 15.0

    def __init__(self, netns: str, name: str, node_id: int, listen: str, peers: list[str],
                 key: Path, workdir: Path, role: str = "backup", extra: tuple[str, ...] = (),
                 env: dict[str, str] | None = None):
        self.netns, self.name, self.node_id = netns, name, node_id
        self.env = env  # the daemon's environment (None: the test's), e.g. NOTIFY_SOCKET
        self.listen, self.peers, self.key, self.role = listen, peers, key, role
        self.socket = workdir / f"{name}.sock"
        self.log = workdir / f"{name}.log"
        self.extra = extra
        self.proc: subprocess.Popen | None = None

    def start(self) -> DaemonProc:
        cmd = ["ip", "netns", "exec", self.netns, sys.executable, "-m", "nftsync", "daemon",
               "--listen", f"{self.listen}:{self.port}", "--key-file", str(self.key),
               "--socket", str(self.socket), "--node-name", self.name,
               "--node-id", str(self.node_id), "--cluster", self.cluster, "--role", self.role,
               *[a for p in self.peers for a in ("--peer", f"{p}:{self.port}")], *self.extra]
        logf = open(self.log, "a")  # noqa: SIM115 - owned by the child for its lifetime
        self.proc = subprocess.Popen(cmd, stdout=logf, stderr=logf, stdin=subprocess.DEVNULL,
                                     env=self.env)
        logf.close()
        # Not just "the socket file exists": after a crash a stale one is left behind.
        self.wait(self._answers, self.start_timeout,
                  "the control socket to answer for this process")
        return self

    def _answers(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            status = self.ctl("status")
        except (AssertionError, ValueError):
            return False
        return isinstance(status, dict) and status.get("pid") == self.proc.pid

    def ctl(self, *args: str, check: bool = True) -> dict | list:
        p = subprocess.run([sys.executable, "-m", "nftsync", "ctl", "--socket", str(self.socket),
                            *args, "--json"], capture_output=True, text=True, timeout=30)
        # `ctl status` exits with the health (0 ok, 1 degraded, 2 failing); others 0 on success.
        if check and (p.returncode not in (0, 1, 2) or not p.stdout.strip()):
            raise AssertionError(f"ctl {args}: rc {p.returncode}: {p.stderr}")
        return json.loads(p.stdout)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def synced(self) -> bool:
        """Past `starting` and `syncing`: every connected peer's snapshot is in its kernel."""
        return self.ctl("status")["health"] not in ("starting", "syncing")

    def peers_up(self) -> int:
        return sum(p["state"] == "up" for p in self.ctl("peers"))

    def wait(self, cond, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"daemon {self.name} exited ({self.proc.returncode}); "
                                     f"log:\n{self.log.read_text()[-3000:]}")
            if cond():
                return
            time.sleep(0.1)
        raise AssertionError(f"daemon {self.name}: timed out waiting for {what}; log:\n"
                             f"{self.log.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        rc = self.proc.returncode
        self.proc = None
        return rc


def wait_for(cond, timeout: float, what: str, interval: float = 0.1):
    """Poll `cond` until it returns something truthy (bounded); return that value."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


@contextlib.contextmanager
def daemon_pair(lab: Lab, workdir: Path, farm_file: Path,
                connect_timeout: float = 30.0) -> Iterator[dict[str, DaemonProc]]:
    """Both load balancers of `lab` with `farm_file` applied and a daemon each (lb1 active,
    lb2 backup), connected; afterwards the daemons are stopped by pid, the sync link restored and
    both nodes reset, whatever happened."""
    key = make_key(workdir)
    lab.move_vip("lb1")
    for node in ("lb1", "lb2"):
        reset_node(lab, node)
        nftsync(lab, node, "apply", str(farm_file))
    d1 = DaemonProc(lab.ns("lb1"), "lb1", 1, SYNC4["lb1"], [SYNC4["lb2"]], key, workdir,
                    role="active")
    d2 = DaemonProc(lab.ns("lb2"), "lb2", 2, SYNC4["lb2"], [SYNC4["lb1"]], key, workdir)
    daemons = {"lb1": d1, "lb2": d2}
    try:
        d1.start()
        d2.start()
        d1.wait(lambda: d1.peers_up() >= 1, connect_timeout, "lb2 connected")
        d2.wait(lambda: d2.peers_up() >= 1, connect_timeout, "lb1 connected")
        for d in daemons.values():  # each has the other's snapshot in its kernel
            d.wait(d.synced, connect_timeout, "the peer's snapshot applied")
        yield daemons
    finally:
        for d in daemons.values():
            d.stop()
        lab.restore_sync()
        for node in ("lb1", "lb2"):
            reset_node(lab, node)
