"""`nftsync sessions get|list` against the kernel, in a namespace of its own (`scli-<id>`).

The farms come from rulesets/ (large.nft: a 20k-session map; key-srcport.nft: composite keys;
static.nft: pinned clients; inet-ipv6.nft: IPv6 keys), filled with `nft add element`; every
answer of the CLI is checked against `nft -j list map` of the same namespace. The maps do not
change while they are listed (expiries are minutes away), so a listing must be exact: no
element missing or repeated.
"""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import netns
import pytest

ROOT = Path(__file__).resolve().parents[2]
RULESETS = ROOT / "rulesets"
N = 20_000
BACKEND_ADDR = {0x200: "10.20.0.11", 0x201: "10.20.0.12"}
FIELDS = {"farm", "map", "client", "backend", "address", "state", "expires", "timeout"}


def big_client(i: int, base: int = 64) -> str:
    return f"10.{base + (i >> 16)}.{(i >> 8) & 255}.{i & 255}"


def big_element(i: int) -> str:
    mark = 0x200 + i % 2
    if i % 5 == 0:  # its own timeout, longer than the map's 600 s
        return f"{big_client(i)} timeout 900s expires 800s : {mark:#x}"
    return f"{big_client(i)} expires 500s : {mark:#x}"


def order(client: str) -> tuple[int, ...]:
    """An IPv4 address's sort key: address order."""
    return tuple(int(x) for x in client.split("."))


def fill(ns: str, where: str, elements: list[str], chunk: int = 10_000) -> None:
    cmds = "".join(f"add element {where} {{ {', '.join(elements[s:s + chunk])} }}\n"
                   for s in range(0, len(elements), chunk))
    netns.run(ns, "nft", "-f", "-", input=cmds, timeout=300)


def load(ns: str, *rulesets: str) -> None:
    for name in rulesets:
        netns.run(ns, "nft", "-f", str(RULESETS / name))


@pytest.fixture(scope="module")
def farms() -> Iterator[str]:
    """One namespace holding five farms: big (20k timed sessions), srcport (500 addresses x 4
    ports), pinned (3 static + 10 timed), web4/web6 (a few IPv6 sessions)."""
    ns = netns.create("scli")
    try:
        load(ns, "large.nft", "key-srcport.nft", "static.nft", "inet-ipv6.nft")
        fill(ns, "ip nftsync_big big_sessions", [big_element(i) for i in range(N)])
        fill(ns, "ip nftsync_srcport sp_sessions",
             [f"10.10.{i // 250}.{i % 250 + 1} . {40000 + p} expires 100s : {0x200 + p % 2:#x}"
              for i in range(500) for p in range(4)])
        fill(ns, "ip nftsync_pinned pin_sessions",
             [f"10.10.2.{i} expires 100s : 0x200" for i in range(1, 11)])
        fill(ns, "inet nftsync_dual v6_sessions",
             [f"fd00:10::{i:x} expires 100s : 0x201" for i in range(1, 6)])
        yield ns
    finally:
        netns.delete(ns)


def cli(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "nftsync", *args],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    if check:
        assert p.returncode == 0, (args, p.returncode, p.stderr)
    return p


def cli_json(ns: str, *args: str) -> list[dict]:
    return json.loads(cli(ns, *args, "--json").stdout)


def nft_map(ns: str, family: str, table: str, name: str) -> dict[str, dict]:
    """{key text: {"mark", "expires", "timeout"}} from `nft -j list map` (keys as nftsync
    writes them: components joined by ' . ')."""
    out = json.loads(netns.run(ns, "nft", "-j", "list", "map", family, table, name).stdout)
    smap = next(o["map"] for o in out["nftables"] if "map" in o)
    elems: dict[str, dict] = {}
    for key, mark in smap.get("elem", []):
        attrs: dict = {}
        if isinstance(key, dict) and "elem" in key:
            attrs, key = key["elem"], key["elem"]["val"]
        if isinstance(key, dict) and "concat" in key:
            key = " . ".join(str(k) for k in key["concat"])
        elems[str(key)] = {"mark": mark, "expires": attrs.get("expires"),
                           "timeout": attrs.get("timeout", smap.get("timeout"))}
    return elems


def assert_rows_match(rows: list[dict], kernel: dict[str, dict], farm: str, role: str) -> None:
    for r in rows:
        assert set(r) == FIELDS, r
        k = kernel[r["client"]]
        assert (r["farm"], r["map"], int(r["backend"], 16)) == (farm, role, k["mark"]), (r, k)
        assert r["address"] == BACKEND_ADDR[k["mark"]] and r["state"] == "up", r
        assert r["timeout"] == k["timeout"], (r, k)
        if k["expires"] is None:
            assert r["expires"] is None, (r, k)
        else:  # read a moment apart: the kernel's clock went on
            assert k["expires"] - 5 <= r["expires"] <= k["expires"] + 5, (r, k)


# --- get -----------------------------------------------------------------------------------------
def test_get_present_in_a_20k_map(farms):
    kernel = nft_map(farms, "ip", "nftsync_big", "big_sessions")
    for i in (0, 1, 5, 12_345, N - 1):
        rows = cli_json(farms, "sessions", "get", big_client(i))
        assert len(rows) == 1, rows
        assert_rows_match(rows, kernel, "big", "sessions")
    # its own timeout (900 s) is shown, not the map's (600 s)
    assert cli_json(farms, "sessions", "get", big_client(5), "--farm", "big")[0]["timeout"] == 900
    text = cli(farms, "sessions", "get", big_client(7)).stdout.splitlines()
    assert text[0].split() == ["FARM", "MAP", "CLIENT", "BACKEND", "ADDRESS", "STATE", "EXPIRES"]
    assert text[1].split()[:6] == ["big", "sessions", big_client(7), "0x201", "10.20.0.12", "up"]


def test_get_absent_exits_1(farms):
    absent = big_client(N + 10)
    p = cli(farms, "sessions", "get", absent, check=False)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.strip() == f"nftsync: error: farms big, pinned, web4 have no session for " \
                               f"{absent}", p.stderr
    p = cli(farms, "sessions", "get", absent, "--farm", "big", "--json", check=False)
    assert p.returncode == 1 and json.loads(p.stdout) == []
    assert f"farm 'big' has no session for {absent}" in p.stderr
    # a wrong key or farm is a usage error (2), not "absent"
    for args, message in [(("10.64.0.999",), "not a valid ipv4_addr"),
                          (("10.64.0.1", "--farm", "nope"), "no farm 'nope' is loaded")]:
        p = cli(farms, "sessions", "get", *args, check=False)
        assert p.returncode == 2 and message in p.stderr, (args, p.stderr)


def test_get_static(farms):
    kernel = nft_map(farms, "ip", "nftsync_pinned", "pin_static")
    rows = cli_json(farms, "sessions", "get", "10.10.1.2")
    assert [(r["farm"], r["map"], r["expires"], r["timeout"]) for r in rows] == \
        [("pinned", "static", None, None)]
    assert_rows_match(rows, kernel, "pinned", "static")
    # a client pinned and with a timed session: both rows, the pin first (it wins)
    netns.run(farms, "nft", "add", "element", "ip", "nftsync_pinned", "pin_sessions",
              "{ 10.10.1.3 expires 50s : 0x200 }")
    try:
        rows = cli_json(farms, "sessions", "get", "10.10.1.3", "--farm", "pinned")
        assert [(r["map"], r["backend"]) for r in rows] == [("static", "0x201"),
                                                            ("sessions", "0x200")]
    finally:
        netns.run(farms, "nft", "delete", "element", "ip", "nftsync_pinned", "pin_sessions",
                  "{ 10.10.1.3 }")


def test_get_composite_key(farms):
    kernel = nft_map(farms, "ip", "nftsync_srcport", "sp_sessions")
    for spelled in ("10.10.1.7,40002", "10.10.1.7 . 40002", " 10.10.1.7 , 40002 "):
        rows = cli_json(farms, "sessions", "get", spelled)
        assert [r["client"] for r in rows] == ["10.10.1.7 . 40002"], spelled
        assert_rows_match(rows, kernel, "srcport", "sessions")
    p = cli(farms, "sessions", "get", "10.10.1.7,41000", check=False)
    assert p.returncode == 1 and "farm 'srcport' has no session for 10.10.1.7,41000" in p.stderr
    # half a composite key: usage error, with the way to get every session of the address
    p = cli(farms, "sessions", "get", "10.10.1.7", "--farm", "srcport", check=False)
    assert p.returncode == 2 and "nftsync sessions list --client ADDRESS" in p.stderr, p.stderr
    p = cli(farms, "sessions", "get", "10.10.1.7,99999", "--farm", "srcport", check=False)
    assert p.returncode == 2 and "not a valid inet_service" in p.stderr, p.stderr


# --- list ----------------------------------------------------------------------------------------
def test_list_is_the_kernel_map(farms):
    kernel = nft_map(farms, "ip", "nftsync_big", "big_sessions")
    assert len(kernel) == N
    rows = cli_json(farms, "sessions", "list", "--farm", "big")
    assert len(rows) == N and len({r["client"] for r in rows}) == N  # none missing, none twice
    assert {r["client"] for r in rows} == set(kernel)
    assert_rows_match(rows, kernel, "big", "sessions")
    # without --farm: every farm, the static maps with them
    everything = cli_json(farms, "sessions", "list")
    counts = {(f, m): sum(1 for r in everything if (r["farm"], r["map"]) == (f, m))
              for f, m in {(r["farm"], r["map"]) for r in everything}}
    assert counts == {("big", "sessions"): N, ("srcport", "sessions"): 2000,
                      ("pinned", "static"): 3, ("pinned", "sessions"): 10,
                      ("web6", "sessions"): 5}
    assert [r["map"] for r in cli_json(farms, "sessions", "list", "--static")] == ["static"] * 3
    assert {r["farm"] for r in cli_json(farms, "sessions", "list", "--timed")} == \
        {"big", "srcport", "pinned", "web6"}


def test_list_client_prefix_and_backend(farms):
    kernel = nft_map(farms, "ip", "nftsync_big", "big_sessions")
    want = {k for k in kernel if k.startswith("10.64.3.")}
    rows = cli_json(farms, "sessions", "list", "--client", "10.64.3.0/24")
    assert {r["client"] for r in rows} == want and len(rows) == len(want) == 256
    assert_rows_match(rows, kernel, "big", "sessions")
    # an address alone, a prefix that is not on a byte boundary, one that is not normalised
    assert [r["client"] for r in cli_json(farms, "sessions", "list", "--client",
                                          "10.64.3.7")] == ["10.64.3.7"]
    wide = {r["client"] for r in cli_json(farms, "sessions", "list", "--client", "10.64.8.0/21")}
    assert wide == {k for k in kernel if 8 <= int(k.split(".")[2]) <= 15}
    assert len({r["client"] for r in cli_json(farms, "sessions", "list", "--client",
                                              "10.64.3.77/24")}) == 256
    # a prefix of at most 65536 addresses is read by looking up each (address order), a wider
    # one by a dump of the map (hash order): the same sessions either way
    looked_up = [r["client"] for r in cli_json(farms, "sessions", "list", "--farm", "big",
                                               "--client", "10.64.0.0/16")]
    dumped = [r["client"] for r in cli_json(farms, "sessions", "list", "--farm", "big",
                                            "--client", "10.64.0.0/15")]
    assert len(looked_up) == len(dumped) == N and set(looked_up) == set(dumped) == set(kernel)
    assert looked_up == sorted(looked_up, key=order) and dumped != sorted(dumped, key=order)
    # --backend by mark and by address, alone and with --client
    on_201 = {k for k, e in kernel.items() if e["mark"] == 0x201}
    assert {r["client"] for r in cli_json(farms, "sessions", "list", "--farm", "big",
                                          "--backend", "0x201")} == on_201
    both = cli_json(farms, "sessions", "list", "--client", "10.64.3.0/24", "--backend",
                    "10.20.0.11")
    assert {r["client"] for r in both} == {k for k in want if kernel[k]["mark"] == 0x200}
    assert len(both) == 128
    # composite keys: the prefix is on the address, every port comes
    rows = cli_json(farms, "sessions", "list", "--client", "10.10.1.7")
    assert sorted(r["client"] for r in rows) == [f"10.10.1.7 . {40000 + p}" for p in range(4)]
    rows = cli_json(farms, "sessions", "list", "--client", "10.10.1.0/24")
    # srcport: 10.10.1.1-250, 4 ports each; pinned: the 3 pins of 10.10.1.1-3
    assert sorted((r["farm"], r["map"]) for r in rows).count(("srcport", "sessions")) == 1000
    assert {r["client"] for r in rows if r["farm"] == "pinned"} == \
        {"10.10.1.1", "10.10.1.2", "10.10.1.3"}
    # IPv6: only the maps keyed by IPv6 addresses are read
    rows = cli_json(farms, "sessions", "list", "--client", "fd00:10::/64")
    assert sorted(r["client"] for r in rows) == [f"fd00:10::{i:x}" for i in range(1, 6)]
    assert {r["address"] for r in rows} == {"fd00:20::12"}


def test_list_limit(farms):
    kernel = nft_map(farms, "ip", "nftsync_big", "big_sessions")
    rows = cli_json(farms, "sessions", "list", "--farm", "big", "--limit", "7")
    assert len(rows) == 7 and len({r["client"] for r in rows}) == 7
    assert_rows_match(rows, kernel, "big", "sessions")
    for prefix in ("10.64.3.0/24", "10.64.0.0/15"):  # looked up, dumped
        rows = cli_json(farms, "sessions", "list", "--client", prefix, "--backend", "0x200",
                        "--limit", "100")
        assert len(rows) == len({r["client"] for r in rows}) == 100
        assert all(r["client"] in kernel and kernel[r["client"]]["mark"] == 0x200 and
                   (prefix.endswith("/15") or r["client"].startswith("10.64.3.")) for r in rows)
    # the limit counts across maps: the 3 pins, then 2 timed sessions
    rows = cli_json(farms, "sessions", "list", "--farm", "pinned", "--limit", "5")
    assert [r["map"] for r in rows] == ["static"] * 3 + ["sessions"] * 2
    text = cli(farms, "sessions", "list", "--farm", "big", "--limit", "3").stdout.splitlines()
    assert len(text) == 4 and text[0].startswith("FARM") and \
        all(line.split()[0] == "big" for line in text[1:])


def test_list_json_shape(farms):
    """A JSON array with one object per line: a script can json.load() the whole of it or read
    it line by line (strip the trailing comma) without holding the listing."""
    out = cli(farms, "sessions", "list", "--farm", "srcport", "--json").stdout
    lines = out.splitlines()
    assert lines[0] == "[" and lines[-1] == "]" and len(lines) == 2002
    rows = [json.loads(line.rstrip(",")) for line in lines[1:-1]]
    assert json.loads(out) == rows
    r = rows[0]
    assert set(r) == FIELDS and isinstance(r["expires"], int) and r["timeout"] == 120
    assert r["map"] == "sessions" and r["backend"].startswith("0x")
    empty = cli(farms, "sessions", "list", "--farm", "big", "--static", "--json").stdout
    assert empty == "[]\n"
    assert cli(farms, "sessions", "list", "--farm", "big", "--static").stdout == "no sessions\n"


def test_list_refuses_filters_that_fit_nothing(farms):
    for args, message in [
        (("--client", "10.64.0.0/33"), "not an address or prefix"),
        (("--client", "10.10.1.7,40000"), "nftsync sessions get"),
        (("--farm", "big", "--client", "fd00::/8"), "do not start with one"),
        (("--farm", "big", "--backend", "0x2ff"), "has no backend '0x2ff'"),
        (("--backend", "10.99.0.1"), "has no backend '10.99.0.1'"),
        (("--limit", "0"), "not in the range"),
    ]:
        p = cli(farms, "sessions", "list", *args, check=False)
        assert p.returncode == 2 and message in p.stderr, (args, p.returncode, p.stderr)
        assert p.stdout == "", (args, p.stdout)


def test_progress_never_shares_a_line_with_rows(farms):
    """On a terminal (stdout and stderr the same pty) the progress line is drawn and cleared
    before each row: what the terminal shows is the rows, each on a clean line."""
    master, slave = pty.openpty()
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="200")
    p = subprocess.Popen(["ip", "netns", "exec", farms, sys.executable, "-m", "nftsync",
                          "sessions", "list", "--farm", "big", "--backend", "0x200"],
                         stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env, cwd=ROOT)
    os.close(slave)
    raw = b""
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 1)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the other side closed
                    break
                if not chunk:
                    break
                raw += chunk
            elif p.poll() is not None:
                break
    finally:
        os.close(master)
        p.wait(10)
    assert p.returncode == 0
    text = raw.decode()
    assert "big, sessions map: read:" in text, "no progress was drawn"
    shown = []
    for line in text.replace("\r\n", "\n").split("\n"):
        screen = ""
        for part in line.split("\r"):  # each \r returns to column 0 and overwrites
            screen = part + screen[len(part):]
        shown.append(screen.rstrip())
    assert shown[-1] == "", "the progress line was not cleared at the end"
    assert shown[0].split() == ["FARM", "MAP", "CLIENT", "BACKEND", "ADDRESS", "STATE",
                                "EXPIRES"], shown[0]
    rows = shown[1:-1]
    kernel = nft_map(farms, "ip", "nftsync_big", "big_sessions")
    want = {k for k, e in kernel.items() if e["mark"] == 0x200}
    assert len(want) == N // 2
    bad = [r for r in rows if r.split()[:2] != ["big", "sessions"] or len(r.split()) != 7]
    assert not bad, bad[:3]
    assert sorted(r.split()[2] for r in rows) == sorted(want)


# --- memory --------------------------------------------------------------------------------------
#: Peak RSS a listing of 200k sessions may reach. Measured: ~27 MiB streamed; the listing through
#: libnftables JSON it replaced took ~690 MiB. Wide margin: no timing, only memory.
RSS_BOUND_KIB = 120 * 1024


#: Runs argv[1:] as a grandchild and prints its peak RSS (KiB) last on stderr. Why not wait4 on
#: the child pytest starts: subprocess vforks, and exec records the old address space's peak in
#: the new program's ru_maxrss, so that figure would be pytest's own peak (200+ MiB late in a
#: full run), not nftsync's. A fork of this small interpreter carries only its few MiB.
_PEAK_RSS = (
    "import os, sys\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    os.execvp(sys.argv[1], sys.argv[1:])\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "print(usage.ru_maxrss, file=sys.stderr)\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def test_listing_200k_sessions_stays_small(tmp_path):
    ns = netns.create("scli")
    try:
        load(ns, "large.nft")
        n = 200_000
        fill(ns, "ip nftsync_big big_sessions",
             [f"{big_client(i, 32)} expires 500s : {0x200 + i % 2:#x}" for i in range(n)])
        out = tmp_path / "list.json"
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        with out.open("w") as f:
            proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", _PEAK_RSS,
                                   sys.executable, "-m", "nftsync", "sessions", "list", "--json"],
                                  stdout=f, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        with out.open() as f:
            rows = json.load(f)
        assert len(rows) == n and len({r["client"] for r in rows}) == n
        peak_kib = int(proc.stderr.split()[-1])
        print(f"\nlisting 200k sessions: peak RSS {peak_kib} KiB")
        assert peak_kib < RSS_BOUND_KIB, f"listing 200k sessions peaked at {peak_kib} KiB"
    finally:
        netns.delete(ns)
