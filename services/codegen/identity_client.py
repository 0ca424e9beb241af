"""What codegen asks identity: a member's status, over gRPC. Identity's refusals become codegen's."""

from __future__ import annotations

import asyncio
import uuid

import grpc

from onecard.identity.v1 import identity_pb2, identity_pb2_grpc
from runtime.errors import InvalidArgument, NotFound, Unavailable
from runtime.grpc_client import error_info, open_channel
from runtime.mesh import MeshTLS
from services.codegen.domain import MemberStatus

_STATUS = {
    identity_pb2.MEMBER_STATUS_ACTIVE: MemberStatus.ACTIVE,
    identity_pb2.MEMBER_STATUS_FROZEN: MemberStatus.FROZEN,
    identity_pb2.MEMBER_STATUS_LEFT: MemberStatus.LEFT,
}


class IdentityClient:
    """Holds the identity channel for the life of the process (``hold`` runs as a background task)."""

    def __init__(self, *, target: str, timeout_s: float):
        self._target = target
        self._timeout_s = timeout_s
        self._stub: identity_pb2_grpc.IdentityServiceStub | None = None

    async def hold(self, *, tls: MeshTLS | None) -> None:
        """Open the channel, keep it until cancelled, then close it: one place for both."""
        channel = open_channel(self._target, tls=tls, server_name="identity")
        self._stub = identity_pb2_grpc.IdentityServiceStub(channel)
        try:
            await asyncio.Event().wait()
        finally:
            self._stub = None
            await channel.close()

    async def member_status(self, *, tenant_id: uuid.UUID, member_id: uuid.UUID) -> tuple[MemberStatus, int]:
        """The member's status and version, as identity has it now."""
        if self._stub is None:
            raise Unavailable("codegen is starting: identity not connected yet", reason="STARTING")
        try:
            answer = await self._stub.GetMember(
                identity_pb2.GetMemberRequest(tenant_id=str(tenant_id), member_id=str(member_id)),
                timeout=self._timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            reason, _ = error_info(exc)
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                # The same answer for an unknown tenant and another tenant's member.
                raise NotFound(f"no member {member_id} in this tenant", reason="MEMBER_NOT_FOUND") from None
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidArgument(exc.details() or "invalid member", reason=reason or "INVALID_ARGUMENT") from None
            raise Unavailable("identity did not answer; retry later", reason="IDENTITY_UNAVAILABLE") from None
        member = answer.member
        return _STATUS[member.status], member.version
