"""Peer credentials on the control socket, with real users (root; issue 13).

* An impostor: a local user (here `nobody`) binds the socket path first, in a world-writable
  directory, and answers "health ok". `nftsync ctl` must refuse to believe it (exit 5) and
  print none of its answer; the same fake server run by root is believed (so the refusal is
  the uid's, not the fake's).
* The daemon (a real one, in a namespace of its own) serves root and the members of
  control_group; nobody else, not even through a socket whose mode was opened by mistake, and
  it logs such refusals at most once per 10 s.
"""

from __future__ import annotations

import contextlib
import grp
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

NFTSYNC = [sys.executable, "-m", "nftsync"]
HEX_KEY = "3f9a1c2b7d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8"
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]

# A fake daemon: answers every connection's first line with "health ok", then hangs up.
FAKE = r"""
import os, socket, sys
path = sys.argv[1]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(path)
os.chmod(path, 0o666)
s.listen(16)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.settimeout(5)
    try:
        c.recv(65536)
        c.sendall(b'{"ok": true, "result": {"node": "impostor", "role": "active", '
                  b'"health": "ok", "reasons": []}}\n')
    except OSError:
        pass
    c.close()
"""


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory under /tmp that every user can reach (pytest's tmp_path is root's only)."""
    d = Path(tempfile.mkdtemp(prefix="nftsync-creds-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def fake_server(path: Path, *user: str) -> Iterator[subprocess.Popen]:
    """FAKE listening on `path`, run as `user` (a setpriv prefix) or as root."""
    proc = subprocess.Popen([*user, sys.executable, "-c", FAKE, str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        assert ready and proc.stdout.readline() == "ready\n", proc.stderr.read()
        yield proc
    finally:
        proc.kill()
        proc.wait(10)
        path.unlink(missing_ok=True)


def ctl(path: Path, *args: str, user: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*user, *NFTSYNC, "ctl", "--socket", str(path), *args],
                          capture_output=True, text=True, timeout=60)


def test_ctl_refuses_a_socket_served_by_another_user(public_dir: Path) -> None:
    shared = public_dir / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp: any local user may create the socket there first
    path = shared / "nftsync.sock"
    with fake_server(path, *NOBODY) as impostor:
        assert os.stat(path).st_uid == 65534
        for args in (["status"], ["status", "--json"], ["promote"], ["peers", "--json"],
                     ["status", "--wait-ready", "--timeout", "30"]):
            p = ctl(path, *args)
            assert p.returncode == 5, (args, p)
            assert p.stdout == "", "an impostor's answer was printed"
            assert p.stderr == (f"nftsync: error: {path} is served by uid 65534 (pid "
                                f"{impostor.pid}), not by root: not trusting its answers (is "
                                f"it an impostor? check who created {path})\n"), p.stderr
        # nobody's own ctl may talk to nobody's server: it cannot deceive its own user
        p = ctl(path, "status", user=tuple(NOBODY))
        assert p.returncode == 0 and "health    ok" in p.stdout, p
    # The same fake served by root is believed: what was refused above is the uid.
    with fake_server(path):
        p = ctl(path, "status")
        assert p.returncode == 0 and "impostor" in p.stdout and "health    ok" in p.stdout, p


@pytest.fixture
def group() -> Iterator[str]:
    name = f"nftsync-t{uuid.uuid4().hex[:6]}"
    subprocess.run(["groupadd", "--system", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["groupdel", name], check=False)


def test_daemon_serves_root_and_control_group_only(ns: str, public_dir: Path,
                                                   group: str) -> None:
    gid = grp.getgrnam(group).gr_gid
    key = public_dir / "key"
    key.write_text(HEX_KEY + "\n")
    key.chmod(0o600)
    sock = public_dir / "run" / "ctl.sock"
    conf = public_dir / "nftsync.toml"
    conf.write_text(f'node_name = "lb1"\nkey_file = "{key}"\nlisten = "127.0.0.1:7777"\n'
                    f'socket = "{sock}"\ncontrol_group = "{group}"\n')
    conf.chmod(0o644)
    log_path = public_dir / "daemon.log"
    with open(log_path, "w") as log:
        daemon = subprocess.Popen(["ip", "netns", "exec", ns, *NFTSYNC, "daemon", "--config",
                                   str(conf)], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while ctl(sock, "stats").returncode != 0:
            assert daemon.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        st = os.stat(sock)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o660, 0, gid)
        st = os.stat(sock.parent)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o750, 0, gid)

        member = ("setpriv", "--reuid=nobody", "--regid=nogroup", f"--groups={gid}")
        p = ctl(sock, "status", user=member)  # a supplementary group (SO_PEERGROUPS)
        assert p.returncode in (0, 1, 2) and "node      lb1" in p.stdout, p
        p = ctl(sock, "stats", user=("setpriv", "--reuid=nobody", f"--regid={gid}",
                                    "--clear-groups"))  # the primary group
        assert p.returncode == 0, p
        p = ctl(sock, "stats", user=tuple(NOBODY))  # the socket's mode keeps it out
        assert p.returncode == 1 and p.stderr == (
            f"nftsync: error: permission denied on {sock}: the control socket is root's (run "
            "nftsync ctl as root, or as a member of the daemon's control_group)\n"), p
        assert ctl(sock, "status", user=tuple(NOBODY)).returncode == 3  # status: no answer

        # A mode opened by mistake (or a directory above it): the daemon still refuses.
        sock.chmod(0o666)
        sock.parent.chmod(0o755)
        p = ctl(sock, "stats", user=tuple(NOBODY))
        assert p.returncode == 1 and p.stdout == "", p
        assert p.stderr == (f"nftsync: error: permission denied: the control socket serves "
                            f"root and group {group} only\n"), p.stderr
        # 20 more at once: each answered, one log line in all (rate-limited)
        many = subprocess.run([*NOBODY, sys.executable, "-c", r"""
import socket, sys
n = 0
for _ in range(20):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(sys.argv[1])
        s.sendall(b'{"cmd": "status"}\n')
        n += b"permission denied" in s.makefile("rb").readline()
print(n)
""", str(sock)], capture_output=True, text=True, timeout=60)
        assert many.stdout.strip() == "20", many
        assert ctl(sock, "status").returncode in (0, 1, 2)  # root is still served
        refusals = [line for line in log_path.read_text().splitlines()
                    if "control socket: refused" in line]
        assert len(refusals) == 1, refusals
        assert "uid 65534" in refusals[0] and f"not root or group {group}" in refusals[0]
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(15)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(10)
