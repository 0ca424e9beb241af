"""What the browser tests share: Debian's Chromium launched through Playwright (its own browser
download is never used, nor reachable here), and an app served by uvicorn on a real loopback port
in the test's event loop (http://127.0.0.1 is a secure context: WebCrypto Ed25519, service workers)."""
from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI

CHROMIUM = "/usr/bin/chromium"
# As root, in a sandbox with no network but the package registries: no sandbox of its own, no GPU,
# and none of the background connections Chromium would try (and be refused) at every start.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# A phone: what the member page's screenshots and layout are checked at.
PHONE_VIEWPORT = {"width": 390, "height": 844}
SERVER_START_TIMEOUT_S = 20.0


@asynccontextmanager
async def chromium() -> AsyncIterator[Any]:
    """Chromium from Debian, headless, through Playwright's async API; a missing one fails the
    test (``make test`` installs it), never skips it."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: `make chromium` (or apt-get install chromium) installs it")
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield launched
        finally:
            await launched.close()


@asynccontextmanager
async def serving(app: FastAPI, *, lifespan: str = "on") -> AsyncIterator[str]:
    """``app`` served over real HTTP on a free loopback port in this event loop; its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, lifespan=lifespan, access_log=False, log_level="warning"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(SERVER_START_TIMEOUT_S):
            while not server.started:
                if task.done():
                    task.result()
                await asyncio.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()
