"""`nftsync ctl` against a real daemon pair in network namespaces (the transport on its own, with
a fake daemon: tests/unit/test_control_protocol.py)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import netns

from nftsync.daemon import control
from nftsync.daemon.control import ControlError

NFTSYNC = [sys.executable, "-m", "nftsync"]


def ctl(path: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*NFTSYNC, "ctl", "--socket", path, *args], capture_output=True,
                          text=True, timeout=60)


HEX_KEY = "3f9a1c2b7d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8"
FARM = Path(__file__).parents[2] / "rulesets" / "farm.nft"
# What contrib/systemd/nftsync.service leaves the daemon: CapabilityBoundingSet=CAP_NET_ADMIN,
# NoNewPrivileges=yes.
CONFINE = ["setpriv", "--bounding-set=-all,+net_admin", "--inh-caps=-all", "--no-new-privs"]


def test_real_daemon_pair(tmp_path: Path) -> None:
    """Two daemons in two namespaces joined by a veth: ctl, SIGHUP (good and bad), SIGTERM.

    lb2 runs with CAP_NET_ADMIN as its only capability and no_new_privs, as the systemd unit
    confines it, and must still write what it receives into its kernel's session map.
    """
    key = tmp_path / "key"
    key.write_text(HEX_KEY + "\n")
    key.chmod(0o600)
    ns1, ns2 = netns.create("nsd"), netns.create("nsd")
    procs: list[subprocess.Popen] = []
    logs: list[Any] = []
    try:
        subprocess.run(["ip", "link", "add", "sync1", "netns", ns1, "type", "veth", "peer",
                        "name", "sync2", "netns", ns2], check=True)
        netns.run(ns1, "ip", "addr", "add", "10.99.0.1/24", "dev", "sync1")
        netns.run(ns2, "ip", "addr", "add", "10.99.0.2/24", "dev", "sync2")
        netns.run(ns1, "ip", "link", "set", "sync1", "up")
        netns.run(ns2, "ip", "link", "set", "sync2", "up")
        for ns in (ns1, ns2):
            netns.run(ns, *NFTSYNC, "apply", str(FARM))
        socks, confs = [], []
        for i, (ns, me, other) in enumerate([(ns1, "10.99.0.1", "10.99.0.2"),
                                             (ns2, "10.99.0.2", "10.99.0.1")], start=1):
            conf = tmp_path / f"lb{i}.toml"
            conf.write_text(f'node_name = "lb{i}"\nnode_id = {i}\ncluster = "t"\n'
                            f'listen = "{me}:7777"\npeers = ["{other}"]\n'
                            f'key_file = "{key}"\nsocket = "{tmp_path}/lb{i}/ctl.sock"\n'
                            f'role = "{"active" if i == 1 else "backup"}"\n')
            log = open(tmp_path / f"lb{i}.log", "w")  # noqa: SIM115 - closed in finally
            logs.append(log)
            confine = CONFINE if i == 2 else []
            procs.append(subprocess.Popen(["ip", "netns", "exec", ns, *confine, *NFTSYNC,
                                           "daemon", "--config", str(conf)],
                                          stdout=log, stderr=log))
            socks.append(f"{tmp_path}/lb{i}/ctl.sock")
            confs.append(conf)

        def wait_for(pred, what: str, timeout: float = 20.0) -> Any:
            deadline = time.monotonic() + timeout
            last: Exception | None = None
            while True:
                try:
                    value = pred()
                    if value:
                        return value
                except ControlError as exc:  # not listening yet
                    last = exc
                if time.monotonic() > deadline:
                    logs_text = [Path(f.name).read_text() for f in logs]
                    raise AssertionError(f"timed out waiting for {what} ({last}): {logs_text}")
                time.sleep(0.1)

        def both_up() -> bool:
            # both dial at start-up, so the first connections may be replaced: wait for one
            # that has lasted a second
            return all(any(p["state"] == "up" and p["since_s"] >= 1.0
                           for p in control.call(s, "peers")) for s in socks)
        wait_for(both_up, "the two daemons to connect")
        st = control.call(socks[0], "status")
        assert (st["node"], st["node_id"], st["role"], st["peers_up"]) == ("lb1", 1, "active", 1)
        assert stat.S_IMODE(os.stat(socks[0]).st_mode) == 0o600

        r = ctl(socks[1], "peers")
        assert r.returncode == 0 and "lb1" in r.stdout and " up " in r.stdout, r
        r = ctl(socks[1], "stats", "--json")
        assert r.returncode == 0 and isinstance(json.loads(r.stdout), dict), r
        r = ctl(socks[1], "show")
        assert r.returncode == 0 and "conntrack entries: 0" in r.stdout, r
        r = ctl(socks[1], "resync", "--json")
        assert r.returncode == 0 and json.loads(r.stdout)["resync"], r
        r = ctl(socks[1], "promote")
        assert r.returncode == 0 and control.call(socks[1], "status")["role"] == "active"
        r = ctl(socks[1], "demote")
        assert control.call(socks[1], "status")["role"] == "backup"
        # the confined daemon applies a session made on lb1 to its own kernel map
        status = Path(f"/proc/{procs[1].pid}/status").read_text()
        assert "CapBnd:\t0000000000001000" in status and "NoNewPrivs:\t1" in status
        netns.run(ns1, *NFTSYNC, "sessions", "add", "10.10.1.7", "0x201")

        def on_lb2() -> bool:
            out = netns.run(ns2, "nft", "-j", "list", "map", "ip", "nftsync_web",
                            "web_sessions").stdout
            return "10.10.1.7" in out
        wait_for(on_lb2, "the session on lb2's kernel map")
        r = ctl(socks[1], "status")
        assert r.returncode == 0 and "health    ok" in r.stdout, r

        # SIGHUP with a broken file: logged, old config kept, daemon still answers
        good = confs[0].read_text()
        confs[0].write_text(good + "bogus = 1\n")
        procs[0].send_signal(signal.SIGHUP)
        wait_for(lambda: "reload failed, keeping the running configuration" in
                 Path(logs[0].name).read_text(), "the reload error in the log")
        assert control.call(socks[0], "status")["node"] == "lb1"
        # SIGHUP with a new role: applied
        confs[0].write_text(good.replace('role = "active"', 'role = "backup"'))
        procs[0].send_signal(signal.SIGHUP)
        wait_for(lambda: control.call(socks[0], "status")["role"] == "backup", "the new role")

        # a second daemon on the same socket is refused, the first keeps running
        r = subprocess.run(["ip", "netns", "exec", ns1, *NFTSYNC, "daemon", "--config",
                            str(confs[0]), "--listen", "10.99.0.1:7778"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 1 and "is already listening on" in r.stderr, r
        assert control.call(socks[0], "status")["node"] == "lb1"

        # a fatal start-up error of the core (the listen address is taken): one error line,
        # non-zero exit, and its control socket is removed again
        r = subprocess.run(["ip", "netns", "exec", ns1, *NFTSYNC, "daemon", "--config",
                            str(confs[0]), "--socket", f"{tmp_path}/third.sock"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 1, r
        assert r.stderr.splitlines()[-1].startswith("nftsync: error: cannot listen on "
                                                    "10.99.0.1:7777"), r.stderr
        assert not os.path.exists(f"{tmp_path}/third.sock")

        for proc, sock in zip(procs, socks, strict=True):
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0
            assert not os.path.exists(sock)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        for log in logs:
            log.close()
        netns.delete(ns1)
        netns.delete(ns2)
