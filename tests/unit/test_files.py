"""The files nftsync reads: config, key, farm ruleset and what it includes (no root).

Issue 13: a FIFO as the key or the config file hung `nftsync daemon --check` and the start for
ever, and a file pulled in with `include` escaped apply's 4 MiB limit. Each case below that could
hang runs in a subprocess with a timeout (or opens nothing but with O_NONBLOCK), so a regression
fails the test instead of hanging the run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nftsync import nftinclude
from nftsync.daemon.config import ConfigError, load_config
from nftsync.errors import RulesetError
from nftsync.files import FileRefused, read_regular
from nftsync.nftinclude import includes, read_sources, resolve
from nftsync.proto.auth import KeyFileError, load_key
from nftsync.ruleset import MAX_RULESET_BYTES, evaluate_file

HEX_KEY = "3f9a1c2b7d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8"
HANG = 30  # seconds before a check that should take milliseconds counts as hung


def check(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`nftsync daemon --check ARGS` in a subprocess that fails the test if it hangs."""
    try:
        return subprocess.run([sys.executable, "-m", "nftsync", "daemon", "--check", *args],
                              capture_output=True, text=True, timeout=HANG, cwd=cwd)
    except subprocess.TimeoutExpired:
        pytest.fail(f"nftsync daemon --check {' '.join(args)} hung (more than {HANG} s)")


@pytest.fixture
def key(tmp_path: Path) -> Path:
    p = tmp_path / "key"
    p.write_text(HEX_KEY + "\n")
    p.chmod(0o600)
    return p


def config(tmp_path: Path, key_file: Path | str, name: str = "nftsync.toml") -> Path:
    p = tmp_path / name
    p.write_text(f'node_name = "lb1"\nkey_file = "{key_file}"\n')
    p.chmod(0o644)
    return p


# --- config and key -------------------------------------------------------------------------

def test_fifo_as_config_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "nftsync.toml"
    os.mkfifo(fifo)
    proc = check("--config", str(fifo))
    assert proc.returncode == 2
    assert proc.stderr == (f"nftsync: error: config file {fifo} is a FIFO (named pipe), not a "
                           "regular file\n")


def test_fifo_as_key_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "key"
    os.mkfifo(fifo, 0o600)
    proc = check("--config", str(config(tmp_path, fifo)))
    assert proc.returncode == 2
    assert proc.stderr == (f"nftsync: error: {tmp_path}/nftsync.toml: key_file: key file {fifo} "
                           "is a FIFO (named pipe), not a regular file\n")
    proc = check("--node-name", "lb1", "--key-file", str(fifo))  # the flag, no config file
    assert proc.returncode == 2 and "is a FIFO (named pipe), not a regular file" in proc.stderr


def test_fifo_as_legacy_farm_is_refused_at_once(tmp_path: Path, key: Path) -> None:
    fifo = tmp_path / "legacy.toml"
    os.mkfifo(fifo)
    conf = tmp_path / "nftsync.toml"
    conf.write_text(f'node_name = "lb1"\nkey_file = "{key}"\nlegacy_farms = ["{fifo}"]\n')
    proc = check("--config", str(conf))
    assert proc.returncode == 2
    assert proc.stderr == (f"nftsync: error: {conf}: legacy_farms[0]: legacy farm file {fifo} "
                           "is a FIFO (named pipe), not a regular file\n")


def test_directory_as_config_or_key(tmp_path: Path, key: Path) -> None:
    d = tmp_path / "conf.d"
    d.mkdir()
    with pytest.raises(ConfigError, match=rf"^config file {d} is a directory, not a regular "
                                          "file$"):
        load_config(str(d))
    with pytest.raises(KeyFileError, match=rf"^key file {d} is a directory, not a regular file$"):
        load_key(d)


def test_device_as_key(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="^key file /dev/null is a character device, not a "
                                           "regular file$"):
        load_key("/dev/null")


def test_symlinks_to_regular_files_are_followed(tmp_path: Path, key: Path) -> None:
    """Configuration management links files into /etc: the link's target is what counts."""
    store = tmp_path / "store"
    store.mkdir()
    real = config(store, key)
    (tmp_path / "link.toml").symlink_to(real)
    (tmp_path / "key-link").symlink_to(key)
    assert load_config(str(tmp_path / "link.toml")).node_name == "lb1"
    assert len(load_key(tmp_path / "key-link")) == 32
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "to-fifo.toml").symlink_to(fifo)
    proc = check("--config", str(tmp_path / "to-fifo.toml"))
    assert proc.returncode == 2 and "is a FIFO (named pipe), not a regular file" in proc.stderr


def test_oversized_config_is_refused(tmp_path: Path, key: Path) -> None:
    p = config(tmp_path, key)
    with open(p, "a") as f:
        f.write("#" * (1 << 20) + "\n")
    with pytest.raises(ConfigError, match="larger than 1048576 bytes"):
        load_config(str(p))


def test_read_regular_bounds() -> None:
    with pytest.raises(FileRefused, match=r"^thing /proc/self/status is larger than 10 bytes "):
        read_regular("/proc/self/status", "thing", 10)  # st_size 0: the read itself stops
    with pytest.raises(FileRefused, match="^thing /dev/zero is a character device"):
        read_regular("/dev/zero", "thing", 10)


# --- the ruleset and its includes -----------------------------------------------------------

def test_includes_are_found_where_nft_reads_them() -> None:
    text = ('include "a.nft"\n'
            '# include "commented.nft"\n'
            'table ip t { comment "include \\"no\\""; include "./in-block.nft"\n'
            '  chain c { counter comment "x # include \\"y\\"" }\n'
            '}\n'
            'define my_include = 1; include\t"/abs/*.nft"; myinclude "no.nft"\n')
    assert includes(text) == [(1, "a.nft"), (3, "./in-block.nft"), (6, "/abs/*.nft")]


def test_resolve_like_libnftables(tmp_path: Path, monkeypatch) -> None:
    inc = tmp_path / "inc"
    (inc / "sub.d").mkdir(parents=True)
    for name in ("b.nft", "a.nft", "c.conf"):
        (inc / name).write_text("")
    monkeypatch.chdir(tmp_path)
    paths = (str(tmp_path / "none"), str(inc))
    assert resolve("a.nft", paths) == [f"{inc}/a.nft"]  # searched in the include paths
    assert resolve("*", paths) == [f"{inc}/a.nft", f"{inc}/b.nft", f"{inc}/c.conf"]  # no dirs
    assert resolve("*.none", paths) == []  # a wildcard without match is fine
    assert resolve("missing.nft", paths) is None  # as nft: "File not found"
    assert resolve("./inc/b.nft") == ["./inc/b.nft"]  # ./ and ../: the working directory
    assert resolve(f"{inc}/[ab].nft") == [f"{inc}/a.nft", f"{inc}/b.nft"]
    assert resolve("./inc/sub.d") == []  # a directory named without wildcard: nothing


def farm(tmp_path: Path, text: str, name: str = "farm.nft") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_huge_include_is_refused_naming_it(tmp_path: Path) -> None:
    big = tmp_path / "big.nft"
    line = "# padding " + "x" * 90 + "\n"
    big.write_text(line * (46_000))  # 4.6 MB, the size the issue got through
    main = farm(tmp_path, f'table ip t {{\n}}\ninclude "{big}"\n')
    with pytest.raises(RulesetError) as err:
        evaluate_file(str(main))  # refused before libnftables or the kernel is asked
    assert str(err.value) == (f'{main}:3: include "{big}": included file {big} (4.4 MiB) takes '
                              "the ruleset past 4 MiB (the farm file and every file it "
                              "includes, together)")


def test_includes_count_together(tmp_path: Path) -> None:
    """Three files of 1.5 MiB each: every one is small, together they are not."""
    part = "# " + "y" * (1536 * 1024 - 3) + "\n"
    for i in range(3):
        farm(tmp_path, part, f"part{i}.nft")
    main = farm(tmp_path, f'include "{tmp_path}/part*.nft"\n')
    with pytest.raises(RulesetError, match=rf'^{main}:1: include "{tmp_path}/part\*\.nft": '
                                           rf"included file {tmp_path}/part2.nft \(1.5 MiB\) "
                                           "takes the ruleset past 4 MiB"):
        read_sources(str(main), MAX_RULESET_BYTES)
    # the same file included twice is read (and counted) twice, as nft does
    farm(tmp_path, f'include "{tmp_path}/part0.nft"\n' * 3, "thrice.nft")
    with pytest.raises(RulesetError, match="part0.nft .* takes the ruleset past 4 MiB"):
        read_sources(str(tmp_path / "thrice.nft"), MAX_RULESET_BYTES)
    assert len(read_sources(str(main), 5 * 1024 * 1024)) == 4


def test_oversized_farm_file_itself(tmp_path: Path) -> None:
    main = farm(tmp_path, "#" * (MAX_RULESET_BYTES + 10))
    with pytest.raises(RulesetError, match=rf"^{main}: larger than 4 MiB \(4 MiB\); a farm file "
                                           "should not be$"):
        evaluate_file(str(main))


def test_fifo_as_ruleset_or_include(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.nft"
    os.mkfifo(fifo)
    with pytest.raises(RulesetError, match=rf"^ruleset file {fifo} is a FIFO \(named pipe\), "
                                           "not a regular file$"):
        evaluate_file(str(fifo))
    main = farm(tmp_path, f'table ip t {{\n  include "{fifo}"\n}}\n')
    with pytest.raises(RulesetError, match=rf'^{main}:2: include "{fifo}": included file '
                                           rf"{fifo} is a FIFO \(named pipe\), not a regular "
                                           "file$"):
        evaluate_file(str(main))
    # through a wildcard too (nft would block on it just the same)
    main = farm(tmp_path, f'include "{tmp_path}/*.nft"\n', "glob.conf")
    with pytest.raises(RulesetError, match="is a FIFO"):
        evaluate_file(str(main))


def test_include_loop_and_depth(tmp_path: Path) -> None:
    loop = farm(tmp_path, f'include "{tmp_path}/loop.nft"\n', "loop.nft")
    with pytest.raises(RulesetError, match=rf'^{loop}:1: include "{loop}" is nested deeper '
                                           r"than 16 levels \(does a file include itself\?\)$"):
        read_sources(str(loop), MAX_RULESET_BYTES)
    # a chain of 16 files (the top one is level 1) is what nft accepts, 17 is not
    for i in range(17):
        farm(tmp_path, f'include "{tmp_path}/d{i + 1}.nft"\n' if i < 16 else "", f"d{i}.nft")
    (tmp_path / "d16.nft").write_text("")
    assert len(read_sources(str(tmp_path / "d1.nft"), MAX_RULESET_BYTES)) == 16
    with pytest.raises(RulesetError, match="d15.nft:1: include .* nested deeper than 16"):
        read_sources(str(tmp_path / "d0.nft"), MAX_RULESET_BYTES)


def test_wildcard_fan_out_is_bounded(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(nftinclude, "MAX_FILES", 50)
    for i in range(8):  # main -> 8 files -> 8 files each: 73 files, no loop, 3 levels
        farm(tmp_path, f'include "{tmp_path}/g*.nft"\n', f"f{i}.nft")
        farm(tmp_path, "", f"g{i}.nft")
    main = farm(tmp_path, f'include "{tmp_path}/f*.nft"\n', "main.conf")
    with pytest.raises(RulesetError, match=r"f\d.nft:1: include .*: the ruleset includes more "
                                           "than 50 files"):
        read_sources(str(main), MAX_RULESET_BYTES)


def test_missing_include_and_flush_in_an_include(tmp_path: Path) -> None:
    main = farm(tmp_path, 'include "no-such-nftsync-file.nft"\n')
    with pytest.raises(RulesetError, match=rf'^{main}:1: include "no-such-nftsync-file.nft": '
                                           "no such file"):
        evaluate_file(str(main))
    inc = farm(tmp_path, "# fine\nflush ruleset\n", "inc.nft")
    main = farm(tmp_path, f'include "{inc}"\n')
    with pytest.raises(RulesetError, match=rf"^{inc}:2: 'flush ruleset' would drop every live "
                                           "session"):
        evaluate_file(str(main))
