"""``python -m gateway``: serve the HTTP API with uvicorn, configured from ``ONECARD_*`` variables."""
from __future__ import annotations

import uvicorn

from gateway.app import create_app
from gateway.settings import GatewaySettings
from runtime.logs import configure_logging
from runtime.settings import load_settings


def main() -> None:
    settings = load_settings(GatewaySettings)
    configure_logging(service="gateway", level=settings.log_level)
    uvicorn.run(
        create_app(settings),
        host=settings.http_host,
        port=settings.http_port,
        # Our JSON logging stays in charge; uvicorn's access log would print raw paths and query
        # strings (member ids, names), so the gateway writes its own access line instead.
        log_config=None,
        access_log=False,
        # SIGTERM: stop accepting, finish requests in flight, run the lifespan's shutdown.
        timeout_graceful_shutdown=10,
        server_header=False,
        # The caller's address counts in the token endpoint's limits: X-Forwarded-For is believed
        # only from the proxies named (uvicorn would otherwise believe it from 127.0.0.1).
        proxy_headers=bool(settings.forwarded_allow_ips),
        forwarded_allow_ips=settings.forwarded_allow_ips or None,
    )


if __name__ == "__main__":
    main()
