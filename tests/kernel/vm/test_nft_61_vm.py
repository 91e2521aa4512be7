"""nftsync's nf_tables path on Debian 12's 6.1 kernel under qemu (compat/vm/run.sh -N, stage 4).

One boot (2 vCPUs, 2 GiB, TCG, no network device) loads the netfilter modules, runs
compat/vm/guest_nft61.py (the pre-6.12 refresh path is chosen and really moves the expiry, read
back through `nft -j list map`), then pytest on the real farm, nft-event and daemon replication
tests inside the guest. Each guest check and each guest test case is its own test here.
Takes 6-8 minutes: marked slow (NFTSYNC_SLOW=1) as well as vm. NFTSYNC_VM_FULL=1 runs the whole
of test_farm.py and test_nft_events.py in the guest instead of the default selection (bound 1000 s).
Skips, with the reason, when qemu or the Debian packages that compat/vm/setup.sh installs are
missing.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[3]
RUN = REPO / "compat" / "vm" / "run.sh"
FULL = os.environ.get("NFTSYNC_VM_FULL") == "1"
RUN_TIMEOUT_S = 1000 if FULL else 480

# compat/vm/nft61.sh and guest_nft61.py: the stage's own checks.
STAGE_CHECKS = [
    "nft61_modules_loaded", "nft61_kernel_is_6_1", "nft61_refresh_path_is_delete_add",
    "nft61_plain_add_does_not_refresh", "nft61_sink_refresh_changes_expiry",
    "nft61_in_place_path_would_lose_refresh", "nft61_sink_new_mark_and_expiry",
    "nft61_nftmap_replace_changes_expiry", "nft61_sink_longer_than_map_timeout",
    "nft61_packet_path_update_refreshes", "nft61_cli_refresh_and_reapply_keep_expiry",
    "nft61_other_value_is_refused",
    "nft61_pytest_exit", "nft61_no_namespaces_left",
]
# The guest's pytest selection (compat/vm/nft61.sh; the pure-Python decoding tests and fuzzers
# are in tests/unit and need no guest). The default is what fits in 8 minutes under TCG: the three
# daemon tests, part of test_farm.py and all of test_nft_events.py; with NFTSYNC_VM_FULL=1 all of
# test_farm.py. A test added to these files shows up in test_no_unexpected_checks.
_FARM_DEFAULT = [
    "test_round_robin_spreads_and_sticks", "test_sessions_cli_round_trip", "test_drain_and_down",
    *(f"test_broken_file_changes_nothing[{n}.nft]"
      for n in ("convention", "flush", "kernel", "role", "syntax")),
]
_FARM_FULL = [
    "test_round_robin_spreads_and_sticks", "test_port_60_farm_from_the_seed",
    "test_weighted_scheduler", "test_hash_scheduler_is_a_function_of_the_client",
    "test_multiport_udp_and_ipv6", "test_persistence_keys",
    "test_persistence_expires_and_rebalances", "test_static_sessions_win", "test_drain_and_down",
    *(f"test_broken_file_changes_nothing[{n}.nft]"
      for n in ("convention", "flush", "kernel", "role", "syntax")),
    "test_missing_file_and_not_root", "test_reapply_keeps_sessions",
    "test_sessions_cli_round_trip",
]
_EVENTS = [
    "test_add_element_with_timeout_and_expires", "test_static_map_element_has_no_times",
    "test_default_timeout_element_carries_expiration_only", "test_delete_element",
    "test_flush_map_is_one_delete_per_element", "test_thousand_elements_in_one_transaction",
    "test_newgen_names_the_committing_process", "test_refresh_and_readd",
    "test_libnftables_commit_is_attributed_to_our_thread", "test_concatenated_key_map",
    "test_concat_layouts_match_kernel", "test_ipv6_and_ether_map",
    "test_single_service_key_and_verdict_map", "test_catchall_element",
    "test_map_recreated_and_table_deleted", "test_packet_path_update_sends_no_event",
    "test_overrun_is_reported_not_raised",
]
_DAEMON = [
    "test_traffic_sessions_and_conntrack_replicate", "test_admin_changes_and_deletes_propagate",
    "test_backup_restart_resyncs_keeps_found_and_live_deletes",
]
GUEST_TESTS = ([f"pytest:tests/kernel/test_daemon.py::{t}" for t in _DAEMON]
               + [f"pytest:tests/kernel/test_farm.py::{t}"
                  for t in (_FARM_FULL if FULL else _FARM_DEFAULT)]
               + [f"pytest:tests/kernel/test_nft_events.py::{t}"
                  for t in _EVENTS])
# A guest test that fails only because it asserts what kernels >= 6.12 do is reported XFAIL by
# the guest (its list: KNOWN_KERNEL_DIFFERENCES in compat/vm/guest_nft61.py); it is an xfail
# here. The 6.1 behaviour itself is asserted by a stage check.


def _kver() -> str | None:
    kvers = sorted((os.path.basename(p) for p in glob.glob("/lib/modules/6.1.*-amd64")),
                   key=lambda v: [int(x) if x.isdigit() else x for x in re.split(r"[.-]", v)])
    return kvers[-1] if kvers else None


def _missing() -> str | None:
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 missing (apt-get install qemu-system-x86; compat/vm/setup.sh)"
    kver = _kver()
    if kver is None:
        return "no Debian 6.1 kernel modules (/lib/modules/6.1.*-amd64): compat/vm/setup.sh"
    for path, pkg in ((f"/boot/vmlinuz-{kver}", f"linux-image-{kver}"),
                      (f"/lib/modules/{kver}/kernel/net/netfilter/nf_tables.ko",
                       f"linux-image-{kver}"),
                      ("/bin/busybox", "busybox-static"),
                      ("/usr/bin/cpio", "cpio"),
                      ("/usr/sbin/nft", "nftables"),
                      ("/sbin/modprobe", "kmod"),
                      ("/usr/sbin/xtables-legacy-multi", "iptables")):
        if not os.path.exists(path):
            return f"{path} missing (apt-get install {pkg}; compat/vm/setup.sh)"
    return None


@dataclass(slots=True)
class GuestRun:
    results: dict[str, tuple[str, str]]  # name -> (PASS|FAIL|XFAIL, detail)
    note: str  # why a result may be missing (the run hit its bound)


@pytest.fixture(scope="module")
def vm_results() -> GuestRun:
    reason = _missing()
    if reason:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k != "NFTSYNC_VM_SELECT"}
    if FULL:
        env["NFTSYNC_VM_SELECT"] = "full"
    proc = subprocess.run(["sh", str(RUN), "-N", "-t", str(RUN_TIMEOUT_S)], capture_output=True,
                          text=True, timeout=RUN_TIMEOUT_S + 120, env=env)
    # On timeout (124) the results printed so far still count; the missing ones fail with why.
    note = f" (the VM did not finish within {RUN_TIMEOUT_S} s)" if proc.returncode == 124 else ""
    results = {}
    for m in re.finditer(r"^RESULT (\S+) (PASS|FAIL|XFAIL) ?(.*)$", proc.stdout, re.MULTILINE):
        results[m[1]] = (m[2], m[3])
    if not results:
        pytest.fail(f"no RESULT lines from the VM (rc {proc.returncode}):\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}")
    info = {}
    for m in re.finditer(r"^INFO (pytest:\S+): (.*)$", proc.stdout, re.MULTILINE):
        info.setdefault(m[1], []).append(m[2])
    for name, lines in info.items():  # the guest's traceback tail, for the failure message
        if name in results and results[name][0] == "FAIL":
            results[name] = ("FAIL", results[name][1] + "\n" + "\n".join(lines))
    return GuestRun(results, note)


@pytest.mark.parametrize("name", STAGE_CHECKS + GUEST_TESTS)
def test_guest(vm_results: GuestRun, name: str) -> None:
    assert name in vm_results.results, f"the guest did not report {name}{vm_results.note}"
    status, detail = vm_results.results[name]
    if status == "XFAIL":
        pytest.xfail(f"known kernel difference on 6.1: {detail}")
    assert status == "PASS", detail


def test_no_unexpected_checks(vm_results: GuestRun) -> None:
    extra = set(vm_results.results) - set(STAGE_CHECKS) - set(GUEST_TESTS)
    assert not extra, f"guest checks/tests this file does not list: {sorted(extra)}"
