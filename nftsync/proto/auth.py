"""Pre-shared key loading and the handshake's cryptography (proofs and session keys).

Only stdlib primitives: HMAC-SHA256 for proofs and an HKDF (RFC 5869) built from it for the two
per-direction session keys. docs/protocol.md "Handshake" and "Key derivation" give the rationale.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
import struct
from pathlib import Path

from nftsync.errors import NftsyncError
from nftsync.files import OPEN_FLAGS, file_kind
from nftsync.proto.frames import RefuseReason
from nftsync.proto.wire import ProtocolError

#: Rules for a key file (docs/protocol.md "Pre-shared key").
MIN_SECRET_CHARS = 32  # text secrets: at least this many printable characters
MIN_HEX_CHARS = 64  # hex secrets: at least 32 bytes once decoded
MIN_DISTINCT_CHARS = 8  # refuses placeholders such as "xxxxxxxx..." or "0000..."
MAX_KEY_FILE = 4096
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")

# Labels of protocol version 2 (docs/protocol.md "Key derivation"). v1's ("nftsync/1 ...") put
# no cluster name in any key: the cluster was compared in cleartext HELLOs instead.
LABEL_EXTRACT = b"nftsync/2 psk"
LABEL_CLUSTER_KEY = b"nftsync/2 cluster "  # followed by the cluster name
LABEL_CHECK_KEY = b"nftsync/2 key check"
LABEL_TRANSCRIPT = b"nftsync/2 transcript"
LABEL_PROOF_INITIATOR = b"nftsync/2 proof initiator"
LABEL_PROOF_RESPONDER = b"nftsync/2 proof responder"
LABEL_PROOF_KEY_CHECK = b"nftsync/2 proof key check"
LABEL_KEY_I2R = b"nftsync/2 key initiator->responder"
LABEL_KEY_R2I = b"nftsync/2 key responder->initiator"

_LEN = struct.Struct(">I")


class KeyFileError(NftsyncError):
    """The pre-shared key file is missing, too open, too short or not a usable secret."""

    exit_code = 2


class AuthError(ProtocolError):
    """The handshake failed: wrong key, wrong cluster, version, same node id, or refused by peer.

    `reason` is a RefuseReason code saying what really failed, for our log and counters;
    `remote` is True when the peer refused us (a REFUSE frame). What the peer is told may be
    less: a wrong cluster name (WRONG_CLUSTER here) is refused as AUTH_FAILED, like a wrong key,
    so that an outsider cannot test guesses of the cluster name. `refuse_text`, if set, replaces
    the fixed text of the REFUSE we send (only for facts that are not secret, e.g. versions).
    """

    def __init__(self, message: str, reason: int = RefuseReason.AUTH_FAILED,
                 remote: bool = False, refuse_text: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.remote = remote
        self.refuse_text = refuse_text


def parse_key_text(text: str) -> bytes:
    """Turn key-file text into the PSK bytes, or raise KeyFileError saying which rule failed.

    A secret made only of hex digits is hex: it must be an even number of at least 64 digits
    (32 bytes once decoded) and is decoded. Anything else is used as UTF-8 text of at least 32
    printable characters. Both give >= 32 bytes that an HMAC key can use directly. A short hex
    secret is refused rather than taken as text: 32 hex digits read as text are 16 random bytes,
    half of what the docs promise, and whoever wrote it meant hex.
    """
    secret = text.strip()
    if not secret:
        raise KeyFileError("key is empty")
    if not secret.isprintable():
        raise KeyFileError("key contains non-printable characters (one line of text expected)")
    if len(set(secret)) < MIN_DISTINCT_CHARS:
        raise KeyFileError(f"key uses fewer than {MIN_DISTINCT_CHARS} distinct characters; "
                           "generate one with: openssl rand -hex 32")
    if all(c in _HEX_DIGITS for c in secret):
        if len(secret) < MIN_HEX_CHARS or len(secret) % 2:
            raise KeyFileError(f"key looks like hex but has {len(secret)} digits; a hex key "
                               f"needs an even number of at least {MIN_HEX_CHARS} digits "
                               f"({MIN_HEX_CHARS // 2} bytes); generate one with: "
                               "openssl rand -hex 32")
        return bytes.fromhex(secret)
    if len(secret) < MIN_SECRET_CHARS:
        raise KeyFileError(f"key is {len(secret)} characters, at least {MIN_SECRET_CHARS} "
                           "required; generate one with: openssl rand -hex 32")
    return secret.encode("utf-8")


def load_key(path: str | os.PathLike[str]) -> bytes:
    """Read the cluster's pre-shared key from `path`, refusing unsafe files like ssh does.

    The file must be a regular file owned by root or by us with no group/other permission bits
    (0600 or 0400). The mode is checked on the opened descriptor, so a swap between check and
    read cannot bypass it.
    """
    p = Path(path)
    try:
        fd = os.open(p, OPEN_FLAGS)  # O_NONBLOCK: a FIFO must not hang the start (issue 13)
    except OSError as exc:
        raise KeyFileError(f"cannot open key file {p}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"key file {p} is {file_kind(st.st_mode)}, not a regular file")
        if st.st_mode & 0o077:
            raise KeyFileError(f"key file {p} has mode {stat.S_IMODE(st.st_mode):04o}, which is "
                               f"too open: group/others must have no access (chmod 600 {p})")
        if st.st_uid not in (0, os.geteuid()):
            raise KeyFileError(f"key file {p} is owned by uid {st.st_uid}, "
                               "expected root or the daemon's user")
        data = os.read(fd, MAX_KEY_FILE + 1)
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {p}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_FILE:
        raise KeyFileError(f"key file {p} is larger than {MAX_KEY_FILE} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KeyFileError(f"key file {p} is not UTF-8 text") from exc
    try:
        return parse_key_text(text)
    except KeyFileError as exc:
        raise KeyFileError(f"key file {p}: {exc}") from None


def _expand(prk: bytes, info: bytes) -> bytes:
    """HKDF-Expand (RFC 5869) for one 32-byte block: HMAC-SHA256(prk, info | 0x01)."""
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()


def _psk_prk(psk: bytes) -> bytes:
    """HKDF-Extract of the PSK with a fixed salt: a text key becomes a uniform 32-byte PRK."""
    return hmac.new(LABEL_EXTRACT, psk, hashlib.sha256).digest()


def cluster_key(psk: bytes, cluster: str) -> bytes:
    """The key that proofs and session keys of `cluster` derive from: HKDF(PSK, cluster name).

    Binding the cluster name into the key, instead of comparing names in cleartext, makes a
    wrong cluster fail the proof exactly like a wrong key: nobody learns or can confirm the
    name without holding the PSK.
    """
    return _expand(_psk_prk(psk), LABEL_CLUSTER_KEY + cluster.encode("utf-8"))


def check_key(psk: bytes) -> bytes:
    """A key from the PSK alone, for the initiator's second proof: it lets a responder whose
    proof check failed tell "right key, wrong cluster" from "wrong key" in its own log."""
    return _expand(_psk_prk(psk), LABEL_CHECK_KEY)


def key_check_proof(check: bytes, transcript: bytes) -> bytes:
    """The initiator's second proof, keyed with `check_key(psk)` (no cluster name in it)."""
    return hmac.new(check, LABEL_PROOF_KEY_CHECK + transcript, hashlib.sha256).digest()


def check_key_check_proof(check: bytes, transcript: bytes, received: bytes) -> bool:
    return hmac.compare_digest(key_check_proof(check, transcript), received)


def transcript_hash(initiator_hello: bytes, responder_hello: bytes) -> bytes:
    """Hash of both HELLO frames exactly as sent (header + payload), initiator's first.

    The HELLOs carry versions, nonces and capabilities, so everything derived from this hash
    is bound to all of them and to who initiated.
    """
    h = hashlib.sha256(LABEL_TRANSCRIPT)
    for frame in (initiator_hello, responder_hello):
        h.update(_LEN.pack(len(frame)))
        h.update(frame)
    return h.digest()


def proof(ckey: bytes, transcript: bytes, initiator: bool) -> bytes:
    """AUTH proof of the initiator or the responder, keyed with `cluster_key()`. Different
    labels defeat reflection."""
    label = LABEL_PROOF_INITIATOR if initiator else LABEL_PROOF_RESPONDER
    return hmac.new(ckey, label + transcript, hashlib.sha256).digest()


def check_proof(ckey: bytes, transcript: bytes, initiator: bool, received: bytes) -> bool:
    """Constant-time comparison of a received proof with the expected one."""
    return hmac.compare_digest(proof(ckey, transcript, initiator), received)


def session_keys(ckey: bytes, nonce_i: bytes, nonce_r: bytes,
                 transcript: bytes) -> tuple[bytes, bytes]:
    """(initiator->responder key, responder->initiator key) via HKDF-SHA256 from the cluster
    key `ckey` (`cluster_key()`).

    Extract with both nonces as salt so every connection gets fresh keys even with one PSK;
    expand once per direction so a frame cannot be reflected back to its sender.
    """
    prk = hmac.new(nonce_i + nonce_r, ckey, hashlib.sha256).digest()
    k_i2r = hmac.new(prk, LABEL_KEY_I2R + transcript + b"\x01", hashlib.sha256).digest()
    k_r2i = hmac.new(prk, LABEL_KEY_R2I + transcript + b"\x01", hashlib.sha256).digest()
    return k_i2r, k_r2i
