"""REST for policy: ``onecard.policy.v1.PolicyService`` as a school's operators, devices and app
backends use it.

- ``policy:admin``: rule-set versions (create, validate, list, read, publish) and dry runs of a
  payment, against one version or the published rules;
- ``devices:sync``: the published rules signed for devices (the bundle) and the keys to check it;
- ``payments:create``: an app-initiated payment for a member, planned and paid under the published
  rules.

Each handler only translates. Whether a rule set is valid is ``onecard_policy``'s to say (through
the policy service: 400 with the parser's ``reason`` and the ``rule`` at fault); what a payment
plans is the evaluator's; the money moves in the ledger. Amounts are integer fen.
"""
from __future__ import annotations

import base64
import json
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Header, Path, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from gateway.auth import LEDGER_ADMIN, STATEMENTS_READ, AdminPolicy, CreatePayments, SyncDevices
from gateway.models import MemberId, TenantId, MAX_GROUP_KEY_CHARS, MAX_GROUP_VALUE_CHARS, MAX_GROUPS, MAX_ID_CHARS, enum_name, timestamp
from gateway.problems import ProblemError, problem_responses
from gateway.routes.ledger import (
    MAX_REF_CHARS,
    BalanceOut,
    IdempotencyKeyHeader,
    PurseKindName,
    TransferOut,
    _balance,
    _key,
    _transfer,
)
from gateway.state import GatewayState, State
from onecard.identity.v1 import identity_pb2 as ipb
from onecard.ledger.v1 import ledger_pb2 as lpb
from onecard.policy.v1 import policy_pb2 as pb
from gateway.models import or_none
from runtime.idempotency import client_scope
from runtime.wire import timestamp_pb

router = APIRouter(responses=problem_responses(400, 401, 403, 404, 422, 429, 501, 503, 504))

Version = Annotated[int, Path(ge=1, le=2**62, description="A rule-set version of the tenant (1, 2, ...).")]

# The policy service's own bounds (it checks them again).
MAX_NOTE_CHARS = 500
MAX_PUBLISHED_BY_CHARS = 128
MAX_VERSIONS_PAGE_SIZE = 200
MAX_CURSOR_CHARS = 1024
MAX_PAYMENT_FEN = 100_000_000
MAX_NAME_CHARS = 40
BUNDLE_MEDIA_TYPE = "application/octet-stream"
VERSION_HEADER = "X-Onecard-Policy-Version"
KEY_ID_HEADER = "X-Onecard-Policy-Key-Id"
SHA256_HEADER = "X-Onecard-Policy-Sha256"

RuleSetStatusName = Literal["draft", "published", "superseded"]
ChannelName = Literal["online", "offline"]


# --- shapes ------------------------------------------------------------------------------------

_VERSION_EXAMPLE = {
    "version": 3, "status": "published",
    "sha256": "9f2c1e0a4b7d8c6e5f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e",
    "note": "dinner voucher up to 15 yuan", "created_at": "2026-11-20T02:00:00Z",
    "published_at": "2026-11-20T02:05:00Z", "published_by": "oc_4f1c…",
    "document": {"format": 1, "time_zone": "Asia/Shanghai", "scenes": ["canteen"], "funding_order": ["cash"],
                 "limits": []},
}


class RuleSetVersionOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [_VERSION_EXAMPLE]})

    version: int
    status: RuleSetStatusName = Field(description="draft: never published; published: the one in force; "
                                      "superseded: published once, replaced since.")
    sha256: str = Field(description="SHA-256 of the document's canonical JSON (sorted keys, no spaces), hex.")
    note: str | None
    created_at: datetime | None
    published_at: datetime | None = Field(description="The last time this version was published; null for a draft.")
    published_by: str | None
    document: dict[str, Any] | None = Field(default=None, description="The rule set as stored (canonical); "
                                            "absent in lists.")


def _version(v: pb.RuleSetVersion) -> RuleSetVersionOut:
    return RuleSetVersionOut(
        version=v.version, status=enum_name(pb.RuleSetStatus, value=v.status), sha256=v.sha256,
        note=or_none(v.note), created_at=timestamp(v.created_at), published_at=timestamp(v.published_at),
        published_by=or_none(v.published_by), document=json.loads(v.document) if v.document else None,
    )


class RuleSetVersionPage(BaseModel):
    versions: list[RuleSetVersionOut] = Field(description="Newest first, without their documents.")
    next_page_token: str | None = Field(description="null on the last page.")
    published_version: int | None = Field(description="The version in force; null when none is published.")


class ValidationOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "valid": True, "sha256": "9f2c1e0a4b7d8c6e5f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e"}]})

    valid: Literal[True] = True
    sha256: str = Field(description="The SHA-256 the document would be stored as.")


class PublishIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"published_by": "zhang.wei@finance"}]})

    published_by: str | None = Field(default=None, min_length=1, max_length=MAX_PUBLISHED_BY_CHARS,
                                     description="Who publishes, recorded with the time; absent: the calling "
                                     "client's id.")


class PublishedOut(BaseModel):
    version: RuleSetVersionOut
    previous_version: int | None = Field(description="The version in force before; null when none was.")
    changed: bool = Field(description="False when the version was already the published one (nothing changed).")


class PaymentIn(BaseModel):
    """A payment as a device or an app would ask it, before the rules."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "member_id": "0b9e4c1e-9d2f-4c55-a0f4-6f6b1b2c3d4e", "scene": "canteen",
        "merchant_id": "6a0c4d2e-1b3f-4a5c-9d7e-8f9a0b1c2d3e", "device_id": "pos-north-1", "amount_fen": 1200,
        "time": "2026-11-26T04:00:00Z"}]})

    member_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    member_groups: dict[Annotated[str, Field(min_length=1, max_length=MAX_GROUP_KEY_CHARS)],
                        Annotated[str, Field(max_length=MAX_GROUP_VALUE_CHARS)]] | None = Field(
        default=None, max_length=MAX_GROUPS,
        description="The member's groups as the rules read them; absent: the member's groups in the directory "
        "(an unknown member is then 404).")
    scene: str | None = Field(default=None, max_length=MAX_NAME_CHARS, description="A scene of the rule set; "
                              "absent: the device's or the merchant's one scene.")
    merchant_id: str | None = Field(default=None, max_length=MAX_ID_CHARS,
                                    description="The merchant's ledger settlement account id, as the rule set "
                                    "names merchants.")
    device_id: str | None = Field(default=None, max_length=MAX_ID_CHARS)
    amount_fen: int = Field(ge=1, le=MAX_PAYMENT_FEN, description="The price asked, in fen.")
    time: datetime | None = Field(default=None, description="When the payment happens (meal periods are read in "
                                  "the rule set's time zone); absent: now. With a time zone.")
    channel: ChannelName | None = Field(default=None, description="online (the default) or offline (a device "
                                        "settling later, with the offline caps).")


class LegOut(BaseModel):
    purse_kind: PurseKindName
    ref: str = Field(description="The subsidy program or voucher campaign of the purse; empty for cash.")
    account_id: str | None = Field(description="The member's ledger account of that purse.")
    amount_fen: int


class GuardOut(BaseModel):
    counter_key: str
    increment: int
    limit: int


class CounterOut(BaseModel):
    counter_key: str
    value: int


class PlanOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "approved": True, "reason": "APPROVED", "amount_fen": 1200,
        "legs": [{"purse_kind": "cash", "ref": "", "account_id": "2d1e0f9a-8b7c-4d6e-9f0a-1b2c3d4e5f60",
                  "amount_fen": 1200}],
        "charged_fen": 1200, "discount_fen": 0, "coupon": None, "benefit": None, "benefit_funding_fen": 0,
        "guards": [{"counter_key": "lim:daily-canteen:m:0b9e4c1e-…:d:2026-11-26", "increment": 1200,
                    "limit": 10000}],
        "pin_required": False, "scene": "canteen", "meal_period": "lunch", "service_date": "2026-11-26",
        "detail": None, "rule_set_version": 3,
        "rule_set_sha256": "9f2c1e0a4b7d8c6e5f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e",
        "counters": [{"counter_key": "lim:daily-canteen:m:0b9e4c1e-…:d:2026-11-26", "value": 0}]}]})

    approved: bool
    reason: str = Field(description="APPROVED, or why not: INSUFFICIENT_FUNDS, NOT_ALLOWED_HERE, "
                        "OUTSIDE_MEAL_PERIOD, LIMIT_EXCEEDED:<limit>, UNKNOWN_SCENE, ...")
    amount_fen: int = Field(description="The price asked.")
    legs: list[LegOut] = Field(description="What each purse of the member pays, in funding order; they sum to "
                               "charged_fen.")
    charged_fen: int = Field(description="What the member pays: amount - discount - benefit_funding.")
    discount_fen: int
    coupon: str | None
    benefit: str | None
    benefit_funding_fen: int = Field(description="What the tenant's funding pays the merchant for the benefit.")
    guards: list[GuardOut] = Field(description="The caps the ledger enforces when the plan is paid.")
    pin_required: bool
    scene: str | None
    meal_period: str | None
    service_date: str | None = Field(description="The day every daily window counts in (YYYY-MM-DD).")
    detail: str | None = Field(description="For a person: why a plan was declined.")
    rule_set_version: int
    rule_set_sha256: str
    counters: list[CounterOut] = Field(description="The usage counters the plan was made on, as read.")


def _plan(p: pb.Plan) -> PlanOut:
    return PlanOut(
        approved=p.approved, reason=p.reason, amount_fen=p.amount_fen,
        legs=[LegOut(purse_kind=enum_name(lpb.PurseKind, value=leg.purse_kind), ref=leg.ref,
                     account_id=or_none(leg.account_id), amount_fen=leg.amount_fen) for leg in p.legs],
        charged_fen=p.charged_fen, discount_fen=p.discount_fen, coupon=or_none(p.coupon),
        benefit=or_none(p.benefit), benefit_funding_fen=p.benefit_funding_fen,
        guards=[GuardOut(counter_key=g.counter_key, increment=g.increment, limit=g.limit) for g in p.guards],
        pin_required=p.pin_required, scene=or_none(p.scene), meal_period=or_none(p.meal_period),
        service_date=or_none(p.service_date), detail=or_none(p.detail), rule_set_version=p.rule_set_version,
        rule_set_sha256=p.rule_set_sha256,
        counters=[CounterOut(counter_key=c.counter_key, value=c.value) for c in p.counters],
    )


class BundleKeyOut(BaseModel):
    key_id: str
    public_key: str = Field(description="The 32-byte Ed25519 public key, base64.")
    created_at: datetime | None


class BundleKeysOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"keys": [{
        "key_id": "k1-20261120", "public_key": "q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80=",
        "created_at": "2026-11-20T02:05:00Z"}]}]})

    keys: list[BundleKeyOut]


class PaymentCreateIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "merchant_account_id": "6a0c4d2e-1b3f-4a5c-9d7e-8f9a0b1c2d3e", "amount_fen": 1200, "scene": "canteen",
        "external_ref": "order-20261126-0042"}]})

    merchant_account_id: str = Field(min_length=1, max_length=MAX_ID_CHARS,
                                     description="The merchant's ledger settlement account, as the rule set names "
                                     "merchants.")
    amount_fen: int = Field(ge=1, le=MAX_PAYMENT_FEN, description="The price, in fen.")
    scene: str | None = Field(default=None, max_length=MAX_NAME_CHARS,
                              description="A scene of the rule set; absent: the device's or the merchant's one.")
    device_id: str | None = Field(default=None, max_length=MAX_ID_CHARS)
    pin_verified: bool = Field(default=False, description="The app checked the member's PIN or face: needed when "
                               "the plan asks for it (above the tenant's PIN threshold).")
    external_ref: str = Field(default="", max_length=MAX_REF_CHARS, description="Your reference (an order "
                              "number), kept with the transfer and shown on statements.")


class PaymentOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "paid": False, "reason": "INSUFFICIENT_FUNDS", "plan": {"approved": False, "reason": "INSUFFICIENT_FUNDS",
                                                                "…": "…"},
        "transfer": None, "balances": [], "repeated": False}]})

    paid: bool = Field(description="True when money moved (now, or by the first call under this key).")
    reason: str | None = Field(description="Why not, when not paid: the plan's decline reason, or PIN_REQUIRED.")
    plan: PlanOut | None = Field(description="The plan this call made; null for a repeat of an earlier payment.")
    transfer: TransferOut | None = Field(description="The payment; null when not paid.")
    balances: list[BalanceOut] = Field(description="The new balances of the member's purses the payment drew on (the "
                                       "merchant's too with statements:read or ledger:admin); empty for a repeat and "
                                       "when not paid.")
    repeated: bool = Field(description="True when this key had paid before: transfer is that payment.")


# --- policy:admin: versions ----------------------------------------------------------------------

_RULE_SET_BODY = Body(description="The rule set: a JSON object in the format of docs/policy.md.",
                      examples=[{"format": 1, "time_zone": "Asia/Shanghai", "scenes": ["canteen"],
                                 "funding_order": ["cash"], "limits": []}])


@router.post("/v1/tenants/{tenant_id}/rule-sets", response_model=RuleSetVersionOut, status_code=201,
             tags=["policy"], summary="Store a rule set as a new draft version")
async def create_rule_set_version(
    tenant_id: TenantId,
    document: Annotated[dict[str, Any], _RULE_SET_BODY],
    response: Response,
    state: State,
    _principal: AdminPolicy,
    note: Annotated[str, Query(max_length=MAX_NOTE_CHARS, description="What changed, for people.")] = "",
) -> RuleSetVersionOut:
    """The body is the rule-set document itself. A document the rules refuse is 400 with the
    parser's ``reason`` (e.g. ``UNKNOWN_MEAL_PERIOD``) and the ``rule`` at fault (e.g.
    ``vouchers[dinner-voucher].where.meal_periods``); nothing is stored then."""
    answer = await state.policy.CreateRuleSetVersion(
        pb.CreateRuleSetVersionRequest(tenant_id=tenant_id, document=json.dumps(document), note=note),
        timeout=state.timeout_s,
    )
    response.headers["Location"] = f"/v1/tenants/{tenant_id}/rule-sets/{answer.version.version}"
    return _version(answer.version)


@router.post("/v1/tenants/{tenant_id}/rule-sets/validate", response_model=ValidationOut, tags=["policy"],
             summary="Check a rule set without storing it")
async def validate_rule_set(
    tenant_id: TenantId,
    document: Annotated[dict[str, Any], _RULE_SET_BODY],
    state: State,
    _principal: AdminPolicy,
) -> ValidationOut:
    """200 ``{"valid": true, "sha256"}``, or the same 400 problem (``reason``, ``rule``) creating it
    would answer."""
    answer = await state.policy.ValidateRuleSet(
        pb.ValidateRuleSetRequest(tenant_id=tenant_id, document=json.dumps(document)), timeout=state.timeout_s
    )
    return ValidationOut(sha256=answer.sha256)


@router.get("/v1/tenants/{tenant_id}/rule-sets", response_model=RuleSetVersionPage, tags=["policy"],
            summary="The tenant's rule-set versions, newest first, a page at a time")
async def list_rule_set_versions(
    tenant_id: TenantId,
    state: State,
    _principal: AdminPolicy,
    page_size: Annotated[int, Query(ge=1, le=MAX_VERSIONS_PAGE_SIZE)] = 50,
    page_token: Annotated[str, Query(max_length=MAX_CURSOR_CHARS)] = "",
) -> RuleSetVersionPage:
    answer = await state.policy.ListRuleSetVersions(
        pb.ListRuleSetVersionsRequest(tenant_id=tenant_id, page_size=page_size, page_token=page_token),
        timeout=state.timeout_s,
    )
    return RuleSetVersionPage(versions=[_version(v) for v in answer.versions],
                              next_page_token=answer.next_page_token or None,
                              published_version=answer.published_version or None)


@router.get("/v1/tenants/{tenant_id}/rule-sets/{version}", response_model=RuleSetVersionOut, tags=["policy"],
            summary="One rule-set version with its document")
async def get_rule_set_version(tenant_id: TenantId, version: Version, state: State,
                               _principal: AdminPolicy) -> RuleSetVersionOut:
    answer = await state.policy.GetRuleSetVersion(pb.GetRuleSetVersionRequest(tenant_id=tenant_id, version=version),
                                                  timeout=state.timeout_s)
    return _version(answer.version)


@router.post("/v1/tenants/{tenant_id}/rule-sets/{version}/publish", response_model=PublishedOut, tags=["policy"],
             summary="Put a stored version in force (devices get it as the bundle)")
async def publish_rule_set_version(
    tenant_id: TenantId,
    version: Version,
    state: State,
    principal: AdminPolicy,
    body: Annotated[PublishIn | None, Body()] = None,
) -> PublishedOut:
    """The version before stays stored and may be published again; publishing the version already
    in force changes nothing (``changed`` false). An unknown version is 404
    ``RULE_SET_VERSION_NOT_FOUND`` and the version in force stays."""
    published_by = (body.published_by if body else None) or principal.client_id
    answer = await state.policy.PublishRuleSetVersion(
        pb.PublishRuleSetVersionRequest(tenant_id=tenant_id, version=version, published_by=published_by),
        timeout=state.timeout_s,
    )
    return PublishedOut(version=_version(answer.version), previous_version=answer.previous_version or None,
                        changed=answer.changed)


# --- policy:admin: dry runs ----------------------------------------------------------------------


async def _payment_request(state: GatewayState, *, tenant_id: str, body: PaymentIn) -> pb.PaymentRequest:
    groups = body.member_groups
    if groups is None:
        answer = await state.identity.GetMember(ipb.GetMemberRequest(tenant_id=tenant_id, member_id=body.member_id),
                                                timeout=state.timeout_s)
        groups = dict(answer.member.groups)
    return pb.PaymentRequest(member_id=body.member_id, member_groups=groups, scene=body.scene or "",
                             merchant_id=body.merchant_id or "", device_id=body.device_id or "",
                             amount_fen=body.amount_fen, time=timestamp_pb(body.time), channel=body.channel or "")


@router.post("/v1/tenants/{tenant_id}/rule-sets/{version}/dry-run", response_model=PlanOut, tags=["policy"],
             summary="The plan one version (draft or published) makes of a payment, on the member's purses now")
async def dry_run_version(tenant_id: TenantId, version: Version, body: PaymentIn, state: State,
                          _principal: AdminPolicy) -> PlanOut:
    """Read-only: nothing is paid and no counter moves. A declined plan is a 200 with
    ``approved`` false and its ``reason``."""
    request = await _payment_request(state, tenant_id=tenant_id, body=body)
    answer = await state.policy.DryRun(pb.DryRunRequest(tenant_id=tenant_id, version=version, request=request),
                                       timeout=state.timeout_s)
    return _plan(answer.plan)


@router.post("/v1/tenants/{tenant_id}/policy/dry-run", response_model=PlanOut, tags=["policy"],
             summary="The plan the published rules make of a payment now", responses=problem_responses(409))
async def dry_run_published(tenant_id: TenantId, body: PaymentIn, state: State, _principal: AdminPolicy) -> PlanOut:
    """"What happens if this member pays this amount here now": the published version, the
    member's purses and counters as the ledger has them. Read-only. No published version is 409
    ``NO_PUBLISHED_RULE_SET``."""
    request = await _payment_request(state, tenant_id=tenant_id, body=body)
    answer = await state.policy.Evaluate(pb.EvaluateRequest(tenant_id=tenant_id, request=request),
                                         timeout=state.timeout_s)
    return _plan(answer.plan)


# --- devices:sync ------------------------------------------------------------------------------


def _etag_matches(if_none_match: str | None, sha256: str) -> bool:
    if not if_none_match:
        return False
    for tag in if_none_match.split(","):
        tag = tag.strip()
        if tag == "*":
            return True
        if tag.startswith("W/"):
            tag = tag[2:]
        if tag.strip('"') == sha256:
            return True
    return False


_BUNDLE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The signed bundle (OCP1), as onecard_policy.bundle.open_bundle opens it",
          "content": {BUNDLE_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}}},
    304: {"description": "If-None-Match named the published rules' sha256: the device has them"},
    **problem_responses(409),
}


@router.get("/v1/tenants/{tenant_id}/policy/bundle", tags=["policy-bundle"], response_class=Response,
            summary="The published rules signed for devices", responses=_BUNDLE_RESPONSES)
async def get_bundle(
    tenant_id: TenantId,
    state: State,
    _principal: SyncDevices,
    if_none_match: Annotated[str | None, Header(alias="If-None-Match", max_length=1024)] = None,
) -> Response:
    """Headers: ``X-Onecard-Policy-Version``, ``X-Onecard-Policy-Key-Id`` (the key that signed it, one
    of ``…/policy/bundle-keys``), ``X-Onecard-Policy-Sha256`` and ``ETag`` (the rule set's SHA-256).
    Send the ETag back as ``If-None-Match`` to get 304 while the rules are unchanged. No published
    version is 409 ``NO_PUBLISHED_RULE_SET``."""
    answer = await state.policy.GetBundle(pb.GetBundleRequest(tenant_id=tenant_id), timeout=state.timeout_s)
    headers = {VERSION_HEADER: str(answer.version), KEY_ID_HEADER: answer.key_id, SHA256_HEADER: answer.sha256,
               "ETag": f'"{answer.sha256}"', "Cache-Control": "no-cache"}
    if _etag_matches(if_none_match, answer.sha256):
        return Response(status_code=304, headers=headers)
    return Response(content=answer.bundle, media_type=BUNDLE_MEDIA_TYPE, headers=headers)


@router.get("/v1/tenants/{tenant_id}/policy/bundle-keys", response_model=BundleKeysOut, tags=["policy-bundle"],
            summary="The public keys a device checks the tenant's bundles with")
async def get_bundle_keys(tenant_id: TenantId, state: State, _principal: SyncDevices) -> BundleKeysOut:
    answer = await state.policy.GetBundleKeys(pb.GetBundleKeysRequest(tenant_id=tenant_id), timeout=state.timeout_s)
    return BundleKeysOut(keys=[BundleKeyOut(key_id=k.key_id, public_key=base64.b64encode(k.public_key).decode(),
                                            created_at=timestamp(k.created_at)) for k in answer.keys])


# --- payments:create ---------------------------------------------------------------------------


@router.post("/v1/tenants/{tenant_id}/members/{member_id}/payments", response_model=PaymentOut, status_code=201,
             tags=["payments"], summary="Pay for a member at a merchant under the published rules",
             responses={200: {"description": "Not paid: the rules declined (paid false, reason)",
                              "model": PaymentOut},
                        **problem_responses(409)})
async def create_payment(
    tenant_id: TenantId,
    member_id: MemberId,
    body: PaymentCreateIn,
    response: Response,
    state: State,
    principal: CreatePayments,
    idempotency_key: IdempotencyKeyHeader = None,
) -> PaymentOut:
    """The member's groups come from the directory: an unknown member is 404 ``MEMBER_NOT_FOUND``,
    a frozen or departed one 409 ``MEMBER_NOT_ACTIVE``. Paid: 201 with the plan, the transfer and
    the new balances. Declined by the rules (or ``PIN_REQUIRED``): 200 with ``paid`` false and the
    ``reason``; nothing moved and the key may be used again. A repeat of a paid key answers 201 with
    the first payment (``repeated`` true)."""
    key = _key(idempotency_key)
    member = (await state.identity.GetMember(ipb.GetMemberRequest(tenant_id=tenant_id, member_id=member_id),
                                             timeout=state.timeout_s)).member
    if member.status != ipb.MEMBER_STATUS_ACTIVE:
        raise ProblemError(status=409, reason="MEMBER_NOT_ACTIVE",
                           detail=f"the member is {enum_name(ipb.MemberStatus, value=member.status)}: only an active "
                           "member pays")
    answer = await state.policy.Pay(
        pb.PayRequest(
            tenant_id=tenant_id, idempotency_key=key, key_scope=client_scope(principal.client_id),
            external_ref=body.external_ref,
            request=pb.PaymentRequest(member_id=member_id, member_groups=dict(member.groups), scene=body.scene or "",
                                      merchant_id=body.merchant_account_id, device_id=body.device_id or "",
                                      amount_fen=body.amount_fen, channel="online", pin_verified=body.pin_verified),
        ),
        timeout=state.timeout_s,
    )
    response.status_code = 201 if answer.paid else 200
    # The member's purses' new balances; the merchant's (and a sponsoring funding account's) only to
    # a caller whose scopes reach them (gateway.routes.ledger.account_refusal).
    purses = {leg.account_id for leg in answer.plan.legs}
    shown = [b for b in answer.balances
             if b.account_id in purses or LEDGER_ADMIN in principal.scopes
             or (b.account_id == body.merchant_account_id and STATEMENTS_READ in principal.scopes)]
    return PaymentOut(
        paid=answer.paid, reason=or_none(answer.reason),
        plan=_plan(answer.plan) if answer.HasField("plan") else None,
        transfer=_transfer(answer.transfer) if answer.paid and answer.HasField("transfer") else None,
        balances=[_balance(b) for b in shown], repeated=answer.repeated,
    )
