"""REST for prefunding, top-up reversals, refunds to the bank, the daily reconciliation file and
members' low-balance thresholds (docs/reconciliation.md).

- ``ledger:admin``: record a bank's transfer that funds a partner's clearing account; refund a
  member's cash through a partner's clearing account; any partner's reconciliation file;
- ``wallets:topup``: a partner reverses its own top-up; sets a member's low-balance threshold;
- ``wallets:read``: a partner's own reconciliation file (it reads its own clearing account).

A partner reaches only its own clearing account: the gateway finds it by the token's client id.
An admin names a client the tenant granted; another is 404 CLIENT_NOT_FOUND. Handlers only
translate; the money rules are the ledger's and the file's text is ``gateway.reconciliation``'s.
"""
from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Path
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway.auth import AdminLedger, ReadWallets, TopUpWallets
from gateway.models import MAX_ID_CHARS, MemberId, TenantId
from gateway.problems import ProblemError, problem_responses
from gateway.reconciliation import reconciliation_csv
from gateway.routes.ledger import (
    MAX_AMOUNT_FEN,
    MAX_IDEMPOTENCY_KEY_CHARS,
    MAX_REF_CHARS,
    AccountOut,
    ClientId,
    IdempotencyKeyHeader,
    WriteOut,
    _account,
    _key,
    _member_must_exist,
    _open_clearing,
    _write,
)
from gateway.state import GatewayState, State
from onecard.identity.v1 import identity_pb2 as ipb
from onecard.ledger.v1 import ledger_pb2 as pb
from runtime.idempotency import client_scope

router = APIRouter(responses=problem_responses(400, 401, 403, 404, 422, 429, 501, 503, 504))

DayPath = Annotated[str, Path(pattern=r"^\d{4}-\d{2}-\d{2}$", description="The day, YYYY-MM-DD, in the tenant's "
                              "time zone.")]
# The ledger's bound on a low-balance threshold.
MAX_THRESHOLD_FEN = 100_000_000
RECONCILIATION_PAGE_SIZE = 2000
_UNSAFE_FILENAME = re.compile(r"[^A-Za-z0-9._-]")


async def _check_granted(state: GatewayState, *, tenant_id: str, client_id: str) -> None:
    """404 CLIENT_NOT_FOUND for a client the tenant has not granted (another tenant's partner)."""
    granted = await state.identity.ListApiClients(ipb.ListApiClientsRequest(tenant_id=tenant_id),
                                                  timeout=state.timeout_s)
    if not any(c.client_id == client_id for c in granted.clients):
        raise ProblemError(status=404, reason="CLIENT_NOT_FOUND", detail="this tenant has not granted that client")


async def _granted_clearing(state: GatewayState, *, tenant_id: str, client_id: str) -> pb.AccountBalance:
    """The clearing account of a client the tenant granted (opened if it has none yet)."""
    await _check_granted(state, tenant_id=tenant_id, client_id=client_id)
    return await _open_clearing(state, tenant_id=tenant_id, client_id=client_id)


async def _existing_clearing(state: GatewayState, *, tenant_id: str, client_id: str) -> pb.AccountBalance | None:
    answer = await state.ledger.GetBalances(
        pb.GetBalancesRequest(tenant_id=tenant_id, owner_kind=pb.OWNER_KIND_TENANT, owner_id=tenant_id),
        timeout=state.timeout_s,
    )
    for item in answer.accounts:
        if item.account.purse_kind == pb.PURSE_KIND_BANK_CLEARING and item.account.ref == client_id:
            return item
    return None


async def _cash_purse(state: GatewayState, *, tenant_id: str, member_id: str) -> pb.AccountBalance:
    await _member_must_exist(state, tenant_id=tenant_id, member_id=member_id)
    opened = await state.ledger.OpenAccount(
        pb.OpenAccountRequest(tenant_id=tenant_id, owner_kind=pb.OWNER_KIND_MEMBER, owner_id=member_id,
                              purse_kind=pb.PURSE_KIND_CASH, ref="", no_overdraft=True),
        timeout=state.timeout_s,
    )
    return opened.account


# --- ledger:admin: fundings and refunds to the bank -----------------------------------------------


class FundingIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"amount_fen": 100_000_000, "bank_reference": "CMB-20261203-000123", "value_date": "2026-12-03"}]})

    amount_fen: int = Field(ge=1, le=MAX_AMOUNT_FEN, description="The money the bank transferred, in fen.")
    bank_reference: str = Field(min_length=1, max_length=MAX_REF_CHARS, description="The bank transfer's reference; "
                                "a reference funds a clearing account once (409 BANK_REFERENCE_USED).")
    value_date: str = Field(pattern=r"^\d{4}-\d{2}-\d{2}$", description="The bank transfer's value date.")


@router.post("/v1/tenants/{tenant_id}/api-clients/{client_id}/clearing-account/fundings", response_model=WriteOut,
             status_code=201, tags=["ledger"], summary="Record a partner's bank transfer to the school: its clearing "
             "account may top up that much more", responses=problem_responses(409))
async def fund_clearing_account(tenant_id: TenantId, client_id: ClientId, body: FundingIn, state: State,
                                principal: AdminLedger, idempotency_key: IdempotencyKeyHeader = None) -> WriteOut:
    """The tenant's bank receipts account pays the partner's clearing account (opened if needed):
    what the partner may top up is then its balance plus its credit limit. Balances answered: the
    bank receipts account's, then the clearing account's."""
    key = _key(idempotency_key)
    clearing = await _granted_clearing(state, tenant_id=tenant_id, client_id=client_id)
    answer = await state.ledger.FundClearingAccount(
        pb.FundClearingAccountRequest(tenant_id=tenant_id, idempotency_key=key,
                                      key_scope=client_scope(principal.client_id),
                                      clearing_account_id=clearing.account.account_id, amount_fen=body.amount_fen,
                                      bank_reference=body.bank_reference, value_date=body.value_date),
        timeout=state.timeout_s,
    )
    return _write(answer.transfer, list(answer.balances))


class BankRefundIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"client_id": "bank-of-campus", "amount_fen": 12_345, "external_ref": "leaver 2026-0042"}]})

    client_id: str = Field(min_length=1, max_length=MAX_ID_CHARS, description="The partner whose bank pays the "
                           "member out; its clearing account is credited.")
    amount_fen: int = Field(ge=1, le=MAX_AMOUNT_FEN)
    external_ref: str = Field(default="", max_length=MAX_REF_CHARS)


@router.post("/v1/tenants/{tenant_id}/members/{member_id}/bank-refunds", response_model=WriteOut, status_code=201,
             tags=["ledger"], summary="Refund a member's cash through a partner's bank (a leaver's money)",
             responses=problem_responses(409))
async def refund_to_bank(tenant_id: TenantId, member_id: MemberId, body: BankRefundIn, state: State,
                         principal: AdminLedger, idempotency_key: IdempotencyKeyHeader = None) -> WriteOut:
    """The member's cash purse pays the partner's clearing account; more than the purse holds is
    409 INSUFFICIENT_FUNDS."""
    key = _key(idempotency_key)
    purse = await _cash_purse(state, tenant_id=tenant_id, member_id=member_id)
    clearing = await _granted_clearing(state, tenant_id=tenant_id, client_id=body.client_id)
    answer = await state.ledger.RefundToBank(
        pb.RefundToBankRequest(tenant_id=tenant_id, idempotency_key=key, key_scope=client_scope(principal.client_id),
                               account_id=purse.account.account_id, clearing_account_id=clearing.account.account_id,
                               amount_fen=body.amount_fen, external_ref=body.external_ref),
        timeout=state.timeout_s,
    )
    return _write(answer.transfer, list(answer.balances))


# --- wallets:topup: reversals and thresholds ---------------------------------------------------------


class ReversalIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"top_up_idempotency_key": "bank-txn-20261203-0001", "reason": "R01 insufficient funds"}]})

    top_up_transfer_id: str | None = Field(default=None, min_length=1, max_length=MAX_ID_CHARS)
    top_up_idempotency_key: str | None = Field(default=None, min_length=1, max_length=MAX_IDEMPOTENCY_KEY_CHARS,
                                               description="The Idempotency-Key the top-up was sent with.")
    reason: str = Field(default="", max_length=MAX_REF_CHARS, description="Why (e.g. the bank's return code); "
                        "kept as the reversal's external_ref.")

    @model_validator(mode="after")
    def _one_top_up(self) -> ReversalIn:
        if (self.top_up_transfer_id is None) == (self.top_up_idempotency_key is None):
            raise ValueError("name the top-up by exactly one of top_up_transfer_id and top_up_idempotency_key")
        return self


@router.post("/v1/tenants/{tenant_id}/top-up-reversals", response_model=WriteOut, status_code=201,
             tags=["wallets"], summary="Reverse one of your own top-ups (your bank transfer failed)",
             responses=problem_responses(409))
async def reverse_top_up(tenant_id: TenantId, body: ReversalIn, state: State, principal: TopUpWallets,
                         idempotency_key: IdempotencyKeyHeader = None) -> WriteOut:
    """The whole top-up goes back from the member's cash purse to your clearing account, once: a
    second reversal is 409 TOP_UP_ALREADY_REVERSED, and one after the member spent the money 409
    TOP_UP_ALREADY_SPENT. A transfer that is not your top-up is 404 TRANSFER_NOT_FOUND."""
    key = _key(idempotency_key)
    clearing = await _existing_clearing(state, tenant_id=tenant_id, client_id=principal.client_id)
    if clearing is None:
        raise ProblemError(status=404, reason="TRANSFER_NOT_FOUND", detail="you have made no top-up here")
    answer = await state.ledger.ReverseTopUp(
        pb.ReverseTopUpRequest(tenant_id=tenant_id, idempotency_key=key, key_scope=client_scope(principal.client_id),
                               clearing_account_id=clearing.account.account_id,
                               top_up_transfer_id=body.top_up_transfer_id or "",
                               top_up_idempotency_key=body.top_up_idempotency_key or "", reason=body.reason),
        timeout=state.timeout_s,
    )
    return _write(answer.transfer, list(answer.balances))


class ThresholdIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"threshold_fen": 2000},
                                                                              {"threshold_fen": None}]})

    threshold_fen: int | None = Field(ge=0, le=MAX_THRESHOLD_FEN, description="When a payment (or a hold, a "
                                      "reversal, a refund to the bank) takes the cash purse's available balance "
                                      "from at or above this to below it, ledger.balance.low fires (the "
                                      "balance.low webhook). null clears it.")


@router.put("/v1/tenants/{tenant_id}/members/{member_id}/low-balance-threshold", response_model=AccountOut,
            tags=["wallets"], summary="Set or clear a member's low-balance threshold on the cash purse")
async def set_low_balance_threshold(tenant_id: TenantId, member_id: MemberId, body: ThresholdIn, state: State,
                                    _principal: TopUpWallets) -> AccountOut:
    """One threshold per member, whoever set it last (the tenant's partners share it). Setting it
    while the balance is already below fires nothing: only a crossing does."""
    purse = await _cash_purse(state, tenant_id=tenant_id, member_id=member_id)
    request = pb.SetLowBalanceThresholdRequest(tenant_id=tenant_id, account_id=purse.account.account_id)
    if body.threshold_fen is not None:
        request.threshold_fen = body.threshold_fen
    answer = await state.ledger.SetLowBalanceThreshold(request, timeout=state.timeout_s)
    return _account(answer.account)


# --- the reconciliation file -----------------------------------------------------------------------------

_RECONCILIATION_CSV = {
    200: {"description": "The day's transfers of the clearing account, its totals and a SHA-256 trailer "
          "(docs/reconciliation.md)",
          "content": {"text/csv": {"schema": {"type": "string"}, "example": (
              "booked_at,transfer_id,kind,member_id,amount_fen,external_ref,idempotency_key,value_date\n"
              "\"2026-12-03T09:15:02.123456+08:00\",\"9c1d2e3f-4a5b-4c6d-8e7f-0a1b2c3d4e5f\",\"top_up\","
              "\"0b9e4c1e-9d2f-4c55-a0f4-6f6b1b2c3d4e\",-10000,\"bank-txn-1\",\"key-1\",\"\"\n"
              "\"date\",\"2026-12-03\",\"Asia/Shanghai\"\n"
              "...\n"
              "sha256,3f0a...\n")}}},
}


async def _file(state: GatewayState, *, tenant_id: str, clearing: pb.AccountBalance, date: str) -> StreamingResponse:
    tenant = await state.identity.GetTenant(ipb.GetTenantRequest(tenant_id=tenant_id), timeout=state.timeout_s)
    time_zone = tenant.tenant.time_zone or "Asia/Shanghai"
    request = pb.GetReconciliationRequest(tenant_id=tenant_id, clearing_account_id=clearing.account.account_id,
                                          date=date, time_zone=time_zone, page_size=RECONCILIATION_PAGE_SIZE)
    # The first page before answering, so a refusal (a bad day) is still a problem.
    first = await state.ledger.GetReconciliation(request, timeout=state.timeout_s)

    async def pages() -> AsyncIterator[pb.GetReconciliationResponse]:
        answer = first
        yield answer
        while answer.next_page_token:
            request.page_token = answer.next_page_token
            answer = await state.ledger.GetReconciliation(request, timeout=state.timeout_s)
            yield answer

    filename = f"reconciliation-{_UNSAFE_FILENAME.sub('_', clearing.account.ref)}-{date}.csv"
    return StreamingResponse(reconciliation_csv(pages(), date=date, time_zone=time_zone),
                             media_type="text/csv; charset=utf-8",
                             headers={"Content-Disposition": f'attachment; filename="{filename}"'})


@router.get("/v1/tenants/{tenant_id}/reconciliation/{date}", tags=["wallets"], response_class=StreamingResponse,
            summary="Your clearing account's reconciliation file for one day (the tenant's time zone), as CSV",
            responses=_RECONCILIATION_CSV)
async def get_own_reconciliation(tenant_id: TenantId, date: DayPath, state: State,
                                 principal: ReadWallets) -> StreamingResponse:
    """Every funding, top-up, top-up reversal and refund to the bank that moved your clearing
    account that day, the totals per kind, the opening and closing balance, and a SHA-256 over
    the lines. 404 ACCOUNT_NOT_FOUND before your clearing account exists."""
    clearing = await _existing_clearing(state, tenant_id=tenant_id, client_id=principal.client_id)
    if clearing is None:
        raise ProblemError(status=404, reason="ACCOUNT_NOT_FOUND", detail="no clearing account yet: it opens with "
                           "the first top-up, or when the tenant sets its credit limit or records a funding")
    return await _file(state, tenant_id=tenant_id, clearing=clearing, date=date)


@router.get("/v1/tenants/{tenant_id}/api-clients/{client_id}/reconciliation/{date}", tags=["ledger"],
            response_class=StreamingResponse, summary="A partner's reconciliation file for one day, as CSV",
            responses=_RECONCILIATION_CSV)
async def get_client_reconciliation(tenant_id: TenantId, client_id: ClientId, date: DayPath, state: State,
                                    _principal: AdminLedger) -> StreamingResponse:
    """The file the partner itself fetches, byte for byte. A client the tenant has not granted is 404
    CLIENT_NOT_FOUND; one granted without a clearing account 404 ACCOUNT_NOT_FOUND."""
    await _check_granted(state, tenant_id=tenant_id, client_id=client_id)
    clearing = await _existing_clearing(state, tenant_id=tenant_id, client_id=client_id)
    if clearing is None:
        raise ProblemError(status=404, reason="ACCOUNT_NOT_FOUND", detail="that client has no clearing account")
    return await _file(state, tenant_id=tenant_id, clearing=clearing, date=date)

