"""A closed-loop HTTP load: ``concurrency`` workers, each sending its next request when the last
one is answered, for a fixed time. Loopback only, bounded in time and in requests.

Two clients, the same loop. ``raw`` (the default) speaks keep-alive HTTP/1.1 over asyncio streams
and costs the load process about a tenth of a core at 2-3k requests/s. ``httpx`` is the client our
users would write, but on this two-core machine it saturates its own core at well under 1k
requests/s, so against a fast server it measures itself: a bare route looked only twice as fast as
the whole gateway path. Every figure reports the client's CPU use, so a client-bound measurement
shows itself.
"""
from __future__ import annotations

import asyncio
import contextlib
import resource
import statistics
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

import httpx

# A hard stop on top of the time limit: far above what one core can serve in a minute.
MAX_REQUESTS = 2_000_000
REQUEST_TIMEOUT_S = 10.0
MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 16 * 1024 * 1024
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}

ClientKind = Literal["raw", "httpx"]
CLIENT_KINDS: tuple[ClientKind, ...] = ("raw", "httpx")


@dataclass(frozen=True)
class LoadResult:
    requests: int
    errors: int
    elapsed_s: float
    client_cpu_s: float
    latencies_ms: list[float]

    @property
    def rps(self) -> float:
        return self.requests / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def client_cpu_ratio(self) -> float:
        """CPU seconds the load process used per second of load: near 1.0 means client-bound."""
        return self.client_cpu_s / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def percentile_ms(self, fraction: float) -> float:
        if not self.latencies_ms:
            return 0.0
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.latencies_ms) if self.latencies_ms else 0.0

    @staticmethod
    def combined(parts: Sequence[LoadResult]) -> LoadResult:
        """Several runs of the same load as one: their calls, time and CPU added up."""
        return LoadResult(requests=sum(p.requests for p in parts), errors=sum(p.errors for p in parts),
                          elapsed_s=sum(p.elapsed_s for p in parts),
                          client_cpu_s=sum(p.client_cpu_s for p in parts),
                          latencies_ms=[ms for p in parts for ms in p.latencies_ms])


class RawConnection:
    """One keep-alive HTTP/1.1 connection sending one fixed GET request over and over."""

    def __init__(self, *, url: str, headers: Mapping[str, str]):
        parts = urlsplit(url)
        self._host = parts.hostname or ""
        self._port = parts.port or 80
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        lines = [f"GET {path} HTTP/1.1", f"Host: {self._host}:{self._port}", *(f"{k}: {v}" for k, v in headers.items())]
        self._request = ("\r\n".join(lines) + "\r\n\r\n").encode()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def get(self) -> int:
        try:
            return await self._exchange()
        except BaseException:
            # A half-read answer leaves the stream out of step: start the next request afresh.
            await self.close()
            raise

    async def _exchange(self) -> int:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self._host, self._port)
        assert self._reader is not None
        self._writer.write(self._request)
        head = await self._reader.readuntil(b"\r\n\r\n")
        if len(head) > MAX_HEADER_BYTES:
            raise ValueError("response head too large")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        fields = {}
        for line in header_lines:
            name, sep, value = line.partition(":")
            if sep:
                fields[name.strip().lower()] = value.strip()
        if "chunked" in fields.get("transfer-encoding", ""):
            raise ValueError("the raw load client reads Content-Length bodies only")
        length = int(fields.get("content-length", "0"))
        if length > MAX_BODY_BYTES:
            raise ValueError("response body too large")
        await self._reader.readexactly(length)
        if fields.get("connection", "").lower() == "close":
            await self.close()
        return status

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
        self._reader = self._writer = None


def _check_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    if host not in LOOPBACK_HOSTS and not host.startswith("127."):
        raise ValueError(f"load is only ever sent to loopback, not {host!r}")


async def closed_loop_get(*, url: str, headers: Mapping[str, str], duration_s: float, concurrency: int,
                          client: ClientKind = "raw") -> LoadResult:
    """GET ``url`` from ``concurrency`` workers for ``duration_s``; every answer but 200 is an error."""
    _check_loopback(url)
    latencies_ms: list[float] = []
    errors = 0
    budget = MAX_REQUESTS
    shared_httpx: httpx.AsyncClient | None = None
    senders: list[Callable[[], Awaitable[int]]] = []
    closers: list[Callable[[], Awaitable[None]]] = []
    if client == "httpx":
        shared_httpx = httpx.AsyncClient(
            timeout=REQUEST_TIMEOUT_S,
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )

        async def httpx_get() -> int:
            assert shared_httpx is not None
            return (await shared_httpx.get(url, headers=dict(headers))).status_code

        senders = [httpx_get] * concurrency
        closers = [shared_httpx.aclose]
    else:
        connections = [RawConnection(url=url, headers=headers) for _ in range(concurrency)]
        senders = [c.get for c in connections]
        closers = [c.close for c in connections]

    deadline = time.perf_counter() + duration_s

    async def worker(send: Callable[[], Awaitable[int]]) -> None:
        nonlocal errors, budget
        while budget > 0 and time.perf_counter() < deadline:
            budget -= 1
            sent = time.perf_counter()
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT_S):
                    ok = await send() == 200
            except (OSError, ValueError, TimeoutError, asyncio.IncompleteReadError, httpx.HTTPError):
                ok = False
            latencies_ms.append((time.perf_counter() - sent) * 1000)
            if not ok:
                errors += 1

    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    try:
        await asyncio.gather(*(worker(send) for send in senders))
    finally:
        elapsed_s = time.perf_counter() - started
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
        for close in closers:
            await close()
    client_cpu_s = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return LoadResult(requests=len(latencies_ms), errors=errors, elapsed_s=elapsed_s,
                      client_cpu_s=client_cpu_s, latencies_ms=latencies_ms)


async def closed_loop_calls(*, call: Callable[[int], Awaitable[bool]], duration_s: float,
                            concurrency: int) -> LoadResult:
    """The same closed loop for any async call (a gRPC stub's, say): ``concurrency`` workers, each
    awaiting ``call(worker_index)`` again as soon as the last one answers, for ``duration_s``. A
    call answering False, raising or taking longer than ``REQUEST_TIMEOUT_S`` is an error; the
    caller keeps whatever detail it wants about why."""
    latencies_ms: list[float] = []
    errors = 0
    budget = MAX_REQUESTS
    deadline = time.perf_counter() + duration_s

    async def worker(index: int) -> None:
        nonlocal errors, budget
        while budget > 0 and time.perf_counter() < deadline:
            budget -= 1
            sent = time.perf_counter()
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT_S):
                    ok = await call(index)
            except Exception:  # noqa: BLE001 - any failure of the call is an error of the load
                ok = False
            latencies_ms.append((time.perf_counter() - sent) * 1000)
            if not ok:
                errors += 1

    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    elapsed_s = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    client_cpu_s = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return LoadResult(requests=len(latencies_ms), errors=errors, elapsed_s=elapsed_s,
                      client_cpu_s=client_cpu_s, latencies_ms=latencies_ms)
