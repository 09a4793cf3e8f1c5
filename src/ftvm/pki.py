"""The pool's own certificate authority: TLS for etcd (client certificates) and the REST API.

`ftvm pool init DIR` makes, once per pool (docs/security.md):

    DIR/ca.crt, ca.key            the pool CA (keep ca.key offline once hosts have their certs)
    DIR/etcd.crt, etcd.key        the quorum service's server certificate (its addresses)
    DIR/hosts/<h>.crt, <h>.key    one per host: its etcd client certificate and its API's
                                  server certificate (the host's API address)
    DIR/admin.crt, admin.key      the CLI's etcd client certificate (direct mode)
    DIR/pool.secret               the pool secret (ftvm/secret.py)
    DIR/api-token, api-read-token the API's admin token and its read-only token (/metrics, dashboard)

Keys are EC P-256 and written 0600; nothing here replaces an existing file.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .secret import make_secret

VALID_DAYS = 3650


class PkiError(ValueError):
    pass


@dataclass(frozen=True)
class TlsFiles:
    """A CA to verify the peer with, and (for client authentication or a server) our
    certificate and key."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None

    def client_context(self) -> ssl.SSLContext:
        """Verifies the server against the pool CA (and its name or address); presents our
        certificate if we have one."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert and self.key:
            ctx.load_cert_chain(str(self.cert), str(self.key))
        return ctx

    def server_context(self, require_client_cert: bool = False) -> ssl.SSLContext:
        assert self.cert and self.key
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.ca))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(self.cert), str(self.key))
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_NONE
        return ctx


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(d: Path, pool: str) -> None:
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"ftvm pool {pool} CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    _write_private(d / "ca.key", _key_bytes(key))
    (d / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def issue(d: Path, name: str, addresses: list[str], out: Path | None = None) -> TlsFiles:
    """A certificate for `name` signed by the CA in `d`, valid as a TLS server for
    `addresses` (IPs or DNS names) and as a client (CN = name)."""
    try:
        ca_key = serialization.load_pem_private_key((d / "ca.key").read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate((d / "ca.crt").read_bytes())
    except (OSError, ValueError) as e:
        raise PkiError(f"no usable pool CA in {d}: {e}") from None
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    sans: list[x509.GeneralName] = []
    for a in addresses:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(a)))
        except ValueError:
            sans.append(x509.DNSName(a))
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(ca_cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
               .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                     ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    out = out or d
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_private(out / f"{name}.key", _key_bytes(key))
    (out / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return TlsFiles(d / "ca.crt", out / f"{name}.crt", out / f"{name}.key")


def spki_sha256(cert: Path) -> str:
    """base64 SHA-256 of a certificate's public key (what a browser pins)."""
    import base64
    c = x509.load_pem_x509_certificate(cert.read_bytes())
    der = c.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(der)
    return base64.b64encode(digest.finalize()).decode()


def init_pool(d: Path, pool: str, etcd_addresses: list[str], hosts: dict[str, str]) -> None:
    """Everything a new pool needs (the module docstring). Refuses a directory that
    already holds a CA: re-running must never split a pool in two."""
    if (d / "ca.key").exists() or (d / "ca.crt").exists():
        raise PkiError(f"{d} already holds a pool CA: nothing changed")
    make_ca(d, pool)
    issue(d, "etcd", etcd_addresses)
    for host, addr in hosts.items():
        issue(d, host, [addr], out=d / "hosts")
    issue(d, "admin", [])
    make_secret(d / "pool.secret")
    for token in ("api-token", "api-read-token"):
        _write_private(d / token, (secrets.token_hex(24) + "\n").encode())
