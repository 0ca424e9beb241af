"""Tenants: creation, idempotent replay with a caller-chosen id, and validation."""

import uuid

import asyncpg
import grpc

from onecard.identity.v1 import identity_pb2 as pb
from tests.identity.support import create_tenant, refused


async def test_created_tenant_is_answered_and_found(identity) -> None:
    created = (
        await identity.stub.CreateTenant(
            pb.CreateTenantRequest(
                name=" No. 1 Middle School ", kind=pb.TENANT_KIND_K12, time_zone="Asia/Urumqi", currency="CNY"
            )
        )
    ).tenant
    uuid.UUID(created.tenant_id)
    assert (created.name, created.kind, created.time_zone, created.currency) == (
        "No. 1 Middle School",
        pb.TENANT_KIND_K12,
        "Asia/Urumqi",
        "CNY",
    )
    found = (await identity.stub.GetTenant(pb.GetTenantRequest(tenant_id=created.tenant_id))).tenant
    assert found == created


async def test_empty_currency_means_cny(identity) -> None:
    tenant_id = await create_tenant(identity.stub, currency="")
    tenant = (await identity.stub.GetTenant(pb.GetTenantRequest(tenant_id=tenant_id))).tenant
    assert tenant.currency == "CNY"


async def test_repeating_create_with_the_same_id_and_fields_answers_the_same_tenant(
    identity, db: asyncpg.Connection
) -> None:
    request = pb.CreateTenantRequest(
        tenant_id=str(uuid.uuid4()), name="Acme", kind=pb.TENANT_KIND_ENTERPRISE, time_zone="UTC", currency="CNY"
    )
    first = (await identity.stub.CreateTenant(request)).tenant
    second = (await identity.stub.CreateTenant(request)).tenant
    assert first == second
    assert first.tenant_id == request.tenant_id
    assert await db.fetchval("SELECT count(*) FROM tenants") == 1
    assert await db.fetchval("SELECT count(*) FROM outbox WHERE subject = 'identity.tenant.created'") == 1


async def test_same_id_with_other_fields_is_already_exists(identity, db: asyncpg.Connection) -> None:
    tenant_id = str(uuid.uuid4())
    await create_tenant(identity.stub, tenant_id=tenant_id, name="Acme")
    code, reason = await refused(create_tenant(identity.stub, tenant_id=tenant_id, name="Acme Corp"))
    assert (code, reason) == (grpc.StatusCode.ALREADY_EXISTS, "TENANT_EXISTS")
    assert await db.fetchval("SELECT name FROM tenants") == "Acme"


async def test_bad_tenant_input_is_refused_with_a_reason_and_writes_nothing(identity, db: asyncpg.Connection) -> None:
    cases = [
        ({"kind": pb.TENANT_KIND_UNSPECIFIED}, "TENANT_KIND_INVALID"),
        ({"kind": 42}, "TENANT_KIND_INVALID"),
        ({"time_zone": "Mars/Olympus_Mons"}, "TIME_ZONE_INVALID"),
        ({"time_zone": ""}, "TIME_ZONE_INVALID"),
        ({"time_zone": "../../etc/passwd"}, "TIME_ZONE_INVALID"),
        ({"currency": "USD"}, "CURRENCY_UNSUPPORTED"),
        ({"name": "  "}, "TENANT_NAME_INVALID"),
        ({"name": "x" * 101}, "TENANT_NAME_INVALID"),
        ({"name": "bad\x00name"}, "TENANT_NAME_INVALID"),
        ({"tenant_id": "not-a-uuid"}, "TENANT_ID_INVALID"),
    ]
    for fields, expected_reason in cases:
        code, reason = await refused(create_tenant(identity.stub, **fields))
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, expected_reason), fields
    assert await db.fetchval("SELECT count(*) FROM tenants") == 0
    assert await db.fetchval("SELECT count(*) FROM outbox") == 0


async def test_get_tenant_unknown_is_not_found_and_malformed_is_invalid(identity) -> None:
    assert await refused(identity.stub.GetTenant(pb.GetTenantRequest(tenant_id=str(uuid.uuid4())))) == (
        grpc.StatusCode.NOT_FOUND,
        "TENANT_NOT_FOUND",
    )
    assert await refused(identity.stub.GetTenant(pb.GetTenantRequest(tenant_id="42"))) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "TENANT_ID_INVALID",
    )


async def test_list_tenants_pages_through_every_tenant_in_id_order(identity) -> None:
    created = sorted([await create_tenant(identity.stub, name=f"Campus {n}") for n in range(5)])
    seen, token, pages = [], "", 0
    while True:
        page = await identity.stub.ListTenants(pb.ListTenantsRequest(page_size=2, page_token=token))
        seen += [tenant.tenant_id for tenant in page.tenants]
        pages, token = pages + 1, page.next_page_token
        if not token:
            break
    assert (seen, pages) == (created, 3)


async def test_list_tenants_refuses_a_bad_page_token_and_an_oversized_page(identity) -> None:
    assert await refused(identity.stub.ListTenants(pb.ListTenantsRequest(page_token="nope"))) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")
    assert await refused(identity.stub.ListTenants(pb.ListTenantsRequest(page_size=1001))) == (
        grpc.StatusCode.INVALID_ARGUMENT, "PAGE_SIZE_TOO_LARGE")
