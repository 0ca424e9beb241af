"""Offline settlement: what devices took while offline is booked once, with the device's time;
a purse that cannot cover its part leaves the rest to the member's receivable (and says so), and
a wrong record is refused alone."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from onecard.ledger.v1 import ledger_pb2 as pb
from tests.conftest import RunningService
from tests.ledger.support import Campus, balance, campus, check_books, grant, refused, top_up
from tests.streams import read_exactly

LUNCH = datetime(2026, 11, 26, 4, 0, tzinfo=UTC)  # 12:00 in Shanghai


def record(c: Campus, key: str, legs: list[tuple[str, int]], *, minute: float = 0,
           device: str = "pos-7") -> pb.OfflineRecord:
    stamp = Timestamp()
    stamp.FromDatetime(LUNCH + timedelta(minutes=minute))
    return pb.OfflineRecord(idempotency_key=key, merchant_account_id=c.merchant_id, device_id=device,
                            legs=[pb.PayLeg(account_id=a, amount_fen=f) for a, f in legs], event_time=stamp,
                            external_ref=f"rec-{key}")


async def settle(stub, c: Campus, records: list[pb.OfflineRecord]) -> list[pb.OfflineResult]:
    response = await stub.SettleOffline(pb.SettleOfflineRequest(tenant_id=c.tenant_id, records=records))
    assert [r.idempotency_key for r in response.results] == [r.idempotency_key for r in records]
    return list(response.results)


async def test_a_lunch_offline_books_every_record_once(ledger: RunningService, ledger_db: asyncpg.Connection) -> None:
    stub = ledger.stub
    c = await campus(stub, members=20)
    for n in range(20):
        await top_up(stub, c, c.cash[n], 5000)
        await grant(stub, c, c.subsidy[n], 1000)
    rng = random.Random(7)
    lunch = []
    for n in range(300):
        m = rng.randrange(20)
        lunch.append(record(c, f"offline:pos-7:{n}", [(c.subsidy[m], 100), (c.cash[m], rng.randint(1, 200))],
                            minute=n * 0.2))
    shuffled = lunch[:]
    rng.shuffle(shuffled)
    # Uploaded out of order in two parts, the second part twice, with a record repeated inside it.
    first = await settle(stub, c, shuffled[:150])
    second = await settle(stub, c, [*shuffled[150:], shuffled[160]])
    again = await settle(stub, c, shuffled[150:])
    outcomes = [r.outcome for r in first + second[:-1]]
    assert set(outcomes) <= {pb.OFFLINE_OUTCOME_BOOKED, pb.OFFLINE_OUTCOME_SHORTFALL}
    assert second[-1].outcome == pb.OFFLINE_OUTCOME_DUPLICATE
    assert second[-1].transfer.transfer_id == second[10].transfer.transfer_id
    assert [r.outcome for r in again] == [pb.OFFLINE_OUTCOME_DUPLICATE] * 150
    assert [r.transfer.transfer_id for r in again] == [r.transfer.transfer_id for r in second[:-1]]

    rows = await ledger_db.fetch("SELECT idempotency_key, event_time, booked_at, amount_fen FROM transfers"
                                 " WHERE kind = 'offline_settlement'")
    assert len(rows) == 300 and len({r["idempotency_key"] for r in rows}) == 300
    # Filed under the device hub's own scope (no key_scope named in these calls).
    by_key = {f"mesh:devicehub/{r.idempotency_key}": r for r in lunch}
    for row in rows:
        # Booked with the device's time; booked_at is when it reached the ledger.
        assert row["event_time"] == by_key[row["idempotency_key"]].event_time.ToDatetime(tzinfo=UTC)
        assert row["booked_at"] > row["event_time"]
        assert row["amount_fen"] == sum(leg.amount_fen for leg in by_key[row["idempotency_key"]].legs)
    merchant_total = sum(r["amount_fen"] for r in rows)
    assert await ledger_db.fetchval("SELECT sum(posted_fen) FROM account_shards WHERE account_id = $1",
                                    uuid.UUID(c.merchant_id)) == merchant_total
    await check_books(ledger_db)


async def test_a_shortfall_goes_to_the_receivable_with_an_event(ledger: RunningService,
                                                                 ledger_db: asyncpg.Connection,
                                                                 nats_url: str) -> None:
    stub = ledger.stub
    c = await campus(stub, members=2)
    await top_up(stub, c, c.cash[0], 300)
    await grant(stub, c, c.subsidy[0], 200)
    # The member spent online meanwhile, then was frozen: offline money was handed over anyway.
    await stub.FreezeAccount(pb.FreezeAccountRequest(tenant_id=c.tenant_id, account_id=c.cash[0]))
    results = await settle(stub, c, [
        record(c, "k1", [(c.subsidy[0], 150), (c.cash[0], 100)], minute=1),
        record(c, "k2", [(c.subsidy[0], 150), (c.cash[0], 250)], minute=2),
    ])
    assert [r.outcome for r in results] == [pb.OFFLINE_OUTCOME_BOOKED, pb.OFFLINE_OUTCOME_SHORTFALL]
    # k2: subsidy had 50 left of 150, cash 200 of 250 -> 150 short.
    assert results[1].shortfall_fen == 150
    assert (await balance(stub, c.tenant_id, c.subsidy[0])).posted_fen == 0
    assert (await balance(stub, c.tenant_id, c.cash[0])).posted_fen == 0
    owned = await stub.GetBalances(pb.GetBalancesRequest(tenant_id=c.tenant_id, owner_kind=pb.OWNER_KIND_MEMBER,
                                                         owner_id="m0"))
    receivable = [a for a in owned.accounts if a.account.purse_kind == pb.PURSE_KIND_RECEIVABLE]
    assert len(receivable) == 1 and receivable[0].balance.posted_fen == -150
    legs = {p.account_id: p.amount_fen for p in results[1].transfer.postings}
    assert legs == {c.subsidy[0]: -50, c.cash[0]: -200, receivable[0].account.account_id: -150, c.merchant_id: 400}

    [message] = await read_exactly(nats_url, stream="LEDGER", subjects="ledger.offline.shortfall", count=1)
    event = json.loads(message.data)
    data = event.get("data", event)
    assert (data["member_id"], data["shortfall_fen"], data["device_id"]) == ("m0", 150, "pos-7")

    # A repeat says the same, shortfall included; nothing moves.
    repeat = await settle(stub, c, [record(c, "k2", [(c.subsidy[0], 150), (c.cash[0], 250)], minute=2)])
    assert (repeat[0].outcome, repeat[0].shortfall_fen) == (pb.OFFLINE_OUTCOME_DUPLICATE, 150)

    # A refund of it returns to the receivable first (the debt), then to the purses.
    refund = await stub.Refund(pb.RefundRequest(tenant_id=c.tenant_id, idempotency_key="r1",
                                                payment_transfer_id=results[1].transfer.transfer_id, amount_fen=180))
    credits = {p.account_id: p.amount_fen for p in refund.transfer.postings if p.amount_fen > 0}
    assert credits == {receivable[0].account.account_id: 150, c.cash[0]: 30}
    await check_books(ledger_db)


async def test_wrong_records_are_refused_alone(ledger: RunningService, ledger_db: asyncpg.Connection) -> None:
    stub = ledger.stub
    c = await campus(stub, members=2)
    await top_up(stub, c, c.cash[0], 1000)
    good = record(c, "good", [(c.cash[0], 100)])
    no_time = record(c, "no-time", [(c.cash[0], 100)])
    no_time.ClearField("event_time")
    other_tenant = await campus(stub, members=1)
    results = await settle(stub, c, [
        record(c, "zero", [(c.cash[0], 0)]),
        record(c, "unknown", [(str(uuid.uuid4()), 100)]),
        record(c, "not-a-uuid", [("purse-7", 100)]),
        record(c, "foreign", [(other_tenant.cash[0], 100)]),
        record(c, "two-members", [(c.cash[0], 100), (c.cash[1], 100)]),
        pb.OfflineRecord(idempotency_key="to-a-purse", merchant_account_id=c.cash[1], device_id="pos-7",
                         legs=[pb.PayLeg(account_id=c.cash[0], amount_fen=100)], event_time=good.event_time),
        no_time,
        good,
        record(c, "good", [(c.cash[0], 999)]),  # the same key, another record
    ])
    reasons = [(r.idempotency_key, r.outcome, r.reason) for r in results]
    rejected = pb.OFFLINE_OUTCOME_REJECTED
    assert reasons == [
        ("zero", rejected, "INVALID_AMOUNT"),
        ("unknown", rejected, "ACCOUNT_NOT_FOUND"),
        ("not-a-uuid", rejected, "ACCOUNT_NOT_FOUND"),
        ("foreign", rejected, "ACCOUNT_NOT_FOUND"),
        ("two-members", rejected, "LEGS_OF_MANY_OWNERS"),
        ("to-a-purse", rejected, "WRONG_ACCOUNT_KIND"),
        ("no-time", rejected, "EVENT_TIME_REQUIRED"),
        ("good", pb.OFFLINE_OUTCOME_BOOKED, ""),
        ("good", rejected, "IDEMPOTENCY_KEY_REUSED"),
    ]
    # A refused record leaves its key free: fixed, it books.
    fixed = await settle(stub, c, [record(c, "unknown", [(c.cash[1], 1)])])
    assert fixed[0].outcome == pb.OFFLINE_OUTCOME_SHORTFALL and fixed[0].shortfall_fen == 1
    assert await ledger_db.fetchval("SELECT count(*) FROM transfers WHERE kind = 'offline_settlement'") == 2
    assert await refused(stub.SettleOffline(pb.SettleOfflineRequest(tenant_id=c.tenant_id))) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_RECORD_COUNT")
    await check_books(ledger_db)


async def test_two_hubs_uploading_the_same_records_at_once_book_them_once(
        ledger: RunningService, ledger_db: asyncpg.Connection) -> None:
    stub = ledger.stub
    c = await campus(stub, members=30)
    for n in range(30):
        await top_up(stub, c, c.cash[n], 100_000)
    rng = random.Random(11)
    records = [record(c, f"dev:{n}", [(c.cash[rng.randrange(30)], rng.randint(50, 500))], minute=n / 10)
               for n in range(600)]
    uploads = []
    for _ in range(6):
        order = records[:]
        rng.shuffle(order)
        uploads.append(order[:400])
    results = await asyncio.gather(*(settle(stub, c, u) for u in uploads))
    transfer_of: dict[str, str] = {}
    for result in results:
        for r in result:
            assert r.outcome in (pb.OFFLINE_OUTCOME_BOOKED, pb.OFFLINE_OUTCOME_DUPLICATE)
            assert transfer_of.setdefault(r.idempotency_key, r.transfer.transfer_id) == r.transfer.transfer_id
    assert await ledger_db.fetchval("SELECT count(*) FROM transfers WHERE kind = 'offline_settlement'") == \
        len(transfer_of)
    await check_books(ledger_db)
