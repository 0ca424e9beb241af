"""Hypothesis over random operation sequences against a reference model: balances match the
model, the books balance (every transfer and the whole ledger sum to zero, caches equal postings,
no purse below zero), a repeated key answers the first result, a reused key changes nothing.

Hypothesis runs its examples synchronously, so the property runs in a worker thread and sends
each call to the test's event loop, where the gRPC channel lives.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from hypothesis import HealthCheck, given, settings
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import strategies as st

from onecard.ledger.v1 import ledger_pb2 as pb
from runtime.grpc_client import error_info
from tests.conftest import RunningService
from tests.ledger.support import Campus, campus, check_books

T = TypeVar("T")
MEMBERS = 2
AMOUNTS = st.integers(min_value=1, max_value=1500)
# Never produced by AMOUNTS, so a request under a reused key always differs from the first.
REUSED_AMOUNT_FEN = 777_777

member = st.integers(min_value=0, max_value=MEMBERS - 1)
index = st.integers(min_value=0, max_value=20)
operations = st.one_of(
    st.tuples(st.just("top_up"), member, AMOUNTS),
    st.tuples(st.just("grant"), member, AMOUNTS),
    st.tuples(st.just("pay"), member, st.integers(0, 1500), st.integers(0, 1500)),
    st.tuples(st.just("refund"), index, st.integers(0, 1500)),
    st.tuples(st.just("hold"), member, AMOUNTS),
    st.tuples(st.just("capture"), index, st.integers(0, 1500)),
    st.tuples(st.just("void"), index),
    st.tuples(st.just("repeat"), index),
    st.tuples(st.just("reuse"), index),
    st.tuples(st.just("offline"), member, st.integers(0, 1500), st.integers(0, 1500)),
    st.tuples(st.just("clawback"), member, st.integers(0, 1500)),
)


# The client the model's top-ups, payments, refunds and clawbacks are written for.
CLIENT = "client:oc_model"

@dataclass
class Model:
    """What the ledger should hold, computed the plain way."""

    cash: list[int] = field(default_factory=lambda: [0] * MEMBERS)
    subsidy: list[int] = field(default_factory=lambda: [0] * MEMBERS)
    pending: list[int] = field(default_factory=lambda: [0] * MEMBERS)
    # What offline payments could not take from the purses (negative: owed by the member).
    receivable: list[int] = field(default_factory=lambda: [0] * MEMBERS)
    merchant: int = 0
    bank: int = 0
    funding: int = 0
    # payment transfer id -> [member, [(purse, paid, refunded)] in leg order]
    payments: list[tuple[str, int, list[list[Any]]]] = field(default_factory=list)
    # [hold id, member, amount, pending?]
    holds: list[list[Any]] = field(default_factory=list)
    # (resend, transfer id, balances answered)
    # (resend, transfer id, balances, key, key scope)
    writes: list[tuple[Callable[[str], Awaitable[Any]], str, Any, str, str]] = field(default_factory=list)


def _reason(exc: grpc.aio.AioRpcError) -> str | None:
    return error_info(exc)[0]


class Runner:
    def __init__(self, stub: Any, loop: asyncio.AbstractEventLoop):
        self.stub = stub
        self.loop = loop

    def run(self, make: Callable[[], Awaitable[T]]) -> T:
        """Run ``make()`` on the loop: gRPC calls must be created there, not in this thread."""

        async def go() -> T:
            return await make()

        return asyncio.run_coroutine_threadsafe(go(), self.loop).result(timeout=60)

    def call(self, make: Callable[[], Awaitable[T]]) -> tuple[T | None, str | None]:
        try:
            return self.run(make), None
        except grpc.aio.AioRpcError as exc:
            return None, _reason(exc)


def run_sequence(r: Runner, c: Campus, ops: list[tuple], *, seen: Counter[str]) -> None:  # noqa: C901
    m = Model()
    stub = r.stub

    def write(result: Any, resend: Callable[[str], Awaitable[Any]], key: str) -> None:
        seen["written"] += 1
        m.writes.append((resend, result.transfer.transfer_id, list(result.balances), key,
                         result.transfer.key_scope))

    for op in ops:
        kind = op[0]
        seen[kind] += 1
        key = str(uuid.uuid4())
        if kind in ("top_up", "grant"):
            _, n, amount = op
            source, target = (c.bank_id, c.cash[n]) if kind == "top_up" else (c.funding_id, c.subsidy[n])

            def send(k: str, source=source, target=target, amount=amount) -> Awaitable[Any]:  # noqa: ANN001
                return stub.TopUp(pb.TopUpRequest(tenant_id=c.tenant_id, idempotency_key=k, key_scope=CLIENT,
                                                  from_account_id=source,
                                                  to_account_id=target, amount_fen=amount))

            result, reason = r.call(lambda: send(key))
            assert reason is None, reason
            write(result, send, key)
            if kind == "top_up":
                m.cash[n] += amount
                m.bank -= amount
            else:
                m.subsidy[n] += amount
                m.funding -= amount
        elif kind == "pay":
            _, n, from_subsidy, from_cash = op
            legs = [(c.subsidy[n], "subsidy", from_subsidy), (c.cash[n], "cash", from_cash)]
            legs = [leg for leg in legs if leg[2] > 0]
            if not legs:
                continue

            def send(k: str, legs=legs) -> Awaitable[Any]:  # noqa: ANN001
                return stub.Pay(pb.PayRequest(tenant_id=c.tenant_id, idempotency_key=k, key_scope=CLIENT,
                                              merchant_account_id=c.merchant_id,
                                              legs=[pb.PayLeg(account_id=a, amount_fen=f) for a, _, f in legs]))

            affordable = all(
                f <= (m.subsidy[n] if purse == "subsidy" else m.cash[n] - m.pending[n]) for _, purse, f in legs)
            result, reason = r.call(lambda: send(key))
            if not affordable:
                assert reason == "INSUFFICIENT_FUNDS", reason
                continue
            assert reason is None, reason
            write(result, send, key)
            for _, purse, f in legs:
                if purse == "subsidy":
                    m.subsidy[n] -= f
                else:
                    m.cash[n] -= f
                m.merchant += f
            m.payments.append((result.transfer.transfer_id, n, [[purse, f, 0] for _, purse, f in legs]))
        elif kind == "refund":
            _, i, amount = op
            if not m.payments:
                continue
            payment_id, n, legs = m.payments[i % len(m.payments)]

            def send(k: str, payment_id=payment_id, amount=amount) -> Awaitable[Any]:  # noqa: ANN001
                return stub.Refund(pb.RefundRequest(tenant_id=c.tenant_id, idempotency_key=k, key_scope=CLIENT,
                                                    payment_transfer_id=payment_id, amount_fen=amount))

            rest = sum(paid - back for _, paid, back in legs)
            result, reason = r.call(lambda: send(key))
            if rest == 0:
                assert reason == "ALREADY_REFUNDED", reason
                continue
            if amount > rest:
                assert reason == "REFUND_EXCEEDS_PAYMENT", reason
                continue
            assert reason is None, reason
            write(result, send, key)
            remaining = amount or rest
            for leg in reversed(legs):
                take = min(leg[1] - leg[2], remaining)
                leg[2] += take
                remaining -= take
                if leg[0] == "subsidy":
                    m.subsidy[n] += take
                elif leg[0] == "receivable":
                    m.receivable[n] += take
                else:
                    m.cash[n] += take
                m.merchant -= take
        elif kind == "hold":
            _, n, amount = op

            def send(k: str, n=n, amount=amount) -> Awaitable[Any]:  # noqa: ANN001
                return stub.CreateHold(pb.CreateHoldRequest(tenant_id=c.tenant_id, idempotency_key=k,
                                                            account_id=c.cash[n], merchant_account_id=c.merchant_id,
                                                            amount_fen=amount, timeout_s=600))

            result, reason = r.call(lambda: send(key))
            if amount > m.cash[n] - m.pending[n]:
                assert reason == "INSUFFICIENT_FUNDS", reason
                continue
            assert reason is None, reason
            write(result, send, key)
            m.pending[n] += amount
            m.holds.append([result.hold.hold_id, n, amount, True])
        elif kind in ("capture", "void"):
            if not m.holds:
                continue
            h = m.holds[op[1] % len(m.holds)]
            hold_id, n, held, open_ = h
            amount = op[2] if kind == "capture" else 0

            def send(k: str, hold_id=hold_id, amount=amount, kind=kind) -> Awaitable[Any]:  # noqa: ANN001
                if kind == "capture":
                    return stub.CaptureHold(pb.CaptureHoldRequest(tenant_id=c.tenant_id, idempotency_key=k,
                                                                  hold_id=hold_id, amount_fen=amount))
                return stub.VoidHold(pb.VoidHoldRequest(tenant_id=c.tenant_id, idempotency_key=k, hold_id=hold_id))

            result, reason = r.call(lambda: send(key))
            if not open_:
                assert reason == "HOLD_NOT_PENDING", reason
                continue
            if kind == "capture" and amount > held:
                assert reason == "CAPTURE_EXCEEDS_HOLD", reason
                continue
            assert reason is None, reason
            write(result, send, key)
            h[3] = False
            m.pending[n] -= held
            if kind == "capture":
                taken = amount or held
                m.cash[n] -= taken
                m.merchant += taken
                m.payments.append((result.transfer.transfer_id, n, [["cash", taken, 0]]))
        elif kind == "offline":
            _, n, from_subsidy, from_cash = op
            legs = [(c.subsidy[n], "subsidy", from_subsidy), (c.cash[n], "cash", from_cash)]
            legs = [leg for leg in legs if leg[2] > 0]
            if not legs:
                continue
            stamp = Timestamp()
            stamp.FromSeconds(1_764_000_000 + seen["offline"])
            record = pb.OfflineRecord(idempotency_key=key, merchant_account_id=c.merchant_id, device_id="pos-9",
                                      legs=[pb.PayLeg(account_id=a, amount_fen=f) for a, _, f in legs],
                                      event_time=stamp)
            request = pb.SettleOfflineRequest(tenant_id=c.tenant_id, records=[record])
            result, reason = r.call(lambda: stub.SettleOffline(request))
            assert reason is None, reason
            [answer] = result.results
            # Each purse gives what it can of its leg; the member's receivable takes the rest.
            paid: list[list[Any]] = []
            short = 0
            for _, purse, f in legs:
                has = m.subsidy[n] if purse == "subsidy" else m.cash[n] - m.pending[n]
                take = min(has, f)
                short += f - take
                if take:
                    paid.append([purse, take, 0])
                if purse == "subsidy":
                    m.subsidy[n] -= take
                else:
                    m.cash[n] -= take
            if short:
                paid.append(["receivable", short, 0])
                m.receivable[n] -= short
            m.merchant += sum(f for _, _, f in legs)
            seen["written"] += 1
            want = pb.OFFLINE_OUTCOME_SHORTFALL if short else pb.OFFLINE_OUTCOME_BOOKED
            assert (answer.outcome, answer.shortfall_fen) == (want, short)
            m.payments.append((answer.transfer.transfer_id, n, paid))
            again, reason = r.call(lambda: stub.SettleOffline(request))
            assert reason is None, reason
            assert (again.results[0].outcome, again.results[0].transfer.transfer_id, again.results[0].shortfall_fen) \
                == (pb.OFFLINE_OUTCOME_DUPLICATE, answer.transfer.transfer_id, short)
        elif kind == "clawback":
            _, n, amount = op

            def send(k: str, n=n, amount=amount) -> Awaitable[Any]:  # noqa: ANN001
                return stub.Clawback(pb.ClawbackRequest(tenant_id=c.tenant_id, idempotency_key=k, key_scope=CLIENT,
                                                        account_id=c.subsidy[n], amount_fen=amount))

            result, reason = r.call(lambda: send(key))
            if m.subsidy[n] == 0 or amount > m.subsidy[n]:
                assert reason == "INSUFFICIENT_FUNDS", reason
                continue
            assert reason is None, reason
            write(result, send, key)
            taken = amount or m.subsidy[n]
            m.subsidy[n] -= taken
            m.funding += taken
        elif kind == "repeat":
            if not m.writes:
                continue
            resend, transfer_id, balances, first_key, _scope = m.writes[op[1] % len(m.writes)]
            result, reason = r.call(lambda: resend(first_key))
            assert reason is None, reason
            assert result.transfer.transfer_id == transfer_id
            assert list(result.balances) == balances, "a repeat answers the balances of the first result"
        elif kind == "reuse":
            if not m.writes:
                continue
            # A key of the model client's (its top-ups, payments, refunds, clawbacks): holds are
            # the till's keys, in another scope, which the gateway may not name.
            theirs = [w for w in m.writes if w[4] == CLIENT]
            if not theirs:
                continue
            first_key = theirs[op[1] % len(theirs)][3]
            _, reason = r.call(lambda: stub.TopUp(pb.TopUpRequest(
                tenant_id=c.tenant_id, idempotency_key=first_key, key_scope=CLIENT, from_account_id=c.bank_id,
                to_account_id=c.cash[0], amount_fen=REUSED_AMOUNT_FEN)))
            assert reason == "IDEMPOTENCY_KEY_REUSED", reason

    got = r.run(lambda: stub.GetBalances(pb.GetBalancesRequest(
        tenant_id=c.tenant_id, account_ids=[c.bank_id, c.funding_id, c.merchant_id, *c.cash, *c.subsidy])))
    posted = {a.account.account_id: (a.balance.posted_fen, a.balance.pending_fen) for a in got.accounts}
    expected = {c.bank_id: (m.bank, 0), c.funding_id: (m.funding, 0), c.merchant_id: (m.merchant, 0)}
    for n in range(MEMBERS):
        expected[c.cash[n]] = (m.cash[n], m.pending[n])
        expected[c.subsidy[n]] = (m.subsidy[n], 0)
    assert posted == expected
    for n in range(MEMBERS):
        owned = r.run(lambda n=n: stub.GetBalances(pb.GetBalancesRequest(
            tenant_id=c.tenant_id, owner_kind=pb.OWNER_KIND_MEMBER, owner_id=f"m{n}")))
        receivable = [a.balance.posted_fen for a in owned.accounts if a.account.purse_kind == pb.PURSE_KIND_RECEIVABLE]
        assert sum(receivable) == m.receivable[n]
    trial = r.run(lambda: stub.TrialBalance(pb.TrialBalanceRequest(tenant_id=c.tenant_id)))
    assert trial.balanced


async def test_random_operation_sequences_keep_the_books(ledger: RunningService, ledger_db) -> None:
    loop = asyncio.get_running_loop()
    r = Runner(ledger.stub, loop)

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=False)
    @given(ops=st.lists(operations, min_size=2, max_size=16))
    def prop(ops: list[tuple]) -> None:
        c = r.run(lambda: campus(ledger.stub, members=MEMBERS))
        r.run(lambda: ledger.stub.DefineProgram(pb.DefineProgramRequest(
            tenant_id=c.tenant_id, purse_kind=pb.PURSE_KIND_SUBSIDY, ref="meal-2026", funding_account_id=c.funding_id)))
        run_sequence(r, c, ops, seen=seen)

    seen: Counter[str] = Counter()
    await asyncio.to_thread(prop)
    # The property really ran: many writes, and every kind of operation.
    assert seen["written"] > 150, seen
    assert all(seen[kind] for kind in ("top_up", "grant", "pay", "refund", "hold", "capture", "void", "repeat",
                                       "reuse", "offline", "clawback")), seen
    await check_books(ledger_db)
