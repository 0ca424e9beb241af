"""Helpers of the webhooks tests: a real HTTP receiver on 127.0.0.1 whose behaviour the test
switches (refuse connections, hang, answer 500, answer 204), a clock the test moves, a resolver
whose answers the test changes, and polling for what the dispatcher does in the background."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest

from runtime.grpc_client import error_info

REFUSE, HANG, FAIL, OK = "refuse", "hang", "fail", "ok"
# A redirect to elsewhere, and an answer far longer than anyone reads.
REDIRECT, HUGE = "redirect", "huge"
HUGE_BYTES = 4 * 1024 * 1024


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    answered: int

    @property
    def message(self) -> dict[str, Any]:
        return json.loads(self.body)


@dataclass
class Receiver:
    """A real HTTP/1.1 server on 127.0.0.1. ``mode``: REFUSE (not listening: connections are
    refused), HANG (reads the request, never answers), FAIL (500 with a long body), OK (204)."""

    port: int = 0
    mode: str = OK
    tls: ssl.SSLContext | None = None
    requests: list[Received] = field(default_factory=list)
    _server: asyncio.base_events.Server | None = None
    _hung: list[asyncio.StreamWriter] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True,
                                                  ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]

    async def set_mode(self, mode: str) -> None:
        if mode == REFUSE and self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        elif mode != REFUSE and self._server is None:
            await self.start()
        self.mode = mode

    async def stop(self) -> None:
        for writer in self._hung:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        name, value = line.split(":", 1)
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                mode = self.mode
                if mode == HANG:
                    self.requests.append(Received(headers, body, 0))
                    self._hung.append(writer)
                    return
                status, payload, extra = {FAIL: (500, b"x" * 5000, ""), REDIRECT: (302, b"", "Location: http://10.0.0.1/\r\n"),
                                          HUGE: (200, b"", "")}.get(mode, (204, b"", ""))
                self.requests.append(Received(headers, body, status))
                length = HUGE_BYTES if mode == HUGE else len(payload)
                writer.write(f"HTTP/1.1 {status} X\r\n{extra}Content-Length: {length}\r\n\r\n".encode() + payload)
                if mode == HUGE:
                    for _ in range(HUGE_BYTES // 65536):
                        writer.write(b"y" * 65536)
                        await writer.drain()
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            writer.close()

    def accepted(self) -> list[Received]:
        return [r for r in self.requests if 200 <= r.answered < 300]


class MovableClock:
    """The real time plus an offset the test moves: retries, overlaps and disabling without sleeping hours."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, **delta: float) -> None:
        self.offset += timedelta(**delta)


class Names:
    """What each host name resolves to, changed by the test (a DNS change)."""

    def __init__(self, answers: dict[str, list[str]] | None = None) -> None:
        self.answers = dict(answers or {})
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        if host not in self.answers:
            raise OSError(f"{host} does not resolve")
        return list(self.answers[host])


async def eventually(check: Callable[[], Awaitable[Any]], *, what: str, deadline_s: float = 30.0) -> Any:
    deadline = time.monotonic() + deadline_s
    while True:
        answer = await check()
        if answer:
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {deadline_s} s: {what}")
        await asyncio.sleep(0.05)


async def refused(call: Any) -> tuple[grpc.StatusCode, str | None]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    reason, _ = error_info(info.value)
    return info.value.code(), reason
