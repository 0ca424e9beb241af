"""The asyncpg pool (one schema per service) and versioned SQL migrations."""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from runtime.logs import get_logger

log = get_logger(__name__)

RUNTIME_MIGRATIONS = Path(__file__).parent / "sql"
DEFAULT_POOL_MIN = 1
DEFAULT_POOL_MAX = 10
DEFAULT_COMMAND_TIMEOUT_S = 30.0
_MIGRATION_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_SCHEMA_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


def _check_schema(schema: str) -> str:
    if not _SCHEMA_NAME.match(schema):
        raise ValueError(f"bad schema name {schema!r}")
    return schema


async def _init_connection(conn: asyncpg.Connection) -> None:
    for type_name in ("json", "jsonb"):
        await conn.set_type_codec(type_name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def create_pool(
    dsn: str,
    *,
    schema: str,
    min_size: int = DEFAULT_POOL_MIN,
    max_size: int = DEFAULT_POOL_MAX,
    command_timeout_s: float = DEFAULT_COMMAND_TIMEOUT_S,
) -> asyncpg.Pool:
    """A pool whose connections see only ``schema`` (and pg_catalog) by default."""
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        command_timeout=command_timeout_s,
        server_settings={"search_path": _check_schema(schema), "application_name": f"onecard-{schema}"},
        init=_init_connection,
        reset=_reset_connection,
    )
    assert pool is not None
    return pool


async def _reset_connection(conn: asyncpg.Connection) -> None:
    """What a connection returned to the pool needs: nothing, unless it was left in a transaction
    (asyncpg's default reset runs four statements per release, a round trip each transaction;
    the runtime never uses session state: no LISTEN on pooled connections, no advisory locks held
    past a transaction, no prepared cursors)."""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


@dataclass(frozen=True)
class Migration:
    component: str
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


class MigrationError(RuntimeError):
    pass


def load_migrations(component: str, directory: Path) -> list[Migration]:
    migrations = []
    for path in sorted(directory.glob("*.sql")):
        match = _MIGRATION_FILE.match(path.name)
        if not match:
            raise MigrationError(f"{path}: migration files are named NNNN_name.sql")
        migrations.append(Migration(component, int(match[1]), match[2], path.read_text()))
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"{directory}: two migrations share a version")
    return migrations


async def migrate(dsn: str, *, schema: str, migrations_dir: Path) -> list[str]:
    """Apply the runtime's and the service's migrations to ``schema``; answer what was applied.

    Each file runs once, in its own transaction, under an advisory lock so that two starting
    replicas do not race. An applied file whose text changed since is an error, not a silent skip.
    """
    _check_schema(schema)
    plan = load_migrations("runtime", RUNTIME_MIGRATIONS) + load_migrations(schema, migrations_dir)
    conn = await asyncpg.connect(dsn)
    applied: list[str] = []
    try:
        await conn.execute("SELECT pg_advisory_lock(hashtext($1))", f"onecard.migrate.{schema}")
        try:
            # The service's role owns its schema but may not create one (the bootstrap made it):
            # ask first, so only a stack without roles creates it here.
            if not await conn.fetchval("SELECT true FROM pg_namespace WHERE nspname = $1", schema):
                await conn.execute(f"CREATE SCHEMA {schema}")
            await conn.execute(
                f"""CREATE TABLE IF NOT EXISTS {schema}.schema_migrations (
                        component  TEXT NOT NULL,
                        version    INT NOT NULL,
                        name       TEXT NOT NULL,
                        checksum   TEXT NOT NULL,
                        applied_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                        PRIMARY KEY (component, version))"""
            )
            done = {
                (r["component"], r["version"]): r["checksum"]
                for r in await conn.fetch(f"SELECT component, version, checksum FROM {schema}.schema_migrations")
            }
            for m in plan:
                key = (m.component, m.version)
                if key in done:
                    if done[key] != m.checksum:
                        raise MigrationError(
                            f"{schema}: migration {m.component}/{m.version:04d}_{m.name} changed after it was applied"
                        )
                    continue
                async with conn.transaction():
                    await conn.execute(f"SET LOCAL search_path TO {schema}")
                    await conn.execute(m.sql)
                    await conn.execute(
                        f"INSERT INTO {schema}.schema_migrations (component, version, name, checksum)"
                        " VALUES ($1, $2, $3, $4)",
                        m.component,
                        m.version,
                        m.name,
                        m.checksum,
                    )
                applied.append(f"{m.component}/{m.version:04d}_{m.name}")
                log.info("migration applied", schema=schema, migration=applied[-1])
        finally:
            await conn.execute("SELECT pg_advisory_unlock(hashtext($1))", f"onecard.migrate.{schema}")
    finally:
        await conn.close()
    return applied


@dataclass(frozen=True)
class MigrationStatus:
    """A schema's migrations against the files shipped: ``component/NNNN_name`` each."""

    applied: list[str]
    pending: list[str]
    # Applied rows no shipped file matches: a newer release migrated this schema.
    unknown: list[str]

    @property
    def known(self) -> int:
        return len(self.applied) + len(self.pending)


def _label(component: str, version: int, name: str) -> str:
    return f"{component}/{version:04d}_{name}"


async def migration_status(conn: asyncpg.Connection, *, schema: str, migrations_dir: Path) -> MigrationStatus:
    """What ``migrate`` would apply to ``schema`` and what it already did; reads only."""
    _check_schema(schema)
    plan = load_migrations("runtime", RUNTIME_MIGRATIONS) + load_migrations(schema, migrations_dir)
    exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{schema}.schema_migrations")
    rows = await conn.fetch(f"SELECT component, version, name FROM {schema}.schema_migrations") if exists else []
    done = {(r["component"], r["version"]): r["name"] for r in rows}
    shipped = {(m.component, m.version) for m in plan}
    return MigrationStatus(
        applied=[_label(m.component, m.version, m.name) for m in plan if (m.component, m.version) in done],
        pending=[_label(m.component, m.version, m.name) for m in plan if (m.component, m.version) not in done],
        unknown=sorted(_label(c, v, n) for (c, v), n in done.items() if (c, v) not in shipped))
