"""Small helpers shared by the codegen tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import nacl.signing
import pytest

from onecard.codegen.v1 import codegen_pb2 as pb
from runtime.grpc_client import error_info

T = TypeVar("T")


async def refused(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str | None]:
    """The status code and ErrorInfo reason of a call that must fail."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    reason, _ = error_info(info.value)
    return info.value.code(), reason


def holder_key() -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey.generate()


async def issue(stub: Any, tenant_id: str, member_id: str, *, key: nacl.signing.SigningKey | None = None,
                purposes: tuple[int, ...] = (pb.PURPOSE_PAY,), validity_s: int = 0) -> pb.IssueCredentialResponse:
    key = key or holder_key()
    return await stub.IssueCredential(pb.IssueCredentialRequest(
        tenant_id=tenant_id, member_id=member_id, holder_public_key=bytes(key.verify_key),
        purposes=list(purposes), validity_s=validity_s,
    ))


async def revocations(stub: Any, tenant_id: str, *, since_version: int = 0) -> pb.GetRevocationsResponse:
    return await stub.GetRevocations(pb.GetRevocationsRequest(tenant_id=tenant_id, since_version=since_version))


async def eventually(check: Callable[[], Awaitable[T | None]], *, timeout_s: float = 15.0,
                     what: str = "condition") -> T:
    """Poll ``check`` until it answers something truthy."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout_s}s")
        await asyncio.sleep(0.1)
