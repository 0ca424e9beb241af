"""The one entry point shape every service shares: ``python -m services.<name> [serve|migrate]``."""
from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable

import asyncpg

from runtime.db import migrate
from runtime.dbroles import is_superuser
from runtime.grpc_server import ServiceApp
from runtime.logs import configure_logging, get_logger
from runtime.mesh import INSECURE_SETTING
from runtime.settings import ServiceSettings, load_settings


async def _migrate(settings: ServiceSettings, app: ServiceApp) -> list[str]:
    """Apply the migrations as the service's own role: tables a superuser made would not be its."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        superuser = await is_superuser(conn)
    finally:
        await conn.close()
    if superuser and not settings.insecure_development:
        raise SystemExit(f"{app.name}: refusing to migrate as a PostgreSQL superuser; connect as the service's "
                         f"role (runtime.dbroles), or set {INSECURE_SETTING}=1 for development only")
    return await migrate(settings.database_url, schema=app.schema, migrations_dir=app.migrations_dir)


def run_service(
    *,
    name: str,
    settings_cls: type[ServiceSettings],
    build_app: Callable[[ServiceSettings], ServiceApp],
    argv: list[str] | None = None,
) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m services.{name}")
    parser.add_argument("command", nargs="?", default="serve", choices=["serve", "migrate"],
                        help="serve (default): run the gRPC server; migrate: apply migrations and exit")
    args = parser.parse_args(argv)
    settings = load_settings(settings_cls)
    configure_logging(service=name, level=settings.log_level)
    app = build_app(settings)
    if args.command == "migrate":
        applied = asyncio.run(_migrate(settings, app))
        get_logger(__name__).info("migrations done", applied=len(applied))
        return
    with asyncio.Runner(loop_factory=event_loop_factory(settings.event_loop)) as runner:
        runner.run(app.run_until_signalled())


def event_loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """The loop a service runs on (``ONECARD_EVENT_LOOP``): uvloop's, or the standard one."""
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop
