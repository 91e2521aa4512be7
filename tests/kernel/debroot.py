"""A clean Debian root for testing the nftsync package as a user installs it.

The root is `mmdebstrap --variant=minbase` of the host's Debian suite, from the host's own apt
mirror (/etc/apt/sources.list*), plus the tools the test itself uses inside (systemd for
`systemd-analyze verify`, man-db for `man`). Making it takes a mirror round and ~15 s, so it is
cached as a tarball outside the repository (NFTSYNC_CI_CACHE, default /var/cache/nftsync-ci/),
named by a hash of what went into it: a changed mirror or package list makes a new one. Each test
unpacks a fresh copy, so nothing a test installs leaks into the next.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

CACHE = Path(os.environ.get("NFTSYNC_CI_CACHE", "/var/cache/nftsync-ci"))
INCLUDE = ("systemd", "man-db")  # test tools only: nftsync's own Depends come from the .deb
COMPONENT = "main"


def host_suite() -> str:
    """The host's Debian codename (bookworm on the CI VM): the package is built for it."""
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip('"')
    raise RuntimeError("/etc/os-release names no VERSION_CODENAME")


def _deb822(text: str) -> Iterator[tuple[list[str], list[str], list[str], list[str]]]:
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, value = line.split(":", 1)
            fields[key.strip().lower()] = value.strip()
        yield (fields.get("types", "").split(), fields.get("uris", "").split(),
               fields.get("suites", "").split(), fields.get("components", "").split())


def _one_line(text: str) -> Iterator[tuple[list[str], list[str], list[str], list[str]]]:
    for line in text.splitlines():
        words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
        if len(words) >= 4:
            yield [words[0]], [words[1]], [words[2]], words[3:]


def mirror_lines(suite: str) -> list[str]:
    """`deb URI SUITE main` for each of the host's sources of `suite` and its -updates and
    -security (not backports, not third-party repositories)."""
    wanted = {suite, f"{suite}-updates", f"{suite}-security"}
    lines: list[str] = []
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in files:
        if path.suffix == ".sources":
            entries = _deb822(path.read_text())
        elif path.name == "sources.list" or path.suffix == ".list":
            entries = _one_line(path.read_text()) if path.exists() else iter(())
        else:
            continue
        for types, uris, suites, components in entries:
            if "deb" not in types or COMPONENT not in components:
                continue
            for uri in uris:
                for s in suites:
                    line = f"deb {uri} {s} {COMPONENT}"
                    if s in wanted and line not in lines:
                        lines.append(line)
    if not any(line.split()[2] == suite for line in lines):
        raise RuntimeError(f"no apt source for Debian {suite} {COMPONENT} in "
                           "/etc/apt/sources.list*")
    return lines


@dataclass
class Tarball:
    path: Path
    made_seconds: float | None  # None: taken from the cache


def cached_root(timeout: float = 900) -> Tarball:
    """The root tarball, made now if the cache has none for this suite, mirror and package list.
    One maker at a time (a lock file); an old tarball of another recipe is removed."""
    suite = host_suite()
    recipe = {"suite": suite, "variant": "minbase", "include": INCLUDE,
              "mirrors": mirror_lines(suite)}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"{suite}-minbase-{key}.tar"
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return Tarball(path, None)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tar")
        start = time.monotonic()
        try:
            subprocess.run(["mmdebstrap", "--quiet", "--variant=minbase", "--format=tar",
                            f"--include={','.join(INCLUDE)}", suite, str(tmp),
                            *recipe["mirrors"]], check=True, timeout=timeout,
                           capture_output=True, text=True)
        except subprocess.CalledProcessError as exc:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"mmdebstrap failed: {exc.stderr[-2000:]}") from None
        tmp.rename(path)
        for old in CACHE.glob(f"{suite}-minbase-*.tar"):
            if old != path:
                old.unlink()
        return Tarball(path, time.monotonic() - start)


@dataclass
class Chroot:
    """An unpacked root with /proc, /dev and /sys mounted; `run` runs a command inside it."""

    path: Path
    mounts: list[Path] = field(default_factory=list)

    def argv(self, *cmd: str) -> list[str]:
        return ["chroot", str(self.path), *cmd]

    def netns_argv(self, netns: str, *cmd: str) -> list[str]:
        """A command inside the root and inside network namespace `netns` (ip netns exec runs
        on the host, then chroot: the namespace's name resolves in the host's /run/netns)."""
        return ["ip", "netns", "exec", netns, *self.argv(*cmd)]

    def run(self, *cmd: str, check: bool = True, timeout: float = 120,
            **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(self.argv(*cmd), capture_output=True, text=True, timeout=timeout,
                              env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
                                   "DEBIAN_FRONTEND": "noninteractive", "HOME": "/root"}, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"in the root: {' '.join(cmd)}: rc {proc.returncode}\n"
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def file(self, inside: str) -> Path:
        return self.path / inside.lstrip("/")

    def _mount(self, *args: str, target: str) -> None:
        where = self.file(target)
        subprocess.run(["mount", *args, str(where)], check=True, timeout=30)
        self.mounts.append(where)

    def unmount(self) -> None:
        """Unmount everything mounted under the root, innermost first; raise if any stays."""
        for where in reversed(self.mounts):
            subprocess.run(["umount", "-R", str(where)], check=False, timeout=30)
        left = [ln for ln in subprocess.run(["findmnt", "-rn", "-o", "TARGET"],
                                            capture_output=True, text=True).stdout.splitlines()
                if ln == str(self.path) or ln.startswith(f"{self.path}/")]
        if left:
            raise RuntimeError(f"still mounted under the test root: {left}")
        self.mounts.clear()


@contextlib.contextmanager
def unpacked(tarball: Path, where: Path) -> Iterator[Chroot]:
    """The root unpacked at `where`, with /proc, /dev (recursive, slave) and /sys mounted and
    the host's resolv.conf (apt reaches the mirror); unmounted and deleted afterwards. The tree
    is deleted only once nothing is mounted under it."""
    where.mkdir(parents=True)
    subprocess.run(["tar", "-C", str(where), "-xf", str(tarball)], check=True, timeout=300)
    root = Chroot(where)
    try:
        root._mount("-t", "proc", "proc", target="/proc")
        root._mount("--rbind", "/dev", target="/dev")
        subprocess.run(["mount", "--make-rslave", str(root.file("/dev"))], check=True)
        root._mount("--bind", "/sys", target="/sys")
        root.file("/etc/resolv.conf").unlink(missing_ok=True)  # may be a dangling symlink
        shutil.copyfile("/etc/resolv.conf", root.file("/etc/resolv.conf"))
        yield root
    finally:
        root.unmount()
        shutil.rmtree(where)
