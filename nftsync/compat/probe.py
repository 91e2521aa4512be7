"""Does the running kernel's xt_recent take `*addr;ttl;stamps;` (compat/kernel's patch)?

Asked in a throw-away network namespace so that no live table is touched, and cached per process.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence

_PROBE_SCRIPT = r"""
set -e
P=/proc/net/xt_recent/nftsync_probe
"$1" -w -A INPUT -m recent --name nftsync_probe --rcheck
echo +192.0.2.1 > $P
N=$(sed -n 's/^src=192\.0\.2\.1 ttl: 0 last_seen: \([0-9]*\) .*/\1/p' $P)
[ -n "$N" ]
if echo "*192.0.2.1;9;$N;" > $P 2>/dev/null; then
    grep -q "^src=192\.0\.2\.1 ttl: 9 last_seen: $N oldest_pkt: 1 $N\$" $P && echo present && exit 0
    echo broken
else
    echo absent
fi
"""


def probe_patched(iptables: str = "iptables", timeout: float = 10.0) -> tuple[bool | None, str]:
    """Whether the running kernel's xt_recent takes `*addr;ttl;stamps;` writes.

    The probe runs in a throw-away network namespace (`unshare --net`), so the only table it
    touches is one it creates there: an iptables rule `-m recent --name nftsync_probe` makes it,
    `+192.0.2.1` gives a valid current stamp, and `*192.0.2.1;9;<that stamp>;` must then read back
    exactly. A stock kernel refuses any `*` line with EINVAL and changes nothing, so there is no
    harm either way. Returns (answer, reason); answer None when the probe could not run.
    """
    unshare = shutil.which("unshare")
    ipt = shutil.which(iptables)
    if unshare is None or ipt is None:
        return None, f"needs unshare and {iptables}"
    try:
        proc = subprocess.run([unshare, "--net", "sh", "-c", _PROBE_SCRIPT, "probe", ipt],
                              capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"probe did not run: {exc}"
    out = proc.stdout.strip().splitlines()
    word = out[-1] if out else ""
    if word == "present":
        return True, "the '*addr;ttl;stamps;' command inserted an entry with its stamps"
    if word == "absent":
        return False, "the kernel refused '*addr;ttl;stamps;' (stock xt_recent)"
    if word == "broken":
        return None, "the kernel took '*addr;...' but did not store the stamps given"
    err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return None, f"probe failed in a scratch namespace: {err}"


_probe_cache: dict[str, bool | None] = {}


def kernel_has_stamps_command(iptables: Sequence[str] = ("iptables", "iptables-legacy")) -> bool:
    """Cached probe_patched() with the first iptables that gives an answer (iptables-nft needs
    nf_tables, iptables-legacy the legacy tables: a host may have only one). An inconclusive
    probe counts as absent: the +addr fallback is always safe."""
    key = ",".join(iptables)
    if key not in _probe_cache:
        answer = None
        for binary in iptables:
            answer = probe_patched(binary)[0]
            if answer is not None:
                break
        _probe_cache[key] = answer
    return bool(_probe_cache[key])
