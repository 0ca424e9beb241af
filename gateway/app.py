"""``create_app(settings=...)``: the FastAPI application, its lifespan and its request middleware."""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import structlog
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from grpc_health.v1 import health_pb2_grpc
from prometheus_client import Counter, Histogram
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.auth import known_scopes
from gateway.console.routes import install as install_console
from gateway.grants import Grant, GrantCache
from gateway.identity_events import follow_grant_events
from gateway.partner_grpc import bind_partner_rpcs, start_partner_server
from gateway.partner_grpc import server_credentials as partner_credentials
from gateway.problems import Problem, install_problem_handlers, problem_response
from gateway.ratelimit import SignInThrottle, TokenBucketLimiter
from gateway.routes import (codepage, codes, devices, identity, ledger, miniprogram, oauth, ops, policy,
                            reconciliation, webhooks)
from gateway.settings import GatewaySettings
from gateway.state import GatewayState
from onecard.codegen.v1 import codegen_pb2_grpc
from onecard.devicehub.v1 import devicehub_pb2_grpc
from onecard.identity.v1 import identity_pb2, identity_pb2_grpc
from onecard.ledger.v1 import ledger_pb2_grpc
from onecard.policy.v1 import policy_pb2_grpc
from onecard.webhooks.v1 import webhooks_pb2_grpc
from runtime.grpc_client import open_channel
from runtime.mesh import load_tls
from runtime.logs import get_logger, request_id_or_new

log = get_logger(__name__)

API_VERSION = "1.0.0"
REQUEST_ID_HEADER = "X-Request-Id"
# The largest body any route takes: an 8 MiB CSV plus multipart framing.
MAX_BODY_BYTES = 8 * 1024 * 1024 + 64 * 1024
UNMATCHED_ROUTE = "unmatched"

HTTP_REQUESTS = Counter("onecard_http_requests_total", "HTTP requests answered", ["method", "route", "status"])
HTTP_SECONDS = Histogram("onecard_http_request_duration_seconds", "HTTP request duration", ["method", "route"])

OPENAPI_TAGS = [
    {"name": "oauth", "description": "Access tokens (OAuth2 client credentials)."},
    {"name": "tenants", "description": "Schools and companies using onecard."},
    {"name": "members", "description": "People of a tenant, their status and groups."},
    {"name": "media", "description": "Cards and face enrolment of a member; the card blacklist."},
    {"name": "imports", "description": "Bulk member import from CSV."},
    {"name": "directory", "description": "The feed of member changes, for partners who mirror the directory."},
    {"name": "api-clients", "description": "Partner API clients this tenant granted access to."},
    {"name": "codes", "description": "Offline e-codes: credentials and rotating tokens for members; the trust "
     "and revocation lists devices sync; the tenant's code settings, issuer key rotation and revocation "
     "(codes:admin). Banks embedding the e-code may call codegen's gRPC API "
     "(protos/onecard/codegen/v1) with the same semantics."},
    {"name": "wallets", "description": "Members' purses: balances, history, \"did this pay?\" (wallets:read); "
     "bank top-ups (wallets:topup)."},
    {"name": "ledger", "description": "The tenant's ledger administration (ledger:admin): accounts, refunds, "
     "freezing, subsidy programs, grant batches, clawbacks, the trial balance."},
    {"name": "statements", "description": "A merchant's or a device's daily statement (statements:read)."},
    {"name": "policy", "description": "The tenant's spending rules (policy:admin): rule-set versions, validation, "
     "publishing, dry runs of a payment against a version or the published rules."},
    {"name": "policy-bundle", "description": "The published rules signed for devices, and the keys to check them "
     "(devices:sync)."},
    {"name": "payments", "description": "App-initiated payments under the published rules (payments:create)."},
    {"name": "devices", "description": "The tenant's POS terminals, gates, shuttle readers, cabinets and kiosks "
     "(devices:admin): registration and one-time enrolment tokens, updates, decommissioning."},
    {"name": "alarms", "description": "The fleet's alarms (devices:admin): list, acknowledge, clear."},
    {"name": "access", "description": "Access rules of gates and shuttle readers, and the pass/deny records "
     "attendance comes from (devices:admin)."},
    {"name": "rollouts", "description": "Firmware and config rollouts to a device group in stages (devices:admin)."},
    {"name": "data", "description": "The data API (data:read): the real-time dining index per canteen."},
    {"name": "webhooks", "description": "The calling client's webhook endpoints (webhooks:manage): register, "
     "change, rotate secrets, the delivery log and redelivery (docs/webhooks.md)."},
    {"name": "miniprograms", "description": "Mini-program backends: the calling client's external user ids bound "
     "to members (members:bind), and self-service for a bound member: freeze, report a card lost, PIN, unfreeze "
     "with the PIN (members:self-service). See docs/miniprograms.md."},
    {"name": "code page", "description": "The member code page (/m/): a partner's one-time link for a member "
     "(members:code-page), which the page trades once for a member token that calls only that member's routes "
     "(marked x-onecard-member-token). See docs/partners.md."},
    {"name": "operations", "description": "Health of the gateway and what it depends on."},
]
API_DESCRIPTION = """\
The HTTP API of onecard. Get an access token with OAuth2 client credentials at
`POST /v1/oauth/token`, then call the tenant's routes with `Authorization: Bearer <token>`.
Every error is `application/problem+json` (RFC 9457) with a stable `reason` and the `request_id`.
"""


class BodyTooLarge(StarletteHTTPException):
    """Raised from ``receive`` so that whoever is reading the body stops and a 413 is answered."""

    def __init__(self) -> None:
        super().__init__(status_code=413, detail=f"the request body is larger than {MAX_BODY_BYTES} bytes")


class RequestContextMiddleware:
    """Per request: the request id (header, logs, gRPC metadata), a body size cap, metrics, an
    access log line, and the last word on unexpected exceptions (a bare 500 problem, logged)."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int = MAX_BODY_BYTES):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        offered = headers.get(REQUEST_ID_HEADER, "")
        request_id = request_id_or_new(offered)
        scope.setdefault("state", {})["request_id"] = request_id
        started_s = time.perf_counter()
        response_status = 500
        response_started = False

        async def send_with_request_id(message: Message) -> None:
            nonlocal response_status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                response_status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        received_bytes = 0

        async def receive_with_limit() -> Message:
            nonlocal received_bytes
            message = await receive()
            if message["type"] == "http.request":
                received_bytes += len(message.get("body", b""))
                if received_bytes > self.max_body_bytes:
                    raise BodyTooLarge()
            return message

        # The log context of this request only: restored afterwards, so nothing bound here (the
        # request id, the client id bound by authorize) leaks into the next request on this task.
        outer_context = structlog.contextvars.get_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        try:
            declared = headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self.max_body_bytes:
                response = problem_response(Request(scope), status=413, reason="PAYLOAD_TOO_LARGE",
                                            detail=BodyTooLarge().detail)
                await response(scope, receive, send_with_request_id)
                return
            await self.app(scope, receive_with_limit, send_with_request_id)
        except Exception:  # noqa: BLE001 - the caller gets a bare 500, the operator the traceback
            log.exception("unhandled error", method=scope["method"], route=_route_of(scope))
            if not response_started:
                response = problem_response(Request(scope), status=500, reason="INTERNAL")
                await response(scope, receive, send_with_request_id)
        finally:
            route = _route_of(scope)
            elapsed_s = time.perf_counter() - started_s
            HTTP_REQUESTS.labels(scope["method"], route, str(response_status)).inc()
            HTTP_SECONDS.labels(scope["method"], route).observe(elapsed_s)
            # The route template, never the raw path or query: those carry member ids and names.
            log.info(
                "http request",
                method=scope["method"],
                route=route,
                status=response_status,
                duration_ms=round(elapsed_s * 1000, 1),
                client_id=scope["state"].get("client_id"),
            )
            structlog.contextvars.clear_contextvars()
            structlog.contextvars.bind_contextvars(**outer_context)


def _route_of(scope: Scope) -> str:
    route = scope.get("route")
    return getattr(route, "path", None) or UNMATCHED_ROUTE


def _openapi_with_problem_schema(app: FastAPI) -> dict[str, Any]:
    """The generated document plus the Problem schema, which error responses refer to."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
            tags=app.openapi_tags,
        )
        problem = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
        schema.setdefault("components", {}).setdefault("schemas", {})["Problem"] = problem
        app.openapi_schema = schema
    return app.openapi_schema


async def _grant_from_identity(state: GatewayState, tenant_id: str, client_id: str) -> Grant | None:
    """What identity says of the client's grant in the tenant now; None when there is none."""
    try:
        answer = await state.identity.GetTenantGrant(
            identity_pb2.GetTenantGrantRequest(tenant_id=tenant_id, client_id=client_id), timeout=state.timeout_s)
    except grpc.aio.AioRpcError as exc:
        if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
            return None
        raise
    return Grant(version=answer.grant_version, scopes=known_scopes(answer.scopes))


def create_app(settings: GatewaySettings) -> FastAPI:
    async def fetch_grant(tenant_id: str, client_id: str) -> Grant | None:
        return await _grant_from_identity(state, tenant_id, client_id)

    state = GatewayState(
        settings=settings,
        client_limiter=TokenBucketLimiter(rate_per_s=settings.rate_limit_per_s, burst=settings.rate_limit_burst),
        token_limiter=TokenBucketLimiter(
            rate_per_s=settings.token_rate_limit_per_s, burst=settings.token_rate_limit_burst
        ),
        sign_ins=SignInThrottle(
            free_failures=settings.token_free_failures, backoff_base_s=settings.token_backoff_base_s,
            backoff_max_s=settings.token_backoff_max_s, client_failure_burst=settings.token_client_failure_burst,
            client_failures_per_s=settings.token_client_failures_per_s,
            known_address_ttl_s=settings.token_known_address_ttl_s,
        ),
        grants=GrantCache(fetch=fetch_grant, recheck_s=settings.grant_recheck_s),
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # The one place the service channels are opened and closed. They connect lazily, so the
        # gateway starts while the services are still coming up; /readyz tells when both answer.
        tls = load_tls(settings)
        channel = open_channel(settings.identity_target, tls=tls, server_name="identity")
        codegen_channel = open_channel(settings.codegen_target, tls=tls, server_name="codegen")
        state.channel = channel
        state.identity_stub = identity_pb2_grpc.IdentityServiceStub(channel)
        state.health_stub = health_pb2_grpc.HealthStub(channel)
        state.codegen_channel = codegen_channel
        state.codegen_stub = codegen_pb2_grpc.CodegenServiceStub(codegen_channel)
        state.codegen_health_stub = health_pb2_grpc.HealthStub(codegen_channel)
        ledger_channel = (open_channel(settings.ledger_target, tls=tls, server_name="ledger")
                          if settings.ledger_target else None)
        if ledger_channel is not None:
            state.ledger_channel = ledger_channel
            state.ledger_stub = ledger_pb2_grpc.LedgerServiceStub(ledger_channel)
            state.ledger_health_stub = health_pb2_grpc.HealthStub(ledger_channel)
        policy_channel = (open_channel(settings.policy_target, tls=tls, server_name="policy")
                          if settings.policy_target else None)
        if policy_channel is not None:
            state.policy_channel = policy_channel
            state.policy_stub = policy_pb2_grpc.PolicyServiceStub(policy_channel)
            state.policy_health_stub = health_pb2_grpc.HealthStub(policy_channel)
        devicehub_channel = (open_channel(settings.devicehub_target, tls=tls, server_name="devicehub")
                             if settings.devicehub_target else None)
        if devicehub_channel is not None:
            state.devicehub_channel = devicehub_channel
            state.devicehub_stub = devicehub_pb2_grpc.DeviceAdminServiceStub(devicehub_channel)
            state.devicehub_health_stub = health_pb2_grpc.HealthStub(devicehub_channel)
        webhooks_channel = (open_channel(settings.webhooks_target, tls=tls, server_name="webhooks")
                            if settings.webhooks_target else None)
        if webhooks_channel is not None:
            state.webhooks_channel = webhooks_channel
            state.webhooks_stub = webhooks_pb2_grpc.WebhookServiceStub(webhooks_channel)
            state.webhooks_health_stub = health_pb2_grpc.HealthStub(webhooks_channel)
        # Identity's grant events over NATS, when configured: a revoked grant's tokens stop at once
        # (without them, at the next re-check).
        grant_events = None
        if settings.nats_url:
            grant_events = asyncio.create_task(follow_grant_events(
                url=settings.nats_url, seed=settings.nats_seed.get_secret_value() if settings.nats_seed else None,
                tls=tls, tls_name=settings.nats_tls_name, grants=state.grants), name="grant-events")
        # The public gRPC API for partners on its own port (gateway.partner_grpc), if configured.
        partner = None
        if settings.partner_grpc_port:
            partner = await start_partner_server(
                _app, state, host=settings.partner_grpc_host or settings.http_host, port=settings.partner_grpc_port,
                credentials=partner_credentials(partner_tls_dir=settings.partner_tls_dir, mesh_tls=tls))
            state.partner_grpc_port = partner.port
        log.info("gateway started", identity_target=settings.identity_target, codegen_target=settings.codegen_target,
                 ledger_target=settings.ledger_target or None, policy_target=settings.policy_target or None,
                 devicehub_target=settings.devicehub_target or None, grant_events=bool(settings.nats_url),
                 grant_recheck_s=settings.grant_recheck_s)
        try:
            yield
        finally:
            if partner is not None:
                await partner.stop()
                state.partner_grpc_port = None
            if grant_events is not None:
                grant_events.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await grant_events
            state.identity_stub = None
            state.health_stub = None
            state.channel = None
            state.codegen_stub = None
            state.codegen_health_stub = None
            state.codegen_channel = None
            state.ledger_stub = None
            state.ledger_health_stub = None
            state.ledger_channel = None
            state.policy_stub = None
            state.policy_health_stub = None
            state.policy_channel = None
            state.devicehub_stub = None
            state.devicehub_health_stub = None
            state.devicehub_channel = None
            state.webhooks_stub = None
            state.webhooks_health_stub = None
            state.webhooks_channel = None
            if webhooks_channel is not None:
                await webhooks_channel.close()
            if devicehub_channel is not None:
                await devicehub_channel.close()
            if policy_channel is not None:
                await policy_channel.close()
            if ledger_channel is not None:
                await ledger_channel.close()
            await codegen_channel.close()
            await channel.close()
            log.info("gateway stopped")

    app = FastAPI(
        title="onecard API",
        version=API_VERSION,
        description=API_DESCRIPTION,
        openapi_tags=OPENAPI_TAGS,
        docs_url="/docs",
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.gateway = state
    install_problem_handlers(app)
    app.include_router(oauth.router)
    # Before identity's: its /members/by-external-user must win over /members/{member_id}.
    app.include_router(miniprogram.router)
    app.include_router(identity.router)
    app.include_router(codes.router)
    app.include_router(ledger.router)
    app.include_router(reconciliation.router)
    app.include_router(policy.router)
    app.include_router(devices.router)
    app.include_router(webhooks.router)
    app.include_router(ops.router)
    app.include_router(codepage.router)
    # The operations console (/console): pages over the same REST API (gateway.console).
    install_console(app)
    app.add_middleware(RequestContextMiddleware)
    app.openapi = lambda: _openapi_with_problem_schema(app)  # type: ignore[method-assign]
    # Every partner rpc has its REST twin in this app, or the gateway does not start.
    bind_partner_rpcs(app)
    return app
