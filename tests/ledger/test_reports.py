"""History pages, balances by owner, the trial balance, and the events a write sends."""

from __future__ import annotations

import json

import grpc

from onecard.ledger.v1 import ledger_pb2 as pb
from tests.conftest import RunningService
from tests.ledger.support import campus, grant, pay, refused, top_up
from tests.streams import read_exactly


async def test_history_pages_newest_first_and_ends(ledger: RunningService) -> None:
    stub = ledger.stub
    c = await campus(stub)
    await top_up(stub, c, c.cash[0], 10_000)
    paid = [(await pay(stub, c, [(c.cash[0], n + 1)])).transfer.transfer_id for n in range(7)]
    seen: list[str] = []
    token = ""
    while True:
        page = await stub.ListTransfers(pb.ListTransfersRequest(tenant_id=c.tenant_id, account_id=c.cash[0],
                                                                page_size=3, page_token=token))
        assert len(page.transfers) <= 3
        seen += [t.transfer_id for t in page.transfers]
        token = page.next_page_token
        if not token:
            break
    assert seen[:7] == list(reversed(paid))
    assert len(seen) == 8  # and the top-up, last
    other = await campus(stub)
    elsewhere = stub.ListTransfers(pb.ListTransfersRequest(tenant_id=other.tenant_id, account_id=c.cash[0]))
    assert await refused(elsewhere) == (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")
    too_big = stub.ListTransfers(pb.ListTransfersRequest(tenant_id=c.tenant_id, account_id=c.cash[0],
                                                         page_size=10_000))
    assert len((await too_big).transfers) == 8  # capped at 200, and there are 8


async def test_balances_by_owner_and_the_trial_balance(ledger: RunningService) -> None:
    stub = ledger.stub
    c = await campus(stub)
    await top_up(stub, c, c.cash[0], 1000)
    await grant(stub, c, c.subsidy[0], 500)
    await pay(stub, c, [(c.subsidy[0], 200), (c.cash[0], 100)])
    mine = await stub.GetBalances(pb.GetBalancesRequest(tenant_id=c.tenant_id, owner_kind=pb.OWNER_KIND_MEMBER,
                                                        owner_id="m0"))
    got = {a.account.purse_kind: a.balance.available_fen for a in mine.accounts}
    assert got == {pb.PURSE_KIND_CASH: 900, pb.PURSE_KIND_SUBSIDY: 300}
    trial = await stub.TrialBalance(pb.TrialBalanceRequest(tenant_id=c.tenant_id))
    assert trial.balanced and trial.postings_sum_fen == 0 and trial.balances_sum_fen == 0
    totals = {t.purse_kind: t.posted_fen for t in trial.totals}
    assert totals[pb.PURSE_KIND_BANK_CLEARING] == -1000
    assert totals[pb.PURSE_KIND_SUBSIDY_FUNDING] == -500
    assert totals[pb.PURSE_KIND_MERCHANT_SETTLEMENT] == 300
    assert totals[pb.PURSE_KIND_CASH] == 900 and totals[pb.PURSE_KIND_SUBSIDY] == 300


async def test_writes_send_their_events_through_the_outbox(ledger: RunningService, nats_url: str) -> None:
    stub = ledger.stub
    c = await campus(stub)
    topped = await top_up(stub, c, c.cash[0], 1000)
    held = await stub.CreateHold(pb.CreateHoldRequest(tenant_id=c.tenant_id, idempotency_key="h",
                                                      account_id=c.cash[0], merchant_account_id=c.merchant_id,
                                                      amount_fen=300))
    await stub.CaptureHold(pb.CaptureHoldRequest(tenant_id=c.tenant_id, idempotency_key="c",
                                                 hold_id=held.hold.hold_id, amount_fen=100))
    messages = await read_exactly(nats_url, stream="LEDGER", subjects="ledger.>", count=4)
    events = [(m.subject, json.loads(m.data)) for m in messages]
    subjects = [s for s, _ in events]
    assert subjects == ["ledger.transfer.posted", "ledger.hold.created", "ledger.hold.captured",
                        "ledger.transfer.posted"]
    first = events[0][1]
    assert first["tenant_id"] == c.tenant_id
    assert first["data"]["transfer_id"] == topped.transfer.transfer_id
    assert first["data"]["amount_fen"] == 1000 and first["data"]["kind"] == "top_up"
    assert events[2][1]["data"]["hold_status"] == "captured"
