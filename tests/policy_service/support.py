"""Helpers of the policy service tests: rule-set documents, a campus in the ledger, refusals."""

from __future__ import annotations

import asyncio
import copy
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from onecard_policy.examples import university_rule_set

from onecard.ledger.v1 import ledger_pb2 as lpb
from onecard.policy.v1 import policy_pb2 as pb
from runtime.grpc_client import error_info
from tests.ledger.support import allow_credit

SHANGHAI = ZoneInfo("Asia/Shanghai")
# 2026-11-26, a Thursday in Shanghai.
LUNCH = datetime(2026, 11, 26, 12, 0, tzinfo=SHANGHAI)
DINNER = datetime(2026, 11, 26, 18, 0, tzinfo=SHANGHAI)
BREAKFAST = datetime(2026, 11, 26, 7, 30, tzinfo=SHANGHAI)


async def refused(call: Any) -> tuple[grpc.StatusCode, str | None, dict[str, str]]:
    """The status code, ErrorInfo reason and metadata of a call that must fail."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    reason, metadata = error_info(info.value)
    return info.value.code(), reason, metadata


def stamp(value: datetime) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(value)
    return out


def university(*, canteen_merchant_id: str | None = None) -> dict[str, Any]:
    """Demo University's rule set; with the North Canteen named by its ledger account id."""
    doc = copy.deepcopy(university_rule_set())
    if canteen_merchant_id is not None:
        text = json.dumps(doc).replace('"canteen-north"', json.dumps(canteen_merchant_id))
        doc = json.loads(text)
    return doc


def document(doc: dict[str, Any]) -> str:
    return json.dumps(doc)


@dataclass
class Campus:
    """One tenant in the ledger: bank clearing, a canteen merchant, one member with purses."""

    tenant_id: str
    bank_id: str
    merchant_id: str
    member_id: str
    cash_id: str
    voucher_id: str | None = None


async def open_account(stub: Any, tenant_id: str, *, owner_kind: int, owner_id: str, purse_kind: int,
                       ref: str = "") -> str:
    answer = await stub.OpenAccount(lpb.OpenAccountRequest(tenant_id=tenant_id, owner_kind=owner_kind,
                                                           owner_id=owner_id, purse_kind=purse_kind, ref=ref))
    return answer.account.account.account_id


async def top_up(stub: Any, c: Campus, account_id: str, amount_fen: int, *, from_id: str | None = None) -> None:
    await stub.TopUp(lpb.TopUpRequest(tenant_id=c.tenant_id, idempotency_key=str(uuid.uuid4()),
                                      from_account_id=from_id or c.bank_id, to_account_id=account_id,
                                      amount_fen=amount_fen))


async def campus(stub: Any, *, cash_fen: int = 100_000, tenant_id: str | None = None) -> Campus:
    tenant_id = tenant_id or str(uuid.uuid4())
    bank_id = await open_account(stub, tenant_id, owner_kind=lpb.OWNER_KIND_TENANT, owner_id="bank",
                                 purse_kind=lpb.PURSE_KIND_BANK_CLEARING)
    await allow_credit(stub, tenant_id, bank_id)
    merchant_id = await open_account(stub, tenant_id, owner_kind=lpb.OWNER_KIND_MERCHANT, owner_id="canteen-north",
                                     purse_kind=lpb.PURSE_KIND_MERCHANT_SETTLEMENT)
    member_id = str(uuid.uuid4())
    cash_id = await open_account(stub, tenant_id, owner_kind=lpb.OWNER_KIND_MEMBER, owner_id=member_id,
                                 purse_kind=lpb.PURSE_KIND_CASH)
    c = Campus(tenant_id=tenant_id, bank_id=bank_id, merchant_id=merchant_id, member_id=member_id, cash_id=cash_id)
    if cash_fen:
        await top_up(stub, c, cash_id, cash_fen)
    return c


async def add_voucher(stub: Any, c: Campus, amount_fen: int, *, ref: str = "dinner-voucher") -> str:
    funding_id = await open_account(stub, c.tenant_id, owner_kind=lpb.OWNER_KIND_TENANT, owner_id="school",
                                    purse_kind=lpb.PURSE_KIND_SUBSIDY_FUNDING, ref=ref)
    voucher_id = await open_account(stub, c.tenant_id, owner_kind=lpb.OWNER_KIND_MEMBER, owner_id=c.member_id,
                                    purse_kind=lpb.PURSE_KIND_VOUCHER, ref=ref)
    await top_up(stub, c, voucher_id, amount_fen, from_id=funding_id)
    c.voucher_id = voucher_id
    return voucher_id


async def publish(stub: Any, tenant_id: str, doc: dict[str, Any], *, note: str = "") -> int:
    created = await stub.CreateRuleSetVersion(pb.CreateRuleSetVersionRequest(
        tenant_id=tenant_id, document=document(doc), note=note))
    await stub.PublishRuleSetVersion(pb.PublishRuleSetVersionRequest(
        tenant_id=tenant_id, version=created.version.version, published_by="admin@test"))
    return created.version.version


def payment(c: Campus, *, amount_fen: int, at: datetime, scene: str = "canteen", device_id: str = "pos-north-1",
            groups: dict[str, str] | None = None, channel: str = "") -> pb.PaymentRequest:
    return pb.PaymentRequest(member_id=c.member_id, member_groups=groups or {"role": "student"}, scene=scene,
                             merchant_id=c.merchant_id, device_id=device_id, amount_fen=amount_fen, time=stamp(at),
                             channel=channel)


async def eventually(check: Callable[[], Awaitable[Any]], *, what: str, deadline_s: float = 5.0,
                     detail: Callable[[], str] = lambda: "") -> Any:
    """Poll ``check`` until it answers something truthy, for at most ``deadline_s``: for what
    Evaluate sees once the ledger's event reached policy's member-state cache."""
    deadline = time.monotonic() + deadline_s
    while True:
        answer = await check()
        if answer:
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {deadline_s} s: {what} {detail()}".rstrip())
        await asyncio.sleep(0.05)
