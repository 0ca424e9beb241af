"""Top-ups, payments from several purses, and refunds: the money moves and the books balance."""

from __future__ import annotations

import uuid

import grpc

from onecard.ledger.v1 import ledger_pb2 as pb
from tests.conftest import RunningService
from tests.ledger.support import balance, balances_by_id, campus, check_books, grant, pay, refused, top_up


async def test_top_up_then_pay_from_two_purses_answers_the_new_balances(ledger: RunningService, ledger_db) -> None:
    stub = ledger.stub
    c = await campus(stub)
    topped = await top_up(stub, c, c.cash[0], 1000)
    assert balances_by_id(topped.balances)[c.cash[0]] == (1000, 0, 1000)
    assert balances_by_id(topped.balances)[c.bank_id] == (-1000, 0, -1000)
    await stub.TopUp(pb.TopUpRequest(tenant_id=c.tenant_id, idempotency_key="sub-1", from_account_id=c.bank_id,
                                     to_account_id=c.cash[1], amount_fen=1))
    paid = await pay(stub, c, [(c.cash[0], 300)])
    assert paid.transfer.kind == pb.TRANSFER_KIND_PAYMENT
    assert sum(p.amount_fen for p in paid.transfer.postings) == 0
    got = balances_by_id(paid.balances)
    assert got[c.cash[0]] == (700, 0, 700)
    assert got[c.merchant_id] == (300, 0, 300)
    await check_books(ledger_db)


async def test_a_payment_short_on_one_purse_moves_nothing(ledger: RunningService, ledger_db) -> None:
    stub = ledger.stub
    c = await campus(stub)
    await top_up(stub, c, c.cash[0], 500)
    code, reason = await refused(pay(stub, c, [(c.cash[0], 100), (c.subsidy[0], 100)]))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_FUNDS")
    assert (await balance(stub, c.tenant_id, c.cash[0])).posted_fen == 500
    assert (await balance(stub, c.tenant_id, c.merchant_id)).posted_fen == 0
    assert await ledger_db.fetchval("SELECT count(*) FROM transfers WHERE kind = 'payment'") == 0


async def test_legs_of_two_members_are_refused(ledger: RunningService) -> None:
    stub = ledger.stub
    c = await campus(stub)
    await top_up(stub, c, c.cash[0], 500)
    await top_up(stub, c, c.cash[1], 500)
    code, reason = await refused(pay(stub, c, [(c.cash[0], 100), (c.cash[1], 100)]))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "LEGS_OF_MANY_OWNERS")


async def test_refunds_return_money_in_parts_and_never_more_than_paid(ledger: RunningService, ledger_db) -> None:
    stub = ledger.stub
    c = await campus(stub)
    await top_up(stub, c, c.cash[0], 1000)
    paid = await pay(stub, c, [(c.cash[0], 600)])
    payment_id = paid.transfer.transfer_id

    def refund(amount_fen: int, key: str):  # noqa: ANN202
        return stub.Refund(pb.RefundRequest(tenant_id=c.tenant_id, idempotency_key=key,
                                            payment_transfer_id=payment_id, amount_fen=amount_fen))

    first = await refund(200, "r1")
    assert first.transfer.kind == pb.TRANSFER_KIND_REFUND
    assert first.transfer.original_transfer_id == payment_id
    assert balances_by_id(first.balances)[c.cash[0]][0] == 600
    # The same key again is the same refund, not a second one.
    again = await refund(200, "r1")
    assert again.transfer.transfer_id == first.transfer.transfer_id
    assert (await balance(stub, c.tenant_id, c.cash[0])).posted_fen == 600
    assert await refused(refund(401, "r2")) == (grpc.StatusCode.FAILED_PRECONDITION, "REFUND_EXCEEDS_PAYMENT")
    rest = await refund(0, "r3")
    assert rest.transfer.amount_fen == 400
    assert await refused(refund(1, "r4")) == (grpc.StatusCode.FAILED_PRECONDITION, "ALREADY_REFUNDED")
    assert (await balance(stub, c.tenant_id, c.cash[0])).posted_fen == 1000
    assert (await balance(stub, c.tenant_id, c.merchant_id)).posted_fen == 0
    await check_books(ledger_db)


async def test_a_refund_returns_to_the_purse_drawn_last_first(ledger: RunningService, ledger_db) -> None:
    stub = ledger.stub
    c = await campus(stub)
    await top_up(stub, c, c.cash[0], 1000)
    granted = await grant(stub, c, c.subsidy[0], 300)
    assert granted.transfer.kind == pb.TRANSFER_KIND_SUBSIDY_GRANT
    # Subsidy first, then cash: the usual funding order.
    paid = await pay(stub, c, [(c.subsidy[0], 300), (c.cash[0], 200)])
    got = balances_by_id(paid.balances)
    assert got[c.subsidy[0]] == (0, 0, 0) and got[c.cash[0]] == (800, 0, 800) and got[c.merchant_id][0] == 500

    def refund(amount_fen: int, key: str):  # noqa: ANN202
        return stub.Refund(pb.RefundRequest(tenant_id=c.tenant_id, idempotency_key=key,
                                            payment_transfer_id=paid.transfer.transfer_id, amount_fen=amount_fen))

    first = await refund(250, "r1")
    assert {p.account_id: p.amount_fen for p in first.transfer.postings} == {
        c.merchant_id: -250, c.cash[0]: 200, c.subsidy[0]: 50}
    second = await refund(0, "r2")
    assert {p.account_id: p.amount_fen for p in second.transfer.postings} == {c.merchant_id: -250, c.subsidy[0]: 250}
    assert (await balance(stub, c.tenant_id, c.subsidy[0])).posted_fen == 300
    await check_books(ledger_db)


async def test_top_up_routes_are_bank_to_cash_and_funding_to_subsidy(ledger: RunningService) -> None:
    stub = ledger.stub
    c = await campus(stub)
    assert await refused(top_up(stub, c, c.subsidy[0], 100)) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                                   "WRONG_ACCOUNT_KIND")
    assert await refused(grant(stub, c, c.cash[0], 100)) == (grpc.StatusCode.INVALID_ARGUMENT, "WRONG_ACCOUNT_KIND")


async def test_concurrent_refunds_of_one_payment_never_exceed_it(ledger: RunningService, ledger_db) -> None:
    import asyncio

    stub = ledger.stub
    c = await campus(stub)
    await top_up(stub, c, c.cash[0], 1000)
    paid = await pay(stub, c, [(c.cash[0], 1000)])
    calls = [stub.Refund(pb.RefundRequest(tenant_id=c.tenant_id, idempotency_key=f"r{n}",
                                          payment_transfer_id=paid.transfer.transfer_id, amount_fen=300))
             for n in range(8)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    ok = [r for r in results if not isinstance(r, Exception)]
    assert len(ok) == 3
    for r in results:
        if isinstance(r, grpc.aio.AioRpcError):
            assert r.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (await balance(stub, c.tenant_id, c.cash[0])).posted_fen == 900
    await check_books(ledger_db)


async def test_a_sponsor_pays_a_benefit_and_a_refund_returns_to_it(ledger: RunningService, ledger_db) -> None:
    stub = ledger.stub
    c = await campus(stub, members=1)
    await top_up(stub, c, c.cash[0], 1000)

    def sponsored(key: str, sponsor: str, sponsor_fen: int, legs: list[tuple[str, int]]) -> object:
        return stub.Pay(pb.PayRequest(tenant_id=c.tenant_id, idempotency_key=key, merchant_account_id=c.merchant_id,
                                      legs=[pb.PayLeg(account_id=a, amount_fen=f) for a, f in legs],
                                      sponsor=pb.PayLeg(account_id=sponsor, amount_fen=sponsor_fen)))

    free = await sponsored("bf", c.funding_id, 800, [])
    assert {p.account_id: p.amount_fen for p in free.transfer.postings} == {c.funding_id: -800, c.merchant_id: 800}
    part = await sponsored("half", c.funding_id, 300, [(c.cash[0], 200)])
    assert part.transfer.amount_fen == 500
    assert (await balance(stub, c.tenant_id, c.cash[0])).posted_fen == 800
    refund = await stub.Refund(pb.RefundRequest(tenant_id=c.tenant_id, idempotency_key="r",
                                                payment_transfer_id=part.transfer.transfer_id, amount_fen=400))
    assert {p.account_id: p.amount_fen for p in refund.transfer.postings if p.amount_fen > 0} == {
        c.funding_id: 300, c.cash[0]: 100}
    # Only a subsidy funding account sponsors.
    assert await refused(sponsored("bad", c.bank_id, 100, [])) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                                  "WRONG_ACCOUNT_KIND")
    assert await refused(stub.Pay(pb.PayRequest(tenant_id=c.tenant_id, idempotency_key="none",
                                                merchant_account_id=c.merchant_id))) == (
        grpc.StatusCode.INVALID_ARGUMENT, "NO_LEGS")
    await check_books(ledger_db)


async def test_member_state_in_one_read(ledger: RunningService) -> None:
    stub = ledger.stub
    c = await campus(stub, members=1)
    await top_up(stub, c, c.cash[0], 1000)
    await stub.Pay(pb.PayRequest(tenant_id=c.tenant_id, idempotency_key="g", merchant_account_id=c.merchant_id,
                                 legs=[pb.PayLeg(account_id=c.cash[0], amount_fen=300)],
                                 guards=[pb.Guard(counter_key="day:m0", increment=300, limit=5000)]))
    state = await stub.GetMemberState(pb.GetMemberStateRequest(tenant_id=c.tenant_id, member_id="m0",
                                                               counter_keys=["day:m0", "never"]))
    assert {a.account.account_id: a.balance.available_fen for a in state.accounts} == {c.cash[0]: 700,
                                                                                       c.subsidy[0]: 0}
    assert [(x.counter_key, x.value) for x in state.counters] == [("day:m0", 300), ("never", 0)]
    other = await stub.GetMemberState(pb.GetMemberStateRequest(tenant_id=str(uuid.uuid4()), member_id="m0"))
    assert not other.accounts


async def test_member_states_answer_many_questions_each_alone(ledger: RunningService) -> None:
    stub = ledger.stub
    a, b = await campus(stub, members=2), await campus(stub, members=1)
    await top_up(stub, a, a.cash[0], 100, key="a-top", key_scope="client:oc_a")
    await top_up(stub, a, a.cash[1], 200)
    await top_up(stub, b, b.cash[0], 300)
    answer = await stub.GetMemberStates(pb.GetMemberStatesRequest(requests=[
        pb.GetMemberStateRequest(tenant_id=a.tenant_id, member_id="m1", counter_keys=["x", "y"]),
        pb.GetMemberStateRequest(tenant_id=b.tenant_id, member_id="m0", idempotency_key="a-top",
                                 key_scope="client:oc_a"),
        pb.GetMemberStateRequest(tenant_id=a.tenant_id, member_id="m0", idempotency_key="a-top",
                                 key_scope="client:oc_a"),
        pb.GetMemberStateRequest(tenant_id=a.tenant_id, member_id="nobody"),
    ]))
    cash = [{x.account.account_id: x.balance.posted_fen for x in r.accounts
             if x.account.purse_kind == pb.PURSE_KIND_CASH} for r in answer.responses]
    assert cash == [{a.cash[1]: 200}, {b.cash[0]: 300}, {a.cash[0]: 100}, {}]
    assert [(c.counter_key, c.value) for c in answer.responses[0].counters] == [("x", 0), ("y", 0)]
    # The key is tenant a's client's: found there, not in tenant b.
    assert [r.existing_transfer_id != "" for r in answer.responses] == [False, False, True, False]
    assert await refused(stub.GetMemberStates(pb.GetMemberStatesRequest())) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                                               "INVALID_QUERY")
