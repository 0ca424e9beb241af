"""Mutual TLS on the mesh port: plaintext, no certificate, an expired one or another CA's are all
refused at the handshake; a client accepts only the server it asked for; a renewed certificate is
served without a restart; the local CA renews what comes close to expiry."""
from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from onecard.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from runtime.grpc_client import open_channel
from runtime.mesh import MeshTLS, TLSMaterialError
from runtime.pki import CertificateAuthority, IdentityFiles, certificate_expiry, ensure_identity
from services.ledger.app import build_app as build_ledger
from tests.conftest import Launch
from tests.ledger.conftest import ledger_settings
from tests.mesh import channel_as, pki

CALL_TIMEOUT_S = 5.0


async def _health(channel: grpc.aio.Channel) -> int:
    answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                            timeout=CALL_TIMEOUT_S)
    return answer.status


async def _refused_at_handshake(channel: grpc.aio.Channel) -> None:
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await ledger_pb2_grpc.LedgerServiceStub(channel).TrialBalance(
                ledger_pb2.TrialBalanceRequest(), timeout=CALL_TIMEOUT_S)
    # The connection never came up: no call reached the server.
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value


def _identity_from(ca: CertificateAuthority, directory: Path, name: str, **validity: object) -> MeshTLS:
    ca.write_identity(directory, name, **validity)  # type: ignore[arg-type]
    return MeshTLS.load(directory)


async def test_plaintext_no_certificate_expired_and_foreign_certificates_are_refused(
        launch: Launch, database_url: str, nats_url: str, tmp_path: Path) -> None:
    ledger = await launch(build_ledger(ledger_settings(database_url=database_url, nats_url=nats_url)))
    target = ledger.target

    await _refused_at_handshake(grpc.aio.insecure_channel(target))
    no_certificate = grpc.ssl_channel_credentials(root_certificates=pki().ca.pem)
    await _refused_at_handshake(grpc.aio.secure_channel(target, no_certificate,
                                                        options=[("grpc.ssl_target_name_override", "ledger")]))
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=100)
    expired = _identity_from(pki().ca, tmp_path / "expired", "gateway", not_before=long_ago,
                             lifetime=dt.timedelta(days=90))
    await _refused_at_handshake(open_channel(target, tls=expired, server_name="ledger"))
    foreign = _identity_from(CertificateAuthority.create(common_name="someone else's CA"), tmp_path / "foreign",
                             "gateway")
    await _refused_at_handshake(open_channel(target, tls=foreign, server_name="ledger"))

    # The same caller with the mesh's own certificate gets through.
    async with channel_as("gateway", target, server_name="ledger") as channel:
        assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING


async def test_a_client_accepts_only_the_service_it_dials_and_only_from_its_ca(
        launch: Launch, database_url: str, nats_url: str, tmp_path: Path) -> None:
    ledger = await launch(build_ledger(ledger_settings(database_url=database_url, nats_url=nats_url)))
    # The ledger's certificate does not name identity: a client dialling "identity" there refuses it.
    await _refused_at_handshake(channel_as("gateway", ledger.target, server_name="identity"))

    # A server whose certificate another CA signed is refused by the mesh's clients.
    impostor_tls = _identity_from(CertificateAuthority.create(), tmp_path / "impostor", "ledger")
    server = grpc.aio.server()
    port = server.add_secure_port("127.0.0.1:0", impostor_tls.server_credentials())
    await server.start()
    try:
        await _refused_at_handshake(channel_as("policy", f"127.0.0.1:{port}", server_name="ledger"))
    finally:
        await server.stop(None)


async def test_a_renewed_certificate_is_served_without_a_restart(
        launch: Launch, database_url: str, nats_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "ledger-tls"
    shutil.copytree(pki().tls_dir("ledger"), folder)
    ledger = await launch(build_ledger(ledger_settings(database_url=database_url, nats_url=nats_url,
                                                       tls_dir=folder)))
    async with channel_as("gateway", ledger.target, server_name="ledger") as channel:
        assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING
    # Replaced by an expired certificate: the next connection fails, so the server did re-read it.
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=100)
    pki().ca.write_identity(folder, "ledger", not_before=long_ago, lifetime=dt.timedelta(days=90))
    await _refused_at_handshake(channel_as("gateway", ledger.target, server_name="ledger"))
    # Renewed: served again, same process.
    pki().ca.write_identity(folder, "ledger")
    async with channel_as("gateway", ledger.target, server_name="ledger") as channel:
        assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING


def test_tls_material_must_be_complete_and_name_the_process(tmp_path: Path) -> None:
    with pytest.raises(TLSMaterialError, match="missing"):
        MeshTLS.load(tmp_path)
    files = pki().ca.write_identity(tmp_path / "ops", "ops")
    assert MeshTLS.load(files.directory).name == "ops"
    files.key.unlink()
    with pytest.raises(TLSMaterialError, match="tls.key"):
        MeshTLS.load(files.directory)


def test_the_local_ca_issues_once_and_renews_what_comes_close_to_expiry(tmp_path: Path) -> None:
    files, issued = ensure_identity(tmp_path, "ledger")
    assert issued and MeshTLS.load(files.directory).name == "ledger"
    first_expiry = certificate_expiry(files.cert)
    assert ensure_identity(tmp_path, "ledger") == (files, False)

    # A certificate with ten days left is issued again, with the CA kept.
    ca = CertificateAuthority.load_or_create(tmp_path / "ca")
    ca.write_identity(files.directory, "ledger",
                      not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=80), lifetime=dt.timedelta(days=90))
    _, renewed = ensure_identity(tmp_path, "ledger")
    assert renewed and certificate_expiry(files.cert) >= first_expiry
    assert CertificateAuthority.load_or_create(tmp_path / "ca").pem == ca.pem

    # Names asked for change: issued again; a key file is owner-only.
    _, reissued = ensure_identity(tmp_path, "ledger", hosts=("localhost", "ledger.onecard.svc"))
    assert reissued
    assert IdentityFiles(files.directory).key.stat().st_mode & 0o077 == 0
    assert (tmp_path / "ca" / "ca.key").stat().st_mode & 0o077 == 0
