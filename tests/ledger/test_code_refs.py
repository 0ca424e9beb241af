"""An e-code pays once: a payment, hold or offline record carries the code (credential and
counter) it was made with, and a second use of the same code is refused, online or offline, at
the same device or another, even when the two uploads race."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from onecard.ledger.v1 import ledger_pb2 as pb
from tests.conftest import RunningService
from tests.ledger.support import Campus, balance, campus, check_books, refused, top_up

CREDENTIAL = str(uuid.uuid4())


def code(counter: int, credential: str = CREDENTIAL) -> pb.CodeRef:
    return pb.CodeRef(credential_id=credential, counter=counter)


def pay(c: Campus, key: str, amount: int, code_ref: pb.CodeRef) -> pb.PayRequest:
    return pb.PayRequest(tenant_id=c.tenant_id, idempotency_key=key, merchant_account_id=c.merchant_id,
                         legs=[pb.PayLeg(account_id=c.cash[0], amount_fen=amount)], device_id="pos-1", code=code_ref)


def offline(c: Campus, key: str, code_ref: pb.CodeRef, *, device: str, minute: int = 0,
            amount: int = 100) -> pb.OfflineRecord:
    stamp = Timestamp()
    stamp.FromDatetime(datetime(2026, 11, 26, 4, tzinfo=UTC) + timedelta(minutes=minute))
    return pb.OfflineRecord(idempotency_key=key, merchant_account_id=c.merchant_id, device_id=device,
                            legs=[pb.PayLeg(account_id=c.cash[0], amount_fen=amount)], event_time=stamp,
                            code=code_ref)


async def test_an_online_code_pays_once(ledger: RunningService, ledger_db: asyncpg.Connection) -> None:
    stub = ledger.stub
    c = await campus(stub, members=1)
    await top_up(stub, c, c.cash[0], 10_000)
    first = await stub.Pay(pay(c, "p1", 500, code(7)))
    assert (first.transfer.code.credential_id, first.transfer.code.counter) == (CREDENTIAL, 7)
    assert (await stub.Pay(pay(c, "p1", 500, code(7)))).transfer.transfer_id == first.transfer.transfer_id
    assert await refused(stub.Pay(pay(c, "p2", 500, code(7)))) == (grpc.StatusCode.FAILED_PRECONDITION,
                                                                  "CODE_ALREADY_USED")
    # The same key with another code is another request.
    assert await refused(stub.Pay(pay(c, "p1", 500, code(8)))) == (grpc.StatusCode.ABORTED, "IDEMPOTENCY_KEY_REUSED")
    # A cabinet's hold uses the code up too.
    await stub.CreateHold(pb.CreateHoldRequest(tenant_id=c.tenant_id, idempotency_key="h1", account_id=c.cash[0],
                                               merchant_account_id=c.merchant_id, amount_fen=300, code=code(9)))
    assert await refused(stub.Pay(pay(c, "p3", 500, code(9)))) == (grpc.StatusCode.FAILED_PRECONDITION,
                                                                  "CODE_ALREADY_USED")
    assert await refused(stub.Pay(pay(c, "p4", 500, code(1, "not-a-uuid")))) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_CODE_REF")
    assert (await balance(stub, c.tenant_id, c.cash[0])).posted_fen == 9_500
    # A counter of another credential is another code.
    await stub.Pay(pay(c, "p5", 100, code(7, str(uuid.uuid4()))))
    await check_books(ledger_db)


async def test_a_code_replayed_at_a_second_device_books_once(ledger: RunningService,
                                                             ledger_db: asyncpg.Connection) -> None:
    stub = ledger.stub
    c = await campus(stub, members=1)
    await top_up(stub, c, c.cash[0], 10_000)
    # Paid online at pos-1, then a screenshot of the same code accepted offline at pos-2.
    online = await stub.Pay(pay(c, "online", 500, code(1)))
    a = await stub.SettleOffline(pb.SettleOfflineRequest(tenant_id=c.tenant_id, records=[
        offline(c, "pos-2:1", code(1), device="pos-2"),
        offline(c, "pos-2:2", code(2), device="pos-2", minute=1),
        offline(c, "pos-2:3", code(2), device="pos-2", minute=2),  # the same code twice in one upload
    ]))
    outcomes = [(r.outcome, r.transfer.transfer_id) for r in a.results]
    assert outcomes[0] == (pb.OFFLINE_OUTCOME_CODE_REUSED, online.transfer.transfer_id)
    assert outcomes[1][0] == pb.OFFLINE_OUTCOME_BOOKED
    assert outcomes[2] == (pb.OFFLINE_OUTCOME_CODE_REUSED, outcomes[1][1])
    assert a.results[0].reason == "CODE_ALREADY_USED"
    # pos-3 uploads the same code 2 later; pos-2 re-uploads everything: nothing new is booked.
    b = await stub.SettleOffline(pb.SettleOfflineRequest(tenant_id=c.tenant_id, records=[
        offline(c, "pos-3:1", code(2), device="pos-3", minute=3)]))
    assert (b.results[0].outcome, b.results[0].transfer.transfer_id) == (pb.OFFLINE_OUTCOME_CODE_REUSED,
                                                                       outcomes[1][1])
    again = await stub.SettleOffline(pb.SettleOfflineRequest(tenant_id=c.tenant_id, records=[
        offline(c, "pos-2:1", code(1), device="pos-2"), offline(c, "pos-2:2", code(2), device="pos-2", minute=1)]))
    assert [r.outcome for r in again.results] == [pb.OFFLINE_OUTCOME_CODE_REUSED, pb.OFFLINE_OUTCOME_DUPLICATE]
    assert await ledger_db.fetchval("SELECT count(*) FROM transfers WHERE code_credential_id <> ''") == 2
    assert (await balance(stub, c.tenant_id, c.cash[0])).posted_fen == 10_000 - 500 - 100
    await check_books(ledger_db)


async def test_racing_uploads_of_replayed_codes_book_each_code_once(ledger: RunningService,
                                                                    ledger_db: asyncpg.Connection) -> None:
    stub = ledger.stub
    c = await campus(stub, members=1)
    await top_up(stub, c, c.cash[0], 1_000_000)
    # Eight devices each accepted the same 50 codes (each device its own keys), uploaded at once.
    uploads = [pb.SettleOfflineRequest(tenant_id=c.tenant_id, records=[
        offline(c, f"pos-{d}:{n}", code(n), device=f"pos-{d}", minute=n) for n in range(50)]) for d in range(8)]
    answers = await asyncio.gather(*(stub.SettleOffline(u) for u in uploads))
    booked = [r for a in answers for r in a.results if r.outcome == pb.OFFLINE_OUTCOME_BOOKED]
    reused = [r for a in answers for r in a.results if r.outcome == pb.OFFLINE_OUTCOME_CODE_REUSED]
    assert len(booked) == 50 and len(reused) == 350
    winner = {r.transfer.code.counter: r.transfer.transfer_id for r in booked}
    assert len(winner) == 50
    assert await ledger_db.fetchval("SELECT count(*) FROM transfers WHERE kind = 'offline_settlement'") == 50
    assert (await balance(stub, c.tenant_id, c.cash[0])).posted_fen == 1_000_000 - 50 * 100
    await check_books(ledger_db)
