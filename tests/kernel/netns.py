"""Throw-away network namespaces for tests that need a kernel of their own (no lab topology).

`setns(2)` switches only the calling thread; a socket keeps the namespace it was created in, so a
test can open netlink sockets inside a namespace and then return to the original one.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Iterator

CLONE_NEWNET = 0x40000000


def create(prefix: str = "nst") -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    return name


def delete(name: str) -> None:
    """Kill what still runs in the namespace (pids from `ip netns pids`), then delete it."""
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout
    for pid in pids.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), 9)
    subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


@contextlib.contextmanager
def entered(name: str) -> Iterator[None]:
    """Run the body with this thread inside namespace `name`, then switch back."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/self/ns/net") as home, open(f"/run/netns/{name}") as target:
        if libc.setns(target.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {name}")
        try:
            yield
        finally:
            if libc.setns(home.fileno(), CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")


def run(name: str, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", name, *cmd], check=check, text=True,
                          capture_output=True, **kw)


@contextlib.contextmanager
def linked_pair(prefix: str, addr_a: str, addr_b: str,
                ruleset: str | None = None) -> Iterator[dict[str, str]]:
    """Namespaces "a" and "b" joined by a veth with addr_a/30 and addr_b/30 (no route out), each
    with `ruleset` applied by nftsync when given; deleted afterwards, also when setting up fails.
    """
    import sys

    tag = uuid.uuid4().hex[:6]
    names = {side: f"{prefix}-{tag}-{side}" for side in ("a", "b")}
    made: list[str] = []
    try:
        for name in names.values():
            subprocess.run(["ip", "netns", "add", name], check=True)
            made.append(name)
            subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        devs = {"a": f"{prefix}a{tag}", "b": f"{prefix}b{tag}"}
        subprocess.run(["ip", "link", "add", devs["a"], "netns", names["a"], "type", "veth",
                        "peer", "name", devs["b"], "netns", names["b"]], check=True)
        for side, addr in (("a", addr_a), ("b", addr_b)):
            subprocess.run(["ip", "-n", names[side], "addr", "add", f"{addr}/30", "dev",
                            devs[side]], check=True)
            subprocess.run(["ip", "-n", names[side], "link", "set", devs[side], "up"], check=True)
            if ruleset:
                run(names[side], sys.executable, "-m", "nftsync", "apply", ruleset)
        yield names
    finally:
        for name in made:
            delete(name)  # kills what still runs in it
