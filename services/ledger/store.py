"""All of the ledger's SQL. Rows in, domain values out; no rules and no protobuf here.

Lock order, the same in every write, so no two transactions wait on each other in a cycle:
the idempotency key row, then a hold or payment row, then the unsharded accounts (member purses)
in ascending id order (``SELECT ... ORDER BY account_id FOR UPDATE``), then a payment's guard
counters in ascending key order (one upsert each), and last the one shard row of each sharded
account, again in ascending account order. Sharded accounts (merchants,
clearing, funding) are never locked as a whole: a payment adds to one of their shard rows
(``INSERT ... ON CONFLICT DO UPDATE SET posted_fen = posted_fen + ...``), the last statement
before commit, so a busy canteen's payments do not queue on one row.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from runtime.errors import NotFound
from runtime.events import PendingEvent, emit_many
from services.ledger.domain import (
    SHARD_COUNT,
    Account,
    AccountBalance,
    AccountStatus,
    Balance,
    Guard,
    Hold,
    HoldStatus,
    OwnerKind,
    Posting,
    PurseKind,
    PurseKindTotal,
    Transfer,
    TransferKind,
    TrialBalance,
    WriteResult,
)

_ACCOUNT_COLUMNS = "tenant_id, account_id, owner_kind, owner_id, purse_kind, ref, no_overdraft, sharded, status"
# A sharded account's balance is its shards' sum; an unsharded one's is its own columns.
_POSTED = ("(a.posted_fen + COALESCE((SELECT sum(s.posted_fen) FROM account_shards s"
           " WHERE s.account_id = a.account_id), 0))::bigint")
_TRANSFER_COLUMNS = ("tenant_id, transfer_id, seq, kind, idempotency_key, amount_fen, merchant_account_id, device_id,"
                     " external_ref, original_transfer_id, event_time, booked_at")
_HOLD_COLUMNS = "hold_id, account_id, merchant_account_id, amount_fen, status, expires_at, settled_by_transfer_id"


def _account(row: asyncpg.Record) -> Account:
    return Account(
        tenant_id=row["tenant_id"], account_id=row["account_id"], owner_kind=OwnerKind(row["owner_kind"]),
        owner_id=row["owner_id"], purse_kind=PurseKind(row["purse_kind"]), ref=row["ref"],
        no_overdraft=row["no_overdraft"], sharded=row["sharded"], status=AccountStatus(row["status"]),
    )


def _balance(row: asyncpg.Record) -> Balance:
    return Balance(account_id=row["account_id"], posted_fen=row["posted_fen"], pending_fen=row["pending_fen"])


def _hold(row: asyncpg.Record) -> Hold:
    return Hold(
        hold_id=row["hold_id"], account_id=row["account_id"], merchant_account_id=row["merchant_account_id"],
        amount_fen=row["amount_fen"], status=HoldStatus(row["status"]), expires_at=row["expires_at"],
        settled_by_transfer_id=row["settled_by_transfer_id"],
    )


def _transfer(row: asyncpg.Record, postings: list[asyncpg.Record]) -> Transfer:
    return Transfer(
        tenant_id=row["tenant_id"], transfer_id=row["transfer_id"], kind=TransferKind(row["kind"]),
        idempotency_key=row["idempotency_key"], amount_fen=row["amount_fen"],
        postings=tuple(Posting(account_id=p["account_id"], amount_fen=p["amount_fen"], pending_fen=p["pending_fen"])
                       for p in postings),
        event_time=row["event_time"], booked_at=row["booked_at"], merchant_account_id=row["merchant_account_id"],
        device_id=row["device_id"], external_ref=row["external_ref"],
        original_transfer_id=row["original_transfer_id"],
    )


class TenantTx:
    """One transaction's view of one tenant's ledger."""

    def __init__(self, conn: asyncpg.Connection, *, tenant_id: uuid.UUID):
        self.conn = conn
        self.tenant_id = tenant_id

    async def now(self) -> datetime:
        # The database's clock, the one every transaction of every replica agrees on.
        return await self.conn.fetchval("SELECT now()")

    # --- idempotency --------------------------------------------------------------------------

    async def claim_key(self, *, idempotency_key: str, operation: str,
                        fingerprint: bytes) -> tuple[str, bytes, WriteResult | None] | None:
        """Claim the key for this write; None when it is new. Otherwise the stored operation,
        fingerprint and result. A concurrent write under the same key waits here for the first."""
        claimed = await self.conn.fetchval(
            "INSERT INTO idempotency_keys (tenant_id, idempotency_key, operation, fingerprint)"
            " VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING true",
            self.tenant_id, idempotency_key, operation, fingerprint,
        )
        if claimed:
            return None
        row = await self.conn.fetchrow(
            "SELECT operation, fingerprint, result FROM idempotency_keys WHERE tenant_id = $1 AND idempotency_key = $2",
            self.tenant_id, idempotency_key,
        )
        result = WriteResult.from_json(row["result"]) if row["result"] is not None else None
        return row["operation"], bytes(row["fingerprint"]), result

    async def save_result(self, *, idempotency_key: str, result: WriteResult) -> None:
        await self.conn.execute(
            "UPDATE idempotency_keys SET result = $3 WHERE tenant_id = $1 AND idempotency_key = $2",
            self.tenant_id, idempotency_key, result.to_json(),
        )

    # --- accounts -----------------------------------------------------------------------------

    async def open_account(self, *, owner_kind: OwnerKind, owner_id: str, purse_kind: PurseKind, ref: str,
                           no_overdraft: bool) -> tuple[Account, bool]:
        row = await self.conn.fetchrow(
            "INSERT INTO accounts (account_id, tenant_id, owner_kind, owner_id, purse_kind, ref, no_overdraft,"
            f" sharded) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING RETURNING {_ACCOUNT_COLUMNS}",
            uuid.uuid4(), self.tenant_id, owner_kind.value, owner_id, purse_kind.value, ref, no_overdraft,
            not no_overdraft,
        )
        if row is not None:
            return _account(row), True
        row = await self.conn.fetchrow(
            f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE tenant_id = $1 AND owner_kind = $2 AND owner_id = $3"
            " AND purse_kind = $4 AND ref = $5",
            self.tenant_id, owner_kind.value, owner_id, purse_kind.value, ref,
        )
        return _account(row), False

    async def accounts(self, account_ids: list[uuid.UUID], *, lock_unsharded: bool = False
                       ) -> dict[uuid.UUID, AccountBalance]:
        """The accounts with their balances; NotFound names the first one missing. With
        ``lock_unsharded`` the member purses among them are locked in ascending id order."""
        ids = sorted(set(account_ids))
        if lock_unsharded:
            # Locks only rows that cannot be sharded: merchants stay free for other payments.
            await self.conn.execute(
                "SELECT 1 FROM accounts WHERE tenant_id = $1 AND account_id = ANY($2::uuid[]) AND NOT sharded"
                " ORDER BY account_id FOR UPDATE",
                self.tenant_id, ids,
            )
        rows = await self.conn.fetch(
            f"SELECT {_ACCOUNT_COLUMNS}, {_POSTED} AS posted_fen, a.pending_fen FROM accounts a"
            " WHERE a.tenant_id = $1 AND a.account_id = ANY($2::uuid[])",
            self.tenant_id, ids,
        )
        found = {r["account_id"]: AccountBalance(account=_account(r), balance=_balance(r)) for r in rows}
        for account_id in account_ids:
            if account_id not in found:
                raise NotFound("no such account", reason="ACCOUNT_NOT_FOUND", metadata={"account_id": str(account_id)})
        return found

    async def account(self, account_id: uuid.UUID, *, lock: bool = False) -> AccountBalance:
        return (await self.accounts([account_id], lock_unsharded=lock))[account_id]

    async def set_status(self, account_id: uuid.UUID, *, status: AccountStatus) -> None:
        updated = await self.conn.fetchval(
            "UPDATE accounts SET status = $3 WHERE tenant_id = $1 AND account_id = $2 RETURNING true",
            self.tenant_id, account_id, status.value,
        )
        if not updated:
            raise NotFound("no such account", reason="ACCOUNT_NOT_FOUND")

    async def balances(self, account_ids: list[uuid.UUID]) -> tuple[Balance, ...]:
        found = await self.accounts(account_ids)
        return tuple(found[a].balance for a in account_ids)

    # --- transfers ----------------------------------------------------------------------------

    async def post(self, *, kind: TransferKind, idempotency_key: str, amount_fen: int, postings: list[Posting],
                   sharded: set[uuid.UUID], event_time: datetime | None, merchant_account_id: uuid.UUID | None = None,
                   device_id: str = "", external_ref: str = "", original_transfer_id: uuid.UUID | None = None,
                   ) -> Transfer:
        """Book one transfer: its row, its postings, and the balance caches they change."""
        transfer_id = uuid.uuid4()
        row = await self.conn.fetchrow(
            f"INSERT INTO transfers (transfer_id, tenant_id, kind, idempotency_key, amount_fen, merchant_account_id,"
            f" device_id, external_ref, original_transfer_id, event_time)"
            f" VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, COALESCE($10, now())) RETURNING {_TRANSFER_COLUMNS}",
            transfer_id, self.tenant_id, kind.value, idempotency_key, amount_fen, merchant_account_id, device_id,
            external_ref, original_transfer_id, event_time,
        )
        await self.conn.executemany(
            "INSERT INTO postings (transfer_id, account_id, tenant_id, seq, leg, amount_fen, pending_fen)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7)",
            [(transfer_id, p.account_id, self.tenant_id, row["seq"], leg, p.amount_fen, p.pending_fen)
             for leg, p in enumerate(postings)],
        )
        own = [p for p in postings if p.account_id not in sharded]
        if own:
            await self.conn.execute(
                "UPDATE accounts a SET posted_fen = a.posted_fen + u.amount, pending_fen = a.pending_fen + u.pending"
                " FROM unnest($1::uuid[], $2::bigint[], $3::bigint[]) AS u(id, amount, pending)"
                " WHERE a.account_id = u.id",
                [p.account_id for p in own], [p.amount_fen for p in own], [p.pending_fen for p in own],
            )
        for p in sorted((p for p in postings if p.account_id in sharded), key=lambda p: p.account_id):
            if p.amount_fen:
                await self.conn.execute(
                    "INSERT INTO account_shards (account_id, shard, posted_fen) VALUES ($1, $2, $3)"
                    " ON CONFLICT (account_id, shard) DO UPDATE SET posted_fen = account_shards.posted_fen + $3",
                    p.account_id, secrets.randbelow(SHARD_COUNT), p.amount_fen,
                )
        return _transfer(row, [{"account_id": p.account_id, "amount_fen": p.amount_fen, "pending_fen": p.pending_fen}
                               for p in postings])  # type: ignore[misc]

    async def emit(self, events: list[PendingEvent]) -> None:
        await emit_many(self.conn, events=events)

    async def transfer(self, transfer_id: uuid.UUID) -> Transfer:
        row = await self.conn.fetchrow(
            f"SELECT {_TRANSFER_COLUMNS} FROM transfers WHERE tenant_id = $1 AND transfer_id = $2",
            self.tenant_id, transfer_id,
        )
        if row is None:
            raise NotFound("no such transfer", reason="TRANSFER_NOT_FOUND")
        postings = await self.conn.fetch(
            "SELECT account_id, amount_fen, pending_fen FROM postings WHERE transfer_id = $1 ORDER BY leg",
            transfer_id,
        )
        return _transfer(row, list(postings))

    async def transfer_by_key(self, idempotency_key: str) -> Transfer | None:
        transfer_id = await self.conn.fetchval(
            "SELECT transfer_id FROM transfers WHERE tenant_id = $1 AND idempotency_key = $2",
            self.tenant_id, idempotency_key,
        )
        return None if transfer_id is None else await self.transfer(transfer_id)

    async def history(self, account_id: uuid.UUID, *, before_seq: int | None, limit: int) -> list[Transfer]:
        """A page of the transfers touching the account, newest first, in two queries."""
        rows = await self.conn.fetch(
            f"SELECT {_TRANSFER_COLUMNS} FROM transfers WHERE transfer_id IN ("
            " SELECT transfer_id FROM postings WHERE account_id = $1 AND tenant_id = $2"
            " AND ($3::bigint IS NULL OR seq < $3) ORDER BY seq DESC LIMIT $4) ORDER BY seq DESC",
            account_id, self.tenant_id, before_seq, limit,
        )
        legs = await self.conn.fetch(
            "SELECT transfer_id, account_id, amount_fen, pending_fen FROM postings WHERE transfer_id = ANY($1::uuid[])"
            " ORDER BY transfer_id, leg",
            [r["transfer_id"] for r in rows],
        )
        by_transfer: dict[uuid.UUID, list[asyncpg.Record]] = {}
        for leg in legs:
            by_transfer.setdefault(leg["transfer_id"], []).append(leg)
        return [_transfer(r, by_transfer.get(r["transfer_id"], [])) for r in rows]

    async def transfer_seq(self, transfer_id: uuid.UUID) -> int:
        return await self.conn.fetchval("SELECT seq FROM transfers WHERE transfer_id = $1", transfer_id)

    # --- payments and refunds -----------------------------------------------------------------

    async def record_payment(self, *, transfer_id: uuid.UUID, paid_fen: int) -> None:
        await self.conn.execute(
            "INSERT INTO payments (transfer_id, tenant_id, paid_fen) VALUES ($1, $2, $3)",
            transfer_id, self.tenant_id, paid_fen,
        )

    async def lock_payment(self, transfer_id: uuid.UUID) -> tuple[int, int]:
        """(paid, refunded so far) of a payment, locked against a concurrent refund."""
        row = await self.conn.fetchrow(
            "SELECT paid_fen, refunded_fen FROM payments WHERE tenant_id = $1 AND transfer_id = $2 FOR UPDATE",
            self.tenant_id, transfer_id,
        )
        if row is None:
            raise NotFound("no such payment", reason="PAYMENT_NOT_FOUND")
        return row["paid_fen"], row["refunded_fen"]

    async def refunded_by_account(self, payment_id: uuid.UUID) -> dict[uuid.UUID, int]:
        rows = await self.conn.fetch(
            "SELECT p.account_id, sum(p.amount_fen)::bigint AS fen FROM transfers t JOIN postings p USING (transfer_id)"
            " WHERE t.original_transfer_id = $1 AND t.kind = 'refund' AND p.amount_fen > 0 GROUP BY p.account_id",
            payment_id,
        )
        return {r["account_id"]: r["fen"] for r in rows}

    async def add_refunded(self, payment_id: uuid.UUID, *, amount_fen: int) -> None:
        await self.conn.execute("UPDATE payments SET refunded_fen = refunded_fen + $2 WHERE transfer_id = $1",
                                payment_id, amount_fen)

    # --- guards -------------------------------------------------------------------------------

    async def raise_counter(self, guard: Guard) -> int | None:
        """Add the guard's increment to its counter if that keeps it within the limit: the new
        value, or None (and nothing changed) when it would pass. One statement, so the check and
        the update see the same row version: a concurrent payment on the counter waits for this
        one's commit and then checks against the value it left (no lost update)."""
        # A counter not there yet is inserted only if the increment alone fits (the SELECT ...
        # WHERE); an existing one is raised only if the sum fits (the DO UPDATE ... WHERE).
        return await self.conn.fetchval(
            "INSERT INTO usage_counters AS c (tenant_id, counter_key, value)"
            " SELECT $1::uuid, $2::text, $3::bigint WHERE $3::bigint <= $4::bigint"
            " ON CONFLICT (tenant_id, counter_key) DO UPDATE SET value = c.value + EXCLUDED.value, updated_at = now()"
            " WHERE c.value + EXCLUDED.value <= $4::bigint RETURNING value",
            self.tenant_id, guard.counter_key, guard.increment, guard.limit,
        )

    async def record_guards(self, transfer_id: uuid.UUID, *, applied: list[tuple[Guard, int]]) -> None:
        if not applied:
            return
        await self.conn.executemany(
            "INSERT INTO transfer_guards (transfer_id, tenant_id, counter_key, increment, limit_value, value_after)"
            " VALUES ($1, $2, $3, $4, $5, $6)",
            [(transfer_id, self.tenant_id, g.counter_key, g.increment, g.limit, value_after)
             for g, value_after in applied],
        )

    async def counters(self, counter_keys: list[str]) -> dict[str, int]:
        rows = await self.conn.fetch(
            "SELECT counter_key, value FROM usage_counters WHERE tenant_id = $1 AND counter_key = ANY($2::text[])",
            self.tenant_id, counter_keys,
        )
        return {r["counter_key"]: r["value"] for r in rows}

    # --- holds --------------------------------------------------------------------------------

    async def create_hold(self, *, hold_id: uuid.UUID, account_id: uuid.UUID, merchant_account_id: uuid.UUID,
                          amount_fen: int, timeout_s: int) -> Hold:
        row = await self.conn.fetchrow(
            f"INSERT INTO holds (hold_id, tenant_id, account_id, merchant_account_id, amount_fen, status, expires_at)"
            f" VALUES ($1, $2, $3, $4, $5, 'pending', now() + $6::interval) RETURNING {_HOLD_COLUMNS}",
            hold_id, self.tenant_id, account_id, merchant_account_id, amount_fen, timedelta(seconds=timeout_s),
        )
        return _hold(row)

    async def lock_hold(self, hold_id: uuid.UUID) -> Hold:
        row = await self.conn.fetchrow(
            f"SELECT {_HOLD_COLUMNS} FROM holds WHERE tenant_id = $1 AND hold_id = $2 FOR UPDATE",
            self.tenant_id, hold_id,
        )
        if row is None:
            raise NotFound("no such hold", reason="HOLD_NOT_FOUND")
        return _hold(row)

    async def settle_hold(self, hold_id: uuid.UUID, *, status: HoldStatus, transfer_id: uuid.UUID) -> Hold:
        row = await self.conn.fetchrow(
            f"UPDATE holds SET status = $2, settled_by_transfer_id = $3 WHERE hold_id = $1 AND status = 'pending'"
            f" RETURNING {_HOLD_COLUMNS}",
            hold_id, status.value, transfer_id,
        )
        assert row is not None, "settle_hold runs under the hold's lock, after checking it is pending"
        return _hold(row)

    async def hold(self, hold_id: uuid.UUID) -> Hold:
        row = await self.conn.fetchrow(f"SELECT {_HOLD_COLUMNS} FROM holds WHERE tenant_id = $1 AND hold_id = $2",
                                       self.tenant_id, hold_id)
        if row is None:
            raise NotFound("no such hold", reason="HOLD_NOT_FOUND")
        return _hold(row)

    # --- reports ------------------------------------------------------------------------------

    async def owner_accounts(self, *, owner_kind: OwnerKind, owner_id: str) -> list[AccountBalance]:
        rows = await self.conn.fetch(
            f"SELECT {_ACCOUNT_COLUMNS}, {_POSTED} AS posted_fen, a.pending_fen FROM accounts a"
            " WHERE a.tenant_id = $1 AND a.owner_kind = $2 AND a.owner_id = $3 ORDER BY a.purse_kind, a.ref",
            self.tenant_id, owner_kind.value, owner_id,
        )
        return [AccountBalance(account=_account(r), balance=_balance(r)) for r in rows]

    async def trial_balance(self) -> TrialBalance:
        postings_sum = await self.conn.fetchval(
            "SELECT COALESCE(sum(amount_fen), 0)::bigint FROM postings WHERE tenant_id = $1", self.tenant_id)
        rows = await self.conn.fetch(
            f"SELECT a.purse_kind, count(*)::int AS accounts, COALESCE(sum({_POSTED}), 0)::bigint AS posted_fen,"
            " COALESCE(sum(a.pending_fen), 0)::bigint AS pending_fen FROM accounts a WHERE a.tenant_id = $1"
            " GROUP BY a.purse_kind ORDER BY a.purse_kind",
            self.tenant_id,
        )
        totals = tuple(PurseKindTotal(purse_kind=PurseKind(r["purse_kind"]), posted_fen=r["posted_fen"],
                                      pending_fen=r["pending_fen"], accounts=r["accounts"]) for r in rows)
        return TrialBalance(postings_sum_fen=postings_sum, balances_sum_fen=sum(t.posted_fen for t in totals),
                            totals=totals)


class LedgerStore:
    def __init__(self, pool: asyncpg.Pool):
        self._pool = pool

    @asynccontextmanager
    async def tenant_tx(self, tenant_id: uuid.UUID) -> AsyncIterator[TenantTx]:
        async with self._pool.acquire() as conn, conn.transaction():
            yield TenantTx(conn, tenant_id=tenant_id)

    @asynccontextmanager
    async def tenant_read(self, tenant_id: uuid.UUID) -> AsyncIterator[TenantTx]:
        # One snapshot for the whole read, so a page or a trial balance is self-consistent.
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            yield TenantTx(conn, tenant_id=tenant_id)

    async def due_holds(self, *, limit: int) -> list[tuple[uuid.UUID, uuid.UUID]]:
        """(tenant, hold) of pending holds past their time, oldest first."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT tenant_id, hold_id FROM holds WHERE status = 'pending' AND expires_at <= now()"
                " ORDER BY expires_at LIMIT $1",
                limit,
            )
        return [(r["tenant_id"], r["hold_id"]) for r in rows]


def event_data(transfer: Transfer, **extra: Any) -> dict[str, Any]:
    return {
        "tenant_id": str(transfer.tenant_id),
        "transfer_id": str(transfer.transfer_id),
        "kind": transfer.kind.value,
        "amount_fen": transfer.amount_fen,
        "postings": [{"account_id": str(p.account_id), "amount_fen": p.amount_fen, "pending_fen": p.pending_fen}
                     for p in transfer.postings],
        "merchant_account_id": str(transfer.merchant_account_id) if transfer.merchant_account_id else None,
        "device_id": transfer.device_id,
        "external_ref": transfer.external_ref,
        "original_transfer_id": str(transfer.original_transfer_id) if transfer.original_transfer_id else None,
        "event_time": transfer.event_time.isoformat(),
        "booked_at": transfer.booked_at.isoformat(),
        **extra,
    }
