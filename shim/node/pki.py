"""Certificates of a local Kubernetes node: one CA, serving and client certificates (blocking).

Everything is written 0600 under the node's pki directory and deleted by `node down`: the
CA key can mint cluster-admin credentials. Loopback only: every serving certificate names
127.0.0.1 and localhost (plus the API server's service IP), nothing else.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shim.errors import FailedPrecondition

VALIDITY = datetime.timedelta(days=30)  # a development node; `node down` deletes them anyway
LOOPBACK_NAMES = ("localhost",)
LOOPBACK_IPS = ("127.0.0.1",)

_PrivateKey = ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


def _write_private(path: Path, data: bytes) -> None:
    """Create `path` 0600 from the start (never readable by others, not even briefly)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _key_pem(key: _PrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str, organizations: tuple[str, ...] = ()) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
    return x509.Name([*attrs, x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + VALIDITY))


def create_ca(pki: Path, common_name: str) -> CertPair:
    """A self-signed CA in `pki` (ca.crt, ca.key); kept if it is already there."""
    pair = CertPair(pki / "ca.crt", pki / "ca.key")
    if pair.cert.exists() and pair.key.exists():
        return pair
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name)
    cert = (_builder(name, name, key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .sign(key, hashes.SHA256()))
    _write_private(pair.key, _key_pem(key))
    _write_private(pair.cert, cert.public_bytes(serialization.Encoding.PEM))
    return pair


def _load_ca(ca: CertPair) -> tuple[x509.Certificate, _PrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
        key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise FailedPrecondition(f"cannot read the cluster CA {ca.cert}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise FailedPrecondition(f"{ca.key} is not an EC key")
    return cert, key


def issue(ca: CertPair, out: CertPair, common_name: str, *, organizations: tuple[str, ...] = (),
          server: bool = False, client: bool = False, dns: tuple[str, ...] = (), ips: tuple[str, ...] = ()) -> CertPair:
    """A leaf certificate signed by `ca` for serving (`server`: with SANs) and/or client auth."""
    ca_cert, ca_key = _load_ca(ca)
    key = ec.generate_private_key(ec.SECP256R1())
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
    builder = (_builder(_name(common_name, organizations), ca_cert.subject, key.public_key())
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usages), critical=False))
    if dns or ips:
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _write_private(out.key, _key_pem(key))
    _write_private(out.cert, cert.public_bytes(serialization.Encoding.PEM))
    return out


def service_account_keys(pki: Path) -> CertPair:
    """The key pair the API server signs service-account tokens with (sa.pub, sa.key)."""
    pair = CertPair(pki / "sa.pub", pki / "sa.key")
    if pair.cert.exists() and pair.key.exists():
        return pair
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _write_private(pair.key, _key_pem(key))
    _write_private(pair.cert, key.public_key().public_bytes(serialization.Encoding.PEM,
                                                            serialization.PublicFormat.SubjectPublicKeyInfo))
    return pair
