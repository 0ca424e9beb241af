"""The gRPC face of webhooks: protobuf in, the rules of services.webhooks.domain and the target
check, the store, protobuf out. No SQL here and no rules of its own.

Every call parses its tenant id first and reaches rows only through that tenant and the calling
client (the gateway always names one; only the operator may name none and see every client's).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime

import grpc

from onecard.webhooks.v1 import webhooks_pb2 as pb
from onecard.webhooks.v1 import webhooks_pb2_grpc
from runtime.errors import InvalidArgument, PermissionDenied
from runtime.grpc_server import ServiceApp
from runtime.idempotency import key_scope, scoped_key
from runtime.mesh import peer_name
from runtime.paging import page_size, page_token, parse_page_token
from runtime.wire import timestamp_pb
from services.webhooks import domain
from services.webhooks.domain import DeliveryStatus, EndpointState
from services.webhooks.sender import Resolver, resolve_checked
from services.webhooks.store import DeliveryRow, EndpointRow, WebhookStore

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
MAX_KEY_CHARS = 200
MAX_CLIENT_ID_CHARS = 100

_STATES = {
    EndpointState.ENABLED: pb.ENDPOINT_STATE_ENABLED,
    EndpointState.DISABLED: pb.ENDPOINT_STATE_DISABLED,
    EndpointState.DISABLED_FAILING: pb.ENDPOINT_STATE_DISABLED_FAILING,
    EndpointState.DISABLED_GRANT_REVOKED: pb.ENDPOINT_STATE_DISABLED_GRANT_REVOKED,
    EndpointState.DELETED: pb.ENDPOINT_STATE_DELETED,
}
_STATUSES = {
    DeliveryStatus.PENDING: pb.DELIVERY_STATUS_PENDING,
    DeliveryStatus.DELIVERED: pb.DELIVERY_STATUS_DELIVERED,
    DeliveryStatus.FAILED: pb.DELIVERY_STATUS_FAILED,
    DeliveryStatus.DROPPED: pb.DELIVERY_STATUS_DROPPED,
}
_STATUS_NAMES = {value: name for name, value in _STATUSES.items()}


def endpoint_pb(e: EndpointRow) -> pb.Endpoint:
    return pb.Endpoint(
        tenant_id=str(e.tenant_id), endpoint_id=str(e.endpoint_id), client_id=e.client_id, url=e.url,
        event_types=e.event_types, description=e.description, state=_STATES[e.state],
        allow_private_targets=e.allow_private_targets, disabled_reason=e.disabled_reason,
        disabled_at=timestamp_pb(e.disabled_at), failing_since=timestamp_pb(e.failing_since),
        created_at=timestamp_pb(e.created_at), updated_at=timestamp_pb(e.updated_at),
        secrets=[pb.SecretInfo(secret_id=str(s.secret_id), created_at=timestamp_pb(s.created_at),
                               expires_at=timestamp_pb(s.expires_at)) for s in e.secrets])


def delivery_pb(d: DeliveryRow) -> pb.Delivery:
    return pb.Delivery(
        tenant_id=str(d.tenant_id), delivery_id=str(d.delivery_id), endpoint_id=str(d.endpoint_id),
        message_id=d.message_id, event_id=d.event_id, event_type=d.event_type, status=_STATUSES[d.status],
        attempts=d.attempts, created_at=timestamp_pb(d.created_at),
        next_attempt_at=timestamp_pb(d.next_attempt_at if d.status == DeliveryStatus.PENDING else None),
        finished_at=timestamp_pb(d.finished_at), payload=d.payload.decode(),
        redelivery_of=str(d.redelivery_of) if d.redelivery_of else "",
        attempt_log=[pb.Attempt(attempt=a.attempt, started_at=timestamp_pb(a.started_at), latency_ms=a.latency_ms,
                                response_status=a.response_status, error_kind=a.error_kind,
                                response_body=a.response_body) for a in d.attempt_log])


def _uuid(value: str, *, name: str, reason: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidArgument(f"{name} is not a UUID", reason=reason) from None


def _tenant(value: str) -> uuid.UUID:
    return _uuid(value, name="tenant_id", reason="INVALID_TENANT_ID")


class WebhookServicer(webhooks_pb2_grpc.WebhookServiceServicer):
    def __init__(self, *, app: ServiceApp, master_key: bytes, clock: Callable[[], datetime], resolver: Resolver,
                 allow_loopback_http: bool, max_overlap_s: float, wake: Callable[[], None]):
        self._app = app
        self._master_key = master_key
        self._clock = clock
        self._resolver = resolver
        self._allow_loopback_http = allow_loopback_http
        self._max_overlap_s = max_overlap_s
        self._wake = wake

    @property
    def _store(self) -> WebhookStore:
        return WebhookStore(self._app.pool, master_key=self._master_key)

    def _client(self, client_id: str, context: grpc.aio.ServicerContext) -> str | None:
        """The client whose endpoints the call reaches; None (every client's) only for the operator."""
        if len(client_id) > MAX_CLIENT_ID_CHARS:
            raise InvalidArgument("client_id is too long", reason="INVALID_CLIENT_ID")
        if client_id:
            return client_id
        caller = peer_name(context)
        if caller == "ops" or (caller is None and self._app.settings.insecure_development):
            return None
        raise InvalidArgument("name the API client the endpoints belong to", reason="CLIENT_ID_REQUIRED")

    @staticmethod
    def _key(request_key: str, requested_scope: str, context: grpc.aio.ServicerContext) -> str:
        if not request_key:
            raise InvalidArgument("idempotency_key is required", reason="IDEMPOTENCY_KEY_REQUIRED")
        if len(request_key) > MAX_KEY_CHARS:
            raise InvalidArgument("idempotency_key is too long", reason="INVALID_IDEMPOTENCY_KEY")
        return scoped_key(key_scope(requested_scope, caller=peer_name(context)), request_key)

    async def _check_url(self, url: str, *, allow_private: bool) -> str:
        target = domain.parse_target(url, allow_loopback_http=self._allow_loopback_http)
        await resolve_checked(target, resolver=self._resolver, allow_private=allow_private,
                              allow_loopback_http=self._allow_loopback_http)
        return url

    @staticmethod
    def _may_allow_private(scopes: list[str]) -> None:
        if domain.CLIENTS_ADMIN not in scopes:
            raise PermissionDenied("only the tenant's administrator (clients:admin) may allow private targets",
                                   reason="PRIVATE_TARGETS_NOT_ALLOWED")

    async def CreateEndpoint(self, request: pb.CreateEndpointRequest, context: grpc.aio.ServicerContext
                             ) -> pb.CreateEndpointResponse:
        tenant_id = _tenant(request.tenant_id)
        if not request.client_id:
            raise InvalidArgument("name the API client the endpoint belongs to", reason="CLIENT_ID_REQUIRED")
        client_id = self._client(request.client_id, context) or ""
        key = self._key(request.idempotency_key, request.key_scope, context)
        scopes = sorted(set(request.caller_scopes))
        event_types = domain.check_event_types(request.event_types, scopes=scopes)
        if len(request.description) > domain.MAX_DESCRIPTION_CHARS:
            raise InvalidArgument("the description is too long", reason="INVALID_DESCRIPTION")
        if request.allow_private_targets:
            self._may_allow_private(scopes)
        url = await self._check_url(request.url, allow_private=request.allow_private_targets)
        endpoint, secret = await self._store.create_endpoint(
            tenant_id=tenant_id, client_id=client_id, url=url, event_types=event_types,
            description=request.description, allow_private_targets=request.allow_private_targets, scopes=scopes,
            idempotency_key=key, secret=domain.new_secret(), now=self._clock())
        return pb.CreateEndpointResponse(endpoint=endpoint_pb(endpoint), secret=secret)

    async def ListEndpoints(self, request: pb.ListEndpointsRequest, context: grpc.aio.ServicerContext
                            ) -> pb.ListEndpointsResponse:
        tenant_id = _tenant(request.tenant_id)
        limit = page_size(request.page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
        rows = await self._store.list_endpoints(tenant_id=tenant_id, client_id=self._client(request.client_id, context),
                                                after_seq=parse_page_token(request.page_token), limit=limit)
        return pb.ListEndpointsResponse(endpoints=[endpoint_pb(e) for e in rows],
                                        next_page_token=page_token(rows[-1].seq) if len(rows) == limit else "")

    async def GetEndpoint(self, request: pb.GetEndpointRequest, context: grpc.aio.ServicerContext
                          ) -> pb.GetEndpointResponse:
        endpoint = await self._store.get_endpoint(
            tenant_id=_tenant(request.tenant_id), client_id=self._client(request.client_id, context),
            endpoint_id=_uuid(request.endpoint_id, name="endpoint_id", reason="INVALID_ENDPOINT_ID"))
        return pb.GetEndpointResponse(endpoint=endpoint_pb(endpoint))

    async def UpdateEndpoint(self, request: pb.UpdateEndpointRequest, context: grpc.aio.ServicerContext
                             ) -> pb.UpdateEndpointResponse:
        tenant_id = _tenant(request.tenant_id)
        client_id = self._client(request.client_id, context)
        endpoint_id = _uuid(request.endpoint_id, name="endpoint_id", reason="INVALID_ENDPOINT_ID")
        current = await self._store.get_endpoint(tenant_id=tenant_id, endpoint_id=endpoint_id, client_id=client_id)
        scopes = sorted(set(request.caller_scopes)) if client_id is not None else None
        changes: dict[str, object] = {}
        if request.set_event_types:
            changes["event_types"] = domain.check_event_types(request.event_types, scopes=scopes or current.scopes)
        if request.HasField("description"):
            if len(request.description) > domain.MAX_DESCRIPTION_CHARS:
                raise InvalidArgument("the description is too long", reason="INVALID_DESCRIPTION")
            changes["description"] = request.description
        allow_private = current.allow_private_targets
        if request.HasField("allow_private_targets"):
            if request.allow_private_targets and scopes is not None:
                self._may_allow_private(scopes)
            allow_private = changes["allow_private_targets"] = request.allow_private_targets
        if request.HasField("url") or request.HasField("allow_private_targets"):
            changes["url"] = await self._check_url(request.url if request.HasField("url") else current.url,
                                                   allow_private=allow_private)
        if request.HasField("enabled"):
            changes["enabled"] = request.enabled
        endpoint = await self._store.update_endpoint(tenant_id=tenant_id, endpoint_id=endpoint_id, client_id=client_id,
                                                     changes=changes, scopes=scopes, now=self._clock())
        if request.HasField("enabled") and request.enabled:
            self._wake()
        return pb.UpdateEndpointResponse(endpoint=endpoint_pb(endpoint))

    async def DeleteEndpoint(self, request: pb.DeleteEndpointRequest, context: grpc.aio.ServicerContext
                             ) -> pb.DeleteEndpointResponse:
        endpoint = await self._store.delete_endpoint(
            tenant_id=_tenant(request.tenant_id), client_id=self._client(request.client_id, context),
            endpoint_id=_uuid(request.endpoint_id, name="endpoint_id", reason="INVALID_ENDPOINT_ID"), now=self._clock())
        return pb.DeleteEndpointResponse(endpoint=endpoint_pb(endpoint))

    async def RotateSecret(self, request: pb.RotateSecretRequest, context: grpc.aio.ServicerContext
                           ) -> pb.RotateSecretResponse:
        tenant_id = _tenant(request.tenant_id)
        client_id = self._client(request.client_id, context)
        endpoint_id = _uuid(request.endpoint_id, name="endpoint_id", reason="INVALID_ENDPOINT_ID")
        key = self._key(request.idempotency_key, request.key_scope, context)
        if request.overlap_s < 0 or request.overlap_s > self._max_overlap_s:
            raise InvalidArgument(f"overlap_s is between 0 and {int(self._max_overlap_s)}", reason="INVALID_OVERLAP")
        overlap_s = float(request.overlap_s or self._max_overlap_s)
        endpoint, secret = await self._store.rotate_secret(
            tenant_id=tenant_id, endpoint_id=endpoint_id, client_id=client_id, secret=domain.new_secret(),
            overlap_s=overlap_s, idempotency_key=key, now=self._clock())
        return pb.RotateSecretResponse(endpoint=endpoint_pb(endpoint), secret=secret)

    async def ListDeliveries(self, request: pb.ListDeliveriesRequest, context: grpc.aio.ServicerContext
                             ) -> pb.ListDeliveriesResponse:
        limit = page_size(request.page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
        if request.status and request.status not in _STATUS_NAMES:
            raise InvalidArgument("unknown delivery status", reason="INVALID_STATUS")
        rows = await self._store.list_deliveries(
            tenant_id=_tenant(request.tenant_id), client_id=self._client(request.client_id, context),
            endpoint_id=_uuid(request.endpoint_id, name="endpoint_id", reason="INVALID_ENDPOINT_ID"),
            status=_STATUS_NAMES.get(request.status), before_seq=parse_page_token(request.page_token), limit=limit)
        return pb.ListDeliveriesResponse(deliveries=[delivery_pb(d) for d in rows],
                                         next_page_token=page_token(rows[-1].seq) if len(rows) == limit else "")

    async def GetDelivery(self, request: pb.GetDeliveryRequest, context: grpc.aio.ServicerContext
                          ) -> pb.GetDeliveryResponse:
        delivery = await self._store.get_delivery(
            tenant_id=_tenant(request.tenant_id), client_id=self._client(request.client_id, context),
            delivery_id=_uuid(request.delivery_id, name="delivery_id", reason="INVALID_DELIVERY_ID"))
        return pb.GetDeliveryResponse(delivery=delivery_pb(delivery))

    async def Redeliver(self, request: pb.RedeliverRequest, context: grpc.aio.ServicerContext
                        ) -> pb.RedeliverResponse:
        tenant_id = _tenant(request.tenant_id)
        client_id = self._client(request.client_id, context)
        delivery_id = _uuid(request.delivery_id, name="delivery_id", reason="INVALID_DELIVERY_ID")
        key = self._key(request.idempotency_key, request.key_scope, context)
        delivery = await self._store.redeliver(tenant_id=tenant_id, delivery_id=delivery_id, client_id=client_id,
                                               idempotency_key=key, now=self._clock())
        self._wake()
        return pb.RedeliverResponse(delivery=delivery_pb(delivery))
