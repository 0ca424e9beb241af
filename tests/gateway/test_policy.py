"""Policy through the gateway (scopes policy:admin, devices:sync, payments:create), against the real
identity, the real ledger and the real policy service: rule-set versions (create, validate, list,
read, publish), dry runs against a version and the published rules, the signed bundle for devices,
and app-initiated payments."""
from __future__ import annotations

import asyncio
import base64
import copy
import json
import uuid
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import nacl.signing
from onecard_policy.bundle import open_bundle
from onecard_policy.examples import university_rule_set

from devstack.servers import free_port
from gateway.auth import DEVICES_SYNC, LEDGER_ADMIN, PAYMENTS_CREATE, POLICY_ADMIN, WALLETS_READ, WALLETS_TOPUP
from onecard.identity.v1 import identity_pb2 as ipb
from tests.gateway.conftest import Gateway, TenantAccess, assert_problem, gateway_settings, running_gateway

SHANGHAI = ZoneInfo("Asia/Shanghai")
# 2026-11-26, a Thursday in Shanghai.
LUNCH = datetime(2026, 11, 26, 12, 0, tzinfo=SHANGHAI)
AFTERNOON = datetime(2026, 11, 26, 15, 0, tzinfo=SHANGHAI)
BREAKFAST = datetime(2026, 11, 26, 7, 30, tzinfo=SHANGHAI)


def _key() -> dict[str, str]:
    return {"Idempotency-Key": str(uuid.uuid4())}


def rules(*, canteen_merchant_id: str | None = None, canteen_always_open: bool = False) -> dict[str, Any]:
    """Demo University's rule set (docs/policy.md §2), its North Canteen named by the ledger
    settlement account; optionally with the canteen open all day (app payments happen "now")."""
    doc = copy.deepcopy(university_rule_set())
    if canteen_merchant_id is not None:
        doc = json.loads(json.dumps(doc).replace('"canteen-north"', json.dumps(canteen_merchant_id)))
    if canteen_always_open:
        doc["scenes"] = ["canteen" if isinstance(s, dict) and s["name"] == "canteen" else s for s in doc["scenes"]]
    return doc


def invalid_rules() -> dict[str, Any]:
    """A rule set the parser refuses: a voucher for a meal period that does not exist."""
    doc = rules()
    doc["vouchers"][0]["where"]["meal_periods"] = ["brunch"]
    return doc


async def _member(gateway: Gateway, tenant_id: str, number: str, groups: dict[str, str] | None = None) -> str:
    answer = await gateway.stub.CreateMember(ipb.CreateMemberRequest(
        tenant_id=tenant_id, external_number=number, name=f"Diner {number}", groups=groups or {"role": "student"}))
    return answer.member.member_id


class Campus:
    """One tenant: the school's policy admin, its finance office, a bank, a device and an app
    backend; the North Canteen's settlement account; one student with money in the cash purse."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def setup(self, *, cash_fen: int = 5_000) -> Campus:
        gateway = self.gateway
        self.admin = await gateway.tenant_access(scopes=(POLICY_ADMIN,))
        self.tenant_id = self.admin.tenant_id
        self.finance = await gateway.tenant_access(tenant_id=self.tenant_id, scopes=(LEDGER_ADMIN,))
        self.bank = await gateway.tenant_access(tenant_id=self.tenant_id, scopes=(WALLETS_READ, WALLETS_TOPUP))
        self.device = await gateway.tenant_access(tenant_id=self.tenant_id, scopes=(DEVICES_SYNC,))
        self.app = await gateway.tenant_access(tenant_id=self.tenant_id, scopes=(PAYMENTS_CREATE,))
        opened = await gateway.http.post(f"/v1/tenants/{self.tenant_id}/accounts", headers=self.finance.headers,
                                         json={"owner_kind": "merchant", "owner_id": "canteen-north",
                                               "purse_kind": "merchant_settlement"})
        assert opened.status_code in (200, 201), opened.text
        self.merchant_id = opened.json()["account"]["account_id"]
        # The bank may owe what the tests top up (a new partner may owe nothing).
        limited = await gateway.http.put(
            f"/v1/tenants/{self.tenant_id}/api-clients/{self.bank.credentials.client_id}/clearing-account",
            headers=self.finance.headers, json={"credit_limit_fen": 10_000_000})
        assert limited.status_code == 200, limited.text
        self.member_id = await _member(gateway, self.tenant_id, "S001")
        if cash_fen:
            await self.top_up(self.member_id, cash_fen)
        return self

    def url(self, suffix: str) -> str:
        return f"/v1/tenants/{self.tenant_id}{suffix}"

    async def top_up(self, member_id: str, amount_fen: int) -> None:
        response = await self.gateway.http.post(self.url(f"/members/{member_id}/top-ups"),
                                                headers={**self.bank.headers, **_key()},
                                                json={"amount_fen": amount_fen})
        assert response.status_code == 201, response.text

    async def cash(self, member_id: str) -> dict[str, Any]:
        response = await self.gateway.http.get(self.url(f"/members/{member_id}/balances"), headers=self.bank.headers)
        assert response.status_code == 200, response.text
        (cash,) = [p for p in response.json()["purses"] if p["purse_kind"] == "cash"]
        return cash

    async def create(self, doc: dict[str, Any], *, note: str = "") -> dict[str, Any]:
        response = await self.gateway.http.post(self.url("/rule-sets"), headers=self.admin.headers, json=doc,
                                                params={"note": note} if note else {})
        assert response.status_code == 201, response.text
        assert response.headers["location"] == self.url(f"/rule-sets/{response.json()['version']}")
        return response.json()

    async def publish(self, version: int, **body: Any) -> dict[str, Any]:
        response = await self.gateway.http.post(self.url(f"/rule-sets/{version}/publish"), headers=self.admin.headers,
                                                json=body or None)
        assert response.status_code == 200, response.text
        return response.json()

    async def published(self) -> int | None:
        response = await self.gateway.http.get(self.url("/rule-sets"), headers=self.admin.headers)
        assert response.status_code == 200, response.text
        return response.json()["published_version"]


async def _campus(gateway: Gateway, **kwargs: Any) -> Campus:
    return await Campus(gateway).setup(**kwargs)


# --- versions ------------------------------------------------------------------------------------


async def test_an_admin_creates_validates_lists_reads_and_publishes_rule_set_versions(policy_gateway: Gateway) -> None:
    gateway = policy_gateway
    c = await _campus(gateway, cash_fen=0)
    doc = rules()

    empty = await gateway.http.get(c.url("/rule-sets"), headers=c.admin.headers)
    assert empty.status_code == 200, empty.text
    assert empty.json() == {"versions": [], "next_page_token": None, "published_version": None}

    valid = await gateway.http.post(c.url("/rule-sets/validate"), headers=c.admin.headers, json=doc)
    assert valid.status_code == 200, valid.text
    assert valid.json()["valid"] is True and len(valid.json()["sha256"]) == 64

    first = await c.create(doc, note="autumn term")
    assert first["version"] == 1 and first["status"] == "draft" and first["note"] == "autumn term"
    assert first["sha256"] == valid.json()["sha256"]
    assert first["created_at"] and first["published_at"] is None and first["published_by"] is None

    got = await gateway.http.get(c.url("/rule-sets/1"), headers=c.admin.headers)
    assert got.status_code == 200, got.text
    assert got.json()["document"] == doc and got.json()["sha256"] == first["sha256"]

    # Publishing without a body records the calling client; again changes nothing.
    published = await c.publish(1)
    assert published["changed"] is True and published["previous_version"] is None
    assert published["version"]["status"] == "published"
    assert published["version"]["published_by"] == c.admin.credentials.client_id
    assert published["version"]["published_at"]
    again = await c.publish(1, published_by="zhang.wei@finance")
    assert again["changed"] is False
    assert await c.published() == 1

    # An invalid rule set is refused naming the rule; nothing is stored, version 1 stays in force.
    for path in ("/rule-sets", "/rule-sets/validate"):
        refused = await gateway.http.post(c.url(path), headers=c.admin.headers, json=invalid_rules())
        body = assert_problem(refused, 400, reason="UNKNOWN_MEAL_PERIOD")
        assert body["rule"] == "vouchers[dinner-voucher].where.meal_periods", body
        assert "brunch" in body["detail"] or "meal" in body["detail"]
    not_object = await gateway.http.post(c.url("/rule-sets"), headers=c.admin.headers, json=[1, 2])
    assert_problem(not_object, 422, reason="VALIDATION_FAILED")
    listed = await gateway.http.get(c.url("/rule-sets"), headers=c.admin.headers)
    assert [v["version"] for v in listed.json()["versions"]] == [1]
    assert listed.json()["published_version"] == 1

    # Unknown versions: 404, and the published one untouched.
    assert_problem(await gateway.http.get(c.url("/rule-sets/9"), headers=c.admin.headers), 404,
                   reason="RULE_SET_VERSION_NOT_FOUND")
    missing = await gateway.http.post(c.url("/rule-sets/9/publish"), headers=c.admin.headers,
                                      json={"published_by": "someone"})
    assert_problem(missing, 404, reason="RULE_SET_VERSION_NOT_FOUND")
    assert await c.published() == 1

    # A second version replaces the first when published; the first is superseded, kept.
    cheaper = rules()
    cheaper["limits"][0]["max"] = 5000
    second = await c.create(cheaper, note="lower canteen cap")
    assert second["version"] == 2 and second["sha256"] != first["sha256"]
    replaced = await c.publish(2, published_by="zhang.wei@finance")
    assert replaced["previous_version"] == 1 and replaced["changed"] is True
    assert replaced["version"]["published_by"] == "zhang.wei@finance"

    page_1 = await gateway.http.get(c.url("/rule-sets"), headers=c.admin.headers, params={"page_size": 1})
    assert page_1.status_code == 200, page_1.text
    assert [(v["version"], v["status"], v["document"]) for v in page_1.json()["versions"]] == [(2, "published", None)]
    assert page_1.json()["published_version"] == 2 and page_1.json()["next_page_token"]
    page_2 = await gateway.http.get(c.url("/rule-sets"), headers=c.admin.headers,
                                    params={"page_size": 1, "page_token": page_1.json()["next_page_token"]})
    assert [(v["version"], v["status"]) for v in page_2.json()["versions"]] == [(1, "superseded")]


# --- dry runs ------------------------------------------------------------------------------------


async def test_dry_runs_plan_a_payment_with_a_version_or_the_published_rules(policy_gateway: Gateway) -> None:
    gateway = policy_gateway
    c = await _campus(gateway)
    payment = {"member_id": c.member_id, "merchant_id": c.merchant_id, "scene": "canteen", "amount_fen": 1200,
               "time": LUNCH.isoformat()}

    nothing = await gateway.http.post(c.url("/policy/dry-run"), headers=c.admin.headers, json=payment)
    assert_problem(nothing, 409, reason="NO_PUBLISHED_RULE_SET")

    version = (await c.create(rules(canteen_merchant_id=c.merchant_id)))["version"]
    await c.publish(version)
    cash = await c.cash(c.member_id)

    # The published rules, the member's groups taken from the directory.
    now = await gateway.http.post(c.url("/policy/dry-run"), headers=c.admin.headers, json=payment)
    assert now.status_code == 200, now.text
    plan = now.json()
    assert plan["approved"] is True and plan["reason"] == "APPROVED"
    assert plan["legs"] == [{"purse_kind": "cash", "ref": "", "account_id": cash["account_id"], "amount_fen": 1200}]
    assert plan["charged_fen"] == 1200 and plan["discount_fen"] == 0 and plan["benefit"] is None
    assert (plan["scene"], plan["meal_period"], plan["service_date"]) == ("canteen", "lunch", "2026-11-26")
    assert plan["rule_set_version"] == version and len(plan["rule_set_sha256"]) == 64
    guarded = {g["counter_key"].split(":")[1] for g in plan["guards"]}
    assert {"daily-canteen", "student-daily", "meals-per-period"} <= guarded, plan["guards"]
    assert all(g["increment"] > 0 for g in plan["guards"])
    assert {c["counter_key"] for c in plan["counters"]} >= {g["counter_key"] for g in plan["guards"]}
    # Read-only: nothing moved.
    assert (await c.cash(c.member_id))["posted_fen"] == cash["posted_fen"]

    # Declines are answers, with the reason.
    closed = await gateway.http.post(c.url("/policy/dry-run"), headers=c.admin.headers,
                                     json={**payment, "time": AFTERNOON.isoformat()})
    assert closed.status_code == 200, closed.text
    assert (closed.json()["approved"], closed.json()["reason"]) == (False, "OUTSIDE_MEAL_PERIOD")
    assert closed.json()["legs"] == [] and closed.json()["guards"] == []
    broke = await gateway.http.post(c.url("/policy/dry-run"), headers=c.admin.headers,
                                    json={**payment, "amount_fen": 9_000})
    assert broke.json()["reason"] == "INSUFFICIENT_FUNDS", broke.text

    # Groups given are used as they are: an employee's breakfast is the tenant's.
    breakfast = await gateway.http.post(c.url("/policy/dry-run"), headers=c.admin.headers,
                                        json={**payment, "time": BREAKFAST.isoformat(),
                                              "member_groups": {"role": "employee"}})
    assert breakfast.status_code == 200, breakfast.text
    free = breakfast.json()
    assert (free["approved"], free["benefit"], free["charged_fen"], free["benefit_funding_fen"]) == (
        True, "free-breakfast", 0, 1200)

    # A draft is tried before it is published: a lower per-payment cap declines what passes now.
    strict = rules(canteen_merchant_id=c.merchant_id)
    strict["limits"][0]["max"] = 1000
    draft = (await c.create(strict, note="strict"))["version"]
    tried = await gateway.http.post(c.url(f"/rule-sets/{draft}/dry-run"), headers=c.admin.headers, json=payment)
    assert tried.status_code == 200, tried.text
    assert (tried.json()["approved"], tried.json()["reason"]) == (False, "LIMIT_EXCEEDED:canteen-per-payment")
    assert tried.json()["rule_set_version"] == draft
    old = await gateway.http.post(c.url(f"/rule-sets/{version}/dry-run"), headers=c.admin.headers, json=payment)
    assert old.json()["approved"] is True and old.json()["rule_set_version"] == version
    assert await c.published() == version

    # Unknown things.
    assert_problem(await gateway.http.post(c.url("/rule-sets/99/dry-run"), headers=c.admin.headers, json=payment),
                   404, reason="RULE_SET_VERSION_NOT_FOUND")
    stranger = {**payment, "member_id": str(uuid.uuid4())}
    assert_problem(await gateway.http.post(c.url("/policy/dry-run"), headers=c.admin.headers, json=stranger),
                   404, reason="MEMBER_NOT_FOUND")
    bad = await gateway.http.post(c.url("/policy/dry-run"), headers=c.admin.headers, json={**payment, "amount_fen": 0})
    assert_problem(bad, 422, reason="VALIDATION_FAILED")


# --- the bundle ------------------------------------------------------------------------------------


async def test_a_device_downloads_the_signed_bundle_and_opens_it_with_the_published_keys(
        policy_gateway: Gateway) -> None:
    gateway = policy_gateway
    c = await _campus(gateway, cash_fen=0)
    url = c.url("/policy/bundle")

    assert_problem(await gateway.http.get(url, headers=c.device.headers), 409, reason="NO_PUBLISHED_RULE_SET")
    keys = await gateway.http.get(c.url("/policy/bundle-keys"), headers=c.device.headers)
    assert keys.status_code == 200, keys.text
    trusted = {k["key_id"]: nacl.signing.VerifyKey(base64.b64decode(k["public_key"])) for k in keys.json()["keys"]}
    assert len(trusted) == 1 and all(k["created_at"] for k in keys.json()["keys"])

    doc = rules(canteen_merchant_id=c.merchant_id)
    created = await c.create(doc)
    await c.publish(created["version"])

    bundle = await gateway.http.get(url, headers=c.device.headers)
    assert bundle.status_code == 200, bundle.text
    assert bundle.headers["content-type"] == "application/octet-stream"
    assert bundle.headers["x-onecard-policy-version"] == str(created["version"])
    assert bundle.headers["x-onecard-policy-sha256"] == created["sha256"]
    assert bundle.headers["x-onecard-policy-key-id"] in trusted
    assert bundle.headers["etag"] == f'"{created["sha256"]}"'
    rule_set, version = open_bundle(bundle.content, trusted_keys=trusted, tenant_id=c.tenant_id)
    assert version == created["version"] and rule_set.digest == created["sha256"]

    # The device has it: 304, no body, the same headers.
    same = await gateway.http.get(url, headers={**c.device.headers, "If-None-Match": bundle.headers["etag"]})
    assert same.status_code == 304 and same.content == b""
    assert same.headers["etag"] == bundle.headers["etag"]
    assert same.headers["x-onecard-policy-version"] == str(created["version"])
    listed = await gateway.http.get(url, headers={**c.device.headers,
                                                  "If-None-Match": f'"x", W/{bundle.headers["etag"]}'})
    assert listed.status_code == 304

    # New rules published: the old ETag gets the new bundle.
    changed = rules(canteen_merchant_id=c.merchant_id)
    changed["limits"][0]["max"] = 8000
    second = await c.create(changed)
    await c.publish(second["version"])
    fresh = await gateway.http.get(url, headers={**c.device.headers, "If-None-Match": bundle.headers["etag"]})
    assert fresh.status_code == 200, fresh.text
    assert fresh.headers["x-onecard-policy-version"] == str(second["version"])
    _rule_set, version = open_bundle(fresh.content, trusted_keys=trusted, tenant_id=c.tenant_id)
    assert version == second["version"]


# --- app payments --------------------------------------------------------------------------------


async def test_an_app_pays_at_the_canteen_under_the_published_rules(policy_gateway: Gateway) -> None:
    gateway = policy_gateway
    c = await _campus(gateway, cash_fen=5_000)
    await c.publish((await c.create(rules(canteen_merchant_id=c.merchant_id, canteen_always_open=True)))["version"])
    url = c.url(f"/members/{c.member_id}/payments")
    body = {"merchant_account_id": c.merchant_id, "amount_fen": 1_200, "scene": "canteen",
            "external_ref": "order-0042"}
    headers = {**c.app.headers, **_key()}
    cash = await c.cash(c.member_id)

    paid = await gateway.http.post(url, headers=headers, json=body)
    assert paid.status_code == 201, paid.text
    answer = paid.json()
    assert answer["paid"] is True and answer["repeated"] is False
    assert answer["plan"]["approved"] is True and answer["plan"]["charged_fen"] == 1_200
    assert answer["plan"]["legs"][0]["purse_kind"] == "cash"
    transfer = answer["transfer"]
    assert transfer["kind"] == "payment" and transfer["amount_fen"] == 1_200
    assert transfer["merchant_account_id"] == c.merchant_id and transfer["external_ref"] == "order-0042"
    assert transfer["idempotency_key"] == headers["Idempotency-Key"]
    assert {b["account_id"]: b["posted_fen"] for b in answer["balances"]}[cash["account_id"]] == 3_800
    # The app sees the member's purse, not the canteen's takings (that needs statements:read).
    assert {b["account_id"] for b in answer["balances"]} == {cash["account_id"]}
    assert (await c.cash(c.member_id))["posted_fen"] == 3_800

    # The same key again: the first payment, nothing moves twice. (``repeated`` is true when the
    # rules planned the repeat differently from the first call; an identical repeat is answered by
    # the ledger's own idempotent replay, as the first call was.)
    repeat = await gateway.http.post(url, headers=headers, json=body)
    assert repeat.status_code == 201, repeat.text
    assert repeat.json()["paid"] is True
    assert repeat.json()["transfer"]["transfer_id"] == transfer["transfer_id"]
    assert (await c.cash(c.member_id))["posted_fen"] == 3_800

    # Declined by the rules: 200, paid false, the reason; nothing moved.
    declined = await gateway.http.post(url, headers={**c.app.headers, **_key()}, json={**body, "amount_fen": 4_000})
    assert declined.status_code == 200, declined.text
    assert declined.json()["paid"] is False and declined.json()["reason"] == "INSUFFICIENT_FUNDS"
    assert declined.json()["transfer"] is None and declined.json()["plan"]["approved"] is False
    over_cap = await gateway.http.post(url, headers={**c.app.headers, **_key()},
                                       json={**body, "amount_fen": 10_001})
    assert over_cap.status_code == 200, over_cap.text
    assert over_cap.json()["reason"] == "LIMIT_EXCEEDED:canteen-per-payment"
    assert (await c.cash(c.member_id))["posted_fen"] == 3_800


async def test_an_app_payment_is_refused_without_a_key_an_active_member_or_the_scope(
        policy_gateway: Gateway) -> None:
    gateway = policy_gateway
    c = await _campus(gateway, cash_fen=0)
    await c.publish((await c.create(rules(canteen_merchant_id=c.merchant_id, canteen_always_open=True)))["version"])
    body = {"merchant_account_id": c.merchant_id, "amount_fen": 100, "scene": "canteen"}

    no_key = await gateway.http.post(c.url(f"/members/{c.member_id}/payments"), headers=c.app.headers, json=body)
    assert_problem(no_key, 400, reason="IDEMPOTENCY_KEY_REQUIRED")
    unknown = await gateway.http.post(c.url(f"/members/{uuid.uuid4()}/payments"),
                                      headers={**c.app.headers, **_key()}, json=body)
    assert_problem(unknown, 404, reason="MEMBER_NOT_FOUND")
    frozen_id = await _member(gateway, c.tenant_id, "S002")
    await gateway.stub.FreezeMember(ipb.FreezeMemberRequest(tenant_id=c.tenant_id, member_id=frozen_id,
                                                            reason="lost phone"))
    frozen = await gateway.http.post(c.url(f"/members/{frozen_id}/payments"), headers={**c.app.headers, **_key()},
                                     json=body)
    assert_problem(frozen, 409, reason="MEMBER_NOT_ACTIVE")
    # A policy admin may plan payments but not make them.
    by_admin = await gateway.http.post(c.url(f"/members/{c.member_id}/payments"),
                                       headers={**c.admin.headers, **_key()}, json=body)
    assert_problem(by_admin, 403, reason="INSUFFICIENT_SCOPE")
    extra = await gateway.http.post(c.url(f"/members/{c.member_id}/payments"), headers={**c.app.headers, **_key()},
                                    json={**body, "legs": []})
    assert_problem(extra, 422, reason="VALIDATION_FAILED")


# --- configuration -----------------------------------------------------------------------------------


async def test_policy_routes_answer_503_on_a_gateway_without_policy(gateway: Gateway) -> None:
    access: TenantAccess = await gateway.tenant_access(scopes=(POLICY_ADMIN, DEVICES_SYNC))
    for response in (
        await gateway.http.get(f"/v1/tenants/{access.tenant_id}/rule-sets", headers=access.headers),
        await gateway.http.get(f"/v1/tenants/{access.tenant_id}/policy/bundle", headers=access.headers),
    ):
        assert_problem(response, 503, reason="POLICY_NOT_CONFIGURED")


async def test_readiness_names_policy_when_it_is_down_and_includes_it_when_serving(
        identity: Any, codegen_service: Any, policy_service: Any) -> None:
    down = gateway_settings(identity_target=identity.target, codegen_target=codegen_service.target,
                            policy_target=f"127.0.0.1:{free_port()}", ready_timeout_s=0.5)
    async with running_gateway(down) as (_app, http):
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            body = assert_problem(await http.get("/readyz"), 503, reason="NOT_READY")
            if body["not_ready"] == ["policy"]:
                break
            assert asyncio.get_running_loop().time() < deadline, body
            await asyncio.sleep(0.05)
    up = gateway_settings(identity_target=identity.target, codegen_target=codegen_service.target,
                          policy_target=policy_service.target)
    async with running_gateway(up) as (_app, http):
        deadline = asyncio.get_running_loop().time() + 10
        while (response := await http.get("/readyz")).status_code != 200:
            assert asyncio.get_running_loop().time() < deadline, response.text
            await asyncio.sleep(0.05)
        assert response.json() == {"status": "ready"}


async def test_a_retried_payment_that_drained_the_purse_answers_the_first_payment(policy_gateway: Gateway) -> None:
    """A retry after a timeout must not read as "not paid": the rules would now decline it (the
    purse is empty), but the key paid, so the answer is that payment."""
    gateway = policy_gateway
    c = await _campus(gateway, cash_fen=4_000)
    await c.publish((await c.create(rules(canteen_merchant_id=c.merchant_id, canteen_always_open=True)))["version"])
    url = c.url(f"/members/{c.member_id}/payments")
    headers = {**c.app.headers, **_key()}
    body = {"merchant_account_id": c.merchant_id, "amount_fen": 4_000, "scene": "canteen"}

    first = await gateway.http.post(url, headers=headers, json=body)
    assert first.status_code == 201, first.text
    assert (await c.cash(c.member_id))["posted_fen"] == 0
    retry = await gateway.http.post(url, headers=headers, json=body)
    assert retry.status_code == 201, retry.text
    assert retry.json()["paid"] is True and retry.json()["repeated"] is True
    assert retry.json()["transfer"]["transfer_id"] == first.json()["transfer"]["transfer_id"]
    assert (await c.cash(c.member_id))["posted_fen"] == 0


async def test_a_key_names_its_whole_payment_and_belongs_to_its_client(policy_gateway: Gateway) -> None:
    """The attack: a payment for member Y under another payment's key was answered "201 paid,
    repeated" with member X's transfer. Now a key names the whole request (member, merchant,
    price, device, scene, reference) and belongs to the client that sent it."""
    gateway = policy_gateway
    c = await _campus(gateway, cash_fen=5_000)
    await c.publish((await c.create(rules(canteen_merchant_id=c.merchant_id, canteen_always_open=True)))["version"])
    other_member = await _member(gateway, c.tenant_id, "S002")
    await c.top_up(other_member, 5_000)
    headers = {**c.app.headers, **_key()}
    body = {"merchant_account_id": c.merchant_id, "amount_fen": 1_200, "scene": "canteen"}
    first = await gateway.http.post(c.url(f"/members/{c.member_id}/payments"), headers=headers, json=body)
    assert first.status_code == 201, first.text

    for member, changed in ((other_member, body), (c.member_id, {**body, "amount_fen": 1_300}),
                            (c.member_id, {**body, "external_ref": "another-order"})):
        reused = await gateway.http.post(c.url(f"/members/{member}/payments"), headers=headers, json=changed)
        assert_problem(reused, 409, reason="IDEMPOTENCY_KEY_REUSED")
    assert (await c.cash(other_member))["posted_fen"] == 5_000
    assert (await c.cash(c.member_id))["posted_fen"] == 3_800

    # The same text from another client of the tenant is that client's own payment.
    other_app = await gateway.tenant_access(tenant_id=c.tenant_id, scopes=(PAYMENTS_CREATE,))
    theirs = await gateway.http.post(c.url(f"/members/{other_member}/payments"),
                                     headers={**other_app.headers, "Idempotency-Key": headers["Idempotency-Key"]},
                                     json=body)
    assert theirs.status_code == 201, theirs.text
    assert theirs.json()["repeated"] is False
    assert theirs.json()["transfer"]["transfer_id"] != first.json()["transfer"]["transfer_id"]
    assert (await c.cash(other_member))["posted_fen"] == 3_800
