"""The mesh's one small certificate authority, and the certificates that name each process.

Every process of the mesh (the services, the gateway, the tools that call them) holds a
certificate whose URI SAN is ``spiffe://onecard/<name>``: the identity form Istio, Linkerd and
SPIRE use, so a service mesh can take this job over later with no change to the code that reads
it. The local stack (``make run``), the test session and the benchmarks make their CA and
certificates here; in Kubernetes cert-manager issues the same shape (deploy/k8s).

A name's files lie in one folder laid out as a cert-manager ``kubernetes.io/tls`` Secret mounts
them: ``ca.crt`` (the CA bundle to trust), ``tls.crt`` and ``tls.key``, so a service reads the same
three files wherever it runs (``ONECARD_TLS_DIR``).

Keys are ECDSA P-256: every TLS stack has it, and its handshakes are cheap. A leaf lives
``DEFAULT_LEAF_LIFETIME``; ``ensure_identity`` issues it again once less than
``DEFAULT_RENEW_BEFORE`` is left, when the CA changed, or when its names changed.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TRUST_DOMAIN = "onecard"
SPIFFE_PREFIX = f"spiffe://{TRUST_DOMAIN}/"
CA_FILE = "ca.crt"
CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"
CA_KEY_FILE = "ca.key"
DEFAULT_CA_LIFETIME = dt.timedelta(days=3650)
DEFAULT_LEAF_LIFETIME = dt.timedelta(days=90)
DEFAULT_RENEW_BEFORE = dt.timedelta(days=30)
# Certificates start a little in the past, so a peer whose clock runs behind still accepts them.
BACKDATE = dt.timedelta(minutes=5)
PRIVATE_MODE = 0o600
# Loopback names every local certificate carries, so a client may dial 127.0.0.1 or localhost.
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


def spiffe_id(name: str) -> str:
    return f"{SPIFFE_PREFIX}{name}"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    """Replace ``path`` atomically; a key file is owner-only from its first byte."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.tmp")
    scratch.unlink(missing_ok=True)
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE if private else 0o644)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(scratch, path)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san_entries(name: str, hosts: Iterable[str], *, spiffe: bool = True) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id(name))] if spiffe else []
    entries.append(x509.DNSName(name))
    for host in hosts:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    unique: list[x509.GeneralName] = []
    for entry in entries:
        if entry not in unique:
            unique.append(entry)
    return unique


@dataclass(frozen=True)
class IdentityFiles:
    """The three files of one name (a cert-manager TLS Secret's layout)."""

    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / CA_FILE

    @property
    def cert(self) -> Path:
        return self.directory / CERT_FILE

    @property
    def key(self) -> Path:
        return self.directory / KEY_FILE


@dataclass(frozen=True)
class CertificateAuthority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def pem(self) -> bytes:
        return _pem(self.cert)

    @classmethod
    def create(cls, *, common_name: str = "onecard mesh CA", lifetime: dt.timedelta = DEFAULT_CA_LIFETIME,
               not_before: dt.datetime | None = None) -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, TRUST_DOMAIN),
                             x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        start = not_before or _now() - BACKDATE
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + lifetime)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert=cert, key=key)

    @classmethod
    def load_or_create(cls, directory: Path) -> CertificateAuthority:
        """The CA kept in ``directory`` (``ca.crt``, ``ca.key``), made on first use."""
        cert_path, key_path = directory / CA_FILE, directory / CA_KEY_FILE
        if cert_path.exists() and key_path.exists():
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{key_path}: not an EC private key")
            if cert.not_valid_after_utc - _now() > DEFAULT_RENEW_BEFORE:
                return cls(cert=cert, key=key)
        ca = cls.create()
        _write(key_path, _key_pem(ca.key), private=True)
        _write(cert_path, ca.pem)
        return ca

    def issue(self, name: str, *, hosts: Iterable[str] = LOCAL_HOSTS, lifetime: dt.timedelta = DEFAULT_LEAF_LIFETIME,
              not_before: dt.datetime | None = None, spiffe: bool = True) -> tuple[bytes, bytes]:
        """A leaf for ``name``: URI SAN spiffe://onecard/<name>, DNS SAN <name> (what a client checks
        the server against) and ``hosts``; usable as server and client. Answers (cert PEM, key PEM)."""
        key = ec.generate_private_key(ec.SECP256R1())
        start = not_before or _now() - BACKDATE
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, TRUST_DOMAIN),
                                     x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + lifetime)
            .add_extension(x509.SubjectAlternativeName(_san_entries(name, hosts, spiffe=spiffe)), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False,
                                         crl_sign=False, content_commitment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return _pem(cert), _key_pem(key)

    def write_identity(self, directory: Path, name: str, *, hosts: Iterable[str] = LOCAL_HOSTS,
                       lifetime: dt.timedelta = DEFAULT_LEAF_LIFETIME, not_before: dt.datetime | None = None,
                       spiffe: bool = True) -> IdentityFiles:
        """Issue ``name`` and write its three files into ``directory`` (key first, owner-only).
        ``spiffe=False``: a plain server certificate (no mesh identity), as for a public name."""
        cert_pem, key_pem = self.issue(name, hosts=hosts, lifetime=lifetime, not_before=not_before, spiffe=spiffe)
        files = IdentityFiles(directory)
        _write(files.key, key_pem, private=True)
        _write(files.cert, cert_pem)
        _write(files.ca, self.pem)
        return files


def needs_renewal(files: IdentityFiles, *, ca: CertificateAuthority, name: str, hosts: Iterable[str],
                  renew_before: dt.timedelta = DEFAULT_RENEW_BEFORE) -> bool:
    """Whether the name's files are missing, close to expiry, from another CA, or name other hosts."""
    if not (files.cert.exists() and files.key.exists() and files.ca.exists()):
        return True
    if files.ca.read_bytes() != ca.pem:
        return True
    try:
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return True
    if cert.issuer != ca.cert.subject or cert.not_valid_after_utc - _now() < renew_before:
        return True
    return list(sans) != _san_entries(name, hosts)


def ensure_identity(pki_dir: Path, name: str, *, hosts: Iterable[str] = LOCAL_HOSTS,
                    renew_before: dt.timedelta = DEFAULT_RENEW_BEFORE) -> tuple[IdentityFiles, bool]:
    """The files of ``name`` under ``pki_dir/<name>``, issued or renewed when needed (with the CA
    under ``pki_dir/ca``, made on first use). Answers the files and whether they were (re)issued."""
    ca = CertificateAuthority.load_or_create(pki_dir / "ca")
    hosts = tuple(hosts)
    files = IdentityFiles(pki_dir / name)
    if not needs_renewal(files, ca=ca, name=name, hosts=hosts, renew_before=renew_before):
        return files, False
    return ca.write_identity(files.directory, name, hosts=hosts), True


def certificate_expiry(path: Path) -> dt.datetime:
    return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc
