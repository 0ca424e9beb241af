"""The audit at the end of a chaos run: each check computed from the databases and the services'
APIs (the driver's own record is only what the tills were told), printed as a table.

``ledger_checks`` needs nothing but a connection to the ledger's schema, so a test can point it at
a scratch copy whose books it broke on purpose and see it fail.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncpg

from chaos.schedule import SERVICES
from onecard.ledger.v1 import ledger_pb2 as lpb
from tests.mesh import connect_nats
from tests.replicas.rush import SHARED_DURABLES

if TYPE_CHECKING:
    from chaos.rush import ChaosRush

SETTLE_TIMEOUT_S = 120.0
FINAL_OUTCOMES = ("booked", "shortfall", "duplicate", "code_reused", "rejected")
MEMBER_PURSES = ("cash", "subsidy", "voucher")
# The durable consumers whose every event must have had its effect once: (stream, durable, subjects),
# the same the replica tests check.
ONCE_DURABLES = SHARED_DURABLES


@dataclass(frozen=True)
class Check:
    name: str
    expected: str
    found: str
    passed: bool
    detail: str = ""


def table(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"{'check':<{width}}  {'expected':<22} {'found':<22} result"]
    for c in checks:
        lines.append(f"{c.name:<{width}}  {c.expected:<22} {c.found:<22} {'PASS' if c.passed else 'FAIL'}")
        if c.detail and not c.passed:
            lines.append(f"{'':<{width}}  {c.detail}")
    return "\n".join(lines)


async def ledger_checks(conn: asyncpg.Connection, tenant_id: uuid.UUID) -> list[Check]:
    """Postings sum to zero (the tenant's and every transfer's), cached balances equal the sum of
    postings, and no purse or merchant below zero, no clearing account past its credit limit."""
    total = await conn.fetchval("SELECT COALESCE(sum(amount_fen), 0) FROM ledger.postings WHERE tenant_id = $1",
                                tenant_id)
    lopsided = await conn.fetchval(
        "SELECT count(*) FROM (SELECT transfer_id FROM ledger.postings WHERE tenant_id = $1"
        " GROUP BY transfer_id HAVING sum(amount_fen) <> 0) t", tenant_id)
    off = await conn.fetch(
        "SELECT a.account_id, a.posted_fen + COALESCE(s.posted_fen, 0) AS cached, a.pending_fen,"
        "       COALESCE(p.posted_fen, 0) AS posted, COALESCE(p.pending_fen, 0) AS pending"
        "  FROM ledger.accounts a"
        "  LEFT JOIN (SELECT account_id, sum(posted_fen) AS posted_fen FROM ledger.account_shards"
        "             GROUP BY account_id) s USING (account_id)"
        "  LEFT JOIN (SELECT account_id, sum(amount_fen) AS posted_fen, sum(pending_fen) AS pending_fen"
        "             FROM ledger.postings GROUP BY account_id) p USING (account_id)"
        " WHERE a.tenant_id = $1 AND (a.posted_fen + COALESCE(s.posted_fen, 0) <> COALESCE(p.posted_fen, 0)"
        "       OR a.pending_fen <> COALESCE(p.pending_fen, 0))", tenant_id)
    accounts = await conn.fetchval("SELECT count(*) FROM ledger.accounts WHERE tenant_id = $1", tenant_id)
    below = await conn.fetch(
        "SELECT a.account_id, a.purse_kind, a.posted_fen + COALESCE(s.posted_fen, 0) - a.pending_fen AS available,"
        "       a.credit_limit_fen"
        "  FROM ledger.accounts a"
        "  LEFT JOIN (SELECT account_id, sum(posted_fen) AS posted_fen FROM ledger.account_shards"
        "             GROUP BY account_id) s USING (account_id)"
        " WHERE a.tenant_id = $1 AND ("
        "   (a.purse_kind = ANY($2::text[]) OR a.purse_kind = 'merchant_settlement')"
        "     AND a.posted_fen + COALESCE(s.posted_fen, 0) - a.pending_fen < 0"
        "   OR a.purse_kind = 'bank_clearing'"
        "     AND a.posted_fen + COALESCE(s.posted_fen, 0) - a.pending_fen < -COALESCE(a.credit_limit_fen, 0))",
        tenant_id, list(MEMBER_PURSES))
    return [
        Check("postings sum to zero (SQL, tenant)", "0 fen", f"{total} fen", total == 0),
        Check("every transfer's postings sum to zero", "0 lopsided", f"{lopsided} lopsided", lopsided == 0),
        Check("cached balances = sum of postings", f"{accounts} of {accounts}", f"{accounts - len(off)} of {accounts}",
              not off, detail=", ".join(f"{r['account_id']}: cached {r['cached']}/{r['pending_fen']}"
                                        f" postings {r['posted']}/{r['pending']}" for r in off[:5])),
        Check("no purse below zero (clearing: credit limit)", "0 accounts", f"{len(below)} accounts", not below,
              detail=", ".join(f"{r['purse_kind']} {r['account_id']}: {r['available']}" for r in below[:5])),
    ]


async def _eventually(check, *, timeout_s: float = SETTLE_TIMEOUT_S):  # noqa: ANN001, ANN202
    """``check()`` until it passes or time is up; its last answer either way."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = await check()
        if answer.passed or time.monotonic() > deadline:
            return answer
        await asyncio.sleep(0.5)


async def audit(rush: ChaosRush) -> list[Check]:
    stack = rush.stack
    tenant = uuid.UUID(rush.tenant_id)
    conn = await asyncpg.connect(stack.database_url)
    try:
        checks: list[Check] = []
        trial = await rush.ledger.stub.TrialBalance(lpb.TrialBalanceRequest(tenant_id=rush.tenant_id), timeout=30)
        checks.append(Check("postings sum to zero (TrialBalance)", "balanced, 0 fen",
                            f"{'balanced' if trial.balanced else 'UNBALANCED'}, {trial.postings_sum_fen} fen",
                            trial.balanced and trial.postings_sum_fen == 0 and trial.balances_sum_fen == 0))
        checks += await ledger_checks(conn, tenant)
        checks += await _sales_checks(rush, conn, tenant)
        checks += await _offline_checks(rush, conn, tenant)
        checks.append(await _eventually(lambda: _outboxes(conn)))
        checks += await _events_once(rush, conn)
        checks.append(await _eventually(lambda: _webhooks(rush, conn, tenant)))
        return checks
    finally:
        await conn.close()


async def _sales_checks(rush: ChaosRush, conn: asyncpg.Connection, tenant: uuid.UUID) -> list[Check]:
    device_ids = {name: d.client.device_id for name, d in rush.devices.items()}
    rows = await conn.fetch(
        "SELECT t.idempotency_key, t.transfer_id, p.paid_fen, p.refunded_fen FROM ledger.transfers t"
        " JOIN ledger.payments p USING (transfer_id) WHERE t.tenant_id = $1 AND t.kind = 'payment'", tenant)
    booked: dict[str, list[asyncpg.Record]] = {}
    for row in rows:
        booked.setdefault(row["idempotency_key"], []).append(row)
    approved = {f"device:{device_ids[s.device]}/{s.key}": s for s in rush.sales
                if s.outcome is not None and s.outcome.approved and s.outcome.online}
    wrong = []
    for key in approved:
        found = booked.get(key, [])
        if len(found) != 1 or found[0]["refunded_fen"] != 0:
            wrong.append(f"{key}: {len(found)} booked" + (f", refunded {found[0]['refunded_fen']}" if found else ""))
    standing = [f"{key} ({r['paid_fen']} fen)" for key, found in booked.items() if key not in approved
                for r in found if r["refunded_fen"] < r["paid_fen"]]
    reversed_count = sum(1 for key, found in booked.items() if key not in approved
                         for r in found if r["refunded_fen"] == r["paid_fen"])
    return [
        Check("every sale a till approved online booked once", f"{len(approved)} of {len(approved)}",
              f"{len(approved) - len(wrong)} of {len(approved)}", not wrong, detail="; ".join(wrong[:5])),
        Check("every booked payment confirmed or reversed", "0 standing unconfirmed",
              f"{len(standing)} standing ({reversed_count} reversed)", not standing, detail="; ".join(standing[:5])),
    ]


async def _offline_checks(rush: ChaosRush, conn: asyncpg.Connection, tenant: uuid.UUID) -> list[Check]:
    records = await conn.fetch(
        "SELECT device_id, sequence, outcome, transfer_id FROM devicehub.offline_records WHERE tenant_id = $1", tenant)
    by_key = {(str(r["device_id"]), r["sequence"]): r for r in records}
    settlements = Counter(r["idempotency_key"].rsplit("/", 1)[-1] for r in await conn.fetch(
        "SELECT idempotency_key FROM ledger.transfers WHERE tenant_id = $1 AND kind = 'offline_settlement'", tenant))
    offline = [s for s in rush.sales if s.outcome is not None and s.outcome.approved and not s.outcome.online]
    missing, twice = [], []
    for sale in offline:
        device_id = rush.devices[sale.device].client.device_id
        record = by_key.get((device_id, sale.outcome.sequence))
        if record is None or record["outcome"] not in FINAL_OUTCOMES:
            missing.append(f"{sale.device}#{sale.outcome.sequence}")
        elif record["outcome"] == "booked" and settlements[f"dev:{device_id}:{sale.outcome.sequence}"] != 1:
            twice.append(f"{sale.device}#{sale.outcome.sequence}: "
                         f"{settlements[f'dev:{device_id}:{sale.outcome.sequence}']} settlements")
    queued = {name: (d.client.queue_depth(), d.client.pending_reversals()) for name, d in rush.devices.items()}
    left = {name: q for name, q in queued.items() if q != (0, 0)}
    outcomes = Counter(by_key[(rush.devices[s.device].client.device_id, s.outcome.sequence)]["outcome"]
                       for s in offline if (rush.devices[s.device].client.device_id, s.outcome.sequence) in by_key)
    return [
        Check("every offline sale has a final outcome", f"{len(offline)} of {len(offline)}",
              f"{len(offline) - len(missing)} of {len(offline)}", not missing,
              detail=f"missing {missing[:5]}; outcomes {dict(outcomes)}"),
        Check("every booked offline record settled once", "0 not once", f"{len(twice)} not once", not twice,
              detail="; ".join(twice[:5])),
        Check("terminal queues and reversals empty (SDK)", "0 left", f"{sum(map(sum, queued.values()))} left",
              not left, detail=str(left)),
    ]


async def _outboxes(conn: asyncpg.Connection) -> Check:
    left = {}
    for service in SERVICES:
        count = await conn.fetchval(f"SELECT count(*) FROM {service}.outbox WHERE published_at IS NULL")
        if count:
            left[service] = count
    return Check("every service's outbox empty", "0 unpublished", f"{sum(left.values())} unpublished", not left,
                 detail=str(left))


async def _events_once(rush: ChaosRush, conn: asyncpg.Connection) -> list[Check]:
    nc = await connect_nats(rush.stack.nats_url)
    try:
        js = nc.jetstream()
        checks = []
        for stream, durable, subjects in ONCE_DURABLES:
            async def once(stream: str = stream, durable: str = durable, subjects: str = subjects) -> Check:
                info = await js.consumer_info(stream, durable)
                in_stream = sum((await js.stream_info(stream, subjects_filter=subjects)).state.subjects.values())
                schema = durable.split("-")[0]
                handled = await conn.fetchval(f"SELECT count(*) FROM {schema}.processed_events WHERE consumer = $1",
                                              durable)
                drained = info.num_pending == 0 and info.num_ack_pending == 0
                return Check(f"{subjects} handled once by {durable}", f"{in_stream} of {in_stream}",
                             f"{handled} of {in_stream}", drained and handled == in_stream,
                             detail=f"pending {info.num_pending}, ack pending {info.num_ack_pending}")
            checks.append(await _eventually(once))
        members = await conn.fetchval(
            "SELECT count(*) FROM (SELECT owner_id FROM ledger.accounts WHERE owner_kind = 'member'"
            " AND purse_kind = 'cash' GROUP BY owner_id HAVING count(*) = 1) m")
        checks.append(Check("each member has exactly one cash purse", f"{len(rush.members)}", f"{members}",
                            members == len(rush.members)))

        async def posted() -> Check:
            # A hold, and a hold voided or expired, is told as ledger.hold.*; every other transfer
            # (a capture too) as ledger.transfer.posted.
            subjects = (await js.stream_info("LEDGER", subjects_filter="ledger.transfer.posted")).state.subjects
            in_stream = sum(subjects.values())
            transfers = await conn.fetchval(
                "SELECT count(*) FROM ledger.transfers WHERE kind NOT IN ('hold', 'void', 'expiry')")
            return Check("each transfer published once (ledger.transfer.posted)", f"{transfers}", f"{in_stream}",
                         in_stream == transfers)

        checks.append(await _eventually(posted))
        return checks
    finally:
        await nc.close()


async def _webhooks(rush: ChaosRush, conn: asyncpg.Connection, tenant: uuid.UUID) -> Check:
    wanted = {str(r["transfer_id"]) for r in await conn.fetch(
        "SELECT transfer_id FROM ledger.transfers WHERE tenant_id = $1 AND kind IN ('payment', 'refund', 'top_up')",
        tenant)}
    delivered = Counter(rush.receiver.transfer_ids())
    missing = wanted - set(delivered)
    repeats = sum(n - 1 for n in delivered.values() if n > 1)
    return Check("webhooks delivered (payment/refund/top-up)", f"{len(wanted)} of {len(wanted)}",
                 f"{len(wanted & set(delivered))} of {len(wanted)}", not missing,
                 detail=f"missing {sorted(missing)[:3]}; {repeats} repeated deliveries")
