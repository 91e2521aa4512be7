"""Mutual TLS on the sync link (tls_cert, tls_key, tls_ca) between lb1 and lb2 of the netns lab.

The certificates come from a private CA made by `openssl` in a temporary directory
(tests/kernel/pki.py). What a TLS pair replicates is checked in the peer's kernel map; that it
is encrypted, on the wire: frames captured on lb2's sync veth (a raw AF_PACKET socket) must not
hold the client's address, which the same capture of a plain pair does hold. What a TLS node
refuses (a plain peer, a certificate of another CA, an expired one) is checked in its log: one
line each, saying why, and nothing replicates.
"""

from __future__ import annotations

import contextlib
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import netns
import pytest
from daemons import SYNC4, DaemonProc, make_key, wait_for
from helpers import RULESETS, map_elements, nftsync, reset_node
from lab import client4
from pki import Ca, Node

FARM_TABLE, FARM_MAP = "nftsync_http", "http_sessions"
PORT = DaemonProc.port


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Node]:
    d = tmp_path_factory.mktemp("pki")
    ca, other = Ca.create(d / "ca"), Ca.create(d / "other", "other")
    return {"lb1": ca.node("lb1", SYNC4["lb1"]), "lb2": ca.node("lb2", SYNC4["lb2"]),
            "lb2-other-ca": other.node("lb2x", SYNC4["lb2"]),
            "lb2-expired": ca.node("lb2old", SYNC4["lb2"], days=-1)}


@pytest.fixture
def farm_file(tmp_path: Path) -> Path:
    path = tmp_path / "farm.nft"
    path.write_text((RULESETS / "farm-http.nft").read_text())
    return path


def sessions(lab, node: str) -> dict[str, dict]:
    return map_elements(lab, node, "ip", FARM_TABLE, FARM_MAP)


@contextlib.contextmanager
def daemons(lab, workdir: Path, farm: Path, tls1: tuple[str, ...], tls2: tuple[str, ...] | None,
            connect: bool = True) -> Iterator[dict[str, DaemonProc]]:
    """lb1 (and lb2 unless tls2 is None) with the farm and a daemon each, with these TLS flags;
    stopped by pid and both nodes reset afterwards, whatever happened."""
    workdir.mkdir(parents=True, exist_ok=True)
    key = make_key(workdir)
    lab.move_vip("lb1")
    for node in ("lb1", "lb2"):
        reset_node(lab, node)
        nftsync(lab, node, "apply", str(farm))
    procs = {"lb1": DaemonProc(lab.ns("lb1"), "lb1", 1, SYNC4["lb1"], [SYNC4["lb2"]], key,
                               workdir, role="active", extra=tls1)}
    if tls2 is not None:
        procs["lb2"] = DaemonProc(lab.ns("lb2"), "lb2", 2, SYNC4["lb2"], [SYNC4["lb1"]], key,
                                  workdir, extra=tls2)
    try:
        for d in procs.values():
            d.start()
        if connect:
            for d in procs.values():
                d.wait(lambda d=d: d.peers_up() >= 1 and d.synced(), 20, "the peer up, synced")
        yield procs
    finally:
        for d in procs.values():
            d.stop()
        for node in ("lb1", "lb2"):
            reset_node(lab, node)


class Capture:
    """Every frame on a namespace's interface, both directions (AF_PACKET, ETH_P_ALL), read by
    a thread until stopped; bounded in bytes and time."""

    def __init__(self, ns: str, ifname: str = "sync", limit: int = 32 << 20,
                 seconds: float = 60.0) -> None:
        with netns.entered(ns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
            self.sock.bind((ifname, 0))
        self.data = bytearray()
        self.limit, self.deadline = limit, time.monotonic() + seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self.deadline:
            if select.select([self.sock], [], [], 0.05)[0]:
                frame = self.sock.recv(65536)
                if len(self.data) < self.limit:
                    self.data += frame

    def stop(self) -> bytes:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()
        return bytes(self.data)


def replicate_and_capture(lab, clients: list[str]) -> bytes:
    """Traffic from `clients` through lb1; everything on lb2's sync veth until lb2's kernel map
    holds their sessions (replicated: lb2 saw none of that traffic)."""
    cap = Capture(lab.ns("lb2"))
    try:
        seen = lab.request(port=80, sources=clients)
        assert all(b[0] for b in seen.values()), seen
        wait_for(lambda: set(clients) <= set(sessions(lab, "lb2")), 15,
                 "the sessions on lb2's kernel map")
        time.sleep(0.3)  # the acknowledgements too
    finally:
        data = cap.stop()
    return data


def test_tls_pair_replicates_and_the_link_is_encrypted(lab, tmp_path, farm_file, pki):
    clients = [client4(i) for i in (3, 7, 11)]
    with daemons(lab, tmp_path / "tls", farm_file, pki["lb1"].flags(),
                 pki["lb2"].flags()) as ds:
        wire = replicate_and_capture(lab, clients)
        lb2 = sessions(lab, "lb2")
        lb1 = sessions(lab, "lb1")
        assert {c: lb2[c]["mark"] for c in clients} == {c: lb1[c]["mark"] for c in clients}
        assert ds["lb2"].ctl("status")["health"] == "ok"
        for d in ds.values():
            text = d.log.read_text()
            assert "refused" not in text and " WARNING " not in text, text
    assert b"\x17\x03\x03" in wire  # TLS application data records
    leaked = [c for c in clients if socket.inet_aton(c) in wire]
    assert leaked == [], f"client addresses in cleartext on the TLS link: {leaked}"

    # The same over plain TCP: the capture does see the addresses (so the check above can fail).
    plain_clients = [client4(i) for i in (4, 8, 12)]
    with daemons(lab, tmp_path / "plain", farm_file, (), ()):
        wire = replicate_and_capture(lab, plain_clients)
    assert [c for c in plain_clients if socket.inet_aton(c) in wire] == plain_clients


def lines(d: DaemonProc, text: str) -> list[str]:
    return [ln for ln in d.log.read_text(errors="replace").splitlines() if text in ln]


def assert_nothing_replicates(lab, d1: DaemonProc, d2: DaemonProc) -> None:
    nftsync(lab, "lb1", "sessions", "add", "10.10.1.77", "0x201")
    time.sleep(2.0)  # several dials of each side (reconnect_min 0.2 s, doubling)
    assert "10.10.1.77" not in sessions(lab, "lb2")
    assert d1.peers_up() == 0 and d2.peers_up() == 0


def test_plain_peer_is_refused_by_a_tls_peer(lab, tmp_path, farm_file, pki):
    with daemons(lab, tmp_path, farm_file, pki["lb1"].flags(), (), connect=False) as ds:
        d1, d2 = ds["lb1"], ds["lb2"]
        refused = f"connection from {SYNC4['lb2']}:"
        wait_for(lambda: [ln for ln in lines(d1, refused) if "refused: TLS: it does not speak "
                          "TLS (is tls_cert/tls_key/tls_ca set on it?)" in ln], 15,
                 "lb1's refusal of lb2's plain connection")
        # lb1's own dial to the plain lb2: one line, however often it redials.
        wait_for(lambda: lines(d1, f"peer {SYNC4['lb2']}:{PORT}: TLS: "), 15, "lb1's dial")
        assert_nothing_replicates(lab, d1, d2)
        assert len(lines(d1, f"peer {SYNC4['lb2']}:{PORT}: TLS: ")) == 1
        assert "Traceback" not in d1.log.read_text()


def test_certificate_of_another_ca_is_refused(lab, tmp_path, farm_file, pki):
    """lb2 holds a certificate of another CA and trusts both CAs (as an intruder would): lb1
    refuses it both when lb2 dials and when it dials lb2, and says why; lb2 hears the refusal."""
    stranger = pki["lb2-other-ca"]
    both = tmp_path / "both-cas.crt"
    both.write_text(stranger.ca.read_text() + pki["lb1"].ca.read_text())
    lb2 = Node(stranger.cert, stranger.key, both)
    with daemons(lab, tmp_path, farm_file, pki["lb1"].flags(), lb2.flags(),
                 connect=False) as ds:
        d1, d2 = ds["lb1"], ds["lb2"]
        why = "its certificate is not signed by our tls_ca"
        wait_for(lambda: [ln for ln in lines(d1, f"connection from {SYNC4['lb2']}:")
                          if f"refused: TLS: {why}" in ln], 15, "lb1 refusing lb2's certificate")
        wait_for(lambda: lines(d1, f"peer {SYNC4['lb2']}:{PORT}: TLS: {why}"), 15,
                 "lb1's dial refusing lb2's certificate")
        wait_for(lambda: lines(d2, f"peer {SYNC4['lb1']}:{PORT}: TLS: it closed the connection "
                               "in the TLS handshake (did it refuse our certificate? its log "
                               "says why)"), 15,
                 "lb2 told that lb1 refuses its certificate")
        assert_nothing_replicates(lab, d1, d2)


# -- an expired certificate: a daemon refuses to start with one, so the peer presenting it is a
# -- small TLS program in lb2's namespace, dialling lb1 and then being dialled by it -----------
TLS_CLIENT = """
import socket, ssl, sys
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.load_verify_locations(sys.argv[3])
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
with socket.create_connection((sys.argv[4], int(sys.argv[5])), timeout=5) as raw:
    with ctx.wrap_socket(raw, server_hostname=sys.argv[4]) as tls:
        try:
            print("read", tls.recv(1))   # TLS 1.3: the server's verdict comes after ours
        except (ssl.SSLError, OSError) as exc:
            print("refused:", exc)
"""

TLS_SERVER = """
import socket, ssl, sys, time
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
srv = socket.create_server((sys.argv[3], int(sys.argv[4])))
srv.settimeout(0.5)
end = time.monotonic() + float(sys.argv[5])
while time.monotonic() < end:
    try:
        conn, _ = srv.accept()
    except TimeoutError:
        continue
    conn.settimeout(2)
    try:
        ctx.wrap_socket(conn, server_side=True).close()
    except (ssl.SSLError, OSError):
        conn.close()
"""


def test_expired_certificate_is_refused_with_a_line_naming_expiry(lab, tmp_path, farm_file,
                                                                  pki):
    old = pki["lb2-expired"]
    # The daemon itself will not start with it (lb2's own --check line).
    p = subprocess.run([sys.executable, "-m", "nftsync", "daemon", "--check", "--key-file",
                        str(make_key(tmp_path, "k")), "--listen", SYNC4["lb2"], *old.flags()],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "the certificate has expired" in p.stderr, p
    server = subprocess.Popen(
        ["ip", "netns", "exec", lab.ns("lb2"), sys.executable, "-c", TLS_SERVER, str(old.cert),
         str(old.key), SYNC4["lb2"], str(PORT), "30"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with daemons(lab, tmp_path, farm_file, pki["lb1"].flags(), None, connect=False) as ds:
            d1 = ds["lb1"]
            # lb1 dials the expired server: one line, however often it redials.
            wait_for(lambda: lines(d1, f"peer {SYNC4['lb2']}:{PORT}: TLS: its certificate has "
                                   "expired"), 15, "lb1 refusing the expired server")
            # The expired client dials lb1.
            out = lab.exec("lb2", sys.executable, "-c", TLS_CLIENT, str(old.cert), str(old.key),
                           str(old.ca), SYNC4["lb1"], str(PORT), timeout=30).stdout
            assert out.startswith(("refused:", "read b''")), out
            wait_for(lambda: [ln for ln in lines(d1, f"connection from {SYNC4['lb2']}:")
                              if "refused: TLS: its certificate has expired" in ln], 10,
                     "lb1 refusing the expired client")
            time.sleep(1.5)
            assert len(lines(d1, f"peer {SYNC4['lb2']}:{PORT}: TLS: ")) == 1
            assert d1.peers_up() == 0
            assert "Traceback" not in d1.log.read_text()
    finally:
        server.kill()
        server.wait(timeout=10)
