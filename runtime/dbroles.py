"""PostgreSQL roles per service: each service connects as its own login role, which owns its schema
and nothing else, and is never a superuser.

``bootstrap_statements`` is what an administrator (the local stack, the test session, the
Kubernetes bootstrap job) runs once per database as a superuser: the role (made or brought up to
date, password included), the schema owned by it (objects a stack from before roles made are
handed over), CONNECT on the database for the service roles only, and nothing for PUBLIC on the
database or on the ``public`` schema. Running it again changes nothing. A role reaches no other
service's schema: PostgreSQL refuses a table in a schema the role has no USAGE on.

A service checks at start that its role is not a superuser (``is_superuser``; runtime.grpc_server
and ``python -m services.<name> migrate``) and refuses to run as one unless in insecure
development mode.

``python -m runtime.dbroles --database app identity codegen ...`` runs the bootstrap from the
environment (the Kubernetes bootstrap Job): the superuser's DSN in ``ONECARD_ADMIN_DATABASE_URL``
(libpq's ``PGUSER``/``PGPASSWORD`` fill what it leaves out), each role's password in
``ONECARD_<SCHEMA>_DB_PASSWORD``. Passwords never appear on the command line or in the output.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg

ROLE_PREFIX = "onecard_"
ADMIN_URL_SETTING = "ONECARD_ADMIN_DATABASE_URL"
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


def role_name(schema: str) -> str:
    """The login role of the service that owns ``schema``."""
    return f"{ROLE_PREFIX}{schema}"


def _name(value: str) -> str:
    if not _NAME.match(value):
        raise ValueError(f"bad role, schema or database name {value!r}")
    return value


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


@dataclass(frozen=True)
class ServiceRole:
    schema: str
    password: str

    @property
    def role(self) -> str:
        return role_name(self.schema)


def bootstrap_statements(*, database: str, roles: Iterable[ServiceRole]) -> list[str]:
    """The SQL, in order, that gives each service its role and schema in ``database``."""
    roles = list(roles)
    database = _name(database)
    statements = [
        f"REVOKE ALL ON DATABASE {database} FROM PUBLIC",
        "REVOKE ALL ON SCHEMA public FROM PUBLIC",
    ]
    for entry in roles:
        role, schema = _name(entry.role), _name(entry.schema)
        statements += [
            f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {_literal(role)}) "
            f"THEN CREATE ROLE {role}; END IF; END $$",
            f"ALTER ROLE {role} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS "
            f"PASSWORD {_literal(entry.password)}",
            f"GRANT CONNECT ON DATABASE {database} TO {role}",
            f"CREATE SCHEMA IF NOT EXISTS {schema} AUTHORIZATION {role}",
            f"ALTER SCHEMA {schema} OWNER TO {role}",
            _hand_over(schema=schema, role=role),
        ]
    return statements


def _hand_over(*, schema: str, role: str) -> str:
    """Objects in the schema another role owns (made before roles existed) become the role's.
    Sequences that belong to a table column follow their table."""
    return f"""DO $$
DECLARE item record;
BEGIN
  FOR item IN
    SELECT format('ALTER %s %I.%I OWNER TO {role}',
                  CASE c.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW'
                                 WHEN 'S' THEN 'SEQUENCE' ELSE 'TABLE' END, n.nspname, c.relname) AS sql
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = {_literal(schema)} AND c.relkind IN ('r', 'p', 'v', 'm', 'S')
      AND pg_get_userbyid(c.relowner) <> {_literal(role)}
      AND NOT (c.relkind = 'S' AND EXISTS (
            SELECT FROM pg_depend d WHERE d.objid = c.oid AND d.deptype IN ('a', 'i')))
  LOOP EXECUTE item.sql; END LOOP;
  FOR item IN
    SELECT format('ALTER FUNCTION %s OWNER TO {role}', p.oid::regprocedure) AS sql
    FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
    WHERE n.nspname = {_literal(schema)} AND pg_get_userbyid(p.proowner) <> {_literal(role)}
  LOOP EXECUTE item.sql; END LOOP;
END $$"""


async def bootstrap(admin_dsn: str, *, database: str, roles: Iterable[ServiceRole]) -> None:
    """Run the bootstrap as the superuser of ``admin_dsn`` (connected to ``database``)."""
    conn = await asyncpg.connect(admin_dsn)
    try:
        for statement in bootstrap_statements(database=database, roles=roles):
            await conn.execute(statement)
    finally:
        await conn.close()


def role_dsn(dsn: str, *, role: str, password: str, database: str | None = None) -> str:
    """``dsn`` with its user and password replaced by the role's (and its database, if given)."""
    parts = urlsplit(dsn)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{quote(role, safe='')}:{quote(password, safe='')}@{host}" + (f":{parts.port}" if parts.port else "")
    path = f"/{database}" if database is not None else parts.path
    return urlunsplit((parts.scheme, netloc, path, parts.query, parts.fragment))


async def is_superuser(conn: asyncpg.Connection) -> bool:
    return bool(await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"))


def password_setting(schema: str) -> str:
    """The environment variable the bootstrap command reads ``schema``'s role password from."""
    return f"ONECARD_{_name(schema).upper()}_DB_PASSWORD"


def roles_from_env(schemas: Iterable[str], env: Mapping[str, str]) -> list[ServiceRole]:
    """Each schema's role with its password from ``env``; a missing one stops with its name."""
    schemas = list(schemas)
    missing = [password_setting(schema) for schema in schemas if not env.get(password_setting(schema))]
    if missing:
        raise SystemExit(f"missing required setting {', '.join(missing)} (the role's password)")
    return [ServiceRole(schema=schema, password=env[password_setting(schema)]) for schema in schemas]


def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.dbroles",
                                     description="Give each service its login role and schema (run as a superuser).")
    parser.add_argument("--database", required=True, help="the database the services share")
    parser.add_argument("schemas", nargs="+", help="one per service: its schema, owned by onecard_<schema>")
    args = parser.parse_args(argv)
    env = os.environ if env is None else env
    admin_dsn = env.get(ADMIN_URL_SETTING)
    if not admin_dsn:
        raise SystemExit(f"missing required setting {ADMIN_URL_SETTING} (a superuser's connection URL)")
    roles = roles_from_env(args.schemas, env)
    asyncio.run(bootstrap(admin_dsn, database=args.database, roles=roles))
    print(f"roles ready in {args.database}: {', '.join(role.role for role in roles)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
