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

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.browser.support import chromium, serving
# The gateway tests' fixtures, for a gateway with every service behind it.
from tests.gateway.conftest import (  # noqa: F401 - fixtures
    Gateway,
    codegen_service,
    devicehub_service,
    devices_gateway,
    ledger_service,
    policy_service,
)

# Where the tests also save their screenshots when set (the README's come from here).
SCREENSHOTS_ENV = "ONECARD_CONSOLE_SCREENSHOTS"


@pytest.fixture
async def browser() -> AsyncIterator[object]:
    """Chromium from Debian, headless, through Playwright (async API)."""
    async with chromium() as launched:
        yield launched


@dataclass
class ServedGateway:
    gateway: Gateway
    base_url: str


@pytest.fixture
async def served_gateway(devices_gateway: Gateway) -> AsyncIterator[ServedGateway]:  # noqa: F811
    """The gateway app (lifespan already running) served over real HTTP on loopback."""
    async with serving(devices_gateway.app, lifespan="off") as base_url:
        yield ServedGateway(gateway=devices_gateway, base_url=base_url)


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    """Where a test saves its screenshots: ``$ONECARD_CONSOLE_SCREENSHOTS`` when set, else its temp dir."""
    wanted = os.environ.get(SCREENSHOTS_ENV)
    folder = Path(wanted) if wanted else tmp_path / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder
