"""Errors as RFC 9457 problem details (``application/problem+json``), and THE table from gRPC
status codes to HTTP statuses.

Every error the gateway answers goes through ``problem_response``: refusals of its own
(``ProblemError``), errors from the services (``grpc.aio.AioRpcError``), request validation
errors, unknown routes and methods. Unexpected exceptions are turned into a bare 500 by the
request middleware (``gateway.app``), so no stack trace reaches a caller.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import iter_route_contexts
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from runtime.grpc_client import error_info
from runtime.logs import get_logger

log = get_logger(__name__)

PROBLEM_CONTENT_TYPE = "application/problem+json"
# Problem types are URNs named after the reason: stable identifiers that do not pretend to be
# pages someone can fetch. docs/api.md lists them.
PROBLEM_TYPE_PREFIX = "urn:onecard:problem:"
# What a 503/504 says instead of the gRPC message, which names internal addresses.
UNAVAILABLE_DETAIL = "a backing service did not answer in time; retry later"
NOT_IMPLEMENTED_DETAIL = "this operation is not available on this server yet"


@dataclass(frozen=True)
class HttpMapping:
    status: int
    # Whether the service's message is safe and useful to show the caller.
    show_detail: bool
    # What to say instead when the service's message is not shown (None: UNAVAILABLE_DETAIL).
    fixed_detail: str | None = None


# THE ONE table from gRPC status codes to HTTP. INVALID_ARGUMENT is 400 (the service refused a
# value), so that 422 stays reserved for requests that do not fit the documented schema.
# FAILED_PRECONDITION is 409: the resource's state forbids the change (freezing a member who
# left), which the caller resolves by looking at the resource, not by fixing the request.
GRPC_TO_HTTP: dict[grpc.StatusCode, HttpMapping] = {
    grpc.StatusCode.INVALID_ARGUMENT: HttpMapping(400, show_detail=True),
    grpc.StatusCode.OUT_OF_RANGE: HttpMapping(400, show_detail=True),
    grpc.StatusCode.NOT_FOUND: HttpMapping(404, show_detail=True),
    grpc.StatusCode.ALREADY_EXISTS: HttpMapping(409, show_detail=True),
    grpc.StatusCode.ABORTED: HttpMapping(409, show_detail=True),
    grpc.StatusCode.FAILED_PRECONDITION: HttpMapping(409, show_detail=True),
    grpc.StatusCode.PERMISSION_DENIED: HttpMapping(403, show_detail=True),
    grpc.StatusCode.UNAUTHENTICATED: HttpMapping(401, show_detail=True),
    grpc.StatusCode.RESOURCE_EXHAUSTED: HttpMapping(429, show_detail=True),
    grpc.StatusCode.UNAVAILABLE: HttpMapping(503, show_detail=False),
    grpc.StatusCode.DEADLINE_EXCEEDED: HttpMapping(504, show_detail=False),
    # The service behind the route does not offer the operation (yet): an older service version.
    grpc.StatusCode.UNIMPLEMENTED: HttpMapping(501, show_detail=False, fixed_detail=NOT_IMPLEMENTED_DETAIL),
}
# Everything else (INTERNAL, UNKNOWN, DATA_LOSS, CANCELLED) is our fault: a bare 500.
FALLBACK_MAPPING = HttpMapping(500, show_detail=False)
# ErrorInfo metadata a caller needs to act on, copied into the problem body (only where the
# detail is shown): ``rule``, the rule of a refused rule set (policy's INVALID_ARGUMENT) or of a
# refused access rule document (the device hub's ACCESS_RULES_INVALID); ``attempts_left``, the
# PIN checks left before a member's PIN locks (PIN_INCORRECT); ``retry_after_s``, also sent as
# Retry-After (PIN_LOCKED).
SURFACED_METADATA = ("rule", "attempts_left", "retry_after_s")


# The inverse, for the partner gRPC face (gateway.partner_grpc): a refusal the gateway decides
# itself, as an HTTP status, to the gRPC code the same refusal has there. The reason is the same on
# both faces; a service's refusal keeps the service's own code (ProblemError.grpc_code).
HTTP_TO_GRPC: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def grpc_code_of(problem: ProblemError) -> grpc.StatusCode:
    """The gRPC status code a refusal answers on the partner gRPC face."""
    if problem.grpc_code is not None:
        return problem.grpc_code
    return HTTP_TO_GRPC.get(problem.status, grpc.StatusCode.INTERNAL)


def http_mapping(code: grpc.StatusCode) -> HttpMapping:
    return GRPC_TO_HTTP.get(code, FALLBACK_MAPPING)


class Problem(BaseModel):
    """An error, as RFC 9457 problem details with onecard's extension members."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "type": "urn:onecard:problem:member_not_found",
                    "title": "Not Found",
                    "status": 404,
                    "detail": "no member 0b9e… in this tenant",
                    "instance": "/v1/tenants/6f1c…/members/0b9e…",
                    "reason": "MEMBER_NOT_FOUND",
                    "request_id": "5d0f3f0c2b7a4f0e9c1d2e3f4a5b6c7d",
                }
            ]
        },
    )

    type: str = Field(description="URN naming the kind of problem: urn:onecard:problem:<reason in lower case>.")
    title: str = Field(description="The HTTP status phrase.")
    status: int
    detail: str | None = Field(default=None, description="What went wrong, for a person; absent on 5xx.")
    instance: str = Field(description="The request path.")
    reason: str = Field(description="Stable machine-readable reason (UPPER_SNAKE), from the service's ErrorInfo.")
    request_id: str = Field(description="Echo of X-Request-Id; quote it when asking for support.")


# For route declarations. The Problem schema itself is added to the document's components by
# gateway.app, since no route returns it as its success model.
PROBLEM_CONTENT = {PROBLEM_CONTENT_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {
        status: {"description": HTTPStatus(status).phrase, "content": PROBLEM_CONTENT}
        for status in statuses
    }


class ProblemError(Exception):
    """A refusal decided by the gateway itself (authentication, tenant, scope, rate, media type), or
    a service's refusal as the gateway answers it (``service_problem``)."""

    def __init__(
        self,
        *,
        status: int,
        reason: str,
        detail: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
        grpc_code: grpc.StatusCode | None = None,
    ):
        super().__init__(detail or reason)
        self.status = status
        self.reason = reason
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra or {}
        # The service's own status code, when the refusal is a service's (``service_problem``):
        # the partner gRPC face answers it rather than HTTP_TO_GRPC's.
        self.grpc_code = grpc_code


def request_id_of(request: Request) -> str:
    return getattr(request.state, "request_id", "")


def problem_response(
    request: Request,
    *,
    status: int,
    reason: str,
    detail: str | None = None,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_PREFIX + reason.lower(),
        "title": HTTPStatus(status).phrase,
        "status": status,
        "instance": request.url.path,
        "reason": reason,
        "request_id": request_id_of(request),
    }
    if detail:
        body["detail"] = detail
    body.update(extra or {})
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_CONTENT_TYPE)


def service_problem(error: grpc.aio.AioRpcError) -> ProblemError:
    """The refusal a failed call to a service becomes, through GRPC_TO_HTTP: the same for the REST
    face (``grpc_problem``) and the partner gRPC face (gateway.partner_grpc)."""
    code = error.code()
    mapping = http_mapping(code)
    reason, metadata = error_info(error)
    if mapping.status >= 500:
        # The caller learns only that it failed; the operator gets the service's message.
        log.error("service call failed", grpc_code=code.name, grpc_reason=reason, grpc_detail=error.details())
    if mapping is FALLBACK_MAPPING:
        return ProblemError(status=500, reason="INTERNAL", grpc_code=grpc.StatusCode.INTERNAL)
    detail = error.details() if mapping.show_detail else (mapping.fixed_detail or UNAVAILABLE_DETAIL)
    headers = {"Retry-After": _retry_after(metadata)} if mapping.status in (429, 503) else None
    if code is grpc.StatusCode.UNIMPLEMENTED:
        reason = "NOT_IMPLEMENTED"
    extra = {key: _surfaced(key, metadata[key]) for key in SURFACED_METADATA if key in metadata} \
        if mapping.show_detail else None
    return ProblemError(status=mapping.status, reason=reason or code.name, detail=detail, headers=headers,
                        extra=extra, grpc_code=code)


_NUMERIC_METADATA = ("attempts_left", "retry_after_s")


def _surfaced(key: str, value: str) -> str | int:
    """Counts and waits as JSON numbers, everything else as the service sent it."""
    return int(value) if key in _NUMERIC_METADATA and value.isdigit() and len(value) <= 9 else value


def _retry_after(metadata: dict[str, str]) -> str:
    """The service's own wait when it gave one (a locked PIN), else a second."""
    value = metadata.get("retry_after_s", "")
    return value if value.isdigit() and 0 < len(value) <= 6 else "1"


def grpc_problem(request: Request, *, error: grpc.aio.AioRpcError) -> JSONResponse:
    """The problem for a failed call to a service, through GRPC_TO_HTTP."""
    problem = service_problem(error)
    return problem_response(request, status=problem.status, reason=problem.reason, detail=problem.detail,
                            headers=problem.headers or None, extra=problem.extra or None)


def validation_problem(errors: Sequence[Mapping[str, Any]]) -> ProblemError:
    """422 VALIDATION_FAILED for pydantic's errors of a request: where and what, never the value."""
    # Only where and what: pydantic's "input" would echo the submitted value back (and into any
    # log of the response), which may be a secret.
    listed = [{"loc": [str(part) for part in err.get("loc", ())], "msg": err.get("msg", ""),
               "type": err.get("type", "")} for err in errors]
    fields = ", ".join(".".join(e["loc"]) for e in listed[:5])
    return ProblemError(status=422, reason="VALIDATION_FAILED", detail=f"the request does not fit the schema: {fields}",
                        extra={"errors": listed})


async def _on_problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ProblemError)
    return problem_response(
        request, status=exc.status, reason=exc.reason, detail=exc.detail, headers=exc.headers, extra=exc.extra
    )


async def _on_grpc_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, grpc.aio.AioRpcError)
    return grpc_problem(request, error=exc)


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return await _on_problem(request, validation_problem(exc.errors()))


_HTTP_REASONS = {
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
}


def _allowed_methods(request: Request) -> str:
    # Starlette's 405 names only the methods of the first route with this path; each method of a
    # path is its own route here, so Allow has to be gathered from all of them.
    methods: set[str] = set()
    for route in iter_route_contexts(request.app.routes):
        match, _child_scope = route.matches(request.scope)
        if match is not Match.NONE:
            methods |= route.methods or set()
    return ", ".join(sorted(methods))


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    reason = _HTTP_REASONS.get(status, HTTPStatus(status).name)
    detail = exc.detail if isinstance(exc.detail, str) and exc.detail != HTTPStatus(status).phrase else None
    if status == 404 and detail is None:
        detail = "no such route"
    headers = dict(exc.headers or {})
    if status == 405:
        headers["Allow"] = _allowed_methods(request) or headers.get("Allow", "")
    return problem_response(request, status=status, reason=reason, detail=detail, headers=headers)


def install_problem_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ProblemError, _on_problem)
    app.add_exception_handler(grpc.aio.AioRpcError, _on_grpc_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
