"""The gRPC face of the ledger: protobuf in, operations out, protobuf back. No rules, no SQL."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from onecard.ledger.v1 import ledger_pb2 as pb
from onecard.ledger.v1 import ledger_pb2_grpc
from runtime.batching import answer_batch
from runtime.errors import InvalidArgument, NotFound
from runtime.grpc_server import ServiceApp
from runtime.idempotency import key_scope, scoped_key, split_key
from runtime.mesh import peer_name
from runtime.wire import timestamp_pb
from services.ledger import domain
from services.ledger.domain import (
    AccountBalance,
    AccountStatus,
    Balance,
    CodeRef,
    GrantBatch,
    GrantBatchStatus,
    GrantRow,
    GrantRowStatus,
    OfflineOutcome,
    OfflineRecord,
    Program,
    ProgramStatus,
    Guard,
    Hold,
    HoldStatus,
    OwnerKind,
    PayLeg,
    PurseKind,
    ReversalOutcome,
    Transfer,
    TransferKind,
    WriteResult,
)
from services.ledger.operations import Ledger, MemberState, MemberStateQuestion, PayBatcher
from services.ledger.store import LedgerStore

_OWNER = {
    OwnerKind.MEMBER: pb.OWNER_KIND_MEMBER,
    OwnerKind.MERCHANT: pb.OWNER_KIND_MERCHANT,
    OwnerKind.TENANT: pb.OWNER_KIND_TENANT,
    OwnerKind.SYSTEM: pb.OWNER_KIND_SYSTEM,
}
_OWNER_FROM_PB = {v: k for k, v in _OWNER.items()}
_PURSE = {
    PurseKind.CASH: pb.PURSE_KIND_CASH,
    PurseKind.SUBSIDY: pb.PURSE_KIND_SUBSIDY,
    PurseKind.VOUCHER: pb.PURSE_KIND_VOUCHER,
    PurseKind.MERCHANT_SETTLEMENT: pb.PURSE_KIND_MERCHANT_SETTLEMENT,
    PurseKind.BANK_CLEARING: pb.PURSE_KIND_BANK_CLEARING,
    PurseKind.SUBSIDY_FUNDING: pb.PURSE_KIND_SUBSIDY_FUNDING,
    PurseKind.RECEIVABLE: pb.PURSE_KIND_RECEIVABLE,
    PurseKind.BANK_RECEIPTS: pb.PURSE_KIND_BANK_RECEIPTS,
}
_PURSE_FROM_PB = {v: k for k, v in _PURSE.items()}
_REVERSAL = {ReversalOutcome.REVERSED: pb.REVERSAL_OUTCOME_REVERSED,
             ReversalOutcome.PREVENTED: pb.REVERSAL_OUTCOME_PREVENTED}
_STATUS = {AccountStatus.OPEN: pb.ACCOUNT_STATUS_OPEN, AccountStatus.FROZEN: pb.ACCOUNT_STATUS_FROZEN,
           AccountStatus.CLOSED: pb.ACCOUNT_STATUS_CLOSED}
_TRANSFER_KIND = {
    TransferKind.TOP_UP: pb.TRANSFER_KIND_TOP_UP,
    TransferKind.PAYMENT: pb.TRANSFER_KIND_PAYMENT,
    TransferKind.REFUND: pb.TRANSFER_KIND_REFUND,
    TransferKind.HOLD: pb.TRANSFER_KIND_HOLD,
    TransferKind.CAPTURE: pb.TRANSFER_KIND_CAPTURE,
    TransferKind.VOID: pb.TRANSFER_KIND_VOID,
    TransferKind.EXPIRY: pb.TRANSFER_KIND_EXPIRY,
    TransferKind.SUBSIDY_GRANT: pb.TRANSFER_KIND_SUBSIDY_GRANT,
    TransferKind.SUBSIDY_EXPIRY: pb.TRANSFER_KIND_SUBSIDY_EXPIRY,
    TransferKind.CLAWBACK: pb.TRANSFER_KIND_CLAWBACK,
    TransferKind.OFFLINE_SETTLEMENT: pb.TRANSFER_KIND_OFFLINE_SETTLEMENT,
    TransferKind.CLEARING_FUNDING: pb.TRANSFER_KIND_CLEARING_FUNDING,
    TransferKind.TOP_UP_REVERSAL: pb.TRANSFER_KIND_TOP_UP_REVERSAL,
    TransferKind.BANK_REFUND: pb.TRANSFER_KIND_BANK_REFUND,
}
_PROGRAM_STATUS = {
    ProgramStatus.ACTIVE: pb.PROGRAM_STATUS_ACTIVE,
    ProgramStatus.ENDING: pb.PROGRAM_STATUS_ENDING,
    ProgramStatus.ENDED: pb.PROGRAM_STATUS_ENDED,
}
_BATCH_STATUS = {GrantBatchStatus.RUNNING: pb.GRANT_BATCH_STATUS_RUNNING, GrantBatchStatus.DONE: pb.GRANT_BATCH_STATUS_DONE}
_ROW_STATUS = {
    GrantRowStatus.PENDING: pb.GRANT_ROW_STATUS_PENDING,
    GrantRowStatus.GRANTED: pb.GRANT_ROW_STATUS_GRANTED,
    GrantRowStatus.FAILED: pb.GRANT_ROW_STATUS_FAILED,
}
_ROW_STATUS_FROM_PB = {v: k for k, v in _ROW_STATUS.items()}
_OUTCOME = {
    OfflineOutcome.BOOKED: pb.OFFLINE_OUTCOME_BOOKED,
    OfflineOutcome.SHORTFALL: pb.OFFLINE_OUTCOME_SHORTFALL,
    OfflineOutcome.DUPLICATE: pb.OFFLINE_OUTCOME_DUPLICATE,
    OfflineOutcome.REJECTED: pb.OFFLINE_OUTCOME_REJECTED,
    OfflineOutcome.CODE_REUSED: pb.OFFLINE_OUTCOME_CODE_REUSED,
}
_HOLD_STATUS = {
    HoldStatus.PENDING: pb.HOLD_STATUS_PENDING,
    HoldStatus.CAPTURED: pb.HOLD_STATUS_CAPTURED,
    HoldStatus.VOIDED: pb.HOLD_STATUS_VOIDED,
    HoldStatus.EXPIRED: pb.HOLD_STATUS_EXPIRED,
}




def _event_time(request_has: bool, stamp: Timestamp) -> datetime | None:
    return stamp.ToDatetime(tzinfo=UTC) if request_has else None


def _tenant(value: str) -> uuid.UUID:
    return domain.parse_uuid(value, what="tenant_id")


def balance_pb(balance: Balance) -> pb.Balance:
    return pb.Balance(account_id=str(balance.account_id), posted_fen=balance.posted_fen,
                      pending_fen=balance.pending_fen, available_fen=balance.available_fen)


def account_balance_pb(item: AccountBalance) -> pb.AccountBalance:
    a = item.account
    return pb.AccountBalance(
        account=pb.Account(tenant_id=str(a.tenant_id), account_id=str(a.account_id), owner_kind=_OWNER[a.owner_kind],
                           owner_id=a.owner_id, purse_kind=_PURSE[a.purse_kind], ref=a.ref, currency=domain.CURRENCY,
                           no_overdraft=a.no_overdraft, status=_STATUS[a.status],
                           credit_limit_fen=a.credit_limit_fen,
                           low_balance_threshold_fen=a.low_balance_threshold_fen),
        balance=balance_pb(item.balance),
    )


def transfer_pb(t: Transfer) -> pb.Transfer:
    scope, key = split_key(t.idempotency_key)
    return pb.Transfer(
        tenant_id=str(t.tenant_id), transfer_id=str(t.transfer_id), kind=_TRANSFER_KIND[t.kind],
        idempotency_key=key, key_scope=scope, amount_fen=t.amount_fen,
        postings=[pb.Posting(account_id=str(p.account_id), amount_fen=p.amount_fen, pending_fen=p.pending_fen)
                  for p in t.postings],
        merchant_account_id=str(t.merchant_account_id or ""), device_id=t.device_id, external_ref=t.external_ref,
        original_transfer_id=str(t.original_transfer_id or ""), event_time=timestamp_pb(t.event_time),
        booked_at=timestamp_pb(t.booked_at),
        code=pb.CodeRef(credential_id=t.code.credential_id, counter=t.code.counter) if t.code else None,
    )


def _code(code: pb.CodeRef) -> CodeRef | None:
    """The code of a request: None when it names no credential; a credential id in its canonical
    UUID form when it is one (the domain refuses it otherwise)."""
    if not code.credential_id:
        return None
    try:
        credential = str(uuid.UUID(code.credential_id))
    except ValueError:
        credential = code.credential_id
    return CodeRef(credential_id=credential, counter=code.counter)


def hold_pb(h: Hold) -> pb.Hold:
    return pb.Hold(hold_id=str(h.hold_id), account_id=str(h.account_id), merchant_account_id=str(h.merchant_account_id),
                   amount_fen=h.amount_fen, status=_HOLD_STATUS[h.status], expires_at=timestamp_pb(h.expires_at),
                   settled_by_transfer_id=str(h.settled_by_transfer_id or ""))


def _text(value: str, *, what: str) -> str:
    return domain.check_text(value, what=what, max_chars=domain.MAX_REF_CHARS)


class LedgerServicer(ledger_pb2_grpc.LedgerServiceServicer):
    def __init__(self, *, app: ServiceApp, batch_started: asyncio.Event, batcher: PayBatcher):
        self._app = app
        self._batch_started = batch_started
        self._batcher = batcher

    @property
    def _ledger(self) -> Ledger:
        return Ledger(LedgerStore(self._app.pool), batch_started=self._batch_started)

    async def _answer(self, tenant_id: uuid.UUID, result: WriteResult) -> tuple[pb.Transfer, list[pb.Balance]]:
        transfer = await self._ledger.transfer(tenant_id=tenant_id, transfer_id=result.transfer_id)
        return transfer_pb(transfer), [balance_pb(b) for b in result.balances]

    async def OpenAccount(self, request: pb.OpenAccountRequest, context: grpc.aio.ServicerContext
                          ) -> pb.OpenAccountResponse:
        account, created = await self._ledger.open_account(
            tenant_id=_tenant(request.tenant_id), owner_kind=_OWNER_FROM_PB.get(request.owner_kind),
            owner_id=request.owner_id, purse_kind=_PURSE_FROM_PB.get(request.purse_kind), ref=request.ref,
            no_overdraft=request.no_overdraft,
        )
        return pb.OpenAccountResponse(account=account_balance_pb(account), created=created)

    async def SetCreditLimit(self, request: pb.SetCreditLimitRequest, context: grpc.aio.ServicerContext
                             ) -> pb.SetCreditLimitResponse:
        account = await self._ledger.set_credit_limit(
            tenant_id=_tenant(request.tenant_id), account_id=domain.parse_account_ref(request.account_id),
            credit_limit_fen=request.credit_limit_fen,
        )
        return pb.SetCreditLimitResponse(account=account_balance_pb(account))

    async def GetBalances(self, request: pb.GetBalancesRequest, context: grpc.aio.ServicerContext
                          ) -> pb.GetBalancesResponse:
        tenant_id = _tenant(request.tenant_id)
        owner = None
        if request.owner_kind or request.owner_id:
            if request.account_ids or request.owner_kind not in _OWNER_FROM_PB or not request.owner_id:
                raise InvalidArgument("give account_ids, or owner_kind and owner_id", reason="INVALID_QUERY")
            owner = (_OWNER_FROM_PB[request.owner_kind], request.owner_id)
        elif not 1 <= len(request.account_ids) <= domain.MAX_BALANCE_ACCOUNTS:
            raise InvalidArgument(f"give 1..{domain.MAX_BALANCE_ACCOUNTS} account_ids, or an owner",
                                  reason="INVALID_QUERY")
        ids = [domain.parse_account_ref(a) for a in request.account_ids]
        found = await self._ledger.balances(tenant_id=tenant_id, account_ids=ids, owner=owner)
        return pb.GetBalancesResponse(accounts=[account_balance_pb(a) for a in found])

    async def TopUp(self, request: pb.TopUpRequest, context: grpc.aio.ServicerContext) -> pb.TopUpResponse:
        tenant_id = _tenant(request.tenant_id)
        result = await self._ledger.top_up(
            tenant_id=tenant_id, idempotency_key=_key(request, context),
            from_account_id=domain.parse_account_ref(request.from_account_id),
            to_account_id=domain.parse_account_ref(request.to_account_id), amount_fen=request.amount_fen,
            external_ref=_text(request.external_ref, what="external_ref"),
            event_time=_event_time(request.HasField("event_time"), request.event_time),
        )
        transfer, balances = await self._answer(tenant_id, result)
        return pb.TopUpResponse(transfer=transfer, balances=balances)

    async def Pay(self, request: pb.PayRequest, context: grpc.aio.ServicerContext) -> pb.PayResponse:
        return await self._pay(request, context)

    async def PayMany(self, request: pb.PayManyRequest, context: grpc.aio.ServicerContext) -> pb.PayManyResponse:
        return pb.PayManyResponse(results=await answer_batch(
            request.payments, lambda p: self._pay(p, context), method="PayMany", result=pb.PayManyResult,
            field="paid", what="payments"))

    async def _pay(self, request: pb.PayRequest, context: grpc.aio.ServicerContext) -> pb.PayResponse:
        tenant_id = _tenant(request.tenant_id)
        command = domain.check_pay(
            idempotency_key=_key(request, context),
            merchant_account_id=domain.parse_account_ref(request.merchant_account_id),
            legs=[PayLeg(account_id=domain.parse_account_ref(leg.account_id), amount_fen=leg.amount_fen)
                  for leg in request.legs],
            device_id=_text(request.device_id, what="device_id"),
            external_ref=_text(request.external_ref, what="external_ref"),
            event_time=_event_time(request.HasField("event_time"), request.event_time),
            guards=tuple(Guard(counter_key=g.counter_key, increment=g.increment, limit=g.limit)
                         for g in request.guards),
            code=_code(request.code) if request.HasField("code") else None,
            sponsor=PayLeg(account_id=domain.parse_account_ref(request.sponsor.account_id),
                           amount_fen=request.sponsor.amount_fen) if request.HasField("sponsor") else None,
            request_fingerprint=request.request_fingerprint,
        )
        outcome = await self._batcher.pay(tenant_id, command)
        if outcome.transfer is not None:
            transfer = transfer_pb(outcome.transfer)
            balances = [balance_pb(b) for b in outcome.result.balances]
        else:
            transfer, balances = await self._answer(tenant_id, outcome.result)
        return pb.PayResponse(transfer=transfer, balances=balances)

    async def ReversePayment(self, request: pb.ReversePaymentRequest, context: grpc.aio.ServicerContext
                             ) -> pb.ReversePaymentResponse:
        tenant_id = _tenant(request.tenant_id)
        reversal = await self._ledger.reverse_payment(tenant_id=tenant_id, idempotency_key=_key(request, context),
                                                      reason=request.reason)
        ids = [i for i in (reversal.payment_id, reversal.refund_id) if i is not None]
        found = {t.transfer_id: t for t in await self._ledger.transfers(tenant_id=tenant_id, transfer_ids=ids)}
        return pb.ReversePaymentResponse(
            outcome=_REVERSAL[reversal.outcome],
            payment=transfer_pb(found[reversal.payment_id]) if reversal.payment_id else None,
            refund=transfer_pb(found[reversal.refund_id]) if reversal.refund_id else None)

    async def Refund(self, request: pb.RefundRequest, context: grpc.aio.ServicerContext) -> pb.RefundResponse:
        tenant_id = _tenant(request.tenant_id)
        result = await self._ledger.refund(
            tenant_id=tenant_id, idempotency_key=_key(request, context),
            payment_transfer_id=domain.parse_uuid(request.payment_transfer_id, what="payment_transfer_id"),
            amount_fen=request.amount_fen, external_ref=_text(request.external_ref, what="external_ref"),
        )
        transfer, balances = await self._answer(tenant_id, result)
        return pb.RefundResponse(transfer=transfer, balances=balances)

    async def _hold_answer(self, tenant_id: uuid.UUID, result: WriteResult) -> tuple[pb.Hold, pb.Transfer,
                                                                                      list[pb.Balance]]:
        assert result.hold_id is not None
        hold = await self._ledger.hold(tenant_id=tenant_id, hold_id=result.hold_id)
        transfer, balances = await self._answer(tenant_id, result)
        return hold_pb(hold), transfer, balances

    async def CreateHold(self, request: pb.CreateHoldRequest, context: grpc.aio.ServicerContext
                         ) -> pb.CreateHoldResponse:
        tenant_id = _tenant(request.tenant_id)
        result = await self._ledger.create_hold(
            tenant_id=tenant_id, idempotency_key=_key(request, context),
            account_id=domain.parse_account_ref(request.account_id),
            merchant_account_id=domain.parse_account_ref(request.merchant_account_id), amount_fen=request.amount_fen,
            timeout_s=request.timeout_s, device_id=_text(request.device_id, what="device_id"),
            external_ref=_text(request.external_ref, what="external_ref"),
            code=_code(request.code) if request.HasField("code") else None,
        )
        hold, transfer, balances = await self._hold_answer(tenant_id, result)
        return pb.CreateHoldResponse(hold=hold, transfer=transfer, balances=balances)

    async def CaptureHold(self, request: pb.CaptureHoldRequest, context: grpc.aio.ServicerContext
                          ) -> pb.CaptureHoldResponse:
        tenant_id = _tenant(request.tenant_id)
        result = await self._ledger.capture_hold(
            tenant_id=tenant_id, idempotency_key=_key(request, context),
            hold_id=domain.parse_uuid(request.hold_id, what="hold_id"), amount_fen=request.amount_fen,
        )
        hold, transfer, balances = await self._hold_answer(tenant_id, result)
        return pb.CaptureHoldResponse(hold=hold, transfer=transfer, balances=balances)

    async def VoidHold(self, request: pb.VoidHoldRequest, context: grpc.aio.ServicerContext) -> pb.VoidHoldResponse:
        tenant_id = _tenant(request.tenant_id)
        result = await self._ledger.void_hold(
            tenant_id=tenant_id, idempotency_key=_key(request, context),
            hold_id=domain.parse_uuid(request.hold_id, what="hold_id"),
        )
        hold, transfer, balances = await self._hold_answer(tenant_id, result)
        return pb.VoidHoldResponse(hold=hold, transfer=transfer, balances=balances)

    async def FreezeAccount(self, request: pb.FreezeAccountRequest, context: grpc.aio.ServicerContext
                            ) -> pb.FreezeAccountResponse:
        account = await self._ledger.set_status(tenant_id=_tenant(request.tenant_id),
                                                account_id=domain.parse_account_ref(request.account_id),
                                                status=AccountStatus.FROZEN)
        return pb.FreezeAccountResponse(account=account_balance_pb(account))

    async def UnfreezeAccount(self, request: pb.UnfreezeAccountRequest, context: grpc.aio.ServicerContext
                              ) -> pb.UnfreezeAccountResponse:
        account = await self._ledger.set_status(tenant_id=_tenant(request.tenant_id),
                                                account_id=domain.parse_account_ref(request.account_id),
                                                status=AccountStatus.OPEN)
        return pb.UnfreezeAccountResponse(account=account_balance_pb(account))

    async def ListTransfers(self, request: pb.ListTransfersRequest, context: grpc.aio.ServicerContext
                            ) -> pb.ListTransfersResponse:
        page, token = await self._ledger.history(
            tenant_id=_tenant(request.tenant_id), account_id=domain.parse_account_ref(request.account_id),
            page_size=request.page_size, page_token=request.page_token,
        )
        return pb.ListTransfersResponse(transfers=[transfer_pb(t) for t in page], next_page_token=token)

    async def LookupTransfer(self, request: pb.LookupTransferRequest, context: grpc.aio.ServicerContext
                             ) -> pb.LookupTransferResponse:
        found = await self._ledger.lookup(tenant_id=_tenant(request.tenant_id), idempotency_key=_key(request, context))
        if found is None:
            return pb.LookupTransferResponse(found=False)
        transfer, fingerprint = found
        return pb.LookupTransferResponse(found=True, transfer=transfer_pb(transfer), request_fingerprint=fingerprint)

    async def TrialBalance(self, request: pb.TrialBalanceRequest, context: grpc.aio.ServicerContext
                           ) -> pb.TrialBalanceResponse:
        trial = await self._ledger.trial_balance(tenant_id=_tenant(request.tenant_id))
        return pb.TrialBalanceResponse(
            postings_sum_fen=trial.postings_sum_fen, balances_sum_fen=trial.balances_sum_fen, balanced=trial.balanced,
            totals=[pb.PurseKindTotal(purse_kind=_PURSE[t.purse_kind], posted_fen=t.posted_fen,
                                      pending_fen=t.pending_fen, accounts=t.accounts) for t in trial.totals],
        )

    async def GetUsageCounters(self, request: pb.GetUsageCountersRequest, context: grpc.aio.ServicerContext
                               ) -> pb.GetUsageCountersResponse:
        counters = await self._ledger.usage_counters(tenant_id=_tenant(request.tenant_id),
                                                     counter_keys=list(request.counter_keys))
        return pb.GetUsageCountersResponse(counters=[pb.UsageCounter(counter_key=k, value=v) for k, v in counters])

    # --- programs, grants, clawbacks ------------------------------------------------------------

    async def DefineProgram(self, request: pb.DefineProgramRequest, context: grpc.aio.ServicerContext
                            ) -> pb.DefineProgramResponse:
        program, created = await self._ledger.define_program(
            tenant_id=_tenant(request.tenant_id), purse_kind=_PURSE_FROM_PB.get(request.purse_kind), ref=request.ref,
            funding_account_id=domain.parse_account_ref(request.funding_account_id),
            ends_at=_event_time(request.HasField("ends_at"), request.ends_at),
        )
        return pb.DefineProgramResponse(program=program_pb(program), created=created)

    async def GetProgram(self, request: pb.GetProgramRequest, context: grpc.aio.ServicerContext
                         ) -> pb.GetProgramResponse:
        program = await self._ledger.program(tenant_id=_tenant(request.tenant_id),
                                             purse_kind=_PURSE_FROM_PB.get(request.purse_kind), ref=request.ref)
        return pb.GetProgramResponse(program=program_pb(program))

    async def StartGrantBatch(self, request: pb.StartGrantBatchRequest, context: grpc.aio.ServicerContext
                              ) -> pb.StartGrantBatchResponse:
        batch, created = await self._ledger.start_grant_batch(
            tenant_id=_tenant(request.tenant_id), bill_number=request.bill_number,
            purse_kind=_PURSE_FROM_PB.get(request.purse_kind), ref=request.ref,
            rows=[GrantRow(member_id=r.member_id, amount_fen=r.amount_fen) for r in request.rows],
        )
        return pb.StartGrantBatchResponse(batch=batch_pb(batch), created=created)

    async def GetGrantBatch(self, request: pb.GetGrantBatchRequest, context: grpc.aio.ServicerContext
                            ) -> pb.GetGrantBatchResponse:
        if bool(request.batch_id) == bool(request.bill_number):
            raise InvalidArgument("give one of batch_id and bill_number", reason="INVALID_QUERY")
        batch = await self._ledger.grant_batch(
            tenant_id=_tenant(request.tenant_id),
            batch_id=_batch_id(request.batch_id) if request.batch_id else None, bill_number=request.bill_number,
        )
        return pb.GetGrantBatchResponse(batch=batch_pb(batch))

    async def ListGrantBatchRows(self, request: pb.ListGrantBatchRowsRequest, context: grpc.aio.ServicerContext
                                 ) -> pb.ListGrantBatchRowsResponse:
        if request.status and request.status not in _ROW_STATUS_FROM_PB:
            raise InvalidArgument("unknown row status", reason="INVALID_STATUS")
        rows, token = await self._ledger.grant_batch_rows(
            tenant_id=_tenant(request.tenant_id), batch_id=_batch_id(request.batch_id),
            status=_ROW_STATUS_FROM_PB.get(request.status), page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListGrantBatchRowsResponse(next_page_token=token, rows=[pb.GrantRowResult(
            line=r.line, member_id=r.member_id, amount_fen=r.amount_fen, status=_ROW_STATUS[r.status],
            transfer_id=str(r.transfer_id or ""), account_id=str(r.account_id or ""), reason=r.reason,
            message=r.message) for r in rows])

    async def Clawback(self, request: pb.ClawbackRequest, context: grpc.aio.ServicerContext) -> pb.ClawbackResponse:
        tenant_id = _tenant(request.tenant_id)
        result = await self._ledger.clawback(
            tenant_id=tenant_id, idempotency_key=_key(request, context),
            account_id=domain.parse_account_ref(request.account_id), amount_fen=request.amount_fen,
            external_ref=request.external_ref,
        )
        transfer, balances = await self._answer(tenant_id, result)
        return pb.ClawbackResponse(transfer=transfer, balances=balances)

    # --- offline settlement and statements ------------------------------------------------------

    async def SettleOffline(self, request: pb.SettleOfflineRequest, context: grpc.aio.ServicerContext
                            ) -> pb.SettleOfflineResponse:
        tenant_id = _tenant(request.tenant_id)
        scope = key_scope(request.key_scope, caller=peer_name(context))
        records = [_offline_record(r, scope=scope) for r in request.records]
        results = await self._ledger.settle_offline(tenant_id=tenant_id, records=records)
        ids = [r.transfer_id for r in results if r.transfer_id is not None]
        transfers = {t.transfer_id: t for t in await self._ledger.transfers(tenant_id=tenant_id, transfer_ids=ids)}
        return pb.SettleOfflineResponse(results=[pb.OfflineResult(
            idempotency_key=split_key(r.idempotency_key)[1], outcome=_OUTCOME[r.outcome], shortfall_fen=r.shortfall_fen,
            reason=r.reason, message=r.message,
            transfer=transfer_pb(transfers[r.transfer_id]) if r.transfer_id is not None else None,
        ) for r in results])

    async def GetStatement(self, request: pb.GetStatementRequest, context: grpc.aio.ServicerContext
                           ) -> pb.GetStatementResponse:
        totals, lines, token, start, end = await self._ledger.statement(
            tenant_id=_tenant(request.tenant_id),
            merchant_account_id=domain.parse_account_ref(request.merchant_account_id)
            if request.merchant_account_id else None,
            device_id=_text(request.device_id, what="device_id"), day=request.date, time_zone=request.time_zone,
            page_size=request.page_size, page_token=request.page_token,
        )
        return pb.GetStatementResponse(
            totals=pb.StatementTotals(payments=totals.payments, payments_fen=totals.payments_fen,
                                      refunds=totals.refunds, refunds_fen=totals.refunds_fen,
                                      offline_settlements=totals.offline_settlements, captures=totals.captures,
                                      net_fen=totals.net_fen),
            lines=[pb.StatementLine(transfer=transfer_pb(t), merchant_fen=fen) for t, fen in lines],
            next_page_token=token, day_start=timestamp_pb(start), day_end=timestamp_pb(end),
        )


    # --- prefunding, reversals, refunds to the bank, reconciliation ------------------------------

    async def FundClearingAccount(self, request: pb.FundClearingAccountRequest, context: grpc.aio.ServicerContext
                                  ) -> pb.FundClearingAccountResponse:
        tenant_id = _tenant(request.tenant_id)
        result = await self._ledger.fund_clearing_account(
            tenant_id=tenant_id, idempotency_key=_key(request, context),
            clearing_account_id=domain.parse_account_ref(request.clearing_account_id, what="clearing_account_id"),
            amount_fen=request.amount_fen, bank_reference=request.bank_reference, value_date=request.value_date,
        )
        transfer, balances = await self._answer(tenant_id, result)
        return pb.FundClearingAccountResponse(transfer=transfer, balances=balances)

    async def ReverseTopUp(self, request: pb.ReverseTopUpRequest, context: grpc.aio.ServicerContext
                           ) -> pb.ReverseTopUpResponse:
        tenant_id = _tenant(request.tenant_id)
        top_up_key = ""
        if request.top_up_idempotency_key:
            # The top-up's key, in the same scope as the reversal's own: a caller reaches only its own keys.
            top_up_key = scoped_key(key_scope(request.key_scope, caller=peer_name(context)),
                                    domain.check_idempotency_key(request.top_up_idempotency_key))
        result = await self._ledger.reverse_top_up(
            tenant_id=tenant_id, idempotency_key=_key(request, context),
            clearing_account_id=domain.parse_account_ref(request.clearing_account_id, what="clearing_account_id"),
            top_up_transfer_id=_transfer_ref(request.top_up_transfer_id) if request.top_up_transfer_id else None,
            top_up_key=top_up_key, reason=request.reason,
        )
        transfer, balances = await self._answer(tenant_id, result)
        return pb.ReverseTopUpResponse(transfer=transfer, balances=balances)

    async def RefundToBank(self, request: pb.RefundToBankRequest, context: grpc.aio.ServicerContext
                           ) -> pb.RefundToBankResponse:
        tenant_id = _tenant(request.tenant_id)
        result = await self._ledger.refund_to_bank(
            tenant_id=tenant_id, idempotency_key=_key(request, context),
            account_id=domain.parse_account_ref(request.account_id),
            clearing_account_id=domain.parse_account_ref(request.clearing_account_id, what="clearing_account_id"),
            amount_fen=request.amount_fen, external_ref=request.external_ref,
        )
        transfer, balances = await self._answer(tenant_id, result)
        return pb.RefundToBankResponse(transfer=transfer, balances=balances)

    async def SetLowBalanceThreshold(self, request: pb.SetLowBalanceThresholdRequest,
                                     context: grpc.aio.ServicerContext) -> pb.SetLowBalanceThresholdResponse:
        account = await self._ledger.set_low_balance_threshold(
            tenant_id=_tenant(request.tenant_id), account_id=domain.parse_account_ref(request.account_id),
            threshold_fen=request.threshold_fen if request.HasField("threshold_fen") else None,
        )
        return pb.SetLowBalanceThresholdResponse(account=account_balance_pb(account))

    async def GetReconciliation(self, request: pb.GetReconciliationRequest, context: grpc.aio.ServicerContext
                                ) -> pb.GetReconciliationResponse:
        account, totals, lines, token, start, end = await self._ledger.reconciliation(
            tenant_id=_tenant(request.tenant_id),
            clearing_account_id=domain.parse_account_ref(request.clearing_account_id, what="clearing_account_id"),
            day=request.date, time_zone=request.time_zone, page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.GetReconciliationResponse(
            account=account_balance_pb(account),
            totals=[pb.ReconciliationKindTotal(kind=_TRANSFER_KIND[t.kind], count=t.count, clearing_fen=t.clearing_fen)
                    for t in totals.by_kind],
            count=totals.count, net_fen=totals.net_fen, opening_fen=totals.opening_fen,
            closing_fen=totals.closing_fen,
            lines=[pb.ReconciliationLine(transfer=transfer_pb(line.transfer), clearing_fen=line.clearing_fen,
                                         member_id=line.member_id,
                                         value_date=line.value_date.isoformat() if line.value_date else "")
                   for line in lines],
            next_page_token=token, day_start=timestamp_pb(start), day_end=timestamp_pb(end),
        )

    async def GetMemberState(self, request: pb.GetMemberStateRequest, context: grpc.aio.ServicerContext
                             ) -> pb.GetMemberStateResponse:
        [state] = await self._ledger.member_states([_question(request, context)])
        return _member_state_pb(state)

    async def GetMemberStates(self, request: pb.GetMemberStatesRequest, context: grpc.aio.ServicerContext
                              ) -> pb.GetMemberStatesResponse:
        states = await self._ledger.member_states([_question(r, context) for r in request.requests])
        return pb.GetMemberStatesResponse(responses=[_member_state_pb(s) for s in states])


def _key(request: Any, context: grpc.aio.ServicerContext) -> str:
    """The request's idempotency key filed under its scope: the caller's own, or the owner a mesh
    caller speaks for (runtime.idempotency)."""
    key = domain.check_idempotency_key(request.idempotency_key)
    return scoped_key(key_scope(request.key_scope, caller=peer_name(context)), key)


def _question(request: pb.GetMemberStateRequest, context: grpc.aio.ServicerContext) -> MemberStateQuestion:
    return MemberStateQuestion(tenant_id=_tenant(request.tenant_id), member_id=request.member_id,
                               counter_keys=list(request.counter_keys),
                               idempotency_key=_key(request, context) if request.idempotency_key else "")


def _member_state_pb(state: MemberState) -> pb.GetMemberStateResponse:
    return pb.GetMemberStateResponse(accounts=[account_balance_pb(a) for a in state.accounts],
                                     counters=[pb.UsageCounter(counter_key=k, value=v) for k, v in state.counters],
                                     existing_transfer_id=str(state.existing or ""))

def _batch_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise NotFound("no such grant batch", reason="BATCH_NOT_FOUND") from None


def _offline_record(r: pb.OfflineRecord, *, scope: str) -> OfflineRecord:
    """A record as the domain checks it, its key under the upload's scope; an id that is not even
    a UUID becomes one no account has, so the record is refused alone (ACCOUNT_NOT_FOUND) instead
    of failing the whole call (a bad key likewise: the domain refuses it alone)."""
    return OfflineRecord(
        idempotency_key=scoped_key(scope, r.idempotency_key) if r.idempotency_key else "",
        merchant_account_id=_uuid_or_nil(r.merchant_account_id),
        legs=tuple(PayLeg(account_id=_uuid_or_nil(leg.account_id), amount_fen=leg.amount_fen) for leg in r.legs),
        device_id=r.device_id, external_ref=r.external_ref, event_time=_event_time(r.HasField("event_time"), r.event_time),
        code=_code(r.code) if r.HasField("code") else None,
    )


def _transfer_ref(value: str) -> uuid.UUID:
    """A transfer id from a caller; one that is not even a UUID is simply not found."""
    try:
        return uuid.UUID(value)
    except ValueError:
        raise NotFound("no such transfer", reason="TRANSFER_NOT_FOUND") from None


def _uuid_or_nil(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        return uuid.UUID(int=0)


def program_pb(p: Program) -> pb.Program:
    return pb.Program(tenant_id=str(p.tenant_id), purse_kind=_PURSE[p.purse_kind], ref=p.ref,
                      funding_account_id=str(p.funding_account_id),
                      ends_at=timestamp_pb(p.ends_at) if p.ends_at else None, status=_PROGRAM_STATUS[p.status],
                      expired_purses=p.expired_purses, expired_fen=p.expired_fen)


def batch_pb(b: GrantBatch) -> pb.GrantBatch:
    return pb.GrantBatch(tenant_id=str(b.tenant_id), batch_id=str(b.batch_id), bill_number=b.bill_number,
                         purse_kind=_PURSE[b.purse_kind], ref=b.ref, status=_BATCH_STATUS[b.status],
                         total_rows=b.total_rows, done_rows=b.done_rows, granted_rows=b.granted_rows,
                         failed_rows=b.failed_rows, granted_fen=b.granted_fen, created_at=timestamp_pb(b.created_at),
                         finished_at=timestamp_pb(b.finished_at) if b.finished_at else None)
