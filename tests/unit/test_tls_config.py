"""tls_cert / tls_key / tls_ca: what the configuration accepts and refuses, and what the built
contexts really do in a TLS handshake (in memory, no network, no root).

Certificates are made with the openssl command by tests/kernel/pki.py, as docs/daemon.md tells
operators to make them.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernel"))

from pki import Ca, Node  # noqa: E402

from nftsync.daemon import config as cfgmod  # noqa: E402
from nftsync.daemon.config import ConfigError, load_config  # noqa: E402
from nftsync.daemon.tls import describe_failure  # noqa: E402

NFTSYNC = [sys.executable, "-m", "nftsync"]
IP1, IP2 = "10.30.0.1", "10.30.0.2"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Node]:
    d = tmp_path_factory.mktemp("pki")
    ca, other = Ca.create(d / "ca"), Ca.create(d / "other", "other")
    return {"lb1": ca.node("lb1", IP1), "lb2": ca.node("lb2", IP2),
            "expired": ca.node("old", IP1, days=-1), "stranger": other.node("x", IP1),
            "nosan": ca.node("nosan", None)}


@pytest.fixture
def key(tmp_path: Path) -> Path:
    p = tmp_path / "psk"
    p.write_text(os.urandom(32).hex() + "\n")
    p.chmod(0o600)
    return p


def load(key: Path, node: Node | None = None, listen: str | None = None, **paths: object):
    over: dict[str, object] = {"key_file": str(key), "node_name": "lb1", "listen": listen}
    if node is not None:
        over.update(tls_cert=str(node.cert), tls_key=str(node.key), tls_ca=str(node.ca))
    over.update(paths)
    return load_config(None, over)


@pytest.fixture(autouse=True)
def no_default_config(monkeypatch, tmp_path):
    """Flags only: never this machine's /etc/nftsync/nftsync.toml."""
    monkeypatch.setattr(cfgmod, "DEFAULT_CONFIG", str(tmp_path / "absent.toml"))


def refused(key: Path, node: Node | None = None, listen: str | None = None, **paths) -> str:
    with pytest.raises(ConfigError) as info:
        load(key, node, listen, **paths)
    return str(info.value)


def test_no_tls_keys_is_plain_tcp(key):
    assert load(key).tls is None


def test_all_three_build_mutual_tls13_contexts(key, pki):
    tls = load(key, pki["lb1"], f"{IP1}:7777").tls
    assert tls is not None
    for ctx in (tls.server, tls.client):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert tls.client.check_hostname is True
    assert tls.subject == "lb1" and tls.names == (f"IP:{IP1}",)


@pytest.mark.parametrize("given", [("tls_cert",), ("tls_key", "tls_ca"), ("tls_ca",)])
def test_all_three_or_none(key, pki, given):
    node = pki["lb1"]
    files = {"tls_cert": node.cert, "tls_key": node.key, "tls_ca": node.ca}
    msg = refused(key, **{k: str(files[k]) for k in given})
    missing = [k for k in files if k not in given]
    assert msg == (f"--{given[0].replace('_', '-')}: TLS needs all three of tls_cert, tls_key, "
                   f"tls_ca; missing {', '.join(missing)}")


def test_private_key_must_not_be_open_to_others(key, pki, tmp_path):
    node = pki["lb1"]
    copy = tmp_path / "lb1.key"
    copy.write_bytes(node.key.read_bytes())
    copy.chmod(0o644)
    assert refused(key, node, tls_key=str(copy)) == (
        f"--tls-key: private key {copy} has mode 0644, which is too open: others must have no "
        f"access and group no write (chmod 600 {copy})")
    copy.chmod(0o640)  # group read: Debian's ssl-cert group convention
    assert load(key, node, tls_key=str(copy)).tls is not None


def test_fifo_is_refused_without_blocking(key, pki, tmp_path):
    """A FIFO given as a file must not hang --check (opened without blocking, then fstat)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    node = pki["lb1"]
    for flag in ("--tls-cert", "--tls-key", "--tls-ca"):
        args = dict(zip(("--tls-cert", "--tls-key", "--tls-ca"),
                        (str(node.cert), str(node.key), str(node.ca)), strict=True))
        args[flag] = str(fifo)
        p = subprocess.run([*NFTSYNC, "daemon", "--check", "--key-file", str(key),
                            "--node-name", "lb1", *[x for kv in args.items() for x in kv]],
                           capture_output=True, text=True, timeout=30)
        assert p.returncode == 2, p
        what = {"--tls-cert": "certificate", "--tls-key": "private key",
                "--tls-ca": "CA certificate"}[flag]
        assert p.stderr.strip() == (f"nftsync: error: {flag}: {what} {fifo} is a FIFO (named "
                                    "pipe), not a regular file")


def test_certificate_of_another_ca(key, pki):
    node = pki["stranger"]
    assert refused(key, Node(node.cert, node.key, pki["lb1"].ca)) == (
        f"--tls-cert: {node.cert}: the certificate is not signed by tls_ca (checked against "
        f"tls_ca {pki['lb1'].ca}, as the peers will)")


def test_expired_certificate_check_exits_2(key, pki):
    node = pki["expired"]
    p = subprocess.run([*NFTSYNC, "daemon", "--check", "--key-file", str(key), "--node-name",
                        "lb1", *node.flags()], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2
    assert p.stderr == (f"nftsync: error: --tls-cert: {node.cert}: the certificate has expired "
                        f"(checked against tls_ca {node.ca}, as the peers will)\n")


def test_key_of_another_certificate(key, pki):
    assert refused(key, pki["lb1"], tls_key=str(pki["lb2"].key)) == (
        f"--tls-key: {pki['lb2'].key} is not the private key of the certificate "
        f"{pki['lb1'].cert}")


def test_ca_must_be_a_ca(key, pki):
    node = pki["lb1"]
    assert refused(key, node, tls_ca=str(pki["lb2"].cert)) == (
        f"--tls-ca: {pki['lb2'].cert}: holds no CA certificate (basicConstraints CA:TRUE)")
    assert refused(key, node, tls_ca=str(node.key)) == (
        f"--tls-ca: {node.key} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")


def test_encrypted_private_key_is_refused(key, pki, tmp_path):
    enc = tmp_path / "enc.key"
    subprocess.run(["openssl", "pkey", "-in", str(pki["lb1"].key), "-aes256", "-passout",
                    "pass:secret", "-out", str(enc)], check=True, capture_output=True)
    enc.chmod(0o600)
    assert refused(key, pki["lb1"], tls_key=str(enc)) == (
        f"--tls-key: private key {enc} is encrypted with a passphrase; the daemon starts "
        "unattended: decrypt it (openssl pkey -in KEY -out KEY.plain)")


def test_listen_address_must_be_in_subject_alt_name(key, pki):
    assert refused(key, pki["lb1"], f"{IP2}:7777") == (
        f"--tls-cert: {pki['lb1'].cert}: the certificate does not name this node's listen "
        f"address {IP2} in subjectAltName (it names IP:{IP1}); peers dial that address and "
        f"check it: make it with subjectAltName=IP:{IP2}")
    assert "(it names nothing)" in refused(key, pki["nosan"], f"{IP1}:7777")
    assert load(key, pki["nosan"], "0.0.0.0:7777").tls is not None  # nothing to compare


def test_config_file_paths_are_relative_to_it_and_errors_name_the_file(key, pki, tmp_path):
    node = pki["lb1"]
    conf = tmp_path / "nftsync.toml"
    rel = os.path.relpath(node.cert, tmp_path)
    conf.write_text(f'key_file = "{key}"\nnode_name = "lb1"\ntls_cert = "{rel}"\n'
                    f'tls_key = "{node.key}"\ntls_ca = "{pki["lb2"].cert}"\n')
    with pytest.raises(ConfigError) as info:
        load_config(str(conf))
    assert str(info.value).startswith(f"{conf}: tls_ca: {pki['lb2'].cert}: holds no CA")
    conf.write_text(conf.read_text().replace(str(pki["lb2"].cert), str(node.ca)))
    assert Path(load_config(str(conf)).tls.cert).resolve() == node.cert.resolve()


def test_check_shows_the_certificate(key, pki):
    p = subprocess.run([*NFTSYNC, "daemon", "--check", "--key-file", str(key), "--node-name",
                        "lb1", "--listen", IP1, *pki["lb1"].flags()],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert "tls.subject" in p.stdout and f"IP:{IP1}" in p.stdout and "days)" in p.stdout


# -- the contexts in a real TLS handshake (memory BIOs) -------------------------------------------
def handshake(client: ssl.SSLContext, server: ssl.SSLContext, name: str | None) -> None:
    """Run a TLS handshake between the two contexts; raise what either side raises."""
    bios = [ssl.MemoryBIO() for _ in range(4)]
    srv = server.wrap_bio(bios[0], bios[1], server_side=True)
    cli = client.wrap_bio(bios[2], bios[3], server_side=False, server_hostname=name)
    done = {srv: False, cli: False}
    for _ in range(10):
        for obj, out, into in ((cli, bios[3], bios[0]), (srv, bios[1], bios[2])):
            if not done[obj]:
                try:
                    obj.do_handshake()
                    done[obj] = True
                except ssl.SSLWantReadError:
                    pass
            if data := out.read():
                into.write(data)
        if all(done.values()):
            return
    raise AssertionError("handshake did not complete")


def test_two_nodes_handshake_by_ip(key, pki):
    lb1, lb2 = load(key, pki["lb1"]).tls, load(key, pki["lb2"]).tls
    handshake(lb1.client, lb2.server, IP2)  # lb1 dials lb2 at its sync IP


def test_dialler_checks_the_address_it_dialled(key, pki):
    lb1, lb2 = load(key, pki["lb1"]).tls, load(key, pki["lb2"]).tls
    with pytest.raises(ssl.SSLCertVerificationError) as info:
        handshake(lb1.client, lb2.server, "10.30.0.9")  # lb2's certificate at another address
    assert describe_failure(info.value, "10.30.0.9") == (
        "its certificate does not name 10.30.0.9 in subjectAltName")


def test_server_requires_a_client_certificate(key, pki):
    lb2 = load(key, pki["lb2"]).tls
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.load_verify_locations(pki["lb2"].ca)
    with pytest.raises(ssl.SSLError) as info:
        handshake(anonymous, lb2.server, IP2)
    assert describe_failure(info.value) == "it sent no certificate"


def test_server_refuses_other_ca_and_expired_clients(key, pki, tmp_path):
    lb2 = load(key, pki["lb2"]).tls
    for node, why in ((pki["stranger"], "its certificate is not signed by our tls_ca"),
                      (pki["expired"], "its certificate has expired")):
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.load_verify_locations(pki["lb2"].ca)
        client.load_cert_chain(node.cert, node.key)
        with pytest.raises(ssl.SSLCertVerificationError) as info:
            handshake(client, lb2.server, IP2)
        assert describe_failure(info.value) == why


def test_tls12_is_refused(key, pki):
    lb2 = load(key, pki["lb2"]).tls
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    old.load_verify_locations(pki["lb2"].ca)
    old.load_cert_chain(pki["lb1"].cert, pki["lb1"].key)
    with pytest.raises(ssl.SSLError) as info:
        handshake(old, lb2.server, IP2)
    assert info.value.reason in ("UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION")


def test_example_tls_keys_load(key, pki, tmp_path):
    """contrib/nftsync.toml.example's TLS lines, uncommented, with the test CA's files."""
    example = Path(__file__).resolve().parents[2] / "contrib" / "nftsync.toml.example"
    node = pki["lb1"]
    files = {"lb1.crt": node.cert, "lb1.key": node.key, "ca.crt": node.ca}
    lines = [f'key_file = "{key}"']
    for line in example.read_text().splitlines():
        if line.startswith("#tls_"):
            name, _, value = line[1:].partition(" = ")
            lines.append(f'{name} = "{files[Path(value.strip(chr(34))).name]}"')
    assert [ln.split(" = ")[0] for ln in lines[1:]] == ["tls_cert", "tls_key", "tls_ca"]
    conf = tmp_path / "example.toml"
    conf.write_text("\n".join(lines) + "\n")
    assert load_config(str(conf)).tls.subject == "lb1"
