"""REST for the ledger: ``onecard.ledger.v1.LedgerService`` as banks, a school's finance office and
merchants use it.

- ``wallets:read``: a member's purses and balances, an account's history, "did this pay?";
- ``wallets:topup``: a bank tops up a member's cash purse from its own clearing account (one per
  API client, opened on first use), within the credit limit the tenant set on it;
- ``ledger:admin``: open accounts, refunds, freezing, subsidy programs, grant batches, clawbacks,
  the trial balance, a partner's credit limit;
- ``statements:read``: a merchant's or a device's daily statement as CSV, and its totals as JSON.

A scope means what it says (``account_refusal``): ``wallets:read`` reaches members' purses and the
caller's own clearing account; a merchant's accounts also need ``statements:read`` or
``ledger:admin``; the tenant's other accounts ``ledger:admin``; another partner's clearing account
is never shown to a partner (404, as an account that does not exist). The ledger knows no scopes,
so the gateway reads the account (or a looked-up transfer's accounts) before it answers.

Each handler only translates: path, query, body and the ``Idempotency-Key`` header to a request
message, the answer to JSON. The money rules (overdraft, refund limits, frozen accounts) are the
ledger's; its refusals come back as problems through ``gateway.problems``. Amounts are integer fen.
"""
from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Literal

import pydantic
from fastapi import APIRouter, Body, Header, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from google.protobuf import timestamp_pb2
from pydantic import BaseModel, ConfigDict, Field

from gateway.auth import (
    LEDGER_ADMIN,
    MEMBER_TOKEN_ROUTE,
    STATEMENTS_READ,
    AdminLedger,
    Principal,
    ReadStatements,
    ReadWallets,
    TopUpWallets,
    insufficient_scope,
)
from gateway.exports import csv_text
from gateway.models import MemberId, TenantId, MAX_ID_CHARS, enum_name, enum_value, timestamp
from gateway.problems import ProblemError, problem_responses
from gateway.state import GatewayState, State
from onecard.identity.v1 import identity_pb2 as ipb
from onecard.ledger.v1 import ledger_pb2 as pb
from gateway.models import or_none
from runtime.idempotency import client_scope
from runtime.wire import timestamp_pb

router = APIRouter(responses=problem_responses(400, 401, 403, 404, 422, 429, 501, 503, 504))

AccountId = Annotated[str, Path(min_length=1, max_length=MAX_ID_CHARS, description="A ledger account id (UUID).")]
ClientId = Annotated[str, Path(min_length=1, max_length=MAX_ID_CHARS, description="An API client the tenant granted.")]
TransferId = Annotated[str, Path(min_length=1, max_length=MAX_ID_CHARS, description="A transfer id (UUID).")]
BatchId = Annotated[str, Path(min_length=1, max_length=MAX_ID_CHARS, description="A grant batch id (UUID).")]

# The ledger's own bounds (it checks them again): keys of 1..128 printable ASCII, refs of 128.
MAX_IDEMPOTENCY_KEY_CHARS = 128
MAX_REF_CHARS = 128
MAX_BILL_NUMBER_CHARS = 64
MAX_AMOUNT_FEN = 10**12
# The ledger's bound on a clearing account's credit limit.
MAX_CREDIT_LIMIT_FEN = 10**15
MAX_CURSOR_CHARS = 1024
MAX_HISTORY_PAGE_SIZE = 200
MAX_ROWS_PAGE_SIZE = 1000
MAX_GRANT_ROWS = 50_000
STATEMENT_PAGE_SIZE = 2000
CSV_MEDIA_TYPES = ("text/csv", "application/csv")
GRANT_CSV_HEADER = ["member_id", "amount_fen"]
STATEMENT_COLUMNS = ["booked_at", "event_time", "transfer_id", "kind", "merchant_fen", "device_id", "external_ref",
                     "idempotency_key"]

OwnerKindName = Literal["member", "merchant", "tenant", "system"]
PurseKindName = Literal["cash", "subsidy", "voucher", "merchant_settlement", "bank_clearing", "subsidy_funding",
                        "receivable", "bank_receipts"]
ProgramPurseKindName = Literal["subsidy", "voucher"]
AccountStatusName = Literal["open", "frozen", "closed"]
TransferKindName = Literal["top_up", "payment", "refund", "hold", "capture", "void", "expiry", "subsidy_grant",
                           "subsidy_expiry", "clawback", "offline_settlement", "clearing_funding", "top_up_reversal",
                           "bank_refund"]
ProgramStatusName = Literal["active", "ending", "ended"]
GrantBatchStatusName = Literal["running", "done"]
GrantRowStatusName = Literal["pending", "granted", "failed"]

IdempotencyKeyHeader = Annotated[
    str | None,
    Header(alias="Idempotency-Key", max_length=MAX_IDEMPOTENCY_KEY_CHARS,
           description="Required on every write: a key you choose (a UUID, say), unique in the tenant. The same key "
           "with the same request answers the first result; with another request 409 IDEMPOTENCY_KEY_REUSED."),
]


def _key(value: str | None) -> str:
    if not value:
        raise ProblemError(status=400, reason="IDEMPOTENCY_KEY_REQUIRED",
                           detail="send an Idempotency-Key header with every write (e.g. a UUID)")
    return value


# --- shapes ------------------------------------------------------------------------------------


class AccountOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "account_id": "6a0c4d2e-1b3f-4a5c-9d7e-8f9a0b1c2d3e", "owner_kind": "member",
        "owner_id": "0b9e4c1e-9d2f-4c55-a0f4-6f6b1b2c3d4e", "purse_kind": "cash", "ref": "", "currency": "CNY",
        "no_overdraft": True, "status": "open", "posted_fen": 10000, "pending_fen": 0, "available_fen": 10000}]})

    account_id: str
    owner_kind: OwnerKindName
    owner_id: str
    purse_kind: PurseKindName
    ref: str = Field(description="The subsidy program or voucher campaign of the purse; empty for the others.")
    currency: str
    no_overdraft: bool
    status: AccountStatusName
    posted_fen: int = Field(description="Booked money, in fen.")
    pending_fen: int = Field(description="Money held by pending holds, in fen.")
    available_fen: int = Field(description="What may still be spent: posted - pending, in fen.")
    credit_limit_fen: int | None = Field(default=None, description="A bank clearing account's credit limit: how far "
                                         "below zero its balance may go (0: the bank tops up only what it "
                                         "prefunded). null on every other account.")
    low_balance_threshold_fen: int | None = Field(default=None, description="A cash purse's low-balance threshold "
                                                  "(ledger.balance.low fires when the balance crosses below it); "
                                                  "null when none is set, and on every other account.")


class BalanceOut(BaseModel):
    account_id: str
    posted_fen: int
    pending_fen: int
    available_fen: int


class PostingOut(BaseModel):
    account_id: str
    amount_fen: int = Field(description="Positive credits the account, negative debits it.")
    pending_fen: int


class CodeOut(BaseModel):
    credential_id: str
    counter: int


class TransferOut(BaseModel):
    transfer_id: str
    kind: TransferKindName
    idempotency_key: str
    amount_fen: int
    postings: list[PostingOut]
    merchant_account_id: str | None
    device_id: str | None
    external_ref: str | None
    original_transfer_id: str | None = Field(description="For a refund: the payment; for a capture, void or "
                                             "expiry: the hold's transfer.")
    event_time: datetime | None
    booked_at: datetime | None
    code: CodeOut | None = Field(default=None, description="The e-code that paid (payments, holds, offline "
                                 "settlements made with a code).")


class WriteOut(BaseModel):
    """A booked transfer and the new balances of the accounts it touched."""

    transfer: TransferOut
    balances: list[BalanceOut]


class MemberBalancesOut(BaseModel):
    member_id: str
    purses: list[AccountOut] = Field(description="Every purse of the member: cash (opened with the member, or at "
                                     "the first top-up), subsidy and voucher purses (opened by their first grant), a "
                                     "receivable if an offline payment fell short.")


class TransferPage(BaseModel):
    transfers: list[TransferOut] = Field(description="Newest first.")
    next_page_token: str | None = Field(description="null on the last page.")


class LookupOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"found": False, "transfer": None}]})

    found: bool = Field(description="Whether a transfer was booked under this idempotency key.")
    transfer: TransferOut | None


class OpenedAccountOut(BaseModel):
    account: AccountOut
    created: bool = Field(description="False when the account was there already (opening is idempotent).")


class PurseKindTotalOut(BaseModel):
    purse_kind: PurseKindName
    posted_fen: int
    pending_fen: int
    accounts: int


class TrialBalanceOut(BaseModel):
    postings_sum_fen: int = Field(description="The sum of every posting of the tenant: zero.")
    balances_sum_fen: int = Field(description="The sum of every account's posted balance: zero.")
    balanced: bool
    totals: list[PurseKindTotalOut]


class ProgramOut(BaseModel):
    purse_kind: ProgramPurseKindName
    ref: str
    funding_account_id: str
    ends_at: datetime | None = Field(description="null: the program does not end.")
    status: ProgramStatusName
    expired_purses: int = Field(description="Once ended: purses that expired with money left.")
    expired_fen: int = Field(description="Once ended: the money returned to the funding account.")


class DefinedProgramOut(BaseModel):
    program: ProgramOut
    created: bool


class GrantBatchOut(BaseModel):
    batch_id: str
    bill_number: str
    purse_kind: ProgramPurseKindName
    ref: str
    status: GrantBatchStatusName
    total_rows: int
    done_rows: int = Field(description="Granted + failed; the batch is done when this reaches total_rows.")
    granted_rows: int
    failed_rows: int
    granted_fen: int
    created_at: datetime | None
    finished_at: datetime | None


class StartedBatchOut(BaseModel):
    batch: GrantBatchOut
    created: bool = Field(description="False when this bill number was started before with the same rows.")


class GrantRowOut(BaseModel):
    line: int = Field(description="The row's place in the request, from 1.")
    member_id: str
    amount_fen: int
    status: GrantRowStatusName
    transfer_id: str | None
    account_id: str | None
    reason: str | None = Field(description="Failed: why, as an error reason (e.g. ACCOUNT_FROZEN).")
    message: str | None


class GrantRowPage(BaseModel):
    rows: list[GrantRowOut]
    next_page_token: str | None


class StatementTotalsOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "date": "2026-11-26", "time_zone": "Asia/Shanghai", "day_start": "2026-11-25T16:00:00Z",
        "day_end": "2026-11-26T16:00:00Z", "payments": 2, "payments_fen": 2300, "refunds": 1, "refunds_fen": 500,
        "offline_settlements": 0, "captures": 0, "net_fen": 1800}]})

    date: str
    time_zone: str
    day_start: datetime | None
    day_end: datetime | None
    payments: int = Field(description="Payments, offline settlements and hold captures booked that day.")
    payments_fen: int
    refunds: int
    refunds_fen: int
    offline_settlements: int
    captures: int
    net_fen: int = Field(description="payments_fen - refunds_fen.")


def _account(item: pb.AccountBalance) -> AccountOut:
    a, b = item.account, item.balance
    return AccountOut(
        account_id=a.account_id, owner_kind=enum_name(pb.OwnerKind, value=a.owner_kind), owner_id=a.owner_id,
        purse_kind=enum_name(pb.PurseKind, value=a.purse_kind), ref=a.ref, currency=a.currency,
        no_overdraft=a.no_overdraft, status=enum_name(pb.AccountStatus, value=a.status),
        posted_fen=b.posted_fen, pending_fen=b.pending_fen, available_fen=b.available_fen,
        credit_limit_fen=a.credit_limit_fen if a.HasField("credit_limit_fen") else None,
        low_balance_threshold_fen=a.low_balance_threshold_fen if a.HasField("low_balance_threshold_fen") else None,
    )


def _balance(b: pb.Balance) -> BalanceOut:
    return BalanceOut(account_id=b.account_id, posted_fen=b.posted_fen, pending_fen=b.pending_fen,
                      available_fen=b.available_fen)


def _transfer(t: pb.Transfer) -> TransferOut:
    return TransferOut(
        transfer_id=t.transfer_id, kind=enum_name(pb.TransferKind, value=t.kind), idempotency_key=t.idempotency_key,
        amount_fen=t.amount_fen,
        postings=[PostingOut(account_id=p.account_id, amount_fen=p.amount_fen, pending_fen=p.pending_fen)
                  for p in t.postings],
        merchant_account_id=or_none(t.merchant_account_id), device_id=or_none(t.device_id),
        external_ref=or_none(t.external_ref), original_transfer_id=or_none(t.original_transfer_id),
        event_time=timestamp(t.event_time), booked_at=timestamp(t.booked_at),
        code=CodeOut(credential_id=t.code.credential_id, counter=t.code.counter) if t.HasField("code") else None,
    )


def _write(transfer: pb.Transfer, balances: list[pb.Balance]) -> WriteOut:
    return WriteOut(transfer=_transfer(transfer), balances=[_balance(b) for b in balances])


def _program(p: pb.Program) -> ProgramOut:
    return ProgramOut(purse_kind=enum_name(pb.PurseKind, value=p.purse_kind), ref=p.ref,
                      funding_account_id=p.funding_account_id,
                      ends_at=timestamp(p.ends_at) if p.HasField("ends_at") else None,
                      status=enum_name(pb.ProgramStatus, value=p.status), expired_purses=p.expired_purses,
                      expired_fen=p.expired_fen)


def _batch(b: pb.GrantBatch) -> GrantBatchOut:
    return GrantBatchOut(batch_id=b.batch_id, bill_number=b.bill_number,
                         purse_kind=enum_name(pb.PurseKind, value=b.purse_kind), ref=b.ref,
                         status=enum_name(pb.GrantBatchStatus, value=b.status), total_rows=b.total_rows,
                         done_rows=b.done_rows, granted_rows=b.granted_rows, failed_rows=b.failed_rows,
                         granted_fen=b.granted_fen, created_at=timestamp(b.created_at),
                         finished_at=timestamp(b.finished_at))


def _row(r: pb.GrantRowResult) -> GrantRowOut:
    return GrantRowOut(line=r.line, member_id=r.member_id, amount_fen=r.amount_fen,
                       status=enum_name(pb.GrantRowStatus, value=r.status), transfer_id=or_none(r.transfer_id),
                       account_id=or_none(r.account_id), reason=or_none(r.reason), message=or_none(r.message))


def account_refusal(principal: Principal, account: pb.Account) -> ProblemError | None:
    """Why ``principal`` may not read ``account`` through the wallet routes, or None when it may.
    A member token (the code page's) reads its own member's purses and nothing else."""
    if principal.member_id is not None:
        if account.owner_kind == pb.OWNER_KIND_MEMBER and account.owner_id == principal.member_id:
            return None
        return ProblemError(status=404, reason="ACCOUNT_NOT_FOUND", detail="no such account")
    if LEDGER_ADMIN in principal.scopes or account.owner_kind == pb.OWNER_KIND_MEMBER:
        return None
    if account.purse_kind == pb.PURSE_KIND_BANK_CLEARING:
        if account.ref == principal.client_id:
            return None
        # Another partner's: as if it did not exist, so its id tells a partner nothing.
        return ProblemError(status=404, reason="ACCOUNT_NOT_FOUND", detail="no such account")
    if account.owner_kind == pb.OWNER_KIND_MERCHANT:
        if STATEMENTS_READ in principal.scopes:
            return None
        return insufficient_scope([STATEMENTS_READ], detail="a merchant's account needs the scope statements:read "
                                  "(or ledger:admin), which the token does not hold")
    return insufficient_scope([LEDGER_ADMIN], detail="the tenant's own accounts need the scope ledger:admin, which "
                              "the token does not hold")


async def _readable_account(state: GatewayState, principal: Principal, *, tenant_id: str,
                            account_id: str) -> pb.AccountBalance:
    answer = await state.ledger.GetBalances(pb.GetBalancesRequest(tenant_id=tenant_id, account_ids=[account_id]),
                                            timeout=state.timeout_s)
    if not answer.accounts:
        raise ProblemError(status=404, reason="ACCOUNT_NOT_FOUND", detail="no such account")
    refusal = account_refusal(principal, answer.accounts[0].account)
    if refusal is not None:
        raise refusal
    return answer.accounts[0]


async def _member_must_exist(state: GatewayState, *, tenant_id: str, member_id: str) -> None:
    """404 MEMBER_NOT_FOUND (from identity) for a member the tenant does not have: the ledger would
    happily open a purse for any owner id."""
    await state.identity.GetMember(ipb.GetMemberRequest(tenant_id=tenant_id, member_id=member_id),
                                   timeout=state.timeout_s)


# --- wallets:read --------------------------------------------------------------------------------


@router.get("/v1/tenants/{tenant_id}/members/{member_id}/balances", response_model=MemberBalancesOut,
            tags=["wallets"], summary="Every purse of a member with its balance", openapi_extra=MEMBER_TOKEN_ROUTE)
async def get_member_balances(tenant_id: TenantId, member_id: MemberId, state: State,
                              _principal: ReadWallets) -> MemberBalancesOut:
    await _member_must_exist(state, tenant_id=tenant_id, member_id=member_id)
    answer = await state.ledger.GetBalances(
        pb.GetBalancesRequest(tenant_id=tenant_id, owner_kind=pb.OWNER_KIND_MEMBER, owner_id=member_id),
        timeout=state.timeout_s,
    )
    return MemberBalancesOut(member_id=member_id, purses=[_account(a) for a in answer.accounts])


@router.get("/v1/tenants/{tenant_id}/accounts/{account_id}", response_model=AccountOut, tags=["wallets"],
            summary="One account with its balance")
async def get_account(tenant_id: TenantId, account_id: AccountId, state: State, principal: ReadWallets) -> AccountOut:
    """A member's purse, or the caller's own clearing account; a merchant's account with
    statements:read too; any account with ledger:admin. Another partner's clearing account is 404."""
    return _account(await _readable_account(state, principal, tenant_id=tenant_id, account_id=account_id))


@router.get("/v1/tenants/{tenant_id}/accounts/{account_id}/transfers", response_model=TransferPage,
            tags=["wallets"], summary="An account's transfers, newest first, a page at a time",
            openapi_extra=MEMBER_TOKEN_ROUTE)
async def list_account_transfers(
    tenant_id: TenantId,
    account_id: AccountId,
    state: State,
    principal: ReadWallets,
    page_size: Annotated[int, Query(ge=1, le=MAX_HISTORY_PAGE_SIZE)] = 50,
    page_token: Annotated[str, Query(max_length=MAX_CURSOR_CHARS)] = "",
) -> TransferPage:
    """The same accounts as ``GET …/accounts/{a}``: a merchant's history (every member's payments
    there) needs statements:read too."""
    await _readable_account(state, principal, tenant_id=tenant_id, account_id=account_id)
    answer = await state.ledger.ListTransfers(
        pb.ListTransfersRequest(tenant_id=tenant_id, account_id=account_id, page_size=page_size,
                                page_token=page_token),
        timeout=state.timeout_s,
    )
    return TransferPage(transfers=[_transfer(t) for t in answer.transfers],
                        next_page_token=answer.next_page_token or None)


@router.get("/v1/tenants/{tenant_id}/payments/lookup", response_model=LookupOut, tags=["wallets"],
            summary="\"Did this pay?\": the transfer booked under an idempotency key, if any")
async def lookup_payment(
    tenant_id: TenantId,
    state: State,
    principal: ReadWallets,
    idempotency_key: Annotated[str, Query(min_length=1, max_length=MAX_IDEMPOTENCY_KEY_CHARS,
                                          description="The key the write was sent with.")],
) -> LookupOut:
    """The answer to an ambiguous failure (a timeout, a dropped connection): if ``found`` is false
    nothing was booked under the key, and the write may be sent again with the same key. Keys are
    the calling client's own: another client's key answers ``found: false``. A transfer that touches
    no account the caller may read (no member's purse, not its own clearing account) is 404
    TRANSFER_NOT_FOUND."""
    answer = await state.ledger.LookupTransfer(
        pb.LookupTransferRequest(tenant_id=tenant_id, idempotency_key=idempotency_key,
                                 key_scope=client_scope(principal.client_id)), timeout=state.timeout_s
    )
    if not answer.found:
        return LookupOut(found=False, transfer=None)
    touched = sorted({p.account_id for p in answer.transfer.postings})
    accounts = await state.ledger.GetBalances(pb.GetBalancesRequest(tenant_id=tenant_id, account_ids=touched),
                                              timeout=state.timeout_s)
    if all(account_refusal(principal, a.account) is not None for a in accounts.accounts):
        raise ProblemError(status=404, reason="TRANSFER_NOT_FOUND", detail="no transfer you may read was booked "
                           "under this key")
    return LookupOut(found=True, transfer=_transfer(answer.transfer))


@router.get("/v1/tenants/{tenant_id}/clearing-account", response_model=AccountOut, tags=["wallets"],
            summary="The calling partner's own clearing account: what it owes and its credit limit")
async def get_own_clearing_account(tenant_id: TenantId, state: State, principal: ReadWallets) -> AccountOut:
    """``available_fen`` is minus what the partner's top-ups have taken; it may go down to
    ``-credit_limit_fen``. 404 ACCOUNT_NOT_FOUND before the first top-up or credit limit opened it."""
    answer = await state.ledger.GetBalances(
        pb.GetBalancesRequest(tenant_id=tenant_id, owner_kind=pb.OWNER_KIND_TENANT, owner_id=tenant_id),
        timeout=state.timeout_s,
    )
    for item in answer.accounts:
        if item.account.purse_kind == pb.PURSE_KIND_BANK_CLEARING and item.account.ref == principal.client_id:
            return _account(item)
    raise ProblemError(status=404, reason="ACCOUNT_NOT_FOUND", detail="no clearing account yet: it opens with the "
                       "first top-up, or when the tenant sets its credit limit")


# --- wallets:topup -------------------------------------------------------------------------------


async def _open_clearing(state: GatewayState, *, tenant_id: str, client_id: str) -> pb.AccountBalance:
    """The client's own clearing account in the tenant (one per client, the tenant its owner, the
    client id its ref), opened on first use with a credit limit of 0."""
    opened = await state.ledger.OpenAccount(
        pb.OpenAccountRequest(tenant_id=tenant_id, owner_kind=pb.OWNER_KIND_TENANT, owner_id=tenant_id,
                              purse_kind=pb.PURSE_KIND_BANK_CLEARING, ref=client_id),
        timeout=state.timeout_s,
    )
    return opened.account


class TopUpIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"amount_fen": 10000, "external_ref": "bank-txn-20261126-0001"}]})

    amount_fen: int = Field(ge=1, le=MAX_AMOUNT_FEN, description="The money to add, in fen (10000 = 100.00 CNY).")
    external_ref: str = Field(default="", max_length=MAX_REF_CHARS, description="Your own reference, kept with "
                              "the transfer and shown on statements.")


@router.post("/v1/tenants/{tenant_id}/members/{member_id}/top-ups", response_model=WriteOut, status_code=201,
             tags=["wallets"], summary="Top up a member's cash purse from the calling bank's clearing account",
             responses=problem_responses(409))
async def top_up(
    tenant_id: TenantId,
    member_id: MemberId,
    body: TopUpIn,
    state: State,
    principal: TopUpWallets,
    idempotency_key: IdempotencyKeyHeader = None,
) -> WriteOut:
    """Opens (idempotently) the member's cash purse and the calling client's clearing account, then
    books the top-up. A repeat with the same Idempotency-Key answers the same transfer. A top-up
    past the clearing account's credit limit is 409 CREDIT_LIMIT_EXCEEDED (a new clearing account
    may owe nothing until the tenant sets its limit)."""
    key = _key(idempotency_key)
    await _member_must_exist(state, tenant_id=tenant_id, member_id=member_id)
    purse = await state.ledger.OpenAccount(
        pb.OpenAccountRequest(tenant_id=tenant_id, owner_kind=pb.OWNER_KIND_MEMBER, owner_id=member_id,
                              purse_kind=pb.PURSE_KIND_CASH, ref="", no_overdraft=True),
        timeout=state.timeout_s,
    )
    clearing = await _open_clearing(state, tenant_id=tenant_id, client_id=principal.client_id)
    answer = await state.ledger.TopUp(
        pb.TopUpRequest(tenant_id=tenant_id, idempotency_key=key, key_scope=client_scope(principal.client_id),
                        from_account_id=clearing.account.account_id,
                        to_account_id=purse.account.account.account_id, amount_fen=body.amount_fen,
                        external_ref=body.external_ref),
        timeout=state.timeout_s,
    )
    return _write(answer.transfer, list(answer.balances))


# --- ledger:admin --------------------------------------------------------------------------------


class CreditLimitIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"credit_limit_fen": 50_000_000}]})

    credit_limit_fen: int = Field(ge=0, le=MAX_CREDIT_LIMIT_FEN, description="How far below zero the partner's "
                                  "clearing account may go: what it prefunded (and any credit the tenant gives), "
                                  "in fen. Not below what it owes now.")


@router.put("/v1/tenants/{tenant_id}/api-clients/{client_id}/clearing-account", response_model=AccountOut,
            tags=["ledger"], summary="Set a partner's credit limit: how much its top-ups may take from its clearing "
            "account", responses=problem_responses(409))
async def set_clearing_credit_limit(tenant_id: TenantId, client_id: ClientId, body: CreditLimitIn, state: State,
                                    _principal: AdminLedger) -> AccountOut:
    """Opens the client's clearing account if it has none yet. Its top-ups may take it down to
    ``-credit_limit_fen``; beyond is 409 CREDIT_LIMIT_EXCEEDED. A limit below what the partner owes
    now is 409 CREDIT_LIMIT_BELOW_USE (set it to what it owes to stop further top-ups, or freeze
    the account). A client this tenant has not granted is 404 CLIENT_NOT_FOUND."""
    granted = await state.identity.ListApiClients(ipb.ListApiClientsRequest(tenant_id=tenant_id),
                                                  timeout=state.timeout_s)
    if not any(c.client_id == client_id for c in granted.clients):
        raise ProblemError(status=404, reason="CLIENT_NOT_FOUND", detail="this tenant has not granted that client")
    clearing = await _open_clearing(state, tenant_id=tenant_id, client_id=client_id)
    answer = await state.ledger.SetCreditLimit(
        pb.SetCreditLimitRequest(tenant_id=tenant_id, account_id=clearing.account.account_id,
                                 credit_limit_fen=body.credit_limit_fen),
        timeout=state.timeout_s,
    )
    return _account(answer.account)


class RefundIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"amount_fen": 500, "external_ref": "complaint-42"}]})

    amount_fen: int = Field(default=0, ge=0, le=MAX_AMOUNT_FEN,
                            description="0 or absent refunds whatever of the payment is not refunded yet.")
    external_ref: str = Field(default="", max_length=MAX_REF_CHARS)


@router.post("/v1/tenants/{tenant_id}/payments/{transfer_id}/refunds", response_model=WriteOut, status_code=201,
             tags=["ledger"], summary="Refund part or all of a payment", responses=problem_responses(409))
async def refund_payment(
    tenant_id: TenantId,
    transfer_id: TransferId,
    state: State,
    principal: AdminLedger,
    body: Annotated[RefundIn | None, Body()] = None,
    idempotency_key: IdempotencyKeyHeader = None,
) -> WriteOut:
    """The refunds of a payment never exceed what it paid: more is 409 REFUND_EXCEEDS_PAYMENT, a
    payment refunded in full 409 ALREADY_REFUNDED."""
    key = _key(idempotency_key)
    body = body or RefundIn()
    answer = await state.ledger.Refund(
        pb.RefundRequest(tenant_id=tenant_id, idempotency_key=key, key_scope=client_scope(principal.client_id),
                         payment_transfer_id=transfer_id,
                         amount_fen=body.amount_fen, external_ref=body.external_ref),
        timeout=state.timeout_s,
    )
    return _write(answer.transfer, list(answer.balances))


@router.post("/v1/tenants/{tenant_id}/accounts/{account_id}/freeze", response_model=AccountOut, tags=["ledger"],
             summary="Freeze an account: no new payment, top-up or hold (refunds still reach it)")
async def freeze_account(tenant_id: TenantId, account_id: AccountId, state: State,
                         _principal: AdminLedger) -> AccountOut:
    answer = await state.ledger.FreezeAccount(pb.FreezeAccountRequest(tenant_id=tenant_id, account_id=account_id),
                                              timeout=state.timeout_s)
    return _account(answer.account)


@router.post("/v1/tenants/{tenant_id}/accounts/{account_id}/unfreeze", response_model=AccountOut, tags=["ledger"],
             summary="Unfreeze an account")
async def unfreeze_account(tenant_id: TenantId, account_id: AccountId, state: State,
                           _principal: AdminLedger) -> AccountOut:
    answer = await state.ledger.UnfreezeAccount(
        pb.UnfreezeAccountRequest(tenant_id=tenant_id, account_id=account_id), timeout=state.timeout_s
    )
    return _account(answer.account)


class AccountIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"owner_kind": "merchant", "owner_id": "canteen-1", "purse_kind": "merchant_settlement"},
        {"owner_kind": "tenant", "owner_id": "finance", "purse_kind": "subsidy_funding", "ref": "meal-2026"}]})

    owner_kind: OwnerKindName
    owner_id: str = Field(min_length=1, max_length=MAX_REF_CHARS, description="Whose account: a member id, a "
                          "merchant's or the tenant's own name for itself.")
    purse_kind: PurseKindName
    ref: str = Field(default="", max_length=MAX_REF_CHARS, description="The program or campaign of a subsidy, "
                     "voucher or subsidy funding account; empty for the others.")
    no_overdraft: bool = Field(default=False, description="Refuse any transfer that would take the balance below "
                               "zero (always on for member purses).")


@router.post("/v1/tenants/{tenant_id}/accounts", response_model=OpenedAccountOut, status_code=201, tags=["ledger"],
             summary="Open an account (idempotent: the same owner, purse kind and ref answer the one there, 200)")
async def open_account(tenant_id: TenantId, body: AccountIn, response: Response, state: State,
                       _principal: AdminLedger) -> OpenedAccountOut:
    answer = await state.ledger.OpenAccount(
        pb.OpenAccountRequest(tenant_id=tenant_id, owner_kind=enum_value(pb.OwnerKind, name=body.owner_kind),
                              owner_id=body.owner_id, purse_kind=enum_value(pb.PurseKind, name=body.purse_kind),
                              ref=body.ref, no_overdraft=body.no_overdraft),
        timeout=state.timeout_s,
    )
    response.status_code = 201 if answer.created else 200
    response.headers["Location"] = f"/v1/tenants/{tenant_id}/accounts/{answer.account.account.account_id}"
    return OpenedAccountOut(account=_account(answer.account), created=answer.created)


@router.get("/v1/tenants/{tenant_id}/trial-balance", response_model=TrialBalanceOut, tags=["ledger"],
            summary="The tenant's trial balance: postings and balances sum to zero; totals per purse kind")
async def trial_balance(tenant_id: TenantId, state: State, _principal: AdminLedger) -> TrialBalanceOut:
    answer = await state.ledger.TrialBalance(pb.TrialBalanceRequest(tenant_id=tenant_id), timeout=state.timeout_s)
    return TrialBalanceOut(
        postings_sum_fen=answer.postings_sum_fen, balances_sum_fen=answer.balances_sum_fen, balanced=answer.balanced,
        totals=[PurseKindTotalOut(purse_kind=enum_name(pb.PurseKind, value=t.purse_kind), posted_fen=t.posted_fen,
                                  pending_fen=t.pending_fen, accounts=t.accounts) for t in answer.totals],
    )


class ProgramIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"purse_kind": "subsidy", "ref": "meal-2026", "funding_account_id": "2d1e0f9a-8b7c-4d6e-9f0a-1b2c3d4e5f60",
         "ends_at": "2027-01-31T16:00:00Z"}]})

    purse_kind: ProgramPurseKindName
    ref: str = Field(min_length=1, max_length=MAX_REF_CHARS, description="The program or campaign, as its purses' "
                     "ref (e.g. \"meal-2026\").")
    funding_account_id: str = Field(min_length=1, max_length=MAX_ID_CHARS,
                                    description="A subsidy_funding account of the tenant; fixed once defined.")
    ends_at: datetime | None = Field(default=None, description="When the program's purses expire; absent: never. "
                                     "Defining again may move it.")


@router.post("/v1/tenants/{tenant_id}/subsidy-programs", response_model=DefinedProgramOut, status_code=201,
             tags=["ledger"], summary="Define a subsidy program or voucher campaign (again: 200, may move ends_at)",
             responses=problem_responses(409))
async def define_program(tenant_id: TenantId, body: ProgramIn, response: Response, state: State,
                         _principal: AdminLedger) -> DefinedProgramOut:
    answer = await state.ledger.DefineProgram(
        pb.DefineProgramRequest(tenant_id=tenant_id, purse_kind=enum_value(pb.PurseKind, name=body.purse_kind),
                                ref=body.ref, funding_account_id=body.funding_account_id, ends_at=timestamp_pb(body.ends_at)),
        timeout=state.timeout_s,
    )
    response.status_code = 201 if answer.created else 200
    response.headers["Location"] = f"/v1/tenants/{tenant_id}/subsidy-programs/{body.purse_kind}/{body.ref}"
    return DefinedProgramOut(program=_program(answer.program), created=answer.created)


@router.get("/v1/tenants/{tenant_id}/subsidy-programs/{purse_kind}/{ref}", response_model=ProgramOut,
            tags=["ledger"], summary="A subsidy program or voucher campaign, and its expiry once ended")
async def get_program(
    tenant_id: TenantId,
    purse_kind: Annotated[ProgramPurseKindName, Path()],
    ref: Annotated[str, Path(min_length=1, max_length=MAX_REF_CHARS)],
    state: State,
    _principal: AdminLedger,
) -> ProgramOut:
    answer = await state.ledger.GetProgram(
        pb.GetProgramRequest(tenant_id=tenant_id, purse_kind=enum_value(pb.PurseKind, name=purse_kind), ref=ref),
        timeout=state.timeout_s,
    )
    return _program(answer.program)


class GrantRowIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    member_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    amount_fen: int = Field(ge=1, le=MAX_AMOUNT_FEN)


class GrantBatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"bill_number": "SUB-2026-11", "purse_kind": "subsidy", "ref": "meal-2026",
         "rows": [{"member_id": "0b9e4c1e-9d2f-4c55-a0f4-6f6b1b2c3d4e", "amount_fen": 20000}]}]})

    bill_number: str = Field(min_length=1, max_length=MAX_BILL_NUMBER_CHARS,
                             description="Your bill number for this run, unique in the tenant: the batch's "
                             "idempotency key.")
    purse_kind: ProgramPurseKindName
    ref: str = Field(min_length=1, max_length=MAX_REF_CHARS)
    rows: list[GrantRowIn] = Field(min_length=1, max_length=MAX_GRANT_ROWS)


def _inline_schema(model: type[BaseModel]) -> dict[str, object]:
    """The model's JSON schema with its $defs inlined, for a request body declared by hand."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: object) -> object:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return inline(schema)  # type: ignore[return-value]


_GRANT_BATCH_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": _inline_schema(GrantBatchIn)},
        "text/csv": {
            "schema": {"type": "string"},
            "example": "member_id,amount_fen\n0b9e4c1e-9d2f-4c55-a0f4-6f6b1b2c3d4e,20000\n",
        },
    },
}


def _grant_rows_from_csv(data: bytes) -> list[GrantRowIn]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ProblemError(status=422, reason="GRANT_FILE_INVALID", detail="the CSV file is not UTF-8") from None
    reader = csv.reader(io.StringIO(text))
    header = [cell.strip().lower() for cell in next(reader, [])]
    if header != GRANT_CSV_HEADER:
        raise ProblemError(status=422, reason="GRANT_FILE_INVALID",
                           detail=f"the header line must be {','.join(GRANT_CSV_HEADER)}")
    rows: list[GrantRowIn] = []
    for line_number, cells in enumerate(reader, start=2):
        if not any(cell.strip() for cell in cells):
            continue
        try:
            member_id, amount = (cell.strip() for cell in cells)
            rows.append(GrantRowIn(member_id=member_id, amount_fen=int(amount)))
        except (ValueError, pydantic.ValidationError):
            raise ProblemError(status=422, reason="GRANT_FILE_INVALID",
                               detail=f"line {line_number}: expected a member id and an amount in fen (> 0)",
                               extra={"line": line_number}) from None
    return rows


async def _grant_batch_request(request: Request, *, bill_number: str | None, purse_kind: str | None,
                               ref: str | None) -> GrantBatchIn:
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    data = await request.body()
    if media_type in CSV_MEDIA_TYPES:
        fields = {"bill_number": bill_number, "purse_kind": purse_kind, "ref": ref}
        values: object = {**fields, "rows": [r.model_dump() for r in _grant_rows_from_csv(data)]}
        location = "query"
    elif media_type == "application/json":
        try:
            values = json.loads(data)
        except ValueError:
            raise RequestValidationError([{"loc": ("body",), "msg": "the body is not JSON", "type": "json_invalid"}]
                                         ) from None
        location = "body"
    else:
        raise ProblemError(status=415, reason="UNSUPPORTED_MEDIA_TYPE",
                           detail="send the batch as application/json, or its rows as text/csv with bill_number, "
                           "purse_kind and ref in the query")
    try:
        return GrantBatchIn.model_validate(values)
    except pydantic.ValidationError as exc:
        raise RequestValidationError([{**e, "loc": (location, *e["loc"])} for e in exc.errors()]) from None


@router.post("/v1/tenants/{tenant_id}/subsidy-batches", response_model=StartedBatchOut, status_code=202,
             tags=["ledger"], summary="Grant a program's money to many members (JSON, or CSV rows)",
             openapi_extra={"requestBody": _GRANT_BATCH_BODY}, responses=problem_responses(409, 413, 415))
async def start_grant_batch(
    tenant_id: TenantId,
    request: Request,
    response: Response,
    state: State,
    _principal: AdminLedger,
    bill_number: Annotated[str | None, Query(max_length=MAX_BILL_NUMBER_CHARS,
                                             description="With a text/csv body only.")] = None,
    purse_kind: Annotated[ProgramPurseKindName | None, Query(description="With a text/csv body only.")] = None,
    ref: Annotated[str | None, Query(max_length=MAX_REF_CHARS, description="With a text/csv body only.")] = None,
) -> StartedBatchOut:
    """Answers 202 with the batch and its Location; poll that for progress and the rows for their
    results. Idempotent by bill number: the same bill with the same rows answers the batch already
    there (``created`` false), with other rows 409 BILL_NUMBER_REUSED."""
    body = await _grant_batch_request(request, bill_number=bill_number, purse_kind=purse_kind, ref=ref)
    answer = await state.ledger.StartGrantBatch(
        pb.StartGrantBatchRequest(tenant_id=tenant_id, bill_number=body.bill_number,
                                  purse_kind=enum_value(pb.PurseKind, name=body.purse_kind), ref=body.ref,
                                  rows=[pb.GrantRow(member_id=r.member_id, amount_fen=r.amount_fen)
                                        for r in body.rows]),
        timeout=state.timeout_s,
    )
    response.headers["Location"] = f"/v1/tenants/{tenant_id}/subsidy-batches/{answer.batch.batch_id}"
    return StartedBatchOut(batch=_batch(answer.batch), created=answer.created)


@router.get("/v1/tenants/{tenant_id}/subsidy-batches/{batch_id}", response_model=GrantBatchOut, tags=["ledger"],
            summary="A grant batch's progress")
async def get_grant_batch(tenant_id: TenantId, batch_id: BatchId, state: State,
                          _principal: AdminLedger) -> GrantBatchOut:
    answer = await state.ledger.GetGrantBatch(pb.GetGrantBatchRequest(tenant_id=tenant_id, batch_id=batch_id),
                                              timeout=state.timeout_s)
    return _batch(answer.batch)


@router.get("/v1/tenants/{tenant_id}/subsidy-batches/{batch_id}/rows", response_model=GrantRowPage,
            tags=["ledger"], summary="A grant batch's per-row results, a page at a time")
async def list_grant_batch_rows(
    tenant_id: TenantId,
    batch_id: BatchId,
    state: State,
    _principal: AdminLedger,
    status: Annotated[GrantRowStatusName | None, Query(description="Only rows of this status.")] = None,
    page_size: Annotated[int, Query(ge=1, le=MAX_ROWS_PAGE_SIZE)] = 100,
    page_token: Annotated[str, Query(max_length=MAX_CURSOR_CHARS)] = "",
) -> GrantRowPage:
    answer = await state.ledger.ListGrantBatchRows(
        pb.ListGrantBatchRowsRequest(tenant_id=tenant_id, batch_id=batch_id,
                                     status=enum_value(pb.GrantRowStatus, name=status) if status else 0,
                                     page_size=page_size, page_token=page_token),
        timeout=state.timeout_s,
    )
    return GrantRowPage(rows=[_row(r) for r in answer.rows], next_page_token=answer.next_page_token or None)


class ClawbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"amount_fen": 20000, "external_ref": "granted in error, bill SUB-2026-11"}]})

    amount_fen: int = Field(default=0, ge=0, le=MAX_AMOUNT_FEN,
                            description="0 or absent takes back all that is available.")
    external_ref: str = Field(default="", max_length=MAX_REF_CHARS)


@router.post("/v1/tenants/{tenant_id}/accounts/{account_id}/clawbacks", response_model=WriteOut, status_code=201,
             tags=["ledger"], summary="Take subsidy or voucher money back to its program's funding account",
             responses=problem_responses(409))
async def clawback(
    tenant_id: TenantId,
    account_id: AccountId,
    state: State,
    principal: AdminLedger,
    body: Annotated[ClawbackIn | None, Body()] = None,
    idempotency_key: IdempotencyKeyHeader = None,
) -> WriteOut:
    key = _key(idempotency_key)
    body = body or ClawbackIn()
    answer = await state.ledger.Clawback(
        pb.ClawbackRequest(tenant_id=tenant_id, idempotency_key=key, key_scope=client_scope(principal.client_id),
                           account_id=account_id,
                           amount_fen=body.amount_fen, external_ref=body.external_ref),
        timeout=state.timeout_s,
    )
    return _write(answer.transfer, list(answer.balances))


# --- statements:read -----------------------------------------------------------------------------

DateParam = Annotated[str, Query(pattern=r"^\d{4}-\d{2}-\d{2}$", description="The day, YYYY-MM-DD, in time_zone.")]
TimeZoneParam = Annotated[str, Query(min_length=1, max_length=64, description="IANA time zone of the day.")]
MerchantParam = Annotated[str | None, Query(max_length=MAX_ID_CHARS, description="A merchant settlement account.")]
DeviceParam = Annotated[str | None, Query(max_length=MAX_REF_CHARS, description="A device id, instead.")]


def _statement_request(*, tenant_id: str, merchant_account_id: str | None, device_id: str | None, date: str,
                       time_zone: str, page_token: str = "") -> pb.GetStatementRequest:
    if bool(merchant_account_id) == bool(device_id):
        raise ProblemError(status=400, reason="STATEMENT_SUBJECT_REQUIRED",
                           detail="name exactly one of merchant_account_id and device_id")
    return pb.GetStatementRequest(tenant_id=tenant_id, merchant_account_id=merchant_account_id or "",
                                  device_id=device_id or "", date=date, time_zone=time_zone,
                                  page_size=STATEMENT_PAGE_SIZE, page_token=page_token)


_UNSAFE_FILENAME = re.compile(r"[^A-Za-z0-9._-]")


def _iso(value: timestamp_pb2.Timestamp) -> str:
    at = timestamp(value)
    return at.isoformat().replace("+00:00", "Z") if at else ""


def _statement_csv(lines: list[pb.StatementLine], *, header: bool) -> str:
    # device_id, external_ref and idempotency_key are what partners and devices sent: csv_text
    # makes them inert; merchant_fen is written as the number it is.
    return csv_text(
        ([_iso(line.transfer.booked_at), _iso(line.transfer.event_time), line.transfer.transfer_id,
          enum_name(pb.TransferKind, value=line.transfer.kind), line.merchant_fen, line.transfer.device_id,
          line.transfer.external_ref, line.transfer.idempotency_key] for line in lines),
        header=STATEMENT_COLUMNS if header else None,
    )


_STATEMENT_CSV = {
    200: {"description": "One line per transfer booked that day",
          "content": {"text/csv": {"schema": {"type": "string"}, "example": (
              ",".join(STATEMENT_COLUMNS) + "\n\"2026-11-26T04:31:07.120000Z\",\"2026-11-26T04:31:07.120000Z\","
              "\"9c1d2e3f-4a5b-4c6d-8e7f-0a1b2c3d4e5f\",\"payment\",1200,\"pos-3\",\"\",\"pos-3:000812\"\n")}}},
}


@router.get("/v1/tenants/{tenant_id}/statements", tags=["statements"], response_class=StreamingResponse,
            summary="A merchant's or a device's statement for one day, as CSV", responses=_STATEMENT_CSV)
async def get_statement(
    tenant_id: TenantId,
    state: State,
    _principal: ReadStatements,
    date: DateParam,
    merchant_account_id: MerchantParam = None,
    device_id: DeviceParam = None,
    time_zone: TimeZoneParam = "Asia/Shanghai",
) -> StreamingResponse:
    """Columns: booked_at, event_time (UTC, RFC 3339), transfer_id, kind, merchant_fen (the effect on
    the merchant: payments +, refunds -), device_id, external_ref, idempotency_key. The day's totals
    are at ``GET …/statements/totals`` with the same query. Text cells are quoted, and one beginning
    with = + - @, a tab or a carriage return gets a leading ' (OWASP CSV injection); amounts are
    bare numbers."""
    request = _statement_request(tenant_id=tenant_id, merchant_account_id=merchant_account_id,
                                 device_id=device_id, date=date, time_zone=time_zone)
    # The first page before answering, so a refusal (unknown account, bad day) is still a problem.
    first = await state.ledger.GetStatement(request, timeout=state.timeout_s)

    async def pages() -> AsyncIterator[str]:
        answer = first
        yield _statement_csv(list(answer.lines), header=True)
        while answer.next_page_token:
            request.page_token = answer.next_page_token
            answer = await state.ledger.GetStatement(request, timeout=state.timeout_s)
            yield _statement_csv(list(answer.lines), header=False)

    subject = _UNSAFE_FILENAME.sub("_", merchant_account_id or device_id or "")
    return StreamingResponse(pages(), media_type="text/csv; charset=utf-8", headers={
        "Content-Disposition": f'attachment; filename="statement-{subject}-{date}.csv"'})


@router.get("/v1/tenants/{tenant_id}/statements/totals", response_model=StatementTotalsOut, tags=["statements"],
            summary="The totals of a merchant's or a device's statement for one day")
async def get_statement_totals(
    tenant_id: TenantId,
    state: State,
    _principal: ReadStatements,
    date: DateParam,
    merchant_account_id: MerchantParam = None,
    device_id: DeviceParam = None,
    time_zone: TimeZoneParam = "Asia/Shanghai",
) -> StatementTotalsOut:
    request = _statement_request(tenant_id=tenant_id, merchant_account_id=merchant_account_id,
                                 device_id=device_id, date=date, time_zone=time_zone)
    request.page_size = 1
    answer = await state.ledger.GetStatement(request, timeout=state.timeout_s)
    t = answer.totals
    return StatementTotalsOut(date=date, time_zone=time_zone, day_start=timestamp(answer.day_start),
                              day_end=timestamp(answer.day_end), payments=t.payments, payments_fen=t.payments_fen,
                              refunds=t.refunds, refunds_fen=t.refunds_fen,
                              offline_settlements=t.offline_settlements, captures=t.captures, net_fen=t.net_fen)
