"""Client side of the mesh: mutual-TLS channels that carry the request id, and reading an error's reason.

Replicas: a target may list several addresses of one service, ``10.0.0.5:50053,10.0.0.6:50053``
(two processes behind one setting), or name a gRPC resolver, ``dns:///ledger.onecard:50053`` (a
headless Kubernetes Service: every pod's address). The channel spreads its calls over every
address that answers (gRPC's ``round_robin`` policy) and leaves out one that stops answering, so a
replica that dies costs the calls in flight on it, not the next ones. Each address is checked as
the same service (the TLS name is the service's, whatever the address).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import grpc
import structlog
from google.rpc import error_details_pb2, status_pb2

from runtime.grpc_server import MAX_MESSAGE_BYTES, REQUEST_ID_METADATA, STATUS_DETAILS_METADATA
from runtime.mesh import MeshTLS
from runtime.targets import channel_target

ROUND_ROBIN_SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


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


def open_channel(target: str, *, tls: MeshTLS | None, server_name: str,
                 options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
    """A long-lived channel to the mesh service ``server_name`` at ``target`` (one address or the
    addresses of its replicas, ``channel_target``), calls spread round robin over those that answer.

    With ``tls`` (this process's material) the channel presents its certificate and accepts only a
    server certificate from the same CA naming ``server_name``, whatever host or address ``target``
    names. ``tls=None`` is plaintext: insecure development mode only.
    """
    channel_options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        # Every call to the next address that is up, so the load spreads over a service's replicas.
        ("grpc.service_config", ROUND_ROBIN_SERVICE_CONFIG),
        *options,
    ]
    target = channel_target(target)
    if tls is None:
        return grpc.aio.insecure_channel(target, interceptors=[_RequestIdInterceptor()], options=channel_options)
    channel_options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.aio.secure_channel(target, tls.channel_credentials(), interceptors=[_RequestIdInterceptor()],
                                   options=channel_options)


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
