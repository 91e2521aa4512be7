"""The seed talk's legacy L4 farm as iptables rules: `recent` tables per backend, MARK + DNAT.

For each backend (a mark and an address), in the nat table:

    rcheck:   -d VIP -p P -m multiport --dports PORTS -m recent --rcheck --seconds T
              --name _FARM_MARK_sessions --mask M --rsource -j MARK --set-xmark MARK/0xffffffff
    schedule: clients no table knows (mark still 0) get a backend by `-m statistic`
              (nth: round robin; random: equal shares)
    set+DNAT: -m mark --mark MARK -m recent --set --name _FARM_MARK_sessions --mask M --rsource
              -m comment --comment "FARM_FARM_i_" -j DNAT --to-destination ADDR[:PORT]

Unlike the seed (which appends to PREROUTING), all rules live in a chain of the farm's own,
`FARM_<name>`, reached by one jump from PREROUTING (and OUTPUT with `local = true`, for clients on
the balancer itself). `apply` is one `iptables-restore --noflush`: declaring the chain flushes and
refills only it, so other rules and farms are untouched and the update is atomic. `remove` deletes
the jumps and the chain, which also drops the farm's recent tables (the kernel frees a table when
no rule names it).

iptables is whichever the host uses (`iptables` is iptables-nft on Debian 12; `-m recent` works
through nft_compat and the tables appear in /proc/net/xt_recent as usual), or `iptables-legacy`.
IPv4 only (the seed's farms are).
"""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

from nftsync.errors import NftsyncError
from nftsync.files import FileRefused, read_regular

MAX_FILE = 1 << 20
MAX_BACKENDS = 256
MAX_PORTS = 15  # -m multiport takes at most 15 ports (a range counts as two)
CHAIN_PREFIX = "FARM_"
_FARM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,22}")  # chain names stop at 28 characters


class FarmError(NftsyncError):
    """A legacy farm description is missing or wrong, or iptables refused its rules."""

    exit_code = 2


@dataclass(frozen=True, slots=True)
class Backend:
    mark: int
    address: str
    port: int | None

    @property
    def destination(self) -> str:
        return self.address if self.port is None else f"{self.address}:{self.port}"


@dataclass(frozen=True, slots=True)
class LegacyFarm:
    name: str
    vip: str
    proto: str
    ports: tuple[str, ...]  # "80", "8000:8080"
    seconds: int
    mask: str
    backends: tuple[Backend, ...]
    scheduler: str = "nth"
    local: bool = False

    @property
    def chain(self) -> str:
        return CHAIN_PREFIX + self.name

    def table_name(self, backend: Backend) -> str:
        """The recent table of a backend, named as the seed names it: _FARM_0x200_sessions."""
        return f"_{self.name}_{backend.mark:#x}_sessions"


def _fail(source: str, msg: str) -> FarmError:
    return FarmError(f"{source}: {msg}")


def _port(value: object, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise _fail(source, f"port {value!r} is not a number")
    try:
        port = int(value)
    except ValueError:
        raise _fail(source, f"port {value!r} is not a number") from None
    if not 1 <= port <= 65535:
        raise _fail(source, f"port {port} is not 1..65535")
    return port


def _ports(value: object, source: str) -> tuple[str, ...]:
    """`80`, `"80,443"`, `"8000-8080"`/`"8000:8080"` or a list of those, as multiport items."""
    items = value if isinstance(value, list) else [value]
    out: list[str] = []
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            m = re.fullmatch(r"(\d{1,5})\s*[-:]\s*(\d{1,5})", part)
            if m:
                lo, hi = _port(m[1], source), _port(m[2], source)
                if lo > hi:
                    raise _fail(source, f"port range {part} runs backwards")
                out.append(f"{lo}:{hi}")
            else:
                out.append(str(_port(part, source)))
    weight = sum(2 if ":" in p else 1 for p in out)
    if not out or weight > MAX_PORTS:
        raise _fail(source, f"ports: 1 to {MAX_PORTS} (a range counts twice), got {len(out)}")
    return tuple(out)


def _backend(raw: object, i: int, source: str) -> Backend:
    where = f"{source}: backends[{i}]"
    if not isinstance(raw, dict):
        raise FarmError(f"{where}: expected a table with mark and address")
    unknown = set(raw) - {"mark", "address"}
    if unknown:
        raise FarmError(f"{where}: unknown keys {sorted(unknown)}")
    mark = raw.get("mark")
    if isinstance(mark, str):
        try:
            mark = int(mark, 0)
        except ValueError:
            raise FarmError(f"{where}: mark {raw['mark']!r} is not a number") from None
    if isinstance(mark, bool) or not isinstance(mark, int) or not 1 <= mark <= 0xFFFFFFFF:
        raise FarmError(f"{where}: mark must be 1..0xffffffff (0 means 'no backend yet')")
    addr = raw.get("address")
    if not isinstance(addr, str):
        raise FarmError(f"{where}: address must be a string like \"192.168.56.1:80\"")
    host, sep, port = addr.rpartition(":")
    if not sep:
        host, port = addr, ""
    try:
        ip = ipaddress.IPv4Address(host)
    except ValueError:
        raise FarmError(f"{where}: {addr!r} is not IPv4[:port]") from None
    return Backend(mark, str(ip), _port(port, where) if port else None)


def parse_farm(data: dict, source: str = "<farm>") -> LegacyFarm:
    """A farm from a decoded TOML/JSON document: either top-level keys or a [farm] table."""
    farm = data.get("farm", data)
    if not isinstance(farm, dict):
        raise _fail(source, "expected a [farm] table")
    known = {"name", "vip", "proto", "ports", "persistence_seconds", "mask", "backends",
             "scheduler", "local"}
    unknown = set(farm) - known
    if unknown:
        raise _fail(source, f"unknown keys {sorted(unknown)} (known: {sorted(known)})")
    for key in ("name", "vip", "ports", "persistence_seconds", "backends"):
        if key not in farm:
            raise _fail(source, f"missing {key!r}")
    name = farm["name"]
    if not isinstance(name, str) or not _FARM_NAME.fullmatch(name):
        raise _fail(source, f"name {name!r}: 1-23 of A-Z a-z 0-9 _ -, starting alphanumeric")
    try:
        vip = str(ipaddress.IPv4Address(str(farm["vip"])))
    except ValueError:
        raise _fail(source, f"vip {farm['vip']!r} is not an IPv4 address") from None
    proto = farm.get("proto", "tcp")
    if proto not in ("tcp", "udp"):
        raise _fail(source, f"proto {proto!r}: tcp or udp")
    seconds = farm["persistence_seconds"]
    if isinstance(seconds, bool) or not isinstance(seconds, int) or not 1 <= seconds <= 2**31:
        raise _fail(source, "persistence_seconds must be a whole number of seconds >= 1")
    mask = str(farm.get("mask", "255.255.255.255"))
    try:
        net = ipaddress.IPv4Network(f"0.0.0.0/{mask}")
    except ValueError:
        raise _fail(source, f"mask {mask!r} is not a netmask like 255.255.255.0") from None
    mask = str(net.netmask)
    scheduler = farm.get("scheduler", "nth")
    if scheduler not in ("nth", "random"):
        raise _fail(source, f"scheduler {scheduler!r}: nth (round robin) or random")
    local = farm.get("local", False)
    if not isinstance(local, bool):
        raise _fail(source, "local must be true or false")
    raw_backends = farm["backends"]
    if not isinstance(raw_backends, list) or not 1 <= len(raw_backends) <= MAX_BACKENDS:
        raise _fail(source, f"backends: a list of 1..{MAX_BACKENDS}")
    backends = tuple(_backend(b, i, source) for i, b in enumerate(raw_backends))
    marks = [b.mark for b in backends]
    if len(set(marks)) != len(marks):
        raise _fail(source, "two backends share a mark")
    return LegacyFarm(name, vip, proto, _ports(farm["ports"], source), seconds, mask, backends,
                      scheduler, local)


def load_farm(path: str | Path) -> LegacyFarm:
    """Read a farm description (.toml, or .json) with a size bound."""
    p = Path(path)
    try:  # without blocking: a FIFO named here must not hang the daemon's start (issue 13)
        raw = read_regular(p, "legacy farm file", MAX_FILE)
    except FileRefused as exc:
        raise FarmError(str(exc)) from None
    except OSError as exc:
        raise FarmError(f"{p}: {exc.strerror}") from exc
    try:
        text = raw.decode()
        data = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise FarmError(f"{p}: {exc}") from exc
    if not isinstance(data, dict):
        raise FarmError(f"{p}: expected a table/object at the top")
    return parse_farm(data, str(p))


def _match_vip(farm: LegacyFarm) -> list[str]:
    return ["-d", f"{farm.vip}/32", "-p", farm.proto, "-m", "multiport", "--dports",
            ",".join(farm.ports)]


def jump_rules(farm: LegacyFarm) -> list[list[str]]:
    """The rules (chain first) that send the farm's packets to its chain."""
    chains = ["PREROUTING"] + (["OUTPUT"] if farm.local else [])
    return [[c, *_match_vip(farm), "-j", farm.chain] for c in chains]


def chain_rules(farm: LegacyFarm) -> list[list[str]]:
    """The rules of the farm's chain, in order, as iptables arguments after `-A CHAIN`."""
    rules: list[list[str]] = []
    for b in farm.backends:
        rules.append([*_match_vip(farm), "-m", "recent", "--rcheck", "--seconds",
                      str(farm.seconds), "--name", farm.table_name(b), "--mask", farm.mask,
                      "--rsource", "-j", "MARK", "--set-xmark", f"{b.mark:#x}/0xffffffff"])
    n = len(farm.backends)
    for i, b in enumerate(farm.backends):
        new = ["-p", farm.proto, "-m", "mark", "--mark", "0x0"]
        left = n - i  # this rule sees the clients the rules before it did not take
        if left > 1:
            if farm.scheduler == "nth":
                new += ["-m", "statistic", "--mode", "nth", "--every", str(left),
                        "--packet", "0"]
            else:
                new += ["-m", "statistic", "--mode", "random", "--probability",
                        f"{1 / left:.11f}"]
        rules.append([*new, "-j", "MARK", "--set-xmark", f"{b.mark:#x}/0xffffffff"])
    for i, b in enumerate(farm.backends):
        rules.append(["-p", farm.proto, "-m", "mark", "--mark", f"{b.mark:#x}", "-m", "recent",
                      "--set", "--name", farm.table_name(b), "--mask", farm.mask, "--rsource",
                      "-m", "comment", "--comment", f"FARM_{farm.name}_{i}_", "-j", "DNAT",
                      "--to-destination", b.destination])
    return rules


def _quote(arg: str) -> str:
    return arg if re.fullmatch(r"[A-Za-z0-9_./:,=+-]+", arg) else '"' + arg + '"'


def restore_text(farm: LegacyFarm, *, add_jumps: list[list[str]] | None = None) -> str:
    """iptables-restore input that (with --noflush) replaces only the farm's chain."""
    lines = ["*nat", f":{farm.chain} - [0:0]"]
    lines += ["-A " + " ".join(_quote(a) for a in r) for r in add_jumps or []]
    lines += [f"-A {farm.chain} " + " ".join(_quote(a) for a in r) for r in chain_rules(farm)]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def rules_as_commands(farm: LegacyFarm, iptables: str = "iptables") -> list[str]:
    """The same rules as iptables commands (for reading, and for hosts without restore)."""
    out = [f"{iptables} -t nat -N {farm.chain}"]
    out += [f"{iptables} -t nat -A " + " ".join(_quote(a) for a in r) for r in jump_rules(farm)]
    out += [f"{iptables} -t nat -A {farm.chain} " + " ".join(_quote(a) for a in r)
            for r in chain_rules(farm)]
    return out


@dataclass(slots=True)
class IptablesRunner:
    """Runs `iptables` (-nft or -legacy) and its `-restore`, with errors turned into FarmError."""

    iptables: str = "iptables"
    timeout: float = 30.0
    netns: str | None = None  # run inside `ip netns exec NETNS` (labs, tests)

    @property
    def restore(self) -> str:
        return self.iptables + "-restore"

    def _run(self, argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
        if shutil.which(argv[0]) is None:
            raise FarmError(f"{argv[0]} not found (install iptables)")
        if self.netns is not None:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        try:
            return subprocess.run(argv, input=stdin, capture_output=True, text=True,
                                  timeout=self.timeout)
        except subprocess.TimeoutExpired:
            raise FarmError(f"{argv[0]} did not finish within {self.timeout}s") from None

    def has_rule(self, rule: list[str]) -> bool:
        return self._run([self.iptables, "-w", "-t", "nat", "-C", *rule]).returncode == 0

    def has_chain(self, chain: str) -> bool:
        return self._run([self.iptables, "-w", "-t", "nat", "-S", chain]).returncode == 0

    def restore_noflush(self, text: str) -> None:
        proc = self._run([self.restore, "-w", "--noflush"], stdin=text)
        if proc.returncode != 0:
            err = proc.stderr.strip().splitlines()
            raise FarmError(f"{self.restore} refused the rules: {err[-1] if err else 'failed'}")

    def chain_rules(self, chain: str) -> list[str]:
        proc = self._run([self.iptables, "-w", "-t", "nat", "-S", chain])
        if proc.returncode != 0:
            return []
        return [ln for ln in proc.stdout.splitlines() if ln.startswith("-A ")]


def apply_farm(farm: LegacyFarm, runner: IptablesRunner | None = None) -> str:
    """Load (or replace) the farm's chain and add its jumps if missing, in one transaction.
    Returns the restore text used. Re-applying is idempotent; the recent tables survive as long
    as the chain's rules keep naming them (iptables-restore swaps the rules in one commit)."""
    runner = runner or IptablesRunner()
    missing = [r for r in jump_rules(farm) if not runner.has_rule(r)]
    text = restore_text(farm, add_jumps=missing)
    runner.restore_noflush(text)
    return text


def remove_farm(farm: LegacyFarm, runner: IptablesRunner | None = None) -> bool:
    """Delete the jumps and the chain in one transaction; False if the farm was not there."""
    runner = runner or IptablesRunner()
    jumps = [r for r in jump_rules(farm) if runner.has_rule(r)]
    if not jumps and not runner.has_chain(farm.chain):
        return False
    lines = ["*nat"]
    lines += ["-D " + " ".join(_quote(a) for a in r) for r in jumps]
    if runner.has_chain(farm.chain):
        lines += [f"-F {farm.chain}", f"-X {farm.chain}"]
    lines.append("COMMIT")
    runner.restore_noflush("\n".join(lines) + "\n")
    return True


def describe(farm: LegacyFarm) -> dict:
    return {
        "name": farm.name, "vip": farm.vip, "proto": farm.proto, "ports": list(farm.ports),
        "persistence_seconds": farm.seconds, "mask": farm.mask, "scheduler": farm.scheduler,
        "local": farm.local, "chain": farm.chain,
        "backends": [{"mark": f"{b.mark:#x}", "destination": b.destination,
                      "recent_table": farm.table_name(b)} for b in farm.backends],
    }
