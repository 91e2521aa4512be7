"""The patched xt_recent in a real Debian 6.1 kernel under qemu (compat/vm/run.sh).

One boot (~35 s under TCG) runs the guest stages; each check the guest reports is its own test
here. NFTSYNC_VM_LAB=1 adds the legacy farm lab on 6.1 (+20-30 s). Skips, with the reason, when
qemu or the Debian packages that compat/vm/setup.sh installs are missing.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[3]
RUN = REPO / "compat" / "vm" / "run.sh"

SHELL_CHECKS = [
    "table_created", "now_jiffies", "ipv4_roundtrip", "ipv6_roundtrip", "replace",
    "equal_stamps", "full_ring", "reject_too_many_stamps", "reject_bad_ipv4", "reject_bad_ipv6",
    "reject_ipv4_trailing_junk", "reject_ipv6_trailing_junk", "reject_ipv6_two_gaps",
    "reject_empty_addr", "reject_garbage_stamp", "reject_signed_stamp", "reject_space",
    "reject_empty_field", "reject_no_stamps", "reject_no_trailing_semicolon",
    "reject_decreasing", "reject_future_stamp", "reject_overflow", "reject_ttl_too_big",
    "reject_two_lines", "reject_changes_nothing", "stock_add", "stock_add_ipv6", "stock_del",
    "stock_bad_command", "stock_flush", "rcheck_seconds", "rcheck_fresh",
]
ADAPTER_CHECKS = [
    "adapter_probe_present", "adapter_add_remaining_exact", "adapter_session_ages_ipv6",
    "adapter_snapshot_restore_exact", "adapter_full_ring_order", "adapter_add_many_exact",
    "adapter_table_full",
    "cli_probe_present",
]
# Stage 3, with NFTSYNC_VM_LAB=1 (adds 20-30 s): the legacy farm lab with iptables-legacy on 6.1.
LAB_CHECKS = ["legacy_farm_lab"] if os.environ.get("NFTSYNC_VM_LAB") == "1" else []


def _missing() -> str | None:
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 missing (apt-get install qemu-system-x86; compat/vm/setup.sh)"
    kvers = sorted(os.path.basename(p) for p in glob.glob("/lib/modules/6.1.*-amd64")
                   if os.path.exists(os.path.join(p, "build", "Makefile")))
    if not kvers:
        return "no linux-headers-6.1.0-*-amd64 (/lib/modules/6.1.*/build): compat/vm/setup.sh"
    if not os.path.exists(f"/boot/vmlinuz-{kvers[-1]}"):
        return f"no linux-image-{kvers[-1]} (/boot/vmlinuz-{kvers[-1]}): compat/vm/setup.sh"
    for path, pkg in (("/usr/src/linux-source-6.1.tar.xz", "linux-source-6.1"),
                      ("/bin/busybox", "busybox-static"),
                      ("/usr/sbin/xtables-legacy-multi", "iptables"),
                      ("/usr/bin/cpio", "cpio")):
        if not os.path.exists(path):
            return f"{path} missing (apt-get install {pkg}; compat/vm/setup.sh)"
    return None


@pytest.fixture(scope="module")
def vm_results() -> dict[str, tuple[bool, str]]:
    reason = _missing()
    if reason:
        pytest.skip(reason)
    proc = subprocess.run(["sh", str(RUN)], capture_output=True, text=True, timeout=240)
    if proc.returncode == 124:
        pytest.fail(f"the VM did not finish in time:\n{proc.stdout[-3000:]}")
    results = {}
    for m in re.finditer(r"^RESULT (\S+) (PASS|FAIL) ?(.*)$", proc.stdout, re.MULTILINE):
        results[m[1]] = (m[2] == "PASS", m[3])
    if not results:
        pytest.fail(f"no RESULT lines from the VM (rc {proc.returncode}):\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}")
    return results


@pytest.mark.parametrize("name", SHELL_CHECKS + ADAPTER_CHECKS + LAB_CHECKS)
def test_guest_check(vm_results: dict[str, tuple[bool, str]], name: str) -> None:
    assert name in vm_results, f"the guest did not report {name}"
    ok, detail = vm_results[name]
    assert ok, detail


def test_no_unexpected_checks(vm_results: dict[str, tuple[bool, str]]) -> None:
    extra = set(vm_results) - set(SHELL_CHECKS) - set(ADAPTER_CHECKS) - set(LAB_CHECKS)
    assert not extra, f"guest checks this file does not list: {sorted(extra)}"
