"""Peer credentials on the control socket, the parts a non-root user can check: control_group's
socket and directory modes, its validation, and what ctl reads of the server (SO_PEERCRED).
Other users (an impostor served as nobody, a client refused by the daemon):
tests/kernel/test_control_creds.py."""

from __future__ import annotations

import asyncio
import grp
import os
import socket
import stat
from pathlib import Path

import pytest
from test_control_protocol import FakeDaemon, Served

from nftsync.daemon import control
from nftsync.daemon.config import ConfigError, load_config
from nftsync.daemon.control import ControlError, ControlServer, PeerCred

HEX_KEY = "3f9a1c2b7d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8"
MY_GROUP = grp.getgrgid(os.getegid()).gr_name


class GroupServed(Served):
    def __init__(self, path: str, group: str) -> None:
        super().__init__(path, FakeDaemon())
        self.server = ControlServer(self.daemon.control_ops(), path, group)


def test_control_group_opens_socket_and_directory_to_the_group(tmp_path: Path) -> None:
    path = tmp_path / "run" / "nftsync.sock"
    with GroupServed(str(path), MY_GROUP) as served:
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == os.getegid()
        st = os.stat(path.parent)
        assert stat.S_IMODE(st.st_mode) == 0o750 and st.st_gid == os.getegid()
        assert control.call(served.path, "status")["node"] == "lb1"  # our own uid: served


def test_a_directory_that_is_not_the_daemons_is_left_alone(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp: anyone may create files there
    with GroupServed(str(shared / "nftsync.sock"), MY_GROUP):
        assert stat.S_IMODE(os.stat(shared).st_mode) == 0o1777


def test_unknown_control_group(tmp_path: Path) -> None:
    server = ControlServer(FakeDaemon().control_ops(), str(tmp_path / "s.sock"),
                           "nftsync-no-such-group")
    with pytest.raises(ControlError, match="^control_group 'nftsync-no-such-group': no such "
                                           "group$"):
        asyncio.run(server.start())
    assert not (tmp_path / "s.sock").exists()


def test_control_group_in_the_config(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text(HEX_KEY + "\n")
    key.chmod(0o600)
    conf = tmp_path / "nftsync.toml"
    conf.write_text(f'key_file = "key"\ncontrol_group = "{MY_GROUP}"\n')
    assert load_config(str(conf)).control_group == MY_GROUP
    conf.write_text('key_file = "key"\ncontrol_group = "nftsync-no-such-group"\n')
    with pytest.raises(ConfigError, match=r"control_group: no group 'nftsync-no-such-group' on "
                                          r"this system \(create it: groupadd --system "):
        load_config(str(conf))
    conf.write_text('key_file = "key"\ncontrol_group = 0\n')
    with pytest.raises(ConfigError, match="control_group: must be a string, got an integer"):
        load_config(str(conf))
    conf.write_text('key_file = "key"\n')
    assert load_config(str(conf)).control_group is None


def test_ctl_reads_who_serves_the_socket(tmp_path: Path) -> None:
    """A server of our own uid is believed (a daemon we started); its pid is the listener's."""
    with Served(str(tmp_path / "s.sock"), FakeDaemon()) as served:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(served.path)
            cred = control.check_daemon(s, served.path)
        assert cred == PeerCred(os.getpid(), os.geteuid(), os.getegid())
