"""`onecard-admin migrate` against the test's own database: each service's schema as the bootstrap
leaves it (made, owned by its role, empty), migrated as that role, once."""
from __future__ import annotations

import io
import json
from typing import Any

import asyncpg
import pytest

from onecard_admin.cli import run
from onecard_admin.migrations import url_setting
from onecard_admin.settings import SERVICE_NAMES
from tests.mesh import service_values


async def migrate(*argv: str) -> tuple[int, dict[str, Any], str]:
    out, err = io.StringIO(), io.StringIO()
    code = await run(["--json", "migrate", *argv], out=out, err=err)
    return code, json.loads(out.getvalue()) if out.getvalue() else {}, err.getvalue()


@pytest.fixture
def role_urls(database_url: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Each service's own role's URL, where its migration Job would have it."""
    urls = {name: service_values(name, database_url)["database_url"] for name in SERVICE_NAMES}
    for name, url in urls.items():
        monkeypatch.setenv(url_setting(name), url)
    monkeypatch.delenv("ONECARD_INSECURE_DEVELOPMENT", raising=False)
    return urls


def by_service(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["service"]: row for row in doc["migrations"]}


async def test_a_fresh_database_is_migrated_once_and_a_second_run_applies_nothing(role_urls: dict[str, str]) -> None:
    code, dry, _ = await migrate("--dry-run")
    assert code == 1 and dry["dry_run"] is True  # pending is bad news until applied
    pending = {name: row["pending"] for name, row in by_service(dry).items()}
    assert set(pending) == set(SERVICE_NAMES)
    assert all(rows[0] == "runtime/0001_runtime" and len(rows) > 1 for rows in pending.values()), pending
    assert all(row["applied"] == [] and row["already"] == 0 for row in dry["migrations"])

    code, first, err = await migrate()
    assert code == 0, err
    assert {name: row["applied"] for name, row in by_service(first).items()} == pending
    # The tables are the service role's own, made by it.
    conn = await asyncpg.connect(role_urls["ledger"])
    try:
        assert await conn.fetchval("SELECT tableowner FROM pg_tables WHERE schemaname = 'ledger'"
                                   " AND tablename = 'outbox'") == "onecard_ledger"
    finally:
        await conn.close()

    code, second, _ = await migrate()
    assert code == 0
    assert all(row["applied"] == [] and row["already"] == len(pending[row["service"]]) for row in second["migrations"])
    code, dry_again, _ = await migrate("--dry-run")
    assert code == 0 and all(row["pending"] == [] for row in dry_again["migrations"])


async def test_service_picks_one_schema(role_urls: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    # Only the chosen service's URL is needed.
    monkeypatch.delenv(url_setting("identity"))
    code, doc, err = await migrate("--service", "policy")
    assert code == 0, err
    assert [row["service"] for row in doc["migrations"]] == ["policy"] and doc["migrations"][0]["applied"]
    code, dry, _ = await migrate("--dry-run", "--service", "ledger", "--service", "policy")
    assert code == 1
    assert by_service(dry)["policy"]["pending"] == [] and by_service(dry)["ledger"]["pending"]


async def test_a_missing_url_or_a_superuser_is_refused_and_nothing_is_applied(
        role_urls: dict[str, str], database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(url_setting("webhooks"))
    code, doc, err = await migrate()
    assert (code, doc) == (2, {}) and "ONECARD_WEBHOOKS_DATABASE_URL" in err and "Traceback" not in err

    monkeypatch.setenv(url_setting("webhooks"), database_url)
    code, _, err = await migrate("--service", "webhooks")
    assert code == 2 and "superuser" in err and database_url not in err
    code, dry, _ = await migrate("--dry-run", "--service", "ledger")
    assert code == 1 and by_service(dry)["ledger"]["already"] == 0
