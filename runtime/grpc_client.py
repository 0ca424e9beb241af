"""Client side of the mesh: channels that carry the request id, and reading an error's reason."""
from __future__ import annotations

from typing import Any

import grpc
import structlog
from google.rpc import error_details_pb2, status_pb2

from runtime.grpc_server import MAX_MESSAGE_BYTES, REQUEST_ID_METADATA, STATUS_DETAILS_METADATA


class _RequestIdInterceptor(grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    """Forwards the request id bound in the caller's log context as ``x-request-id`` metadata."""

    @staticmethod
    def _with_request_id(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        request_id = structlog.contextvars.get_contextvars().get("request_id")
        if not request_id:
            return details
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        metadata.add(REQUEST_ID_METADATA, request_id)
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials, details.wait_for_ready)

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_request_id(details), request)

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_request_id(details), request)


def open_channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(
        target,
        interceptors=[_RequestIdInterceptor()],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )


def error_info(error: grpc.aio.AioRpcError) -> tuple[str | None, dict[str, str]]:
    """The ErrorInfo reason and metadata a onecard service attached to a failed call, if any."""
    for key, value in error.trailing_metadata() or ():
        if key == STATUS_DETAILS_METADATA and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info.reason, dict(info.metadata)
    return None, {}
