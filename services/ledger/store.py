"""All of the ledger's SQL. Rows in, domain values out; no rules and no protobuf here.

Lock order, the same in every write, so no two transactions wait on each other in a cycle:
the idempotency key rows (in key order), then a hold or payment row, then the unsharded accounts
(member purses) in ascending id order (``SELECT ... ORDER BY account_id FOR UPDATE``), then the
guard counters of payments in ascending key order, and last the one shard row of each sharded
account, again in ascending account order. Sharded accounts (merchants, funding) are
never locked as a whole: a transfer adds to one of their shard rows (``INSERT ... ON CONFLICT DO
UPDATE SET posted_fen = posted_fen + ...``) as its last write, so a busy canteen's payments do not
queue on one row. The payment path (``read_for_payments`` then ``commit_payments``) takes the
same order in two statements for a whole batch.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

import asyncpg

from runtime.errors import NotFound
from runtime.events import NOTIFY_RELAY_SQL, PendingEvent, emit_many
from services.ledger.domain import (
    SHARD_COUNT,
    AccountLayout,
    account_layout,
    CodeRef,
    bank_reference_used,
    code_already_used,
    STATEMENT_KINDS,
    GrantBatch,
    GrantBatchStatus,
    GrantRow,
    GrantRowResult,
    GrantRowStatus,
    NewTransfer,
    Program,
    ProgramStatus,
    StatementTotals,
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
    ReconciliationLine,
    Transfer,
    TransferKind,
    TrialBalance,
    WriteResult,
)

_ACCOUNT_COLUMNS = ("tenant_id, account_id, owner_kind, owner_id, purse_kind, ref, no_overdraft, sharded, status,"
                    " credit_limit_fen, low_balance_threshold_fen")
# A sharded account's balance is its shards' sum; an unsharded one's is its own columns.
_POSTED = ("(a.posted_fen + COALESCE((SELECT sum(s.posted_fen) FROM account_shards s"
           " WHERE s.account_id = a.account_id), 0))::bigint")
_TRANSFER_COLUMNS = ("tenant_id, transfer_id, seq, kind, idempotency_key, amount_fen, merchant_account_id, device_id,"
                     " external_ref, original_transfer_id, event_time, booked_at, code_credential_id, code_counter")
# The unique index that books each e-code use once.
CODE_INDEX = "transfers_by_code"
_PROGRAM_COLUMNS = ("tenant_id, purse_kind, ref, funding_account_id, ends_at, status, expired_purses,"
                    " expired_fen")
_BATCH_COLUMNS = ("tenant_id, batch_id, bill_number, purse_kind, ref, status, total_rows, done_rows, granted_rows,"
                  " failed_rows, granted_fen, created_at, finished_at")
_HOLD_COLUMNS = "hold_id, account_id, merchant_account_id, amount_fen, status, expires_at, settled_by_transfer_id"


def _account(row: asyncpg.Record) -> Account:
    return Account(
        tenant_id=row["tenant_id"], account_id=row["account_id"], owner_kind=OwnerKind(row["owner_kind"]),
        owner_id=row["owner_id"], purse_kind=PurseKind(row["purse_kind"]), ref=row["ref"],
        no_overdraft=row["no_overdraft"], sharded=row["sharded"], status=AccountStatus(row["status"]),
        # The payment paths read member purses and merchants only, without this column.
        credit_limit_fen=row.get("credit_limit_fen"),
        low_balance_threshold_fen=row.get("low_balance_threshold_fen"),
    )


def _balance(row: asyncpg.Record) -> Balance:
    return Balance(account_id=row["account_id"], posted_fen=row["posted_fen"], pending_fen=row["pending_fen"])


def _hold(row: asyncpg.Record) -> Hold:
    return Hold(
        hold_id=row["hold_id"], account_id=row["account_id"], merchant_account_id=row["merchant_account_id"],
        amount_fen=row["amount_fen"], status=HoldStatus(row["status"]), expires_at=row["expires_at"],
        settled_by_transfer_id=row["settled_by_transfer_id"],
    )


def _program(row: asyncpg.Record) -> Program:
    return Program(
        tenant_id=row["tenant_id"], purse_kind=PurseKind(row["purse_kind"]), ref=row["ref"],
        funding_account_id=row["funding_account_id"], ends_at=row["ends_at"], status=ProgramStatus(row["status"]),
        expired_purses=row["expired_purses"], expired_fen=row["expired_fen"],
    )


def _batch(row: asyncpg.Record) -> GrantBatch:
    return GrantBatch(
        tenant_id=row["tenant_id"], batch_id=row["batch_id"], bill_number=row["bill_number"],
        purse_kind=PurseKind(row["purse_kind"]), ref=row["ref"], status=GrantBatchStatus(row["status"]),
        total_rows=row["total_rows"], done_rows=row["done_rows"], granted_rows=row["granted_rows"],
        failed_rows=row["failed_rows"], granted_fen=row["granted_fen"], created_at=row["created_at"],
        finished_at=row["finished_at"],
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
        code=CodeRef(credential_id=row["code_credential_id"], counter=row["code_counter"])
        if row["code_credential_id"] else None,
    )


@dataclass
class PaymentReads:
    """What ``read_for_payments`` found (see there)."""

    now: datetime
    claimed: set[str]
    seen: dict[str, tuple[str, bytes, WriteResult | None]]
    accounts: dict[uuid.UUID, AccountBalance]
    counters: dict[str, int]
    created_counters: set[str]
    used_codes: set[CodeRef]


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

    async def key_claim(self, idempotency_key: str) -> tuple[str, bytes] | None:
        """(operation, fingerprint) the key was claimed with, if it was."""
        row = await self.conn.fetchrow(
            "SELECT operation, fingerprint FROM idempotency_keys WHERE tenant_id = $1 AND idempotency_key = $2",
            self.tenant_id, idempotency_key,
        )
        return None if row is None else (row["operation"], bytes(row["fingerprint"]))

    async def save_result(self, *, idempotency_key: str, result: WriteResult) -> None:
        await self.conn.execute(
            "UPDATE idempotency_keys SET result = $3 WHERE tenant_id = $1 AND idempotency_key = $2",
            self.tenant_id, idempotency_key, result.to_json(),
        )

    # --- accounts -----------------------------------------------------------------------------

    async def open_account(self, *, owner_kind: OwnerKind, owner_id: str, purse_kind: PurseKind, ref: str,
                           layout: AccountLayout) -> tuple[Account, bool]:
        row = await self.conn.fetchrow(
            "INSERT INTO accounts (account_id, tenant_id, owner_kind, owner_id, purse_kind, ref, no_overdraft,"
            " sharded, credit_limit_fen) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING"
            f" RETURNING {_ACCOUNT_COLUMNS}",
            uuid.uuid4(), self.tenant_id, owner_kind.value, owner_id, purse_kind.value, ref, layout.no_overdraft,
            layout.sharded, layout.credit_limit_fen,
        )
        if row is not None:
            return _account(row), True
        row = await self.conn.fetchrow(
            f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE tenant_id = $1 AND owner_kind = $2 AND owner_id = $3"
            " AND purse_kind = $4 AND ref = $5",
            self.tenant_id, owner_kind.value, owner_id, purse_kind.value, ref,
        )
        return _account(row), False

    async def accounts(self, account_ids: list[uuid.UUID], *, lock_unsharded: bool = False,
                       missing_ok: bool = False) -> dict[uuid.UUID, AccountBalance]:
        """The accounts with their balances; NotFound names the first one missing (unless
        ``missing_ok``: then only those found). With ``lock_unsharded`` the member purses among
        them are locked in ascending id order."""
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
        if missing_ok:
            return found
        for account_id in account_ids:
            if account_id not in found:
                raise NotFound("no such account", reason="ACCOUNT_NOT_FOUND", metadata={"account_id": str(account_id)})
        return found

    async def account(self, account_id: uuid.UUID, *, lock: bool = False) -> AccountBalance:
        return (await self.accounts([account_id], lock_unsharded=lock))[account_id]

    async def set_credit_limit(self, account_id: uuid.UUID, *, credit_limit_fen: int) -> None:
        await self.conn.execute(
            "UPDATE accounts SET credit_limit_fen = $3 WHERE tenant_id = $1 AND account_id = $2",
            self.tenant_id, account_id, credit_limit_fen,
        )

    async def set_low_balance_threshold(self, account_id: uuid.UUID, *, threshold_fen: int | None) -> None:
        await self.conn.execute(
            "UPDATE accounts SET low_balance_threshold_fen = $3 WHERE tenant_id = $1 AND account_id = $2",
            self.tenant_id, account_id, threshold_fen,
        )

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
                   code: CodeRef | None = None) -> Transfer:
        """Book one transfer: its row, its postings, and the balance caches they change. A code
        that paid before is CODE_ALREADY_USED (the caller's transaction then rolls back)."""
        transfer_id = uuid.uuid4()
        try:
            row = await self.conn.fetchrow(
                f"INSERT INTO transfers (transfer_id, tenant_id, kind, idempotency_key, amount_fen, merchant_account_id,"
                f" device_id, external_ref, original_transfer_id, event_time, code_credential_id, code_counter)"
                f" VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, COALESCE($10, now()), $11, $12)"
                f" RETURNING {_TRANSFER_COLUMNS}",
                transfer_id, self.tenant_id, kind.value, idempotency_key, amount_fen, merchant_account_id, device_id,
                external_ref, original_transfer_id, event_time, code.credential_id if code else "",
                code.counter if code else None,
            )
        except asyncpg.UniqueViolationError as error:
            if code is not None and error.constraint_name == CODE_INDEX:
                raise code_already_used(code) from None
            raise
        # One statement for all the legs: the zero-sum trigger checks each statement.
        await self.conn.execute(
            "INSERT INTO postings (transfer_id, account_id, tenant_id, seq, leg, amount_fen, pending_fen)"
            " SELECT $1, u.aid, $2, $3, u.leg, u.amount, u.pending FROM unnest($4::uuid[], $5::smallint[],"
            " $6::bigint[], $7::bigint[]) AS u(aid, leg, amount, pending)",
            transfer_id, self.tenant_id, row["seq"], [p.account_id for p in postings], list(range(len(postings))),
            [p.amount_fen for p in postings], [p.pending_fen for p in postings],
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

    async def transfers(self, transfer_ids: list[uuid.UUID]) -> list[Transfer]:
        rows = await self.conn.fetch(
            f"SELECT {_TRANSFER_COLUMNS} FROM transfers WHERE tenant_id = $1 AND transfer_id = ANY($2::uuid[])",
            self.tenant_id, transfer_ids,
        )
        return await self._with_postings(list(rows))

    async def transfers_by_code(self, codes: list[CodeRef]) -> dict[CodeRef, uuid.UUID]:
        """The transfers that booked these codes, for those booked."""
        if not codes:
            return {}
        rows = await self.conn.fetch(
            "SELECT t.code_credential_id, t.code_counter, t.transfer_id FROM transfers t"
            " JOIN unnest($2::text[], $3::bigint[]) AS u(cred, counter)"
            " ON t.code_credential_id = u.cred AND t.code_counter = u.counter WHERE t.tenant_id = $1"
            # The code index is partial (code_credential_id <> ''); saying so lets the planner use it.
            " AND t.code_credential_id <> ''",
            self.tenant_id, [c.credential_id for c in codes], [c.counter for c in codes],
        )
        return {CodeRef(r["code_credential_id"], r["code_counter"]): r["transfer_id"] for r in rows}

    async def transfer_by_key(self, idempotency_key: str) -> Transfer | None:
        transfer_id = await self.conn.fetchval(
            "SELECT transfer_id FROM transfers WHERE tenant_id = $1 AND idempotency_key = $2 AND idempotency_key <> ''",
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
        return await self._with_postings(list(rows))

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

    async def give_back_guards(self, transfer_id: uuid.UUID) -> None:
        """Lower each counter the transfer's guards raised by what they raised (counters locked in
        key order, as payments lock them)."""
        guards = await self.conn.fetch(
            "SELECT counter_key, increment FROM transfer_guards WHERE tenant_id = $1 AND transfer_id = $2",
            self.tenant_id, transfer_id,
        )
        if not guards:
            return
        values, _ = await self.lock_counters([g["counter_key"] for g in guards])
        await self.conn.execute(
            "UPDATE usage_counters c SET value = GREATEST(0, c.value - u.inc), updated_at = now()"
            " FROM unnest($2::text[], $3::bigint[]) AS u(key, inc) WHERE c.tenant_id = $1 AND c.counter_key = u.key",
            self.tenant_id, [g["counter_key"] for g in guards], [g["increment"] for g in guards],
        )

    async def lock_counters(self, counter_keys: list[str]) -> tuple[dict[str, int], set[str]]:
        """The counters' values, locked (in ascending key order) until the transaction ends, and
        the keys created now: a counter never raised is created at 0 first. Concurrent payments on
        a counter queue here, so each checks its cap against the value the one before left (no
        lost update)."""
        keys = sorted(set(counter_keys))
        if not keys:
            return {}, set()
        created = await self.conn.fetch(
            "INSERT INTO usage_counters (tenant_id, counter_key, value) SELECT $1, k, 0 FROM unnest($2::text[]) AS k"
            " ORDER BY k ON CONFLICT DO NOTHING RETURNING counter_key",
            self.tenant_id, keys,
        )
        rows = await self.conn.fetch(
            "SELECT counter_key, value FROM usage_counters WHERE tenant_id = $1 AND counter_key = ANY($2::text[])"
            " ORDER BY counter_key FOR UPDATE",
            self.tenant_id, keys,
        )
        return {r["counter_key"]: r["value"] for r in rows}, {r["counter_key"] for r in created}

    async def set_counters(self, values: dict[str, int], *, unused: set[str]) -> None:
        """Store counters' new values (locked by ``lock_counters`` in this transaction), and drop
        the ones it created that no payment raised: a refused payment leaves no trace."""
        if unused:
            await self.conn.execute(
                "DELETE FROM usage_counters WHERE tenant_id = $1 AND counter_key = ANY($2::text[])",
                self.tenant_id, sorted(unused),
            )
        if values:
            await self.conn.execute(
                "UPDATE usage_counters c SET value = u.value, updated_at = now()"
                " FROM unnest($2::text[], $3::bigint[]) AS u(key, value)"
                " WHERE c.tenant_id = $1 AND c.counter_key = u.key",
                self.tenant_id, list(values), list(values.values()),
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

    # --- batches of transfers -----------------------------------------------------------------

    async def claim_keys(self, claims: list[tuple[str, str, bytes]]
                         ) -> tuple[set[str], dict[str, tuple[str, bytes, WriteResult | None]]]:
        """Claim many keys in one statement, in ascending key order (the lock order of keys):
        the keys claimed now, and for the others what they were claimed for."""
        claims = sorted(claims)
        rows = await self.conn.fetch(
            "INSERT INTO idempotency_keys (tenant_id, idempotency_key, operation, fingerprint)"
            " SELECT $1, u.key, u.op, u.fp FROM unnest($2::text[], $3::text[], $4::bytea[]) WITH ORDINALITY"
            " AS u(key, op, fp, n) ORDER BY u.n ON CONFLICT DO NOTHING RETURNING idempotency_key",
            self.tenant_id, [c[0] for c in claims], [c[1] for c in claims], [c[2] for c in claims],
        )
        claimed = {r["idempotency_key"] for r in rows}
        return claimed, await self._stored_keys([c[0] for c in claims if c[0] not in claimed])

    async def _stored_keys(self, keys: list[str]) -> dict[str, tuple[str, bytes, WriteResult | None]]:
        """What keys claimed before were claimed for: operation, fingerprint, result."""
        seen: dict[str, tuple[str, bytes, WriteResult | None]] = {}
        if keys:
            for row in await self.conn.fetch(
                "SELECT idempotency_key, operation, fingerprint, result FROM idempotency_keys"
                " WHERE tenant_id = $1 AND idempotency_key = ANY($2::text[])",
                self.tenant_id, keys,
            ):
                result = WriteResult.from_json(row["result"]) if row["result"] is not None else None
                seen[row["idempotency_key"]] = (row["operation"], bytes(row["fingerprint"]), result)
        return seen

    async def release_keys(self, keys: list[str]) -> None:
        """Give back keys claimed in this transaction for writes that were refused."""
        if keys:
            await self.conn.execute(
                "DELETE FROM idempotency_keys WHERE tenant_id = $1 AND idempotency_key = ANY($2::text[])",
                self.tenant_id, keys,
            )

    async def save_results(self, results: dict[str, WriteResult]) -> None:
        if results:
            await self.conn.execute(
                "UPDATE idempotency_keys k SET result = u.result FROM unnest($2::text[], $3::jsonb[]) AS u(key, result)"
                " WHERE k.tenant_id = $1 AND k.idempotency_key = u.key",
                self.tenant_id, list(results), [r.to_json() for r in results.values()],
            )

    async def open_member_purses(self, *, owner_ids: list[str], purse_kind: PurseKind, ref: str,
                                 ) -> dict[str, uuid.UUID]:
        """Each member's purse of this kind and ref, opened where missing (no-overdraft,
        unsharded, like every member purse): owner id -> account id."""
        await self.conn.execute(
            "INSERT INTO accounts (account_id, tenant_id, owner_kind, owner_id, purse_kind, ref, no_overdraft, sharded)"
            " SELECT gen_random_uuid(), $1, 'member', o, $3, $4, true, false FROM unnest($2::text[]) AS o"
            " ORDER BY o ON CONFLICT DO NOTHING",
            self.tenant_id, sorted(owner_ids), purse_kind.value, ref,
        )
        rows = await self.conn.fetch(
            "SELECT owner_id, account_id FROM accounts WHERE tenant_id = $1 AND owner_kind = 'member'"
            " AND owner_id = ANY($2::text[]) AND purse_kind = $3 AND ref = $4",
            self.tenant_id, owner_ids, purse_kind.value, ref,
        )
        return {r["owner_id"]: r["account_id"] for r in rows}

    async def post_many(self, items: list[NewTransfer], *, sharded: set[uuid.UUID]) -> list[Transfer]:
        """Book many transfers in a few statements: their rows (in the order given, which is their
        booking order), their postings, and one balance update per touched account. The caller
        holds the locks of the unsharded accounts; sharded ones are updated last, in account order."""
        if not items:
            return []
        ids = [uuid.uuid4() for _ in items]
        rows = await self.conn.fetch(
            "INSERT INTO transfers (transfer_id, tenant_id, kind, idempotency_key, amount_fen, merchant_account_id,"
            " device_id, external_ref, event_time, code_credential_id, code_counter)"
            " SELECT u.id, $1, u.kind, u.key, u.amount, u.merchant, u.device, u.ref, COALESCE(u.et, now()), u.cred,"
            " u.counter FROM unnest($2::uuid[], $3::text[], $4::text[], $5::bigint[], $6::uuid[], $7::text[],"
            " $8::text[], $9::timestamptz[], $10::text[], $11::bigint[]) WITH ORDINALITY"
            " AS u(id, kind, key, amount, merchant, device, ref, et, cred, counter, n)"
            f" ORDER BY u.n RETURNING {_TRANSFER_COLUMNS}",
            self.tenant_id, ids, [t.kind.value for t in items], [t.idempotency_key for t in items],
            [t.amount_fen for t in items], [t.merchant_account_id for t in items], [t.device_id for t in items],
            [t.external_ref for t in items], [t.event_time for t in items],
            [t.code.credential_id if t.code else "" for t in items], [t.code.counter if t.code else None for t in items],
        )
        by_id = {r["transfer_id"]: r for r in rows}
        legs = [(tid, p, leg) for tid, t in zip(ids, items, strict=True) for leg, p in enumerate(t.postings)]
        await self.conn.execute(
            "INSERT INTO postings (transfer_id, account_id, tenant_id, seq, leg, amount_fen, pending_fen)"
            " SELECT u.tid, u.aid, $1, u.seq, u.leg, u.amount, u.pending FROM unnest($2::uuid[], $3::uuid[],"
            " $4::bigint[], $5::smallint[], $6::bigint[], $7::bigint[]) AS u(tid, aid, seq, leg, amount, pending)",
            self.tenant_id, [tid for tid, _, _ in legs], [p.account_id for _, p, _ in legs],
            [by_id[tid]["seq"] for tid, _, _ in legs], [leg for _, _, leg in legs], [p.amount_fen for _, p, _ in legs],
            [p.pending_fen for _, p, _ in legs],
        )
        own: dict[uuid.UUID, list[int]] = {}
        shard: dict[uuid.UUID, int] = {}
        for _, p, _ in legs:
            if p.account_id in sharded:
                shard[p.account_id] = shard.get(p.account_id, 0) + p.amount_fen
            else:
                delta = own.setdefault(p.account_id, [0, 0])
                delta[0] += p.amount_fen
                delta[1] += p.pending_fen
        if own:
            await self.conn.execute(
                "UPDATE accounts a SET posted_fen = a.posted_fen + u.amount, pending_fen = a.pending_fen + u.pending"
                " FROM unnest($1::uuid[], $2::bigint[], $3::bigint[]) AS u(id, amount, pending)"
                " WHERE a.account_id = u.id",
                list(own), [d[0] for d in own.values()], [d[1] for d in own.values()],
            )
        for account_id in sorted(shard):
            if shard[account_id]:
                await self.conn.execute(
                    "INSERT INTO account_shards (account_id, shard, posted_fen) VALUES ($1, $2, $3)"
                    " ON CONFLICT (account_id, shard) DO UPDATE SET posted_fen = account_shards.posted_fen + $3",
                    account_id, secrets.randbelow(SHARD_COUNT), shard[account_id],
                )
        return [_transfer(by_id[tid], [{"account_id": p.account_id, "amount_fen": p.amount_fen,  # type: ignore[misc]
                                         "pending_fen": p.pending_fen} for p in t.postings])
                for tid, t in zip(ids, items, strict=True)]

    # --- the payment path: few round trips --------------------------------------------------------

    async def read_for_payments(self, *, claims: list[tuple[str, str, bytes]], account_ids: list[uuid.UUID],
                                counter_keys: list[str], codes: list[CodeRef]) -> PaymentReads:
        """Everything a batch of payments reads, in one statement, in the lock order: the keys
        claimed (key order), the purses locked and read (id order; a locking read answers each
        row's latest version), the merchants (unlocked), the guard counters (created at 0 when new,
        locked in key order), the e-codes already used, and the transaction's time."""
        claims = sorted(claims)
        keys = sorted(set(counter_keys))
        # The purse's low-balance threshold comes with the row the payment locks anyway.
        columns = ("account_id, tenant_id, owner_kind, owner_id, purse_kind, ref, no_overdraft, sharded, status,"
                   " low_balance_threshold_fen")
        row = await self.conn.fetchrow(
            "WITH claimed AS (INSERT INTO idempotency_keys (tenant_id, idempotency_key, operation, fingerprint)"
            " SELECT $1, u.key, u.op, u.fp FROM unnest($2::text[], $3::text[], $4::bytea[]) WITH ORDINALITY"
            " AS u(key, op, fp, n) ORDER BY u.n ON CONFLICT DO NOTHING RETURNING idempotency_key),"
            f" purses AS (SELECT {columns}, posted_fen, pending_fen FROM accounts WHERE tenant_id = $1"
            " AND account_id = ANY($5::uuid[]) AND NOT sharded ORDER BY account_id FOR UPDATE),"
            " created AS (INSERT INTO usage_counters (tenant_id, counter_key, value) SELECT $1, k, 0"
            " FROM unnest($6::text[]) AS k ORDER BY k ON CONFLICT DO NOTHING RETURNING counter_key),"
            " counters AS (SELECT counter_key, value FROM usage_counters WHERE tenant_id = $1"
            " AND counter_key = ANY($6::text[]) ORDER BY counter_key FOR UPDATE)"
            " SELECT now() AS now, ARRAY(SELECT idempotency_key FROM claimed) AS claimed,"
            " (SELECT json_agg(p) FROM purses p) AS purses,"
            f" (SELECT json_agg(s) FROM (SELECT {', '.join('a.' + c.strip() for c in columns.split(','))},"
            f" {_POSTED} AS posted_fen, a.pending_fen FROM accounts a WHERE a.tenant_id = $1"
            " AND a.account_id = ANY($5::uuid[]) AND a.sharded) s) AS sharded,"
            " ARRAY(SELECT counter_key FROM created) AS created,"
            " (SELECT json_agg(c) FROM counters c) AS counters,"
            " (SELECT json_agg(json_build_array(u.cred, u.counter)) FROM unnest($7::text[], $8::bigint[])"
            " AS u(cred, counter) WHERE EXISTS (SELECT 1 FROM transfers t WHERE t.tenant_id = $1"
            " AND t.code_credential_id = u.cred AND t.code_counter = u.counter"
            # The code index is partial: without this the planner cannot use it, and scans transfers.
            " AND t.code_credential_id <> '')) AS used_codes",
            self.tenant_id, [c[0] for c in claims], [c[1] for c in claims], [c[2] for c in claims],
            sorted(set(account_ids)), keys, [c.credential_id for c in codes], [c.counter for c in codes],
        )
        accounts: dict[uuid.UUID, AccountBalance] = {}
        for item in [*(row["purses"] or []), *(row["sharded"] or [])]:
            item["account_id"], item["tenant_id"] = uuid.UUID(item["account_id"]), uuid.UUID(item["tenant_id"])
            accounts[item["account_id"]] = AccountBalance(account=_account(item), balance=_balance(item))
        counters = {c["counter_key"]: c["value"] for c in row["counters"] or []}
        created = set(row["created"])
        counters.update({k: 0 for k in created})
        missing = [k for k in keys if k not in counters]
        if missing:
            # Created by a transaction that committed while this statement ran (its snapshot does
            # not show them): lock them now, still in key order after the ones held.
            more, _ = await self.lock_counters(missing)
            counters.update(more)
        claimed = set(row["claimed"])
        seen = await self._stored_keys([c[0] for c in claims if c[0] not in claimed])
        return PaymentReads(now=row["now"], claimed=claimed, seen=seen, accounts=accounts, counters=counters,
                            created_counters=created,
                            used_codes={CodeRef(c[0], c[1]) for c in row["used_codes"] or []})

    async def commit_payments(self, *, payments: list[tuple[uuid.UUID, NewTransfer]], outbox: list[tuple[Any, ...]],
                              results: dict[str, WriteResult], sharded: set[uuid.UUID],
                              counters: dict[str, int], unused_counters: set[str],
                              guards: list[tuple[uuid.UUID, Guard, int]], released_keys: list[str],
                              shard: int | None = None) -> None:
        """Everything a batch of payments writes, in one statement: the transfers, their postings,
        the balance caches (sharded ones last in account order), the payments' refund rows, the
        guard counters and their record, the outbox rows and the relay's wake-up, the keys'
        results, and the keys of refused payments given back. The caller holds the purse and
        counter locks; the zero-sum trigger checks the postings when the statement ends."""
        legs = [(tid, p, leg) for tid, t in payments for leg, p in enumerate(t.postings)]
        own: dict[uuid.UUID, int] = {}
        into_shards: dict[uuid.UUID, int] = {}
        for _, p, _ in legs:
            bucket = into_shards if p.account_id in sharded else own
            bucket[p.account_id] = bucket.get(p.account_id, 0) + p.amount_fen
        shard_ids = sorted(a for a in into_shards if into_shards[a])
        # A caller that books concurrently with others (a batch worker) names its own shard, so
        # two of them never wait on the same shard row; otherwise one at random.
        shards = [shard % SHARD_COUNT if shard is not None else secrets.randbelow(SHARD_COUNT) for _ in shard_ids]
        await self.conn.execute(
            "WITH t AS ("
            " INSERT INTO transfers (transfer_id, tenant_id, kind, idempotency_key, amount_fen, merchant_account_id,"
            " device_id, external_ref, event_time, code_credential_id, code_counter)"
            " SELECT u.id, $1, 'payment', u.key, u.amount, u.merchant, u.device, u.ref, COALESCE(u.et, now()), u.cred,"
            " u.counter FROM unnest($2::uuid[], $3::text[], $4::bigint[], $5::uuid[], $6::text[], $7::text[],"
            " $8::timestamptz[], $9::text[], $10::bigint[]) WITH ORDINALITY"
            " AS u(id, key, amount, merchant, device, ref, et, cred, counter, n) ORDER BY u.n"
            " RETURNING transfer_id, seq),"
            " p AS (INSERT INTO postings (transfer_id, account_id, tenant_id, seq, leg, amount_fen, pending_fen)"
            " SELECT l.tid, l.aid, $1, t.seq, l.leg, l.amount, 0 FROM unnest($11::uuid[], $12::uuid[], $13::smallint[],"
            " $14::bigint[]) AS l(tid, aid, leg, amount) JOIN t ON t.transfer_id = l.tid),"
            " a AS (UPDATE accounts a SET posted_fen = a.posted_fen + u.amount"
            " FROM unnest($15::uuid[], $16::bigint[]) AS u(id, amount) WHERE a.account_id = u.id),"
            " s AS (INSERT INTO account_shards (account_id, shard, posted_fen)"
            " SELECT u.id, u.shard, u.amount FROM unnest($17::uuid[], $18::smallint[], $19::bigint[])"
            " AS u(id, shard, amount) ORDER BY u.id"
            " ON CONFLICT (account_id, shard) DO UPDATE SET posted_fen = account_shards.posted_fen + EXCLUDED.posted_fen),"
            " pay AS (INSERT INTO payments (transfer_id, tenant_id, paid_fen)"
            " SELECT u.id, $1, u.amount FROM unnest($2::uuid[], $4::bigint[]) AS u(id, amount)),"
            " o AS (INSERT INTO outbox (event_id, subject, payload, headers)"
            " SELECT * FROM unnest($20::uuid[], $21::text[], $22::bytea[], $23::jsonb[])),"
            " k AS (UPDATE idempotency_keys k SET result = u.result FROM unnest($24::text[], $25::jsonb[])"
            " AS u(key, result) WHERE k.tenant_id = $1 AND k.idempotency_key = u.key),"
            " r AS (DELETE FROM idempotency_keys WHERE tenant_id = $1 AND idempotency_key = ANY($26::text[])),"
            " c AS (UPDATE usage_counters c SET value = u.value, updated_at = now()"
            " FROM unnest($27::text[], $28::bigint[]) AS u(key, value) WHERE c.tenant_id = $1 AND c.counter_key = u.key),"
            " cu AS (DELETE FROM usage_counters WHERE tenant_id = $1 AND counter_key = ANY($29::text[])),"
            " g AS (INSERT INTO transfer_guards (transfer_id, tenant_id, counter_key, increment, limit_value,"
            " value_after) SELECT u.tid, $1, u.key, u.inc, u.lim, u.after FROM unnest($30::uuid[], $31::text[],"
            " $32::bigint[], $33::bigint[], $34::bigint[]) AS u(tid, key, inc, lim, after) JOIN t ON t.transfer_id = u.tid)"
            f" SELECT {NOTIFY_RELAY_SQL}",
            self.tenant_id,
            [tid for tid, _ in payments], [t.idempotency_key for _, t in payments], [t.amount_fen for _, t in payments],
            [t.merchant_account_id for _, t in payments], [t.device_id for _, t in payments],
            [t.external_ref for _, t in payments], [t.event_time for _, t in payments],
            [t.code.credential_id if t.code else "" for _, t in payments],
            [t.code.counter if t.code else None for _, t in payments],
            [tid for tid, _, _ in legs], [p.account_id for _, p, _ in legs], [leg for _, _, leg in legs],
            [p.amount_fen for _, p, _ in legs],
            list(own), list(own.values()),
            shard_ids, shards, [into_shards[a] for a in shard_ids],
            [o[0] for o in outbox], [o[1] for o in outbox], [o[2] for o in outbox], [o[3] for o in outbox],
            list(results), [r.to_json() for r in results.values()],
            released_keys,
            list(counters), list(counters.values()), sorted(unused_counters),
            [g[0] for g in guards], [g[1].counter_key for g in guards], [g[1].increment for g in guards],
            [g[1].limit for g in guards], [g[2] for g in guards],
        )

    async def record_payments(self, payments: list[tuple[uuid.UUID, int]]) -> None:
        if payments:
            await self.conn.execute(
                "INSERT INTO payments (transfer_id, tenant_id, paid_fen)"
                " SELECT u.tid, $1, u.paid FROM unnest($2::uuid[], $3::bigint[]) AS u(tid, paid)",
                self.tenant_id, [p[0] for p in payments], [p[1] for p in payments],
            )

    async def open_receivable(self, member_id: str) -> AccountBalance:
        """The member's receivable (what offline payments could not take from the purses); it may
        go below zero, so it is sharded like every account without the no-overdraft flag."""
        account, _ = await self.open_account(owner_kind=OwnerKind.MEMBER, owner_id=member_id,
                                             purse_kind=PurseKind.RECEIVABLE, ref="",
                                             layout=account_layout(purse_kind=PurseKind.RECEIVABLE,
                                                                   no_overdraft=False))
        return await self.account(account.account_id)

    async def record_shortfalls(self, shortfalls: list[tuple[uuid.UUID, str, uuid.UUID, int]]) -> None:
        """(transfer, member, receivable account, shortfall) of offline settlements."""
        if shortfalls:
            await self.conn.execute(
                "INSERT INTO shortfalls (transfer_id, tenant_id, member_id, receivable_account_id, shortfall_fen)"
                " SELECT u.tid, $1, u.mid, u.rid, u.fen FROM unnest($2::uuid[], $3::text[], $4::uuid[], $5::bigint[])"
                " AS u(tid, mid, rid, fen)",
                self.tenant_id, [s[0] for s in shortfalls], [s[1] for s in shortfalls], [s[2] for s in shortfalls],
                [s[3] for s in shortfalls],
            )

    async def shortfall_by_transfer(self, transfer_ids: list[uuid.UUID]) -> dict[uuid.UUID, int]:
        rows = await self.conn.fetch(
            "SELECT transfer_id, shortfall_fen FROM shortfalls WHERE tenant_id = $1 AND transfer_id = ANY($2::uuid[])",
            self.tenant_id, transfer_ids,
        )
        return {r["transfer_id"]: r["shortfall_fen"] for r in rows}

    # --- programs -----------------------------------------------------------------------------

    async def insert_program(self, *, purse_kind: PurseKind, ref: str, funding_account_id: uuid.UUID,
                             ends_at: datetime | None) -> Program | None:
        row = await self.conn.fetchrow(
            f"INSERT INTO programs (tenant_id, purse_kind, ref, funding_account_id, ends_at)"
            f" VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING RETURNING {_PROGRAM_COLUMNS}",
            self.tenant_id, purse_kind.value, ref, funding_account_id, ends_at,
        )
        return None if row is None else _program(row)

    async def program(self, *, purse_kind: PurseKind, ref: str, lock: str = "") -> Program:
        """The program; ``lock`` is "" (none), "share" (grants: it must not end meanwhile) or
        "update" (its end)."""
        suffix = {"": "", "share": " FOR SHARE", "update": " FOR UPDATE"}[lock]
        row = await self.conn.fetchrow(
            f"SELECT {_PROGRAM_COLUMNS} FROM programs WHERE tenant_id = $1 AND purse_kind = $2 AND ref = $3{suffix}",
            self.tenant_id, purse_kind.value, ref,
        )
        if row is None:
            raise NotFound("no such program", reason="PROGRAM_NOT_FOUND")
        return _program(row)

    async def update_program(self, *, purse_kind: PurseKind, ref: str, ends_at: datetime | None = None,
                             status: ProgramStatus | None = None, expired_purses: int = 0,
                             expired_fen: int = 0, set_ends_at: bool = False) -> Program:
        row = await self.conn.fetchrow(
            "UPDATE programs SET ends_at = CASE WHEN $4 THEN $5 ELSE ends_at END, status = COALESCE($6, status),"
            " expired_purses = expired_purses + $7, expired_fen = expired_fen + $8"
            f" WHERE tenant_id = $1 AND purse_kind = $2 AND ref = $3 RETURNING {_PROGRAM_COLUMNS}",
            self.tenant_id, purse_kind.value, ref, set_ends_at, ends_at, status.value if status else None,
            expired_purses, expired_fen,
        )
        return _program(row)

    async def open_program_purses(self, *, purse_kind: PurseKind, ref: str, limit: int) -> list[uuid.UUID]:
        """Member purses of the program not closed yet (unlocked; the caller locks them)."""
        rows = await self.conn.fetch(
            "SELECT account_id FROM accounts WHERE tenant_id = $1 AND owner_kind = 'member' AND purse_kind = $2"
            " AND ref = $3 AND status <> 'closed' ORDER BY account_id LIMIT $4",
            self.tenant_id, purse_kind.value, ref, limit,
        )
        return [r["account_id"] for r in rows]

    async def close_accounts(self, account_ids: list[uuid.UUID]) -> None:
        await self.conn.execute(
            "UPDATE accounts SET status = 'closed' WHERE tenant_id = $1 AND account_id = ANY($2::uuid[])",
            self.tenant_id, account_ids,
        )

    # --- grant batches ------------------------------------------------------------------------

    async def insert_batch(self, *, batch_id: uuid.UUID, bill_number: str, fingerprint: bytes,
                           purse_kind: PurseKind, ref: str, rows: list[GrantRow]) -> GrantBatch | None:
        """The new batch and its rows; None when the bill number is taken."""
        row = await self.conn.fetchrow(
            "INSERT INTO grant_batches (batch_id, tenant_id, bill_number, fingerprint, purse_kind, ref, total_rows)"
            f" VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING RETURNING {_BATCH_COLUMNS}",
            batch_id, self.tenant_id, bill_number, fingerprint, purse_kind.value, ref, len(rows),
        )
        if row is None:
            return None
        await self.conn.execute(
            "INSERT INTO grant_rows (batch_id, line, member_id, amount_fen)"
            " SELECT $1, u.n, u.member, u.amount FROM unnest($2::text[], $3::bigint[]) WITH ORDINALITY"
            " AS u(member, amount, n)",
            batch_id, [r.member_id for r in rows], [r.amount_fen for r in rows],
        )
        return _batch(row)

    async def batch(self, *, batch_id: uuid.UUID | None = None, bill_number: str = "",
                    lock_running: bool = False) -> tuple[GrantBatch, bytes] | None:
        """A batch by id or bill number, with its fingerprint; None when there is none. With
        ``lock_running`` only a running batch nobody else is working on (SKIP LOCKED)."""
        where = "batch_id = $2" if batch_id is not None else "bill_number = $2"
        lock = " AND status = 'running' FOR UPDATE SKIP LOCKED" if lock_running else ""
        row = await self.conn.fetchrow(
            f"SELECT {_BATCH_COLUMNS}, fingerprint FROM grant_batches WHERE tenant_id = $1 AND {where}{lock}",
            self.tenant_id, batch_id if batch_id is not None else bill_number,
        )
        return None if row is None else (_batch(row), bytes(row["fingerprint"]))

    async def pending_rows(self, batch_id: uuid.UUID, *, limit: int) -> list[tuple[int, GrantRow]]:
        rows = await self.conn.fetch(
            "SELECT line, member_id, amount_fen FROM grant_rows WHERE batch_id = $1 AND status = 'pending'"
            " ORDER BY line LIMIT $2",
            batch_id, limit,
        )
        return [(r["line"], GrantRow(member_id=r["member_id"], amount_fen=r["amount_fen"])) for r in rows]

    async def finish_rows(self, batch_id: uuid.UUID, results: list[GrantRowResult]) -> None:
        await self.conn.execute(
            "UPDATE grant_rows g SET status = u.status, transfer_id = u.tid, account_id = u.aid, reason = u.reason,"
            " message = u.message FROM unnest($2::int[], $3::text[], $4::uuid[], $5::uuid[], $6::text[], $7::text[])"
            " AS u(line, status, tid, aid, reason, message) WHERE g.batch_id = $1 AND g.line = u.line",
            batch_id, [r.line for r in results], [r.status.value for r in results],
            [r.transfer_id for r in results], [r.account_id for r in results], [r.reason for r in results],
            [r.message for r in results],
        )

    async def advance_batch(self, batch_id: uuid.UUID, *, granted: int, failed: int, granted_fen: int) -> GrantBatch:
        row = await self.conn.fetchrow(
            "UPDATE grant_batches SET done_rows = done_rows + $2 + $3, granted_rows = granted_rows + $2,"
            " failed_rows = failed_rows + $3, granted_fen = granted_fen + $4,"
            " status = CASE WHEN done_rows + $2 + $3 >= total_rows THEN 'done' ELSE status END,"
            " finished_at = CASE WHEN done_rows + $2 + $3 >= total_rows THEN now() ELSE finished_at END"
            f" WHERE batch_id = $1 RETURNING {_BATCH_COLUMNS}",
            batch_id, granted, failed, granted_fen,
        )
        return _batch(row)

    async def batch_rows(self, batch_id: uuid.UUID, *, status: GrantRowStatus | None, after_line: int,
                         limit: int) -> list[GrantRowResult]:
        rows = await self.conn.fetch(
            "SELECT line, member_id, amount_fen, status, transfer_id, account_id, reason, message FROM grant_rows"
            " WHERE batch_id = $1 AND ($2::text IS NULL OR status = $2) AND line > $3 ORDER BY line LIMIT $4",
            batch_id, status.value if status else None, after_line, limit,
        )
        return [GrantRowResult(line=r["line"], member_id=r["member_id"], amount_fen=r["amount_fen"],
                               status=GrantRowStatus(r["status"]), transfer_id=r["transfer_id"],
                               account_id=r["account_id"], reason=r["reason"], message=r["message"]) for r in rows]

    # --- fundings, reversals and reconciliation -------------------------------------------------

    async def record_funding(self, *, transfer_id: uuid.UUID, account_id: uuid.UUID, bank_reference: str,
                             value_date: date) -> None:
        """A funding's bank reference and value date; a reference that funded the account before
        is BANK_REFERENCE_USED (the caller's transaction then rolls back)."""
        try:
            await self.conn.execute(
                "INSERT INTO clearing_fundings (transfer_id, tenant_id, account_id, bank_reference, value_date)"
                " VALUES ($1, $2, $3, $4, $5)",
                transfer_id, self.tenant_id, account_id, bank_reference, value_date,
            )
        except asyncpg.UniqueViolationError:
            raise bank_reference_used(bank_reference) from None

    async def funding_by_reference(self, *, account_id: uuid.UUID, bank_reference: str) -> uuid.UUID | None:
        return await self.conn.fetchval(
            "SELECT transfer_id FROM clearing_fundings WHERE tenant_id = $1 AND account_id = $2"
            " AND bank_reference = $3",
            self.tenant_id, account_id, bank_reference,
        )

    async def reversal_of(self, top_up_id: uuid.UUID) -> uuid.UUID | None:
        """The transfer that reversed the top-up, if one did."""
        return await self.conn.fetchval(
            "SELECT transfer_id FROM transfers WHERE tenant_id = $1 AND original_transfer_id = $2"
            " AND kind = 'top_up_reversal'",
            self.tenant_id, top_up_id,
        )

    async def lock_top_up(self, top_up_id: uuid.UUID) -> None:
        """Serialise reversals of one top-up (the unique index would refuse the second anyway; the
        lock makes it wait for the first and then answer TOP_UP_ALREADY_REVERSED)."""
        await self.conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"top-up:{top_up_id}")

    # The kinds that touch a clearing account, spelled as the partial index transfers_clearing_by_day
    # is, so the planner reads that index.
    _CLEARING_KINDS_SQL = "t.kind IN ('top_up', 'clearing_funding', 'top_up_reversal', 'bank_refund')"

    async def reconciliation_lines(self, *, account_id: uuid.UUID, start: datetime, end: datetime,
                                   after_seq: int | None, limit: int) -> list[tuple[ReconciliationLine, int]]:
        """(line, seq) of the transfers that moved the clearing account in [start, end), in booking
        order: each with its effect on the account, the member on its other side (if a member's)
        and a funding's value date."""
        rows = await self.conn.fetch(
            f"SELECT {', '.join('t.' + c.strip() for c in _TRANSFER_COLUMNS.split(','))},"
            " p.amount_fen AS clearing_fen,"
            " (SELECT a.owner_id FROM postings o JOIN accounts a ON a.account_id = o.account_id"
            "   WHERE o.transfer_id = t.transfer_id AND o.account_id <> $2 AND a.owner_kind = 'member' LIMIT 1)"
            " AS member_id, f.value_date"
            " FROM transfers t JOIN postings p ON p.transfer_id = t.transfer_id AND p.account_id = $2"
            " LEFT JOIN clearing_fundings f ON f.transfer_id = t.transfer_id"
            f" WHERE t.tenant_id = $1 AND {self._CLEARING_KINDS_SQL} AND t.booked_at >= $3 AND t.booked_at < $4"
            " AND ($5::bigint IS NULL OR t.seq > $5) ORDER BY t.seq LIMIT $6",
            self.tenant_id, account_id, start, end, after_seq, limit,
        )
        transfers = await self._with_postings(list(rows))
        return [(ReconciliationLine(transfer=t, clearing_fen=r["clearing_fen"], member_id=r["member_id"] or "",
                                    value_date=r["value_date"]), r["seq"])
                for t, r in zip(transfers, rows, strict=True)]

    async def reconciliation_sums(self, *, account_id: uuid.UUID, start: datetime, end: datetime
                                  ) -> tuple[dict[TransferKind, tuple[int, int]], int]:
        """The day's (count, effect on the account) per kind, and the effect of everything booked
        after the day (to walk the balance back from now to the day's close)."""
        rows = await self.conn.fetch(
            "SELECT t.kind, count(*)::int AS n, COALESCE(sum(p.amount_fen), 0)::bigint AS fen"
            " FROM transfers t JOIN postings p ON p.transfer_id = t.transfer_id AND p.account_id = $2"
            f" WHERE t.tenant_id = $1 AND {self._CLEARING_KINDS_SQL} AND t.booked_at >= $3 AND t.booked_at < $4"
            " GROUP BY t.kind",
            self.tenant_id, account_id, start, end,
        )
        later = await self.conn.fetchval(
            "SELECT COALESCE(sum(p.amount_fen), 0)::bigint"
            " FROM transfers t JOIN postings p ON p.transfer_id = t.transfer_id AND p.account_id = $2"
            f" WHERE t.tenant_id = $1 AND {self._CLEARING_KINDS_SQL} AND t.booked_at >= $3",
            self.tenant_id, account_id, end,
        )
        return {TransferKind(r["kind"]): (r["n"], r["fen"]) for r in rows}, later

    # --- statements ---------------------------------------------------------------------------

    def _statement_filter(self, *, merchant_account_id: uuid.UUID | None, device_id: str) -> tuple[str, Any]:
        if merchant_account_id is not None:
            return "t.merchant_account_id = $2", merchant_account_id
        # The device index is partial (device_id <> ''); saying so lets the planner use it.
        return "t.device_id = $2 AND t.device_id <> ''", device_id

    async def statement_lines(self, *, merchant_account_id: uuid.UUID | None, device_id: str, start: datetime,
                              end: datetime, after_seq: int | None, limit: int) -> list[tuple[Transfer, int, int]]:
        """(transfer, its effect on the merchant, seq) of the day's merchant-money transfers, in
        booking order."""
        where, value = self._statement_filter(merchant_account_id=merchant_account_id, device_id=device_id)
        rows = await self.conn.fetch(
            f"SELECT {', '.join('t.' + c.strip() for c in _TRANSFER_COLUMNS.split(','))}, p.amount_fen AS merchant_fen"
            " FROM transfers t JOIN postings p ON p.transfer_id = t.transfer_id AND p.account_id = t.merchant_account_id"
            f" WHERE t.tenant_id = $1 AND {where} AND t.booked_at >= $3 AND t.booked_at < $4"
            " AND t.kind = ANY($5::text[]) AND ($6::bigint IS NULL OR t.seq > $6) ORDER BY t.seq LIMIT $7",
            self.tenant_id, value, start, end, [k.value for k in STATEMENT_KINDS], after_seq, limit,
        )
        transfers = await self._with_postings(rows)
        return [(t, r["merchant_fen"], r["seq"]) for t, r in zip(transfers, rows, strict=True)]

    async def statement_totals(self, *, merchant_account_id: uuid.UUID | None, device_id: str, start: datetime,
                               end: datetime) -> StatementTotals:
        where, value = self._statement_filter(merchant_account_id=merchant_account_id, device_id=device_id)
        rows = await self.conn.fetch(
            "SELECT t.kind, count(*)::int AS n, COALESCE(sum(p.amount_fen), 0)::bigint AS fen"
            " FROM transfers t JOIN postings p ON p.transfer_id = t.transfer_id AND p.account_id = t.merchant_account_id"
            f" WHERE t.tenant_id = $1 AND {where} AND t.booked_at >= $3 AND t.booked_at < $4"
            " AND t.kind = ANY($5::text[]) GROUP BY t.kind",
            self.tenant_id, value, start, end, [k.value for k in STATEMENT_KINDS],
        )
        by_kind = {TransferKind(r["kind"]): (r["n"], r["fen"]) for r in rows}
        refunds, refunds_fen = by_kind.get(TransferKind.REFUND, (0, 0))
        paying = [by_kind.get(k, (0, 0)) for k in STATEMENT_KINDS if k is not TransferKind.REFUND]
        return StatementTotals(
            payments=sum(n for n, _ in paying), payments_fen=sum(f for _, f in paying), refunds=refunds,
            refunds_fen=-refunds_fen, offline_settlements=by_kind.get(TransferKind.OFFLINE_SETTLEMENT, (0, 0))[0],
            captures=by_kind.get(TransferKind.CAPTURE, (0, 0))[0],
        )

    async def _with_postings(self, rows: list[asyncpg.Record]) -> list[Transfer]:
        legs = await self.conn.fetch(
            "SELECT transfer_id, account_id, amount_fen, pending_fen FROM postings WHERE transfer_id = ANY($1::uuid[])"
            " ORDER BY transfer_id, leg",
            [r["transfer_id"] for r in rows],
        )
        by_transfer: dict[uuid.UUID, list[asyncpg.Record]] = {}
        for leg in legs:
            by_transfer.setdefault(leg["transfer_id"], []).append(leg)
        return [_transfer(r, by_transfer.get(r["transfer_id"], [])) for r in rows]


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

    async def member_states(self, questions: list[tuple[uuid.UUID, str, list[str], str]]
                            ) -> list[tuple[list[AccountBalance], dict[str, int], uuid.UUID | None]]:
        """For each (tenant, member, counter keys, idempotency key): the member's accounts with
        balances, the counters' values, and the transfer booked under the key if any. One
        statement for all of them (one snapshot, one round trip, no explicit transaction): the
        read a policy makes per payment, batched."""
        columns = "account_id, tenant_id, owner_kind, owner_id, purse_kind, ref, no_overdraft, sharded, status"
        key_of = [n for n, (_, _, keys, _) in enumerate(questions) for _ in keys]
        keys = [k for (_, _, ks, _) in questions for k in ks]
        rows = await self._pool.fetch(
            "SELECT u.n,"
            " (SELECT json_agg(x ORDER BY x.purse_kind, x.ref) FROM (SELECT"
            f" {', '.join('a.' + c.strip() for c in columns.split(','))}, {_POSTED} AS posted_fen, a.pending_fen"
            " FROM accounts a WHERE a.tenant_id = u.tenant AND a.owner_kind = 'member' AND a.owner_id = u.member) x)"
            " AS accounts,"
            " (SELECT json_agg(json_build_array(c.counter_key, c.value)) FROM usage_counters c"
            " WHERE c.tenant_id = u.tenant AND c.counter_key IN"
            " (SELECT k.key FROM unnest($4::int[], $5::text[]) AS k(n, key) WHERE k.n = u.n)) AS counters,"
            " (SELECT t.transfer_id FROM transfers t WHERE t.tenant_id = u.tenant AND u.idem <> ''"
            # The key index is partial (idempotency_key <> ''); saying so lets the planner use it.
            " AND t.idempotency_key = u.idem AND t.idempotency_key <> '') AS existing"
            " FROM unnest($1::uuid[], $2::text[], $3::text[]) WITH ORDINALITY AS u(tenant, member, idem, n)"
            " ORDER BY u.n",
            [q[0] for q in questions], [q[1] for q in questions], [q[3] for q in questions],
            [n + 1 for n in key_of], keys,
        )
        answers = []
        for row in rows:
            accounts = []
            for item in row["accounts"] or []:
                item["account_id"], item["tenant_id"] = uuid.UUID(item["account_id"]), uuid.UUID(item["tenant_id"])
                accounts.append(AccountBalance(account=_account(item), balance=_balance(item)))
            answers.append((accounts, {k: v for k, v in row["counters"] or []}, row["existing"]))
        return answers

    async def running_batches(self) -> list[tuple[uuid.UUID, uuid.UUID]]:
        """(tenant, batch) of grant batches still running, oldest first."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT tenant_id, batch_id FROM grant_batches WHERE status = 'running' ORDER BY created_at")
        return [(r["tenant_id"], r["batch_id"]) for r in rows]

    async def due_programs(self) -> list[tuple[uuid.UUID, PurseKind, str]]:
        """(tenant, purse kind, ref) of programs past their end and not ended yet."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT tenant_id, purse_kind, ref FROM programs WHERE status <> 'ended' AND ends_at <= now()"
                " ORDER BY ends_at")
        return [(r["tenant_id"], PurseKind(r["purse_kind"]), r["ref"]) for r in rows]


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
        "code": {"credential_id": transfer.code.credential_id, "counter": transfer.code.counter}
        if transfer.code else None,
        **extra,
    }


def account_data(account: Account) -> dict[str, Any]:
    return {
        "tenant_id": str(account.tenant_id),
        "account_id": str(account.account_id),
        "owner_kind": account.owner_kind.value,
        "owner_id": account.owner_id,
        "purse_kind": account.purse_kind.value,
        "ref": account.ref,
        "status": account.status.value,
    }
