"""The Debian package, as a user gets it: built from the tree by scripts/build-deb.sh (lintian
clean), installed with apt into a clean Debian root (its Depends from the mirror), and run from
there: the command, its man pages and completion, the unit, the example configuration, and a
pair of installed daemons in two network namespaces replicating a session between kernels.

Root creation is cached (tests/kernel/debroot.py); the figures (build, root, install) are printed.
Marked slow: a first run takes about two minutes (mmdebstrap, then apt from the mirror), a cached
one about one; CI runs them (NFTSYNC_SLOW=1). The build's version check needs neither.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import debroot
import netns
import pytest
from daemons import DaemonProc, make_key, wait_for

from nftsync import __version__
from nftsync.cli.common import SUBCOMMANDS

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "scripts" / "build-deb.sh"
DOCS = "/usr/share/doc/nftsync"
FARM = f"{DOCS}/examples/rulesets/farm-http.nft"  # table ip nftsync_http, map http_sessions
PAGES = ["nftsync", *(f"nftsync-{c}" for c in SUBCOMMANDS)]
COMPLETIONS = {"bash": "/usr/share/bash-completion/completions/nftsync",
               "zsh": "/usr/share/zsh/vendor-completions/_nftsync",
               "fish": "/usr/share/fish/vendor_completions.d/nftsync.fish"}
UNIT = "/lib/systemd/system/nftsync.service"
NOTIFY = "/usr/lib/nftsync/nftsync-notify.sh"


@pytest.fixture(scope="module")
def deb(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("deb")
    start = time.monotonic()
    proc = subprocess.run([str(BUILD), "--lintian", str(out)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(f"\npackage: built and lintian-checked in {time.monotonic() - start:.1f} s")
    path = Path(proc.stdout.strip().splitlines()[-1])
    assert path.name == f"nftsync_{__version__}_all.deb" and path.is_file()
    return path


@pytest.fixture(scope="module")
def installed(deb, tmp_path_factory):
    """A clean Debian root with the package installed by apt (Depends from the mirror)."""
    start = time.monotonic()
    tarball = debroot.cached_root()
    made = (f"made in {tarball.made_seconds:.1f} s" if tarball.made_seconds is not None
            else f"from the cache in {time.monotonic() - start:.1f} s")
    with debroot.unpacked(tarball.path, tmp_path_factory.mktemp("root") / "r") as root:
        unpacked = time.monotonic()
        shutil.copy(deb, root.file(f"/tmp/{deb.name}"))
        root.run("apt-get", "update", "-q", timeout=300)
        root.run("apt-get", "install", "-y", "-q", f"/tmp/{deb.name}", timeout=600)
        print(f"\nroot: {made}, unpacked in {unpacked - start:.1f} s in all; "
              f"apt-get update + install: {time.monotonic() - unpacked:.1f} s")
        yield root


def test_build_refuses_a_changelog_that_disagrees_with_the_version(tmp_path):
    """One source of truth: a changelog entry other than nftsync.__version__ stops the build
    before anything is built."""
    for rel in ("scripts/build-deb.sh", "nftsync/__init__.py", "debian/control"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    changelog = (ROOT / "debian" / "changelog").read_text()
    (tmp_path / "debian" / "changelog").write_text(
        changelog.replace(f"nftsync ({__version__})", "nftsync (9.9.9)", 1))
    proc = subprocess.run([str(tmp_path / "scripts/build-deb.sh"), str(tmp_path.parent / "out")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert f"debian/changelog says 9.9.9 but nftsync.__version__ is {__version__}" in proc.stderr


@pytest.mark.slow
def test_version_is_the_package_version(installed):
    out = installed.run("/usr/bin/nftsync", "--version").stdout
    assert out.strip() == f"nftsync, version {__version__}"
    assert installed.run("dpkg-query", "-W", "-f=${Version}", "nftsync").stdout == __version__
    # The Python package is Debian's, in dist-packages, run by Debian's python3.
    assert installed.run("head", "-1", "/usr/bin/nftsync").stdout.strip() == "#!/usr/bin/python3"


@pytest.mark.slow
def test_man_pages_render_cleanly(installed):
    for page in PAGES:
        path = installed.run("man", "-w", f"{page}(8)").stdout.strip()
        assert path == f"/usr/share/man/man8/{page}.8.gz"
        source = gzip.decompress(installed.file(path).read_bytes())
        check = subprocess.run(["groff", "-man", "-ww", "-z"], input=source,
                               capture_output=True, timeout=30)
        assert check.returncode == 0 and check.stderr == b"", (page, check.stderr)
    daemon = installed.run("sh", "-c", "MANWIDTH=100 man nftsync-daemon").stdout
    assert "--config FILE" in daemon and "/etc/nftsync/nftsync.toml" in daemon
    sessions = installed.run("sh", "-c", "MANWIDTH=100 man nftsync-sessions").stdout
    assert "nftsync sessions add [OPTIONS] CLIENT BACKEND" in sessions


@pytest.mark.slow
def test_completion_installed_and_bash_completes(installed):
    for path in COMPLETIONS.values():
        assert installed.file(path).is_file(), path
    assert "#compdef nftsync" in installed.file(COMPLETIONS["zsh"]).read_text()
    fish = installed.file(COMPLETIONS["fish"]).read_text()
    assert "complete --no-files --command nftsync" in fish

    def complete(*words: str) -> list[str]:
        """What bash offers for the last of `words` (the word being typed), as after TAB."""
        script = (f"source {COMPLETIONS['bash']}; COMP_WORDS=({' '.join(map(repr, words))}); "
                  f"COMP_CWORD={len(words) - 1}; _nftsync_completion nftsync; "
                  'printf "%s\\n" "${COMPREPLY[@]}"')
        return installed.run("bash", "-c", script).stdout.split()

    assert set(complete("nftsync", "")) >= set(SUBCOMMANDS)
    assert complete("nftsync", "se") == ["sessions"]
    assert {"add", "del", "flush", "list"} <= set(complete("nftsync", "sessions", ""))
    assert complete("nftsync", "daemon", "--key") == ["--key-file"]


@pytest.mark.slow
def test_unit_installed_disabled_and_verifies(installed):
    assert installed.file(UNIT).is_file()
    state = installed.run("systemctl", "is-enabled", "nftsync.service", check=False)
    assert state.stdout.strip() == "disabled", state
    # ExecStart and ExecStartPre resolve, Documentation=man:nftsync-daemon(8) is installed.
    verify = installed.run("systemd-analyze", "verify", UNIT, check=False)
    assert verify.returncode == 0 and verify.stderr.strip() == "", verify.stderr
    unit = installed.file(UNIT).read_text()
    for doc in re.findall(r"file:(\S+)", unit):
        assert installed.file(doc).is_file(), doc


@pytest.mark.slow
def test_keepalived_notify_script_where_the_examples_say(installed):
    assert installed.file(NOTIFY).stat().st_mode & 0o111
    conf = installed.file(f"{DOCS}/examples/keepalived/keepalived.conf").read_text()
    assert re.findall(r"^\s*notify (\S+)", conf, re.M) == [NOTIFY]
    defaults = installed.file("/etc/default/nftsync-notify").read_text()
    assert "NFTSYNC_CMD=/usr/bin/nftsync" in defaults
    conffiles = installed.run("dpkg-query", "-W", "-f=${Conffiles}", "nftsync").stdout
    assert "/etc/default/nftsync-notify" in conffiles
    # The script runs from there: with no daemon it says so and exits 1 (NFTSYNC_REQUIRE_DAEMON).
    run = installed.run(NOTIFY, "INSTANCE", "nftsync", "MASTER", "100", check=False)
    assert run.returncode == 1 and "daemon not running" in run.stderr, run


@pytest.mark.slow
def test_example_config_checks_once_the_key_exists(installed):
    example = f"{DOCS}/examples/nftsync.toml.example"
    key = installed.file("/etc/nftsync/key")
    key.unlink(missing_ok=True)
    missing = installed.run("nftsync", "daemon", "--check", "--config", example, check=False)
    assert missing.returncode != 0 and "/etc/nftsync/key" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    make_key(key.parent)
    ok = installed.run("nftsync", "daemon", "--check", "--config", example)
    assert "configuration is valid" in ok.stdout


class InstalledDaemon(DaemonProc):
    """DaemonProc running the installed /usr/bin/nftsync: `ip netns exec NS chroot ROOT`;
    `ctl` is the installed one too. Socket and key are paths inside the root."""

    cluster = "pkg"

    def __init__(self, root: debroot.Chroot, netns_name: str, name: str, node_id: int,
                 listen: str, peer: str, key: str, workdir: Path, role: str = "backup"):
        super().__init__(netns_name, name, node_id, listen, [peer], Path(key), workdir, role)
        self.root = root
        self.inner_socket = f"/run/nftsync-test/{name}.sock"
        self.socket = root.file(self.inner_socket)

    def start(self) -> InstalledDaemon:
        cmd = self.root.netns_argv(
            self.netns, "/usr/bin/nftsync", "daemon", "--listen", f"{self.listen}:{self.port}",
            "--key-file", str(self.key), "--socket", self.inner_socket, "--node-name",
            self.name, "--node-id", str(self.node_id), "--cluster", self.cluster,
            "--role", self.role, *[a for p in self.peers for a in ("--peer", f"{p}:{self.port}")])
        with open(self.log, "a") as logf:
            self.proc = subprocess.Popen(cmd, stdout=logf, stderr=logf, stdin=subprocess.DEVNULL)
        self.wait(self._answers, self.start_timeout, "the control socket to answer")
        return self

    def ctl(self, *args: str, check: bool = True) -> dict | list:
        p = self.root.run("/usr/bin/nftsync", "ctl", "--socket", self.inner_socket, *args,
                          "--json", check=False, timeout=30)
        if check and (p.returncode not in (0, 1, 2) or not p.stdout.strip()):
            raise AssertionError(f"ctl {args}: rc {p.returncode}: {p.stderr}")
        return json.loads(p.stdout)


def kernel_sessions(ns: str) -> dict[str, int]:
    """client -> mark of http_sessions in namespace `ns`, read by the host's nft."""
    out = netns.run(ns, "nft", "-j", "list", "map", "ip", "nftsync_http", "http_sessions").stdout
    found = {}
    for obj in json.loads(out)["nftables"]:
        for key, value in obj.get("map", {}).get("elem", []):
            found[key["elem"]["val"] if isinstance(key, dict) else key] = value
    return found


@pytest.mark.slow
def test_installed_daemons_replicate_a_session(installed, tmp_path):
    """Two namespaces joined by a veth (private /30, no route out), each running the installed
    nftsync: the farm from the package's examples, a daemon each, a session added with the
    installed CLI on one appears in the other namespace's kernel map."""
    key = make_key(installed.file("/etc/nftsync"), "pair-key")
    inner_key = "/" + str(key.relative_to(installed.path))
    names: list[str] = []
    daemons: list[InstalledDaemon] = []
    try:
        names += [netns.create("pkg"), netns.create("pkg")]
        a, b = names
        subprocess.run(["ip", "-n", a, "link", "add", "sync0", "type", "veth", "peer", "name",
                        "sync0", "netns", b], check=True, timeout=10)
        for ns, addr in ((a, "10.77.0.1/30"), (b, "10.77.0.2/30")):
            netns.run(ns, "ip", "addr", "add", addr, "dev", "sync0")
            netns.run(ns, "ip", "link", "set", "sync0", "up")
        for ns in names:
            apply = subprocess.run(installed.netns_argv(ns, "nftsync", "apply", FARM),
                                   capture_output=True, text=True, timeout=60)
            assert apply.returncode == 0, apply.stderr
        daemons = [InstalledDaemon(installed, a, "pkga", 1, "10.77.0.1", "10.77.0.2", inner_key,
                                   tmp_path, role="active"),
                   InstalledDaemon(installed, b, "pkgb", 2, "10.77.0.2", "10.77.0.1", inner_key,
                                   tmp_path)]
        for d in daemons:
            d.start()
        for d in daemons:
            d.wait(lambda d=d: d.peers_up() >= 1, 30, "the peer connected")
        add = subprocess.run(installed.netns_argv(a, "nftsync", "sessions", "add", "10.10.1.77",
                                                  "0x201", "--expires", "45"),
                             capture_output=True, text=True, timeout=60)
        assert add.returncode == 0, add.stderr
        wait_for(lambda: kernel_sessions(b).get("10.10.1.77") == 0x201, 15,
                 "the session in the other namespace's kernel map")
        listed = json.loads(subprocess.run(
            installed.netns_argv(b, "nftsync", "sessions", "list", "--json"),
            capture_output=True, text=True, timeout=60, check=True).stdout)
        assert "10.10.1.77" in json.dumps(listed)
        assert daemons[1].ctl("status")["health"] == "ok"
    finally:
        for d in daemons:
            d.stop()
        for ns in names:
            netns.delete(ns)
