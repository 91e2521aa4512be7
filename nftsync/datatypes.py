"""nft datatypes and families: names, numbers, and the one codec of map keys and values.

Why one module: a session key is written by users as text (`10.0.0.1 . 80`), listed by
libnftables as JSON, carried by nf_tables netlink messages and the peer protocol as the kernel's
bytes, and built by the daemon from conntrack fields. Every one of those paths must agree on the
byte layout, or a session learned one way would not be found another way; so the layout (sizes,
byte order, padding of concatenations) and the text each datatype accepts are defined here once,
after nft's src/datatype.c and the kernel's nft_set_ext key layout:

* components follow each other, each padded with zeros to a multiple of 4 bytes (a register)
  when there is more than one; a lone component is not padded (a single inet_service key is 2
  bytes);
* ipv4/ipv6 addresses, ether addresses, inet_service and inet_proto are network order; `mark`
  is host order (meta mark is a host-order u32 register in the kernel).

Pure: no sockets, no kernel; used by the model, the nf_tables codecs and the daemon alike.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import struct
from collections.abc import Sequence

from nftsync.errors import NftsyncError

# --- families ------------------------------------------------------------------------------------
# nft table families as the kernel numbers them (enum NFPROTO_* in uapi netfilter.h): the
# nfgenmsg family of every nf_tables message.
NFPROTO_NUMBERS = {"inet": 1, "ip": 2, "arp": 3, "netdev": 5, "bridge": 7, "ip6": 10}
NFPROTO_NAMES = {v: k for k, v in NFPROTO_NUMBERS.items()}

# Address families of conntrack entries, with the nft datatype and byte length of their
# addresses (a key built from a conntrack tuple starts with one of these).
ADDRESS_TYPES = {socket.AF_INET: "ipv4_addr", socket.AF_INET6: "ipv6_addr"}
ADDRESS_FAMILIES = {v: k for k, v in ADDRESS_TYPES.items()}

# --- datatypes -----------------------------------------------------------------------------------
# nft's datatype ids (src/datatype.h enum datatypes); a concatenation's id packs its components,
# 6 bits each, first component in the highest bits.
DATATYPE_IDS = {
    "verdict": 1, "integer": 4, "string": 5, "ipv4_addr": 7, "ipv6_addr": 8, "ether_addr": 9,
    "inet_proto": 12, "inet_service": 13, "mark": 19, "ifname": 41,
}
DATATYPE_NAMES = {v: k for k, v in DATATYPE_IDS.items()}
_TYPE_BITS = 6

# natural size in bytes of each datatype the codec converts: the key types nftsync supports
DATATYPE_SIZES = {"ipv4_addr": 4, "ipv6_addr": 16, "ether_addr": 6, "inet_proto": 1,
                  "inet_service": 2, "mark": 4}
KEY_TYPES = ("ipv4_addr", "ipv6_addr", "inet_service", "mark", "inet_proto", "ether_addr")
ADDRESS_LENGTHS = {f: DATATYPE_SIZES[t] for f, t in ADDRESS_TYPES.items()}

PROTOCOLS = {1: "icmp", 2: "igmp", 6: "tcp", 17: "udp", 33: "dccp", 41: "ipv6", 47: "gre",
             50: "esp", 51: "ah", 58: "ipv6-icmp", 132: "sctp", 136: "udplite"}
PROTOCOL_NUMBERS = {v: k for k, v in PROTOCOLS.items()}

_ETHER = re.compile(r"^[0-9a-fA-F]{2}([:-][0-9a-fA-F]{2}){5}$")
_MARK = struct.Struct("=I")
_HOST_LITTLE = struct.pack("=H", 1) == b"\x01\x00"


class DatatypeError(NftsyncError, ValueError):
    """A value does not match the nft datatype(s) it is said to have."""


def datatype_names(type_id: int) -> list[str]:
    """Component names of an nft (possibly concatenated) datatype id, e.g. 461 ->
    ["ipv4_addr", "inet_service"]; unknown components are given as "type<N>"."""
    parts: list[str] = []
    while type_id:
        t = type_id & ((1 << _TYPE_BITS) - 1)
        parts.append(DATATYPE_NAMES.get(t, f"type{t}"))
        type_id >>= _TYPE_BITS
    parts.reverse()
    return parts


def size_of(dtype: str) -> int:
    try:
        return DATATYPE_SIZES[dtype]
    except KeyError:
        raise DatatypeError(f"unsupported nft datatype {dtype!r}") from None


# --- layout --------------------------------------------------------------------------------------
def key_length(types: Sequence[str]) -> int | None:
    """Length in bytes of a value of nft datatypes `types` as the kernel stores it; None if a
    type is not one whose size the codec knows."""
    try:
        sizes = [DATATYPE_SIZES[t] for t in types]
    except KeyError:
        return None
    if len(sizes) == 1:
        return sizes[0]
    return sum((s + 3) & ~3 for s in sizes)


def join_raw(parts: Sequence[bytes]) -> bytes:
    """The kernel's concatenation of components already in their datatype's bytes: each
    padded to 4 bytes when there is more than one. The one definition of that padding."""
    if len(parts) == 1:
        return parts[0]
    return b"".join(p + b"\0" * (-len(p) % 4) for p in parts)


# --- one component -------------------------------------------------------------------------------
def parse_value(dtype: str, value: object) -> object:
    """A component given as text (or already as a number / address) -> its Python value:
    IPv4Address/IPv6Address, int (inet_service, mark, inet_proto), str (ether_addr, lower case,
    colons). Raises DatatypeError naming the datatype."""
    size_of(dtype)
    try:
        if dtype == "ipv4_addr":
            return ipaddress.IPv4Address(value)  # type: ignore[arg-type]
        if dtype == "ipv6_addr":
            return ipaddress.IPv6Address(value)  # type: ignore[arg-type]
        if dtype == "ether_addr":
            text = str(value)
            if not _ETHER.match(text):
                raise ValueError(text)
            return text.lower().replace("-", ":")
        if dtype == "inet_proto" and isinstance(value, str) and value in PROTOCOL_NUMBERS:
            return PROTOCOL_NUMBERS[value]
        if isinstance(value, str):
            number = int(value, 10 if value.strip().isdigit() else 0)
        else:
            number = int(value)  # type: ignore[call-overload]
    except (ValueError, TypeError, OverflowError):
        raise DatatypeError(f"{value!r} is not a valid {dtype}") from None
    if not 0 <= number < 1 << (8 * DATATYPE_SIZES[dtype]):
        raise DatatypeError(f"{value!r} is not a valid {dtype}")
    return number


def service_bytes(port: int) -> bytes:
    """An inet_service (port, 0..65535, unchecked: the hot path's) in the kernel's bytes."""
    return port.to_bytes(2, "big")


def proto_bytes(proto: int) -> bytes:
    """An inet_proto (0..255, unchecked) in the kernel's bytes."""
    return bytes((proto,))


def to_bytes(dtype: str, value: object) -> bytes:
    """One component's kernel bytes (unpadded), the value checked first."""
    v = parse_value(dtype, value)
    if dtype in ("ipv4_addr", "ipv6_addr"):
        return v.packed  # type: ignore[attr-defined]
    if dtype == "ether_addr":
        return bytes.fromhex(str(v).replace(":", ""))
    if dtype == "mark":
        return _MARK.pack(v)
    if dtype == "inet_service":
        return service_bytes(v)  # type: ignore[arg-type]
    return proto_bytes(v)  # type: ignore[arg-type]


def from_bytes(dtype: str, raw: bytes) -> object:
    """One component's Python value from its kernel bytes (exactly its size)."""
    if dtype == "ipv4_addr":
        return ipaddress.IPv4Address(raw)
    if dtype == "ipv6_addr":
        return ipaddress.IPv6Address(raw)
    if dtype == "inet_service":
        return int.from_bytes(raw, "big")
    if dtype == "mark":
        return int.from_bytes(raw, "little" if _HOST_LITTLE else "big")
    if dtype == "ether_addr":
        return ":".join(f"{b:02x}" for b in raw)
    return raw[0]  # inet_proto


# --- values --------------------------------------------------------------------------------------
def split_concat(value: bytes, types: Sequence[str]) -> tuple:
    """Split a key/data value into Python values, one per nft datatype in `types`
    (see the module docstring for the layout)."""
    out = []
    off = 0
    n = len(value)
    for i, t in enumerate(types):
        size = size_of(t)
        if off + size > n:
            raise DatatypeError(f"value of {n} bytes too short for {' . '.join(types)}")
        out.append(from_bytes(t, value[off : off + size]))
        off += size
        padded = (size + 3) & ~3
        if i < len(types) - 1 or n - (off - size) >= padded:
            off += padded - size
    if off != n:
        raise DatatypeError(f"value of {n} bytes does not match {' . '.join(types)}")
    return tuple(out)


def join_concat(values: Sequence[object], types: Sequence[str]) -> bytes:
    """Inverse of `split_concat`: the kernel's bytes for these values (text or Python values)."""
    if len(values) != len(types):
        raise DatatypeError(f"{len(values)} values for {len(types)} datatypes")
    return join_raw([to_bytes(t, v) for v, t in zip(values, types, strict=True)])


def format_value(value: bytes, types: Sequence[str]) -> str:
    """nft's text form of a key or data value, e.g. "10.0.0.1 . 80" or "0x00000200"."""
    parts = []
    for t, v in zip(types, split_concat(value, types), strict=True):
        if t == "mark":
            parts.append(f"0x{v:08x}")
        elif t == "inet_proto":
            parts.append(PROTOCOLS.get(v, str(v)))  # type: ignore[arg-type]
        else:
            parts.append(str(v))
    return " . ".join(parts)
