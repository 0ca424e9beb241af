"""What a partner does through the gateway, end to end against the real identity service."""
from __future__ import annotations

import asyncio
from typing import Any

from devstack.servers import free_port
from gateway.auth import CLIENTS_ADMIN, MEMBERS_READ, MEMBERS_WRITE, PLATFORM_ADMIN
from tests.gateway.conftest import Gateway, TenantAccess, assert_problem, gateway_settings, running_gateway

IMPORT_POLL_S = 0.1
IMPORT_TIMEOUT_S = 20.0
READY_TIMEOUT_S = 10.0


async def wait_for_import(gateway: Gateway, access: TenantAccess, location: str) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + IMPORT_TIMEOUT_S
    while True:
        response = await gateway.http.get(location, headers=access.headers)
        assert response.status_code == 200, response.text
        body = response.json()
        if body["state"] != "running":
            return body
        assert asyncio.get_running_loop().time() < deadline, body
        await asyncio.sleep(IMPORT_POLL_S)


async def test_token_create_search_freeze_and_the_feed_shows_it(gateway: Gateway) -> None:
    access = await gateway.tenant_access()
    base = f"/v1/tenants/{access.tenant_id}"

    created = await gateway.http.post(
        f"{base}/members",
        headers=access.headers,
        json={"external_number": "2025010203", "name": "Zhou Xinyi",
              "groups": {"department": "physics", "grade": "2025"}},
    )
    assert created.status_code == 201, created.text
    member = created.json()
    assert member["status"] == "active"
    assert member["groups"] == {"department": "physics", "grade": "2025"}
    assert created.headers["location"] == f"{base}/members/{member['member_id']}"
    assert member["created_at"].endswith("Z")

    by_prefix = await gateway.http.get(f"{base}/members", headers=access.headers, params={"q": "Zhou"})
    by_filter = await gateway.http.get(f"{base}/members", headers=access.headers,
                                       params={"department": "physics", "status": "active"})
    by_other_filter = await gateway.http.get(f"{base}/members", headers=access.headers,
                                             params={"department": "chemistry"})
    assert [m["member_id"] for m in by_prefix.json()["members"]] == [member["member_id"]]
    assert [m["member_id"] for m in by_filter.json()["members"]] == [member["member_id"]]
    assert by_other_filter.json()["members"] == []

    frozen = await gateway.http.post(f"{base}/members/{member['member_id']}/freeze", headers=access.headers,
                                     json={"reason": "unpaid dormitory fee"})
    assert frozen.status_code == 200, frozen.text
    assert frozen.json()["status"] == "frozen"

    feed = await gateway.http.get(f"{base}/directory-changes", headers=access.headers, params={"page_size": 10})
    assert feed.status_code == 200, feed.text
    changes = feed.json()["changes"]
    assert [c["kind"] for c in changes] == ["member_created", "member_frozen"]
    assert changes[-1]["member"]["status"] == "frozen"
    assert changes[0]["sequence"] < changes[1]["sequence"]
    after = await gateway.http.get(f"{base}/directory-changes", headers=access.headers,
                                   params={"cursor": feed.json()["next_cursor"]})
    assert after.json()["changes"] == []


async def test_member_lifecycle_cards_and_face_through_rest(gateway: Gateway) -> None:
    access = await gateway.tenant_access()
    base = f"/v1/tenants/{access.tenant_id}"
    member_id = (await gateway.http.post(f"{base}/members", headers=access.headers,
                                         json={"external_number": "E1", "name": "Li Hua"})).json()["member_id"]
    member_path = f"{base}/members/{member_id}"

    renamed = await gateway.http.patch(member_path, headers=access.headers,
                                       json={"name": "Li Hua Jr", "groups": {"role": "staff"}})
    assert renamed.status_code == 200, renamed.text
    assert (renamed.json()["name"], renamed.json()["groups"]) == ("Li Hua Jr", {"role": "staff"})

    bound = await gateway.http.post(f"{member_path}/cards", headers=access.headers, json={"card_uid": "04A224B2C35E80"})
    assert bound.status_code == 200, bound.text
    assert [(c["card_uid"], c["status"]) for c in bound.json()["cards"]] == [("04A224B2C35E80", "active")]
    lost = await gateway.http.post(f"{member_path}/cards/04A224B2C35E80/report-lost", headers=access.headers)
    assert lost.status_code == 200, lost.text
    assert lost.json()["cards"][0]["status"] == "lost"
    blacklist = await gateway.http.get(f"{base}/card-blacklist", headers=access.headers, params={"since_version": 0})
    assert [c["card_uid"] for c in blacklist.json()["cards"]] == ["04A224B2C35E80"]
    later = await gateway.http.get(f"{base}/card-blacklist", headers=access.headers,
                                   params={"since_version": blacklist.json()["version"]})
    assert later.json()["cards"] == []

    enrolled = await gateway.http.put(f"{member_path}/face", headers=access.headers,
                                      json={"face_enrolment_ref": "fv-7d1f2a"})
    assert enrolled.json()["face_enrolment_ref"] == "fv-7d1f2a"
    cleared = await gateway.http.delete(f"{member_path}/face", headers=access.headers)
    assert cleared.status_code == 200, cleared.text
    assert cleared.json()["face_enrolment_ref"] is None

    frozen = await gateway.http.post(f"{member_path}/freeze", headers=access.headers)
    assert frozen.json()["status"] == "frozen"
    unfrozen = await gateway.http.post(f"{member_path}/unfreeze", headers=access.headers)
    assert unfrozen.json()["status"] == "active"
    left = await gateway.http.post(f"{member_path}/leave", headers=access.headers)
    assert left.json()["status"] == "left"
    refused = await gateway.http.post(f"{member_path}/freeze", headers=access.headers)
    assert_problem(refused, 409, reason="MEMBER_LEFT")
    fetched = await gateway.http.get(member_path, headers=access.headers)
    assert fetched.json()["status"] == "left"


async def test_csv_import_reports_the_bad_row_and_imports_the_rest(gateway: Gateway) -> None:
    access = await gateway.tenant_access()
    base = f"/v1/tenants/{access.tenant_id}"
    csv = (
        "external_number,name,department,grade,class,role,status\n"
        "S001,Wang Fang,physics,2025,3,student,active\n"
        "S002,Chen Jie,physics,2025,3,student,graduated\n"
        "S003,Liu Yang,chemistry,2024,1,student,frozen\n"
    )

    started = await gateway.http.post(f"{base}/member-imports", headers={**access.headers, "Content-Type": "text/csv"},
                                      content=csv.encode())

    assert started.status_code == 202, started.text
    location = started.headers["location"]
    assert location == f"{base}/member-imports/{started.json()['import_id']}"
    done = await wait_for_import(gateway, access, location)
    assert done["state"] == "done", done
    assert (done["rows_total"], done["rows_created"], done["rows_failed"]) == (3, 2, 1)
    assert [(e["line"], e["external_number"]) for e in done["errors"]] == [(3, "S002")]
    members = await gateway.http.get(f"{base}/members", headers=access.headers)
    assert sorted(m["external_number"] for m in members.json()["members"]) == ["S001", "S003"]


async def test_csv_import_as_a_multipart_file(gateway: Gateway) -> None:
    access = await gateway.tenant_access()
    base = f"/v1/tenants/{access.tenant_id}"
    csv = b"external_number,name\nM001,Sun Li\n"

    started = await gateway.http.post(f"{base}/member-imports", headers=access.headers,
                                      files={"file": ("members.csv", csv, "text/csv")})

    assert started.status_code == 202, started.text
    done = await wait_for_import(gateway, access, started.headers["location"])
    assert (done["state"], done["rows_created"]) == ("done", 1)


async def test_a_tenant_admin_creates_lists_grants_and_revokes_api_clients(gateway: Gateway) -> None:
    admin = await gateway.tenant_access(scopes=[MEMBERS_READ, MEMBERS_WRITE, CLIENTS_ADMIN])
    other_tenant = await gateway.create_tenant(name="Other")
    base = f"/v1/tenants/{admin.tenant_id}"

    created = await gateway.http.post(f"{base}/api-clients", headers=admin.headers,
                                      json={"name": "canteen backend", "scopes": [MEMBERS_READ]})
    assert created.status_code == 201, created.text
    client = created.json()["client"]
    secret = created.json()["client_secret"]
    assert client["grants"] == [{"tenant_id": admin.tenant_id, "scopes": [MEMBERS_READ]}]
    token = await gateway.http.post("/v1/oauth/token", data={"grant_type": "client_credentials",
                                                              "tenant_id": admin.tenant_id,
                                                              "client_id": client["client_id"],
                                                              "client_secret": secret})
    assert token.json()["scope"] == MEMBERS_READ

    escalation = await gateway.http.post(f"{base}/api-clients", headers=admin.headers,
                                         json={"name": "too strong", "scopes": [PLATFORM_ADMIN]})
    body = assert_problem(escalation, 403, reason="SCOPE_NOT_HELD")
    assert PLATFORM_ADMIN in body["detail"]

    # A client another tenant also granted shows only this tenant's grant here.
    partner = await gateway.create_client(tenant_id=other_tenant, scopes=[MEMBERS_READ, MEMBERS_WRITE])
    granted = await gateway.http.put(f"{base}/api-clients/{partner.client_id}/grant", headers=admin.headers,
                                     json={"scopes": [MEMBERS_READ]})
    assert granted.status_code == 200, granted.text
    assert granted.json()["grants"] == [{"tenant_id": admin.tenant_id, "scopes": [MEMBERS_READ]}]
    listed = await gateway.http.get(f"{base}/api-clients", headers=admin.headers)
    assert partner.client_id in {c["client_id"] for c in listed.json()["clients"]}
    assert other_tenant not in listed.text

    revoked = await gateway.http.delete(f"{base}/api-clients/{partner.client_id}/grant", headers=admin.headers)
    assert revoked.status_code == 204
    listed_after = await gateway.http.get(f"{base}/api-clients", headers=admin.headers)
    assert partner.client_id not in {c["client_id"] for c in listed_after.json()["clients"]}


async def test_a_platform_admin_creates_a_tenant(gateway: Gateway) -> None:
    operator = await gateway.tenant_access(scopes=[PLATFORM_ADMIN, MEMBERS_READ])

    created = await gateway.http.post("/v1/tenants", headers=operator.headers,
                                      json={"name": "New School", "kind": "k12", "time_zone": "Asia/Shanghai"})

    assert created.status_code == 201, created.text
    tenant = created.json()
    assert (tenant["name"], tenant["kind"], tenant["currency"]) == ("New School", "k12", "CNY")
    assert created.headers["location"] == f"/v1/tenants/{tenant['tenant_id']}"
    # The operator's token is bound to its own tenant: the new one is not reachable with it.
    assert_problem(await gateway.http.get(created.headers["location"], headers=operator.headers), 404)


async def test_health_readiness_metrics_and_the_openapi_document(codes_gateway: Gateway) -> None:
    gateway = codes_gateway
    assert (await gateway.http.get("/healthz")).json() == {"status": "ok"}
    # identity's fixture returns once it is connected, a moment before its health turns SERVING.
    deadline = asyncio.get_running_loop().time() + READY_TIMEOUT_S
    while (ready := await gateway.http.get("/readyz")).status_code != 200:
        assert asyncio.get_running_loop().time() < deadline, ready.text
        await asyncio.sleep(0.05)
    assert ready.json() == {"status": "ready"}
    metrics = await gateway.http.get("/metrics")
    assert metrics.status_code == 200
    assert 'onecard_http_requests_total{method="GET",route="/readyz",status="200"}' in metrics.text

    document = (await gateway.http.get("/openapi.json")).json()
    assert document["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "bearerFormat": "JWT",
        "description": document["components"]["securitySchemes"]["bearer"]["description"],
    }
    assert "Problem" in document["components"]["schemas"]
    assert {t["name"] for t in document["tags"]} >= {"oauth", "members", "api-clients", "operations"}
    docs = await gateway.http.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


async def test_readiness_fails_while_identity_is_unreachable_but_liveness_holds() -> None:
    settings = gateway_settings(identity_target=f"127.0.0.1:{free_port()}",
                                codegen_target=f"127.0.0.1:{free_port()}", ready_timeout_s=0.5)
    async with running_gateway(settings) as (_app, http):
        assert (await http.get("/healthz")).status_code == 200
        body = assert_problem(await http.get("/readyz"), 503, reason="NOT_READY")
        assert body["not_ready"] == ["identity", "codegen"]


async def test_readiness_names_codegen_when_only_codegen_is_down(identity: Any) -> None:
    # identity serves; nothing listens where codegen should be.
    settings = gateway_settings(identity_target=identity.target, codegen_target=f"127.0.0.1:{free_port()}",
                                ready_timeout_s=0.5)
    async with running_gateway(settings) as (_app, http):
        deadline = asyncio.get_running_loop().time() + READY_TIMEOUT_S
        while True:
            response = await http.get("/readyz")
            body = assert_problem(response, 503, reason="NOT_READY")
            # identity's fixture returns a moment before its health turns SERVING.
            if body["not_ready"] == ["codegen"]:
                break
            assert asyncio.get_running_loop().time() < deadline, body
            await asyncio.sleep(0.05)
        assert "codegen" in body["detail"] and "identity" not in body["detail"]
        assert response.headers["retry-after"] == "1"
