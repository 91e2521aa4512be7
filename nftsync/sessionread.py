"""Reading sessions out of the kernel: one client (`sessions get`) and streamed listings
(`sessions list`).

Why not libnftables here: `nft -j list map` builds the whole map as JSON and Python objects
before returning (200k sessions: 5 s and ~700 MB in the nftsync process), and it has no
lookup of one key in JSON. So a client is looked up with one GETSETELEM of its key
(`nftsync.netlink.setget`: the cost does not depend on the map's size), and a listing streams
the kernel's set-element dump (`nftsync.netlink.setdump`) one datagram (≤ 32 KiB) at a time,
filtering on the raw key and mark bytes before anything is decoded: memory stays the same
whatever the map holds, and `--limit` ends the dump after the datagram that fills it.

A `--client` prefix of at most `LOOKUP_MAX` addresses on a map keyed by the address alone is
read by looking up each of its addresses instead (a /24 in milliseconds at any map size).

**What a listing guarantees.** The kernel's set-element dump is no snapshot (docs/kernels.md):
an element deleted or expired while the dump runs can make another, not yet listed one be
skipped, and one added (by the packet path too) can make one be listed twice. A listing of a
map that does not change meanwhile is exact; on a live farm it is a sample that may miss or
repeat a few sessions, in the kernel's hash order. `get`, and a listing by lookups, are exact
for each key at the moment it is asked (in address order).
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from nftsync.datatypes import (
    PROTOCOLS,
    DatatypeError,
    join_concat,
    split_concat,
    to_bytes,
)
from nftsync.errors import NftsyncError, SessionError
from nftsync.model import Farm, Role, SessionMap, parse_key
from nftsync.netlink.nftables import Element
from nftsync.netlink.setdump import SetElemDump, SetGone, iter_elements
from nftsync.netlink.setget import get_element, get_elements
from nftsync.nft import Nft
from nftsync.ruleset import current_farms
from nftsync.sessions import select_farm

#: What the layers below the CLI report progress through (nftsync.cli.progress.Report).
Report = Callable[[str, int, "int | None"], None]

_ADDRESS_BITS = {"ipv4_addr": 32, "ipv6_addr": 128}

#: `--client` prefixes of at most this many addresses, on a map keyed by the address alone, are
#: read by looking up each address (~10 µs each: a /16 in < 1 s at any map size) rather than
#: by a dump of the whole map (1M sessions: ~40 s, the kernel's walk). Above it, or on
#: composite keys (the ports cannot be enumerated), the dump with a filter.
LOOKUP_MAX = 1 << 16


class SessionAbsent(SessionError):
    """`sessions get`: the client has no session. Exit 1, as grep when nothing matches, so a
    script tells "not there" (1) from a wrong key or farm (2)."""

    exit_code = 1


@dataclass(frozen=True, slots=True)
class ClientPrefix:
    """`--client PREFIX`: an address or network that the key's first component must be in."""

    network: ipaddress.IPv4Network | ipaddress.IPv6Network

    @classmethod
    def parse(cls, text: str) -> ClientPrefix:
        try:
            return cls(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            raise SessionError(f"--client {text!r} is not an address or prefix (examples: "
                               "10.10.1.7, 10.10.0.0/16, fd00::/64); for one composite key "
                               "use: nftsync sessions get") from None

    @property
    def dtype(self) -> str:
        return "ipv4_addr" if self.network.version == 4 else "ipv6_addr"

    def matcher(self) -> Callable[[bytes], bool]:
        """A test on a key's raw bytes (the address comes first, in network order)."""
        size = _ADDRESS_BITS[self.dtype] // 8
        shift = _ADDRESS_BITS[self.dtype] - self.network.prefixlen
        want = int(self.network.network_address) >> shift
        from_bytes = int.from_bytes

        def match(key: bytes) -> bool:
            return from_bytes(key[:size], "big") >> shift == want

        return match


@dataclass(slots=True)
class _MapScan:
    """One map to read, with what the filters became for it."""

    farm: Farm
    role: Role
    smap: SessionMap
    mark: bytes | None  # --backend as the map's data bytes
    lookup: bool = False  # look up each address of --client instead of dumping the map


def key_text(key_type: tuple[str, ...]) -> Callable[[bytes], str]:
    """Kernel key bytes -> the key as nftsync writes it (`10.0.0.1 . 40000`, what `parse_key`
    accepts), decoded by the one codec (`nftsync.datatypes`); single addresses, nearly every
    farm's key, by a shortcut that gives the same text."""
    if key_type == ("ipv4_addr",):
        return socket.inet_ntoa
    if key_type == ("ipv6_addr",):
        return lambda raw: str(ipaddress.IPv6Address(raw))

    def text(raw: bytes) -> str:
        values = split_concat(raw, key_type)
        return " . ".join(_component(t, v) for t, v in zip(key_type, values, strict=True))

    return text


def _component(dtype: str, value: object) -> str:
    """nft's JSON text of a key component (a protocol by name, as `nft -j list map` has it)."""
    if dtype == "inet_proto" and isinstance(value, int):
        return PROTOCOLS.get(value, str(value))
    return str(value)


def element_row(farm: Farm, role: Role, smap: SessionMap, el: Element,
                text: Callable[[bytes], str]) -> dict[str, Any]:
    """A kernel element as a row of `sessions list|get` (the shape of `sessions.session_row`)."""
    mark = int.from_bytes(el.data or bytes(4), sys.byteorder)  # a mark is host order
    return {"farm": farm.name, "map": role.value, "client": text(el.key),
            "backend": f"{mark:#x}", "address": farm.backends.get(mark),
            "state": farm.state_of(mark).value,
            "expires": None if el.expiration_ms is None else el.expiration_ms // 1000,
            "timeout": smap.timeout if el.timeout_ms is None else el.timeout_ms // 1000}


def _farms(farm_name: str | None, nft: Nft) -> list[Farm]:
    if farm_name:
        return [select_farm(farm_name, nft)]
    farms = list(current_farms(nft).values())
    if not farms:
        select_farm(None, nft)  # raises the "no farm is loaded" error
    return farms


def _roles(static: bool | None) -> tuple[Role, ...]:
    """Static first: pinned clients win over timed sessions, so they are listed first."""
    return tuple(r for r in (Role.STATIC, Role.SESSIONS)
                 if static is None or static == (r is Role.STATIC))


def get_sessions(farm_name: str | None, client: str, *,
                 nft: Nft | None = None) -> list[dict[str, Any]]:
    """CLIENT's entries in the static and the timed map of one farm (--farm) or of every farm
    whose key it fits: one GETSETELEM of its key per map, never a dump.

    Raises `SessionAbsent` (exit 1) when no map has it, `SessionError` (exit 2) when CLIENT
    fits no farm's key.
    """
    nft = nft or Nft()
    farms = _farms(farm_name, nft)
    rows: list[dict[str, Any]] = []
    fitted: list[str] = []
    refused: SessionError | None = None
    composite = False  # a composite key: the hint to list an address's sessions applies
    for farm in farms:
        for role in _roles(None):
            smap = farm.maps.get(role)
            if smap is None:
                continue
            composite = composite or len(smap.key_type) > 1
            try:
                key = join_concat(parse_key(client, smap.key_type), smap.key_type)
            except SessionError as exc:
                refused = refused or exc
                continue
            fitted.append(farm.name)
            el = _lookup(smap, key)
            if el is not None:
                rows.append(element_row(farm, role, smap, el, key_text(smap.key_type)))
    if not fitted:
        assert refused is not None
        if not composite:
            raise refused
        raise SessionError(f"{refused}; every session of an address: nftsync sessions list "
                           "--client ADDRESS")
    if not rows:
        names = sorted(set(fitted))
        where = f"farm {names[0]!r} has" if len(names) == 1 else f"farms {', '.join(names)} have"
        raise SessionAbsent(f"{where} no session for {client}")
    return rows


def _lookup(smap: SessionMap, key: bytes) -> Element | None:
    ref = smap.ref
    try:
        return get_element(ref.family, ref.table, ref.name, key)
    except SetGone:
        raise SessionError(f"map {ref} is gone (was the farm re-applied or removed?)") from None


def iter_sessions(farm_name: str | None, *, static: bool | None = None,
                  client: str | None = None, backend: str | None = None,
                  limit: int | None = None, progress: Report | None = None,
                  nft: Nft | None = None) -> Iterator[dict[str, Any]]:
    """The rows of every farm (or one), static map first, as the kernel's dump brings them.

    Filters are checked and resolved before the first dump, so a bad one fails before any row:
    `client` is an address or prefix that the key's first component must be in (maps keyed by
    another family are skipped), `backend` a mark or a backend address (farms without that
    backend are skipped). `limit` ends the dump once that many rows came. `progress` is called
    after each datagram with (what, elements read, None): the kernel does not say how many a
    set holds. See the module docstring for what a listing guarantees.
    """
    nft = nft or Nft()
    prefix = ClientPrefix.parse(client) if client is not None else None
    scans = _plan(_farms(farm_name, nft), _roles(static), prefix, backend)
    match = prefix.matcher() if prefix is not None else None
    shown = 0
    for scan in scans:
        if limit is not None and shown >= limit:
            return
        smap = scan.smap
        text = key_text(smap.key_type)
        if scan.lookup:
            assert prefix is not None
            for el in _lookups(scan, prefix, progress):
                if scan.mark is None or el.data == scan.mark:
                    yield element_row(scan.farm, scan.role, smap, el, text)
                    shown += 1
                    if shown == limit:
                        return
            continue
        what = f"farm {scan.farm.name}, {scan.role.value} map: read"
        read = 0
        try:
            with SetElemDump(smap.ref.family, smap.ref.table, smap.ref.name) as dump:
                for data, _mono, _wall in dump.datagrams():
                    for el in iter_elements(data):
                        read += 1
                        if el.catchall or (scan.mark is not None and el.data != scan.mark) \
                                or (match is not None and not match(el.key)):
                            continue
                        yield element_row(scan.farm, scan.role, smap, el, text)
                        shown += 1
                        if shown == limit:
                            return
                    if progress is not None and read:
                        progress(what, read, None)
        except SetGone:
            raise SessionError(f"map {smap.ref} is gone (was the farm re-applied or "
                               "removed during the listing?)") from None


def _lookups(scan: _MapScan, prefix: ClientPrefix, progress: Report | None,
             ) -> Iterator[Element]:
    """The elements of every address of `prefix`, looked up one by one in address order."""
    net = prefix.network
    size = _ADDRESS_BITS[prefix.dtype] // 8
    base = int(net.network_address)
    count = net.num_addresses
    keys = ((base + i).to_bytes(size, "big") for i in range(count))
    what = f"farm {scan.farm.name}, {scan.role.value} map: addresses looked up"
    ref = scan.smap.ref
    try:
        for i, (_key, el) in enumerate(get_elements(ref.family, ref.table, ref.name, keys)):
            if progress is not None and i % 1024 == 1023:
                progress(what, i + 1, count)
            if el is not None:
                yield el
    except SetGone:
        raise SessionError(f"map {ref} is gone (was the farm re-applied or removed during the "
                           "listing?)") from None


def _plan(farms: list[Farm], roles: tuple[Role, ...], prefix: ClientPrefix | None,
          backend: str | None) -> list[_MapScan]:
    """The maps to read and each one's filters; a filter that fits none of them is an error
    (a typo must not look like "no sessions")."""
    scans: list[_MapScan] = []
    backend_error: NftsyncError | None = None
    prefix_misfits: list[str] = []
    for farm in farms:
        mark: bytes | None = None
        if backend is not None:
            try:
                mark = to_bytes("mark", farm.resolve_backend(backend))
            except (NftsyncError, DatatypeError) as exc:
                backend_error = backend_error or exc
                continue
        for role in roles:
            smap = farm.maps.get(role)
            if smap is None:
                continue
            if prefix is not None and smap.key_type[0] != prefix.dtype:
                prefix_misfits.append(f"{smap.ref} ({' . '.join(smap.key_type)})")
                continue
            lookup = prefix is not None and smap.key_type == (prefix.dtype,) \
                and prefix.network.num_addresses <= LOOKUP_MAX
            scans.append(_MapScan(farm, role, smap, mark, lookup))
    if not scans and backend_error is not None:
        raise backend_error
    if not scans and prefix is not None and prefix_misfits:
        raise SessionError(f"--client {prefix.network} is an {prefix.dtype}, but the keys of "
                           f"{', '.join(prefix_misfits)} do not start with one")
    return scans
