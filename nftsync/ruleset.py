"""Reading farms: what a ruleset file declares, and what the kernel holds now.

The desired state comes from evaluating the file in an empty network namespace (see
`nftsync.isolated`). The current state is read with the cheap listings only (`list sets`, `list
maps`, `list chains`, and single small maps): never a listing that would dump a big session map.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

from nftsync.errors import RulesetError
from nftsync.files import FileRefused, read_regular
from nftsync.model import (
    BackendState,
    Farm,
    MapRef,
    Role,
    SessionMap,
    key_type_of,
    parse_comment,
)
from nftsync.nft import Nft, first_error
from nftsync.nftinclude import read_sources

TableId = tuple[str, str]  # (family, table name)
ObjectId = tuple[str, str]  # (kind, name), kind in chain/set/map/flowtable/counter/...

#: The farm file and every file it includes, together (nftsync.nftinclude): a farm is a few KiB.
MAX_RULESET_BYTES = 4 * 1024 * 1024

_OBJECT_KINDS = ("chain", "set", "map", "flowtable", "counter", "quota", "limit", "secmark",
                 "synproxy", "ct helper", "ct timeout", "ct expectation")


@dataclass
class TableBlocks:
    """One table of a terse, stateless `nft list` output, split into its objects' text blocks."""

    family: str
    name: str
    attrs: list[str] = field(default_factory=list)
    objects: dict[ObjectId, str] = field(default_factory=dict)


def parse_listing(text: str) -> dict[TableId, TableBlocks]:
    """Split nft's own listing format (tab-indented blocks) into tables and objects."""
    tables: dict[TableId, TableBlocks] = {}
    table: TableBlocks | None = None
    obj: ObjectId | None = None
    body: list[str] = []
    for line in text.splitlines():
        if table is None:
            if line.startswith("table ") and line.endswith("{"):
                _, family, name, _brace = line.split(" ", 3)
                table = tables.setdefault((family, name), TableBlocks(family, name))
            continue
        if obj is None:
            if line == "}":
                table = None
            elif line.startswith("\t") and not line.startswith("\t\t") and line.endswith("{"):
                header = line.strip()[:-1].strip()
                kind = next((k for k in _OBJECT_KINDS if header.startswith(k + " ")), None)
                if kind is None:
                    raise RulesetError(f"unexpected object in nft listing: {header!r}")
                obj = (kind, header[len(kind) + 1:].strip())
                body = []
            elif line.strip():
                table.attrs.append(line.strip())
            continue
        if line == "\t}":
            table.objects[obj] = "\n".join(body)
            obj = None
        else:
            body.append(line.strip())
    return tables


@dataclass
class Desired:
    """What a ruleset file declares."""

    path: str
    tables: dict[TableId, TableBlocks]
    maps: list[dict[str, Any]]  # `list maps` JSON objects (with elements)
    sets: list[dict[str, Any]]
    chains: list[dict[str, Any]]
    text: str

    @property
    def digest(self) -> str:
        import hashlib

        return hashlib.sha256(self.text.encode()).hexdigest()


def evaluate_file(path: str) -> Desired:
    """Check the file in the real kernel (dry run), then evaluate it in an empty namespace."""
    if not os.path.lexists(path):
        raise RulesetError(f"{path}: no such file")
    # The file and all it includes, bounded together and never a FIFO (nftsync.nftinclude).
    for src in read_sources(path, MAX_RULESET_BYTES):
        for number, line in enumerate(src.text.splitlines(), 1):
            stripped = line.split("#", 1)[0].split()
            if stripped[:2] == ["flush", "ruleset"] or stripped[:1] == ["destroy"]:
                raise RulesetError(
                    f"{src.path}:{number}: '{' '.join(stripped[:2])}' would drop every live "
                    "session; nftsync replaces the file's tables itself, so remove that line")
    Nft().check_file(path)
    proc = subprocess.run(
        ["unshare", "--net", sys.executable, "-m", "nftsync.isolated", os.path.abspath(path)],
        capture_output=True, text=True, timeout=60,
    )
    if proc.returncode != 0:
        raise RulesetError(first_error(proc.stderr, context=path) + " (while evaluating the file "
                           "in an empty network namespace: refer to interfaces by iifname/oifname)")
    doc = json.loads(proc.stdout)
    return Desired(path=path, tables=parse_listing(doc["text"]), maps=doc["maps"],
                   sets=doc["sets"], chains=doc["chains"], text=doc["text"])


def _elements(obj: dict[str, Any]) -> list[tuple[Any, Any, dict[str, Any]]]:
    """(key, value, elem attributes) of a JSON map's elements, in both shapes libnftables uses."""
    out = []
    for item in obj.get("elem", []) or []:
        key, value = item if isinstance(item, list) else (item, None)
        attrs: dict[str, Any] = {}
        if isinstance(key, dict) and "elem" in key:
            attrs = key["elem"]
            key = attrs["val"]
        out.append((key, value, attrs))
    return out


def _value_text(value: Any) -> str:
    if isinstance(value, dict) and "concat" in value:
        return " . ".join(str(v) for v in value["concat"])
    return str(value)


def discover_farms(map_objs: list[dict[str, Any]], nft: Nft | None = None,
                   tables: set[TableId] | None = None) -> dict[str, Farm]:
    """Group the nftsync-marked maps into farms and check that they fit together.

    Elements of backends/states maps come from `map_objs` when present (the isolated evaluation
    lists them); otherwise they are fetched one small map at a time through `nft`.
    """
    farms: dict[str, Farm] = {}
    for wrapper in map_objs:
        obj = wrapper.get("map")
        if obj is None:
            continue
        if tables is not None and (obj["family"], obj["table"]) not in tables:
            continue
        parsed = parse_comment(obj.get("comment"))
        if parsed is None:
            continue
        role, farm_name, opts = parsed
        ref = MapRef(obj["family"], obj["table"], obj["name"])
        smap = SessionMap(ref=ref, role=role, farm=farm_name, key_type=key_type_of(obj),
                          value_type=str(obj.get("map")), timeout=obj.get("timeout"),
                          size=obj.get("size"), key_spec=opts.get("key", "saddr"))
        _check_map(smap, obj)
        farm = farms.setdefault(farm_name, Farm(farm_name))
        if role in farm.maps:
            raise RulesetError(f"farm {farm_name!r} has two {role.value} maps: "
                               f"{farm.maps[role].ref} and {ref}")
        farm.maps[role] = smap
        if role in (Role.BACKENDS, Role.STATES):
            if "elem" not in obj and nft is not None:
                obj = nft.list_json(f"map {ref.family} {ref.table} {ref.name}")[0]["map"]
            for key, value, attrs in _elements(obj):
                if role is Role.BACKENDS:
                    farm.backends[int(key)] = _value_text(value)
                else:
                    try:
                        farm.states[int(key)] = BackendState(attrs.get("comment", "drain"))
                    except ValueError:
                        farm.states[int(key)] = BackendState.DRAIN
    for farm in farms.values():
        if (Role.SESSIONS in farm.maps or Role.STATIC in farm.maps) and \
                Role.BACKENDS not in farm.maps:
            raise RulesetError(f"farm {farm.name!r} has session maps but no map with comment "
                               f"\"nftsync:backends farm={farm.name}\" (mark -> address)")
    return farms


def _check_map(smap: SessionMap, obj: dict[str, Any]) -> None:
    where = f"map {smap.ref} ({smap.role.value} of farm {smap.farm!r})"
    flags = obj.get("flags", [])
    if smap.role in (Role.SESSIONS, Role.STATIC) and smap.value_type != "mark":
        raise RulesetError(f"{where}: must map a client key to a mark, not to {smap.value_type}")
    if smap.role is Role.SESSIONS and "timeout" not in flags:
        raise RulesetError(f"{where}: a session map needs 'flags dynamic,timeout' and a timeout")
    if smap.role is Role.STATIC and "timeout" in flags:
        raise RulesetError(f"{where}: a static map must not have timeouts")
    if smap.role is Role.BACKENDS and smap.key_type != ("mark",):
        raise RulesetError(f"{where}: must be 'type mark : <address>'")
    if smap.role is Role.STATES and (smap.key_type != ("mark",) or smap.value_type != "mark"):
        raise RulesetError(f"{where}: must be 'type mark : mark'")


def current_farms(nft: Nft | None = None) -> dict[str, Farm]:
    """The farms the kernel holds now, found through the cheap `list maps` listing."""
    nft = nft or Nft()
    return discover_farms(nft.list_json("maps", terse=True), nft)


def current_tables(nft: Nft, wanted: set[TableId]) -> dict[TableId, TableBlocks]:
    """Set/map definitions (terse) and chain headers of the wanted tables, cheaply."""
    text = nft.list_text("sets") + nft.list_text("maps")
    tables = {tid: blk for tid, blk in parse_listing(text).items() if tid in wanted}
    for obj in nft.list_json("chains"):
        chain = obj.get("chain")
        if chain is None:
            continue
        tid = (chain["family"], chain["table"])
        if tid not in wanted:
            continue
        blk = tables.setdefault(tid, TableBlocks(*tid))
        blk.objects[("chain", chain["name"])] = chain_header(chain)
    for obj in nft.list_json("flowtables"):
        ft = obj.get("flowtable")
        if ft and (ft["family"], ft["table"]) in wanted:
            blk = tables.setdefault((ft["family"], ft["table"]), TableBlocks(ft["family"],
                                                                             ft["table"]))
            blk.objects[("flowtable", ft["name"])] = "?"
    return tables


def chain_header(chain: dict[str, Any]) -> str:
    """The part of a chain that `flush table` does not reset: its hook, type, priority, policy."""
    if "hook" not in chain:
        return "regular"
    dev = chain.get("dev", "")
    return f"{chain.get('type')} {chain['hook']} {chain.get('prio')} {dev} {chain.get('policy')}"


# -- locating a map's declaration in a ruleset file, for one-line errors that name the line -----

_FAMILIES = ("ip", "ip6", "inet", "arp", "bridge", "netdev")
_TABLE_LINE = re.compile(r"^\s*(?:add\s+|create\s+)?table\s+(?:(" + "|".join(_FAMILIES)
                         + r")\s+)?([\w.-]+)")
_TIME_TOKEN = re.compile(r"\b(timeout|expires)\s+([0-9][0-9a-z]*)\b")
_TIME_PART = re.compile(r"(\d+)(ms|d|h|m|s)")
_TIME_UNIT_MS = {"d": 86_400_000, "h": 3_600_000, "m": 60_000, "s": 1000, "ms": 1}


def nft_time_ms(text: str) -> int | None:
    """An nft time as written in a ruleset (`120`, `120s`, `60d`, `1d2h3m4s5ms`) in ms, or None
    when it is not one (a `$variable`, a typo): nft itself is the judge of the syntax."""
    if text.isdigit():
        return int(text) * 1000
    total, pos = 0, 0
    for m in _TIME_PART.finditer(text):
        if m.start() != pos:
            return None
        total += int(m.group(1)) * _TIME_UNIT_MS[m.group(2)]
        pos = m.end()
    return total if pos == len(text) and pos else None


def map_declaration_lines(source: str, family: str, table: str, name: str) -> range | None:
    """Line numbers (1-based) of the block that declares map `name`, preferring the one inside
    `table family table`; None if the file does not declare it itself (e.g. an include)."""
    decl = re.compile(r"^\s*(?:add\s+|create\s+)?map\s+(?:(?:" + "|".join(_FAMILIES)
                      + r")\s+)?(?:[\w.-]+\s+)?" + re.escape(name) + r"\s*\{")
    lines = source.splitlines()
    current: tuple[str, str] | None = None
    first: int | None = None
    chosen: int | None = None
    for number, line in enumerate(lines, 1):
        code = line.split("#", 1)[0]
        t = _TABLE_LINE.match(code)
        if t:
            current = (t.group(1) or "ip", t.group(2))
        if decl.match(code):
            first = first or number
            if current == (family, table) or f" {family} {table} {name}" in code:
                chosen = number
                break
    start = chosen or first
    if start is None:
        return None
    depth = 0
    for number in range(start, len(lines) + 1):
        code = lines[number - 1].split("#", 1)[0]
        depth += code.count("{") - code.count("}")
        if depth <= 0:
            return range(start, number + 1)
    return range(start, len(lines) + 1)


def line_of_long_time(path: str, family: str, table: str, name: str,
                      limit_ms: int) -> tuple[int, str | None] | None:
    """Where map `name` (or one of its elements) gets a timeout or expiry above `limit_ms`:
    (line, the words as written, e.g. "timeout 60d"); else (the line declaring the map, None);
    None if the file does not declare the map itself."""
    try:
        source = read_regular(path, "ruleset file", MAX_RULESET_BYTES).decode("utf-8")
    except (OSError, UnicodeDecodeError, FileRefused):
        return None
    block = map_declaration_lines(source, family, table, name)
    if block is None:
        return None
    lines = source.splitlines()
    for number in block:
        for m in _TIME_TOKEN.finditer(lines[number - 1].split("#", 1)[0]):
            ms = nft_time_ms(m.group(2))
            if ms is not None and ms > limit_ms:
                return number, m.group(0)
    return block.start, None
