"""Session administration: the seed's `ssyncdctl show` and `echo +addr/-addr// > /proc/...`.

Operations on a farm's session map (or its static map), each one kernel transaction. Reading
sessions (`sessions get|list`) is `nftsync.sessionread`'s.
"""

from __future__ import annotations

import re
from typing import Any

from nftsync.errors import KernelError, SessionError
from nftsync.model import Farm, Role, Session, parse_key
from nftsync.nft import Nft
from nftsync.proto.wire import MAX_REMAINING_MS
from nftsync.ruleset import current_farms
from nftsync.tables.nftmap import NftSessionMap

_DURATION = re.compile(r"(\d+)(ms|s|m|h|d)")
_UNIT = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """`90`, `90s`, `2m`, `1h30m` -> whole seconds (at least 1)."""
    text = text.strip()
    if text.isdigit():
        seconds = float(text)
    else:
        pos, seconds = 0, 0.0
        for m in _DURATION.finditer(text):
            if m.start() != pos:
                break
            seconds += int(m.group(1)) * _UNIT[m.group(2)]
            pos = m.end()
        if pos != len(text) or not text:
            raise SessionError(f"{text!r} is not a duration (examples: 90, 90s, 2m, 1h30m)")
    if seconds < 1:
        raise SessionError(f"duration {text!r} is shorter than one second")
    return int(seconds)


def format_duration(ms: int) -> str:
    """`4294967295` -> `49d17h2m47s295ms`: how nft writes a time, so users can paste it back."""
    out = []
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000),
                       ("ms", 1)):
        n, ms = divmod(ms, size)
        if n:
            out.append(f"{n}{unit}")
    return "".join(out) or "0s"


#: What a peer can be told (the protocol's u32 `remaining_ms`), in words for error messages.
WIRE_LIMIT_TEXT = f"at most {MAX_REMAINING_MS} ms = {format_duration(MAX_REMAINING_MS)}"


def check_replicable(seconds: int | None, what: str) -> None:
    """Refuse an expiry the peer protocol cannot carry, before anything touches the kernel.

    Why refuse rather than clamp: the kernel would hold the long expiry while every peer holds
    a shorter one, so the cluster would disagree about the session from the first failover on;
    and a record that cannot be encoded used to stop all replication (issue 9).
    """
    if seconds is not None and seconds * 1000 > MAX_REMAINING_MS:
        raise SessionError(f"{what} ({seconds}s) is longer than replication can carry "
                           f"({WIRE_LIMIT_TEXT}); nothing was changed")


def select_farm(name: str | None, nft: Nft | None = None) -> Farm:
    farms = current_farms(nft)
    if name is None:
        if len(farms) == 1:
            return next(iter(farms.values()))
        if not farms:
            raise SessionError("no nftsync farm is loaded (no map has an 'nftsync:' comment); "
                               "load one with: nftsync apply FILE")
        raise SessionError(f"several farms are loaded ({', '.join(sorted(farms))}): "
                           "choose one with --farm")
    if name not in farms:
        known = ", ".join(sorted(farms)) or "none"
        raise SessionError(f"no farm {name!r} is loaded (farms: {known})")
    return farms[name]


def _table(farm: Farm, static: bool, nft: Nft) -> NftSessionMap:
    return NftSessionMap(farm.require(Role.STATIC if static else Role.SESSIONS), nft)


def session_row(farm: Farm, role: Role, s: Session) -> dict[str, Any]:
    """A session as `sessions list|get|add --json` show it (one shape for all of them)."""
    return {"farm": farm.name, "map": role.value, "client": s.key_text,
            "backend": f"{s.mark:#x}", "address": farm.backends.get(s.mark),
            "state": farm.state_of(s.mark).value, "expires": s.expires, "timeout": s.timeout}


def add_session(farm_name: str | None, client: str, backend: str, *,
                expires: str | None = None, static: bool = False,
                nft: Nft | None = None) -> dict[str, Any]:
    """Pin or refresh one client; an existing entry is replaced in the same transaction."""
    nft = nft or Nft()
    farm = select_farm(farm_name, nft)
    table = _table(farm, static, nft)
    key = parse_key(client, table.smap.key_type)
    mark = farm.resolve_backend(backend)
    if static and expires is not None:
        raise SessionError("static sessions do not expire: drop --expires, or add to the "
                           "timed session map (without --static)")
    seconds = parse_duration(expires) if expires is not None else None
    check_replicable(seconds, f"--expires {expires}")
    limit = table.smap.timeout
    if seconds is not None and limit is not None and seconds > limit:
        # Peers cap every record at their map's timeout (a hostile 49-day record must not
        # outlive the map), so a longer expiry here would hold on this node only: refused,
        # like anything else that cannot be replicated as it is.
        raise SessionError(f"--expires {expires} ({seconds}s) is longer than the timeout of map "
                           f"{table.smap.ref} ({limit}s), which caps it on every peer; use at "
                           "most the map's timeout or raise it with nftsync apply; nothing was "
                           "changed")
    if seconds is None and not static:
        seconds = table.smap.timeout
        check_replicable(seconds, f"the timeout of map {table.smap.ref} (load a shorter one "
                         "with nftsync apply)")
    session = Session(key=key, mark=mark, expires=seconds)
    replaced = table.replace(session)
    role = Role.STATIC if static else Role.SESSIONS
    return session_row(farm, role, session) | {"replaced": replaced}


def del_session(farm_name: str | None, client: str, *, static: bool = False,
                nft: Nft | None = None) -> dict[str, Any]:
    nft = nft or Nft()
    farm = select_farm(farm_name, nft)
    table = _table(farm, static, nft)
    key = parse_key(client, table.smap.key_type)
    try:
        table.delete([key])
    except KernelError as exc:
        if "No such file or directory" not in str(exc):
            raise
        raise SessionError(f"farm {farm.name!r} has no {'static ' if static else ''}session "
                           f"for {client}") from None
    return {"farm": farm.name, "map": "static" if static else "sessions",
            "client": " . ".join(key)}


def flush_sessions(farm_name: str | None, *, static: bool = False,
                   nft: Nft | None = None) -> dict[str, Any]:
    nft = nft or Nft()
    farm = select_farm(farm_name, nft)
    table = _table(farm, static, nft)
    table.flush()
    return {"farm": farm.name, "map": "static" if static else "sessions", "flushed": True}
