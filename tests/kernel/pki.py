"""A small private CA for TLS tests and benchmarks, made with the `openssl` command the way
docs/daemon.md ("TLS on the sync link") tells operators to: EC P-256 keys, a self-signed CA,
one certificate per node with its sync IP in subjectAltName. Python's ssl module cannot make
certificates; openssl 3.0 can make an expired one with a negative -days (notAfter = now - 1 day).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]


def _openssl(*args: str, cwd: Path) -> None:
    p = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)}: {p.stderr.strip()}")


@dataclass(frozen=True)
class Node:
    """A node's certificate and private key (mode 0600) and the CA that signed it."""

    cert: Path
    key: Path
    ca: Path

    def flags(self) -> tuple[str, ...]:
        return ("--tls-cert", str(self.cert), "--tls-key", str(self.key), "--tls-ca", str(self.ca))


@dataclass(frozen=True)
class Ca:
    name: str
    cert: Path
    key: Path
    directory: Path

    @classmethod
    def create(cls, directory: Path, name: str = "ca") -> Ca:
        directory.mkdir(parents=True, exist_ok=True)
        _openssl("req", "-x509", *EC, "-days", "3650", "-subj", f"/CN=nftsync test {name}",
                 "-keyout", f"{name}.key", "-out", f"{name}.crt", cwd=directory)
        return cls(name, directory / f"{name}.crt", directory / f"{name}.key", directory)

    def node(self, name: str, ip: str | None, days: int = 365) -> Node:
        """A certificate for `name` naming `ip` (None: no subjectAltName at all); `days` < 0
        makes one that expired |days| days ago."""
        d = self.directory
        ext = d / f"{name}.ext"
        ext.write_text((f"subjectAltName=IP:{ip}\n" if ip else "") +
                       "extendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n")
        _openssl("req", "-new", *EC, "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", self.cert.name, "-CAkey",
                 self.key.name, "-CAcreateserial", "-days", str(days), "-extfile", ext.name,
                 "-out", f"{name}.crt", cwd=d)
        key = d / f"{name}.key"
        os.chmod(key, 0o600)
        return Node(d / f"{name}.crt", key, self.cert)
