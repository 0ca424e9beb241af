"""Partner API clients: a secret shown once and stored as a hash, tenant grants, authentication."""

import uuid

import asyncpg
import grpc

from onecard.identity.v1 import identity_pb2 as pb
from tests.identity.support import create_tenant, refused


async def new_client(
    stub, *, scopes: list[str], grants: dict[str, list[str]] | None = None
) -> pb.CreateApiClientResponse:  # noqa: ANN001
    return await stub.CreateApiClient(
        pb.CreateApiClientRequest(
            name="ICBC campus app",
            scopes=scopes,
            grants=[pb.TenantGrant(tenant_id=t, scopes=s) for t, s in (grants or {}).items()],
        )
    )


async def authenticate(stub, client_id: str, secret: str, tenant_id: str) -> pb.AuthenticateClientResponse:  # noqa: ANN001
    return await stub.AuthenticateClient(
        pb.AuthenticateClientRequest(client_id=client_id, client_secret=secret, tenant_id=tenant_id)
    )


async def test_secret_is_shown_once_and_only_its_hash_is_stored(
    identity, tenant_id: str, db: asyncpg.Connection
) -> None:
    created = await new_client(identity.stub, scopes=["members:read"], grants={tenant_id: ["members:read"]})
    client_id, secret = created.client.client_id, created.client_secret
    assert client_id.startswith("oc_") and len(secret) >= 40
    row = await db.fetchrow("SELECT * FROM api_clients WHERE client_id = $1", client_id)
    assert row["secret_hash"].startswith("$argon2id$")
    assert all(secret not in str(value) for value in row.values())
    listed = (await identity.stub.ListApiClients(pb.ListApiClientsRequest(tenant_id=tenant_id))).clients
    assert [c.client_id for c in listed] == [client_id]
    assert secret not in str(listed) and secret not in str(created.client)
    other = await new_client(identity.stub, scopes=["members:read"])
    assert other.client_secret != secret and other.client.client_id != client_id


async def test_authentication_answers_the_client_scopes_the_tenant_granted(identity, tenant_id: str) -> None:
    created = await new_client(
        identity.stub, scopes=["members:read", "payments:write", "topup"], grants={tenant_id: ["members:read", "topup"]}
    )
    answer = await authenticate(identity.stub, created.client.client_id, created.client_secret, tenant_id)
    assert (answer.client_id, answer.tenant_id, list(answer.scopes)) == (
        created.client.client_id,
        tenant_id,
        ["members:read", "topup"],
    )


async def test_wrong_secret_unknown_client_and_ungranted_tenant_all_fail_alike(identity, tenant_id: str) -> None:
    stub = identity.stub
    ungranted = await create_tenant(stub, name="Ungranted")
    created = await new_client(stub, scopes=["members:read"], grants={tenant_id: ["members:read"]})
    client_id, secret = created.client.client_id, created.client_secret
    attempts = [
        (client_id, secret + "x", tenant_id),
        (client_id, "", tenant_id),
        ("oc_000000000000000000000000", secret, tenant_id),
        ("", secret, tenant_id),
        (client_id, secret, ungranted),
        (client_id, secret, str(uuid.uuid4())),
        (client_id, secret, "not-a-uuid"),
        (client_id, "s" * 10_000, tenant_id),
    ]
    details = set()
    for attempt in attempts:
        with_details = None
        try:
            await authenticate(stub, *attempt)
        except grpc.aio.AioRpcError as exc:
            with_details = (exc.code(), exc.details())
        assert with_details is not None and with_details[0] == grpc.StatusCode.UNAUTHENTICATED, attempt
        details.add(with_details[1])
    assert len(details) == 1


async def test_scopes_are_validated_and_a_grant_can_only_narrow_them(identity, tenant_id: str, db) -> None:
    stub = identity.stub
    for scopes in [[], ["Members:Read"], ["members:"], ["members read"], ["a" * 65]]:
        assert await refused(new_client(stub, scopes=scopes)) == (grpc.StatusCode.INVALID_ARGUMENT, "SCOPES_INVALID"), (
            scopes
        )
    assert await refused(new_client(stub, scopes=["members:read"], grants={tenant_id: ["payments:write"]})) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "SCOPE_NOT_HELD",
    )
    assert await refused(new_client(stub, scopes=["members:read"], grants={str(uuid.uuid4()): ["members:read"]})) == (
        grpc.StatusCode.NOT_FOUND,
        "TENANT_NOT_FOUND",
    )
    assert await db.fetchval("SELECT count(*) FROM api_clients") == 0
    client = (await new_client(stub, scopes=["members:read"])).client
    grant = pb.GrantTenantAccessRequest(tenant_id=tenant_id, client_id=client.client_id, scopes=["members:write"])
    assert await refused(stub.GrantTenantAccess(grant)) == (grpc.StatusCode.INVALID_ARGUMENT, "SCOPE_NOT_HELD")
    unknown = pb.GrantTenantAccessRequest(tenant_id=tenant_id, client_id="oc_nobody", scopes=["members:read"])
    assert await refused(stub.GrantTenantAccess(unknown)) == (grpc.StatusCode.NOT_FOUND, "CLIENT_NOT_FOUND")


async def test_tenant_sees_only_its_own_grant(identity) -> None:
    stub = identity.stub
    tenant_a = await create_tenant(stub, name="A")
    tenant_b = await create_tenant(stub, name="B")
    await create_tenant(stub, name="C")
    created = await new_client(stub, scopes=["members:read", "topup"], grants={tenant_a: ["members:read"]})
    client_id = created.client.client_id
    granted = (
        await stub.GrantTenantAccess(
            pb.GrantTenantAccessRequest(tenant_id=tenant_b, client_id=client_id, scopes=["topup"])
        )
    ).client
    assert [(g.tenant_id, list(g.scopes)) for g in granted.grants] == [(tenant_b, ["topup"])]
    for tenant, scopes in [(tenant_a, ["members:read"]), (tenant_b, ["topup"])]:
        listed = (await stub.ListApiClients(pb.ListApiClientsRequest(tenant_id=tenant))).clients
        assert [(c.client_id, [(g.tenant_id, list(g.scopes)) for g in c.grants]) for c in listed] == [
            (client_id, [(tenant, scopes)])
        ]
        assert list(listed[0].scopes) == ["members:read", "topup"]


async def test_revoked_grant_no_longer_authenticates(identity, tenant_id: str) -> None:
    stub = identity.stub
    created = await new_client(stub, scopes=["members:read"], grants={tenant_id: ["members:read"]})
    client_id = created.client.client_id
    revoked = (
        await stub.RevokeTenantAccess(pb.RevokeTenantAccessRequest(tenant_id=tenant_id, client_id=client_id))
    ).client
    assert list(revoked.grants) == []
    assert await refused(authenticate(stub, client_id, created.client_secret, tenant_id)) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "UNAUTHENTICATED",
    )
    assert list((await stub.ListApiClients(pb.ListApiClientsRequest(tenant_id=tenant_id))).clients) == []
    assert await refused(
        stub.RevokeTenantAccess(pb.RevokeTenantAccessRequest(tenant_id=tenant_id, client_id=client_id))
    ) == (grpc.StatusCode.NOT_FOUND, "GRANT_NOT_FOUND")


async def test_a_grant_has_a_version_that_changes_with_it_and_answers_as_it_stands(identity, tenant_id: str) -> None:
    stub = identity.stub
    created = await new_client(stub, scopes=["members:read", "topup"], grants={tenant_id: ["members:read"]})
    client_id, secret = created.client.client_id, created.client_secret
    first = await authenticate(stub, client_id, secret, tenant_id)
    grant = await stub.GetTenantGrant(pb.GetTenantGrantRequest(tenant_id=tenant_id, client_id=client_id))
    assert (list(grant.scopes), grant.grant_version) == (["members:read"], first.grant_version)
    assert first.grant_version > 0

    # The same scopes again change nothing; other scopes make a new version.
    await stub.GrantTenantAccess(pb.GrantTenantAccessRequest(tenant_id=tenant_id, client_id=client_id,
                                                            scopes=["members:read"]))
    same = await stub.GetTenantGrant(pb.GetTenantGrantRequest(tenant_id=tenant_id, client_id=client_id))
    assert same.grant_version == first.grant_version
    await stub.GrantTenantAccess(pb.GrantTenantAccessRequest(tenant_id=tenant_id, client_id=client_id,
                                                            scopes=["members:read", "topup"]))
    wider = await stub.GetTenantGrant(pb.GetTenantGrantRequest(tenant_id=tenant_id, client_id=client_id))
    assert wider.grant_version > first.grant_version and list(wider.scopes) == ["members:read", "topup"]

    # Revoked and granted again: yet another version, so tokens of the first grant stay ended.
    await stub.RevokeTenantAccess(pb.RevokeTenantAccessRequest(tenant_id=tenant_id, client_id=client_id))
    assert await refused(stub.GetTenantGrant(pb.GetTenantGrantRequest(tenant_id=tenant_id, client_id=client_id))) == (
        grpc.StatusCode.NOT_FOUND, "GRANT_NOT_FOUND")
    await stub.GrantTenantAccess(pb.GrantTenantAccessRequest(tenant_id=tenant_id, client_id=client_id,
                                                            scopes=["members:read", "topup"]))
    again = await authenticate(stub, client_id, secret, tenant_id)
    assert again.grant_version > wider.grant_version
    # Another tenant, or an unknown client, has no grant.
    other = await create_tenant(stub, name="No grant here")
    for tenant, client in [(other, client_id), (tenant_id, "oc_nobody"), (tenant_id, "not a client id!")]:
        assert await refused(stub.GetTenantGrant(pb.GetTenantGrantRequest(tenant_id=tenant, client_id=client))) == (
            grpc.StatusCode.NOT_FOUND, "GRANT_NOT_FOUND")


async def test_a_revoked_client_loses_every_grant_and_is_never_granted_again(identity) -> None:
    stub = identity.stub
    tenant_a = await create_tenant(stub, name="A")
    tenant_b = await create_tenant(stub, name="B")
    created = await new_client(stub, scopes=["members:read"],
                               grants={tenant_a: ["members:read"], tenant_b: ["members:read"]})
    client_id, secret = created.client.client_id, created.client_secret

    await stub.RevokeApiClient(pb.RevokeApiClientRequest(client_id=client_id))
    await stub.RevokeApiClient(pb.RevokeApiClientRequest(client_id=client_id))  # again: nothing changes
    for tenant in (tenant_a, tenant_b):
        assert await refused(authenticate(stub, client_id, secret, tenant)) == (grpc.StatusCode.UNAUTHENTICATED,
                                                                                "UNAUTHENTICATED")
        assert await refused(stub.GetTenantGrant(pb.GetTenantGrantRequest(tenant_id=tenant, client_id=client_id))
                             ) == (grpc.StatusCode.NOT_FOUND, "GRANT_NOT_FOUND")
        assert list((await stub.ListApiClients(pb.ListApiClientsRequest(tenant_id=tenant))).clients) == []
    assert await refused(stub.GrantTenantAccess(pb.GrantTenantAccessRequest(
        tenant_id=tenant_a, client_id=client_id, scopes=["members:read"]))) == (grpc.StatusCode.FAILED_PRECONDITION,
                                                                                "CLIENT_REVOKED")
    assert await refused(stub.RevokeApiClient(pb.RevokeApiClientRequest(client_id="oc_nobody"))) == (
        grpc.StatusCode.NOT_FOUND, "CLIENT_NOT_FOUND")


def keyed(tenant_id: str, key: str, *, scopes: tuple[str, ...] = ("members:read",),
          key_scope: str = "") -> pb.CreateApiClientRequest:
    return pb.CreateApiClientRequest(name="Ops-made admin", scopes=scopes, idempotency_key=key, key_scope=key_scope,
                                     grants=[pb.TenantGrant(tenant_id=tenant_id, scopes=scopes)])


async def test_a_client_made_under_an_idempotency_key_is_made_once_and_its_secret_shown_once(
    identity, tenant_id: str, db: asyncpg.Connection
) -> None:
    import asyncio

    answers = await asyncio.gather(*(identity.stub.CreateApiClient(keyed(tenant_id, "admin-1")) for _ in range(4)))
    assert len({a.client.client_id for a in answers}) == 1
    shown = [a for a in answers if a.client_secret]
    assert len(shown) == 1 and not shown[0].secret_already_shown
    assert all(a.secret_already_shown and not a.client_secret for a in answers if a is not shown[0])
    again = await identity.stub.CreateApiClient(keyed(tenant_id, "admin-1"))
    assert again.secret_already_shown and again.client == shown[0].client
    assert await db.fetchval("SELECT count(*) FROM api_clients WHERE name = 'Ops-made admin'") == 1
    # The secret the first answer showed is the one that authenticates.
    client_id = shown[0].client.client_id
    assert (await authenticate(identity.stub, client_id, shown[0].client_secret, tenant_id)).client_id == client_id


async def test_an_idempotency_key_names_one_request_of_one_owner(identity, tenant_id: str) -> None:
    first = await identity.stub.CreateApiClient(keyed(tenant_id, "k"))
    code, reason = (await refused(identity.stub.CreateApiClient(keyed(tenant_id, "k", scopes=("members:write",)))))[:2]
    assert (code, reason) == (grpc.StatusCode.ABORTED, "IDEMPOTENCY_KEY_REUSED")
    # The same text is another owner's key when a partner's client files it (through the gateway).
    partner = await identity.stub.CreateApiClient(keyed(tenant_id, "k", key_scope="client:oc_partner"))
    assert partner.client_secret and partner.client.client_id != first.client.client_id
    code, reason = (await refused(identity.stub.CreateApiClient(keyed(tenant_id, "bad key"))))[:2]
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_IDEMPOTENCY_KEY")
