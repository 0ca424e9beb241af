"""Liveness, readiness and Prometheus metrics. Public: they reveal no tenant data."""
from __future__ import annotations

import asyncio

import grpc
from fastapi import APIRouter, Request, Response
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.models import Health
from gateway.problems import PROBLEM_CONTENT, ProblemError
from gateway.state import gateway_state
from onecard.codegen.v1 import codegen_pb2
from onecard.devicehub.v1 import devicehub_pb2
from onecard.identity.v1 import identity_pb2
from onecard.ledger.v1 import ledger_pb2
from onecard.policy.v1 import policy_pb2
from onecard.webhooks.v1 import webhooks_pb2

router = APIRouter(tags=["operations"])

IDENTITY_SERVICE = identity_pb2.DESCRIPTOR.services_by_name["IdentityService"].full_name
CODEGEN_SERVICE = codegen_pb2.DESCRIPTOR.services_by_name["CodegenService"].full_name
LEDGER_SERVICE = ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"].full_name
POLICY_SERVICE = policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name
DEVICEHUB_SERVICE = devicehub_pb2.DESCRIPTOR.services_by_name["DeviceAdminService"].full_name
WEBHOOKS_SERVICE = webhooks_pb2.DESCRIPTOR.services_by_name["WebhookService"].full_name


async def _serving(stub: health_pb2_grpc.HealthStub | None, *, service: str, timeout_s: float) -> bool:
    if stub is None:
        return False
    try:
        answer = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    except grpc.aio.AioRpcError:
        return False
    return answer.status == health_pb2.HealthCheckResponse.SERVING


@router.get("/healthz", response_model=Health, summary="The gateway process is up")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    summary="The gateway can serve: the gRPC health of every upstream (identity, codegen and, when "
    "configured, the ledger, policy and the device hub) is SERVING",
    responses={503: {"description": "An upstream is not serving; `not_ready` names which",
                     "content": PROBLEM_CONTENT}},
)
async def readyz(request: Request) -> Health:
    state = gateway_state(request)
    if state.health_stub is None or state.codegen_health_stub is None:
        raise ProblemError(status=503, reason="NOT_READY", detail="the gateway is starting or stopping")
    timeout_s = state.settings.ready_timeout_s
    # Asked together, so one upstream that does not answer costs one timeout, not one each.
    upstreams = {"identity": (state.health_stub, IDENTITY_SERVICE),
                 "codegen": (state.codegen_health_stub, CODEGEN_SERVICE)}
    if state.settings.ledger_target:
        upstreams["ledger"] = (state.ledger_health_stub, LEDGER_SERVICE)
    if state.settings.policy_target:
        upstreams["policy"] = (state.policy_health_stub, POLICY_SERVICE)
    if state.settings.devicehub_target:
        upstreams["devicehub"] = (state.devicehub_health_stub, DEVICEHUB_SERVICE)
    if state.settings.webhooks_target:
        upstreams["webhooks"] = (state.webhooks_health_stub, WEBHOOKS_SERVICE)
    answers = await asyncio.gather(*(_serving(stub, service=service, timeout_s=timeout_s)
                                     for stub, service in upstreams.values()))
    not_ready = [name for name, serving in zip(upstreams, answers, strict=True) if not serving]
    if not_ready:
        raise ProblemError(status=503, reason="NOT_READY", detail=f"not serving: {', '.join(not_ready)}",
                           headers={"Retry-After": "1"}, extra={"not_ready": not_ready})
    return Health(status="ready")


@router.get("/metrics", include_in_schema=False)
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
