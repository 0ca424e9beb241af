"""Daily statements: a merchant's or a device's day of payments, refunds, captures and offline
settlements, by booking time in the tenant's time zone, with totals over the whole day."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import asyncpg
import grpc

from onecard.ledger.v1 import ledger_pb2 as pb
from tests.conftest import RunningService
from tests.ledger.support import campus, pay, refused, top_up

SHANGHAI = ZoneInfo("Asia/Shanghai")


async def test_a_merchants_day_and_a_devices_day(ledger: RunningService, ledger_db: asyncpg.Connection) -> None:
    stub = ledger.stub
    c = await campus(stub, members=2)
    await top_up(stub, c, c.cash[0], 100_000)
    payments = [await pay(stub, c, [(c.cash[0], 100 + n)]) for n in range(7)]  # device pos-1
    other = await stub.Pay(pb.PayRequest(tenant_id=c.tenant_id, idempotency_key="pos2", merchant_account_id=c.merchant_id,
                                         legs=[pb.PayLeg(account_id=c.cash[0], amount_fen=1000)], device_id="pos-2"))
    await stub.Refund(pb.RefundRequest(tenant_id=c.tenant_id, idempotency_key="r",
                                       payment_transfer_id=payments[0].transfer.transfer_id, amount_fen=40))
    hold = await stub.CreateHold(pb.CreateHoldRequest(tenant_id=c.tenant_id, idempotency_key="h", account_id=c.cash[0],
                                                      merchant_account_id=c.merchant_id, amount_fen=300,
                                                      device_id="cab-1"))
    await stub.CaptureHold(pb.CaptureHoldRequest(tenant_id=c.tenant_id, idempotency_key="cap",
                                                 hold_id=hold.hold.hold_id, amount_fen=250))
    today = datetime.now(SHANGHAI).date().isoformat()

    def statement(**kw: object) -> object:
        return stub.GetStatement(pb.GetStatementRequest(tenant_id=c.tenant_id, date=today, **kw))

    day = await statement(merchant_account_id=c.merchant_id, page_size=4)
    totals = day.totals
    paid = sum(100 + n for n in range(7)) + 1000 + 250
    assert (totals.payments, totals.payments_fen, totals.refunds, totals.refunds_fen, totals.captures) == (
        9, paid, 1, 40, 1)
    assert totals.net_fen == paid - 40
    lines = list(day.lines)
    token = day.next_page_token
    while token:
        page = await statement(merchant_account_id=c.merchant_id, page_size=4, page_token=token)
        assert page.totals == totals  # the day's totals on every page
        lines.extend(page.lines)
        token = page.next_page_token
    # The hold itself moved no merchant money: it is not a line; its capture is.
    assert [line.transfer.kind for line in lines].count(pb.TRANSFER_KIND_HOLD) == 0
    assert len(lines) == 10 and sum(line.merchant_fen for line in lines) == totals.net_fen
    assert [line.transfer.booked_at.ToDatetime() for line in lines] == sorted(
        line.transfer.booked_at.ToDatetime() for line in lines)
    start, end = day.day_start.ToDatetime(tzinfo=UTC), day.day_end.ToDatetime(tzinfo=UTC)
    assert end - start == timedelta(days=1) and start.astimezone(SHANGHAI).hour == 0

    pos2 = await statement(device_id="pos-2")
    assert [(line.transfer.transfer_id, line.merchant_fen) for line in pos2.lines] == [
        (other.transfer.transfer_id, 1000)]
    cabinet = await statement(device_id="cab-1")
    assert [line.transfer.kind for line in cabinet.lines] == [pb.TRANSFER_KIND_CAPTURE]

    # Yesterday in Shanghai was empty; in a zone far enough west, "today" may still be another day.
    yesterday = (datetime.now(SHANGHAI) - timedelta(days=1)).date().isoformat()
    empty = await stub.GetStatement(pb.GetStatementRequest(tenant_id=c.tenant_id, date=yesterday,
                                                           merchant_account_id=c.merchant_id))
    assert (empty.totals.payments, len(empty.lines), empty.next_page_token) == (0, 0, "")


async def test_bad_statement_queries_are_refused(ledger: RunningService) -> None:
    stub = ledger.stub
    c = await campus(stub, members=1)

    async def reason(**kw: object) -> tuple[grpc.StatusCode, str | None]:
        return await refused(stub.GetStatement(pb.GetStatementRequest(tenant_id=c.tenant_id, **kw)))

    assert await reason(date="2026-11-26") == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_QUERY")
    assert await reason(date="2026-11-26", merchant_account_id=c.merchant_id, device_id="x") == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_QUERY")
    assert await reason(date="26/11/2026", device_id="x") == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_DATE")
    assert await reason(date="2026-11-26", device_id="x", time_zone="Mars/Olympus") == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_TIME_ZONE")
    assert await reason(date="2026-11-26", merchant_account_id=c.cash[0]) == (
        grpc.StatusCode.INVALID_ARGUMENT, "WRONG_ACCOUNT_KIND")
    other = await campus(stub, members=0)
    assert await reason(date="2026-11-26", merchant_account_id=other.merchant_id) == (
        grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")
