"""PostgreSQL roles per service: each service connects as its own role, which owns its schema and
reaches no other; none is a superuser, and a service told to connect as one refuses to start."""
from __future__ import annotations

import asyncpg
import pytest

from runtime.dbroles import (ADMIN_URL_SETTING, ServiceRole, bootstrap, bootstrap_statements, password_setting, role_dsn,
                             role_name)
from runtime.dbroles import main as dbroles_main
from services.ledger.app import build_app as build_ledger
from tests.conftest import Launch, RunningService
from tests.ledger.conftest import ledger_settings
from tests.mesh import pg_password, service_values


async def test_each_service_runs_as_its_own_role_that_is_no_superuser(mesh: dict[str, RunningService]) -> None:
    for name, service in mesh.items():
        async with service.app.pool.acquire() as conn:
            who = await conn.fetchrow(
                "SELECT current_user AS role, rolsuper, rolcreaterole, rolcreatedb FROM pg_roles"
                " WHERE rolname = current_user")
            owner = await conn.fetchval("SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = $1", name)
        assert who["role"] == role_name(name), name
        assert not (who["rolsuper"] or who["rolcreaterole"] or who["rolcreatedb"]), name
        assert owner == role_name(name), name


async def test_the_ledgers_role_cannot_read_identitys_members(mesh: dict[str, RunningService],
                                                              database_url: str) -> None:
    ledger_url = service_values("ledger", database_url)["database_url"]
    conn = await asyncpg.connect(ledger_url)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetch("SELECT * FROM identity.members LIMIT 1")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("CREATE SCHEMA sneaky")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("CREATE TABLE public.sneaky (x int)")
        # Its own schema is its own.
        assert await conn.fetchval("SELECT count(*) FROM ledger.accounts") >= 0
    finally:
        await conn.close()


async def test_a_service_told_to_connect_as_a_superuser_refuses_to_start(
        launch: Launch, database_url: str, nats_url: str) -> None:
    app = build_ledger(ledger_settings(database_url=database_url, nats_url=nats_url))
    app.settings = app.settings.model_copy(update={"database_url": database_url})  # the superuser's URL
    with pytest.raises(RuntimeError, match="superuser"):
        await launch(app)
    conn = await asyncpg.connect(database_url)
    try:
        # It wrote nothing before refusing.
        assert await conn.fetchval("SELECT to_regclass('ledger.accounts')") is None
    finally:
        await conn.close()


async def test_the_bootstrap_hands_an_older_stacks_schema_to_the_role_and_can_run_again(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        # A stack from before roles: the superuser made the schema, a table with an identity
        # column, a sequence and a function.
        await conn.execute("""
            CREATE SCHEMA legacy;
            CREATE TABLE legacy.things (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name text);
            CREATE SEQUENCE legacy.numbers;
            CREATE FUNCTION legacy.nothing() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
        """)
    finally:
        await conn.close()
    roles = [ServiceRole(schema="legacy", password=pg_password("legacy"))]
    database = database_url.rsplit("/", 1)[1].split("?")[0]
    await bootstrap(database_url, database=database, roles=roles)
    await bootstrap(database_url, database=database, roles=roles)

    legacy = await asyncpg.connect(role_dsn(database_url, role=role_name("legacy"), password=pg_password("legacy")))
    try:
        owners = await legacy.fetch("""
            SELECT c.relname, pg_get_userbyid(c.relowner) AS owner FROM pg_class c
            JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'legacy'""")
        assert {r["owner"] for r in owners} == {"onecard_legacy"}, owners
        assert await legacy.fetchval("SELECT pg_get_userbyid(proowner) FROM pg_proc WHERE proname = 'nothing'"
                                     ) == "onecard_legacy"
        await legacy.execute("INSERT INTO legacy.things (name) VALUES ('kept')")
        await legacy.execute("DROP TABLE legacy.things")  # the owner's right, and only the owner's
    finally:
        await legacy.close()
    assert all("PUBLIC" not in s or s.startswith("REVOKE")
               for s in bootstrap_statements(database=database, roles=roles))


def test_the_bootstrap_command_takes_every_password_from_the_environment(database_url: str) -> None:
    """``python -m runtime.dbroles``, as the Kubernetes bootstrap Job runs it: no password on the
    command line, a missing one named, and each role able to sign in with its own afterwards."""
    import asyncio

    database = database_url.rsplit("/", 1)[1].split("?")[0]
    env = {ADMIN_URL_SETTING: database_url, password_setting("cli_a"): pg_password("cli_a")}
    with pytest.raises(SystemExit, match=password_setting("cli_b")):
        dbroles_main(["--database", database, "cli_a", "cli_b"], env=env)
    with pytest.raises(SystemExit, match=ADMIN_URL_SETTING):
        dbroles_main(["--database", database, "cli_a"], env={password_setting("cli_a"): "x"})
    env[password_setting("cli_b")] = pg_password("cli_b")
    assert dbroles_main(["--database", database, "cli_a", "cli_b"], env=env) == 0

    async def owner_as(schema: str) -> str:
        conn = await asyncpg.connect(role_dsn(database_url, role=role_name(schema), password=pg_password(schema)))
        try:
            return await conn.fetchval("SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = $1", schema)
        finally:
            await conn.close()

    assert asyncio.run(owner_as("cli_a")) == "onecard_cli_a"
    assert asyncio.run(owner_as("cli_b")) == "onecard_cli_b"
