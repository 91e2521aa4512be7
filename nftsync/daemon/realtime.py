"""Real-time scheduling of the event loop (`realtime_priority`; docs/daemon.md, "Real-time
scheduling"): SCHED_RR for the loop's thread only, bounded by RLIMIT_RTTIME, off by default."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import signal
import time
from typing import Any

from nftsync.errors import NftsyncError

log = logging.getLogger("nftsync.daemon")


#: CPU time the real-time event loop may use without blocking (RLIMIT_RTTIME) before it is
#: dropped to SCHED_OTHER: dozens of loop ticks, far below VRRP's timers (adverts every second).
RT_BUDGET = 0.1
#: How long it stays SCHED_OTHER after that. A burst that keeps the loop busy for longer (a
#: resync, a dump of a big table at start) thus holds a CPU at most RT_BUDGET every RT_COOLDOWN.
RT_COOLDOWN = 10.0
_RT_POLICY = os.SCHED_RR | os.SCHED_RESET_ON_FORK
_CAP_SYS_NICE = 23


class SchedulingError(NftsyncError):
    """realtime_priority is set, and the kernel refuses real-time scheduling to the daemon."""


class RealtimeScheduling:
    """SCHED_RR at `priority` for the calling thread (the event loop's), bounded.

    Only that thread is real-time. SCHED_RESET_ON_FORK makes every thread started after it (the
    kernel writers, the resolver) SCHED_OTHER, so the daemon never holds more than one CPU at
    real-time priority; the loop is the one that must wake up at once to drain the conntrack and
    nftables event sockets before they overrun, which is what conntrackd's SCHED_RR is for too.

    The bound is RLIMIT_RTTIME: once the thread has used `budget` seconds of CPU without blocking,
    the kernel sends SIGXCPU. The handler drops the thread to SCHED_OTHER on the spot (so the
    softirq threads, kworkers and keepalived sharing its CPU run again); `cooldown` seconds later
    a timer of the event loop makes it real-time again. Without the handler, the kernel's only
    net would be the fair server (RT throttling before 6.12): 5 % of each CPU per second.
    """

    def __init__(self, priority: int, config_file: str | None, budget: float = RT_BUDGET,
                 cooldown: float = RT_COOLDOWN, check_every: float = 1.0) -> None:
        self.priority = priority
        self.where = f"{config_file}: realtime_priority" if config_file else "realtime_priority"
        self.budget, self.cooldown, self.check_every = budget, cooldown, check_every
        self.realtime = False
        self.demotions = 0
        self._demoted_at = 0.0
        self._reported = 0
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Switch the calling thread to SCHED_RR; SchedulingError says why the kernel refused."""
        # The handler first: SIGXCPU's default action kills the process.
        signal.signal(signal.SIGXCPU, self._overrun)
        try:
            self._set_budget()
            os.sched_setscheduler(0, _RT_POLICY, os.sched_param(self.priority))
        except OSError as exc:
            signal.signal(signal.SIGXCPU, signal.SIG_DFL)
            raise SchedulingError(self._refusal(exc)) from None
        self.realtime = True
        log.info("event loop scheduled SCHED_RR priority %d (threads started later: SCHED_OTHER);"
                 " it drops to SCHED_OTHER for %g s whenever it runs %d ms without blocking",
                 self.priority, self.cooldown, round(self.budget * 1000))

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Report demotions and undo them after the cooldown, from timers of `loop`."""
        self._timer = loop.call_later(self.check_every, self._check, loop)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _set_budget(self) -> None:
        """RLIMIT_RTTIME's soft limit (the kernel raises it by 1 s at each SIGXCPU: set it again
        after each promotion). A hard limit sends SIGKILL: keep ours below one set from outside
        (systemd's LimitRTTIME=), so that the handler gets to act first."""
        hard = resource.getrlimit(resource.RLIMIT_RTTIME)[1]
        soft = max(1, round(self.budget * 1_000_000))
        if hard != resource.RLIM_INFINITY and soft >= hard:
            soft = max(1, hard // 2)
        resource.setrlimit(resource.RLIMIT_RTTIME, (soft, hard))

    def _overrun(self, signum: int, frame: Any) -> None:
        """SIGXCPU (Python runs it in the main thread, the loop's): only a system call here."""
        if not self.realtime:
            return
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        self.realtime = False
        self._demoted_at = time.monotonic()
        self.demotions += 1

    def _check(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = loop.call_later(self.check_every, self._check, loop)
        if self.realtime:
            return
        if self._reported < self.demotions:
            self._reported = self.demotions
            log.warning("the event loop ran %d ms without blocking at SCHED_RR priority %d: "
                        "SCHED_OTHER for the next %g s, so that what shares its CPU runs "
                        "(%d time(s) since start)", round(self.budget * 1000), self.priority,
                        self.cooldown, self.demotions)
        if time.monotonic() - self._demoted_at >= self.cooldown:
            self._promote()

    def _promote(self) -> None:
        try:
            os.sched_setscheduler(0, _RT_POLICY, os.sched_param(self.priority))
        except OSError as exc:
            log.error("cannot return the event loop to SCHED_RR priority %d (%s): it stays "
                      "SCHED_OTHER, next try in %g s", self.priority, exc.strerror, self.cooldown)
            self._demoted_at = time.monotonic()
            return
        self.realtime = True
        # The kernel's count towards RLIMIT_RTTIME restarts when a real-time thread wakes up, not
        # when it becomes real-time: without one sleep the count left from before the demotion
        # (over the budget) would fire at the next tick. The soft limit, raised by the kernel at
        # the SIGXCPU, is safe until it is lowered again after the sleep.
        time.sleep(0.001)
        try:
            self._set_budget()
        except OSError as exc:  # not expected: lowering a soft limit is always allowed
            log.error("cannot set RLIMIT_RTTIME again (%s)", exc.strerror)
        log.info("event loop back to SCHED_RR priority %d", self.priority)

    def _refusal(self, exc: OSError) -> str:
        what = (f"{self.where}: the kernel refuses SCHED_RR priority {self.priority} "
                f"({exc.strerror})")
        if exc.errno != errno.EPERM:
            return what
        rtprio = resource.getrlimit(resource.RLIMIT_RTPRIO)[0]
        if _has_cap_sys_nice() or rtprio == resource.RLIM_INFINITY or rtprio >= self.priority:
            why = ("the process may use it, so a seccomp filter (systemd's RestrictRealtime=yes) "
                   "or its cgroup (no cpu.rt_runtime_us, with CONFIG_RT_GROUP_SCHED) forbids it")
        else:
            why = (f"the process has neither CAP_SYS_NICE nor an RLIMIT_RTPRIO of at least "
                   f"{self.priority} (it has {rtprio})")
        return (f"{what}: {why}; under systemd, allow it with a drop-in setting "
                f"RestrictRealtime=no and LimitRTPRIO={self.priority} (docs/daemon.md, "
                "\"Real-time scheduling\"), or remove the key")


def _has_cap_sys_nice() -> bool:
    """Whether the process holds CAP_SYS_NICE (only to word the refusal; unknown: no)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_SYS_NICE & 1)
    except (OSError, ValueError, IndexError):
        return False
    return False
