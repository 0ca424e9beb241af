"""Errors: bad input, unknown routes, unexpected exceptions, rate limits, request ids."""
from __future__ import annotations

import uuid
from typing import Any

import structlog

from devstack.servers import free_port
from gateway.auth import MEMBERS_READ, MEMBERS_WRITE
from gateway.routes.identity import MAX_CSV_BYTES
from onecard.identity.v1 import identity_pb2 as pb
from tests.gateway.conftest import TENANT_SCOPES, Gateway, assert_problem, gateway_settings, running_gateway


async def feed_and_members(gateway: Gateway, tenant_id: str) -> tuple[bytes, bytes]:
    feed = await gateway.stub.ListDirectoryChanges(pb.ListDirectoryChangesRequest(tenant_id=tenant_id, page_size=1000))
    members = await gateway.stub.SearchMembers(pb.SearchMembersRequest(tenant_id=tenant_id, page_size=200))
    return feed.SerializeToString(deterministic=True), members.SerializeToString(deterministic=True)


async def test_bad_input_is_a_problem_and_changes_nothing(gateway: Gateway) -> None:
    access = await gateway.tenant_access(scopes=TENANT_SCOPES)
    base = f"/v1/tenants/{access.tenant_id}"
    member = await gateway.http.post(f"{base}/members", headers=access.headers,
                                     json={"external_number": "E1", "name": "Li Hua"})
    member_path = f"{base}/members/{member.json()['member_id']}"
    unknown_member = f"{base}/members/{uuid.uuid4()}"
    csv_headers = {**access.headers, "Content-Type": "text/csv"}
    cases: list[tuple[str, str, dict[str, Any], int, str | None]] = [
        # (method, path, request arguments, status, reason)
        ("POST", f"{base}/members", {"json": {}}, 422, "VALIDATION_FAILED"),
        ("POST", f"{base}/members", {"json": {"external_number": 5, "name": ["x"]}}, 422, "VALIDATION_FAILED"),
        ("POST", f"{base}/members", {"json": {"external_number": "E2", "name": "X", "groups": "physics"}}, 422,
         "VALIDATION_FAILED"),
        ("POST", f"{base}/members", {"json": {"external_number": "E2", "name": "X", "admin": True}}, 422,
         "VALIDATION_FAILED"),
        ("POST", f"{base}/members", {"content": b'{"name": ', "headers": {"Content-Type": "application/json"}},
         422, "VALIDATION_FAILED"),
        ("POST", f"{base}/members", {"json": {"external_number": "E2", "name": "X", "groups": {"hobby": "go"}}},
         400, "GROUP_KEY_INVALID"),
        ("POST", f"{base}/members", {"json": {"external_number": "E1", "name": "Duplicate"}}, 409, None),
        ("GET", f"{base}/members", {"params": {"page_size": 201}}, 422, "VALIDATION_FAILED"),
        ("GET", f"{base}/members", {"params": {"page_size": 0}}, 422, "VALIDATION_FAILED"),
        ("GET", f"{base}/members", {"params": {"page_size": "many"}}, 422, "VALIDATION_FAILED"),
        ("GET", f"{base}/members", {"params": {"status": "asleep"}}, 422, "VALIDATION_FAILED"),
        ("GET", unknown_member, {}, 404, None),
        ("GET", f"{base}/members/not-a-uuid", {}, 400, "MEMBER_ID_INVALID"),
        ("PATCH", f"{base}/members/not-a-uuid", {"json": {"name": "X"}}, 400, "MEMBER_ID_INVALID"),
        ("PATCH", member_path, {"json": {"name": 42}}, 422, "VALIDATION_FAILED"),
        ("POST", f"{unknown_member}/freeze", {}, 404, None),
        ("POST", f"{member_path}/cards", {"json": {"card_uid": "not-hex!"}}, 400, "CARD_UID_INVALID"),
        ("POST", f"{member_path}/cards", {"json": {}}, 422, "VALIDATION_FAILED"),
        ("POST", f"{member_path}/cards/0A0B0C0D0E/report-lost", {}, 404, None),
        ("PUT", f"{member_path}/face", {"json": {"face_enrolment_ref": ""}}, 422, "VALIDATION_FAILED"),
        ("GET", f"{base}/card-blacklist", {"params": {"since_version": -1}}, 422, "VALIDATION_FAILED"),
        ("GET", f"{base}/member-imports/{uuid.uuid4()}", {}, 404, None),
        ("GET", f"{base}/member-imports/not-a-uuid", {}, 400, None),
        ("POST", f"{base}/member-imports", {"content": b"number,full_name\n1,X\n", "headers": csv_headers}, 422,
         "IMPORT_FILE_INVALID"),
        ("POST", f"{base}/member-imports", {"content": b"external_number,name\n\xff\xfe,X\n", "headers": csv_headers},
         422, "IMPORT_FILE_INVALID"),
        ("POST", f"{base}/member-imports", {"json": {"csv": "external_number,name"}}, 415, "UNSUPPORTED_MEDIA_TYPE"),
        ("POST", f"{base}/member-imports", {"files": {"upload": ("m.csv", b"external_number,name\n")}}, 422,
         "VALIDATION_FAILED"),
        ("POST", f"{base}/member-imports", {"content": b"x" * (MAX_CSV_BYTES + 1), "headers": csv_headers}, 413,
         "PAYLOAD_TOO_LARGE"),
        ("POST", f"{base}/api-clients", {"json": {"name": "x", "scopes": ["root:all"]}}, 422, "VALIDATION_FAILED"),
        ("POST", f"{base}/api-clients", {"json": {"name": "x", "scopes": []}}, 422, "VALIDATION_FAILED"),
        ("PUT", f"{base}/api-clients/{uuid.uuid4()}/grant", {"json": {"scopes": [MEMBERS_READ]}}, 404, None),
        ("DELETE", f"{base}/api-clients/{uuid.uuid4()}/grant", {}, 404, None),
        ("GET", f"{base}/no-such-thing", {}, 404, "NOT_FOUND"),
        ("DELETE", f"{base}/members", {}, 405, "METHOD_NOT_ALLOWED"),
    ]
    before = await feed_and_members(gateway, access.tenant_id)

    for method, path, arguments, status, reason in cases:
        headers = {**access.headers, **arguments.pop("headers", {})}
        response = await gateway.http.request(method, path, headers=headers, **arguments)
        body = assert_problem(response, status, reason=reason)
        assert body["reason"], (method, path, body)
        if status == 405:
            assert "GET" in response.headers["allow"]

    assert await feed_and_members(gateway, access.tenant_id) == before


async def test_validation_problems_list_the_fields_without_echoing_values(gateway: Gateway) -> None:
    access = await gateway.tenant_access(scopes=[MEMBERS_WRITE])

    response = await gateway.http.post(f"/v1/tenants/{access.tenant_id}/members", headers=access.headers,
                                       json={"name": "very-private-value", "external_number": ["x"]})

    body = assert_problem(response, 422, reason="VALIDATION_FAILED")
    assert [e["loc"] for e in body["errors"]] == [["body", "external_number"]]
    assert "very-private-value" not in response.text


async def test_an_unexpected_exception_is_a_bare_500_with_the_request_id() -> None:
    settings = gateway_settings(identity_target=f"127.0.0.1:{free_port()}")
    async with running_gateway(settings) as (app, http):
        async def explode() -> None:
            raise RuntimeError("internal detail that must not leak")

        app.add_api_route("/test-only/explode", explode)
        response = await http.get("/test-only/explode", headers={"X-Request-Id": "trace-500"})

    body = assert_problem(response, 500, reason="INTERNAL")
    assert response.headers["x-request-id"] == "trace-500"
    assert "detail" not in body
    assert "internal detail" not in response.text and "Traceback" not in response.text


async def test_a_service_that_does_not_answer_is_a_503_without_internal_addresses() -> None:
    port = free_port()
    settings = gateway_settings(identity_target=f"127.0.0.1:{port}", identity_timeout_s=1.0)
    async with running_gateway(settings) as (_app, http):
        response = await http.post("/v1/oauth/token", data={"grant_type": "client_credentials",
                                                             "tenant_id": str(uuid.uuid4()),
                                                             "client_id": "c", "client_secret": "s"})
    assert response.status_code in (503, 504)
    assert_problem(response, response.status_code)
    assert str(port) not in response.text


async def test_request_ids_are_echoed_when_sane_and_generated_otherwise(gateway: Gateway) -> None:
    access = await gateway.tenant_access(scopes=[MEMBERS_READ])
    path = f"/v1/tenants/{access.tenant_id}"

    echoed = await gateway.http.get(path, headers={**access.headers, "X-Request-Id": "partner-7f3a.1"})
    replaced = await gateway.http.get(path, headers={**access.headers, "X-Request-Id": "bad id\twith spaces"})
    generated_on_error = await gateway.http.get(f"{path}/members/{uuid.uuid4()}", headers=access.headers)
    generated_unauthenticated = await gateway.http.get(path)
    too_long = await gateway.http.get(path, headers={**access.headers, "X-Request-Id": "a" * 200})

    assert echoed.status_code == 200 and echoed.headers["x-request-id"] == "partner-7f3a.1"
    assert replaced.headers["x-request-id"] not in ("", "bad id\twith spaces")
    assert len(replaced.headers["x-request-id"]) == 32
    assert too_long.headers["x-request-id"] != "a" * 200
    for response in (generated_on_error, generated_unauthenticated):
        assert response.json()["request_id"] == response.headers["x-request-id"]
    assert generated_on_error.headers["x-request-id"] != generated_unauthenticated.headers["x-request-id"]


async def test_a_client_over_its_rate_gets_429_with_retry_after_and_others_do_not(identity: Any) -> None:
    # One token a minute back in each bucket: however slow a busy machine makes the calls below, no
    # bucket refills between them.
    settings = gateway_settings(identity_target=identity.target, rate_limit_per_s=1 / 60, rate_limit_burst=3,
                                token_rate_limit_per_s=1 / 60, token_rate_limit_burst=3)
    async with running_gateway(settings) as (app, http):
        gateway = Gateway(app=app, http=http, stub=identity.stub, settings=settings)
        tenant_id = await gateway.create_tenant()
        busy = await gateway.create_client(tenant_id=tenant_id, scopes=[MEMBERS_READ])
        calm = await gateway.create_client(tenant_id=tenant_id, scopes=[MEMBERS_READ])
        busy_headers = {"Authorization": f"Bearer {await gateway.token(tenant_id=tenant_id, credentials=busy)}"}
        calm_headers = {"Authorization": f"Bearer {await gateway.token(tenant_id=tenant_id, credentials=calm)}"}
        path = f"/v1/tenants/{tenant_id}"

        allowed = [await http.get(path, headers=busy_headers) for _ in range(3)]
        refused = await http.get(path, headers=busy_headers)
        other_client = await http.get(path, headers=calm_headers)
        # The token endpoint has its own buckets, per caller address and per client id (burst 3):
        # the two tokens above and a third fit, a fourth does not.
        third_token = await gateway.request_token(tenant_id=tenant_id, credentials=busy)
        fourth_token = await gateway.request_token(tenant_id=tenant_id, credentials=busy)

    assert [r.status_code for r in allowed] == [200, 200, 200]
    assert_problem(refused, 429, reason="RATE_LIMITED")
    assert int(refused.headers["retry-after"]) >= 1
    assert other_client.status_code == 200
    assert third_token.status_code == 200
    assert_problem(fourth_token, 429, reason="RATE_LIMITED")
    assert int(fourth_token.headers["retry-after"]) >= 1


async def test_the_request_id_is_bound_where_the_identity_channel_reads_it() -> None:
    # runtime.grpc_client forwards the request id it finds in the log context as x-request-id
    # metadata; this proves the gateway binds it there for the whole handler, and unbinds it after.
    settings = gateway_settings(identity_target=f"127.0.0.1:{free_port()}")
    async with running_gateway(settings) as (app, http):
        async def context() -> dict[str, Any]:
            return dict(structlog.contextvars.get_contextvars())

        app.add_api_route("/test-only/context", context)
        response = await http.get("/test-only/context", headers={"X-Request-Id": "trace-ctx-1"})

    assert response.json()["request_id"] == "trace-ctx-1"
    assert structlog.contextvars.get_contextvars().get("request_id") != "trace-ctx-1"
