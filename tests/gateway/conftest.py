"""The gateway in this process, in front of the real identity service (the ``identity`` fixture)
and, for the routes that need them, a real codegen, a real ledger, a real policy service and a real device hub,
reached through httpx's ASGI transport with the app's lifespan running.

Tenants and API clients are made directly through identity's gRPC stub, as an operator's tooling
would; everything a partner does goes through HTTP.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from gateway.app import create_app
from gateway.auth import (
    CLIENTS_ADMIN,
    CODES_ADMIN,
    CODES_ISSUE,
    DATA_READ,
    DEVICES_ADMIN,
    DEVICES_SYNC,
    LEDGER_ADMIN,
    MEMBERS_BIND,
    MEMBERS_CODE_PAGE,
    MEMBERS_READ,
    MEMBERS_SELF_SERVICE,
    MEMBERS_WRITE,
    PAYMENTS_CREATE,
    POLICY_ADMIN,
    STATEMENTS_READ,
    WALLETS_READ,
    WALLETS_TOPUP,
    WEBHOOKS_MANAGE,
)
from gateway.settings import GatewaySettings
from onecard.identity.v1 import identity_pb2 as pb
from tests.mesh import service_values

TOKEN_SECRET = "gateway-tests-token-secret-0123456789abcdef"
TENANT_SCOPES = (MEMBERS_READ, MEMBERS_WRITE, CLIENTS_ADMIN, CODES_ISSUE, DEVICES_SYNC, CODES_ADMIN, WALLETS_READ,
                 WALLETS_TOPUP, LEDGER_ADMIN, STATEMENTS_READ, POLICY_ADMIN, PAYMENTS_CREATE, DEVICES_ADMIN, DATA_READ,
                 MEMBERS_BIND, MEMBERS_SELF_SERVICE, WEBHOOKS_MANAGE, MEMBERS_CODE_PAGE)
BASE_URL = "http://gateway.test"
# Where gateways without a codegen in the test send code calls: nothing listens there.
NO_CODEGEN_TARGET = "127.0.0.1:1"
# High enough that no test but the rate-limit one ever meets a limit.
GENEROUS_RATE = 10_000.0


def gateway_settings(*, identity_target: str, codegen_target: str = NO_CODEGEN_TARGET, ledger_target: str = "",
                     policy_target: str = "", devicehub_target: str = "", webhooks_target: str = "",
                     **overrides: Any) -> GatewaySettings:
    values: dict[str, Any] = {
        "identity_target": identity_target,
        "codegen_target": codegen_target,
        # Empty: no ledger behind the gateway (its routes answer 503, /readyz leaves it out).
        "ledger_target": ledger_target,
        # Likewise for policy (503 POLICY_NOT_CONFIGURED).
        "policy_target": policy_target,
        # Likewise for the device hub (503 DEVICEHUB_NOT_CONFIGURED).
        "devicehub_target": devicehub_target,
        # Likewise for webhooks (503 WEBHOOKS_NOT_CONFIGURED).
        "webhooks_target": webhooks_target,
        "token_secret": TOKEN_SECRET,
        "rate_limit_per_s": GENEROUS_RATE,
        "rate_limit_burst": int(GENEROUS_RATE),
        "token_rate_limit_per_s": GENEROUS_RATE,
        "token_rate_limit_burst": int(GENEROUS_RATE),
        "identity_timeout_s": 10.0,
        # No partner gRPC port unless a test asks for one (tests/gateway/test_partner_grpc.py).
        "partner_grpc_port": 0,
        **service_values("gateway"),
    }
    values.update(overrides)
    return GatewaySettings(**values)


@asynccontextmanager
async def running_gateway(settings: GatewaySettings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
            yield app, client


@dataclass(frozen=True)
class ClientCredentials:
    client_id: str
    client_secret: str


@dataclass
class Gateway:
    app: FastAPI
    http: httpx.AsyncClient
    stub: Any
    settings: GatewaySettings

    async def create_tenant(self, *, name: str = "Test University", kind: int = pb.TENANT_KIND_UNIVERSITY) -> str:
        answer = await self.stub.CreateTenant(
            pb.CreateTenantRequest(name=name, kind=kind, time_zone="Asia/Shanghai", currency="CNY")
        )
        return answer.tenant.tenant_id

    async def create_client(
        self, *, tenant_id: str, scopes: tuple[str, ...] | list[str], name: str = "partner"
    ) -> ClientCredentials:
        answer = await self.stub.CreateApiClient(
            pb.CreateApiClientRequest(
                name=name, scopes=list(scopes), grants=[pb.TenantGrant(tenant_id=tenant_id, scopes=list(scopes))]
            )
        )
        return ClientCredentials(answer.client.client_id, answer.client_secret)

    async def request_token(self, *, tenant_id: str, credentials: ClientCredentials, **form: str) -> httpx.Response:
        return await self.http.post(
            "/v1/oauth/token",
            data={
                "grant_type": "client_credentials",
                "tenant_id": tenant_id,
                "client_id": credentials.client_id,
                "client_secret": credentials.client_secret,
                **form,
            },
        )

    async def token(self, *, tenant_id: str, credentials: ClientCredentials) -> str:
        response = await self.request_token(tenant_id=tenant_id, credentials=credentials)
        assert response.status_code == 200, response.text
        return response.json()["access_token"]

    async def tenant_access(
        self, *, tenant_id: str | None = None, scopes: tuple[str, ...] | list[str] = TENANT_SCOPES
    ) -> TenantAccess:
        """A tenant (new unless given) and a token for a new client holding ``scopes`` in it."""
        tenant_id = tenant_id or await self.create_tenant()
        credentials = await self.create_client(tenant_id=tenant_id, scopes=scopes)
        token = await self.token(tenant_id=tenant_id, credentials=credentials)
        return TenantAccess(tenant_id=tenant_id, credentials=credentials, token=token)


@dataclass(frozen=True)
class TenantAccess:
    tenant_id: str
    credentials: ClientCredentials
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@pytest.fixture
async def gateway(identity: Any) -> AsyncIterator[Gateway]:
    settings = gateway_settings(identity_target=identity.target)
    async with running_gateway(settings) as (app, http):
        yield Gateway(app=app, http=http, stub=identity.stub, settings=settings)


@pytest.fixture
async def codegen_service(launch: Any, identity: Any, database_url: str, nats_url: str) -> Any:
    """A real codegen beside the test's identity (started here, stopped after the test)."""
    from onecard.codegen.v1 import codegen_pb2_grpc
    from services.codegen.app import build_app
    from tests.codegen.conftest import codegen_settings

    return await launch(build_app(codegen_settings(database_url=database_url, nats_url=nats_url,
                                                   identity_target=identity.target)),
                        stub_cls=codegen_pb2_grpc.CodegenServiceStub)


@pytest.fixture
async def codes_gateway(identity: Any, codegen_service: Any) -> AsyncIterator[Gateway]:
    """The gateway in front of identity and a real codegen."""
    settings = gateway_settings(identity_target=identity.target, codegen_target=codegen_service.target)
    async with running_gateway(settings) as (app, http):
        gateway = Gateway(app=app, http=http, stub=identity.stub, settings=settings)
        gateway.codegen_stub = codegen_service.stub  # type: ignore[attr-defined]
        yield gateway


@pytest.fixture
async def ledger_service(launch: Any, database_url: str, nats_url: str) -> Any:
    """A real ledger beside the test's identity (started here, stopped after the test)."""
    from onecard.ledger.v1 import ledger_pb2_grpc
    from services.ledger.app import build_app
    from tests.ledger.conftest import ledger_settings

    return await launch(build_app(ledger_settings(database_url=database_url, nats_url=nats_url)),
                        stub_cls=ledger_pb2_grpc.LedgerServiceStub)


@pytest.fixture
async def ledger_gateway(identity: Any, ledger_service: Any) -> AsyncIterator[Gateway]:
    """The gateway in front of identity and a real ledger (its stub at ``.ledger_stub``)."""
    settings = gateway_settings(identity_target=identity.target, ledger_target=ledger_service.target)
    async with running_gateway(settings) as (app, http):
        gateway = Gateway(app=app, http=http, stub=identity.stub, settings=settings)
        gateway.ledger_stub = ledger_service.stub  # type: ignore[attr-defined]
        yield gateway


@pytest.fixture
async def policy_service(launch: Any, database_url: str, nats_url: str, ledger_service: Any) -> Any:
    """A real policy service reading the test's ledger (started here, stopped after the test)."""
    from onecard.policy.v1 import policy_pb2_grpc
    from services.policy.app import build_app
    from tests.policy_service.conftest import policy_settings

    return await launch(build_app(policy_settings(database_url=database_url, nats_url=nats_url,
                                                  ledger_target=ledger_service.target)),
                        stub_cls=policy_pb2_grpc.PolicyServiceStub)


@pytest.fixture
async def policy_gateway(identity: Any, ledger_service: Any, policy_service: Any) -> AsyncIterator[Gateway]:
    """The gateway in front of identity, the ledger and policy (stubs at ``.ledger_stub``, ``.policy_stub``)."""
    settings = gateway_settings(identity_target=identity.target, ledger_target=ledger_service.target,
                                policy_target=policy_service.target)
    async with running_gateway(settings) as (app, http):
        gateway = Gateway(app=app, http=http, stub=identity.stub, settings=settings)
        gateway.ledger_stub = ledger_service.stub  # type: ignore[attr-defined]
        gateway.policy_stub = policy_service.stub  # type: ignore[attr-defined]
        yield gateway


@pytest.fixture
async def devicehub_service(launch: Any, database_url: str, nats_url: str, identity: Any, codegen_service: Any,
                            ledger_service: Any, policy_service: Any) -> Any:
    """A real device hub beside the test's identity, codegen, ledger and policy (started here,
    stopped after the test); its admin stub at ``.stub``, its ServiceApp (and pool) at ``.app``."""
    from onecard.devicehub.v1 import devicehub_pb2_grpc
    from services.devicehub.app import DevicehubSettings, build_app

    settings = DevicehubSettings(nats_url=nats_url, health_interval_s=0.2,
                                 identity_target=identity.target, codegen_target=codegen_service.target,
                                 ledger_target=ledger_service.target, policy_target=policy_service.target,
                                 **service_values("devicehub", database_url))
    return await launch(build_app(settings), stub_cls=devicehub_pb2_grpc.DeviceAdminServiceStub)


@pytest.fixture
async def devices_gateway(identity: Any, codegen_service: Any, ledger_service: Any, policy_service: Any,
                          devicehub_service: Any) -> AsyncIterator[Gateway]:
    """The gateway in front of identity, codegen, the ledger, policy and the device hub (the hub's
    admin stub at ``.devicehub_stub``, the running hub at ``.devicehub``)."""
    settings = gateway_settings(identity_target=identity.target, codegen_target=codegen_service.target,
                                ledger_target=ledger_service.target, policy_target=policy_service.target,
                                devicehub_target=devicehub_service.target)
    async with running_gateway(settings) as (app, http):
        gateway = Gateway(app=app, http=http, stub=identity.stub, settings=settings)
        gateway.ledger_stub = ledger_service.stub  # type: ignore[attr-defined]
        gateway.policy_stub = policy_service.stub  # type: ignore[attr-defined]
        gateway.devicehub_stub = devicehub_service.stub  # type: ignore[attr-defined]
        gateway.devicehub = devicehub_service  # type: ignore[attr-defined]
        yield gateway


@pytest.fixture
async def webhooks_service(launch: Any, database_url: str, nats_url: str, ledger_service: Any) -> Any:
    """A real webhooks service reading the test's ledger (plain http to loopback allowed, as on a
    development stack)."""
    from onecard.webhooks.v1 import webhooks_pb2_grpc
    from services.webhooks.app import build_app
    from tests.webhooks.conftest import webhooks_settings

    return await launch(build_app(webhooks_settings(database_url=database_url, nats_url=nats_url,
                                                    ledger_target=ledger_service.target)),
                        stub_cls=webhooks_pb2_grpc.WebhookServiceStub)


@pytest.fixture
async def platform_gateway(identity: Any, codegen_service: Any, ledger_service: Any, policy_service: Any,
                           devicehub_service: Any, webhooks_service: Any) -> AsyncIterator[Gateway]:
    """The gateway in front of identity, codegen, the ledger, policy, the device hub and webhooks:
    every route has its service."""
    settings = gateway_settings(identity_target=identity.target, codegen_target=codegen_service.target,
                                ledger_target=ledger_service.target, policy_target=policy_service.target,
                                devicehub_target=devicehub_service.target, webhooks_target=webhooks_service.target)
    async with running_gateway(settings) as (app, http):
        gateway = Gateway(app=app, http=http, stub=identity.stub, settings=settings)
        gateway.codegen_stub = codegen_service.stub  # type: ignore[attr-defined]
        gateway.ledger_stub = ledger_service.stub  # type: ignore[attr-defined]
        gateway.policy_stub = policy_service.stub  # type: ignore[attr-defined]
        gateway.devicehub_stub = devicehub_service.stub  # type: ignore[attr-defined]
        gateway.devicehub = devicehub_service  # type: ignore[attr-defined]
        gateway.webhooks_stub = webhooks_service.stub  # type: ignore[attr-defined]
        yield gateway


def assert_problem(response: httpx.Response, status: int, *, reason: str | None = None) -> dict[str, Any]:
    """The response is an RFC 9457 problem with this status (and reason), carrying the request id."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json", response.headers
    body = response.json()
    assert body["status"] == status
    assert body["type"].startswith("urn:onecard:problem:")
    assert body["title"]
    assert body["instance"] == response.request.url.path
    assert body["request_id"] == response.headers["x-request-id"]
    if reason is not None:
        assert body["reason"] == reason, body
    return body
