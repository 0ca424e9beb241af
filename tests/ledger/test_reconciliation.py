"""Prefunded clearing accounts, top-up reversals, refunds to the bank, the reconciliation of a
clearing account's day, and the low-balance event, on the real ledger over gRPC."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import grpc

from onecard.ledger.v1 import ledger_pb2 as pb
from runtime.grpc_client import error_info
from runtime.wire import timestamp_pb
from tests.conftest import RunningService
from tests.ledger.support import balance, check_books, open_account, refused

SHANGHAI = ZoneInfo("Asia/Shanghai")
CLIENT_SCOPE = "client:bank-1"


async def _partner(stub: Any, *, tenant_id: str | None = None, ref: str = "bank-1") -> tuple[str, str, str]:
    """(tenant, a clearing account with credit limit 0, a member's cash purse)."""
    tenant_id = tenant_id or str(uuid.uuid4())
    clearing = await open_account(stub, tenant_id, owner_kind=pb.OWNER_KIND_TENANT, owner_id=tenant_id,
                                  purse_kind=pb.PURSE_KIND_BANK_CLEARING, ref=ref)
    cash = await open_account(stub, tenant_id, owner_kind=pb.OWNER_KIND_MEMBER, owner_id=f"m-{ref}",
                              purse_kind=pb.PURSE_KIND_CASH)
    return tenant_id, clearing, cash


def _fund(stub: Any, tenant_id: str, clearing: str, amount_fen: int, *, key: str | None = None,
          bank_reference: str | None = None, value_date: str = "2026-12-01") -> Any:
    return stub.FundClearingAccount(pb.FundClearingAccountRequest(
        tenant_id=tenant_id, idempotency_key=key or str(uuid.uuid4()), key_scope="", clearing_account_id=clearing,
        amount_fen=amount_fen, bank_reference=bank_reference or f"BANK-{uuid.uuid4()}", value_date=value_date))


def _top_up(stub: Any, tenant_id: str, clearing: str, cash: str, amount_fen: int, *, key: str | None = None,
            external_ref: str = "") -> Any:
    return stub.TopUp(pb.TopUpRequest(tenant_id=tenant_id, idempotency_key=key or str(uuid.uuid4()),
                                      key_scope=CLIENT_SCOPE, from_account_id=clearing, to_account_id=cash,
                                      amount_fen=amount_fen, external_ref=external_ref))


def _reverse(stub: Any, tenant_id: str, clearing: str, *, key: str | None = None, transfer_id: str = "",
             top_up_key: str = "", reason: str = "R01 account closed") -> Any:
    return stub.ReverseTopUp(pb.ReverseTopUpRequest(
        tenant_id=tenant_id, idempotency_key=key or str(uuid.uuid4()), key_scope=CLIENT_SCOPE,
        clearing_account_id=clearing, top_up_transfer_id=transfer_id, top_up_idempotency_key=top_up_key,
        reason=reason))


def _pay(stub: Any, tenant_id: str, merchant: str, cash: str, amount_fen: int) -> Any:
    return stub.Pay(pb.PayRequest(tenant_id=tenant_id, idempotency_key=str(uuid.uuid4()),
                                  merchant_account_id=merchant, device_id="pos-1",
                                  legs=[pb.PayLeg(account_id=cash, amount_fen=amount_fen)]))


# --- funding ----------------------------------------------------------------------------------------


async def test_a_partner_that_prefunded_1000_yuan_tops_up_1000_yuan_and_not_one_fen_more(
        ledger: RunningService, ledger_db: asyncpg.Connection) -> None:
    stub = ledger.stub
    tenant_id, clearing, cash = await _partner(stub)
    funded = await _fund(stub, tenant_id, clearing, 100_000, bank_reference="CMB-20261201-0001")
    assert funded.transfer.kind == pb.TRANSFER_KIND_CLEARING_FUNDING
    assert funded.transfer.external_ref == "CMB-20261201-0001"
    receipts_id, clearing_id = [b.account_id for b in funded.balances]
    assert clearing_id == clearing
    assert [(b.posted_fen, b.available_fen) for b in funded.balances] == [(-100_000, -100_000), (100_000, 100_000)]
    receipts = (await stub.GetBalances(pb.GetBalancesRequest(tenant_id=tenant_id, account_ids=[receipts_id])))
    assert receipts.accounts[0].account.purse_kind == pb.PURSE_KIND_BANK_RECEIPTS
    assert receipts.accounts[0].account.owner_kind == pb.OWNER_KIND_TENANT

    assert (await _top_up(stub, tenant_id, clearing, cash, 60_000)).transfer.amount_fen == 60_000
    code, reason = await refused(_top_up(stub, tenant_id, clearing, cash, 40_001))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "CREDIT_LIMIT_EXCEEDED")
    assert (await _top_up(stub, tenant_id, clearing, cash, 40_000)).transfer.amount_fen == 40_000
    code, reason = await refused(_top_up(stub, tenant_id, clearing, cash, 1))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "CREDIT_LIMIT_EXCEEDED")
    assert (await balance(stub, tenant_id, clearing)).posted_fen == 0
    assert (await balance(stub, tenant_id, cash)).posted_fen == 100_000
    await check_books(ledger_db)


async def test_funding_is_idempotent_and_a_key_or_a_bank_reference_is_not_used_twice(
        ledger: RunningService, ledger_db: asyncpg.Connection) -> None:
    stub = ledger.stub
    tenant_id, clearing, _cash = await _partner(stub)
    first = await _fund(stub, tenant_id, clearing, 5_000, key="fund-1", bank_reference="REF-1")
    again = await _fund(stub, tenant_id, clearing, 5_000, key="fund-1", bank_reference="REF-1")
    assert again.transfer.transfer_id == first.transfer.transfer_id
    assert await refused(_fund(stub, tenant_id, clearing, 5_001, key="fund-1", bank_reference="REF-1")) == (
        grpc.StatusCode.ABORTED, "IDEMPOTENCY_KEY_REUSED")
    # The same bank transfer recorded again under a new key would count its money twice.
    assert await refused(_fund(stub, tenant_id, clearing, 5_000, key="fund-2", bank_reference="REF-1")) == (
        grpc.StatusCode.ABORTED, "BANK_REFERENCE_USED")
    assert (await balance(stub, tenant_id, clearing)).posted_fen == 5_000
    # Bad input changes nothing.
    cases = [({"amount_fen": 0}, "INVALID_AMOUNT"), ({"bank_reference": ""}, "INVALID_BANK_REFERENCE"),
             ({"bank_reference": "a\nb"}, "INVALID_BANK_REFERENCE"), ({"value_date": "1.12.2026"},
                                                                       "INVALID_VALUE_DATE")]
    for change, expected in cases:
        request = {"amount_fen": 1, "bank_reference": "REF-X", "value_date": "2026-12-01", **change}
        code, reason = await refused(stub.FundClearingAccount(pb.FundClearingAccountRequest(
            tenant_id=tenant_id, idempotency_key=str(uuid.uuid4()), clearing_account_id=clearing, **request)))
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, expected), change
    # Only a clearing account is funded.
    assert await refused(_fund(stub, tenant_id, _cash, 1)) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                               "WRONG_ACCOUNT_KIND")
    assert (await balance(stub, tenant_id, clearing)).posted_fen == 5_000
    await check_books(ledger_db)


# --- top-up reversal --------------------------------------------------------------------------------


async def test_a_top_up_is_reversed_exactly_once_by_its_key_or_its_id(ledger: RunningService,
                                                                      ledger_db: asyncpg.Connection) -> None:
    stub = ledger.stub
    tenant_id, clearing, cash = await _partner(stub)
    await _fund(stub, tenant_id, clearing, 10_000)
    topped = await _top_up(stub, tenant_id, clearing, cash, 3_000, key="bank-txn-7")

    reversed_ = await _reverse(stub, tenant_id, clearing, key="rev-1", top_up_key="bank-txn-7")
    assert reversed_.transfer.kind == pb.TRANSFER_KIND_TOP_UP_REVERSAL
    assert reversed_.transfer.original_transfer_id == topped.transfer.transfer_id
    assert reversed_.transfer.amount_fen == 3_000
    assert (await balance(stub, tenant_id, cash)).posted_fen == 0
    assert (await balance(stub, tenant_id, clearing)).posted_fen == 10_000
    # The same request again answers the same reversal; another request under its key is refused.
    again = await _reverse(stub, tenant_id, clearing, key="rev-1", top_up_key="bank-txn-7")
    assert again.transfer.transfer_id == reversed_.transfer.transfer_id
    assert await refused(_reverse(stub, tenant_id, clearing, key="rev-1",
                                  transfer_id=topped.transfer.transfer_id)) == (grpc.StatusCode.ABORTED,
                                                                                "IDEMPOTENCY_KEY_REUSED")
    # Under a new key, by key or by id: once is all.
    for named in ({"top_up_key": "bank-txn-7"}, {"transfer_id": topped.transfer.transfer_id}):
        code, reason = await refused(_reverse(stub, tenant_id, clearing, **named))
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "TOP_UP_ALREADY_REVERSED")
    assert (await balance(stub, tenant_id, clearing)).posted_fen == 10_000
    await check_books(ledger_db)


async def test_a_reversal_is_refused_once_the_member_spent_the_money_or_for_a_transfer_not_its_top_up(
        ledger: RunningService, ledger_db: asyncpg.Connection) -> None:
    stub = ledger.stub
    tenant_id, clearing, cash = await _partner(stub)
    _, other_clearing, other_cash = await _partner(stub, tenant_id=tenant_id, ref="bank-2")
    merchant = await open_account(stub, tenant_id, owner_kind=pb.OWNER_KIND_MERCHANT, owner_id="canteen",
                                  purse_kind=pb.PURSE_KIND_MERCHANT_SETTLEMENT)
    await _fund(stub, tenant_id, clearing, 10_000)
    await _fund(stub, tenant_id, other_clearing, 10_000)
    topped = await _top_up(stub, tenant_id, clearing, cash, 2_000)
    paid = await _pay(stub, tenant_id, merchant, cash, 1)

    code, reason = await refused(_reverse(stub, tenant_id, clearing, transfer_id=topped.transfer.transfer_id))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "TOP_UP_ALREADY_SPENT")
    # Another partner's top-up, a payment, an id that is none: not found for this clearing account.
    theirs = await _top_up(stub, tenant_id, other_clearing, other_cash, 500)
    for transfer_id in (theirs.transfer.transfer_id, paid.transfer.transfer_id, str(uuid.uuid4()), "nope"):
        code, reason = await refused(_reverse(stub, tenant_id, clearing, transfer_id=transfer_id))
        assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "TRANSFER_NOT_FOUND"), transfer_id
    # Keys are the caller's: another scope's key names nothing here.
    code, reason = await refused(stub.ReverseTopUp(pb.ReverseTopUpRequest(
        tenant_id=tenant_id, idempotency_key="x", key_scope="client:someone-else", clearing_account_id=clearing,
        top_up_idempotency_key=topped.transfer.idempotency_key)))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "TRANSFER_NOT_FOUND")
    assert (await balance(stub, tenant_id, cash)).posted_fen == 1_999
    await check_books(ledger_db)


async def test_a_refund_to_the_bank_pays_a_members_cash_back_through_the_clearing_account(
        ledger: RunningService, ledger_db: asyncpg.Connection) -> None:
    stub = ledger.stub
    tenant_id, clearing, cash = await _partner(stub)
    await _fund(stub, tenant_id, clearing, 10_000)
    await _top_up(stub, tenant_id, clearing, cash, 4_000)

    def refund(amount_fen: int, key: str) -> Any:
        return stub.RefundToBank(pb.RefundToBankRequest(tenant_id=tenant_id, idempotency_key=key,
                                                        account_id=cash, clearing_account_id=clearing,
                                                        amount_fen=amount_fen, external_ref="leaver 2026"))

    refunded = await refund(4_000, "leaver-1")
    assert refunded.transfer.kind == pb.TRANSFER_KIND_BANK_REFUND
    assert (await refund(4_000, "leaver-1")).transfer.transfer_id == refunded.transfer.transfer_id
    assert await refused(refund(1, "leaver-2")) == (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_FUNDS")
    assert (await balance(stub, tenant_id, cash)).posted_fen == 0
    assert (await balance(stub, tenant_id, clearing)).posted_fen == 10_000
    await check_books(ledger_db)


# --- reconciliation ---------------------------------------------------------------------------------


async def _book_at(db: asyncpg.Connection, *, tenant_id: str, kind: str, debit: str, credit: str, amount_fen: int,
                   booked_at: datetime, key: str) -> str:
    """A transfer booked at a chosen time, as the service books one (row, postings, balance
    caches): the service's clock cannot be moved, so the tests of day boundaries write the past."""
    transfer_id = uuid.uuid4()
    async with db.transaction():
        seq = await db.fetchval(
            "INSERT INTO transfers (transfer_id, tenant_id, kind, idempotency_key, amount_fen, event_time, booked_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $6) RETURNING seq",
            transfer_id, uuid.UUID(tenant_id), kind, key, amount_fen, booked_at)
        await db.execute(
            "INSERT INTO postings (transfer_id, account_id, tenant_id, seq, leg, amount_fen)"
            " VALUES ($1, $2, $4, $5, 0, -$6::bigint), ($1, $3, $4, $5, 1, $6::bigint)",
            transfer_id, uuid.UUID(debit), uuid.UUID(credit), uuid.UUID(tenant_id), seq, amount_fen)
        await db.execute("UPDATE accounts SET posted_fen = posted_fen - $2 WHERE account_id = $1",
                         uuid.UUID(debit), amount_fen)
        await db.execute("UPDATE accounts SET posted_fen = posted_fen + $2 WHERE account_id = $1",
                         uuid.UUID(credit), amount_fen)
    return str(transfer_id)


async def _whole_day(stub: Any, tenant_id: str, clearing: str, day: str, *, time_zone: str = "Asia/Shanghai",
                     page_size: int = 0) -> tuple[pb.GetReconciliationResponse, list[pb.ReconciliationLine]]:
    request = pb.GetReconciliationRequest(tenant_id=tenant_id, clearing_account_id=clearing, date=day,
                                          time_zone=time_zone, page_size=page_size)
    first = answer = await stub.GetReconciliation(request)
    lines = list(answer.lines)
    while answer.next_page_token:
        request.page_token = answer.next_page_token
        answer = await stub.GetReconciliation(request)
        lines.extend(answer.lines)
    return first, lines


async def test_a_transfer_at_23_59_and_one_at_00_01_local_land_on_different_days(
        ledger: RunningService, ledger_db: asyncpg.Connection) -> None:
    stub = ledger.stub
    tenant_id, clearing, cash = await _partner(stub)
    receipts = await open_account(stub, tenant_id, owner_kind=pb.OWNER_KIND_TENANT, owner_id=tenant_id,
                                  purse_kind=pb.PURSE_KIND_BANK_RECEIPTS)
    midnight = datetime(2026, 11, 2, tzinfo=SHANGHAI)
    await _book_at(ledger_db, tenant_id=tenant_id, kind="clearing_funding", debit=receipts, credit=clearing,
                   amount_fen=9_000, booked_at=midnight - timedelta(hours=20), key="f")
    late = await _book_at(ledger_db, tenant_id=tenant_id, kind="top_up", debit=clearing, credit=cash, amount_fen=700,
                          booked_at=midnight - timedelta(minutes=1), key=f"{CLIENT_SCOPE}/late")
    early = await _book_at(ledger_db, tenant_id=tenant_id, kind="top_up", debit=clearing, credit=cash,
                           amount_fen=300, booked_at=midnight + timedelta(minutes=1), key=f"{CLIENT_SCOPE}/early")

    first_day, first_lines = await _whole_day(stub, tenant_id, clearing, "2026-11-01")
    second_day, second_lines = await _whole_day(stub, tenant_id, clearing, "2026-11-02")
    assert [line.transfer.transfer_id for line in first_lines][-1] == late
    assert [line.transfer.transfer_id for line in second_lines] == [early]
    assert (first_day.opening_fen, first_day.net_fen, first_day.closing_fen) == (0, 8_300, 8_300)
    assert (second_day.opening_fen, second_day.net_fen, second_day.closing_fen) == (8_300, -300, 8_000)
    # In UTC both are on 2026-11-01 (15:59 and 16:01).
    utc_day, utc_lines = await _whole_day(stub, tenant_id, clearing, "2026-11-01", time_zone="UTC")
    assert {late, early} <= {line.transfer.transfer_id for line in utc_lines}
    assert utc_day.closing_fen == 8_000
    await check_books(ledger_db)


async def test_the_days_totals_and_balances_equal_the_ledgers_computed_from_its_postings(
        ledger: RunningService, ledger_db: asyncpg.Connection) -> None:
    stub = ledger.stub
    tenant_id, clearing, cash = await _partner(stub)
    await _fund(stub, tenant_id, clearing, 50_000, bank_reference="REF-A", value_date="2026-11-30")
    keys = [f"t-{n}" for n in range(7)]
    tops = [await _top_up(stub, tenant_id, clearing, cash, 1_000 + n, key=k) for n, k in enumerate(keys)]
    await _reverse(stub, tenant_id, clearing, top_up_key="t-3")
    await stub.RefundToBank(pb.RefundToBankRequest(tenant_id=tenant_id, idempotency_key="refund",
                                                   account_id=cash, clearing_account_id=clearing, amount_fen=250))
    today = datetime.now(SHANGHAI).date().isoformat()
    head, lines = await _whole_day(stub, tenant_id, clearing, today, page_size=3)

    # Independently, from the tables: every posting of the clearing account booked that day.
    start = datetime.fromisoformat(today).replace(tzinfo=SHANGHAI)
    rows = await ledger_db.fetch(
        "SELECT t.transfer_id, t.kind, p.amount_fen FROM postings p JOIN transfers t USING (transfer_id)"
        " WHERE p.account_id = $1 AND t.booked_at >= $2 AND t.booked_at < $3 ORDER BY t.seq",
        uuid.UUID(clearing), start, start + timedelta(days=1))
    assert [line.transfer.transfer_id for line in lines] == [str(r["transfer_id"]) for r in rows]
    assert [line.clearing_fen for line in lines] == [r["amount_fen"] for r in rows]
    by_kind: dict[str, tuple[int, int]] = {}
    for r in rows:
        count, fen = by_kind.get(r["kind"], (0, 0))
        by_kind[r["kind"]] = (count + 1, fen + r["amount_fen"])
    name = {pb.TRANSFER_KIND_CLEARING_FUNDING: "clearing_funding", pb.TRANSFER_KIND_TOP_UP: "top_up",
            pb.TRANSFER_KIND_TOP_UP_REVERSAL: "top_up_reversal", pb.TRANSFER_KIND_BANK_REFUND: "bank_refund"}
    assert {name[t.kind]: (t.count, t.clearing_fen) for t in head.totals if t.count} == by_kind
    assert [t.kind for t in head.totals] == list(name)
    assert head.net_fen == sum(r["amount_fen"] for r in rows) == 50_000 - sum(1_000 + n for n in range(7)) + 1_003 + 250
    before = await ledger_db.fetchval(
        "SELECT COALESCE(sum(p.amount_fen), 0) FROM postings p JOIN transfers t USING (transfer_id)"
        " WHERE p.account_id = $1 AND t.booked_at < $2", uuid.UUID(clearing), start)
    assert head.opening_fen == before == 0
    assert head.closing_fen == head.opening_fen + head.net_fen == (await balance(stub, tenant_id, clearing)).posted_fen
    # Each line names its member and the partner's key; the funding its value date and reference.
    funding = lines[0]
    assert (funding.transfer.kind, funding.member_id, funding.value_date) == (
        pb.TRANSFER_KIND_CLEARING_FUNDING, "", "2026-11-30")
    assert funding.transfer.external_ref == "REF-A"
    top = next(line for line in lines if line.transfer.transfer_id == tops[0].transfer.transfer_id)
    assert (top.member_id, top.clearing_fen, top.transfer.idempotency_key) == ("m-bank-1", -1_000, "t-0")
    # Another kind of account has no reconciliation.
    assert await refused(stub.GetReconciliation(pb.GetReconciliationRequest(
        tenant_id=tenant_id, clearing_account_id=cash, date=today))) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                                         "WRONG_ACCOUNT_KIND")


# --- low balance ------------------------------------------------------------------------------------


async def _low_events(db: asyncpg.Connection, tenant_id: str) -> list[dict[str, Any]]:
    rows = await db.fetch("SELECT payload FROM outbox WHERE subject = 'ledger.balance.low' ORDER BY id")
    events = [json.loads(r["payload"]) for r in rows]
    return [e["data"] for e in events if e["tenant_id"] == tenant_id]


async def test_the_low_balance_event_fires_once_per_crossing_below_the_threshold(
        ledger: RunningService, ledger_db: asyncpg.Connection) -> None:
    stub = ledger.stub
    tenant_id, clearing, cash = await _partner(stub)
    merchant = await open_account(stub, tenant_id, owner_kind=pb.OWNER_KIND_MERCHANT, owner_id="canteen",
                                  purse_kind=pb.PURSE_KIND_MERCHANT_SETTLEMENT)
    await _fund(stub, tenant_id, clearing, 100_000)
    await _top_up(stub, tenant_id, clearing, cash, 2_000)
    set_ = await stub.SetLowBalanceThreshold(pb.SetLowBalanceThresholdRequest(tenant_id=tenant_id, account_id=cash,
                                                                              threshold_fen=1_000))
    assert set_.account.account.low_balance_threshold_fen == 1_000

    await _pay(stub, tenant_id, merchant, cash, 1_000)  # 2000 -> 1000: not below
    assert await _low_events(ledger_db, tenant_id) == []
    paid = await _pay(stub, tenant_id, merchant, cash, 1)  # 1000 -> 999: crossed
    await _pay(stub, tenant_id, merchant, cash, 100)  # already below: no second event
    events = await _low_events(ledger_db, tenant_id)
    assert events == [{"tenant_id": tenant_id, "member_id": "m-bank-1", "account_id": cash, "purse_kind": "cash",
                       "balance_fen": 999, "threshold_fen": 1_000, "transfer_id": paid.transfer.transfer_id}]
    # Back above, then below again: a new crossing. A hold takes available money too.
    await _top_up(stub, tenant_id, clearing, cash, 5_000)
    held = await stub.CreateHold(pb.CreateHoldRequest(tenant_id=tenant_id, idempotency_key="hold",
                                                      account_id=cash, merchant_account_id=merchant,
                                                      amount_fen=5_000))
    events = await _low_events(ledger_db, tenant_id)
    assert [(e["balance_fen"], e["transfer_id"]) for e in events[1:]] == [(899, held.transfer.transfer_id)]
    # Cleared, nothing fires; another kind of purse takes no threshold.
    await stub.VoidHold(pb.VoidHoldRequest(tenant_id=tenant_id, idempotency_key="void", hold_id=held.hold.hold_id))
    cleared = await stub.SetLowBalanceThreshold(pb.SetLowBalanceThresholdRequest(tenant_id=tenant_id,
                                                                                 account_id=cash))
    assert not cleared.account.account.HasField("low_balance_threshold_fen")
    await _pay(stub, tenant_id, merchant, cash, 5_800)
    assert len(await _low_events(ledger_db, tenant_id)) == 2
    assert await refused(stub.SetLowBalanceThreshold(pb.SetLowBalanceThresholdRequest(
        tenant_id=tenant_id, account_id=clearing, threshold_fen=1))) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                                         "WRONG_ACCOUNT_KIND")
    assert await refused(stub.SetLowBalanceThreshold(pb.SetLowBalanceThresholdRequest(
        tenant_id=tenant_id, account_id=cash, threshold_fen=-1))) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                                      "INVALID_THRESHOLD")
    await check_books(ledger_db)


async def test_a_reversal_that_takes_a_purse_below_its_threshold_fires_the_event(
        ledger: RunningService, ledger_db: asyncpg.Connection) -> None:
    stub = ledger.stub
    tenant_id, clearing, cash = await _partner(stub)
    await _fund(stub, tenant_id, clearing, 10_000)
    await stub.SetLowBalanceThreshold(pb.SetLowBalanceThresholdRequest(tenant_id=tenant_id, account_id=cash,
                                                                       threshold_fen=500))
    topped = await _top_up(stub, tenant_id, clearing, cash, 3_000)
    reversed_ = await _reverse(stub, tenant_id, clearing, transfer_id=topped.transfer.transfer_id)
    assert [(e["balance_fen"], e["transfer_id"]) for e in await _low_events(ledger_db, tenant_id)] == [
        (0, reversed_.transfer.transfer_id)]


async def test_concurrent_reversals_of_one_top_up_reverse_it_once(ledger: RunningService,
                                                                 ledger_db: asyncpg.Connection) -> None:
    stub = ledger.stub
    tenant_id, clearing, cash = await _partner(stub)
    await _fund(stub, tenant_id, clearing, 10_000)
    topped = await _top_up(stub, tenant_id, clearing, cash, 6_000, key="bank-txn-9")
    attempts = [_reverse(stub, tenant_id, clearing, transfer_id=topped.transfer.transfer_id) if n % 2 else
                _reverse(stub, tenant_id, clearing, top_up_key="bank-txn-9") for n in range(6)]
    outcomes = await asyncio.gather(*attempts, return_exceptions=True)
    done = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(done) == 1
    refusals = [o for o in outcomes if isinstance(o, BaseException)]
    assert all(isinstance(o, grpc.aio.AioRpcError) and error_info(o)[0] == "TOP_UP_ALREADY_REVERSED"
               for o in refusals), refusals
    assert (await balance(stub, tenant_id, cash)).posted_fen == 0
    assert (await balance(stub, tenant_id, clearing)).posted_fen == 10_000
    await check_books(ledger_db)


async def test_concurrent_fundings_with_one_bank_reference_book_it_once(ledger: RunningService,
                                                                       ledger_db: asyncpg.Connection) -> None:
    stub = ledger.stub
    tenant_id, clearing, _cash = await _partner(stub)
    outcomes = await asyncio.gather(*(_fund(stub, tenant_id, clearing, 1_000, bank_reference="SAME")
                                      for _ in range(6)), return_exceptions=True)
    assert sum(not isinstance(o, BaseException) for o in outcomes) == 1
    assert {error_info(o)[0] for o in outcomes if isinstance(o, grpc.aio.AioRpcError)} == {"BANK_REFERENCE_USED"}
    assert (await balance(stub, tenant_id, clearing)).posted_fen == 1_000
    await check_books(ledger_db)


async def test_an_offline_settlement_that_crosses_the_threshold_fires_the_event(
        ledger: RunningService, ledger_db: asyncpg.Connection) -> None:
    stub = ledger.stub
    tenant_id, clearing, cash = await _partner(stub)
    merchant = await open_account(stub, tenant_id, owner_kind=pb.OWNER_KIND_MERCHANT, owner_id="canteen",
                                  purse_kind=pb.PURSE_KIND_MERCHANT_SETTLEMENT)
    await _fund(stub, tenant_id, clearing, 10_000)
    await _top_up(stub, tenant_id, clearing, cash, 1_000)
    await stub.SetLowBalanceThreshold(pb.SetLowBalanceThresholdRequest(tenant_id=tenant_id, account_id=cash,
                                                                       threshold_fen=500))
    now = datetime.now(SHANGHAI)
    records = [pb.OfflineRecord(idempotency_key=f"pos-1:{n}", merchant_account_id=merchant, device_id="pos-1",
                                legs=[pb.PayLeg(account_id=cash, amount_fen=300)], event_time=timestamp_pb(now))
               for n in range(3)]
    settled = await stub.SettleOffline(pb.SettleOfflineRequest(tenant_id=tenant_id, records=records))
    # 1000 -> 700 -> 400 (crossed) -> 100: one event, for the second record.
    events = await _low_events(ledger_db, tenant_id)
    assert [(e["balance_fen"], e["transfer_id"]) for e in events] == [(400, settled.results[1].transfer.transfer_id)]
