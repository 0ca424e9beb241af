"""One attempt over real sockets: https to the address the check passed, with the name as Host
and TLS server name (the certificate names only the host, no address); a certificate for another
name refused; no redirect followed; a long answer read only up to the bound."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.webhooks.sender import MAX_RESPONSE_BYTES, Sender
from tests.mesh import pki
from tests.webhooks.support import HUGE, OK, REDIRECT, Names, Receiver

HOST = "hooks.partner.test"


def server_context(tmp_path: Path, name: str) -> ssl.SSLContext:
    files = pki().ca.write_identity(tmp_path / name, name, hosts=(), spiffe=False)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(files.cert, files.key)
    return context


@pytest.fixture
async def tls_receiver(tmp_path: Path) -> AsyncIterator[Receiver]:
    server = Receiver(tls=server_context(tmp_path, HOST))
    await server.start()
    yield server
    await server.stop()


def sender(names: Names) -> Sender:
    trust = ssl.create_default_context(cadata=pki().ca.pem.decode())
    # Loopback allowed, as on a development stack: the receiver is on 127.0.0.1.
    return Sender(resolver=names, allow_loopback_http=True, verify=trust, read_timeout_s=5, total_timeout_s=10)


async def send(s: Sender, url: str) -> object:
    await s.open()
    try:
        return await s.send(url=url, allow_private=False, headers={"webhook-id": "msg_1"}, body=b"{}",
                            started_at=datetime.now(UTC))
    finally:
        await s.close()


async def test_https_goes_to_the_checked_address_with_the_name_as_host_and_server_name(
        tls_receiver: Receiver) -> None:
    result = await send(sender(Names({HOST: ["127.0.0.1"]})), f"https://{HOST}:{tls_receiver.port}/in")
    assert result.delivered and result.response_status == 204, result
    (received,) = tls_receiver.requests
    assert received.headers["host"] == f"{HOST}:{tls_receiver.port}"
    assert received.headers["webhook-id"] == "msg_1"


async def test_a_certificate_for_another_name_is_refused(tmp_path: Path) -> None:
    impostor = Receiver(tls=server_context(tmp_path, "someone-else.test"))
    await impostor.start()
    try:
        result = await send(sender(Names({HOST: ["127.0.0.1"]})), f"https://{HOST}:{impostor.port}/in")
    finally:
        await impostor.stop()
    assert (result.delivered, result.error_kind) == (False, "tls")
    assert impostor.requests == []


async def test_a_redirect_is_not_followed_and_a_long_answer_is_read_only_up_to_the_bound(
        tls_receiver: Receiver) -> None:
    names = Names({HOST: ["127.0.0.1"]})
    await tls_receiver.set_mode(REDIRECT)
    redirected = await send(sender(names), f"https://{HOST}:{tls_receiver.port}/in")
    assert (redirected.delivered, redirected.response_status) == (False, 302)
    assert len(tls_receiver.requests) == 1
    await tls_receiver.set_mode(HUGE)
    huge = await send(sender(names), f"https://{HOST}:{tls_receiver.port}/in")
    assert huge.response_status == 200 and len(huge.response_body.encode()) <= 1024
    assert MAX_RESPONSE_BYTES == 64 * 1024
    await tls_receiver.set_mode(OK)
