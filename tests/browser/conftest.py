"""Browser tests: Debian's Chromium (``/usr/bin/chromium``, which ``make test`` installs when missing)
driven by Playwright for Python through its async API, in the test's own event loop, against the
gateway served by uvicorn on a real loopback port in that same loop, in front of the real identity,
codegen, ledger, policy and device hub (tests/gateway/conftest.py).

Playwright's own browser download is never used (nor reachable here): ``browser`` launches the
system Chromium by ``executable_path``, with the flags that keep it off the network.

Fixtures: ``browser`` (a Playwright ``Browser``), ``served_gateway`` (``ServedGateway``: the
gateway's ``Gateway`` test handle and the ``base_url`` a browser opens).
"""
from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn

from devstack.servers import free_port
# The gateway tests' fixtures, for a gateway with every service behind it.
from tests.gateway.conftest import (  # noqa: F401 - fixtures
    Gateway,
    codegen_service,
    devicehub_service,
    devices_gateway,
    ledger_service,
    policy_service,
)

CHROMIUM = "/usr/bin/chromium"
# As root, in a sandbox with no network but the package registries: no sandbox of its own, no GPU,
# and none of the background connections Chromium would try (and be refused) at every start.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SERVER_START_TIMEOUT_S = 20.0
# Where the tests also save their screenshots when set (the README's come from here).
SCREENSHOTS_ENV = "ONECARD_CONSOLE_SCREENSHOTS"


@pytest.fixture
async def browser() -> AsyncIterator[object]:
    """Chromium from Debian, headless, through Playwright (async API)."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: `make chromium` (or apt-get install chromium) installs it")
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield launched
        finally:
            await launched.close()


@dataclass
class ServedGateway:
    gateway: Gateway
    base_url: str


@pytest.fixture
async def served_gateway(devices_gateway: Gateway) -> AsyncIterator[ServedGateway]:  # noqa: F811
    """The gateway app (lifespan already running) served over real HTTP on loopback."""
    port = free_port()
    config = uvicorn.Config(devices_gateway.app, host="127.0.0.1", port=port, lifespan="off", access_log=False,
                            log_level="warning")
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    deadline = asyncio.get_running_loop().time() + SERVER_START_TIMEOUT_S
    while not server.started:
        if serving.done():
            serving.result()
        assert asyncio.get_running_loop().time() < deadline, "uvicorn did not start"
        await asyncio.sleep(0.02)
    try:
        yield ServedGateway(gateway=devices_gateway, base_url=f"http://127.0.0.1:{port}")
    finally:
        server.should_exit = True
        await serving


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    """Where a test saves its screenshots: ``$ONECARD_CONSOLE_SCREENSHOTS`` when set, else its temp dir."""
    wanted = os.environ.get(SCREENSHOTS_ENV)
    folder = Path(wanted) if wanted else tmp_path / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder
