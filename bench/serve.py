"""``python -m bench.serve {gateway|bare} --port N``: one ASGI app under uvicorn, exactly as the other.

Both sides of a gateway-vs-bare ratio are served by this one function, so the only difference
measured is the app: the same uvicorn options (those of ``python -m gateway``), one process, one
event loop, the same JSON logging set-up.
"""
from __future__ import annotations

import argparse

import uvicorn
from fastapi import FastAPI

from runtime.logs import configure_logging
from runtime.settings import load_settings

BARE_PATH = "/v1/constant"
BENCH_HOST = "127.0.0.1"


def bare_app() -> FastAPI:
    """The floor: a FastAPI route answering a constant, with nothing behind it."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.get(BARE_PATH)
    async def constant() -> dict[str, str]:
        return {"status": "ok"}

    return app


def gateway_app() -> FastAPI:
    from gateway.app import create_app
    from gateway.settings import GatewaySettings

    return create_app(load_settings(GatewaySettings))


def serve(app: FastAPI, *, port: int) -> None:
    uvicorn.run(
        app,
        host=BENCH_HOST,
        port=port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
        server_header=False,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.serve")
    parser.add_argument("app", choices=["gateway", "bare"])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    configure_logging(service=f"bench-{args.app}", level="info")
    serve(gateway_app() if args.app == "gateway" else bare_app(), port=args.port)


if __name__ == "__main__":
    main()
