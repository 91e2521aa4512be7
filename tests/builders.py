"""Test data shared by unit and kernel tests (no kernel, no root): conntrack entries and the
legacy lab farm. tests/conftest.py puts this directory on sys.path."""

from __future__ import annotations

from nftsync.conntrack import CtEntry

# The legacy farm of the iptables-recent lab (tests/kernel/test_compat_iptables.py).
LEGACY_VIP, LEGACY_VPORT = "10.77.9.100", 8080
LEGACY_BACKENDS = {0x200: "10.77.2.10", 0x201: "10.77.2.11"}


def legacy_farm_dict(**over: object) -> dict:
    """A legacy farm description (compat/farms/*.toml as a dict), with fields overridden."""
    farm = {
        "name": "lab", "vip": LEGACY_VIP, "proto": "tcp", "ports": [LEGACY_VPORT],
        "persistence_seconds": 120, "mask": "255.255.255.255",
        "backends": [{"mark": m, "address": f"{a}:80"} for m, a in LEGACY_BACKENDS.items()],
    }
    farm.update(over)
    return {"farm": farm}


def make_entries(n: int, mark_of=lambda i: 0x200 + i % 3, timeout: int = 600,
                 v6: bool = False) -> list[CtEntry]:
    """`n` DNATed TCP entries of distinct clients (IPv4, or IPv6 with v6=True)."""
    out = []
    for i in range(n):
        if v6:
            client, vip, backend = f"2001:db8:1::{i + 1:x}", "2001:db8::100", "2001:db8:2::1"
        else:
            client, vip, backend = f"10.1.{i >> 8}.{i & 255}", "10.0.0.100", f"10.0.1.{1 + i % 4}"
        out.append(CtEntry.make(client, 20000 + i, vip, 80, backend, 8080, mark=mark_of(i),
                                timeout=timeout))
    return out
