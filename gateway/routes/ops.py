"""Liveness, readiness and Prometheus metrics. Public: they reveal no tenant data."""
from __future__ import annotations

import grpc
from fastapi import APIRouter, Request, Response
from grpc_health.v1 import health_pb2
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.models import Health
from gateway.problems import PROBLEM_CONTENT, ProblemError
from gateway.state import gateway_state
from onecard.identity.v1 import identity_pb2

router = APIRouter(tags=["operations"])

IDENTITY_SERVICE = identity_pb2.DESCRIPTOR.services_by_name["IdentityService"].full_name


@router.get("/healthz", response_model=Health, summary="The gateway process is up")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    summary="The gateway can serve: identity's gRPC health is SERVING",
    responses={503: {"description": "A dependency is not serving", "content": PROBLEM_CONTENT}},
)
async def readyz(request: Request) -> Health:
    state = gateway_state(request)
    if state.health_stub is None:
        raise ProblemError(status=503, reason="NOT_READY", detail="the gateway is starting or stopping")
    try:
        answer = await state.health_stub.Check(
            health_pb2.HealthCheckRequest(service=IDENTITY_SERVICE), timeout=state.settings.ready_timeout_s
        )
        serving = answer.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.aio.AioRpcError:
        serving = False
    if not serving:
        raise ProblemError(status=503, reason="NOT_READY", detail="identity is not serving",
                           headers={"Retry-After": "1"})
    return Health(status="ready")


@router.get("/metrics", include_in_schema=False)
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
