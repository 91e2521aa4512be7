"""The daemon's view of the farms: which maps to replicate, and how to derive session keys.

Session keys travel as the bytes the kernel uses for the map key (nft's concatenation layout),
so a record is the same whether it was learned from a conntrack event, an nft event or a dump.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass, field

from nftsync.errors import RulesetError
from nftsync.model import Farm, Role, SessionMap
from nftsync.netlink.ctnetlink import CtEntry
from nftsync.netlink.nftables import format_value, join_concat, split_concat

log = logging.getLogger("nftsync.daemon")

REPLICATED_ROLES = (Role.SESSIONS, Role.STATIC)


@dataclass(frozen=True, slots=True)
class KeyRecipe:
    """How to build a map key from a conntrack entry's original tuple (the map's key=SPEC)."""

    fields: tuple[str, ...]  # "saddr", "daddr", "sport", "dport", "l4proto"
    prefix: int | None  # mask length for the address part
    family: int  # AF_INET / AF_INET6

    @classmethod
    def parse(cls, spec: str, key_type: tuple[str, ...]) -> KeyRecipe:
        parts = spec.split(",")
        prefix = None
        addr, _, plen = parts[0].partition("/")
        if plen:
            prefix = int(plen)
        fields = (addr, *parts[1:])
        if len(fields) != len(key_type):
            raise RulesetError(f"key={spec} has {len(fields)} part(s), the map key is "
                               f"{' . '.join(key_type)}")
        family = socket.AF_INET6 if key_type[0] == "ipv6_addr" else socket.AF_INET
        if key_type[0] not in ("ipv4_addr", "ipv6_addr"):
            raise RulesetError(f"key={spec}: the map key must start with an address")
        limit = 32 if family == socket.AF_INET else 128
        if prefix is not None and not 0 <= prefix <= limit:
            raise RulesetError(f"key={spec}: prefix /{prefix} out of range")
        return cls(fields, prefix, family)

    def key(self, ct: CtEntry, key_type: tuple[str, ...]) -> bytes | None:
        if ct.family != self.family:
            return None
        values: list[object] = []
        for f in self.fields:
            if f in ("saddr", "daddr"):
                raw = ct.orig_src if f == "saddr" else ct.orig_dst
                if self.prefix is not None:
                    raw = _masked(raw, self.prefix)
                values.append(ipaddress.ip_address(raw))
            elif f == "sport":
                values.append(ct.orig_sport)
            elif f == "dport":
                values.append(ct.orig_dport)
            else:
                values.append(ct.l4proto)
        return join_concat(values, list(key_type))


def _masked(raw: bytes, prefix: int) -> bytes:
    n = int.from_bytes(raw, "big")
    bits = len(raw) * 8
    mask = ((1 << bits) - 1) ^ ((1 << (bits - prefix)) - 1) if prefix else 0
    return (n & mask).to_bytes(len(raw), "big")


@dataclass(slots=True)
class ReplicatedMap:
    smap: SessionMap
    recipe: KeyRecipe | None  # None for static maps (learned from nft events only)

    @property
    def map_id(self) -> str:
        return self.smap.map_id

    def key_text(self, key: bytes) -> str:
        return format_value(key, list(self.smap.key_type))

    def key_valid(self, key: bytes) -> bool:
        try:
            split_concat(key, list(self.smap.key_type))
        except (ValueError, RulesetError):
            return False
        return True


@dataclass(slots=True)
class FarmView:
    """Everything the daemon replicates, indexed for the hot path."""

    farms: dict[str, Farm] = field(default_factory=dict)
    maps: dict[str, ReplicatedMap] = field(default_factory=dict)  # map_id ->
    by_ref: dict[tuple[str, str, str], ReplicatedMap] = field(default_factory=dict)
    by_mark: dict[int, list[ReplicatedMap]] = field(default_factory=dict)  # sessions maps only

    @property
    def marks(self) -> set[int]:
        return {m for f in self.farms.values() for m in f.backends}

    @classmethod
    def build(cls, farms: dict[str, Farm], only: list[str] | None) -> FarmView:
        view = cls()
        for name, farm in sorted(farms.items()):
            if only is not None and name not in only:
                continue
            view.farms[name] = farm
            for role in REPLICATED_ROLES:
                smap = farm.maps.get(role)
                if smap is None:
                    continue
                recipe = None
                if role is Role.SESSIONS:
                    try:
                        recipe = KeyRecipe.parse(smap.key_spec, smap.key_type)
                    except (RulesetError, ValueError) as exc:
                        log.error("farm %s: map %s: %s; its sessions are replicated from nft "
                                  "events only", name, smap.ref, exc)
                rmap = ReplicatedMap(smap, recipe)
                view.maps[smap.map_id] = rmap
                ref = smap.ref
                view.by_ref[(ref.family, ref.table, ref.name)] = rmap
                if recipe is not None:
                    for mark in farm.backends:
                        view.by_mark.setdefault(mark, []).append(rmap)
        shared = {m: [r.smap.farm for r in rs] for m, rs in view.by_mark.items() if len(rs) > 1}
        for mark, names in sorted(shared.items()):
            log.warning("backend mark %#x is used by farms %s: a connection with this mark "
                        "refreshes a session in each of them; give each farm its own marks",
                        mark, ", ".join(names))
        return view
