"""The one table from gRPC status codes to HTTP statuses."""
from __future__ import annotations

import grpc
import pytest

from gateway.problems import FALLBACK_MAPPING, GRPC_TO_HTTP, http_mapping


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 400),
        (grpc.StatusCode.NOT_FOUND, 404),
        (grpc.StatusCode.ALREADY_EXISTS, 409),
        (grpc.StatusCode.ABORTED, 409),
        (grpc.StatusCode.FAILED_PRECONDITION, 409),
        (grpc.StatusCode.PERMISSION_DENIED, 403),
        (grpc.StatusCode.UNAUTHENTICATED, 401),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
        (grpc.StatusCode.UNAVAILABLE, 503),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
        (grpc.StatusCode.INTERNAL, 500),
        (grpc.StatusCode.UNKNOWN, 500),
        (grpc.StatusCode.DATA_LOSS, 500),
    ],
)
def test_each_grpc_code_maps_to_its_http_status(code: grpc.StatusCode, status: int) -> None:
    assert http_mapping(code).status == status


def test_server_side_failures_never_show_the_service_message() -> None:
    for mapping in [*GRPC_TO_HTTP.values(), FALLBACK_MAPPING]:
        if mapping.status >= 500:
            assert not mapping.show_detail
