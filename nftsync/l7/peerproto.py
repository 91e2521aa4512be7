"""HAProxy's peers protocol (`HAProxyS 2.1`, HAProxy 1.7 to today), as a sans-I/O codec.

Bytes in, messages out, and the reverse; no sockets, no clocks. Everything read from the wire is
bounded (lengths, integer widths, cache ids, buffered bytes) and anything that does not parse
raises `ProtocolError`, which the session turns into a closed connection: a broken or hostile
peer can cost one connection, never the daemon. Wire facts were read in HAProxy 2.6's
src/peers.c and measured against Debian's 2.6 (docs/l7.md, "The peers protocol").

Framing: two bytes, class and type; a type with bit 7 set is followed by a length (HAProxy's
variable-length integer) and that many payload bytes. The hello before it is three text lines
and the answer a status line.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

PROTOCOL = "HAProxyS"
VERSION = "2.1"

# Status line codes of the handshake.
STATUS_OK = 200
STATUS_TRY_AGAIN = 300
STATUS_ERR_PROTO = 501
STATUS_ERR_VERSION = 502
STATUS_ERR_HOST = 503  # the name the dialler expects us to have is not ours
STATUS_ERR_PEER = 504  # the dialler's own name is not the peer we expect

CLASS_CONTROL = 0
CLASS_ERROR = 1
CLASS_STICKTABLE = 10
CLASS_RESERVED = 255

CTRL_RESYNCREQ = 0
CTRL_RESYNCFINISHED = 1
CTRL_RESYNCPARTIAL = 2
CTRL_RESYNCCONFIRM = 3
CTRL_HEARTBEAT = 4

ERR_PROTOCOL = 0
ERR_SIZELIMIT = 1

STKT_UPDATE = 0x80
STKT_INCUPDATE = 0x81
STKT_DEFINE = 0x82
STKT_SWITCH = 0x83
STKT_ACK = 0x84
STKT_UPDATE_TIMED = 0x85
STKT_INCUPDATE_TIMED = 0x86
UPDATE_TYPES = frozenset({STKT_UPDATE, STKT_INCUPDATE, STKT_UPDATE_TIMED, STKT_INCUPDATE_TIMED})

# Network key types of a table definition (not HAProxy's internal sample types).
KEY_SINT, KEY_IPV4, KEY_IPV6, KEY_STR, KEY_BIN = 2, 4, 5, 6, 7
KEY_TYPE_NAMES = {KEY_SINT: "integer", KEY_IPV4: "ip", KEY_IPV6: "ipv6", KEY_STR: "string",
                  KEY_BIN: "binary"}
KEY_TYPE_CODES = {name: code for code, name in KEY_TYPE_NAMES.items()}

# Stored data types (bit numbers of a definition's data field) and how each is encoded.
DT_SERVER_ID = 0
DT_SERVER_KEY = 19
STD_SINT, STD_UINT, STD_ULL, STD_FRQP, STD_DICT = range(5)
# HAProxy 2.6's stktable_data_types: (standard type, is an array). Index = bit number.
DATA_TYPES: tuple[tuple[int, bool], ...] = (
    (STD_SINT, False),  # 0 server_id
    (STD_UINT, False),  # 1 gpt0
    (STD_UINT, False),  # 2 gpc0
    (STD_FRQP, False),  # 3 gpc0_rate
    (STD_UINT, False),  # 4 conn_cnt
    (STD_FRQP, False),  # 5 conn_rate
    (STD_UINT, False),  # 6 conn_cur
    (STD_UINT, False),  # 7 sess_cnt
    (STD_FRQP, False),  # 8 sess_rate
    (STD_UINT, False),  # 9 http_req_cnt
    (STD_FRQP, False),  # 10 http_req_rate
    (STD_UINT, False),  # 11 http_err_cnt
    (STD_FRQP, False),  # 12 http_err_rate
    (STD_ULL, False),  # 13 bytes_in_cnt
    (STD_FRQP, False),  # 14 bytes_in_rate
    (STD_ULL, False),  # 15 bytes_out_cnt
    (STD_FRQP, False),  # 16 bytes_out_rate
    (STD_UINT, False),  # 17 gpc1
    (STD_FRQP, False),  # 18 gpc1_rate
    (STD_DICT, False),  # 19 server_key
    (STD_UINT, False),  # 20 http_fail_cnt
    (STD_FRQP, False),  # 21 http_fail_rate
    (STD_UINT, True),  # 22 gpt[]
    (STD_UINT, True),  # 23 gpc[]
    (STD_FRQP, True),  # 24 gpc_rate[]
)
KNOWN_DATA_MASK = (1 << len(DATA_TYPES)) - 1

# Bounds. HAProxy's own messages fit its 16 kB buffer; a name or key is far below these.
MAX_PAYLOAD = 65536
MAX_VARINT_BYTES = 10  # 64 bits
MAX_HELLO_LINE = 256
MAX_TABLE_NAME = 1024
MAX_KEY_LEN = 65536
MAX_ARRAY_ELEMS = 100  # HAProxy: STKTABLE_MAX_DT_ARRAY_SIZE
DICT_CACHE_SIZE = 128  # HAProxy: PEER_STKT_CACHE_MAX_ENTRIES, per connection and direction
MAX_SERVER_NAME = 1024
U32 = 0xFFFFFFFF


class ProtocolError(Exception):
    """What came from the peer is not the peers protocol (or exceeds a bound): drop the
    connection. Never raised for anything but the peer's bytes."""


# --- integers --------------------------------------------------------------------------------

def encode_varint(value: int) -> bytes:
    """HAProxy's `intencode`: < 240 in one byte; else the low 4 bits over 240, then 7 bits per
    byte with bit 7 meaning "more"."""
    if value < 0 or value >= 1 << 64:
        raise ValueError(f"varint out of range: {value}")
    if value < 240:
        return bytes((value,))
    out = bytearray(((value | 240) & 255,))
    value = (value - 240) >> 4
    while value >= 128:
        out.append((value | 128) & 255)
        value = (value - 128) >> 7
    out.append(value)
    return bytes(out)


def decode_varint(buf: bytes | bytearray | memoryview, pos: int, end: int | None = None
                  ) -> tuple[int, int]:
    """(value, position after it); ProtocolError when truncated at `end` or wider than 64 bits."""
    if end is None:
        end = len(buf)
    if pos >= end:
        raise ProtocolError("integer truncated")
    value = buf[pos]
    pos += 1
    if value < 240:
        return value, pos
    shift = 4
    for _ in range(MAX_VARINT_BYTES - 1):
        if pos >= end:
            raise ProtocolError("integer truncated")
        byte = buf[pos]
        pos += 1
        value += byte << shift
        shift += 7
        if byte < 128:
            if value >= 1 << 64:
                raise ProtocolError("integer wider than 64 bits")
            return value, pos
    raise ProtocolError("integer wider than 64 bits")


def _u32(buf: bytes, pos: int, end: int, what: str) -> tuple[int, int]:
    if pos + 4 > end:
        raise ProtocolError(f"{what} truncated")
    return struct.unpack_from("!I", buf, pos)[0], pos + 4


# --- framing ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Message:
    """One framed message: class, type and (types >= 128 only) payload."""

    cls: int
    type: int
    payload: bytes = b""


def encode_message(cls: int, typ: int, payload: bytes = b"") -> bytes:
    if typ < 128:
        if payload:
            raise ValueError("message types below 128 carry no payload")
        return bytes((cls, typ))
    return bytes((cls, typ)) + encode_varint(len(payload)) + payload


def control(typ: int) -> bytes:
    return bytes((CLASS_CONTROL, typ))


class FrameDecoder:
    """Cuts a byte stream into Messages. Holds at most one incomplete message (bounded by
    MAX_PAYLOAD plus its header)."""

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        out: list[Message] = []
        buf, pos, n = self._buf, 0, len(self._buf)
        while n - pos >= 2:
            cls, typ = buf[pos], buf[pos + 1]
            if typ < 128:
                out.append(Message(cls, typ))
                pos += 2
                continue
            try:
                length, start = decode_varint(buf, pos + 2, n)
            except ProtocolError:
                if n - (pos + 2) >= MAX_VARINT_BYTES:
                    raise
                break  # the length itself is not complete yet
            if length > self.max_payload:
                raise ProtocolError(f"message of {length} bytes (limit {self.max_payload})")
            if start + length > n:
                break
            out.append(Message(cls, typ, bytes(buf[start:start + length])))
            pos = start + length
        del self._buf[:pos]
        return out

    def take_rest(self) -> bytes:
        rest = bytes(self._buf)
        self._buf.clear()
        return rest


# --- handshake -------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Hello:
    """The dialler's three lines: protocol and version, the name it expects the listener to
    have, and its own name with pid and relative pid."""

    version: str
    remote_name: str
    sender: str
    pid: int = 0
    relative_pid: int = 1


def encode_hello(hello: Hello) -> bytes:
    return (f"{PROTOCOL} {hello.version}\n{hello.remote_name}\n"
            f"{hello.sender} {hello.pid} {hello.relative_pid}\n").encode()


def decode_hello(lines: list[bytes]) -> Hello:
    """Three lines without their newline. Raises ProtocolError (answer 501) when the shape is
    wrong; the caller compares version and names (502/503/504)."""
    if len(lines) != 3 or any(len(line) > MAX_HELLO_LINE for line in lines):
        raise ProtocolError("hello is not three short lines")
    try:
        first, name, last = (line.decode("ascii") for line in lines)
    except UnicodeDecodeError as exc:
        raise ProtocolError("hello is not ASCII") from exc
    proto, _, version = first.partition(" ")
    if proto != PROTOCOL or not version:
        raise ProtocolError(f"not the peers protocol: {first[:40]!r}")
    parts = last.split(" ")
    if len(parts) < 1 or not parts[0] or len(parts) > 3:
        raise ProtocolError(f"hello's sender line is malformed: {last[:60]!r}")
    try:
        pid = int(parts[1]) if len(parts) > 1 else 0
        rel = int(parts[2]) if len(parts) > 2 else 1
    except ValueError as exc:
        raise ProtocolError(f"hello's sender line is malformed: {last[:60]!r}") from exc
    return Hello(version, name, parts[0], pid, rel)


def version_supported(version: str) -> bool:
    """2.1 only: 2.0 lacks timed updates, which is how nftsync writes remaining expiries."""
    return version == VERSION


def encode_status(code: int) -> bytes:
    return f"{code}\n".encode()


# --- table definitions -----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class TableDef:
    """A DEFINE: the sender's id for the table, its name, key type code and length, the stored
    data types (bit field), `expire` in ms, and the parameters of counters and arrays
    (data type -> (element count or None, period or None)) needed to skip their values."""

    table_id: int
    name: str
    key_type: int
    key_len: int
    data_types: int
    expire_ms: int | None
    params: tuple[tuple[int, int | None, int | None], ...] = ()

    @property
    def key_type_name(self) -> str:
        return KEY_TYPE_NAMES.get(self.key_type, f"unknown({self.key_type})")

    @property
    def parseable(self) -> bool:
        """False when the table stores data types this codec does not know (a newer HAProxy):
        its updates cannot be decoded and are skipped whole."""
        return not self.data_types & ~KNOWN_DATA_MASK and self.key_type in KEY_TYPE_NAMES

    def array_len(self, data_type: int) -> int:
        for dt, nbelem, _period in self.params:
            if dt == data_type and nbelem is not None:
                return nbelem
        raise ProtocolError(f"array data type {data_type} without its size")


def decode_define(payload: bytes) -> TableDef:
    end = len(payload)
    table_id, pos = decode_varint(payload, 0, end)
    name_len, pos = decode_varint(payload, pos, end)
    if not 0 < name_len <= MAX_TABLE_NAME or pos + name_len >= end:
        raise ProtocolError("table definition: bad name length")
    try:
        name = payload[pos:pos + name_len].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError("table definition: name is not UTF-8") from exc
    pos += name_len
    key_type, pos = decode_varint(payload, pos, end)
    key_len, pos = decode_varint(payload, pos, end)
    data_types, pos = decode_varint(payload, pos, end)
    if key_len > MAX_KEY_LEN or table_id > U32:
        raise ProtocolError("table definition: key length or id out of range")
    expire: int | None = None
    params: list[tuple[int, int | None, int | None]] = []
    if pos < end:
        expire, pos = decode_varint(payload, pos, end)
        if expire > U32:
            raise ProtocolError("table definition: expire out of range")
        for dt, (std, is_array) in enumerate(DATA_TYPES):
            if not data_types & (1 << dt) or not (is_array or std == STD_FRQP):
                continue
            tag, pos = decode_varint(payload, pos, end)
            if tag != dt:
                raise ProtocolError(f"table definition: parameters of type {tag}, not {dt}")
            nbelem = period = None
            if is_array:
                nbelem, pos = decode_varint(payload, pos, end)
                if not 0 < nbelem <= MAX_ARRAY_ELEMS:
                    raise ProtocolError(f"table definition: array of {nbelem} elements")
            if std == STD_FRQP:
                period, pos = decode_varint(payload, pos, end)
            params.append((dt, nbelem, period))
    elif any(data_types & (1 << dt) for dt, (_s, arr) in enumerate(DATA_TYPES) if arr):
        raise ProtocolError("table definition: arrays without their sizes")
    # Bytes left over are parameters of data types a newer HAProxy knows; `parseable` says so.
    return TableDef(table_id, name, key_type, key_len, data_types, expire, tuple(params))


def encode_define(table: TableDef) -> bytes:
    name = table.name.encode()
    out = bytearray()
    out += encode_varint(table.table_id)
    out += encode_varint(len(name)) + name
    out += encode_varint(table.key_type) + encode_varint(table.key_len)
    out += encode_varint(table.data_types)
    out += encode_varint(table.expire_ms or 0)
    for dt, nbelem, period in table.params:
        out += encode_varint(dt)
        if nbelem is not None:
            out += encode_varint(nbelem)
        if period is not None:
            out += encode_varint(period)
    return encode_message(CLASS_STICKTABLE, STKT_DEFINE, bytes(out))


def encode_switch(table_id: int) -> bytes:
    return encode_message(CLASS_STICKTABLE, STKT_SWITCH, encode_varint(table_id))


def decode_switch(payload: bytes) -> int:
    table_id, _ = decode_varint(payload, 0)
    return table_id


# --- acks ------------------------------------------------------------------------------------

def encode_ack(table_id: int, update_id: int) -> bytes:
    """Acknowledge every update up to `update_id` of the table the *receiver* calls table_id
    (the id from the receiver's own DEFINE)."""
    return encode_message(CLASS_STICKTABLE, STKT_ACK,
                          encode_varint(table_id) + struct.pack("!I", update_id & U32))


def decode_ack(payload: bytes) -> tuple[int, int]:
    table_id, pos = decode_varint(payload, 0)
    update_id, _ = _u32(payload, pos, len(payload), "ack")
    return table_id, update_id


# --- the server_key dictionary cache ---------------------------------------------------------

@dataclass
class RxDictCache:
    """Names the peer sent, by its cache id (1..128): the first use carries id and name, later
    ones the id alone. One per connection."""

    slots: list[str | None] = field(default_factory=lambda: [None] * DICT_CACHE_SIZE)


@dataclass
class TxDictCache:
    """Ids we gave names on this connection; slots are reused round-robin (re-sending a name
    with a reused id overwrites the receiver's slot, as HAProxy's receiver does)."""

    ids: dict[str, int] = field(default_factory=dict)
    names: list[str | None] = field(default_factory=lambda: [None] * DICT_CACHE_SIZE)
    next_slot: int = 0

    def lookup(self, name: str) -> tuple[int, bool]:
        """(id, already known by the receiver)."""
        if name in self.ids:
            return self.ids[name], True
        slot = self.next_slot
        self.next_slot = (slot + 1) % DICT_CACHE_SIZE
        old = self.names[slot]
        if old is not None:
            del self.ids[old]
        self.names[slot] = name
        self.ids[name] = slot + 1
        return slot + 1, False


# --- updates ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Update:
    """A decoded update. update_id is the sender's counter (the incremental types give the
    previous + 1); expire_ms only on timed updates; server_id/server_key None when the table
    does not store them or the entry has none."""

    update_id: int
    key: bytes
    expire_ms: int | None
    server_id: int | None
    server_key: str | None


def _skip_value(payload: bytes, pos: int, end: int, std: int) -> int:
    if std == STD_FRQP:
        for _ in range(3):  # age of the current period, current and previous counts
            _, pos = decode_varint(payload, pos, end)
        return pos
    if std == STD_DICT:
        length, pos = decode_varint(payload, pos, end)
        if pos + length > end:
            raise ProtocolError("dictionary value truncated")
        return pos + length
    _, pos = decode_varint(payload, pos, end)
    return pos


def _decode_dict(payload: bytes, pos: int, end: int, cache: RxDictCache
                 ) -> tuple[str | None, int]:
    length, pos = decode_varint(payload, pos, end)
    if length == 0:
        return None, pos  # the entry has no server_key
    stop = pos + length
    if stop > end:
        raise ProtocolError("server_key truncated")
    cache_id, pos = decode_varint(payload, pos, stop)
    if not 0 < cache_id <= DICT_CACHE_SIZE:
        raise ProtocolError(f"server_key cache id {cache_id} out of 1..{DICT_CACHE_SIZE}")
    if pos == stop:
        return cache.slots[cache_id - 1], pos  # id alone: a name sent earlier (or none)
    name_len, pos = decode_varint(payload, pos, stop)
    if name_len > MAX_SERVER_NAME or pos + name_len != stop:
        raise ProtocolError("server_key name length does not fit its value")
    try:
        name = payload[pos:stop].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError("server_key is not UTF-8") from exc
    cache.slots[cache_id - 1] = name
    return name, stop


def update_id_of(typ: int, payload: bytes, last_id: int) -> int:
    """The update id alone (for acks of updates whose data cannot be decoded)."""
    if typ in (STKT_UPDATE, STKT_UPDATE_TIMED):
        return _u32(payload, 0, len(payload), "update id")[0]
    return (last_id + 1) & U32


def decode_update(typ: int, payload: bytes, table: TableDef, cache: RxDictCache,
                  last_id: int) -> Update:
    """One UPDATE/INCUPDATE(_TIMED) of `table` (the sender's current table)."""
    if typ not in UPDATE_TYPES:
        raise ProtocolError(f"not an update: type {typ:#x}")
    if not table.parseable:
        raise ProtocolError(f"table {table.name!r} stores data types this codec does not know")
    end = len(payload)
    pos = 0
    if typ in (STKT_UPDATE, STKT_UPDATE_TIMED):
        update_id, pos = _u32(payload, pos, end, "update id")
    else:
        update_id = (last_id + 1) & U32
    expire = None
    if typ in (STKT_UPDATE_TIMED, STKT_INCUPDATE_TIMED):
        expire, pos = _u32(payload, pos, end, "expiry")
        if expire & 0x80000000:  # HAProxy sends a signed int: a negative time left is spent
            expire = 0
    if table.key_type == KEY_STR:
        klen, pos = decode_varint(payload, pos, end)
        if klen > MAX_KEY_LEN:
            raise ProtocolError(f"string key of {klen} bytes")
    elif table.key_type == KEY_SINT:
        klen = 4
    else:
        klen = table.key_len
    if pos + klen > end:
        raise ProtocolError("key truncated")
    key = bytes(payload[pos:pos + klen])
    pos += klen
    server_id = server_key = None
    for dt, (std, is_array) in enumerate(DATA_TYPES):
        if not table.data_types & (1 << dt):
            continue
        if is_array:
            for _ in range(table.array_len(dt)):
                pos = _skip_value(payload, pos, end, std)
        elif dt == DT_SERVER_ID:
            raw, pos = decode_varint(payload, pos, end)
            server_id = _signed32(raw)
        elif dt == DT_SERVER_KEY:
            server_key, pos = _decode_dict(payload, pos, end, cache)
        else:
            pos = _skip_value(payload, pos, end, std)
    if pos != end:
        raise ProtocolError(f"update has {end - pos} bytes beyond its data")
    return Update(update_id, key, expire, server_id, server_key)


def _signed32(raw: int) -> int:
    """HAProxy encodes an `int` server_id through uint64 (a negative one sign-extended); it
    stores the low 32 bits back into an int."""
    low = raw & U32
    return low - (1 << 32) if low & 0x80000000 else low


def encode_update(table: TableDef, update_id: int, key: bytes, *, expire_ms: int | None,
                  server_id: int | None, server_key: str | None, cache: TxDictCache,
                  incremental: bool = False) -> bytes:
    """An update of `table` as the receiver expects it after our DEFINE of `table` (whose
    data_types say which values follow). Timed when expire_ms is given."""
    out = bytearray()
    if not incremental:
        out += struct.pack("!I", update_id & U32)
    if expire_ms is not None:
        out += struct.pack("!I", max(0, min(expire_ms, 0x7FFFFFFF)))
    if table.key_type == KEY_STR:
        out += encode_varint(len(key)) + key
    else:
        want = 4 if table.key_type == KEY_SINT else table.key_len
        if len(key) != want:
            raise ValueError(f"key of {len(key)} bytes for a {table.key_type_name} table "
                             f"of {want}")
        out += key
    for dt, (std, is_array) in enumerate(DATA_TYPES):
        if not table.data_types & (1 << dt):
            continue
        if dt == DT_SERVER_ID:
            out += encode_varint((server_id or 0) & ((1 << 64) - 1))
        elif dt == DT_SERVER_KEY:
            if not server_key:
                out += encode_varint(0)
                continue
            cache_id, known = cache.lookup(server_key)
            value = encode_varint(cache_id)
            if not known:
                name = server_key.encode()
                value += encode_varint(len(name)) + name
            out += encode_varint(len(value)) + value
        elif is_array:
            per = b"\x00\x00\x00" if std == STD_FRQP else b"\x00"
            out += per * table.array_len(dt)
        else:
            out += b"\x00\x00\x00" if std == STD_FRQP else b"\x00"
    if incremental:
        typ = STKT_INCUPDATE_TIMED if expire_ms is not None else STKT_INCUPDATE
    else:
        typ = STKT_UPDATE_TIMED if expire_ms is not None else STKT_UPDATE
    return encode_message(CLASS_STICKTABLE, typ, bytes(out))
