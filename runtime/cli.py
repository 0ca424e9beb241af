"""The one entry point shape every service shares: ``python -m services.<name> [serve|migrate]``."""
from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable

from runtime.db import migrate
from runtime.grpc_server import ServiceApp
from runtime.logs import configure_logging, get_logger
from runtime.settings import ServiceSettings, load_settings


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
        applied = asyncio.run(migrate(settings.database_url, schema=app.schema, migrations_dir=app.migrations_dir))
        get_logger(__name__).info("migrations done", applied=len(applied))
        return
    asyncio.run(app.run_until_signalled())
