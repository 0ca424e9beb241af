"""Tenant isolation and scopes, as a matrix over every route the app has.

ROUTE_CALLS says how to call each protected route. A route added to the app without an entry
here (or in PUBLIC_ROUTES) fails ``test_every_route_is_in_the_matrix``, so no route escapes the
isolation and scope matrices below.

Ids go wherever a route takes them: in the path, and in bodies and query strings as ``{name}``
placeholders (a payment's merchant account, a dry run's member, a batch's rows, a statement's
merchant, a lookup's key...). The isolation matrix calls each route with tenant B's path, with
A's path but B's ids in the path, and with A's path and A's path ids but B's ids in the body and
query; none may show anything of B or change anything B holds.
"""
from __future__ import annotations

import asyncio
import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import nacl.signing
from fastapi.routing import APIRoute, iter_route_contexts
from onecard_policy.examples import university_rule_set

from gateway.app import create_app
from gateway.auth import (
    CLIENTS_ADMIN,
    CODES_ADMIN,
    CODES_ISSUE,
    DATA_READ,
    DEVICES_ADMIN,
    DEVICES_SYNC,
    LEDGER_ADMIN,
    MEMBERS_BIND,
    MEMBERS_CODE_PAGE,
    MEMBERS_READ,
    MEMBERS_SELF_SERVICE,
    MEMBERS_WRITE,
    PAYMENTS_CREATE,
    PLATFORM_ADMIN,
    POLICY_ADMIN,
    MEMBER_TOKEN_EXTENSION,
    SCOPES,
    STATEMENTS_READ,
    WALLETS_READ,
    WALLETS_TOPUP,
    WEBHOOKS_MANAGE,
)
from onecard.codegen.v1 import codegen_pb2 as cpb
from onecard.devicehub.v1 import devicehub_pb2 as dpb
from onecard.devicehub.v1 import devicehub_pb2_grpc
from onecard.identity.v1 import identity_pb2 as pb
from onecard.ledger.v1 import ledger_pb2 as lpb
from onecard.policy.v1 import policy_pb2 as ppb
from onecard.webhooks.v1 import webhooks_pb2 as wpb
from tests.browser.test_console_http import CONSOLE_ROUTES
from tests.gateway.conftest import TENANT_SCOPES, Gateway, assert_problem, gateway_settings
from tests.ledger.support import allow_credit

CARD_A = "0A0B0C0D01"
CARD_B = "0B0B0C0D02"
MATRIX_CSV = b"external_number,name\nX900,Intruder\n"
SHANGHAI = ZoneInfo("Asia/Shanghai")
# An id named in a body or query: replaced by the tenant's (or, in the matrix, the other tenant's).
PLACEHOLDER = re.compile(r"\{[a-z_]+\}")
# ... and one that is always the path's tenant's, e.g. {own_ref}: the tenant's own program.
OWN = "own_"
# Base64 of a real Ed25519 public key: codegen refuses 32 bytes that are not a point of prime order.
MATRIX_HOLDER_KEY = "Hg9P8ERluAE8L8SPF3SQgUOLcTd8KBY03KD+MjFCh4o="
MATRIX_RULE_SET = university_rule_set()
# A dry run for the tenant's member (the directory is asked for the member's groups).
MATRIX_PAYMENT = {"member_id": "{member_id}", "merchant_id": "{merchant_account_id}", "scene": "store",
                  "amount_fen": 100}
MATRIX_ACCESS_RULES = {"time_zone": "Asia/Shanghai", "rules": [
    {"name": "intrusion", "places": ["dorm-3"], "purposes": ["access"], "from": "00:00", "to": "24:00"}]}
# The PIN populated_tenant sets for its member through its own partner client.
MATRIX_PIN = "402913"
MATRIX_ROLLOUT = {"target": "firmware", "version": "6.6.6", "kind": "pos", "stage_sizes": [1],
                  "success_threshold": 1.0, "error_threshold": 1}


@dataclass(frozen=True)
class RouteCall:
    json: dict[str, Any] | None = None
    content: bytes | None = None
    content_type: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    # Outcomes allowed with the caller's own tenant in the path but the other tenant's ids in it.
    foreign_ids_statuses: frozenset[int] = frozenset({404})
    # Outcomes allowed with the caller's own tenant and ids in the path, the other tenant's ids in
    # the body and query (routes whose body or query has {placeholders}).
    foreign_body_statuses: frozenset[int] = frozenset({404})

    @property
    def ids_outside_the_path(self) -> bool:
        return PLACEHOLDER.search(json.dumps([self.json, self.params])) is not None


def _filled(value: Any, ids: dict[str, str], own: dict[str, str]) -> Any:
    """``value`` with each ``{name}`` in its strings replaced by that id from ``ids``, and each
    ``{own_name}`` by the id of the path's tenant (``own``)."""
    def id_for(match: re.Match[str]) -> str:
        name = match.group()[1:-1]
        return own[name.removeprefix(OWN)] if name.startswith(OWN) else ids[name]

    if isinstance(value, str):
        return PLACEHOLDER.sub(id_for, value)
    if isinstance(value, dict):
        return {k: _filled(v, ids, own) for k, v in value.items()}
    if isinstance(value, list):
        return [_filled(v, ids, own) for v in value]
    return value


# Every protected route: how to call it with a body that would succeed in the caller's own tenant.
ROUTE_CALLS: dict[tuple[str, str], RouteCall] = {
    ("POST", "/v1/tenants"): RouteCall(json={"name": "Intruder School", "kind": "k12"}),
    ("GET", "/v1/tenants/{tenant_id}"): RouteCall(),
    ("POST", "/v1/tenants/{tenant_id}/members"): RouteCall(json={"external_number": "X901", "name": "Intruder"}),
    ("GET", "/v1/tenants/{tenant_id}/members"): RouteCall(params={"q": "{external_number}"},
                                                          foreign_body_statuses=frozenset({200})),
    ("GET", "/v1/tenants/{tenant_id}/members/{member_id}"): RouteCall(),
    ("PATCH", "/v1/tenants/{tenant_id}/members/{member_id}"): RouteCall(json={"name": "Renamed"}),
    ("POST", "/v1/tenants/{tenant_id}/members/{member_id}/freeze"): RouteCall(json={"reason": "intrusion"}),
    ("POST", "/v1/tenants/{tenant_id}/members/{member_id}/unfreeze"): RouteCall(),
    ("POST", "/v1/tenants/{tenant_id}/members/{member_id}/leave"): RouteCall(),
    ("POST", "/v1/tenants/{tenant_id}/members/{member_id}/cards"): RouteCall(json={"card_uid": "0C0C0C0C03"}),
    ("POST", "/v1/tenants/{tenant_id}/members/{member_id}/cards/{card_uid}/report-lost"): RouteCall(),
    ("PUT", "/v1/tenants/{tenant_id}/members/{member_id}/face"): RouteCall(json={"face_enrolment_ref": "fv-x"}),
    ("DELETE", "/v1/tenants/{tenant_id}/members/{member_id}/face"): RouteCall(),
    ("GET", "/v1/tenants/{tenant_id}/card-blacklist"): RouteCall(params={"since_version": 0}),
    ("POST", "/v1/tenants/{tenant_id}/member-imports"): RouteCall(content=MATRIX_CSV, content_type="text/csv"),
    ("GET", "/v1/tenants/{tenant_id}/member-imports/{import_id}"): RouteCall(),
    ("GET", "/v1/tenants/{tenant_id}/directory-changes"): RouteCall(),
    ("GET", "/v1/tenants/{tenant_id}/api-clients"): RouteCall(),
    ("POST", "/v1/tenants/{tenant_id}/api-clients"): RouteCall(json={"name": "intruder", "scopes": [MEMBERS_READ]}),
    # A tenant may grant itself any partner's client (that is how a bank gets in). Granting the
    # other tenant's client to one's own tenant therefore works, and must still show nothing of
    # the other tenant and change nothing the other tenant sees; the revoke below undoes it.
    ("PUT", "/v1/tenants/{tenant_id}/api-clients/{client_id}/grant"): RouteCall(
        json={"scopes": [MEMBERS_READ]}, foreign_ids_statuses=frozenset({200, 404})
    ),
    ("DELETE", "/v1/tenants/{tenant_id}/api-clients/{client_id}/grant"): RouteCall(
        foreign_ids_statuses=frozenset({204, 404})
    ),
    ("POST", "/v1/tenants/{tenant_id}/members/{member_id}/credentials"): RouteCall(
        json={"holder_public_key": MATRIX_HOLDER_KEY, "purposes": ["pay"]}
    ),
    ("POST", "/v1/tenants/{tenant_id}/members/{member_id}/token-batches"): RouteCall(
        json={"purposes": ["pay"], "hours": 1}
    ),
    ("GET", "/v1/tenants/{tenant_id}/trust-list"): RouteCall(params={"since_version": 0}),
    ("GET", "/v1/tenants/{tenant_id}/revocations"): RouteCall(params={"since_version": 0}),
    ("GET", "/v1/tenants/{tenant_id}/code-settings"): RouteCall(),
    ("PUT", "/v1/tenants/{tenant_id}/code-settings"): RouteCall(json={
        "caps": {"per_transaction_fen": 1, "per_day_fen": 2, "per_day_count": 3},
        "default_credential_validity_hours": 1, "default_purposes": ["pay"]}),
    ("POST", "/v1/tenants/{tenant_id}/issuer-keys/rotate"): RouteCall(),
    ("POST", "/v1/tenants/{tenant_id}/credentials/{credential_id}/revoke"): RouteCall(json={"reason": "intrusion"}),
    ("POST", "/v1/tenants/{tenant_id}/members/{member_id}/credentials/revoke"): RouteCall(json={"reason": "x"}),
    # The ledger. Writes carry an Idempotency-Key; ids in the path are the member's cash purse, a
    # payment, a grant batch and a subsidy program of the tenant named by the ids.
    ("GET", "/v1/tenants/{tenant_id}/members/{member_id}/balances"): RouteCall(),
    ("GET", "/v1/tenants/{tenant_id}/accounts/{account_id}"): RouteCall(),
    ("GET", "/v1/tenants/{tenant_id}/accounts/{account_id}/transfers"): RouteCall(params={"page_size": 10}),
    # A key the other tenant used: keys are per tenant, so nothing was booked under it here.
    ("GET", "/v1/tenants/{tenant_id}/payments/lookup"): RouteCall(params={"idempotency_key": "{payment_key}"},
                                                                  foreign_body_statuses=frozenset({200})),
    ("GET", "/v1/tenants/{tenant_id}/clearing-account"): RouteCall(),
    ("PUT", "/v1/tenants/{tenant_id}/api-clients/{client_id}/clearing-account"): RouteCall(
        json={"credit_limit_fen": 1}),
    ("POST", "/v1/tenants/{tenant_id}/members/{member_id}/top-ups"): RouteCall(
        json={"amount_fen": 100}, headers={"Idempotency-Key": "matrix-top-up"}),
    ("POST", "/v1/tenants/{tenant_id}/payments/{transfer_id}/refunds"): RouteCall(
        json={"amount_fen": 1}, headers={"Idempotency-Key": "matrix-refund"}),
    ("POST", "/v1/tenants/{tenant_id}/accounts/{account_id}/freeze"): RouteCall(),
    ("POST", "/v1/tenants/{tenant_id}/accounts/{account_id}/unfreeze"): RouteCall(),
    ("POST", "/v1/tenants/{tenant_id}/accounts"): RouteCall(
        json={"owner_kind": "merchant", "owner_id": "intruder", "purse_kind": "merchant_settlement"}),
    ("GET", "/v1/tenants/{tenant_id}/trial-balance"): RouteCall(),
    ("POST", "/v1/tenants/{tenant_id}/subsidy-programs"): RouteCall(
        json={"purse_kind": "voucher", "ref": "intrusion", "funding_account_id": "{funding_account_id}"}),
    ("GET", "/v1/tenants/{tenant_id}/subsidy-programs/{purse_kind}/{ref}"): RouteCall(),
    # The tenant's own program, a row naming a member. The ledger does not ask the directory about
    # rows (docs/api.md): a row naming the other tenant's member is granted this tenant's money in
    # this tenant's ledger (a purse B never sees), so 202 is all it can get.
    ("POST", "/v1/tenants/{tenant_id}/subsidy-batches"): RouteCall(
        json={"bill_number": "MATRIX-1", "purse_kind": "subsidy", "ref": "{own_ref}",
              "rows": [{"member_id": "{member_id}", "amount_fen": 1}]},
        foreign_body_statuses=frozenset({202})),
    ("GET", "/v1/tenants/{tenant_id}/subsidy-batches/{batch_id}"): RouteCall(),
    ("GET", "/v1/tenants/{tenant_id}/subsidy-batches/{batch_id}/rows"): RouteCall(params={"status": "granted"}),
    ("POST", "/v1/tenants/{tenant_id}/accounts/{account_id}/clawbacks"): RouteCall(
        json={"amount_fen": 1}, headers={"Idempotency-Key": "matrix-clawback"}),
    ("GET", "/v1/tenants/{tenant_id}/statements"): RouteCall(
        params={"merchant_account_id": "{merchant_account_id}", "date": "{today}"}),
    ("GET", "/v1/tenants/{tenant_id}/statements/totals"): RouteCall(
        params={"merchant_account_id": "{merchant_account_id}", "date": "{today}"}),
    # Prefunding, reversals, refunds to the bank, low-balance thresholds and the reconciliation
    # file. A client id names one the tenant granted, else 404 CLIENT_NOT_FOUND; the calling
    # client has no clearing account here, so its reversal and its own file are 404 too. {date}
    # is no one's id: it is the same day in both tenants.
    ("POST", "/v1/tenants/{tenant_id}/api-clients/{client_id}/clearing-account/fundings"): RouteCall(
        json={"amount_fen": 1, "bank_reference": "MATRIX-FUNDING", "value_date": "2026-12-01"},
        headers={"Idempotency-Key": "matrix-funding"}),
    ("POST", "/v1/tenants/{tenant_id}/members/{member_id}/bank-refunds"): RouteCall(
        json={"client_id": "{client_id}", "amount_fen": 1}, headers={"Idempotency-Key": "matrix-bank-refund"}),
    ("POST", "/v1/tenants/{tenant_id}/top-up-reversals"): RouteCall(
        json={"top_up_transfer_id": "{transfer_id}"}, headers={"Idempotency-Key": "matrix-reversal"}),
    ("PUT", "/v1/tenants/{tenant_id}/members/{member_id}/low-balance-threshold"): RouteCall(json={"threshold_fen": 1}),
    ("GET", "/v1/tenants/{tenant_id}/reconciliation/{date}"): RouteCall(),
    ("GET", "/v1/tenants/{tenant_id}/api-clients/{client_id}/reconciliation/{date}"): RouteCall(),
    # Policy. {version} is a rule-set version of the tenant named by the ids; versions are
    # numbered per tenant, so tenant B holds one more than A and B's last version is none of A's.
    ("POST", "/v1/tenants/{tenant_id}/rule-sets"): RouteCall(json=MATRIX_RULE_SET, params={"note": "intrusion"}),
    ("POST", "/v1/tenants/{tenant_id}/rule-sets/validate"): RouteCall(json=MATRIX_RULE_SET),
    ("GET", "/v1/tenants/{tenant_id}/rule-sets"): RouteCall(params={"page_size": 10}),
    ("GET", "/v1/tenants/{tenant_id}/rule-sets/{version}"): RouteCall(),
    ("POST", "/v1/tenants/{tenant_id}/rule-sets/{version}/publish"): RouteCall(json={"published_by": "intruder"}),
    ("POST", "/v1/tenants/{tenant_id}/rule-sets/{version}/dry-run"): RouteCall(json=MATRIX_PAYMENT),
    ("POST", "/v1/tenants/{tenant_id}/policy/dry-run"): RouteCall(json=MATRIX_PAYMENT),
    ("GET", "/v1/tenants/{tenant_id}/policy/bundle"): RouteCall(),
    ("GET", "/v1/tenants/{tenant_id}/policy/bundle-keys"): RouteCall(),
    # The tenant's own member paying at the other tenant's canteen: its account is not in this
    # tenant's ledger, so nothing is paid.
    ("POST", "/v1/tenants/{tenant_id}/members/{member_id}/payments"): RouteCall(
        json={"merchant_account_id": "{merchant_account_id}", "amount_fen": 100, "scene": "store"},
        headers={"Idempotency-Key": "matrix-app-payment"}),
    # The device hub. {device_id}, {alarm_id} and {rollout_id} are a device (enrolled), an open
    # alarm of it and a rollout to it, of the tenant named by the ids.
    ("POST", "/v1/tenants/{tenant_id}/devices"): RouteCall(
        json={"kind": "pos", "model": "M-1", "name": "Intruder POS", "location": "intrusion"}),
    ("GET", "/v1/tenants/{tenant_id}/devices"): RouteCall(params={"kind": "pos"}),
    ("GET", "/v1/tenants/{tenant_id}/devices/{device_id}"): RouteCall(),
    ("PATCH", "/v1/tenants/{tenant_id}/devices/{device_id}"): RouteCall(
        json={"name": "Renamed", "config": {"intrusion": True}}),
    ("POST", "/v1/tenants/{tenant_id}/devices/{device_id}/decommission"): RouteCall(),
    ("POST", "/v1/tenants/{tenant_id}/devices/{device_id}/enrolment-tokens"): RouteCall(json={"ttl_s": 3600}),
    ("GET", "/v1/tenants/{tenant_id}/alarms"): RouteCall(params={"kind": "sequence_gap", "device": "{device_id}"},
                                                         foreign_body_statuses=frozenset({200})),
    ("POST", "/v1/tenants/{tenant_id}/alarms/{alarm_id}/acknowledge"): RouteCall(),
    ("POST", "/v1/tenants/{tenant_id}/alarms/{alarm_id}/clear"): RouteCall(),
    ("GET", "/v1/tenants/{tenant_id}/access-rules"): RouteCall(),
    ("PUT", "/v1/tenants/{tenant_id}/access-rules"): RouteCall(json=MATRIX_ACCESS_RULES),
    ("GET", "/v1/tenants/{tenant_id}/access-records"): RouteCall(
        params={"location": "dorm-3", "device": "{device_id}", "member": "{member_id}"},
        foreign_body_statuses=frozenset({200})),
    ("POST", "/v1/tenants/{tenant_id}/rollouts"): RouteCall(json=MATRIX_ROLLOUT,
                                                            headers={"Idempotency-Key": "matrix-rollout"}),
    ("GET", "/v1/tenants/{tenant_id}/rollouts"): RouteCall(),
    ("GET", "/v1/tenants/{tenant_id}/rollouts/{rollout_id}"): RouteCall(),
    ("GET", "/v1/tenants/{tenant_id}/dining-index"): RouteCall(params={"window_s": 900}),
    # Webhooks. {endpoint_id} and {delivery_id} are an endpoint of the tenant's client and a
    # delivery to it; endpoints belong to a client, so another client's are 404 too.
    ("POST", "/v1/tenants/{tenant_id}/webhook-endpoints"): RouteCall(
        json={"url": "http://127.0.0.1:9/intrusion", "event_types": ["payment.booked"]},
        headers={"Idempotency-Key": "matrix-endpoint"}),
    ("GET", "/v1/tenants/{tenant_id}/webhook-endpoints"): RouteCall(),
    ("GET", "/v1/tenants/{tenant_id}/webhook-endpoints/{endpoint_id}"): RouteCall(),
    ("PATCH", "/v1/tenants/{tenant_id}/webhook-endpoints/{endpoint_id}"): RouteCall(json={"enabled": False}),
    ("DELETE", "/v1/tenants/{tenant_id}/webhook-endpoints/{endpoint_id}"): RouteCall(),
    ("POST", "/v1/tenants/{tenant_id}/webhook-endpoints/{endpoint_id}/rotate-secret"): RouteCall(
        headers={"Idempotency-Key": "matrix-rotate"}),
    ("GET", "/v1/tenants/{tenant_id}/webhook-endpoints/{endpoint_id}/deliveries"): RouteCall(),
    ("GET", "/v1/tenants/{tenant_id}/webhook-endpoints/deliveries/{delivery_id}"): RouteCall(),
    ("POST", "/v1/tenants/{tenant_id}/webhook-endpoints/deliveries/{delivery_id}/redeliver"): RouteCall(
        headers={"Idempotency-Key": "matrix-redeliver"}),
    # Mini-program backends. {external_user_id} is the openid the tenant's own partner client bound
    # to its member: the caller's token is another client's, so it is never the caller's binding.
    ("PUT", "/v1/tenants/{tenant_id}/members/{member_id}/external-user"): RouteCall(
        json={"external_user_id": "matrix-openid"}),
    ("DELETE", "/v1/tenants/{tenant_id}/members/{member_id}/external-user"): RouteCall(),
    ("GET", "/v1/tenants/{tenant_id}/members/by-external-user"): RouteCall(
        params={"external_user_id": "{external_user_id}"}),
    ("POST", "/v1/tenants/{tenant_id}/self-service/freeze"): RouteCall(
        json={"external_user_id": "{external_user_id}", "attestation_id": "matrix"}),
    ("POST", "/v1/tenants/{tenant_id}/self-service/unfreeze"): RouteCall(
        json={"external_user_id": "{external_user_id}", "attestation_id": "matrix", "pin": MATRIX_PIN}),
    ("POST", "/v1/tenants/{tenant_id}/self-service/report-card-lost"): RouteCall(
        json={"external_user_id": "{external_user_id}", "attestation_id": "matrix"}),
    ("PUT", "/v1/tenants/{tenant_id}/self-service/pin"): RouteCall(
        json={"external_user_id": "{external_user_id}", "attestation_id": "matrix", "new_pin": "880417",
              "old_pin": MATRIX_PIN}),
    ("DELETE", "/v1/tenants/{tenant_id}/members/{member_id}/pin"): RouteCall(),
    ("PUT", "/v1/tenants/{tenant_id}/members/{member_id}/pin"): RouteCall(json={"pin": "880417"}),
    ("POST", "/v1/tenants/{tenant_id}/members/{member_id}/code-page-links"): RouteCall(
        headers={"Idempotency-Key": "matrix-code-page-link"}),
    ("GET", "/v1/tenants/{tenant_id}/self-service-settings"): RouteCall(),
    ("PUT", "/v1/tenants/{tenant_id}/self-service-settings"): RouteCall(json={"first_pin_by_admin": True}),
}
# Routes that need no token and show no tenant data.
PUBLIC_ROUTES = {
    ("POST", "/v1/oauth/token"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/docs/oauth2-redirect"),
    # The member code page: its static files, and the exchange of a one-time link (the link's
    # secret is the credential; tests/gateway/test_code_page.py).
    ("GET", "/m/"),
    ("GET", "/m/{asset}"),
    ("POST", "/v1/code-page/sessions"),
}


def app_routes() -> set[tuple[str, str]]:
    app = create_app(gateway_settings(identity_target="127.0.0.1:1"))
    return {
        (method, route.path)
        for route in iter_route_contexts(app.routes)
        for method in (route.methods or ())
        if method != "HEAD"
    }


def required_scopes() -> dict[tuple[str, str], list[str]]:
    """Each operation's scopes, as the OpenAPI document declares them."""
    app = create_app(gateway_settings(identity_target="127.0.0.1:1"))
    scopes: dict[tuple[str, str], list[str]] = {}
    for path, operations in app.openapi()["paths"].items():
        for method, operation in operations.items():
            requirement = operation.get("security", [])
            scopes[(method.upper(), path)] = [s for r in requirement for s in r.get("bearer", [])]
    return scopes


def test_every_route_is_in_the_matrix() -> None:
    routes = app_routes()
    # The console's routes (/console) act in their session's tenant only: their own isolation matrix
    # is tests/browser/test_console_http.py (CONSOLE_ROUTE_CALLS).
    assert routes - set(ROUTE_CALLS) - PUBLIC_ROUTES - CONSOLE_ROUTES == set(), "add the new route to ROUTE_CALLS"
    assert set(ROUTE_CALLS) - routes == set(), "ROUTE_CALLS names a route the app no longer has"


def test_every_protected_route_declares_exactly_one_known_scope_and_public_ones_none() -> None:
    declared = required_scopes()
    for key in ROUTE_CALLS:
        assert len(declared[key]) == 1 and declared[key][0] in SCOPES, key
    for key, scopes in declared.items():
        if key in PUBLIC_ROUTES:
            assert scopes == [], key
    app = create_app(gateway_settings(identity_target="127.0.0.1:1"))
    checked = 0
    for context in iter_route_contexts(app.routes):
        route = context.original_route
        if isinstance(route, APIRoute) and any((m, route.path) in ROUTE_CALLS for m in route.methods):
            names = {dep.call.__name__ for dep in route.dependant.dependencies if dep.call is not None}
            assert "authorize" in names, route.path
            checked += 1
    assert checked == len(ROUTE_CALLS)


@dataclass
class TenantFixture:
    label: str
    tenant_id: str
    member_id: str
    member_name: str
    external_number: str
    card_uid: str
    import_id: str
    client_id: str
    credential_id: str
    # The ledger's: the member's cash purse, a payment from it (and its key) at the tenant's canteen,
    # a grant batch of its subsidy program and that program's funding account.
    account_id: str
    transfer_id: str
    payment_key: str
    merchant_account_id: str
    batch_id: str
    program_ref: str
    funding_account_id: str
    # Policy's: the tenant's last rule-set version (published).
    version: int
    # The device hub's: an enrolled POS, an open alarm of it, a rollout to it.
    device_id: str
    alarm_id: str
    rollout_id: str
    # Webhooks': an endpoint of the tenant's client and a delivery to it.
    endpoint_id: str
    delivery_id: str
    # The openid the tenant's partner client (client_id) bound to the member, with a PIN set.
    external_user_id: str
    # That client's credentials (for a token of the client that owns the endpoint and the binding).
    credentials: Any = None

    def ids(self) -> dict[str, str]:
        return {"tenant_id": self.tenant_id, "member_id": self.member_id, "card_uid": self.card_uid,
                "import_id": self.import_id, "client_id": self.client_id, "credential_id": self.credential_id,
                "account_id": self.account_id, "transfer_id": self.transfer_id, "batch_id": self.batch_id,
                "purse_kind": "subsidy", "ref": self.program_ref, "version": str(self.version),
                "device_id": self.device_id, "alarm_id": self.alarm_id, "rollout_id": self.rollout_id,
                "endpoint_id": self.endpoint_id, "delivery_id": self.delivery_id,
                "external_number": self.external_number, "payment_key": self.payment_key,
                "merchant_account_id": self.merchant_account_id, "funding_account_id": self.funding_account_id,
                "today": datetime.now(SHANGHAI).date().isoformat(), "external_user_id": self.external_user_id,
                "date": datetime.now(SHANGHAI).date().isoformat()}


@dataclass(frozen=True)
class LedgerBooks:
    cash_id: str
    payment_id: str
    payment_key: str
    merchant_id: str
    batch_id: str
    funding_id: str


async def _ledger_books(ledger: Any, *, tenant_id: str, member_id: str, label: str) -> LedgerBooks:
    """The member's cash purse with money on it, a payment from it at the canteen, and a finished
    grant batch of a subsidy program."""

    async def open_account(owner_kind: int, owner_id: str, purse_kind: int, ref: str = "") -> str:
        answer = await ledger.OpenAccount(lpb.OpenAccountRequest(
            tenant_id=tenant_id, owner_kind=owner_kind, owner_id=owner_id, purse_kind=purse_kind, ref=ref))
        return answer.account.account.account_id

    bank = await open_account(lpb.OWNER_KIND_TENANT, tenant_id, lpb.PURSE_KIND_BANK_CLEARING, "bank")
    await allow_credit(ledger, tenant_id, bank)
    merchant = await open_account(lpb.OWNER_KIND_MERCHANT, "canteen", lpb.PURSE_KIND_MERCHANT_SETTLEMENT)
    funding = await open_account(lpb.OWNER_KIND_TENANT, "finance", lpb.PURSE_KIND_SUBSIDY_FUNDING, f"meal-{label}")
    cash = await open_account(lpb.OWNER_KIND_MEMBER, member_id, lpb.PURSE_KIND_CASH)
    await ledger.TopUp(lpb.TopUpRequest(tenant_id=tenant_id, idempotency_key=f"top-up-{label}", from_account_id=bank,
                                        to_account_id=cash, amount_fen=10_000))
    paid = await ledger.Pay(lpb.PayRequest(tenant_id=tenant_id, idempotency_key=f"pay-{label}",
                                           merchant_account_id=merchant, device_id=f"pos-{label}",
                                           legs=[lpb.PayLeg(account_id=cash, amount_fen=1_000)]))
    await ledger.DefineProgram(lpb.DefineProgramRequest(tenant_id=tenant_id, purse_kind=lpb.PURSE_KIND_SUBSIDY,
                                                        ref=f"meal-{label}", funding_account_id=funding))
    started = await ledger.StartGrantBatch(lpb.StartGrantBatchRequest(
        tenant_id=tenant_id, bill_number=f"BILL-{label}", purse_kind=lpb.PURSE_KIND_SUBSIDY, ref=f"meal-{label}",
        rows=[lpb.GrantRow(member_id=member_id, amount_fen=2_000)]))
    batch_id = started.batch.batch_id
    for _ in range(200):
        answer = await ledger.GetGrantBatch(lpb.GetGrantBatchRequest(tenant_id=tenant_id, batch_id=batch_id))
        if answer.batch.status == lpb.GRANT_BATCH_STATUS_DONE:
            break
        await asyncio.sleep(0.05)
    return LedgerBooks(cash_id=cash, payment_id=paid.transfer.transfer_id, payment_key=f"pay-{label}",
                       merchant_id=merchant, batch_id=batch_id, funding_id=funding)


async def populated_tenant(gateway: Gateway, *, label: str, card_uid: str) -> TenantFixture:
    """A tenant with one member holding a card, a finished import and a granted API client."""
    stub = gateway.stub
    tenant_id = await gateway.create_tenant(name=f"Tenant {label}")
    name, number = f"Secret Person {label}", f"SECRET{label}"
    member = (await stub.CreateMember(pb.CreateMemberRequest(tenant_id=tenant_id, external_number=number, name=name,
                                                             groups={"department": "physics"}))).member
    await stub.BindCard(pb.BindCardRequest(tenant_id=tenant_id, member_id=member.member_id, card_uid=card_uid))
    imported = await stub.StartMemberImport(pb.StartMemberImportRequest(
        tenant_id=tenant_id, csv=f"external_number,name\nIMP{label},Imported {label}\n".encode()))
    import_id = getattr(imported, "import").import_id
    for _ in range(200):
        answer = await stub.GetMemberImport(pb.GetMemberImportRequest(tenant_id=tenant_id, import_id=import_id))
        if getattr(answer, "import").state != pb.IMPORT_STATE_RUNNING:
            break
        await asyncio.sleep(0.05)
    client = await gateway.create_client(tenant_id=tenant_id, scopes=TENANT_SCOPES, name=f"client {label}")
    external_user_id = f"openid-{label}"
    await stub.BindExternalUser(pb.BindExternalUserRequest(tenant_id=tenant_id, client_id=client.client_id,
                                                           external_user_id=external_user_id,
                                                           member_id=member.member_id))
    await stub.SetMemberPin(pb.SetMemberPinRequest(
        tenant_id=tenant_id, new_pin=MATRIX_PIN, caller=pb.SelfServiceCaller(
            client_id=client.client_id, external_user_id=external_user_id, attestation_id=f"setup-{label}")))
    # With a codegen behind the gateway the member holds a real credential, so the matrix can aim
    # at it from another tenant; without one, any credential id serves the scope checks.
    credential_id = str(uuid.uuid4())
    codegen = getattr(gateway, "codegen_stub", None)
    if codegen is not None:
        issued = await codegen.IssueCredential(cpb.IssueCredentialRequest(
            tenant_id=tenant_id, member_id=member.member_id,
            holder_public_key=bytes(nacl.signing.SigningKey.generate().verify_key), purposes=[cpb.PURPOSE_PAY]))
        credential_id = issued.credential.credential_id
    # With webhooks: an endpoint of the client for top-ups (the books' top-up makes a delivery).
    endpoint_id, delivery_id = str(uuid.uuid4()), str(uuid.uuid4())
    webhooks = getattr(gateway, "webhooks_stub", None)
    if webhooks is not None:
        created = await webhooks.CreateEndpoint(wpb.CreateEndpointRequest(
            tenant_id=tenant_id, client_id=client.client_id, caller_scopes=list(TENANT_SCOPES),
            url="http://127.0.0.1:9/hooks", event_types=["topup.booked"], description=f"secret-{label}",
            idempotency_key=f"endpoint-{label}", key_scope=f"client:{client.client_id}"))
        endpoint_id = created.endpoint.endpoint_id
    # Likewise with a ledger: real accounts, a payment and a grant batch; without one, any ids.
    books = LedgerBooks(cash_id=str(uuid.uuid4()), payment_id=str(uuid.uuid4()), payment_key=f"pay-{label}",
                        merchant_id=str(uuid.uuid4()), batch_id=str(uuid.uuid4()), funding_id=str(uuid.uuid4()))
    ledger = getattr(gateway, "ledger_stub", None)
    if ledger is not None:
        books = await _ledger_books(ledger, tenant_id=tenant_id, member_id=member.member_id, label=label)
        await _purses_opened(stub, ledger, tenant_id=tenant_id)
    if webhooks is not None and ledger is not None:
        for _ in range(400):
            listed = await webhooks.ListDeliveries(wpb.ListDeliveriesRequest(
                tenant_id=tenant_id, client_id=client.client_id, endpoint_id=endpoint_id))
            if listed.deliveries:
                delivery_id = listed.deliveries[0].delivery_id
                break
            await asyncio.sleep(0.05)
    # And with policy: rule-set versions (B one more than A, see ROUTE_CALLS), the last published,
    # its bundle and bundle key made; without one, any version number.
    version = 2 if label == "B" else 1
    policy = getattr(gateway, "policy_stub", None)
    if policy is not None:
        for _ in range(version):
            created = await policy.CreateRuleSetVersion(ppb.CreateRuleSetVersionRequest(
                tenant_id=tenant_id, document=json.dumps(university_rule_set()), note=f"rules of {label}"))
        version = created.version.version
        await policy.PublishRuleSetVersion(ppb.PublishRuleSetVersionRequest(
            tenant_id=tenant_id, version=version, published_by=f"admin {label}"))
        await policy.GetBundle(ppb.GetBundleRequest(tenant_id=tenant_id))
    # And with the device hub: an enrolled POS with an open alarm, a rollout to it, access rules;
    # without one, any ids.
    device_id, alarm_id, rollout_id = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    if getattr(gateway, "devicehub_stub", None) is not None:
        device_id, alarm_id, rollout_id = await _devicehub_fleet(gateway, tenant_id=tenant_id, label=label)
    return TenantFixture(label=label, tenant_id=tenant_id, member_id=member.member_id, member_name=name,
                         external_number=number, card_uid=card_uid, import_id=import_id, client_id=client.client_id,
                         credential_id=credential_id, account_id=books.cash_id, transfer_id=books.payment_id,
                         payment_key=books.payment_key, merchant_account_id=books.merchant_id,
                         batch_id=books.batch_id, program_ref=f"meal-{label}", funding_account_id=books.funding_id,
                         version=version, device_id=device_id, alarm_id=alarm_id, rollout_id=rollout_id,
                         endpoint_id=endpoint_id, delivery_id=delivery_id, external_user_id=external_user_id,
                         credentials=client)


async def _purses_opened(stub: Any, ledger: Any, *, tenant_id: str) -> None:
    """Wait until the ledger has opened every member's cash purse: it does so on identity's events,
    after the call that made the member, so a snapshot taken sooner would see one open later."""
    members = (await stub.SearchMembers(pb.SearchMembersRequest(tenant_id=tenant_id, page_size=200))).members
    for member in members:
        for _ in range(600):
            held = await ledger.GetBalances(lpb.GetBalancesRequest(
                tenant_id=tenant_id, owner_kind=lpb.OWNER_KIND_MEMBER, owner_id=member.member_id))
            if any(a.account.purse_kind == lpb.PURSE_KIND_CASH for a in held.accounts):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"the ledger never opened the purses of {member.external_number}")


async def _devicehub_fleet(gateway: Gateway, *, tenant_id: str, label: str) -> tuple[str, str, str]:
    """An enrolled POS, an open alarm of it and a rollout to it: (device id, alarm id, rollout id)."""
    from services.devicehub.alarms import Alarms

    hub = gateway.devicehub_stub  # type: ignore[attr-defined]
    registered = await hub.RegisterDevice(dpb.RegisterDeviceRequest(
        tenant_id=tenant_id, kind=dpb.DEVICE_KIND_POS, model="M-1", name=f"Secret POS {label}",
        location=f"canteen-{label}", scene_tags=["canteen"], capacity=50))
    device_id = registered.device.device_id
    await devicehub_pb2_grpc.DeviceServiceStub(gateway.devicehub.device_channel).Enrol(  # type: ignore[attr-defined]
        dpb.EnrolRequest(enrolment_token=registered.enrolment_token,
                         public_key=bytes(nacl.signing.SigningKey.generate().verify_key), firmware_version="1.0"))
    await Alarms(gateway.devicehub.app.pool).raise_alarm(  # type: ignore[attr-defined]
        tenant_id=tenant_id, device_id=device_id, kind=dpb.ALARM_KIND_SEQUENCE_GAP,
        severity=dpb.ALARM_SEVERITY_WARNING, detail=f"gap at {label}")
    alarms = await hub.ListAlarms(dpb.ListAlarmsRequest(tenant_id=tenant_id))
    rollout = await hub.CreateRollout(dpb.CreateRolloutRequest(
        tenant_id=tenant_id, idempotency_key=f"rollout-{label}", target=dpb.ROLLOUT_TARGET_FIRMWARE,
        version=f"secret-{label}", kind=dpb.DEVICE_KIND_POS, stage_sizes=[1], success_threshold=1.0,
        error_threshold=1))
    await hub.SetAccessRules(dpb.SetAccessRulesRequest(tenant_id=tenant_id, rules_json=json.dumps({
        "time_zone": "Asia/Shanghai", "rules": [{"name": f"secret-{label}", "places": ["dorm-3"],
                                                 "purposes": ["access"], "from": "06:00", "to": "23:00"}]})))
    return device_id, alarms.alarms[0].alarm_id, rollout.rollout.rollout_id


async def snapshot(gateway: Gateway, tenant: TenantFixture) -> dict[str, bytes]:
    """Everything identity holds for a tenant, as bytes to compare."""
    stub, tid = gateway.stub, tenant.tenant_id
    answers = {
        "tenant": await stub.GetTenant(pb.GetTenantRequest(tenant_id=tid)),
        "members": await stub.SearchMembers(pb.SearchMembersRequest(tenant_id=tid, page_size=200)),
        "member": await stub.GetMember(pb.GetMemberRequest(tenant_id=tid, member_id=tenant.member_id)),
        "blacklist": await stub.ListCardBlacklist(pb.ListCardBlacklistRequest(tenant_id=tid)),
        "feed": await stub.ListDirectoryChanges(pb.ListDirectoryChangesRequest(tenant_id=tid, page_size=1000)),
        "clients": await stub.ListApiClients(pb.ListApiClientsRequest(tenant_id=tid)),
        "import": await stub.GetMemberImport(pb.GetMemberImportRequest(tenant_id=tid, import_id=tenant.import_id)),
        # The member's binding at the tenant's partner client still stands, to the same member.
        "binding": await stub.LookupMemberByExternalUser(pb.LookupMemberByExternalUserRequest(
            tenant_id=tid, client_id=tenant.client_id, external_user_id=tenant.external_user_id)),
        "self_service_settings": await stub.GetSelfServiceSettings(pb.GetSelfServiceSettingsRequest(tenant_id=tid)),
    }
    codegen = getattr(gateway, "codegen_stub", None)
    if codegen is not None:
        # What the codes routes could change: keys, revocations, settings.
        answers["trust_list"] = await codegen.GetTrustList(cpb.GetTrustListRequest(tenant_id=tid))
        answers["revocations"] = await codegen.GetRevocations(cpb.GetRevocationsRequest(tenant_id=tid))
        answers["code_settings"] = await codegen.GetTenantCodeSettings(
            cpb.GetTenantCodeSettingsRequest(tenant_id=tid))
    ledger = getattr(gateway, "ledger_stub", None)
    if ledger is not None:
        # What the ledger routes could change: balances, history, programs, batches, the books.
        answers["ledger_member"] = await ledger.GetBalances(lpb.GetBalancesRequest(
            tenant_id=tid, owner_kind=lpb.OWNER_KIND_MEMBER, owner_id=tenant.member_id))
        answers["ledger_history"] = await ledger.ListTransfers(lpb.ListTransfersRequest(
            tenant_id=tid, account_id=tenant.account_id, page_size=200))
        answers["ledger_trial"] = await ledger.TrialBalance(lpb.TrialBalanceRequest(tenant_id=tid))
        answers["ledger_program"] = await ledger.GetProgram(lpb.GetProgramRequest(
            tenant_id=tid, purse_kind=lpb.PURSE_KIND_SUBSIDY, ref=tenant.program_ref))
        answers["ledger_batch"] = await ledger.GetGrantBatch(lpb.GetGrantBatchRequest(
            tenant_id=tid, batch_id=tenant.batch_id))
    policy = getattr(gateway, "policy_stub", None)
    if policy is not None:
        # What the policy routes could change: the versions, which one is published, the keys.
        answers["policy_versions"] = await policy.ListRuleSetVersions(ppb.ListRuleSetVersionsRequest(
            tenant_id=tid, page_size=200))
        answers["policy_version"] = await policy.GetRuleSetVersion(ppb.GetRuleSetVersionRequest(
            tenant_id=tid, version=tenant.version))
        answers["policy_bundle"] = await policy.GetBundle(ppb.GetBundleRequest(tenant_id=tid))
        answers["policy_keys"] = await policy.GetBundleKeys(ppb.GetBundleKeysRequest(tenant_id=tid))
    webhooks = getattr(gateway, "webhooks_stub", None)
    if webhooks is not None:
        # What the webhook routes could change: the client's endpoints and secrets, the deliveries
        # (without the attempts the dispatcher keeps making to the endpoint, which refuses them).
        endpoints = await webhooks.ListEndpoints(wpb.ListEndpointsRequest(tenant_id=tid, client_id=tenant.client_id))
        answers["webhook_endpoints"] = wpb.ListEndpointsResponse(endpoints=[wpb.Endpoint(
            endpoint_id=e.endpoint_id, url=e.url, event_types=e.event_types, description=e.description, state=e.state,
            secrets=[wpb.SecretInfo(secret_id=x.secret_id, expires_at=x.expires_at) for x in e.secrets])
            for e in endpoints.endpoints])
        deliveries = await webhooks.ListDeliveries(wpb.ListDeliveriesRequest(
            tenant_id=tid, client_id=tenant.client_id, endpoint_id=tenant.endpoint_id, page_size=200))
        answers["webhook_deliveries"] = wpb.ListDeliveriesResponse(deliveries=[wpb.Delivery(
            delivery_id=d.delivery_id, message_id=d.message_id, redelivery_of=d.redelivery_of)
            for d in deliveries.deliveries])
    hub = getattr(gateway, "devicehub_stub", None)
    if hub is not None:
        # What the device routes could change: devices, alarms, rollouts, access rules and records.
        answers["devices"] = await hub.ListDevices(dpb.ListDevicesRequest(tenant_id=tid, page_size=200))
        answers["device"] = await hub.GetDevice(dpb.GetDeviceRequest(tenant_id=tid, device_id=tenant.device_id))
        for state in (dpb.ALARM_STATE_UNSPECIFIED, dpb.ALARM_STATE_CLEARED):
            answers[f"alarms_{state}"] = await hub.ListAlarms(dpb.ListAlarmsRequest(tenant_id=tid, state=state,
                                                                                     page_size=200))
        answers["rollouts"] = await hub.ListRollouts(dpb.ListRolloutsRequest(tenant_id=tid, page_size=200))
        answers["rollout"] = await hub.GetRollout(dpb.GetRolloutRequest(tenant_id=tid, rollout_id=tenant.rollout_id))
        answers["access_rules"] = await hub.GetAccessRules(dpb.GetAccessRulesRequest(tenant_id=tid))
        answers["access_records"] = await hub.ListAccessRecords(dpb.ListAccessRecordsRequest(tenant_id=tid,
                                                                                              page_size=200))
    return {name: answer.SerializeToString(deterministic=True) for name, answer in answers.items()}


async def call(gateway: Gateway, key: tuple[str, str], *, ids: dict[str, str], token: str,
               body_ids: dict[str, str] | None = None) -> httpx.Response:
    """The route called with ``ids`` in its path, and ``body_ids`` (the same, unless given) in its
    body and query."""
    method, template = key
    spec = ROUTE_CALLS[key]
    headers = {"Authorization": f"Bearer {token}", **spec.headers}
    if spec.content_type:
        headers["Content-Type"] = spec.content_type
    outside = body_ids or ids
    return await gateway.http.request(method, template.format(**ids), headers=headers,
                                      json=_filled(spec.json, outside, ids), content=spec.content,
                                      params=_filled(spec.params, outside, ids))


def leaked(response: httpx.Response, tenant: TenantFixture) -> list[str]:
    """The other tenant's data found in a response. Ids the caller sent itself may be echoed (the
    problem's ``instance`` is the path, a detail may name the id not found), so the search is for
    what the caller did not send: names, numbers, and the tenant id where it was not in the path."""
    try:
        body = response.json() if response.content else {}
    except ValueError:
        body = response.text
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if k != "instance"}
    text = str(body)
    secrets = [tenant.member_name, tenant.external_number, f"Imported {tenant.label}", f"IMP{tenant.label}",
               tenant.tenant_id, f"rules of {tenant.label}", f"admin {tenant.label}", f"Secret POS {tenant.label}",
               f"gap at {tenant.label}", f"secret-{tenant.label}", f"canteen-{tenant.label}"]
    return [s for s in secrets if s in text]


async def test_a_token_of_tenant_a_never_reads_or_changes_tenant_b_on_any_route(platform_gateway: Gateway) -> None:
    gateway = platform_gateway
    tenant_a = await populated_tenant(gateway, label="A", card_uid=CARD_A)
    tenant_b = await populated_tenant(gateway, label="B", card_uid=CARD_B)
    token_a = await gateway.token(
        tenant_id=tenant_a.tenant_id,
        credentials=await gateway.create_client(tenant_id=tenant_a.tenant_id, scopes=TENANT_SCOPES),
    )
    before = await snapshot(gateway, tenant_b)
    failures: list[str] = []
    checked_outside_the_path: set[tuple[str, str]] = set()

    for key, spec in ROUTE_CALLS.items():
        if "{tenant_id}" not in key[1]:
            # Not tenant-scoped (creating a tenant): A's tenant token lacks platform:admin.
            response = await call(gateway, key, ids={}, token=token_a)
            if response.status_code != 403:
                failures.append(f"{key}: {response.status_code} without platform:admin")
            continue
        # B's tenant in the path, B's ids: refused before identity is asked, as if B did not exist.
        response = await call(gateway, key, ids=tenant_b.ids(), token=token_a)
        if response.status_code != 404 or response.headers.get("content-type") != "application/problem+json":
            failures.append(f"{key} with B's path: {response.status_code} {response.text[:200]}")
        elif response.json()["reason"] != "TENANT_NOT_FOUND" or leaked(response, tenant_b):
            failures.append(f"{key} with B's path said too much: {response.text[:200]}")
        # A's tenant in the path but B's ids in the rest of it: identity must find nothing.
        path_params = {part.strip("{}") for part in key[1].split("/") if part.startswith("{")}
        if path_params - {"tenant_id"}:
            foreign = {**tenant_b.ids(), "tenant_id": tenant_a.tenant_id}
            response = await call(gateway, key, ids=foreign, token=token_a)
            if response.status_code not in spec.foreign_ids_statuses:
                failures.append(f"{key} with B's ids: {response.status_code} {response.text[:200]}")
            if found := leaked(response, tenant_b):
                failures.append(f"{key} with B's ids leaked {found}: {response.text[:200]}")
        # A's tenant and A's ids in the path, B's ids in the body and query.
        if spec.ids_outside_the_path:
            response = await call(gateway, key, ids=tenant_a.ids(), body_ids=tenant_b.ids(), token=token_a)
            if response.status_code not in spec.foreign_body_statuses:
                failures.append(f"{key} with B's ids in body or query: {response.status_code} {response.text[:200]}")
            if found := leaked(response, tenant_b):
                failures.append(f"{key} with B's ids in body or query leaked {found}: {response.text[:200]}")
            checked_outside_the_path.add(key)

    assert failures == []
    # The ids the issue names, at least, went where the routes take them.
    assert {("POST", "/v1/tenants/{tenant_id}/members/{member_id}/payments"),
            ("POST", "/v1/tenants/{tenant_id}/policy/dry-run"),
            ("POST", "/v1/tenants/{tenant_id}/rule-sets/{version}/dry-run"),
            ("POST", "/v1/tenants/{tenant_id}/subsidy-batches"),
            ("GET", "/v1/tenants/{tenant_id}/statements"),
            ("GET", "/v1/tenants/{tenant_id}/payments/lookup"),
            ("GET", "/v1/tenants/{tenant_id}/members/by-external-user"),
            ("POST", "/v1/tenants/{tenant_id}/self-service/unfreeze")} <= checked_outside_the_path
    assert await snapshot(gateway, tenant_b) == before


async def test_each_route_refuses_a_token_without_its_scope_and_changes_nothing(gateway: Gateway) -> None:
    tenant = await populated_tenant(gateway, label="A", card_uid=CARD_A)
    all_scopes = (MEMBERS_READ, MEMBERS_WRITE, CLIENTS_ADMIN, PLATFORM_ADMIN, CODES_ISSUE, DEVICES_SYNC, CODES_ADMIN,
                  WALLETS_READ, WALLETS_TOPUP, LEDGER_ADMIN, STATEMENTS_READ, POLICY_ADMIN, PAYMENTS_CREATE,
                  DEVICES_ADMIN, DATA_READ, MEMBERS_BIND, MEMBERS_SELF_SERVICE, WEBHOOKS_MANAGE, MEMBERS_CODE_PAGE)
    assert set(all_scopes) == set(SCOPES)
    token_without: dict[str, str] = {}
    for scope in all_scopes:
        others = [s for s in all_scopes if s != scope]
        credentials = await gateway.create_client(tenant_id=tenant.tenant_id, scopes=others)
        token_without[scope] = await gateway.token(tenant_id=tenant.tenant_id, credentials=credentials)
    declared = required_scopes()
    before = await snapshot(gateway, tenant)

    for key in ROUTE_CALLS:
        (scope,) = declared[key]
        response = await call(gateway, key, ids=tenant.ids(), token=token_without[scope])
        body = assert_problem(response, 403, reason="INSUFFICIENT_SCOPE")
        assert body["scope"] == scope and scope in body["detail"], (key, body)
        assert f'scope="{scope}"' in response.headers["www-authenticate"]

    assert await snapshot(gateway, tenant) == before


def member_token_routes() -> set[tuple[str, str]]:
    """The operations the OpenAPI document marks as open to a member token (the code page's)."""
    app = create_app(gateway_settings(identity_target="127.0.0.1:1"))
    return {(method.upper(), path) for path, operations in app.openapi()["paths"].items()
            for method, operation in operations.items() if operation.get(MEMBER_TOKEN_EXTENSION)}


async def test_a_member_token_passes_only_the_routes_marked_for_it_and_only_for_its_member(
        platform_gateway: Gateway) -> None:
    gateway = platform_gateway
    tenant_a = await populated_tenant(gateway, label="A", card_uid=CARD_A)
    tenant_b = await populated_tenant(gateway, label="B", card_uid=CARD_B)
    neighbour = await gateway.stub.CreateMember(pb.CreateMemberRequest(
        tenant_id=tenant_a.tenant_id, external_number="A-neighbour", name="Neighbour A"))
    partner = await gateway.tenant_access(tenant_id=tenant_a.tenant_id, scopes=(MEMBERS_CODE_PAGE,))
    link = await gateway.http.post(
        f"/v1/tenants/{tenant_a.tenant_id}/members/{tenant_a.member_id}/code-page-links",
        headers={**partner.headers, "Idempotency-Key": "member-matrix"})
    tenant_id, secret = link.json()["url"].split("#", 1)[1].split(".", 1)
    session = await gateway.http.post("/v1/code-page/sessions", json={"tenant_id": tenant_id, "link_secret": secret})
    assert session.status_code == 201, session.text
    member_token = session.json()["access_token"]
    marked = member_token_routes()
    assert {("POST", "/v1/tenants/{tenant_id}/members/{member_id}/credentials"),
            ("POST", "/v1/tenants/{tenant_id}/members/{member_id}/token-batches"),
            ("GET", "/v1/tenants/{tenant_id}/members/{member_id}/balances"),
            ("GET", "/v1/tenants/{tenant_id}/accounts/{account_id}/transfers"),
            ("GET", "/v1/tenants/{tenant_id}/members/{member_id}"),
            ("POST", "/v1/tenants/{tenant_id}/members/{member_id}/cards/{card_uid}/report-lost")} == marked
    before = await snapshot(gateway, tenant_b)
    failures: list[str] = []

    for key in ROUTE_CALLS:
        if "{tenant_id}" not in key[1]:
            response = await call(gateway, key, ids={}, token=member_token)
        else:
            response = await call(gateway, key, ids=tenant_a.ids(), token=member_token)
        if key not in marked:
            if response.status_code != 403 or response.json().get("reason") != "MEMBER_TOKEN_NOT_ALLOWED":
                failures.append(f"{key}: {response.status_code} {response.text[:200]}")
            continue
        if response.status_code in (401, 403):
            failures.append(f"{key} for its own member: {response.status_code} {response.text[:200]}")
        if "{member_id}" in key[1]:
            other = {**tenant_a.ids(), "member_id": neighbour.member.member_id}
            response = await call(gateway, key, ids=other, token=member_token)
            if response.status_code != 404 or response.json()["reason"] != "MEMBER_NOT_FOUND":
                failures.append(f"{key} for another member: {response.status_code} {response.text[:200]}")
        response = await call(gateway, key, ids=tenant_b.ids(), token=member_token)
        if response.status_code != 404 or response.json()["reason"] != "TENANT_NOT_FOUND":
            failures.append(f"{key} in another tenant: {response.status_code} {response.text[:200]}")

    assert failures == []
    assert await snapshot(gateway, tenant_b) == before
