"""Runs inside the qemu VM (Debian 6.1 kernel, patched xt_recent), chrooted into the host's root
shared read-only over 9p: the nftsync adapter's patched path against a kernel that has it.

Prints `RESULT <name> PASS|FAIL <detail>` lines like guest-test.sh. Uses iptables-legacy (the VM
has no nf_tables modules loaded) and the initial network namespace (the VM is throw-away).
"""

from __future__ import annotations

import json
import subprocess
import sys
import traceback
from collections.abc import Callable

from nftsync.compat.clock import KernelClock
from nftsync.compat.xtrecent import (
    RecentSession,
    TableFullError,
    XtRecentTable,
    ip_list_tot,
    probe_patched,
)

IPT = "iptables-legacy"
results: list[tuple[str, bool, str]] = []


def check(name: str) -> Callable[[Callable[[], str]], None]:
    def run(fn: Callable[[], str]) -> None:
        try:
            detail = fn()
            results.append((name, True, detail))
        except Exception as exc:  # noqa: BLE001 - any failure is a FAIL line, never a crash
            tb = traceback.format_exception_only(type(exc), exc)[-1].strip()
            results.append((name, False, tb))
    return run


def make_table(name: str) -> None:
    subprocess.run([IPT, "-w", "-A", "INPUT", "-m", "recent", "--name", name, "--rcheck",
                    "--seconds", "100"], check=True)


def main() -> int:
    clock = KernelClock.detect()
    patched, why = probe_patched(IPT)

    @check("adapter_probe_present")
    def _() -> str:
        assert patched is True, why
        return why

    make_table("ad")
    t = XtRecentTable("ad", 100, clock=clock, patched=bool(patched))

    @check("adapter_add_remaining_exact")
    def _() -> str:
        res = t.add("192.0.2.1", remaining_s=40)
        assert res.method == "stamps" and res.exact, res
        e = t.get("192.0.2.1")
        assert e is not None and e.hits == 1 and e.stamps == res.stamps, e
        rem = e.remaining_s(100, clock, clock.now())
        assert 39.0 < rem <= 40.0, rem
        return f"remaining={rem:.3f}"

    @check("adapter_session_ages_ipv6")
    def _() -> str:
        t.add_session(RecentSession("2001:db8::9", (30.0, 20.0, 10.0), ttl=64))
        e = t.get("2001:db8::9")
        assert e is not None and e.ttl == 64 and e.hits == 3, e
        ages = [clock.age_s(s, clock.now()) for s in e.stamps]
        assert all(abs(a - w) < 1.0 for a, w in zip(ages, (30, 20, 10), strict=True)), ages
        [s] = [s for s in t.sessions() if s.addr == "2001:db8::9"]
        assert 89.0 < s.remaining_s <= 90.0, s
        return f"ages={[round(a, 2) for a in ages]}"

    @check("adapter_snapshot_restore_exact")
    def _() -> str:
        before = sorted(t.list(), key=lambda e: e.addr)
        t.flush()
        assert t.list() == []
        for e in before:
            t.add(e.addr, stamps=e.stamps, ttl=e.ttl)
        after = sorted(t.list(), key=lambda e: e.addr)
        assert [(e.addr, e.ttl, e.stamps) for e in after] == \
            [(e.addr, e.ttl, e.stamps) for e in before], (before, after)
        return f"{len(after)} entries"

    @check("adapter_full_ring_order")
    def _() -> str:
        now = clock.now()
        stamps = [now - 31 + i for i in range(32)]
        t.add("192.0.2.3", stamps=stamps)
        e = t.get("192.0.2.3")
        assert e is not None and list(e.stamps) == stamps and e.index == 1, e
        return "32 stamps, oldest first"

    @check("adapter_add_many_exact")
    def _() -> str:
        make_table("many")
        m = XtRecentTable("many", 100, clock=clock, patched=True)
        batch = [RecentSession(f"10.4.0.{i + 1}", (10.0, 5.0), ttl=i % 256) for i in range(50)]
        res = m.add_many(batch)
        assert all(r.exact for r in res)
        got = {e.addr: e for e in m.list()}
        now = clock.now()
        for s in batch:
            e = got[s.addr]
            ages = [clock.age_s(x, now) for x in e.stamps]
            assert e.ttl == s.ttl and len(ages) == 2, e
            assert abs(ages[0] - 10) < 1 and abs(ages[1] - 5) < 1, ages
        return f"{len(got)} entries"

    @check("adapter_table_full")
    def _() -> str:
        make_table("full")
        f = XtRecentTable("full", 100, clock=clock, patched=True)
        cap = ip_list_tot()
        now = clock.now()
        for i in range(cap):
            f.add(f"10.2.{i // 250}.{i % 250 + 1}", stamps=[now])
        try:
            f.add("192.0.2.99", remaining_s=5)
        except TableFullError as exc:
            assert len(f.list()) == cap
            return str(exc)[:60]
        raise AssertionError("no TableFullError")

    @check("cli_probe_present")
    def _() -> str:
        proc = subprocess.run([sys.executable, "-c", "from nftsync.cli import main; main()",
                               "compat", "probe", "--iptables", IPT, "--json"],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr.strip()[-200:]
        assert json.loads(proc.stdout)["patched"] is True, proc.stdout
        return "patched=true"

    for name, ok, detail in results:
        print(f"RESULT {name} {'PASS' if ok else 'FAIL'} {detail}", flush=True)
    return 0 if all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
