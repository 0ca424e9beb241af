"""The policy service's Evaluate against a bare gRPC echo, and the pure evaluator in process.

``policy.evaluate_vs_echo_ratio``: Evaluate calls per second through PolicyService (the published
Demo University rule set, MEMBERS members picked at random), divided by the calls per second of
``bench.echo`` (a gRPC server built like every service's, answering the request's bytes), both
with the same client, the same concurrency and the same time, in the same run; the echo is sent
the serialized EvaluateRequest, so both carry the same request bytes. The echo is measured before
and after Evaluate and the baseline is the mean of the two, so a machine whose speed drifts during
the run (a checkpoint or vacuum after the benchmark before) moves both sides alike. It says what a
plan costs on top of gRPC itself (the floor is 1.0). Both sides are called as the device hub, over
mutual TLS, each server checking the caller against its allow-list: TLS is on both sides.

Evaluate reads through policy's member-state cache, as it does in production (the service's
default ``member_state_cache_s``): a member's purses and counters read from the ledger are reused
until the ledger's events say they changed or the entry ages out; the tenant's published version
comes from its own short cache. So that the cache is measured under invalidations and not on a
frozen ledger, a background payer keeps paying while Evaluate is measured (warm-up included):
PAYMENTS_PER_S dinner payments of random bench members, each planned by Evaluate and booked with
LedgerService.Pay with the plan's legs and guards (its ``ledger.transfer.posted`` names the
member's cash purse and the day's counters that the lunch evaluations hold). Its calls are not
counted in either rate.
``policy.evaluate_cache_hit_ratio``: of the member-state lookups of the measured Evaluate run, the
share answered from the cache (the rest read the ledger: never read, aged out, or dropped by a
payment's event), from the policy process's Prometheus counters.
Because the background payer books money, the ledger and policy run on the bench's durable
PostgreSQL (fsync and synchronous_commit on), in a database of their own; the echo has none.
``policy.evaluate_payments``: the background payments booked during the measured run.
``policy.evaluate_p99_ms`` / ``policy.echo_p99_ms``: client-side latency at that load.
The ``*_cpu_ratio`` figures (CPU seconds per second of load of the policy, ledger and echo
processes and of the load client) say where the time went.
``policy.evaluate_inproc_p99_us`` / ``_p50_us``: ``onecard_policy.evaluate`` alone on
``university_rule_set()``, in this process, over a mix of payments (lunch, a dinner voucher, a free
breakfast, a store coupon, a decline), the counters and purses prepared beforehand.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import statistics
import time
import urllib.request
import uuid
from datetime import datetime
from zoneinfo import ZoneInfo

from google.protobuf.timestamp_pb2 import Timestamp
from onecard_policy.evaluate import PurseState, Request, counter_keys, evaluate
from onecard_policy.examples import university_rule_set
from onecard_policy.rules import parse_rule_set

from bench.echo import ECHO_METHOD
from bench.harness import BenchContext, BenchService, Figures, benchmark, process_cpu_s
from bench.load import closed_loop_calls
from bench.serve import BENCH_HOST
from devstack.servers import free_port
from onecard.ledger.v1 import ledger_pb2 as lpb
from onecard.ledger.v1 import ledger_pb2_grpc
from onecard.policy.v1 import policy_pb2 as pb
from onecard.policy.v1 import policy_pb2_grpc

# A fixed bench master key: the bench database is thrown away after the run.
BENCH_MASTER_KEY = "43" * 32
# The callers the bench stands in for, each one the method's allow-list names: the gateway sets the
# tenant up (accounts, top-ups, the rule set), the device hub asks for plans (Evaluate, and the
# echo, its floor), and the background payer books as policy does (LedgerService.Pay).
ADMIN = "gateway"
PLANNER = "devicehub"
PAYER = "policy"
CALL_TIMEOUT_S = 60.0
MEMBERS = 200
SETUP_CONCURRENCY = 16
CASH_FEN = 100_000
# What the bench's bank may owe (its clearing account's credit limit): more than its members hold.
BANK_CREDIT_LIMIT_FEN = 10**12
SHANGHAI = ZoneInfo("Asia/Shanghai")
LUNCH = datetime(2026, 11, 26, 12, 0, tzinfo=SHANGHAI)
DINNER = datetime(2026, 11, 26, 18, 0, tzinfo=SHANGHAI)
# The background payer: payments per second while Evaluate is measured, and what each pays.
PAYMENTS_PER_S = 5.0
PAYMENT_FEN = 100
LOOKUPS_METRIC = "onecard_policy_member_state_cache_lookups_total"
INPROC_CALLS = 20_000
INPROC_WARMUP_CALLS = 2_000


async def _echo_server(context: BenchContext) -> BenchService:
    """The echo over mutual TLS with its own certificate, as a service of the mesh."""
    port = free_port()
    target = f"{BENCH_HOST}:{port}"
    process = await context.start_process(name="echo", module_args=["bench.echo", "--port", str(port)],
                                          env=context.process_env("echo"),
                                          probe=context.health_probe(target, server_name="echo"))
    assert process.pid is not None
    return BenchService(name="echo", target=target, pid=process.pid)


async def _open(stub: ledger_pb2_grpc.LedgerServiceStub, tenant_id: str, owner_kind: int, owner_id: str,
                purse_kind: int) -> str:
    answer = await stub.OpenAccount(lpb.OpenAccountRequest(tenant_id=tenant_id, owner_kind=owner_kind,
                                                           owner_id=owner_id, purse_kind=purse_kind),
                                    timeout=CALL_TIMEOUT_S)
    return answer.account.account.account_id


async def _seed(ledger: ledger_pb2_grpc.LedgerServiceStub, policy: policy_pb2_grpc.PolicyServiceStub
                ) -> tuple[str, str, list[str]]:
    """A tenant with a canteen, MEMBERS members with funded cash purses, the rule set published."""
    tenant_id = str(uuid.uuid4())
    bank = await _open(ledger, tenant_id, lpb.OWNER_KIND_TENANT, "bank", lpb.PURSE_KIND_BANK_CLEARING)
    # A new clearing account may owe nothing (prefunded only): let the bench's bank top up.
    await ledger.SetCreditLimit(lpb.SetCreditLimitRequest(tenant_id=tenant_id, account_id=bank,
                                                          credit_limit_fen=BANK_CREDIT_LIMIT_FEN))
    merchant = await _open(ledger, tenant_id, lpb.OWNER_KIND_MERCHANT, "canteen-north",
                           lpb.PURSE_KIND_MERCHANT_SETTLEMENT)
    members = [str(uuid.uuid4()) for _ in range(MEMBERS)]
    queue = list(members)

    async def worker() -> None:
        while queue:
            member = queue.pop()
            cash = await _open(ledger, tenant_id, lpb.OWNER_KIND_MEMBER, member, lpb.PURSE_KIND_CASH)
            await ledger.TopUp(lpb.TopUpRequest(tenant_id=tenant_id, idempotency_key=f"fund-{member}",
                                                from_account_id=bank, to_account_id=cash, amount_fen=CASH_FEN),
                               timeout=CALL_TIMEOUT_S)

    await asyncio.gather(*(worker() for _ in range(SETUP_CONCURRENCY)))
    doc = json.loads(json.dumps(university_rule_set()).replace('"canteen-north"', json.dumps(merchant)))
    created = await policy.CreateRuleSetVersion(pb.CreateRuleSetVersionRequest(
        tenant_id=tenant_id, document=json.dumps(doc), note="bench"), timeout=CALL_TIMEOUT_S)
    await policy.PublishRuleSetVersion(pb.PublishRuleSetVersionRequest(
        tenant_id=tenant_id, version=created.version.version, published_by="bench"), timeout=CALL_TIMEOUT_S)
    return tenant_id, merchant, members


def _requests(tenant_id: str, merchant: str, members: list[str]) -> list[pb.EvaluateRequest]:
    at = Timestamp()
    at.FromDatetime(LUNCH)
    return [pb.EvaluateRequest(tenant_id=tenant_id, request=pb.PaymentRequest(
        member_id=member, member_groups={"role": "student"}, scene="canteen", merchant_id=merchant,
        device_id="pos-north-1", amount_fen=1200, time=at)) for member in members]


def _metric_lines(text: str, name: str) -> dict[str, float]:
    """The samples of one counter in a Prometheus exposition, by their label text."""
    found = {}
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+(\S+)$", line)
        if match:
            found[match.group(1) or ""] = float(match.group(2))
    return found


async def _cache_lookups(metrics_url: str) -> dict[str, float]:
    """hit / absent / expired / keys / off: the policy process's member-state lookups so far."""
    def fetch() -> str:
        with urllib.request.urlopen(metrics_url, timeout=CALL_TIMEOUT_S) as answer:  # noqa: S310 - our own
            return answer.read().decode()

    text = await asyncio.to_thread(fetch)
    lookups = {}
    for labels, value in _metric_lines(text, LOOKUPS_METRIC).items():
        result = re.search(r'result="([^"]*)"', labels)
        if result:
            lookups[result.group(1)] = value
    return lookups


async def _pay_in_background(ledger: ledger_pb2_grpc.LedgerServiceStub, policy: policy_pb2_grpc.PolicyServiceStub,
                             tenant_id: str, merchant: str, members: list[str], booked: list[float]) -> None:
    """PAYMENTS_PER_S payments of random members until cancelled, each planned by Evaluate (a
    dinner, so the lunch plans the load asks for stay approved) and booked with its legs and
    guards; the time of each booking goes to ``booked``."""
    rng = random.Random(11)
    at = Timestamp()
    at.FromDatetime(DINNER)
    period = 1.0 / PAYMENTS_PER_S
    next_at = time.perf_counter()
    while True:
        next_at += period
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        member = members[rng.randrange(len(members))]
        plan = (await policy.Evaluate(pb.EvaluateRequest(tenant_id=tenant_id, request=pb.PaymentRequest(
            member_id=member, member_groups={"role": "student"}, scene="canteen", merchant_id=merchant,
            device_id="pos-north-2", amount_fen=PAYMENT_FEN, time=at)), timeout=CALL_TIMEOUT_S)).plan
        if not plan.approved:
            raise RuntimeError(f"the background payment was declined: {plan.reason}")
        await ledger.Pay(lpb.PayRequest(
            tenant_id=tenant_id, idempotency_key=str(uuid.uuid4()), merchant_account_id=merchant,
            legs=[lpb.PayLeg(account_id=leg.account_id, amount_fen=leg.amount_fen) for leg in plan.legs],
            guards=list(plan.guards), device_id="pos-north-2"), timeout=CALL_TIMEOUT_S)
        booked.append(time.perf_counter())


@benchmark("policy.evaluate_vs_echo",
           description="PolicyService.Evaluate (through its member-state cache, with payments going on) vs a bare "
                       "gRPC echo, same client")
async def evaluate_vs_echo(context: BenchContext) -> Figures:
    load = context.load
    # The background payer books money: the ledger and policy run on the durable server.
    database_url = context.fresh_database("policy_evaluate", durable=True)
    ledger_service = await context.start_grpc_service(name="ledger-policy", module="services.ledger",
                                                      database_url=database_url)
    metrics_port = free_port()
    policy_service = await context.start_grpc_service(name="policy", module="services.policy", env={
        "ONECARD_LEDGER_TARGET": ledger_service.target,
        "ONECARD_POLICY_MASTER_KEY": BENCH_MASTER_KEY,
        "ONECARD_METRICS_PORT": str(metrics_port),
    }, database_url=database_url)
    metrics_url = f"http://{BENCH_HOST}:{metrics_port}/metrics"
    echo_service = await _echo_server(context)
    ledger_pid, policy_pid, echo_pid = ledger_service.pid, policy_service.pid, echo_service.pid
    async with context.channel(ledger_service, as_=ADMIN) as ledger_admin_channel, \
            context.channel(ledger_service, as_=PAYER) as ledger_pay_channel, \
            context.channel(policy_service, as_=ADMIN) as policy_admin_channel, \
            context.channel(policy_service, as_=PLANNER) as policy_channel, \
            context.channel(echo_service, as_=PLANNER) as echo_channel:
        ledger_admin = ledger_pb2_grpc.LedgerServiceStub(ledger_admin_channel)
        ledger_payer = ledger_pb2_grpc.LedgerServiceStub(ledger_pay_channel)
        policy_admin = policy_pb2_grpc.PolicyServiceStub(policy_admin_channel)
        policy = policy_pb2_grpc.PolicyServiceStub(policy_channel)
        echo = echo_channel.unary_unary(ECHO_METHOD)
        tenant_id, merchant, members = await _seed(ledger_admin, policy_admin)
        requests = _requests(tenant_id, merchant, members)
        payloads = [r.SerializeToString() for r in requests]
        # One plan checked before measuring: approved, paid from the member's cash purse.
        plan = (await policy.Evaluate(requests[0], timeout=CALL_TIMEOUT_S)).plan
        if not (plan.approved and len(plan.legs) == 1 and plan.legs[0].amount_fen == 1200):
            raise RuntimeError(f"unexpected plan: {plan}")
        rng = random.Random(5)

        async def call_evaluate(_worker: int) -> bool:
            answer = await policy.Evaluate(requests[rng.randrange(len(requests))], timeout=CALL_TIMEOUT_S)
            return answer.plan.approved

        async def call_echo(_worker: int) -> bool:
            payload = payloads[rng.randrange(len(payloads))]
            return await echo(payload, timeout=CALL_TIMEOUT_S) == payload

        results = {}
        cpu: dict[str, float] = {}
        booked: list[float] = []
        lookups: dict[str, float] = {}
        measured = (0.0, 0.0)
        # Echo, Evaluate, echo again: the baseline is the mean of the runs either side, so a machine
        # that slows down or speeds up during the run (a checkpoint, another benchmark's vacuum)
        # moves both sides of the ratio alike.
        for name, call, pids in (("echo", call_echo, {"echo": echo_pid}),
                                 ("evaluate", call_evaluate, {"policy": policy_pid, "ledger": ledger_pid}),
                                 ("echo_after", call_echo, {"echo": echo_pid})):
            payer = None
            if name == "evaluate":
                payer = asyncio.ensure_future(_pay_in_background(ledger_payer, policy, tenant_id, merchant,
                                                                 members, booked))
            try:
                await closed_loop_calls(call=call, duration_s=load.warmup_s, concurrency=load.concurrency)
                if payer is not None:
                    lookups_before = await _cache_lookups(metrics_url)
                before = {who: process_cpu_s(pid) for who, pid in pids.items()}
                started = time.perf_counter()
                results[name] = await closed_loop_calls(call=call, duration_s=load.duration_s,
                                                        concurrency=load.concurrency)
                measured = (started, time.perf_counter()) if payer is not None else measured
                for who, pid in pids.items():
                    cpu[who] = (process_cpu_s(pid) - before[who]) / results[name].elapsed_s
                if payer is not None:
                    after = await _cache_lookups(metrics_url)
                    lookups = {k: after.get(k, 0.0) - lookups_before.get(k, 0.0) for k in after}
            finally:
                if payer is not None:
                    if payer.done():
                        payer.result()  # a payer that failed says why
                    payer.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await payer
    for name, result in results.items():
        if result.errors:
            raise RuntimeError(f"{name}: {result.errors} of {result.requests} calls failed")
    evaluate_rps = results["evaluate"].rps
    echo_rps = (results["echo"].rps + results["echo_after"].rps) / 2
    payments = sum(1 for t in booked if measured[0] <= t <= measured[1])
    if payments == 0:
        raise RuntimeError("no background payment was booked while Evaluate was measured")
    total_lookups = sum(lookups.values())
    return {
        "policy.evaluate_rps": evaluate_rps,
        "policy.echo_rps": echo_rps,
        "policy.evaluate_vs_echo_ratio": evaluate_rps / echo_rps if echo_rps else 0.0,
        "policy.evaluate_cache_hit_ratio": lookups.get("hit", 0.0) / total_lookups if total_lookups else 0.0,
        "policy.evaluate_payments": float(payments),
        "policy.evaluate_p99_ms": results["evaluate"].percentile_ms(0.99),
        "policy.echo_p99_ms": results["echo"].percentile_ms(0.99),
        "policy.evaluate_client_cpu_ratio": results["evaluate"].client_cpu_ratio,
        "policy.echo_client_cpu_ratio": results["echo"].client_cpu_ratio,
        # CPU seconds per second of load: where Evaluate's time goes on this machine.
        "policy.policy_cpu_ratio": cpu["policy"],
        "policy.ledger_cpu_ratio": cpu["ledger"],
        "policy.echo_cpu_ratio": cpu["echo"],
    }


def _inproc_cases() -> list[tuple[Request, dict[str, int]]]:
    rule_set = parse_rule_set(university_rule_set())
    member = str(uuid.UUID(int=7))
    cash = PurseState(kind="cash", ref="", available_fen=50_000)
    voucher = PurseState(kind="voucher", ref="dinner-voucher", available_fen=3000)
    nutrition = PurseState(kind="subsidy", ref="nutrition-2026", available_fen=6000)

    def at(hour: int, minute: int = 0) -> datetime:
        return datetime(2026, 11, 26, hour, minute, tzinfo=SHANGHAI)

    requests = [
        # lunch from cash, as a student
        Request(tenant_id="t", member_id=member, member_groups={"role": "student"}, scene="canteen",
                merchant_id="canteen-north", device_id="pos-north-1", amount_fen=1200, at=at(12), purses=(cash,)),
        # dinner: the voucher first, then cash
        Request(tenant_id="t", member_id=member, member_groups={"role": "student"}, scene="canteen",
                merchant_id="canteen-south", device_id="pos-south-1", amount_fen=2000, at=at(18),
                purses=(voucher, cash)),
        # a free breakfast for an employee
        Request(tenant_id="t", member_id=member, member_groups={"role": "employee"}, scene="canteen",
                merchant_id="canteen-north", device_id="pos-north-2", amount_fen=800, at=at(7, 30), purses=(cash,)),
        # the store coupon
        Request(tenant_id="t", member_id=member, member_groups={"role": "student"}, scene="store",
                merchant_id="campus-store", device_id="store-till-1", amount_fen=2500, at=at(15), purses=(cash,)),
        # milk on the nutrition subsidy, offline
        Request(tenant_id="t", member_id=member, member_groups={"role": "student"}, scene="vending",
                merchant_id="milk-cabinet", device_id="cabinet-1", amount_fen=350, at=at(10), channel="offline",
                purses=(nutrition, cash)),
        # declined: over the canteen's per-payment limit
        Request(tenant_id="t", member_id=member, member_groups={"role": "student"}, scene="canteen",
                merchant_id="canteen-north", device_id="pos-north-1", amount_fen=20_000, at=at(12), purses=(cash,)),
    ]
    cases = []
    for request in requests:
        # Some use already on the day's counters, as a busy lunch would have.
        counters = {key: 1 for key in counter_keys(rule_set, request)}
        cases.append((request, counters))
    return cases


@benchmark("policy.evaluate_inproc", description="onecard_policy.evaluate on university_rule_set(), in process")
async def evaluate_inproc(context: BenchContext) -> Figures:
    rule_set = parse_rule_set(university_rule_set())
    cases = _inproc_cases()
    for i in range(INPROC_WARMUP_CALLS):
        request, counters = cases[i % len(cases)]
        evaluate(rule_set, request, counters)
    times_us: list[float] = []
    clock = time.perf_counter_ns
    for i in range(INPROC_CALLS):
        request, counters = cases[i % len(cases)]
        started = clock()
        evaluate(rule_set, request, counters)
        times_us.append((clock() - started) / 1000)
        if i % 1000 == 999:
            await asyncio.sleep(0)
    ordered = sorted(times_us)
    return {
        "policy.evaluate_inproc_p99_us": ordered[int(0.99 * len(ordered))],
        "policy.evaluate_inproc_p50_us": statistics.median(ordered),
    }
