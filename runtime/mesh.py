"""Who is calling, and how a process proves who it is: mutual TLS on every gRPC hop of the mesh.

Each process reads its TLS material from one folder (``ONECARD_TLS_DIR``: ``ca.crt``, ``tls.crt``,
``tls.key``, the layout of a cert-manager TLS Secret; see runtime.pki). Its gRPC server requires
a client certificate from that CA, and its channels present its own certificate and check the
server's: a client dialling the ledger accepts only a certificate naming ``ledger`` (its DNS SAN),
wherever the address points. The caller's identity is the URI SAN ``spiffe://onecard/<name>``
of the certificate it presented; runtime.access decides what that name may call.

Secure by default: a process with no TLS folder refuses to start, unless the explicit development
switch ``ONECARD_INSECURE_DEVELOPMENT=1`` is set (plaintext everywhere, every caller allowed), which
neither ``make run`` nor the tests use; benchmarks use it only to measure what TLS costs.

Renewal: the server re-reads its certificate when the file changes (a cert-manager rotation or
``make run`` renewing it), for every new connection; channels are long-lived, so a renewed client
certificate is presented from the next connection on.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from pydantic import model_validator
from pydantic_settings import BaseSettings

from runtime.logs import get_logger
from runtime.pki import CA_FILE, CERT_FILE, KEY_FILE, SPIFFE_PREFIX
from runtime.targets import check_target

log = get_logger(__name__)

INSECURE_SETTING = "ONECARD_INSECURE_DEVELOPMENT"
TLS_DIR_SETTING = "ONECARD_TLS_DIR"
_PEER_SPIFFE_ID = "peer_spiffe_id"
_TRANSPORT = "transport_security_type"


class TLSMaterialError(ValueError):
    """The TLS folder is missing a file, or its certificate cannot name this process."""


class MeshSettings(BaseSettings):
    """What every process of the mesh needs to prove itself and check its peers."""

    # The folder with ca.crt, tls.crt and tls.key (a mounted cert-manager Secret in Kubernetes).
    tls_dir: Path | None = None
    # Plaintext gRPC and no caller checks, for a development stack only; never set by make run or
    # the tests. A process refuses to start without its TLS material unless this is set.
    insecure_development: bool = False

    @model_validator(mode="after")
    def _secure_unless_told(self) -> MeshSettings:
        if self.tls_dir is None and not self.insecure_development:
            raise ValueError(
                f"missing required setting {TLS_DIR_SETTING} (the folder with ca.crt, tls.crt and tls.key); "
                f"{INSECURE_SETTING}=1 runs without TLS, for development only")
        return self

    @model_validator(mode="after")
    def _targets_usable(self) -> MeshSettings:
        # ONECARD_<NAME>_TARGET: one address or a list of a service's replicas (runtime.targets).
        for name, value in self:
            if name.endswith("_target") and isinstance(value, str) and value:
                check_target(value)
        return self


def peer_name_of(cert_pem: bytes) -> str:
    """The mesh name a certificate carries in its URI SAN spiffe://onecard/<name>."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise TLSMaterialError("the certificate has no subject alternative names") from None
    uris = [uri for uri in sans.get_values_for_type(x509.UniformResourceIdentifier) if uri.startswith(SPIFFE_PREFIX)]
    if len(uris) != 1:
        raise TLSMaterialError(f"the certificate must carry exactly one URI SAN {SPIFFE_PREFIX}<name>")
    return uris[0].removeprefix(SPIFFE_PREFIX)


@dataclass(frozen=True)
class MeshTLS:
    """One process's TLS material, read from its folder."""

    directory: Path
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    name: str

    @classmethod
    def load(cls, directory: Path, *, mesh_name: bool = True) -> MeshTLS:
        """The folder's material. ``mesh_name=False`` for a certificate that needs no mesh identity
        (the device port's, issued for the public name terminals dial, e.g. by ACME)."""
        files = {name: directory / name for name in (CA_FILE, CERT_FILE, KEY_FILE)}
        missing = [str(path) for path in files.values() if not path.is_file()]
        if missing:
            raise TLSMaterialError(f"{TLS_DIR_SETTING}: missing {', '.join(missing)}")
        cert_pem = files[CERT_FILE].read_bytes()
        return cls(directory=directory, ca_pem=files[CA_FILE].read_bytes(), cert_pem=cert_pem,
                   key_pem=files[KEY_FILE].read_bytes(), name=peer_name_of(cert_pem) if mesh_name else "")

    def server_credentials(self) -> grpc.ServerCredentials:
        """Mutual TLS: a client certificate from the CA is required; the server's own is re-read
        from the folder whenever the file changes."""
        cert_path = self.directory / CERT_FILE
        seen = {"mtime": _mtime(cert_path)}

        def fetch() -> Any:
            mtime = _mtime(cert_path)
            if mtime == seen["mtime"]:
                return None
            try:
                renewed = MeshTLS.load(self.directory)
            except (OSError, TLSMaterialError) as exc:
                log.warning("renewed TLS material unreadable; keeping the current", error=str(exc))
                return None
            seen["mtime"] = mtime
            log.info("TLS certificate reloaded", name=renewed.name)
            return grpc.ssl_server_certificate_configuration([(renewed.key_pem, renewed.cert_pem)],
                                                             root_certificates=renewed.ca_pem)

        initial = grpc.ssl_server_certificate_configuration([(self.key_pem, self.cert_pem)],
                                                            root_certificates=self.ca_pem)
        return grpc.dynamic_ssl_server_credentials(initial, fetch, require_client_authentication=True)

    def server_only_credentials(self) -> grpc.ServerCredentials:
        """Server TLS with no client certificate asked: for the device port, where a terminal
        proves itself by its key inside the call."""
        return grpc.ssl_server_credentials([(self.key_pem, self.cert_pem)], require_client_auth=False)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca_pem, private_key=self.key_pem,
                                            certificate_chain=self.cert_pem)


def _mtime(path: Path) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return 0


def load_tls(settings: MeshSettings) -> MeshTLS | None:
    """The process's TLS material, or None in insecure development mode."""
    if settings.tls_dir is None:
        return None
    return MeshTLS.load(settings.tls_dir)


def peer_name(context: grpc.aio.ServicerContext) -> str | None:
    """The mesh name of the caller, from the certificate it presented; None without one."""
    values = context.auth_context().get(_PEER_SPIFFE_ID)
    if not values:
        return None
    spiffe = values[0].decode(errors="replace")
    if not spiffe.startswith(SPIFFE_PREFIX):
        return None
    return spiffe.removeprefix(SPIFFE_PREFIX)
