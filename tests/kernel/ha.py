"""Python handle on keepalived in the netns lab (netns-lab/ha.sh): start/stop/kill a load balancer,
see who holds the VIP, read what the notify script did.

Everything goes through ha.sh, so a test exercises exactly what a person runs by hand; this module
only adds what a test needs on top: polling the kernel for the VIP owner with a bounded wait,
timing a move, and parsing the per-node logs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from lab import GW4, LAB_DIR, STATE_ROOT, VIP4, Lab, LabError

HA_SH = LAB_DIR / "ha.sh"
NODES = ("lb1", "lb2")
DEFAULT_ADVERT_INT = 0.1
NOTIFY_RE = re.compile(
    r"^(?P<ts>\S+) nftsync-notify\[(?P<pid>\d+)\]: (?:error: )?"
    r"(?P<type>INSTANCE|GROUP) (?P<name>\S+) (?P<state>[A-Z]+) (?P<prio>\d+)"
    r"(?: -> (?P<action>promote|demote): (?P<outcome>.*))?"
)


class HaError(LabError):
    """ha.sh refused or failed (keepalived would not start, a node did not take the VIP...)."""


@dataclass(frozen=True, slots=True)
class NotifyCall:
    """One line of a node's notify log: what keepalived reported and what the script did."""

    state: str
    priority: int
    action: str | None
    outcome: str


@dataclass
class Ha:
    """keepalived on both load balancers of `lab`. Always `down()` it (or let the lab go down)."""

    lab: Lab
    advert_int: float = DEFAULT_ADVERT_INT
    env: dict[str, str] = field(default_factory=dict)
    # notify-log lines of earlier runs in the same lab, skipped by notify_calls()
    _notify_seen: dict[str, int] = field(default_factory=dict)

    # --- ha.sh ---------------------------------------------------------------------------------
    def _env(self) -> dict[str, str]:
        return {**os.environ, "LAB": self.lab.prefix, "LAB_PYTHON": sys.executable,
                "HA_ADVERT_INT": f"{self.advert_int:g}", **self.env}

    def sh(self, *args: str, timeout: float = 30) -> str:
        """Run ha.sh; its stdout, or HaError with ha.sh's own message."""
        p = subprocess.run([str(HA_SH), *args], env=self._env(), text=True, capture_output=True,
                           timeout=timeout, check=False)
        if p.returncode != 0:
            said = [ln for ln in p.stderr.splitlines() if ln.startswith("ha.sh: ")]
            why = said[-1].removeprefix("ha.sh: ") if said else (p.stderr or p.stdout).strip()
            raise HaError(f"ha.sh {' '.join(args)}: {why}")
        return p.stdout

    def popen(self, *args: str) -> subprocess.Popen:
        """ha.sh in the background (e.g. a stop that we time while it runs)."""
        return subprocess.Popen([str(HA_SH), *args], env=self._env(), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL)

    def up(self) -> None:
        """Start both nodes; notify_calls() from now on shows only this run's calls."""
        self._notify_seen = {n: len(self.notify_calls(n, everything=True)) for n in NODES}
        self.sh("up")

    def down(self) -> None:
        self.sh("down")

    def start(self, node: str) -> None:
        self.sh("start", node)

    def stop(self, node: str) -> None:
        self.sh("stop", node)

    def kill(self, node: str) -> None:
        self.sh("kill", node)

    def __enter__(self) -> Ha:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    # --- kernel state --------------------------------------------------------------------------
    def addresses(self, node: str, dev: str) -> set[str]:
        """Addresses on `dev` of `node`, straight from the kernel (`ip -j addr`)."""
        p = self.lab.exec(node, "ip", "-j", "addr", "show", "dev", dev, check=False, timeout=10)
        if p.returncode != 0:
            return set()
        return {a["local"] for link in json.loads(p.stdout or "[]")
                for a in link.get("addr_info", [])}

    def holders(self, addr: str = VIP4, dev: str = "front") -> list[str]:
        """The load balancers that hold `addr` now (one in a healthy cluster)."""
        return [n for n in NODES if addr in self.addresses(n, dev)]

    def owner(self) -> str | None:
        """The node holding both the VIP and the backends' gateway; None when there is no single
        such node."""
        front, back = self.holders(VIP4, "front"), self.holders(GW4, "back")
        return front[0] if len(front) == 1 and front == back else None

    def wait_owner(self, node: str, timeout: float = 5.0, since: float | None = None) -> float:
        """Wait (bounded) until `node` alone holds the VIP; seconds since `since` (default: now)."""
        t0 = time.monotonic() if since is None else since
        deadline = time.monotonic() + timeout
        while True:
            if self.owner() == node:
                return time.monotonic() - t0
            if time.monotonic() > deadline:
                raise HaError(f"{node} does not hold the VIP after {timeout} s "
                              f"(front: {self.holders()}, back: {self.holders(GW4, 'back')})")
            time.sleep(0.005)

    def timed_move(self, how: str, node: str, timeout: float = 5.0) -> float:
        """`stop` or `kill` the node holding the VIP; seconds until its peer holds the VIP,
        measured from just before ha.sh is started (so it includes a few ms of bash start-up)."""
        if how not in ("stop", "kill"):
            raise ValueError(f"how must be stop or kill, not {how!r}")
        peer = "lb2" if node == "lb1" else "lb1"
        t0 = time.monotonic()
        proc = self.popen(how, node)
        try:
            took = self.wait_owner(peer, timeout, since=t0)
        finally:
            out, err = proc.communicate(timeout=30)
        if proc.returncode != 0:
            raise HaError(f"ha.sh {how} {node}: {err.strip() or out.strip()}")
        return took

    # --- processes and logs --------------------------------------------------------------------
    @property
    def state_dir(self) -> Path:
        return STATE_ROOT / self.lab.prefix / "ha"

    def keepalived_pid(self, node: str) -> int | None:
        """The keepalived parent ha.sh recorded for `node`, if that process still runs."""
        try:
            pid_s, start = (self.state_dir / f"{node}.keepalived").read_text().split()
        except (FileNotFoundError, ValueError):
            return None
        return int(pid_s) if proc_starttime(int(pid_s)) == start else None

    def recorded_pids(self) -> list[tuple[int, str]]:
        """(pid, start time) of every keepalived ha.sh started, running or not."""
        out = []
        for node in NODES:
            f = self.state_dir / f"{node}.keepalived"
            if f.exists():
                pid_s, start = f.read_text().split()
                out.append((int(pid_s), start))
        return out

    def conf(self, node: str) -> str:
        """The keepalived configuration ha.sh generated for `node` from the shipped recipe."""
        return (self.state_dir / f"{node}.conf").read_text()

    def state(self, node: str) -> str:
        """keepalived's own last word on its state ("MASTER", "BACKUP", "FAULT", "unknown")."""
        try:
            text = (self.state_dir / f"{node}.log").read_text(errors="replace")
        except FileNotFoundError:
            return "unknown"
        found = re.findall(r"Entering ([A-Z]+) STATE", text)
        return found[-1] if found else "unknown"

    def notify_calls(self, node: str, everything: bool = False) -> list[NotifyCall]:
        """The calls of the notify script on `node` since `up()` (or `everything` ever logged), in
        order, from its log in the state dir."""
        try:
            text = (self.state_dir / f"{node}.notify.log").read_text(errors="replace")
        except FileNotFoundError:
            return []
        calls = []
        for line in text.splitlines():
            m = NOTIFY_RE.match(line)
            if m:
                calls.append(NotifyCall(m["state"], int(m["prio"]), m["action"],
                                        m["outcome"] or ""))
        return calls if everything else calls[self._notify_seen.get(node, 0):]

    def wait_notified(self, node: str, state: str, count: int = 1, timeout: float = 5.0) -> None:
        """Wait (bounded) until `node`'s notify script has run `count` times for `state`: it runs
        asynchronously after keepalived's transition."""
        deadline = time.monotonic() + timeout
        while sum(c.state == state for c in self.notify_calls(node)) < count:
            if time.monotonic() > deadline:
                raise HaError(f"{node}: notify not called {count}x with {state} after {timeout} s; "
                              f"calls: {self.notify_calls(node)}")
            time.sleep(0.02)


def proc_starttime(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (None for a gone or zombie process), as lab.sh and ha.sh do."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat.rpartition(")")[2].split()
    return None if fields[0] == "Z" else fields[19]


def keepalived_in(namespaces: list[str]) -> list[int]:
    """Pids of live keepalived processes inside the given namespaces (by `ip netns pids`)."""
    out = []
    for ns in namespaces:
        p = subprocess.run(["ip", "netns", "pids", ns], text=True, capture_output=True,
                           check=False)
        for pid in p.stdout.split():
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except FileNotFoundError:
                continue
            if comm == "keepalived" and proc_starttime(int(pid)) is not None:
                out.append(int(pid))
    return out
