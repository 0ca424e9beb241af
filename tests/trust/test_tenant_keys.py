"""Every table a tenant's data lives in leads its primary key with ``tenant_id``, so the schemas can
be distributed by tenant (Citus) without re-keying (docs/scaling.md). The tables that do not yet are
named here, each kind with its reason; the list may only shrink: a new table keyed otherwise fails,
and so does one named here that has been re-keyed (take it off the list)."""
from __future__ import annotations

import asyncpg

from tests.conftest import RunningService

SCHEMAS = ("identity", "codegen", "ledger", "policy", "devicehub", "webhooks")
# Each service's own machinery, local to a node under Citus: no tenant's rows.
PER_SERVICE = frozenset({"outbox", "processed_events", "schema_migrations"})
# The platform's, not a tenant's: an API client is granted to many tenants (a reference table).
PLATFORM = frozenset({"identity.api_clients"})
# Still keyed by their own id (or, for child rows, by their parent's, with no tenant_id column):
# the Citus move re-keys these first.
NOT_YET_KEYED_BY_TENANT = frozenset({
    "devicehub.alarms", "devicehub.devices", "devicehub.enrolment_tokens", "devicehub.rollout_devices",
    "devicehub.rollouts",
    "identity.external_user_bindings", "identity.member_import_errors", "identity.member_imports",
    "ledger.account_shards", "ledger.accounts", "ledger.clearing_fundings", "ledger.grant_batches",
    "ledger.grant_rows", "ledger.holds", "ledger.payments", "ledger.postings", "ledger.shortfalls",
    "ledger.transfer_guards", "ledger.transfers",
})

PRIMARY_KEYS = """
SELECT n.nspname AS schema, c.relname AS table,
       (SELECT array_agg(a.attname ORDER BY k.ord)
          FROM unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
          JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum) AS primary_key
  FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace
  LEFT JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary
 WHERE c.relkind IN ('r', 'p') AND n.nspname = ANY($1::text[])
"""


async def test_every_tenants_table_leads_its_primary_key_with_tenant_id(mesh: dict[str, RunningService],
                                                                         database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(PRIMARY_KEYS, list(SCHEMAS))
    finally:
        await conn.close()
    assert {r["schema"] for r in rows} == set(SCHEMAS), "every service's schema is migrated"
    tables = {f"{r['schema']}.{r['table']}": list(r["primary_key"] or []) for r in rows}
    assert NOT_YET_KEYED_BY_TENANT | PLATFORM <= tables.keys(), "a table named here no longer exists"

    keyed_otherwise = sorted(name for name, key in tables.items()
                             if name.split(".")[1] not in PER_SERVICE and name not in PLATFORM
                             and name not in NOT_YET_KEYED_BY_TENANT and key[:1] != ["tenant_id"])
    assert keyed_otherwise == [], f"tables whose primary key does not start with tenant_id: {keyed_otherwise}"
    rekeyed = sorted(name for name in NOT_YET_KEYED_BY_TENANT if tables[name][:1] == ["tenant_id"])
    assert rekeyed == [], f"keyed by tenant now: take them off NOT_YET_KEYED_BY_TENANT: {rekeyed}"
    assert all(tables[name] for name in tables), "every table has a primary key"
