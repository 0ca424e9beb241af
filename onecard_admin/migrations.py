"""`onecard-admin migrate`: each service's migrations, applied (or, ``--dry-run``, listed) with the
same code its Job runs (``python -m services.<name> migrate``: runtime.db.migrate under its
advisory lock) and as the same identity: the service's own PostgreSQL role, whose URL is
``ONECARD_<SERVICE>_DATABASE_URL``. Not the operator's mesh certificate: migrations are SQL in a
schema only its service's role owns, so the tool needs that role's URL and nothing else.

A superuser's URL is refused (tables it made would not be the role's), as the service refuses it,
unless ONECARD_INSECURE_DEVELOPMENT=1.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from onecard_admin.settings import SERVICE_NAMES
from runtime.db import MigrationError, migrate, migration_status
from runtime.dbroles import is_superuser
from runtime.mesh import INSECURE_SETTING

CONNECT_TIMEOUT_S = 10.0


class MigrateSetupError(RuntimeError):
    """A service cannot be migrated as asked; the message says why (never the URL's password)."""


def url_setting(service: str) -> str:
    return f"ONECARD_{service.upper()}_DATABASE_URL"


def schema_of(service: str) -> tuple[str, Path]:
    """The schema and migrations folder the service's own app declares."""
    app = importlib.import_module(f"services.{service}.app")
    return app.SCHEMA, app.MIGRATIONS_DIR


@dataclass(frozen=True)
class MigrateResult:
    service: str
    schema: str
    # Applied by this run (empty on a dry run).
    applied: list[str] = field(default_factory=list)
    # Still to apply (a dry run's answer; empty after a real run).
    pending: list[str] = field(default_factory=list)
    # Applied before this run.
    already: int = 0


def database_urls(services: list[str], environ: dict[str, str] | None = None) -> dict[str, str]:
    """Each service's URL from the environment; all must be set, else one error naming what is missing."""
    environ = dict(os.environ if environ is None else environ)
    missing = [url_setting(s) for s in services if not environ.get(url_setting(s))]
    if missing:
        raise MigrateSetupError(f"missing required setting {', '.join(missing)} (the service's own PostgreSQL "
                                f"role, as its migration Job has it)")
    return {s: environ[url_setting(s)] for s in services}


async def migrate_service(service: str, url: str, *, dry_run: bool, insecure: bool) -> MigrateResult:
    schema, migrations_dir = schema_of(service)
    try:
        conn = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT_S)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise MigrateSetupError(f"{service}: cannot connect with {url_setting(service)}: "
                                f"{type(exc).__name__}") from None
    try:
        if await is_superuser(conn) and not insecure:
            raise MigrateSetupError(f"{service}: {url_setting(service)} names a PostgreSQL superuser; give the "
                                    f"service's own role (runtime.dbroles), or set {INSECURE_SETTING}=1 for "
                                    f"development only")
        before = await migration_status(conn, schema=schema, migrations_dir=migrations_dir)
    finally:
        await conn.close()
    if dry_run:
        return MigrateResult(service, schema, pending=before.pending, already=len(before.applied))
    try:
        applied = await migrate(url, schema=schema, migrations_dir=migrations_dir)
    except (MigrationError, asyncpg.PostgresError) as exc:
        raise MigrateSetupError(f"{service}: {type(exc).__name__}: {exc}"[:300]) from None
    return MigrateResult(service, schema, applied=applied, already=len(before.applied))


async def migrate_all(services: list[str] | None, *, dry_run: bool,
                      environ: dict[str, str] | None = None) -> list[MigrateResult]:
    """In the stack's start order, one service after the other; the first failure stops the run."""
    chosen = [s for s in SERVICE_NAMES if s in set(services)] if services else list(SERVICE_NAMES)
    urls = database_urls(chosen, environ)
    insecure_value = (os.environ if environ is None else environ).get(INSECURE_SETTING, "")
    insecure = insecure_value.lower() in ("1", "true", "yes", "on")
    return [await migrate_service(s, urls[s], dry_run=dry_run, insecure=insecure) for s in chosen]
