"""REST for webhooks: ``onecard.webhooks.v1.WebhookService`` as a partner manages its own
endpoints (``webhooks:manage``). Each handler only translates: the client and its scopes in the
tenant come from the token and are passed on, so the service decides which event types the client
may subscribe to, whether it may allow private targets (``clients:admin``) and which endpoints are
its own (another client's are 404). Writes that make something carry an ``Idempotency-Key``.
"""
from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Path, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from gateway.auth import ManageWebhooks, Principal
from gateway.models import TenantId, enum_name, or_none, timestamp
from gateway.problems import problem_responses
from gateway.routes.ledger import IdempotencyKeyHeader, _key
from gateway.state import State
from onecard.webhooks.v1 import webhooks_pb2 as pb
from runtime.idempotency import client_scope

router = APIRouter(responses=problem_responses(400, 401, 403, 404, 409, 422, 429, 503, 504), tags=["webhooks"])

EventTypeName = Literal["payment.booked", "refund.booked", "topup.booked", "member.frozen", "member.unfrozen",
                        "member.left", "card.lost", "offline.shortfall", "grant_batch.finished", "balance.low",
                        "device.alarm"]
EndpointStateName = Literal["enabled", "disabled", "disabled_failing", "disabled_grant_revoked", "deleted"]
DeliveryStatusName = Literal["pending", "delivered", "failed", "dropped"]
EndpointId = Annotated[str, Path(min_length=1, max_length=64, description="A webhook endpoint of the calling client.")]
DeliveryId = Annotated[str, Path(min_length=1, max_length=64, description="A delivery to one of the client's endpoints.")]
MAX_URL_CHARS = 2048
MAX_DESCRIPTION_CHARS = 500
MAX_PAGE_SIZE = 200
MAX_CURSOR_CHARS = 64
MAX_OVERLAP_S = 7 * 24 * 3600


class SecretOut(BaseModel):
    secret_id: str
    created_at: datetime | None
    expires_at: datetime | None = Field(description="null while current; after a rotation, when it stops signing.")


class EndpointOut(BaseModel):
    endpoint_id: str
    url: str
    event_types: list[str]
    description: str | None
    state: EndpointStateName
    allow_private_targets: bool
    disabled_reason: str | None
    disabled_at: datetime | None
    failing_since: datetime | None
    created_at: datetime | None
    updated_at: datetime | None
    secrets: list[SecretOut]


class EndpointWithSecret(EndpointOut):
    secret: str = Field(description="`whsec_` + base64: shown here only (and to a repeat of the same Idempotency-Key).")


def _endpoint(e: pb.Endpoint) -> dict[str, Any]:
    return dict(endpoint_id=e.endpoint_id, url=e.url, event_types=list(e.event_types), description=or_none(e.description),
                state=enum_name(pb.EndpointState, value=e.state), allow_private_targets=e.allow_private_targets,
                disabled_reason=or_none(e.disabled_reason), disabled_at=timestamp(e.disabled_at),
                failing_since=timestamp(e.failing_since), created_at=timestamp(e.created_at),
                updated_at=timestamp(e.updated_at),
                secrets=[SecretOut(secret_id=s.secret_id, created_at=timestamp(s.created_at),
                                   expires_at=timestamp(s.expires_at)) for s in e.secrets])


class EndpointIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "url": "https://hooks.bank.example/onecard", "event_types": ["payment.booked", "topup.booked"]}]})

    url: str = Field(min_length=1, max_length=MAX_URL_CHARS)
    event_types: list[EventTypeName] = Field(min_length=1, max_length=20)
    description: str = Field(default="", max_length=MAX_DESCRIPTION_CHARS)
    allow_private_targets: bool = Field(default=False, description="Private address ranges as targets; needs "
                                        "clients:admin (the tenant's administrator).")


class EndpointPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(default=None, min_length=1, max_length=MAX_URL_CHARS)
    event_types: list[EventTypeName] | None = Field(default=None, min_length=1, max_length=20)
    description: str | None = Field(default=None, max_length=MAX_DESCRIPTION_CHARS)
    enabled: bool | None = None
    allow_private_targets: bool | None = None


class EndpointPage(BaseModel):
    endpoints: list[EndpointOut]
    next_page_token: str | None


class RotateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    overlap_s: int = Field(default=0, ge=0, le=MAX_OVERLAP_S, description="How long the old secret keeps signing; "
                           "0: the service's default (24 h), which is also the most.")


class AttemptOut(BaseModel):
    attempt: int
    started_at: datetime | None
    latency_ms: int
    response_status: int | None
    error_kind: str | None = Field(description="connect, timeout, tls, target_refused, target_not_resolved, error; "
                                   "null when a response came.")
    response_body: str | None = Field(description="At most 1 KiB of the answer.")


class DeliveryOut(BaseModel):
    delivery_id: str
    endpoint_id: str
    message_id: str = Field(description="The webhook-id header.")
    event_type: str
    status: DeliveryStatusName
    attempts: int
    created_at: datetime | None
    next_attempt_at: datetime | None
    finished_at: datetime | None
    redelivery_of: str | None
    payload: dict[str, Any] | None = None
    attempt_log: list[AttemptOut] | None = None


class DeliveryPage(BaseModel):
    deliveries: list[DeliveryOut]
    next_page_token: str | None


def _delivery(d: pb.Delivery, *, full: bool) -> DeliveryOut:
    return DeliveryOut(
        delivery_id=d.delivery_id, endpoint_id=d.endpoint_id, message_id=d.message_id, event_type=d.event_type,
        status=enum_name(pb.DeliveryStatus, value=d.status), attempts=d.attempts, created_at=timestamp(d.created_at),
        next_attempt_at=timestamp(d.next_attempt_at), finished_at=timestamp(d.finished_at),
        redelivery_of=or_none(d.redelivery_of), payload=json.loads(d.payload) if full and d.payload else None,
        attempt_log=[AttemptOut(attempt=a.attempt, started_at=timestamp(a.started_at), latency_ms=a.latency_ms,
                                response_status=a.response_status or None, error_kind=or_none(a.error_kind),
                                response_body=or_none(a.response_body)) for a in d.attempt_log] if full else None)


def _scopes(principal: Principal) -> list[str]:
    return sorted(principal.scopes)


BASE = "/v1/tenants/{tenant_id}/webhook-endpoints"


@router.post(BASE, response_model=EndpointWithSecret, status_code=201, summary="Register a webhook endpoint")
async def create_endpoint(tenant_id: TenantId, body: EndpointIn, response: Response, state: State,
                          principal: ManageWebhooks, idempotency_key: IdempotencyKeyHeader = None) -> EndpointWithSecret:
    """The secret is in this answer only. A URL that is not https to a public address is 400
    TARGET_NOT_ALLOWED; an event type the client's scopes do not read is 403 EVENT_TYPE_NOT_ALLOWED."""
    answer = await state.webhooks.CreateEndpoint(pb.CreateEndpointRequest(
        tenant_id=tenant_id, client_id=principal.client_id, caller_scopes=_scopes(principal), url=body.url,
        event_types=list(body.event_types), description=body.description,
        allow_private_targets=body.allow_private_targets, idempotency_key=_key(idempotency_key),
        key_scope=client_scope(principal.client_id)), timeout=state.timeout_s)
    response.headers["Location"] = f"/v1/tenants/{tenant_id}/webhook-endpoints/{answer.endpoint.endpoint_id}"
    return EndpointWithSecret(**_endpoint(answer.endpoint), secret=answer.secret)


@router.get(BASE, response_model=EndpointPage, summary="The calling client's webhook endpoints")
async def list_endpoints(tenant_id: TenantId, state: State, principal: ManageWebhooks,
                         page_size: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = 50,
                         page_token: Annotated[str, Query(max_length=MAX_CURSOR_CHARS)] = "") -> EndpointPage:
    answer = await state.webhooks.ListEndpoints(pb.ListEndpointsRequest(
        tenant_id=tenant_id, client_id=principal.client_id, page_size=page_size, page_token=page_token),
        timeout=state.timeout_s)
    return EndpointPage(endpoints=[EndpointOut(**_endpoint(e)) for e in answer.endpoints],
                        next_page_token=answer.next_page_token or None)


@router.get(BASE + "/{endpoint_id}", response_model=EndpointOut, summary="One webhook endpoint")
async def get_endpoint(tenant_id: TenantId, endpoint_id: EndpointId, state: State,
                       principal: ManageWebhooks) -> EndpointOut:
    answer = await state.webhooks.GetEndpoint(pb.GetEndpointRequest(
        tenant_id=tenant_id, client_id=principal.client_id, endpoint_id=endpoint_id), timeout=state.timeout_s)
    return EndpointOut(**_endpoint(answer.endpoint))


@router.patch(BASE + "/{endpoint_id}", response_model=EndpointOut, summary="Change, enable or disable an endpoint")
async def update_endpoint(tenant_id: TenantId, endpoint_id: EndpointId, body: EndpointPatch, state: State,
                          principal: ManageWebhooks) -> EndpointOut:
    """``enabled: true`` starts an endpoint the service disabled for failing afresh."""
    request = pb.UpdateEndpointRequest(tenant_id=tenant_id, client_id=principal.client_id,
                                       caller_scopes=_scopes(principal), endpoint_id=endpoint_id)
    if body.url is not None:
        request.url = body.url
    if body.event_types is not None:
        request.set_event_types = True
        request.event_types.extend(body.event_types)
    if body.description is not None:
        request.description = body.description
    if body.enabled is not None:
        request.enabled = body.enabled
    if body.allow_private_targets is not None:
        request.allow_private_targets = body.allow_private_targets
    answer = await state.webhooks.UpdateEndpoint(request, timeout=state.timeout_s)
    return EndpointOut(**_endpoint(answer.endpoint))


@router.delete(BASE + "/{endpoint_id}", response_model=EndpointOut, summary="Delete an endpoint (its log stays)")
async def delete_endpoint(tenant_id: TenantId, endpoint_id: EndpointId, state: State,
                          principal: ManageWebhooks) -> EndpointOut:
    answer = await state.webhooks.DeleteEndpoint(pb.DeleteEndpointRequest(
        tenant_id=tenant_id, client_id=principal.client_id, endpoint_id=endpoint_id), timeout=state.timeout_s)
    return EndpointOut(**_endpoint(answer.endpoint))


@router.post(BASE + "/{endpoint_id}/rotate-secret", response_model=EndpointWithSecret,
             summary="A new secret; the old one signs too until the overlap ends")
async def rotate_secret(tenant_id: TenantId, endpoint_id: EndpointId, state: State, principal: ManageWebhooks,
                        body: Annotated[RotateIn | None, Body()] = None,
                        idempotency_key: IdempotencyKeyHeader = None) -> EndpointWithSecret:
    answer = await state.webhooks.RotateSecret(pb.RotateSecretRequest(
        tenant_id=tenant_id, client_id=principal.client_id, endpoint_id=endpoint_id,
        overlap_s=body.overlap_s if body else 0, idempotency_key=_key(idempotency_key),
        key_scope=client_scope(principal.client_id)), timeout=state.timeout_s)
    return EndpointWithSecret(**_endpoint(answer.endpoint), secret=answer.secret)


@router.get(BASE + "/{endpoint_id}/deliveries", response_model=DeliveryPage,
            summary="The endpoint's deliveries, newest first")
async def list_deliveries(tenant_id: TenantId, endpoint_id: EndpointId, state: State, principal: ManageWebhooks,
                          status: DeliveryStatusName | None = None,
                          page_size: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = 50,
                          page_token: Annotated[str, Query(max_length=MAX_CURSOR_CHARS)] = "") -> DeliveryPage:
    answer = await state.webhooks.ListDeliveries(pb.ListDeliveriesRequest(
        tenant_id=tenant_id, client_id=principal.client_id, endpoint_id=endpoint_id,
        status=pb.DeliveryStatus.Value(f"DELIVERY_STATUS_{status.upper()}") if status else 0,
        page_size=page_size, page_token=page_token), timeout=state.timeout_s)
    return DeliveryPage(deliveries=[_delivery(d, full=False) for d in answer.deliveries],
                        next_page_token=answer.next_page_token or None)


@router.get(BASE + "/deliveries/{delivery_id}", response_model=DeliveryOut,
            summary="One delivery with its payload and every attempt")
async def get_delivery(tenant_id: TenantId, delivery_id: DeliveryId, state: State,
                       principal: ManageWebhooks) -> DeliveryOut:
    answer = await state.webhooks.GetDelivery(pb.GetDeliveryRequest(
        tenant_id=tenant_id, client_id=principal.client_id, delivery_id=delivery_id), timeout=state.timeout_s)
    return _delivery(answer.delivery, full=True)


@router.post(BASE + "/deliveries/{delivery_id}/redeliver", response_model=DeliveryOut, status_code=202,
             summary="Send a delivery's message again (same webhook-id)")
async def redeliver(tenant_id: TenantId, delivery_id: DeliveryId, state: State, principal: ManageWebhooks,
                    idempotency_key: IdempotencyKeyHeader = None) -> DeliveryOut:
    answer = await state.webhooks.Redeliver(pb.RedeliverRequest(
        tenant_id=tenant_id, client_id=principal.client_id, delivery_id=delivery_id,
        idempotency_key=_key(idempotency_key), key_scope=client_scope(principal.client_id)), timeout=state.timeout_s)
    return _delivery(answer.delivery, full=True)
