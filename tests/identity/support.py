"""Small helpers shared by the identity tests."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

import grpc
import pytest

from onecard.identity.v1 import identity_pb2 as pb
from onecard.identity.v1 import identity_pb2_grpc
from runtime.grpc_client import error_info


def identity_stub(channel: grpc.aio.Channel) -> identity_pb2_grpc.IdentityServiceStub:
    return identity_pb2_grpc.IdentityServiceStub(channel)


async def refused(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str | None]:
    """The status code and ErrorInfo reason of a call that must fail."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    reason, _ = error_info(info.value)
    return info.value.code(), reason


async def create_tenant(stub: identity_pb2_grpc.IdentityServiceStub, **fields: Any) -> str:
    request = pb.CreateTenantRequest(
        name=fields.pop("name", "Tsinghua"),
        kind=fields.pop("kind", pb.TENANT_KIND_UNIVERSITY),
        time_zone=fields.pop("time_zone", "Asia/Shanghai"),
        currency=fields.pop("currency", "CNY"),
        **fields,
    )
    return (await stub.CreateTenant(request)).tenant.tenant_id


async def create_member(
    stub: identity_pb2_grpc.IdentityServiceStub,
    tenant_id: str,
    external_number: str,
    *,
    name: str | None = None,
    groups: dict[str, str] | None = None,
) -> pb.Member:
    request = pb.CreateMemberRequest(
        tenant_id=tenant_id,
        external_number=external_number,
        name=name or f"Member {external_number}",
        groups=groups or {},
    )
    return (await stub.CreateMember(request)).member


async def get_member(stub: identity_pb2_grpc.IdentityServiceStub, tenant_id: str, member_id: str) -> pb.Member:
    return (await stub.GetMember(pb.GetMemberRequest(tenant_id=tenant_id, member_id=member_id))).member


async def feed(stub: identity_pb2_grpc.IdentityServiceStub, tenant_id: str) -> list[pb.DirectoryChange]:
    """The tenant's whole directory feed."""
    changes: list[pb.DirectoryChange] = []
    cursor = ""
    while True:
        page = await stub.ListDirectoryChanges(
            pb.ListDirectoryChangesRequest(tenant_id=tenant_id, cursor=cursor, page_size=1000)
        )
        changes += page.changes
        if page.next_cursor == cursor:
            return changes
        cursor = page.next_cursor


def csv_file(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n").encode()


async def start_import(stub: identity_pb2_grpc.IdentityServiceStub, tenant_id: str, data: bytes) -> pb.MemberImport:
    response = await stub.StartMemberImport(pb.StartMemberImportRequest(tenant_id=tenant_id, csv=data))
    return getattr(response, "import")


async def get_import(stub: identity_pb2_grpc.IdentityServiceStub, tenant_id: str, import_id: str) -> pb.MemberImport:
    response = await stub.GetMemberImport(pb.GetMemberImportRequest(tenant_id=tenant_id, import_id=import_id))
    return getattr(response, "import")


async def finished_import(
    stub: identity_pb2_grpc.IdentityServiceStub, tenant_id: str, import_id: str, *, timeout_s: float = 30.0
) -> pb.MemberImport:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        record = await get_import(stub, tenant_id, import_id)
        if record.state != pb.IMPORT_STATE_RUNNING:
            return record
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"import still running after {timeout_s}s: {record}")
        await asyncio.sleep(0.02)


async def run_import(stub: identity_pb2_grpc.IdentityServiceStub, tenant_id: str, data: bytes) -> pb.MemberImport:
    started = await start_import(stub, tenant_id, data)
    return await finished_import(stub, tenant_id, started.import_id)
