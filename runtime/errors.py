"""The domain error hierarchy and the one table that maps it to gRPC status codes.

Services raise these from their domain and store layers; the gRPC interceptor turns them into a
status code, a message and a machine-readable reason (google.rpc.ErrorInfo). Anything else that
escapes a handler becomes INTERNAL with no detail, so no stack trace reaches a caller.
"""
from __future__ import annotations

import grpc

ERROR_DOMAIN = "onecard"


class DomainError(Exception):
    """A refusal the caller can act on. ``reason`` is a stable UPPER_SNAKE identifier."""

    code: grpc.StatusCode = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"

    def __init__(self, message: str, *, reason: str | None = None, metadata: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = metadata or {}


class InvalidArgument(DomainError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"


class NotFound(DomainError):
    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(DomainError):
    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class Conflict(DomainError):
    """The same idempotency key with a different request, or a concurrent change."""

    code = grpc.StatusCode.ABORTED
    default_reason = "CONFLICT"


class FailedPrecondition(DomainError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class PermissionDenied(DomainError):
    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class Unauthenticated(DomainError):
    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class ResourceExhausted(DomainError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class Unavailable(DomainError):
    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


# The one table from domain errors to gRPC codes (each class carries its code; listed here so a
# reader sees the whole mapping in one place).
STATUS_BY_ERROR: dict[type[DomainError], grpc.StatusCode] = {
    cls: cls.code
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        Conflict,
        FailedPrecondition,
        PermissionDenied,
        Unauthenticated,
        ResourceExhausted,
        Unavailable,
    )
}
