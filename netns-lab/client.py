#!/usr/bin/env python3
"""Lab traffic tools, run inside the lab's namespaces (standard library only).

  request   many short TCP/UDP requests to a VIP, each from a chosen source address; one JSON
            line per request ({"src", "backend", "error"}) and a summary line
  stream    hold one TCP connection to the stream port and report gaps, resets and the longest
            silence, to check that a connection survives a failover
  announce  gratuitous ARP / unsolicited neighbour advertisement for addresses that just moved
            here (what keepalived does; iputils-arping is not needed)
  ping      ICMP echo (the lab does not rely on iputils-ping being installed)

Everything is bounded: per-request timeouts, a cap on the number of requests, a stream duration.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import re
import signal
import socket
import struct
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

MAX_REQUESTS = 20000
MAX_SOURCES = 65536
MAX_SECONDS = 600.0
REPLY_MAX = 65536
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


class UsageError(Exception):
    """Bad command-line input: reported as one line, exit status 2."""


# --- sources ---------------------------------------------------------------------------------
def parse_sources(spec: str) -> list[str]:
    """Expand `A,B,C-D,...` into addresses.

    An IPv4 range counts in the last octet(s). An IPv6 range counts in its last group, and when
    both ends write that group in decimal digits it counts in decimal: that is the lab's notation,
    where client i is 10.10.1.i and fd00:10::1:i (`fd00:10::1:9-fd00:10::1:11` gives ::1:9, ::1:10,
    ::1:11).
    """
    out: list[str] = []
    for item in filter(None, (p.strip() for p in spec.split(","))):
        lo_s, sep, hi_s = item.partition("-")
        try:
            lo = ipaddress.ip_address(lo_s)
            hi = ipaddress.ip_address(hi_s) if sep else lo
        except ValueError as e:
            raise UsageError(f"bad source {item!r}: {e}") from None
        if lo.version != hi.version:
            raise UsageError(f"bad range {item!r}: mixes IPv4 and IPv6")
        if int(hi) < int(lo):
            raise UsageError(f"bad range {item!r}: end before start")
        if lo.version == 6 and sep:
            out += _v6_range(item, lo_s, hi_s, lo, hi)
        else:
            if int(hi) - int(lo) >= MAX_SOURCES:
                raise UsageError(f"range {item!r} is larger than {MAX_SOURCES}")
            out += [str(ipaddress.ip_address(i)) for i in range(int(lo), int(hi) + 1)]
        if len(out) > MAX_SOURCES:
            raise UsageError(f"more than {MAX_SOURCES} sources")
    if not out:
        raise UsageError("no source addresses given")
    return out


def _v6_range(item: str, lo_s: str, hi_s: str, lo, hi) -> list[str]:
    lo_last, hi_last = lo_s.rsplit(":", 1)[1], hi_s.rsplit(":", 1)[1]
    if int(hi) - int(lo) >= 0x10000 or (int(lo) >> 16) != (int(hi) >> 16):
        raise UsageError(f"IPv6 range {item!r} must differ only in its last group")
    prefix = int(lo) & ~0xFFFF
    if lo_last.isdigit() and hi_last.isdigit():
        nums = range(int(lo_last), int(hi_last) + 1)
        groups = [int(str(n), 16) for n in nums if int(str(n), 16) <= 0xFFFF]
    else:
        groups = list(range(int(lo) & 0xFFFF, (int(hi) & 0xFFFF) + 1))
    return [str(ipaddress.IPv6Address(prefix | g)) for g in groups]


def family_of(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def sockaddr(addr: str, port: int) -> tuple:
    return (addr, port, 0, 0) if ":" in addr else (addr, port)


# --- request ---------------------------------------------------------------------------------
def _error_name(e: OSError) -> str:
    if isinstance(e, TimeoutError | socket.timeout):
        return "timeout"
    if isinstance(e, ConnectionRefusedError):
        return "refused"
    if isinstance(e, ConnectionResetError):
        return "reset"
    return e.strerror or type(e).__name__


def _parse_reply(data: bytes) -> str:
    """The backend's name from an HTTP/1.0 answer or a bare line."""
    if data.startswith(b"HTTP/"):
        head, _, body = data.partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0].split()
        if len(status) < 2 or status[1] != b"200":
            raise ValueError(f"status {status[1:2]!r}")
        data = body
    name = data.decode("ascii", "replace").strip()
    if not NAME_RE.match(name):
        raise ValueError(f"unexpected reply {name[:40]!r}")
    return name


def one_request(vip: str, port: int, proto: str, src: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    result = {"src": src, "backend": None, "error": None}

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return left

    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    try:
        with socket.socket(family_of(vip), kind) as s:
            if proto == "tcp":
                # Pick the source port at connect time (4-tuple), not at bind: many requests
                # per source address would otherwise run out of ephemeral ports.
                s.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            s.bind(sockaddr(src, 0))
            s.settimeout(remaining())
            s.connect(sockaddr(vip, port))
            if proto == "tcp":
                s.sendall(b"GET / HTTP/1.0\r\nHost: lab\r\n\r\n")
                chunks: list[bytes] = []
                size = 0
                while size < REPLY_MAX:
                    s.settimeout(remaining())
                    chunk = s.recv(REPLY_MAX - size)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    size += len(chunk)
                data = b"".join(chunks)
            else:
                s.send(b"lab\n")
                s.settimeout(remaining())
                data = s.recv(REPLY_MAX)
        result["backend"] = _parse_reply(data)
    except OSError as e:
        result["error"] = _error_name(e)
    except ValueError as e:
        result["error"] = str(e)
    return result


def cmd_request(a: argparse.Namespace) -> int:
    sources = parse_sources(a.sources)
    total = len(sources) * a.repeat
    if total > MAX_REQUESTS:
        raise UsageError(f"{total} requests is more than the cap of {MAX_REQUESTS}")
    for src in sources:
        if family_of(src) != family_of(a.vip):
            raise UsageError(f"source {src} and VIP {a.vip} are not the same address family")
    jobs = [src for _ in range(a.repeat) for src in sources]
    t0 = time.monotonic()
    stop_at = t0 + a.max_seconds

    def job(src: str) -> dict:
        # A run where everything times out must still end: past --max-seconds, requests not yet
        # started are reported, not sent.
        if time.monotonic() >= stop_at:
            return {"src": src, "backend": None, "error": "not sent: --max-seconds reached"}
        return one_request(a.vip, a.port, a.proto, src, a.timeout)

    counts: dict[str, int] = {}
    errors: dict[str, int] = {}
    with ThreadPoolExecutor(max_workers=a.parallel) as pool:
        for r in pool.map(job, jobs):
            print(json.dumps(r))
            if r["backend"]:
                counts[r["backend"]] = counts.get(r["backend"], 0) + 1
            else:
                errors[r["error"]] = errors.get(r["error"], 0) + 1
    summary = {
        "requests": total,
        "ok": sum(counts.values()),
        "failed": sum(errors.values()),
        "backends": counts,
        "errors": errors,
        "seconds": round(time.monotonic() - t0, 3),
    }
    print(json.dumps({"summary": summary}), flush=True)
    return 0


# --- stream ----------------------------------------------------------------------------------
@dataclass
class StreamReport:
    backend: str | None = None
    backends_seen: list[str] = field(default_factory=list)
    lines: int = 0
    first: int | None = None
    last: int | None = None
    missing: int = 0
    gaps: list[list[int]] = field(default_factory=list)  # [first missing, last missing], ≤ 100
    out_of_order: int = 0
    bad_lines: int = 0
    reset: bool = False
    eof: bool = False
    error: str | None = None
    longest_silence_ms: float = 0.0
    seconds: float = 0.0

    def line(self, raw: bytes) -> None:
        parts = raw.split()
        if len(parts) != 2 or not parts[1].isdigit():
            self.bad_lines += 1
            return
        name, n = parts[0].decode("ascii", "replace"), int(parts[1])
        if name not in self.backends_seen:
            self.backends_seen.append(name)
        self.backend = self.backend or name
        self.lines += 1
        if self.last is None:
            self.first = n
        elif n != self.last + 1:
            if n > self.last + 1:
                self.missing += n - self.last - 1
                if len(self.gaps) < 100:
                    self.gaps.append([self.last + 1, n - 1])
            else:
                self.out_of_order += 1
        self.last = n


class _StopEarly:
    """SIGUSR1 ends a `stream` or `probe` run before --seconds, still printing its report.

    Why: a demo runs them across steps whose length varies (a failback waits for a resync), so
    it gives a generous --seconds and signals the end once the last step is shown.
    """

    asked = False

    @classmethod
    def install(cls) -> None:
        signal.signal(signal.SIGUSR1, cls._handler)

    @classmethod
    def _handler(cls, signum: int, frame: object) -> None:
        cls.asked = True


def cmd_stream(a: argparse.Namespace) -> int:
    _StopEarly.install()
    rep = StreamReport()
    t0 = time.monotonic()
    end = t0 + a.seconds
    last_data = t0
    silence = 0.0
    buf = b""
    try:
        with socket.socket(family_of(a.vip), socket.SOCK_STREAM) as s:
            s.bind(sockaddr(a.source, 0))
            s.settimeout(min(a.timeout, a.seconds))
            s.connect(sockaddr(a.vip, a.port))
            while (now := time.monotonic()) < end and not _StopEarly.asked:
                s.settimeout(min(0.1, end - now))
                try:
                    chunk = s.recv(65536)
                except TimeoutError:
                    continue
                now = time.monotonic()
                if not chunk:
                    rep.eof = True
                    break
                silence = max(silence, now - last_data)
                last_data = now
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for ln in lines:
                    rep.line(ln)
                if len(buf) > 4096:
                    rep.bad_lines += 1
                    buf = b""
    except ConnectionResetError:
        rep.reset = True
        rep.error = "reset"
    except OSError as e:
        rep.error = _error_name(e)
    end_t = time.monotonic()
    rep.longest_silence_ms = round(max(silence, end_t - last_data) * 1000, 1)
    rep.seconds = round(end_t - t0, 3)
    print(json.dumps(rep.__dict__), flush=True)
    return 0


# --- announce --------------------------------------------------------------------------------
def _garp(dev: str, ip: str) -> None:
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind((dev, 0))
        mac = s.getsockname()[4]
        addr = socket.inet_aton(ip)
        for op in (1, 2):  # a request and a reply: hosts differ in which one they learn from
            arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, op, mac, addr,
                              b"\xff" * 6 if op == 2 else b"\0" * 6, addr)
            frame = b"\xff" * 6 + mac + struct.pack("!H", 0x0806) + arp
            s.send(frame.ljust(60, b"\0"))


def _unsolicited_na(dev: str, ip: str) -> None:
    ifindex = socket.if_nametoindex(dev)
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as p:
        p.bind((dev, 0))
        mac = p.getsockname()[4]
    with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) as s:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, ifindex)
        s.bind((ip, 0, 0, 0))
        # Type 136, flags Router|Override; target; option 2 (target link-layer address). The
        # kernel fills in the ICMPv6 checksum on raw ICMPv6 sockets.
        msg = struct.pack("!BBHI16sBB6s", 136, 0, 0, 0xA0000000, socket.inet_pton(
            socket.AF_INET6, ip), 2, 1, mac)
        s.sendto(msg, ("ff02::1", 0, 0, ifindex))


def cmd_announce(a: argparse.Namespace) -> int:
    for ip in a.addr:
        try:
            ipaddress.ip_address(ip)
        except ValueError as e:
            raise UsageError(str(e)) from None
        if ":" in ip:
            _unsolicited_na(a.dev, ip)
        else:
            _garp(a.dev, ip)
    return 0


# --- ping ------------------------------------------------------------------------------------
def _icmp_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ping_once(dst: str, ident: int, seq: int, timeout: float) -> float | None:
    """One ICMP(v6) echo over a raw socket; the round trip in ms, or None when nothing came back."""
    v6 = ":" in dst
    proto = socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP
    req_type, rep_type = (128, 129) if v6 else (8, 0)
    payload = b"nftsync-lab-ping"
    with socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_RAW, proto) as s:
        msg = struct.pack("!BBHHH", req_type, 0, 0, ident, seq) + payload
        if not v6:  # the kernel computes the ICMPv6 checksum, not the ICMPv4 one
            msg = msg[:2] + struct.pack("!H", _icmp_checksum(msg)) + msg[4:]
        t0 = time.monotonic()
        try:
            s.sendto(msg, sockaddr(dst, 0))
        except OSError as e:  # ENETUNREACH when the link (and with it the route) is down
            print(f"client.py ping {dst}: {e.strerror}", file=sys.stderr)
            return None
        while (left := t0 + timeout - time.monotonic()) > 0:
            s.settimeout(left)
            try:
                data, peer = s.recvfrom(2048)
            except TimeoutError:
                return None
            if not v6:
                data = data[(data[0] & 0x0F) * 4:]  # raw IPv4 sockets get the IP header too
            if (len(data) >= 8 and data[0] == rep_type
                    and struct.unpack("!HH", data[4:8]) == (ident, seq)
                    and ipaddress.ip_address(peer[0]) == ipaddress.ip_address(dst)):
                return (time.monotonic() - t0) * 1000
    return None


def cmd_ping(a: argparse.Namespace) -> int:
    """Exit 0 when at least one echo came back (the lab has no iputils-ping)."""
    try:
        ipaddress.ip_address(a.dst)
    except ValueError as e:
        raise UsageError(str(e)) from None
    ident = (time.monotonic_ns() >> 10) & 0xFFFF
    replies = 0
    for seq in range(1, a.count + 1):
        rtt = ping_once(a.dst, ident, seq, a.timeout)
        print(json.dumps({"dst": a.dst, "seq": seq, "rtt_ms": None if rtt is None
                          else round(rtt, 3)}), flush=True)
        replies += rtt is not None
    return 0 if replies else 1


def cmd_probe(a: argparse.Namespace) -> int:
    """One short request every `--interval` for `--seconds`: the traffic gap of a failover.

    Prints one JSON list of [start, end, ok] wall-clock records, so the gap can be set against
    the moment of a kill measured elsewhere. Bounded in count (5000) and time; SIGUSR1 ends it.
    """
    _StopEarly.install()
    out: list[list] = []
    end = time.monotonic() + a.seconds
    while time.monotonic() < end and len(out) < 5000 and not _StopEarly.asked:
        t, ok = time.time(), False
        try:
            with socket.create_connection((a.vip, a.port), timeout=a.timeout,
                                          source_address=(a.source, 0)) as s:
                s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                ok = b" 200 " in s.recv(4096)
        except OSError:
            pass
        out.append([t, time.time(), ok])
        time.sleep(a.interval)
    print(json.dumps(out), flush=True)
    return 0


# --- main ------------------------------------------------------------------------------------
def _positive(kind, lo, hi):
    def conv(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be in {lo}..{hi}")
        return v

    return conv


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    sub = ap.add_subparsers(dest="cmd", required=True)
    port = _positive(int, 1, 65535)
    r = sub.add_parser("request", help="short requests from many sources; JSON lines out")
    r.add_argument("--vip", default="10.10.0.100")
    r.add_argument("--port", type=port, default=80)
    r.add_argument("--proto", choices=("tcp", "udp"), default="tcp")
    r.add_argument("--sources", required=True, help="A,B,C-D (see `parse_sources`)")
    r.add_argument("--repeat", type=_positive(int, 1, MAX_REQUESTS), default=1)
    r.add_argument("--timeout", type=_positive(float, 0.01, 60), default=2.0)
    r.add_argument("--parallel", type=_positive(int, 1, 256), default=16)
    r.add_argument("--max-seconds", type=_positive(float, 0.1, MAX_SECONDS), default=120.0,
                   help="stop sending new requests after this long (the run is bounded)")
    r.set_defaults(func=cmd_request)
    st = sub.add_parser("stream", help="hold one stream connection; JSON summary out")
    st.add_argument("--vip", default="10.10.0.100")
    st.add_argument("--port", type=port, default=7000)
    st.add_argument("--source", required=True)
    st.add_argument("--seconds", type=_positive(float, 0.05, MAX_SECONDS), default=5.0)
    st.add_argument("--timeout", type=_positive(float, 0.01, 60), default=2.0,
                    help="connect timeout")
    st.set_defaults(func=cmd_stream)
    an = sub.add_parser("announce", help="gratuitous ARP / unsolicited NA for moved addresses")
    an.add_argument("--dev", required=True)
    an.add_argument("--addr", action="append", required=True)
    an.set_defaults(func=cmd_announce)
    pb = sub.add_parser("probe", help="a small request every --interval; JSON list of results")
    pb.add_argument("--vip", default="10.10.0.100")
    pb.add_argument("--port", type=port, default=80)
    pb.add_argument("--source", required=True)
    pb.add_argument("--seconds", type=_positive(float, 0.05, MAX_SECONDS), default=5.0)
    pb.add_argument("--interval", type=_positive(float, 0.0, 1.0), default=0.01)
    pb.add_argument("--timeout", type=_positive(float, 0.01, 10), default=0.1)
    pb.set_defaults(func=cmd_probe)
    pg = sub.add_parser("ping", help="ICMP echo over a raw socket; exit 0 if any reply came back")
    pg.add_argument("dst")
    pg.add_argument("--count", type=_positive(int, 1, 100), default=1)
    pg.add_argument("--timeout", type=_positive(float, 0.01, 10), default=1.0)
    pg.set_defaults(func=cmd_ping)
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return a.func(a)
    except UsageError as e:
        print(f"client.py: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            sys.stdout.close()
        return 1


if __name__ == "__main__":
    sys.exit(main())
