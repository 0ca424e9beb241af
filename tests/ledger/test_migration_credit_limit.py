"""Migration 0006 on a ledger made before it: clearing accounts fold their shards into their row
and may owe what they owed already, nothing more."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import asyncpg

from runtime.db import migrate
from services.ledger.app import MIGRATIONS_DIR

SCHEMA = "ledger_before_credit"


async def test_existing_clearing_accounts_keep_their_balance_and_owe_no_more_than_before(
        database_url: str, tmp_path: Path) -> None:
    before, through = tmp_path / "before", tmp_path / "through"
    before.mkdir()
    through.mkdir()
    # The migrations before 0006, then those through 0006 (later ones are not this test's).
    for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
        if int(path.name[:4]) < 6:
            shutil.copy(path, before / path.name)
        if int(path.name[:4]) <= 6:
            shutil.copy(path, through / path.name)
    await migrate(database_url, schema=SCHEMA, migrations_dir=before)
    conn = await asyncpg.connect(database_url, server_settings={"search_path": SCHEMA})
    try:
        tenant, bank, idle, cash = uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        await conn.execute(
            "INSERT INTO accounts (account_id, tenant_id, owner_kind, owner_id, purse_kind, ref, no_overdraft, sharded)"
            " VALUES ($1, $4, 'tenant', 't', 'bank_clearing', 'bank', false, true),"
            " ($2, $4, 'tenant', 't', 'bank_clearing', 'idle', false, true),"
            " ($3, $4, 'member', 'm', 'cash', '', true, false)", bank, idle, cash, tenant)
        # 700 topped up from the bank, in two shards, as the sharded ledger booked it.
        await conn.execute("INSERT INTO account_shards (account_id, shard, posted_fen) VALUES ($1, 0, -300),"
                           " ($1, 5, -400)", bank)
        await conn.execute("UPDATE accounts SET posted_fen = 700 WHERE account_id = $1", cash)

        assert await migrate(database_url, schema=SCHEMA, migrations_dir=through) == [
            f"{SCHEMA}/0006_clearing_credit_limit"]

        rows = {r["account_id"]: r for r in await conn.fetch(
            "SELECT account_id, sharded, posted_fen, credit_limit_fen FROM accounts")}
        assert (rows[bank]["sharded"], rows[bank]["posted_fen"], rows[bank]["credit_limit_fen"]) == (False, -700, 700)
        assert (rows[idle]["sharded"], rows[idle]["posted_fen"], rows[idle]["credit_limit_fen"]) == (False, 0, 0)
        assert rows[cash]["credit_limit_fen"] is None
        assert await conn.fetchval("SELECT count(*) FROM account_shards") == 0
    finally:
        await conn.execute(f"DROP SCHEMA {SCHEMA} CASCADE")
        await conn.close()
