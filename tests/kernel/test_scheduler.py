"""`realtime_priority`: the daemon's event loop runs SCHED_RR at that priority, only it, bounded by
RLIMIT_RTTIME; without the key it runs SCHED_OTHER; a kernel refusal stops the start with one line.

The daemons run in namespaces of their own (nothing to replicate: only the process is looked at);
the bound is checked on RealtimeScheduling itself, in a child process, with a short budget.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import netns
import pytest
from daemons import make_key, wait_for

NFTSYNC = [sys.executable, "-m", "nftsync"]
# What contrib/systemd/nftsync.service leaves the daemon (CapabilityBoundingSet=CAP_NET_ADMIN,
# NoNewPrivileges=yes), as in test_control.py.
CONFINE = ["setpriv", "--bounding-set=-all,+net_admin", "--inh-caps=-all", "--no-new-privs"]
PRIORITY = 7


def write_config(tmp_path: Path, name: str, extra: str = "") -> Path:
    key = tmp_path / "key" if (tmp_path / "key").exists() else make_key(tmp_path)
    conf = tmp_path / f"{name}.toml"
    conf.write_text(f'node_name = "{name}"\ncluster = "rt"\nlisten = "127.0.0.1:7791"\n'
                    f'key_file = "{key}"\nsocket = "{tmp_path}/{name}.sock"\n{extra}')
    return conf


def ctl_pid(sock: str) -> int | None:
    p = subprocess.run([*NFTSYNC, "ctl", "--socket", sock, "status", "--json"],
                       capture_output=True, text=True, timeout=30)
    try:
        return json.loads(p.stdout).get("pid")
    except ValueError:
        return None


class Daemon:
    """`nftsync daemon --config FILE` in namespace `ns`, after `wrap` (setpriv, prlimit)."""

    def __init__(self, ns: str, conf: Path, wrap: tuple[str, ...] = ()) -> None:
        self.log = conf.with_suffix(".log")
        self.sock = str(conf.with_suffix(".sock"))
        with open(self.log, "w") as logf:
            self.proc = subprocess.Popen(["ip", "netns", "exec", ns, *wrap, *NFTSYNC, "daemon",
                                          "--config", str(conf)],
                                         stdout=logf, stderr=logf, stdin=subprocess.DEVNULL)

    def wait_up(self) -> int:
        def answers() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited ({self.proc.returncode}):\n"
                                     f"{self.log.read_text()[-2000:]}")
            return ctl_pid(self.sock) == self.proc.pid
        wait_for(answers, 20, "the daemon's control socket")
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture
def rt_ns():
    name = netns.create("nsrt")
    try:
        yield name
    finally:
        netns.delete(name)


def policy(tid: int) -> int:
    return os.sched_getscheduler(tid) & ~os.SCHED_RESET_ON_FORK


def rttime_limit(pid: int) -> str:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max realtime timeout"):
            return " ".join(line.split()[3:5])
    raise AssertionError("no RLIMIT_RTTIME line")


def test_event_loop_runs_sched_rr_only_with_the_key(tmp_path: Path, rt_ns: str) -> None:
    rt = Daemon(rt_ns, write_config(tmp_path, "rt", f"realtime_priority = {PRIORITY}\n"))
    try:
        pid = rt.wait_up()
        raw = os.sched_getscheduler(pid)
        assert raw & ~os.SCHED_RESET_ON_FORK == os.SCHED_RR
        assert raw & os.SCHED_RESET_ON_FORK, "threads started later must not inherit SCHED_RR"
        assert os.sched_getparam(pid).sched_priority == PRIORITY
        assert rttime_limit(pid) == "100000 unlimited"  # RT_BUDGET, in microseconds
        # Only the event loop's thread: every other thread of the process is SCHED_OTHER.
        # (The kernel writer threads, started after the switch.)
        others = [int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid]
        assert others, "the daemon has no other thread: this check would prove nothing"
        assert all(policy(t) == os.SCHED_OTHER for t in others), others
        assert "event loop scheduled SCHED_RR priority 7" in rt.log.read_text()
    finally:
        rt.stop()
    assert rt.proc.returncode == 0

    plain = Daemon(rt_ns, write_config(tmp_path, "plain"))
    try:
        pid = plain.wait_up()
        assert os.sched_getscheduler(pid) == os.SCHED_OTHER
        assert os.sched_getparam(pid).sched_priority == 0
        assert rttime_limit(pid) == "unlimited unlimited"
    finally:
        plain.stop()


def test_refused_without_privilege_is_one_line_at_start(tmp_path: Path, rt_ns: str) -> None:
    """Confined as the shipped unit confines it (no CAP_SYS_NICE, RLIMIT_RTPRIO 0), the daemon
    does not start, and says why in one line."""
    conf = write_config(tmp_path, "conf", f"realtime_priority = {PRIORITY}\n")
    d = Daemon(rt_ns, conf, tuple(CONFINE))
    assert d.proc.wait(timeout=30) == 1
    err = d.log.read_text()
    assert err.count("\n") == 1, err
    assert err == (f"nftsync: error: {conf}: realtime_priority: the kernel refuses SCHED_RR "
                   f"priority {PRIORITY} (Operation not permitted): the process has neither "
                   f"CAP_SYS_NICE nor an RLIMIT_RTPRIO of at least {PRIORITY} (it has 0); under "
                   f"systemd, allow it with a drop-in setting RestrictRealtime=no and "
                   f"LimitRTPRIO={PRIORITY} (docs/daemon.md, \"Real-time scheduling\"), or "
                   "remove the key\n")


def _can_raise_rtprio() -> bool:
    return subprocess.run(["prlimit", f"--rtprio={PRIORITY}:{PRIORITY}", "true"],
                          capture_output=True).returncode == 0


def test_rlimit_rtprio_alone_is_enough(tmp_path: Path, rt_ns: str) -> None:
    """What the documented drop-in gives (LimitRTPRIO=, no CAP_SYS_NICE): the daemon runs
    SCHED_RR. Raising the limit needs CAP_SYS_RESOURCE, which systemd has."""
    if not _can_raise_rtprio():
        pytest.skip("this runner cannot raise RLIMIT_RTPRIO (no CAP_SYS_RESOURCE)")
    conf = write_config(tmp_path, "conf", f"realtime_priority = {PRIORITY}\n")
    d = Daemon(rt_ns, conf, ("prlimit", f"--rtprio={PRIORITY}:{PRIORITY}", *CONFINE))
    try:
        pid = d.wait_up()
        assert policy(pid) == os.SCHED_RR and os.sched_getparam(pid).sched_priority == PRIORITY
    finally:
        d.stop()


BOUND = textwrap.dedent("""
    import asyncio, json, logging, os, time
    from nftsync.daemon.realtime import RealtimeScheduling

    logging.basicConfig(level=logging.INFO)

    def busy(seconds):  # Python that never blocks: what RLIMIT_RTTIME is there for
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            pass

    def state():
        return [os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK,
                os.sched_getparam(0).sched_priority]

    async def main():
        rt = RealtimeScheduling(5, None, budget=0.05, cooldown=0.6, check_every=0.05)
        rt.start()
        rt.attach(asyncio.get_running_loop())
        out = {"start": state()}
        busy(0.3)
        out["after_busy"], out["demotions"] = state(), rt.demotions
        await asyncio.sleep(0.1)
        out["cooling"] = state()
        await asyncio.sleep(0.7)
        out["after_cooldown"] = state()
        for _ in range(20):  # 0.4 s of work in 20 ms slices that block in between: no demotion
            busy(0.02)
            await asyncio.sleep(0.002)
        out["sliced"], out["demotions_after_sliced"] = state(), rt.demotions
        busy(0.3)  # and a second overrun is caught like the first
        out["second"], out["demotions_end"] = state(), rt.demotions
        rt.close()
        print(json.dumps(out))

    asyncio.run(main())
""")


def test_overrun_drops_to_sched_other_then_back_after_cooldown(tmp_path: Path) -> None:
    root = Path(__file__).parents[2]
    p = subprocess.run([sys.executable, "-c", BOUND], capture_output=True, text=True,
                       timeout=60, cwd=root)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    rr, other = [os.SCHED_RR, 5], [os.SCHED_OTHER, 0]
    assert out["start"] == rr
    assert out["after_busy"] == other and out["demotions"] == 1
    assert out["cooling"] == other
    assert out["after_cooldown"] == rr
    assert out["sliced"] == rr and out["demotions_after_sliced"] == 1
    assert out["second"] == other and out["demotions_end"] == 2
    assert "the event loop ran 50 ms without blocking at SCHED_RR priority 5" in p.stderr
    assert "event loop back to SCHED_RR priority 5" in p.stderr
