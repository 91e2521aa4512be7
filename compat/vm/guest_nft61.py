"""Runs inside the qemu VM (stage 4, `compat/vm/run.sh -N`): Debian's 6.1 kernel, chrooted into
the host's root shared read-only over 9p. Checks that nftsync takes its pre-6.12 path there and
that the path is correct against the real kernel; and turns the guest pytest's junit XML into
`RESULT <name> PASS|FAIL <detail>` lines that tests/kernel/vm/test_nft_61_vm.py reads from the
console.

    guest_nft61.py checks          # the direct checks, in a network namespace of their own
    guest_nft61.py junit FILE RC   # one RESULT line per test case in FILE, and pytest's RC

Why a direct check besides the real tests: on 6.1 `add element` of an existing key with the same
value and an explicit `expires` is a silent no-op, so a refresh written as a plain add would
"succeed" and change nothing. The check reads the expiry back through `nft -j list map` before
and after, so it fails if the refresh is lost.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import traceback
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

results: list[tuple[str, bool, str]] = []
TABLE, MAP = "nft61", "sessions"
KEY, MARK = "10.61.0.7", 0x200
MAX_JUNIT_BYTES = 4 << 20
# Tests that assert what kernels >= 6.12 do, so fail on 6.1 by design: reported as XFAIL (with
# the failure) when they fail. The 6.1 behaviour itself is asserted by a check of this file.
KNOWN_KERNEL_DIFFERENCES = {
    "tests/kernel/test_nft_events.py::test_refresh_and_readd":
        "asserts the >= 6.12 in-place refresh (a NEWSETELEM for a re-add with `expires`); on 6.1 "
        "that re-add is a silent no-op (no event, expiry unchanged), which "
        "nft61_plain_add_does_not_refresh asserts",
}


def check(name: str) -> Callable[[Callable[[], str]], None]:
    def run(fn: Callable[[], str]) -> None:
        try:
            results.append((name, True, fn()))
        except Exception as exc:  # noqa: BLE001 - any failure is a FAIL line, never a crash
            tb = traceback.format_exception_only(type(exc), exc)[-1].strip()
            results.append((name, False, tb))
    return run


def nft(*args: str) -> str:
    p = subprocess.run(["nft", *args], capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise AssertionError(f"nft {' '.join(args)}: {p.stderr.strip()}")
    return p.stdout


def listed() -> dict[str, dict]:
    """`nft -j list map`: key -> {"mark", "expires", "timeout"} (JSON, as the product reads it)."""
    out = json.loads(nft("-j", "list", "map", "ip", TABLE, MAP))
    for obj in out["nftables"]:
        if "map" in obj:
            elems = obj["map"].get("elem", []) or []
            got = {}
            for key, value in elems:
                attrs = key["elem"] if isinstance(key, dict) else {"val": key}
                got[attrs["val"]] = {"mark": value, "expires": attrs.get("expires"),
                                     "timeout": attrs.get("timeout")}
            return got
    raise AssertionError(f"no map in {out}")


def reset(expires: int) -> None:
    """The map with one session expiring in `expires` s (map timeout 60 s)."""
    subprocess.run(["nft", "delete", "table", "ip", TABLE], capture_output=True, timeout=30)
    nft("add", "table", "ip", TABLE)
    nft("add", "map", "ip", TABLE, MAP, "{ type ipv4_addr : mark; flags dynamic,timeout; "
        'timeout 60s; comment "nftsync:sessions farm=nft61"; }')
    nft("add", "element", "ip", TABLE, MAP, f"{{ {KEY} expires {expires}s : {MARK:#x} }}")
    got = listed()[KEY]
    assert got["mark"] == MARK and got["expires"] <= expires, f"after the first add: {got}"


def inner() -> None:
    """The checks, run inside a fresh network namespace."""
    from nftsync.daemon.farms import ReplicatedMap
    from nftsync.daemon.nftsink import NftSink
    from nftsync.model import MapRef, Role, Session, SessionMap
    from nftsync.replication import ElementOp
    from nftsync.tables.nftmap import NftSessionMap, kernel_refreshes_expiry

    smap = SessionMap(ref=MapRef("ip", TABLE, MAP), role=Role.SESSIONS, farm="nft61",
                      key_type=("ipv4_addr",), value_type="mark", timeout=60)

    @check("nft61_kernel_is_6_1")
    def _() -> str:
        release = os.uname().release
        assert release.startswith("6.1."), f"uname -r is {release}, not a 6.1 kernel"
        return release

    @check("nft61_refresh_path_is_delete_add")
    def _() -> str:
        assert kernel_refreshes_expiry() is False, "kernel_refreshes_expiry() is True on 6.1"
        sink = NftSink()
        assert sink.refresh_in_place is False, "NftSink.refresh_in_place is True on 6.1"
        text = sink._commands(ReplicatedMap(smap, None),
                              [ElementOp(socket.inet_aton(KEY), MARK, 50_000, MARK)])
        assert text.startswith(f"delete element ip {TABLE} {MAP}"), text
        return f"kernel_refreshes_expiry() False; sink writes: {text!r}"

    @check("nft61_plain_add_does_not_refresh")
    def _() -> str:
        # The kernel fact the delete+add path exists for (docs/kernels.md, "Refresh in place").
        reset(10)
        before = listed()[KEY]["expires"]
        nft("add", "element", "ip", TABLE, MAP, f"{{ {KEY} expires 50s : {MARK:#x} }}")
        after = listed()[KEY]["expires"]
        assert after <= before, f"6.1 refreshed in place: expires {before} -> {after}"
        return f"plain add of the same value: expires {before} -> {after} s (unchanged)"

    @check("nft61_sink_refresh_changes_expiry")
    def _() -> str:
        # Both write paths of the sink: netlink batches (SetElemWriter, the daemon's) and
        # libnftables text (retries, unsupported maps). Each decides delete + add the same way.
        seen = []
        for netlink in (True, False):
            reset(10)
            before = listed()[KEY]["expires"]
            sink = NftSink(netlink=netlink)
            sink.apply(ReplicatedMap(smap, None),
                       [ElementOp(socket.inet_aton(KEY), MARK, 50_000, MARK)])
            after = listed()[KEY]
            assert sink.stats.failed == 0, sink.stats.last_error
            assert after["mark"] == MARK, after
            assert 40 <= after["expires"] <= 50, (
                f"netlink={netlink}: expires {before} -> {after['expires']} s")
            seen.append(f"{'netlink' if netlink else 'libnftables'} {before} -> "
                        f"{after['expires']} s")
        return "NftSink refresh: " + ", ".join(seen)

    @check("nft61_in_place_path_would_lose_refresh")
    def _() -> str:
        # Negative control: the >= 6.12 path forced on this kernel loses the refresh, so the
        # check above can fail and the version switch is what makes it pass.
        seen = []
        for netlink in (True, False):
            reset(10)
            before = listed()[KEY]["expires"]
            sink = NftSink(netlink=netlink)
            sink.refresh_in_place = True
            sink.apply(ReplicatedMap(smap, None),
                       [ElementOp(socket.inet_aton(KEY), MARK, 50_000, MARK)])
            after = listed()[KEY]["expires"]
            assert after <= before, (
                f"netlink={netlink}: in-place refresh worked here: expires {before} -> {after}")
            seen.append(f"{'netlink' if netlink else 'libnftables'} {before} -> {after} s")
        return "in-place path forced, refresh lost as expected: " + ", ".join(seen)

    @check("nft61_other_value_is_refused")
    def _() -> str:
        # Why a backend move is delete + add on every kernel: a plain add of another value fails.
        reset(10)
        p = subprocess.run(["nft", "add", "element", "ip", TABLE, MAP,
                            f"{{ {KEY} expires 50s : 0x201 }}"], capture_output=True, text=True,
                           timeout=60)
        after = listed()[KEY]
        assert p.returncode != 0, f"add of another value succeeded: {after}"
        assert after["mark"] == MARK and after["expires"] <= 10, after
        return f"refused: {p.stderr.strip().splitlines()[0] if p.stderr.strip() else p.returncode}"

    @check("nft61_sink_new_mark_and_expiry")
    def _() -> str:
        reset(10)
        sink = NftSink()
        sink.apply(ReplicatedMap(smap, None),
                   [ElementOp(socket.inet_aton(KEY), 0x201, 45_000, MARK)])
        after = listed()[KEY]
        assert sink.stats.failed == 0, sink.stats.last_error
        assert after["mark"] == 0x201 and 35 <= after["expires"] <= 45, after
        return f"NftSink move to 0x201: {after}"

    @check("nft61_nftmap_replace_changes_expiry")
    def _() -> str:
        reset(10)
        before = listed()[KEY]["expires"]
        existed = NftSessionMap(smap).replace(Session(key=(KEY,), mark=MARK, expires=55))
        after = listed()[KEY]
        assert existed, "replace() said the key was absent"
        assert after["mark"] == MARK and 45 <= after["expires"] <= 55, after
        return f"NftSessionMap.replace: expires {before} -> {after['expires']} s"

    @check("nft61_sink_longer_than_map_timeout")
    def _() -> str:
        # Beyond the map's 60 s: the element gets its own timeout (timeout Xms expires Xms).
        reset(10)
        sink = NftSink()
        sink.apply(ReplicatedMap(smap, None),
                   [ElementOp(socket.inet_aton(KEY), MARK, 90_000, MARK)])
        after = listed()[KEY]
        assert sink.stats.failed == 0, sink.stats.last_error
        assert after["timeout"] == 90 and 80 <= after["expires"] <= 90, after
        return f"refresh to 90 s in a 60 s map: {after}"

    @check("nft61_packet_path_update_refreshes")
    def _() -> str:
        # What keeps a client's session alive: the rule's `update @map` on each packet. An
        # element at 10 s in a 60 s map; one UDP datagram to it over lo must reset it to ~60 s.
        reset(10)
        nft("add", "chain", "ip", TABLE, "out", "{ type filter hook output priority 0; }")
        nft("add", "rule", "ip", TABLE, "out", "ip", "daddr", KEY, "update", f"@{MAP}",
            "{", "ip", "daddr", ":", f"{MARK:#x}", "}")
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True, timeout=30)
        subprocess.run(["ip", "addr", "add", f"{KEY}/32", "dev", "lo"], check=True, timeout=30)
        before = listed()[KEY]["expires"]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"x", (KEY, 9))
        after = listed()[KEY]
        events = Path("/proc/sys/net/netfilter/nf_conntrack_events").read_text().strip()
        assert after["mark"] == MARK and after["expires"] >= 50, f"{before} -> {after}"
        return (f"update @map from the packet path: expires {before} -> {after['expires']} s; "
                f"nf_conntrack_events={events}")

    @check("nft61_cli_refresh_and_reapply_keep_expiry")
    def _() -> str:
        # The CLI on 6.1: `sessions add` of an existing client with the same backend and a new
        # expiry must move the expiry; re-applying the farm with a new map timeout re-creates
        # the map and must carry the session over with what was left of its expiry, i.e. the
        # expiry before minus the time the apply took (bounded by the measured elapsed time,
        # so a slow VM does not blur it).
        farm = Path("rulesets/farm-http.nft").read_text()
        work = Path(os.environ.get("TMPDIR", "/tmp")) / f"nft61-{os.getpid()}"
        work.mkdir()
        short, longer = work / "farm.nft", work / "longer.nft"
        short.write_text(farm)
        longer.write_text(farm.replace("timeout 60s", "timeout 90s"))

        def cli(*args: str) -> str:
            p = subprocess.run([sys.executable, "-m", "nftsync", *args], capture_output=True,
                               text=True, timeout=120)
            assert p.returncode == 0, f"nftsync {' '.join(args)}: {p.stderr.strip()}"
            return p.stdout

        def elems() -> dict[str, dict]:
            out = json.loads(nft("-j", "list", "map", "ip", "nftsync_http", "http_sessions"))
            objs = [o["map"] for o in out["nftables"] if "map" in o]
            got = {}
            for key, value in objs[0].get("elem", []) or []:
                attrs = key["elem"] if isinstance(key, dict) else {"val": key}
                got[attrs["val"]] = (value, attrs.get("expires"))
            return got

        client = "10.10.1.40"
        # Only this farm in the namespace (the checks above leave their table behind).
        subprocess.run(["nft", "delete", "table", "ip", TABLE], capture_output=True, timeout=30)
        try:
            cli("apply", str(short), "--json")
            cli("sessions", "add", client, "0x201", "--expires", "10")
            first = elems()[client]
            cli("sessions", "add", client, "0x201", "--expires", "50")
            refreshed = elems()[client]
            assert first[0] == refreshed[0] == 0x201, (first, refreshed)
            assert first[1] <= 10 and refreshed[1] >= 40, f"sessions add: {first} -> {refreshed}"
            before = elems()[client][1]
            t0 = time.monotonic()
            out = json.loads(cli("apply", str(longer), "--json"))
            elapsed = time.monotonic() - t0
            after = elems()
            assert out["applied"] and out["restored"] == {"ip nftsync_http http_sessions": 1}, out
            assert list(after) == [client] and after[client][0] == 0x201, after
            low, high = before - elapsed - 2, before + 1
            assert low <= after[client][1] <= high, (
                f"re-apply: expires {before} -> {after[client][1]} s, apply took {elapsed:.1f} s")
            timeout = json.loads(nft("-j", "list", "map", "ip", "nftsync_http", "http_sessions"))
            assert [o["map"]["timeout"] for o in timeout["nftables"] if "map" in o] == [90]
        finally:
            subprocess.run(["nft", "delete", "table", "ip", "nftsync_http"], capture_output=True,
                           timeout=30)
            shutil.rmtree(work)
        return (f"sessions add 10 s -> {refreshed[1]} s; re-apply (timeout 60 s -> 90 s, "
                f"{elapsed:.1f} s): expires {before} -> {after[client][1]} s")

    subprocess.run(["nft", "delete", "table", "ip", TABLE], capture_output=True, timeout=30)
    for name, ok, detail in results:
        print(f"RESULT {name} {'PASS' if ok else 'FAIL'} {detail}", flush=True)


def checks() -> int:
    """Run `inner` in a throw-away namespace (deleted even when a check fails)."""
    name = f"nft61-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        p = subprocess.run(["ip", "netns", "exec", name, sys.executable, __file__, "inner"],
                           timeout=300, text=True, capture_output=True)
        sys.stdout.write(p.stdout)
        if p.returncode != 0:
            last = (p.stderr.strip().splitlines() or ["(no stderr)"])[-1]
            print(f"RESULT nft61_checks_ran FAIL exit {p.returncode}: {last}")
        return p.returncode
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def junit(path: str, rc: int) -> int:
    """One `RESULT pytest:<file>::<test> PASS|FAIL|XFAIL` line per test case, then
    `nft61_pytest_exit`: PASS when pytest's only failures are known kernel differences. Skips
    are FAILs too (the guest has what the selected tests need: a skip means the stage broke)."""
    with open(path, "rb") as fh:
        data = fh.read(MAX_JUNIT_BYTES + 1)
    if len(data) > MAX_JUNIT_BYTES:
        print(f"RESULT nft61_pytest_exit FAIL {path} is larger than {MAX_JUNIT_BYTES} bytes")
        return 1
    root = ET.fromstring(data)
    bad, known, cases = 0, 0, 0
    for case in root.iter("testcase"):
        cases += 1
        test_id = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        name = f"pytest:{test_id}"
        problem = next((case.find(t) for t in ("failure", "error", "skipped")
                        if case.find(t) is not None), None)
        if problem is None:
            print(f"RESULT {name} PASS {case.get('time', '?')} s")
            continue
        msg = " ".join((problem.get("message") or problem.text or problem.tag).split())
        if problem.tag == "failure" and test_id in KNOWN_KERNEL_DIFFERENCES:
            known += 1
            print(f"RESULT {name} XFAIL {KNOWN_KERNEL_DIFFERENCES[test_id]}: {msg[:300]}")
            continue
        bad += 1
        print(f"RESULT {name} FAIL {problem.tag}: {msg[:400]}")
        for line in (problem.text or "").strip().splitlines()[-25:]:
            print(f"INFO {name}: {line[:300]}")
    # pytest exits 1 for failed tests; anything else (2 interrupted, 137 killed...) is a failure
    # of the run itself even if the XML looks clean.
    ok = bad == 0 and cases > 0 and (rc == 0 or (rc == 1 and known > 0))
    print(f"RESULT nft61_pytest_exit {'PASS' if ok else 'FAIL'} pytest exit {rc}: {cases} "
          f"cases, {bad} failed, {known} known kernel difference(s)")
    return 0 if ok else 1


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode == "inner":
        inner()
    elif mode == "checks":
        sys.exit(checks())
    elif mode == "junit" and len(sys.argv) == 4 and sys.argv[3].isdigit():
        sys.exit(junit(sys.argv[2], int(sys.argv[3])))
    else:
        sys.exit("usage: guest_nft61.py checks | junit FILE RC")
