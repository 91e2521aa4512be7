"""The daemon's process: logging, scheduling, signals, reload, the control socket, the run itself.

`serve()` is what `nftsync daemon` calls once the configuration is valid; nothing here depends
on click, so the daemon can be run (and tested) without the CLI.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import signal
import sys
from typing import Any

from nftsync import __version__
from nftsync.endpoint import format_endpoint
from nftsync.errors import NftsyncError

from . import logformat
from .config import DaemonConfig, load_config
from .control import ControlServer
from .notify import Notifier
from .realtime import RealtimeScheduling

log = logging.getLogger("nftsync.daemon")


def serve(config: DaemonConfig, config_path: str | None, overrides: dict[str, Any]) -> int:
    """Run the daemon until SIGTERM/SIGINT; returns the process exit code.

    Raises SchedulingError (before anything else is started) when `realtime_priority` is set and
    the kernel refuses it: a setting the operator asked for is honoured or the daemon does not
    start, as with every other unusable setting.
    """
    setup_logging(config.log_level, config.log_format)
    # A stuck event loop is killed by systemd's watchdog with SIGABRT: the traceback of every
    # thread goes to the journal first, so the log says where the loop was stuck.
    faulthandler.enable()
    realtime = None
    if config.realtime_priority:
        # First, in the only thread there is: the threads started later are SCHED_OTHER.
        realtime = RealtimeScheduling(config.realtime_priority, config.config_file)
        realtime.start()
    try:
        asyncio.run(_Runner(config, config_path, overrides, realtime).run())
    except KeyboardInterrupt:  # ^C before the signal handlers were installed
        log.info("interrupted during start-up")
        return 130
    return 0


# --------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------

def on_journal() -> bool:
    """True when stderr is connected to journald (systemd sets JOURNAL_STREAM to its dev:ino)."""
    value = os.environ.get("JOURNAL_STREAM")
    if not value:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return value == f"{st.st_dev}:{st.st_ino}"


def setup_logging(level: str, log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logformat.formatter(log_format, on_journal()))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------

class _Runner:
    """Owns the daemon, its control socket and the signal handlers for one `nftsync daemon`."""

    def __init__(self, config: DaemonConfig, config_path: str | None,
                 overrides: dict[str, Any], realtime: RealtimeScheduling | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.overrides = overrides
        self.realtime = realtime
        self._reload_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        from .core import Daemon  # the core loads the kernel adapters: only when running

        notifier = Notifier()  # $NOTIFY_SOCKET (systemd Type=notify), or nothing
        daemon = Daemon(self.config, notifier)
        loop = asyncio.get_running_loop()
        # Handlers first: a stop requested during start-up makes run() return right after it.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop, daemon, sig.name)
        loop.add_signal_handler(signal.SIGHUP, self._spawn_reload, daemon)
        control = ControlServer(daemon.control_ops(), self.config.socket,
                                self.config.control_group)
        try:
            await control.start()  # refuses to start when another daemon owns the socket
        except BaseException:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            raise
        log.info("nftsync %s starting (pid %d, configuration: %s)", __version__, os.getpid(),
                 self.config.config_file or "command line only")
        if self.realtime is not None:
            self.realtime.attach(loop)
        metrics = None
        if self.config.metrics_host is not None:
            from .metrics import MetricsServer
            metrics = MetricsServer(daemon, self.config.metrics_host, self.config.metrics_port)
        try:
            if metrics is not None:
                await metrics.start()  # before the start-up read: health answers meanwhile
            await daemon.run()
        finally:
            if metrics is not None:
                await metrics.close()
            if self.realtime is not None:
                self.realtime.close()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            for task in list(self._tasks):
                task.cancel()
            await control.close()
            notifier.close()
        log.info("nftsync daemon stopped")

    def _stop(self, daemon: Any, signame: str) -> None:
        log.info("%s received: stopping", signame)
        daemon.stop()

    def _spawn_reload(self, daemon: Any) -> None:
        task = asyncio.get_running_loop().create_task(self.reload(daemon))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reload(self, daemon: Any) -> None:
        """SIGHUP: re-read the file (flags still win); keep the running config if it is bad.
        Once running, systemd hears RELOADING=1 before and READY=1 after, whatever the outcome
        (during start-up READY=1 is start-up's to send)."""
        running = daemon.phase == "running"
        if running:
            daemon.notifier.reloading()
        try:
            await self._reload(daemon)
        finally:
            if running:
                daemon.notifier.ready(daemon.summary())

    async def _reload(self, daemon: Any) -> None:
        async with self._reload_lock:
            source = self.config.config_file or "the command line (no config file)"
            log.info("SIGHUP received: reloading the configuration from %s", source)
            try:
                new = load_config(self.config_path, self.overrides)
            except NftsyncError as exc:
                log.error("reload failed, keeping the running configuration: %s", exc)
                return
            if new.socket != self.config.socket:
                log.warning("the control socket moves only on restart; still serving %s",
                            self.config.socket)
                new.socket = self.config.socket
            if new.realtime_priority != self.config.realtime_priority:
                log.warning("realtime_priority changes only on restart; still %s",
                            f"SCHED_RR priority {self.config.realtime_priority}"
                            if self.config.realtime_priority else "SCHED_OTHER")
                new.realtime_priority = self.config.realtime_priority
            running = (self.config.metrics_host, self.config.metrics_port)
            if (new.metrics_host, new.metrics_port) != running:
                log.warning("metrics_listen changes only on restart; still %s",
                            "off" if running[0] is None else format_endpoint(*running))
                new.metrics_host, new.metrics_port = running
            try:
                changed = await daemon.reload(new)
            except NftsyncError as exc:
                log.error("reload refused, keeping the running configuration: %s", exc)
                return
            if (new.log_level, new.log_format) != (self.config.log_level, self.config.log_format):
                setup_logging(new.log_level, new.log_format)
            self.config = new
            log.debug("configuration reloaded: %s", _changes(changed))  # the core logs it too


def _changes(changed: Any) -> str:
    if not changed:
        return "nothing changed"
    if isinstance(changed, dict):
        return "; ".join(f"{k}: {v}" for k, v in changed.items())
    return str(changed)
