"""Mutual TLS on the sync link: the contexts built from `tls_cert`, `tls_key` and `tls_ca`, and
one-line reasons for a failed TLS handshake.

TLS adds confidentiality (client addresses, marks and conntrack tuples cross the link) and a
second, independent proof of membership (a certificate of the cluster's private CA) in front of
the pre-shared-key handshake, which still runs unchanged inside TLS: a stolen certificate alone
does not make a peer, nor does a stolen key file (docs/daemon.md, "TLS on the sync link").

Policy, the same for every node:

* TLS 1.3 only: no version or cipher-suite choices to get wrong, and a 1-RTT handshake.
* Mutual: the accepting side requires a certificate of `tls_ca` (CERT_REQUIRED); the dialling
  side verifies the accepting side's certificate against `tls_ca` **and** that it names the
  address (or host name) dialled, in subjectAltName. The dialler's check is what keeps a
  certificate stolen from one node from serving as a man in the middle between two others: every
  connection has a dialler, so either direction is covered. The accepting side cannot ask the
  same of the dialler (its source address is no name it claims), so it checks the CA only.
* Only the files given: no system trust store, so a public CA can never vouch for a peer.

Everything is checked when the configuration is loaded (`daemon --check`, start, reload): the
files (regular, bounded, the private key not open to others), both contexts built, and a TLS
handshake of this node's certificate with itself in memory, so a certificate from another CA, an
expired one, a key of another certificate or a certificate without this node's listen address is
one line and exit 2 before anything runs.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import ssl
import stat
import time
from dataclasses import dataclass, field

from nftsync.errors import NftsyncError
from nftsync.files import FileRefused, open_regular
from nftsync.proto import ConnectionClosed

#: The configuration keys, all three or none.
KEYS = ("tls_cert", "tls_key", "tls_ca")
_WHAT = {"tls_cert": "certificate", "tls_key": "private key", "tls_ca": "CA certificate"}
MAX_PEM_FILE = 1 << 20  # a certificate chain or a key is a few KiB
#: Bound of an accepted connection's TLS handshake (the admission gate's deadline, when there is
#: one, covers it too): a TLS 1.3 handshake is one round trip and a few milliseconds of CPU.
HANDSHAKE_TIMEOUT = 5.0

# OpenSSL's X509_V_ERR_* codes that get a reason of their own.
_EXPIRED, _NOT_YET_VALID = 10, 9
_UNKNOWN_ISSUER = (2, 18, 19, 20, 21)  # no issuer cert / self-signed / not in our CA's chain
_NAME_MISMATCH = (62, 64)  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
_NOT_TLS = ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "HTTPS_PROXY_REQUEST", "UNKNOWN_PROTOCOL",
            "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG")
#: TLS alerts a peer sends when it refuses our certificate or our TLS (the reason of the SSLError).
_ALERTS = {
    "TLSV1_ALERT_UNKNOWN_CA": "it does not trust our certificate's CA (another tls_ca?)",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "it says our certificate has expired",
    "SSLV3_ALERT_BAD_CERTIFICATE": "it refused our certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "it refused our certificate",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "it requires a client certificate",
    "TLSV1_ALERT_PROTOCOL_VERSION": "it does not speak TLS 1.3",
    "TLSV1_ALERT_DECRYPT_ERROR": "it could not verify our certificate's key",
}


CLOSED = ("it closed the connection in the TLS handshake (did it refuse our certificate? its log "
          "says why)")


class TlsError(NftsyncError):
    """A TLS file or setting is unusable; `key` is the configuration key it is about."""

    exit_code = 2

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """The validated TLS files and the contexts made of them (shared by every connection)."""

    cert: str
    key: str
    ca: str
    server: ssl.SSLContext = field(repr=False, compare=False)
    client: ssl.SSLContext = field(repr=False, compare=False)
    subject: str = ""  # this node's certificate: its subject CN, names, expiry (for --check)
    names: tuple[str, ...] = ()
    not_after: float = 0.0

    def describe(self) -> dict[str, object]:
        days = (self.not_after - time.time()) / 86400
        return {"cert": self.cert, "key": self.key, "ca": self.ca, "subject": self.subject,
                "names": ", ".join(self.names) or "(none)",
                "expires": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.not_after))
                + f" (in {days:.0f} days)"}


def load_tls(cert: str, key: str, ca: str, listen_host: str | None = None) -> TlsSettings:
    """Check the three files and build both contexts; TlsError (naming the key and file) if
    anything is wrong. `listen_host`, when it is a specific address, must be in the certificate's
    subjectAltName: the peers dial it and check it."""
    ca_text = _read_pem(ca, "tls_ca", private=False)
    cert_fd = _open_pem(cert, "tls_cert", private=False)
    try:
        key_fd = _open_pem(key, "tls_key", private=True)
        try:
            _check_pem(cert, cert_fd, "tls_cert")
            _check_pem(key, key_fd, "tls_key")
            # load_cert_chain() wants paths: the opened, checked descriptors' own (a file swapped
            # for a FIFO after the check cannot be read in its place).
            paths = (f"/proc/self/fd/{cert_fd}", f"/proc/self/fd/{key_fd}")
            server = _context(True, ca, ca_text, cert, key, *paths)
            client = _context(False, ca, ca_text, cert, key, *paths)
            probe = _context(False, ca, ca_text, cert, key, *paths)
        finally:
            os.close(key_fd)
    finally:
        os.close(cert_fd)
    probe.check_hostname = False  # the name is checked below, with a clearer message
    peer = _handshake_with_itself(server, probe, cert, ca)
    names = tuple(f"{'IP' if kind == 'IP Address' else kind}:{value.strip()}"
                  for kind, value in peer.get("subjectAltName", ()))
    if listen_host is not None and not ipaddress.ip_address(listen_host).is_unspecified:
        me = ipaddress.ip_address(listen_host)
        ips = [ipaddress.ip_address(v.strip()) for k, v in peer.get("subjectAltName", ())
               if k == "IP Address"]
        if me not in ips:
            raise TlsError("tls_cert", f"{cert}: the certificate does not name this node's "
                           f"listen address {listen_host} in subjectAltName (it names "
                           f"{', '.join(names) or 'nothing'}); peers dial that address and "
                           f"check it: make it with subjectAltName=IP:{listen_host}")
    subject = next((v for rdn in peer.get("subject", ()) for k, v in rdn if k == "commonName"),
                   "")
    return TlsSettings(cert, key, ca, server, client, subject, names,
                       ssl.cert_time_to_seconds(peer["notAfter"]))


def _open_pem(path: str, key: str, private: bool) -> int:
    """Open without blocking (a FIFO must not hang start-up) and check what was opened."""
    try:
        fd = open_regular(path, _WHAT[key])
    except FileRefused as exc:
        raise TlsError(key, str(exc)) from None
    except OSError as exc:
        raise TlsError(key, f"cannot open {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if st.st_size > MAX_PEM_FILE:
            raise TlsError(key, f"{path} is larger than {MAX_PEM_FILE} bytes, not a PEM file")
        if private:
            # Group read is allowed (Debian's ssl-cert group: 0640 root:ssl-cert); others get
            # nothing, and nobody but the owner may change it.
            if st.st_mode & 0o027:
                raise TlsError(key, f"private key {path} has mode "
                               f"{stat.S_IMODE(st.st_mode):04o}, which is too open: others must "
                               f"have no access and group no write (chmod 600 {path})")
            if st.st_uid not in (0, os.geteuid()):
                raise TlsError(key, f"private key {path} is owned by uid {st.st_uid}, expected "
                               "root or the daemon's user")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_fd(fd: int, path: str, key: str) -> str:
    try:
        data = os.pread(fd, MAX_PEM_FILE + 1, 0)
    except OSError as exc:
        raise TlsError(key, f"cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_PEM_FILE:
        raise TlsError(key, f"{path} is larger than {MAX_PEM_FILE} bytes, not a PEM file")
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise TlsError(key, f"{path} is not a PEM file (binary data; DER? convert it with "
                       "openssl x509 -inform der)") from None


def _read_pem(path: str, key: str, private: bool) -> str:
    fd = _open_pem(path, key, private)
    try:
        text = _read_fd(fd, path, key)
    finally:
        os.close(fd)
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise TlsError(key, f"{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    return text


def _check_pem(path: str, fd: int, key: str) -> None:
    """What OpenSSL's own errors would say least clearly: the wrong kind of PEM, or a key that
    needs a passphrase (the daemon starts unattended)."""
    text = _read_fd(fd, path, key)
    if key == "tls_cert" and "-----BEGIN CERTIFICATE-----" not in text:
        raise TlsError(key, f"{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    if key == "tls_key":
        if "ENCRYPTED" in text:
            raise TlsError(key, f"private key {path} is encrypted with a passphrase; the daemon "
                           "starts unattended: decrypt it (openssl pkey -in KEY -out KEY.plain)")
        if "PRIVATE KEY-----" not in text:
            raise TlsError(key, f"{path} holds no PEM private key (-----BEGIN PRIVATE KEY-----)")


def _no_passphrase() -> bytes:
    raise TlsError("tls_key", "the private key is encrypted with a passphrase; the daemon starts "
                   "unattended: decrypt it (openssl pkey -in KEY -out KEY.plain)")


def _context(server: bool, ca: str, ca_text: str, cert: str, key: str, cert_path: str,
             key_path: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    if not server:
        ctx.check_hostname = True  # the dialled address must be in the certificate (see above)
    try:
        ctx.load_verify_locations(cadata=ca_text)
    except ssl.SSLError as exc:
        raise TlsError("tls_ca", f"{ca}: not a usable CA certificate: {_ssl_text(exc)}") from None
    if not ctx.get_ca_certs():
        raise TlsError("tls_ca", f"{ca}: holds no CA certificate (basicConstraints CA:TRUE)")
    try:
        ctx.load_cert_chain(cert_path, key_path, password=_no_passphrase)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TlsError("tls_key", f"{key} is not the private key of the certificate "
                           f"{cert}") from None
        which = "tls_key" if exc.library == "PEM" and "key" in str(exc).lower() else "tls_cert"
        raise TlsError(which, f"{cert} / {key}: cannot load the certificate and key: "
                       f"{_ssl_text(exc)}") from None
    return ctx


def _handshake_with_itself(server: ssl.SSLContext, client: ssl.SSLContext, cert: str,
                           ca: str) -> dict:
    """A TLS handshake between this node's two contexts, in memory: proves that the certificate
    chains to tls_ca and is valid now, as a peer will check it. Returns the certificate as
    getpeercert() gives it."""
    bios = [ssl.MemoryBIO() for _ in range(4)]
    srv = server.wrap_bio(bios[0], bios[1], server_side=True)
    cli = client.wrap_bio(bios[2], bios[3], server_side=False)
    pending = {srv: True, cli: True}
    for _ in range(16):  # TLS 1.3 needs 2-3 legs; the bound is against a bug, not a peer
        for obj, out, into in ((cli, bios[3], bios[0]), (srv, bios[1], bios[2])):
            if pending[obj]:
                try:
                    obj.do_handshake()
                    pending[obj] = False
                except ssl.SSLWantReadError:
                    pending[obj] = True  # it waits for the other side's next flight
                except ssl.SSLCertVerificationError as exc:
                    why = _verify_text(exc) or exc.verify_message
                    raise TlsError("tls_cert", f"{cert}: {why} (checked against tls_ca {ca}, "
                                   "as the peers will)") from None
                except ssl.SSLError as exc:
                    raise TlsError("tls_cert", f"{cert}: a TLS handshake with itself failed: "
                                   f"{_ssl_text(exc)}") from None
            if data := out.read():
                into.write(data)
        if not any(pending.values()):
            peer = cli.getpeercert()
            if peer:
                return peer
    raise TlsError("tls_cert", f"{cert}: a TLS handshake with itself did not complete")


def _verify_text(exc: ssl.SSLCertVerificationError, whose: str = "the",
                 ca: str = "tls_ca") -> str | None:
    """What a certificate refused by verification lacked, for the common causes (None: other)."""
    code = exc.verify_code
    if code == _EXPIRED:
        return f"{whose} certificate has expired"
    if code == _NOT_YET_VALID:
        return f"{whose} certificate is not valid yet (check the clocks)"
    if code in _UNKNOWN_ISSUER:
        return f"{whose} certificate is not signed by {ca}"
    return None


def _ssl_text(exc: ssl.SSLError) -> str:
    return str(exc.reason or exc.strerror or exc).replace("_", " ").lower()


def _in_chain(exc: BaseException | None, kind: type[BaseException]) -> BaseException | None:
    """`exc` or what it was raised from or during (Channel wraps errors `from None`)."""
    for _ in range(8):
        if exc is None or isinstance(exc, kind):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def tls_failure(exc: BaseException) -> bool:
    """Did a dial over TLS fail in TLS (an SSLError somewhere in the chain), or end in the peer
    hanging up during the handshake (with TLS 1.3 the server checks our certificate after our
    side of the TLS handshake is done, and asyncio closes without sending its alert)?"""
    return _in_chain(exc, ssl.SSLError) is not None or _in_chain(exc, EOFError) is not None


def describe_failure(exc: BaseException, dialled: str | None = None) -> str:
    """One line for a TLS handshake that failed with `exc` (seen from either side; `dialled`: the
    address we dialled, when we did): what the peer's certificate lacked, that the peer does not
    speak TLS, that it refused ours, or that it went away."""
    err = _in_chain(exc, ssl.SSLError)
    if isinstance(err, ssl.SSLCertVerificationError):
        common = _verify_text(err, "its", "our tls_ca")
        if common:
            return common
        if err.verify_code in _NAME_MISMATCH:
            return (f"its certificate does not name {dialled or 'the address dialled'} in "
                    "subjectAltName")
        return f"its certificate was refused: {err.verify_message}"
    if err is not None:
        reason = err.reason or ""
        if reason in _NOT_TLS:
            return "it does not speak TLS (is tls_cert/tls_key/tls_ca set on it?)"
        if reason in _ALERTS:
            return _ALERTS[reason]
        if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return "it sent no certificate"
        if reason in ("UNEXPECTED_EOF_WHILE_READING", "EOF"):
            return CLOSED
        return f"TLS error: {_ssl_text(err)}"
    if isinstance(exc, (ConnectionAbortedError, TimeoutError)):
        return f"no TLS handshake within {HANDSHAKE_TIMEOUT:g}s"
    if isinstance(exc, ConnectionError) or _in_chain(exc, EOFError) is not None:
        return CLOSED
    return str(exc) or type(exc).__name__


class TlsRefused(ssl.SSLError):
    """An accepted connection's TLS handshake failed; the message is describe_failure()'s line.
    An SSLError, so that whoever counts refusals by kind counts it as TLS."""

    def __str__(self) -> str:  # SSLError's own shows the args tuple
        return str(self.args[0]) if self.args else "TLS handshake failed"


async def start_server_tls(writer: asyncio.StreamWriter, settings: TlsSettings) -> None:
    """The server side of TLS on an accepted plain TCP connection, done by us rather than by
    asyncio's server (start_server(ssl=...)), which drops handshake failures without a word:
    raises TlsRefused (a TLS failure: plain peer, unknown CA, expired certificate...) or
    ConnectionClosed (the peer went away), each with one clear line."""
    try:
        await writer.start_tls(settings.server, ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
    except ssl.SSLError as exc:
        raise TlsRefused(f"TLS: {describe_failure(exc)}") from exc
    except (OSError, EOFError) as exc:
        raise ConnectionClosed(f"TLS: {describe_failure(exc)}") from exc
