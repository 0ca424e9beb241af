"""The partner gRPC port: ``onecard.partner.v1.PartnerService`` served by the gateway process
beside its REST routes, with health and reflection, over server TLS.

Each rpc is bound to its REST twin (gateway.partner_api) when the app is made: ``bind_partner_rpcs``
reads the twin's route, and ``PartnerHandler`` answers a call the way the route answers a request:

1. the request id from ``x-request-id`` metadata (or a new one), bound to the logs and passed on to
   the services, and sent back in the trailing metadata;
2. the gate: ``authorization: Bearer <token>`` metadata through gateway.auth ``authenticate`` and
   ``admit`` with the twin's scopes and the request's ``tenant_id`` (the same rate limiter, grant
   cache and refusals as REST);
3. the request's fields validated by FastAPI's own parameter and body validation against the
   twin's declarations (a refusal is the REST 422 VALIDATION_FAILED);
4. the twin's endpoint function called with them, and its pydantic answer written into the
   response message through its JSON form (the proto mirrors the JSON names).

A refusal (``ProblemError``, a service's ``AioRpcError`` through gateway.problems.service_problem)
becomes a gRPC status whose google.rpc.ErrorInfo reason is the REST problem's reason, its detail
the status message; a validation failure adds a google.rpc.BadRequest naming the fields, a rate
limit a ``retry-after`` trailer. Anything else is INTERNAL with no detail, logged here.

Partners hold no mesh certificate, so the port asks for none: server TLS with the certificate of
``partner_tls_dir`` (the gateway's public name, a public CA's) or, by default, the gateway's mesh
certificate. The token says who calls.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.dependencies.utils import request_body_to_args, request_params_to_args
from fastapi.routing import APIRoute, iter_route_contexts
from google.protobuf import any_pb2, json_format
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter, Histogram
from pydantic import BaseModel
from starlette.responses import Response, StreamingResponse

from gateway.auth import admit, authenticate, authorize
from gateway.partner_api import PARTNER_RPCS, PartnerRpc
from gateway.problems import ProblemError, grpc_code_of, service_problem, validation_problem
from gateway.state import GatewayState, state_dependency
from onecard.partner.v1 import partner_pb2
from runtime.errors import ERROR_DOMAIN
from runtime.grpc_server import REQUEST_ID_METADATA, STATUS_DETAILS_METADATA
from runtime.logs import get_logger, request_id_or_new
from runtime.mesh import MeshTLS

log = get_logger(__name__)

SERVICE = partner_pb2.DESCRIPTOR.services_by_name["PartnerService"]
SERVICE_NAME = SERVICE.full_name
AUTHORIZATION_METADATA = "authorization"
RETRY_AFTER_METADATA = "retry-after"
BEARER_PREFIX = "bearer "
# Partner requests are small: a few ids and amounts; the largest answer is a day's token batch.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
DEFAULT_STOP_GRACE_S = 5.0
INTERNAL_DETAIL = "internal error"
# What a file answer (the reconciliation CSV) may hold: a message's worth, less room for the rest.
MAX_FILE_BYTES = MAX_MESSAGE_BYTES - 64 * 1024
# How a twin answers: a pydantic model (JSON), nothing (204), or a file (a StreamingResponse).
ANSWERS_MODEL, ANSWERS_NOTHING, ANSWERS_FILE = "model", "nothing", "file"
FILE_FIELDS = {"content": FieldDescriptor.TYPE_BYTES, "content_type": FieldDescriptor.TYPE_STRING}

RPC_REQUESTS = Counter("onecard_partner_grpc_requests_total", "Partner gRPC calls answered", ["method", "code"])
RPC_SECONDS = Histogram("onecard_partner_grpc_request_duration_seconds", "Partner gRPC call duration", ["method"])


class TwinError(RuntimeError):
    """An rpc and its REST twin do not fit together (a gateway that would answer wrongly refuses to start)."""


def wire_name(alias: str) -> str:
    """The request field a REST parameter arrives in: its name, ``Idempotency-Key`` as ``idempotency_key``."""
    return alias.lower().replace("-", "_")


@dataclass(frozen=True)
class BoundRpc:
    """An rpc of PartnerService bound to its twin route of one app."""

    rpc: PartnerRpc
    method: MethodDescriptor
    route: APIRoute
    # The twin's scopes, read from its ``Security(authorize, scopes=...)`` dependency.
    scopes: tuple[str, ...]
    principal_param: str
    state_param: str | None
    # Request field name -> the twin's path, query or header parameter alias.
    param_aliases: dict[str, str]
    # Request fields that are members of the twin's JSON body (by their JSON names).
    body_members: frozenset[str]
    # How the twin answers: ANSWERS_MODEL, ANSWERS_NOTHING or ANSWERS_FILE.
    answers: str = ANSWERS_MODEL
    # Body members REST requires but lets be null: an absent (optional) request field is the null.
    null_members: frozenset[str] = frozenset()

    @property
    def request_class(self) -> type[Message]:
        return _message_class(self.method.input_type)

    @property
    def response_class(self) -> type[Message]:
        return _message_class(self.method.output_type)

    @property
    def dependant(self) -> Dependant:
        return self.route.dependant


def _message_class(descriptor: Any) -> type[Message]:
    return getattr(partner_pb2, descriptor.name)


def body_model(route: APIRoute) -> type[BaseModel] | None:
    """The pydantic model of the twin's JSON body, if it takes one."""
    if not route.dependant.body_params:
        return None
    (field,) = route.dependant.body_params
    annotation = field.field_info.annotation
    candidates = [annotation, *getattr(annotation, "__args__", ())]
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    raise TwinError(f"{route.path}: the body is not a pydantic model")


def _bind(rpc: PartnerRpc, route: APIRoute) -> BoundRpc:
    method = SERVICE.methods_by_name.get(rpc.name)
    if method is None:
        raise TwinError(f"PartnerService has no rpc {rpc.name}")
    dependant = route.dependant
    principal_param = state_param = None
    scopes: tuple[str, ...] = ()
    for dependency in dependant.dependencies:
        if dependency.call is authorize:
            principal_param, scopes = dependency.name, tuple(dependency.own_oauth_scopes or ())
        elif dependency.call is state_dependency:
            state_param = dependency.name
        else:
            raise TwinError(f"{rpc.name}: its twin {route.path} depends on {dependency.call}, which the gRPC face "
                            "cannot provide")
    if principal_param is None or not scopes:
        raise TwinError(f"{rpc.name}: its twin {route.path} is not behind authorize with a scope")
    if dependant.request_param_name or dependant.cookie_params or len(dependant.body_params) > 1:
        raise TwinError(f"{rpc.name}: its twin {route.path} reads the raw request, cookies or several bodies")
    answers = _answers(rpc, route, method)
    param_aliases = {wire_name(f.alias): f.alias
                     for f in [*dependant.path_params, *dependant.query_params, *dependant.header_params]}
    model = body_model(route)
    members = {f.alias or name for name, f in model.model_fields.items()} if model else set()
    request_fields = {f.name for f in method.input_type.fields}
    unplaced = request_fields - set(param_aliases) - members
    if unplaced:
        raise TwinError(f"{rpc.name}: request fields {sorted(unplaced)} are nothing of {route.path}")
    if set(param_aliases) & members:
        raise TwinError(f"{rpc.name}: {sorted(set(param_aliases) & members)} is both a parameter and a body member")
    missing = {wire_name(f.alias) for f in [*dependant.path_params, *dependant.query_params, *dependant.header_params]
               if f.field_info.is_required()} - request_fields
    if model is not None:
        missing |= {f.alias or name for name, f in model.model_fields.items() if f.is_required()} - request_fields
    if missing:
        raise TwinError(f"{rpc.name}: the request lacks {sorted(missing)}, which {route.path} requires")
    null_members = frozenset(
        (f.alias or name) for name, f in (model.model_fields.items() if model else ())
        if f.is_required() and _admits_none(f.annotation) and (f.alias or name) in request_fields)
    for name in null_members:
        if not method.input_type.fields_by_name[name].has_presence:
            raise TwinError(f"{rpc.name}: {name} may be null over REST, so it must be optional")
    if rpc.wrap is not None and rpc.wrap not in method.output_type.fields_by_name:
        raise TwinError(f"{rpc.name}: the response has no field {rpc.wrap}")
    return BoundRpc(rpc=rpc, method=method, route=route, scopes=scopes, principal_param=principal_param,
                    state_param=state_param, param_aliases={k: v for k, v in param_aliases.items()
                                                           if k in request_fields},
                    body_members=frozenset(members & request_fields), answers=answers, null_members=null_members)


def _admits_none(annotation: Any) -> bool:
    return annotation is None or type(None) in getattr(annotation, "__args__", ())


def _answers(rpc: PartnerRpc, route: APIRoute, method: MethodDescriptor) -> str:
    """How the twin answers, and that the response message fits it."""
    if isinstance(route.response_model, type) and issubclass(route.response_model, BaseModel):
        return ANSWERS_MODEL
    fields = {f.name: f.type for f in method.output_type.fields}
    response_class = getattr(route.response_class, "value", route.response_class)
    if route.status_code == 204:
        if fields:
            raise TwinError(f"{rpc.name}: its twin {route.path} answers 204, so the response must be empty")
        return ANSWERS_NOTHING
    if isinstance(response_class, type) and issubclass(response_class, StreamingResponse):
        if fields != FILE_FIELDS:
            raise TwinError(f"{rpc.name}: its twin {route.path} answers a file, so the response must be "
                            "bytes content and string content_type")
        return ANSWERS_FILE
    raise TwinError(f"{rpc.name}: its twin {route.path} answers no pydantic model, no 204 and no file")


def bind_partner_rpcs(app: FastAPI, rpcs: Sequence[PartnerRpc] = PARTNER_RPCS) -> dict[str, BoundRpc]:
    """Every rpc of PartnerService bound to its twin route in ``app``; TwinError when one cannot be."""
    routes = {}
    for context in iter_route_contexts(app.routes):
        route = context.original_route
        if isinstance(route, APIRoute):
            routes[route.endpoint] = route
    bound: dict[str, BoundRpc] = {}
    for rpc in rpcs:
        route = routes.get(rpc.twin)
        if route is None:
            raise TwinError(f"{rpc.name}: its twin {rpc.twin.__qualname__} is no route of the app")
        bound[rpc.name] = _bind(rpc, route)
    unbound = set(SERVICE.methods_by_name) - set(bound)
    if unbound:
        raise TwinError(f"PartnerService rpcs with no twin in gateway.partner_api: {sorted(unbound)}")
    return bound


# --- one call ------------------------------------------------------------------------------------


def request_values(message: Message) -> dict[str, Any]:
    """The fields a request carries, by name, as plain values. A field that says nothing is left out,
    so that the twin's default applies: an unset ``optional`` field, an empty list or map."""
    values: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.is_repeated:
            is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
            if len(value):
                values[field.name] = dict(value) if is_map else [_plain(v) for v in value]
        elif field.has_presence:
            if message.HasField(field.name):
                values[field.name] = _plain(value)
        else:
            values[field.name] = value
    return values


def _plain(value: Any) -> Any:
    return json_format.MessageToDict(value, preserving_proto_field_name=True) if isinstance(value, Message) else value


def without_nulls(value: Any) -> Any:
    """JSON with its nulls left out: proto has no null, an absent field is one."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


async def response_message(bound: BoundRpc, answer: Any) -> Message:
    """The twin's answer written into the rpc's response message: a model through its REST JSON
    form; a 204 as the empty message; a file as its exact bytes and Content-Type."""
    if bound.answers == ANSWERS_NOTHING:
        if not (isinstance(answer, Response) and answer.status_code == 204):
            raise TypeError(f"{bound.rpc.name}: the twin answered {answer!r}, not 204")
        return bound.response_class()
    if bound.answers == ANSWERS_FILE:
        if not isinstance(answer, StreamingResponse):
            raise TypeError(f"{bound.rpc.name}: the twin answered {type(answer).__name__}, not a file")
        return bound.response_class(content=await file_bytes(answer),
                                    content_type=answer.headers.get("content-type", ""))
    if not isinstance(answer, BaseModel):
        raise TypeError(f"{bound.rpc.name}: the twin answered {type(answer).__name__}, not its model")
    body = without_nulls(answer.model_dump(mode="json", by_alias=True))
    if bound.rpc.wrap is not None:
        body = {bound.rpc.wrap: body}
    return json_format.ParseDict(body, bound.response_class(), ignore_unknown_fields=False)


async def file_bytes(answer: StreamingResponse) -> bytes:
    """The bytes REST would stream; a file too large for one message is 413 FILE_TOO_LARGE (REST
    serves it still)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in answer.body_iterator:
        data = chunk.encode(answer.charset) if isinstance(chunk, str) else bytes(chunk)
        size += len(data)
        if size > MAX_FILE_BYTES:
            raise ProblemError(status=413, reason="FILE_TOO_LARGE", detail="the file is larger than one gRPC "
                               "message; fetch it over REST")
        chunks.append(data)
    return b"".join(chunks)


def bearer_token(metadata: Iterable[tuple[str, Any]]) -> str | None:
    for key, value in metadata:
        if key == AUTHORIZATION_METADATA and isinstance(value, str) and value.lower().startswith(BEARER_PREFIX):
            return value[len(BEARER_PREFIX):].strip() or None
    return None


async def answer(bound: BoundRpc, state: GatewayState, request: Message, metadata: Sequence[tuple[str, Any]]) -> Message:
    """The rpc's answer, the REST twin's: gate, validation, the endpoint itself. Raises what the
    twin raises (ProblemError, AioRpcError)."""
    values = request_values(request)
    principal = authenticate(state, token=bearer_token(metadata))
    tenant_id = values.get("tenant_id") if "tenant_id" in bound.param_aliases else None
    principal = await admit(state, principal, tenant_id=tenant_id, scopes=bound.scopes)

    # FastAPI's own validation of the twin's declarations, as it runs for a REST request: the same
    # constraints, the same errors (their loc names path, query, header or body as REST's do).
    dependant = bound.dependant
    received = {alias: values[name] for name, alias in bound.param_aliases.items() if name in values}
    arguments, errors = request_params_to_args(
        [*dependant.path_params, *dependant.query_params, *dependant.header_params], received)
    if dependant.body_params:
        body = {name: values[name] for name in bound.body_members if name in values}
        body |= {name: None for name in bound.null_members if name not in values}
        (body_field,) = dependant.body_params
        received_body = body if body or body_field.field_info.is_required() else None
        body_arguments, body_errors = await request_body_to_args(
            dependant.body_params, received_body, embed_body_fields=bound.route._embed_body_fields)
        arguments.update(body_arguments)
        errors.extend(body_errors)
    if errors:
        raise validation_problem(errors)

    arguments[bound.principal_param] = principal
    if bound.state_param:
        arguments[bound.state_param] = state
    if dependant.response_param_name:
        arguments[dependant.response_param_name] = Response()
    return await response_message(bound, await bound.route.endpoint(**arguments))


def status_trailers(problem: ProblemError, code: grpc.StatusCode, message: str) -> list[tuple[str, Any]]:
    """The google.rpc.Status trailer (ErrorInfo with the REST reason; BadRequest for a validation
    failure) and a ``retry-after`` where REST sends Retry-After."""
    # ErrorInfo metadata is text: REST's numbers (a PIN's attempts_left) as their digits.
    info = error_details_pb2.ErrorInfo(reason=problem.reason, domain=ERROR_DOMAIN, metadata={
        k: str(v) for k, v in problem.extra.items() if isinstance(v, str) or type(v) is int})
    details = [info]
    errors = problem.extra.get("errors")
    if isinstance(errors, list):
        details.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=".".join(e["loc"]), description=e["msg"])
            for e in errors]))
    packed = []
    for detail in details:
        wrapped = any_pb2.Any()
        wrapped.Pack(detail)
        packed.append(wrapped)
    status = status_pb2.Status(code=code.value[0], message=message, details=packed)
    trailers: list[tuple[str, Any]] = [(STATUS_DETAILS_METADATA, status.SerializeToString())]
    retry_after = problem.headers.get("Retry-After")
    if retry_after:
        trailers.append((RETRY_AFTER_METADATA, retry_after))
    return trailers


class PartnerHandler(grpc.GenericRpcHandler):
    """PartnerService, every rpc through ``answer``: one handler per rpc, made from the bound table."""

    def __init__(self, state: GatewayState, bound: dict[str, BoundRpc]):
        self._state = state
        self._handlers = {
            f"/{SERVICE_NAME}/{name}": grpc.unary_unary_rpc_method_handler(
                self._behaviour(rpc), request_deserializer=rpc.request_class.FromString,
                response_serializer=rpc.response_class.SerializeToString)
            for name, rpc in bound.items()
        }

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return self._handlers.get(handler_call_details.method)

    def _behaviour(self, bound: BoundRpc) -> Any:
        state = self._state
        method = bound.rpc.name

        async def behaviour(request: Message, context: grpc.aio.ServicerContext) -> Message:
            metadata = tuple(context.invocation_metadata() or ())
            offered = next((v for k, v in metadata if k == REQUEST_ID_METADATA and isinstance(v, str)), "")
            request_id = request_id_or_new(offered)
            outer_context = structlog.contextvars.get_contextvars()
            structlog.contextvars.bind_contextvars(request_id=request_id)
            started_s = time.perf_counter()
            code = grpc.StatusCode.OK
            problem: ProblemError | None = None
            try:
                try:
                    response = await answer(bound, state, request, metadata)
                except ProblemError as exc:
                    problem = exc
                except grpc.aio.AioRpcError as exc:
                    problem = service_problem(exc)
                except Exception:  # noqa: BLE001 - the caller gets a bare INTERNAL, the operator the traceback
                    log.exception("unhandled error", grpc_method=method)
                    problem = ProblemError(status=500, reason="INTERNAL")
                if problem is None:
                    context.set_trailing_metadata(((REQUEST_ID_METADATA, request_id),))
                    return response
                code = grpc_code_of(problem)
                # A 5xx detail is already a fixed text (service_problem): never a service's message.
                message = problem.detail or INTERNAL_DETAIL
                await context.abort(code, message, trailing_metadata=(
                    *status_trailers(problem, code, message), (REQUEST_ID_METADATA, request_id)))
                raise AssertionError("unreachable: abort raises")
            finally:
                elapsed_s = time.perf_counter() - started_s
                RPC_REQUESTS.labels(method, code.name).inc()
                RPC_SECONDS.labels(method).observe(elapsed_s)
                # The method, never the request: it carries member ids, names and keys.
                # (No key with "code" in it: the log redacts those, e-codes being secrets.)
                log.info("grpc request", grpc_method=method, grpc_status=code.name,
                         reason=problem.reason if problem else None, duration_ms=round(elapsed_s * 1000, 1))
                structlog.contextvars.clear_contextvars()
                structlog.contextvars.bind_contextvars(**outer_context)

        return behaviour


# --- the server ----------------------------------------------------------------------------------


@dataclass
class PartnerServer:
    server: grpc.aio.Server
    health: HealthServicer
    port: int

    async def stop(self, grace_s: float = DEFAULT_STOP_GRACE_S) -> None:
        """Health NOT_SERVING, calls in flight finish within the grace, then the port closes."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)


def server_credentials(*, partner_tls_dir: Any, mesh_tls: MeshTLS | None) -> grpc.ServerCredentials | None:
    """Server TLS, no client certificate: the public name's certificate when configured, else the
    gateway's mesh certificate; None (plaintext) only in insecure development."""
    if partner_tls_dir is not None:
        return MeshTLS.load(partner_tls_dir, mesh_name=False).server_only_credentials()
    if mesh_tls is not None:
        return mesh_tls.server_only_credentials()
    return None


async def start_partner_server(app: FastAPI, state: GatewayState, *, host: str, port: int,
                               credentials: grpc.ServerCredentials | None) -> PartnerServer:
    """PartnerService, health and reflection on ``host:port`` (0: any free port), started."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
    server.add_generic_rpc_handlers((PartnerHandler(state, bind_partner_rpcs(app)),))
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    address = f"{host}:{port}"
    bound_port = (server.add_secure_port(address, credentials) if credentials is not None
                  else server.add_insecure_port(address))
    await server.start()
    # The port answers as soon as it listens: each call reaches the services itself, and says so
    # (UNAVAILABLE) when they do not answer, as REST's 503.
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    log.info("partner gRPC listening", port=bound_port, tls=credentials is not None)
    return PartnerServer(server=server, health=health, port=bound_port)
