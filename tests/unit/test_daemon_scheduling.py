"""RealtimeScheduling (realtime_priority) without the kernel: the system calls are faked, so this
checks what the daemon decides and says. The kernel's side (SCHED_RR really set, RLIMIT_RTTIME
really firing): tests/kernel/test_scheduler.py."""

from __future__ import annotations

import errno
import logging
import os
import resource
import signal

import pytest

from nftsync.daemon import realtime
from nftsync.daemon.realtime import RealtimeScheduling, SchedulingError

INF = resource.RLIM_INFINITY


class FakeKernel:
    """os.sched_setscheduler, resource.{get,set}rlimit and the clock, recorded."""

    def __init__(self, monkeypatch, refuse: int | None = None, rtprio: int = 0,
                 rttime_hard: int = INF) -> None:
        self.calls: list[tuple[int, int]] = []
        self.rlimits = {resource.RLIMIT_RTTIME: (INF, rttime_hard),
                        resource.RLIMIT_RTPRIO: (rtprio, rtprio)}
        self.refuse, self.now = refuse, 1000.0
        monkeypatch.setattr(realtime.os, "sched_setscheduler", self.setscheduler)
        monkeypatch.setattr(realtime.resource, "getrlimit", lambda r: self.rlimits[r])
        monkeypatch.setattr(realtime.resource, "setrlimit", self.setrlimit)
        monkeypatch.setattr(realtime.time, "monotonic", lambda: self.now)
        monkeypatch.setattr(realtime.time, "sleep", lambda s: None)
        monkeypatch.setattr(realtime, "_has_cap_sys_nice", lambda: False)
        monkeypatch.setattr(realtime.signal, "signal", self.handler)
        self.handlers: dict[int, object] = {}

    def setscheduler(self, pid: int, policy: int, param: os.sched_param) -> None:
        if self.refuse is not None and policy != os.SCHED_OTHER:
            raise OSError(self.refuse, os.strerror(self.refuse))
        self.calls.append((policy, param.sched_priority))

    def setrlimit(self, res: int, limits: tuple[int, int]) -> None:
        self.rlimits[res] = limits

    def handler(self, signum: int, handler: object) -> None:
        self.handlers[signum] = handler


class FakeLoop:
    def __init__(self) -> None:
        self.timers: list[tuple[float, object]] = []

    def call_later(self, delay: float, callback, *args):
        self.timers.append((delay, lambda: callback(*args)))
        return type("Timer", (), {"cancel": lambda self: None})()

    def fire(self) -> None:
        _, run = self.timers.pop(0)
        run()


RR = os.SCHED_RR | os.SCHED_RESET_ON_FORK


def test_start_sets_rr_with_reset_on_fork_and_the_budget(monkeypatch) -> None:
    k = FakeKernel(monkeypatch)
    rt = RealtimeScheduling(10, "/etc/nftsync/nftsync.toml")
    rt.start()
    assert k.calls == [(RR, 10)]
    assert k.rlimits[resource.RLIMIT_RTTIME] == (100_000, INF)
    assert k.handlers[signal.SIGXCPU] == rt._overrun  # before the limit: SIGXCPU would kill


def test_a_hard_rttime_limit_from_outside_stays_above_ours(monkeypatch) -> None:
    k = FakeKernel(monkeypatch, rttime_hard=80_000)
    RealtimeScheduling(10, None).start()
    assert k.rlimits[resource.RLIMIT_RTTIME] == (40_000, 80_000)


def test_refusal_without_privilege_says_what_is_missing(monkeypatch) -> None:
    k = FakeKernel(monkeypatch, refuse=errno.EPERM, rtprio=5)
    with pytest.raises(SchedulingError) as info:
        RealtimeScheduling(10, "/etc/nftsync/nftsync.toml").start()
    assert str(info.value) == (
        "/etc/nftsync/nftsync.toml: realtime_priority: the kernel refuses SCHED_RR priority 10 "
        "(Operation not permitted): the process has neither CAP_SYS_NICE nor an RLIMIT_RTPRIO "
        "of at least 10 (it has 5); under systemd, allow it with a drop-in setting "
        "RestrictRealtime=no and LimitRTPRIO=10 (docs/daemon.md, \"Real-time scheduling\"), or "
        "remove the key")
    assert info.value.exit_code == 1
    assert k.handlers[signal.SIGXCPU] == signal.SIG_DFL  # the handler is not left behind


def test_refusal_despite_privilege_points_at_seccomp_or_cgroup(monkeypatch) -> None:
    FakeKernel(monkeypatch, refuse=errno.EPERM, rtprio=10)
    with pytest.raises(SchedulingError, match=r"the process may use it, so a seccomp filter "
                       r"\(systemd's RestrictRealtime=yes\) or its cgroup"):
        RealtimeScheduling(10, None).start()
    FakeKernel(monkeypatch, refuse=errno.EINVAL)
    with pytest.raises(SchedulingError) as info:
        RealtimeScheduling(10, None).start()
    assert str(info.value) == ("realtime_priority: the kernel refuses SCHED_RR priority 10 "
                               "(Invalid argument)")


def test_overrun_demotes_at_once_and_the_loop_restores_after_the_cooldown(monkeypatch,
                                                                          caplog) -> None:
    k = FakeKernel(monkeypatch)
    rt = RealtimeScheduling(10, None, cooldown=10.0, check_every=1.0)
    rt.start()
    loop = FakeLoop()
    rt.attach(loop)
    k.rlimits[resource.RLIMIT_RTTIME] = (1_100_000, INF)  # what the kernel does at SIGXCPU
    rt._overrun(signal.SIGXCPU, None)
    assert k.calls[-1] == (os.SCHED_OTHER, 0) and not rt.realtime and rt.demotions == 1
    rt._overrun(signal.SIGXCPU, None)  # a second signal while demoted changes nothing
    assert rt.demotions == 1 and len(k.calls) == 2
    caplog.set_level(logging.INFO, logger="nftsync.daemon")
    k.now += 1
    loop.fire()
    assert caplog.text.count("ran 100 ms without blocking at SCHED_RR priority 10") == 1
    assert k.calls[-1] == (os.SCHED_OTHER, 0)  # still cooling down
    k.now += 5
    loop.fire()
    assert caplog.text.count("without blocking") == 1  # reported once
    k.now += 5
    loop.fire()
    assert k.calls[-1] == (RR, 10) and rt.realtime
    assert k.rlimits[resource.RLIMIT_RTTIME] == (100_000, INF)  # the budget again
    assert "event loop back to SCHED_RR priority 10" in caplog.text
    assert len(loop.timers) == 1  # the check keeps running
