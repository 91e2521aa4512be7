"""The model: farms, backends and sessions, and the convention that marks a map as nftsync's.

A farm is the user's own nftables ruleset. nftsync only needs to find a few maps in it, which the
user marks with a comment that starts with `nftsync:`:

    comment "nftsync:sessions farm=web"     timed client->backend map (flags dynamic,timeout)
    comment "nftsync:static farm=web"       pinned client->backend map (no timeout), looked up first
    comment "nftsync:backends farm=web"     backend mark -> backend address (used by `dnat to`)
    comment "nftsync:states farm=web"       backend mark -> replacement mark, owned by nftsync:
                                            how drained/down backends hand new clients to up ones

Session and static maps map a client key to a backend *mark* (the seed's 0x200, 0x201, ...); the
mark is also the conntrack mark of the farm's connections, which is how the daemon recognises them.
An optional `key=` names the conntrack field(s) the key is made from, for learning sessions from
conntrack events: `saddr` (default), `saddr/24` (a source network, like the seed's --mask),
`saddr,sport`, `daddr`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum

from nftsync.datatypes import KEY_TYPES, DatatypeError, parse_value
from nftsync.errors import RulesetError, SessionError

COMMENT_PREFIX = "nftsync:"


class Role(StrEnum):
    SESSIONS = "sessions"
    STATIC = "static"
    BACKENDS = "backends"
    STATES = "states"


class BackendState(StrEnum):
    UP = "up"
    DRAIN = "drain"  # keeps its sessions and connections, gets no new clients
    DOWN = "down"  # its sessions are removed so its clients re-balance


_KEY_SPEC = re.compile(r"^(saddr(/\d{1,3})?|daddr(/\d{1,3})?)(,(sport|dport|l4proto))*$")


@dataclass(frozen=True, slots=True)
class MapRef:
    """Where a map lives in the kernel."""

    family: str
    table: str
    name: str

    def __str__(self) -> str:
        return f"{self.family} {self.table} {self.name}"


@dataclass(frozen=True, slots=True)
class SessionMap:
    """A map that nftsync recognised by its comment."""

    ref: MapRef
    role: Role
    farm: str
    key_type: tuple[str, ...]
    value_type: str
    timeout: int | None = None  # seconds, the map's default
    size: int | None = None
    key_spec: str = "saddr"

    @property
    def map_id(self) -> str:
        """Cluster-wide identity: farm and role, not table/map names, which may differ per node."""
        return f"{self.farm}/{self.role.value}"


@dataclass(frozen=True, slots=True)
class Session:
    """One client->backend entry. `key` holds the key's components as nft writes them."""

    key: tuple[str, ...]
    mark: int
    expires: int | None = None  # seconds left; None for entries without timeout
    timeout: int | None = None
    comment: str | None = None

    @property
    def key_text(self) -> str:
        return " . ".join(self.key)


@dataclass(slots=True)
class Farm:
    name: str
    maps: dict[Role, SessionMap] = field(default_factory=dict)
    backends: dict[int, str] = field(default_factory=dict)  # mark -> address
    states: dict[int, BackendState] = field(default_factory=dict)  # only non-up backends

    def state_of(self, mark: int) -> BackendState:
        return self.states.get(mark, BackendState.UP)

    def require(self, role: Role) -> SessionMap:
        try:
            return self.maps[role]
        except KeyError:
            raise SessionError(
                f"farm {self.name!r} has no map with comment \"nftsync:{role.value} farm="
                f"{self.name}\"") from None

    def resolve_backend(self, text: str) -> int:
        """A backend given as a mark (0x201, 513) or as its address in the backends map."""
        mark = parse_mark(text, strict=False)
        if mark is None:
            for m, addr in self.backends.items():
                if addr == text:
                    return m
        elif mark in self.backends or not self.backends:
            return mark
        known = ", ".join(f"{m:#x}={a}" for m, a in sorted(self.backends.items())) or "none"
        raise SessionError(f"farm {self.name!r} has no backend {text!r} (backends: {known})")


def parse_comment(comment: str | None) -> tuple[Role, str, dict[str, str]] | None:
    """`nftsync:sessions farm=web key=saddr` -> (Role.SESSIONS, "web", {"key": "saddr"})."""
    if not comment or not comment.startswith(COMMENT_PREFIX):
        return None
    words = comment[len(COMMENT_PREFIX):].split()
    if not words:
        raise RulesetError(f"map comment {comment!r}: missing role after 'nftsync:'")
    try:
        role = Role(words[0])
    except ValueError:
        roles = ", ".join(r.value for r in Role)
        raise RulesetError(f"map comment {comment!r}: unknown role {words[0]!r} "
                           f"(one of: {roles})") from None
    opts: dict[str, str] = {}
    for word in words[1:]:
        k, sep, v = word.partition("=")
        if not sep or not v or k not in ("farm", "key"):
            raise RulesetError(f"map comment {comment!r}: expected farm=NAME or key=SPEC, "
                               f"got {word!r}")
        opts[k] = v
    farm = opts.pop("farm", None)
    if not farm or not re.fullmatch(r"[A-Za-z0-9_.-]{1,32}", farm):
        raise RulesetError(f"map comment {comment!r}: farm=NAME is required "
                           "(letters, digits, _ . -, at most 32)")
    if "key" in opts and not _KEY_SPEC.match(opts["key"]):
        raise RulesetError(f"map comment {comment!r}: key= must look like saddr, saddr/24, "
                           f"saddr,sport or daddr, got {opts['key']!r}")
    return role, farm, opts


def parse_mark(text: str, *, strict: bool = True) -> int | None:
    try:
        value = int(text, 0)
    except ValueError:
        if strict:
            raise SessionError(f"{text!r} is not a mark (use 0x200 or 512)") from None
        return None
    if not 0 <= value <= 0xFFFFFFFF:
        raise SessionError(f"mark {text!r} is out of range (32 bits)")
    return value


def parse_key(text: str, key_type: tuple[str, ...]) -> tuple[str, ...]:
    """Check a user-written key against the map's key type; return its normalised components.

    Components are separated by '.' surrounded by spaces or by ',' (`10.0.0.1 . 80`, `10.0.0.1,80`).
    `nftsync.datatypes.join_concat` turns the result into the kernel's bytes.
    """
    parts = [p.strip() for p in re.split(r"\s+\.\s+|,", text.strip())]
    shown = " . ".join(key_type)
    if len(parts) != len(key_type):
        raise SessionError(f"key {text!r} has {len(parts)} part(s), the map's key is {shown}")
    return tuple(_normalise(p, t, text, shown) for p, t in zip(parts, key_type, strict=True))


def _normalise(part: str, dtype: str, text: str, shown: str) -> str:
    """One component in the form nft lists it (addresses, decimal numbers, lower-case ether),
    validated by the one codec of key values (nftsync.datatypes)."""
    if dtype not in KEY_TYPES:
        raise SessionError(f"map key type {dtype} is not supported by nftsync "
                           f"(supported: {', '.join(KEY_TYPES)})")
    try:
        return str(parse_value(dtype, part))
    except DatatypeError:
        raise SessionError(f"key {text!r}: {part!r} is not a valid {dtype} "
                           f"(map key type: {shown})") from None


def key_from_json(val: object) -> tuple[str, ...]:
    """A key as libnftables JSON gives it: a scalar, or {"concat": [...]}."""
    if isinstance(val, dict) and "concat" in val:
        return tuple(str(v) for v in val["concat"])
    if isinstance(val, dict) and "prefix" in val:
        p = val["prefix"]
        return (f"{p['addr']}/{p['len']}",)
    return (str(val),)


def key_type_of(obj: dict) -> tuple[str, ...]:
    t = obj.get("type")
    if isinstance(t, list):
        return tuple(str(x) for x in t)
    return (str(t),)
