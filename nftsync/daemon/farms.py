"""The daemon's view of the farms: which maps to replicate, and how to derive session keys.

Session keys travel as the bytes the kernel uses for the map key (nft's concatenation layout),
so a record is the same whether it was learned from a conntrack event, an nft event or a dump.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass, field

from nftsync.conntrack import CtEntry
from nftsync.datatypes import (
    ADDRESS_FAMILIES,
    ADDRESS_TYPES,
    DATATYPE_SIZES,
    format_value,
    join_concat,
    join_raw,
    proto_bytes,
    service_bytes,
    split_concat,
)
from nftsync.errors import RulesetError
from nftsync.model import Farm, Role, SessionMap

log = logging.getLogger("nftsync.daemon")

REPLICATED_ROLES = (Role.SESSIONS, Role.STATIC)


@dataclass(frozen=True, slots=True)
class KeyRecipe:
    """How to build a map key from a conntrack entry's original tuple (the map's key=SPEC)."""

    fields: tuple[str, ...]  # "saddr", "daddr", "sport", "dport", "l4proto"
    prefix: int | None  # mask length for the address part
    family: int  # AF_INET / AF_INET6
    # Fast path (this runs for every conntrack NEW event): when each field has the datatype
    # that carries it natively, the key is built from the entry's bytes and ints directly
    # (no ipaddress objects). False: build through join_concat, which validates everything.
    direct: bool = False

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
        family = ADDRESS_FAMILIES.get(key_type[0])
        if family is None:
            raise RulesetError(f"key={spec}: the map key must start with an address")
        addr_type = ADDRESS_TYPES[family]
        limit = 8 * DATATYPE_SIZES[addr_type]
        if prefix is not None and not 0 <= prefix <= limit:
            raise RulesetError(f"key={spec}: prefix /{prefix} out of range")
        native = {"saddr": addr_type, "daddr": addr_type, "sport": "inet_service",
                  "dport": "inet_service", "l4proto": "inet_proto"}
        direct = all(native.get(f) == t for f, t in zip(fields, key_type, strict=True))
        return cls(fields, prefix, family, direct)

    def key(self, ct: CtEntry, key_type: tuple[str, ...]) -> bytes | None:
        if ct.family != self.family:
            return None
        if self.direct:
            return self._direct_key(ct)
        return self._concat_key(ct, key_type)

    def _direct_key(self, ct: CtEntry) -> bytes:
        """The kernel's key layout built from raw fields (the entry holds addresses packed;
        ports and protocol are encoded, and the components joined, by nftsync.datatypes)."""
        fields = self.fields
        if len(fields) == 1 and self.prefix is None:
            f = fields[0]
            if f == "saddr":
                return ct.orig_src
            if f == "daddr":
                return ct.orig_dst
        parts = []
        for f in fields:
            if f == "saddr" or f == "daddr":
                raw = ct.orig_src if f == "saddr" else ct.orig_dst
                if self.prefix is not None:
                    raw = _masked(raw, self.prefix)
            elif f == "sport":
                raw = service_bytes(ct.orig_sport)
            elif f == "dport":
                raw = service_bytes(ct.orig_dport)
            else:
                raw = proto_bytes(ct.l4proto)
            parts.append(raw)
        return join_raw(parts)

    def _concat_key(self, ct: CtEntry, key_type: tuple[str, ...]) -> bytes:
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
    # A plain address key (the common case) is checked and printed without ipaddress objects:
    # these run for every replicated record. 0: some other key type, use the general path.
    addr_len: int = field(init=False, default=0)
    map_id: str = field(init=False, default="")

    def __post_init__(self) -> None:
        self.map_id = self.smap.map_id
        kt = tuple(self.smap.key_type)
        self.addr_len = DATATYPE_SIZES[kt[0]] if len(kt) == 1 and kt[0] in ADDRESS_FAMILIES \
            else 0

    def key_text(self, key: bytes) -> str:
        if self.addr_len == 4 and len(key) == 4:
            return socket.inet_ntoa(key)
        return format_value(key, list(self.smap.key_type))

    def key_valid(self, key: bytes) -> bool:
        if self.addr_len:
            return len(key) == self.addr_len  # every 4/16 bytes are an address
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
