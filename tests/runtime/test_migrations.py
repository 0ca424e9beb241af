import asyncio
import shutil
from pathlib import Path

import asyncpg
import pytest

from runtime.db import MigrationError, migrate
from tests.runtime.support import MIGRATIONS, SCHEMA


async def test_migrations_apply_from_empty_database_then_reapply_as_no_op(database_url: str) -> None:
    applied = await migrate(database_url, schema=SCHEMA, migrations_dir=MIGRATIONS)
    assert applied == ["runtime/0001_runtime", "widgets/0001_widgets"]

    conn = await asyncpg.connect(database_url)
    try:
        tables = {r["table_name"] for r in await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", SCHEMA)}
        assert {"outbox", "processed_events", "widgets", "effects", "schema_migrations"} <= tables
        before = await conn.fetch(f"SELECT component, version, applied_at FROM {SCHEMA}.schema_migrations ORDER BY 1, 2")

        assert await migrate(database_url, schema=SCHEMA, migrations_dir=MIGRATIONS) == []

        after = await conn.fetch(f"SELECT component, version, applied_at FROM {SCHEMA}.schema_migrations ORDER BY 1, 2")
        assert before == after
    finally:
        await conn.close()


async def test_concurrent_migrations_apply_each_file_once(database_url: str) -> None:
    results = await asyncio.gather(*[migrate(database_url, schema=SCHEMA, migrations_dir=MIGRATIONS) for _ in range(4)])
    assert sorted(len(r) for r in results) == [0, 0, 0, 2]


async def test_an_applied_migration_that_changed_is_refused(database_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, folder)
    await migrate(database_url, schema=SCHEMA, migrations_dir=folder)
    target = folder / "0001_widgets.sql"
    target.write_text(target.read_text() + "\n-- edited after release\n")
    with pytest.raises(MigrationError, match="changed after it was applied"):
        await migrate(database_url, schema=SCHEMA, migrations_dir=folder)


async def test_a_failing_migration_leaves_nothing_behind(database_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, folder)
    (folder / "0002_broken.sql").write_text("CREATE TABLE half_done (id INT);\nSELECT no_such_function();\n")
    with pytest.raises(asyncpg.PostgresError):
        await migrate(database_url, schema=SCHEMA, migrations_dir=folder)
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT to_regclass('widgets.half_done')") is None
        versions = await conn.fetch(f"SELECT component, version FROM {SCHEMA}.schema_migrations")
        assert ("widgets", 2) not in {(r["component"], r["version"]) for r in versions}
    finally:
        await conn.close()
