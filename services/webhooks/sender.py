"""One HTTP attempt of one delivery: resolve the target's name, check every address again (a
name that resolved to a public address at registration may resolve to a private one now), connect
to the checked address with the name as Host header and TLS server name, follow no redirect, read
at most ``MAX_RESPONSE_BYTES`` of the answer, within connect, read and total timeouts.

The resolver is a collaborator (``Resolver``), so tests can change what a name resolves to.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

import httpx

from runtime.errors import DomainError, InvalidArgument
from services.webhooks import domain
from services.webhooks.domain import Target

# The answer is read up to this much, then the connection is dropped.
MAX_RESPONSE_BYTES = 64 * 1024
DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_READ_TIMEOUT_S = 10.0
DEFAULT_TOTAL_TIMEOUT_S = 15.0
USER_AGENT = "onecard-webhooks/1"

Resolver = Callable[[str, int], Awaitable[list[str]]]


async def system_resolver(host: str, port: int) -> list[str]:
    """Every address the system resolver gives for ``host``."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


async def resolve_checked(target: Target, *, resolver: Resolver, allow_private: bool,
                          allow_loopback_http: bool) -> list[str]:
    """The target's addresses, each allowed (domain.check_addresses), or the typed refusal."""
    try:
        addresses = [target.host] if _is_literal(target.host) else await resolver(target.host, target.port)
    except (OSError, UnicodeError):
        raise InvalidArgument(f"{target.host} does not resolve", reason="TARGET_NOT_RESOLVED") from None
    return domain.check_addresses(addresses, target=target, allow_private=allow_private,
                                  allow_loopback_http=allow_loopback_http)


def _is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class AttemptResult:
    started_at: datetime
    latency_ms: int
    response_status: int = 0
    # Empty when a response came: connect, timeout, tls, target_refused, target_not_resolved, error.
    error_kind: str = ""
    response_body: str = ""

    @property
    def delivered(self) -> bool:
        return not self.error_kind and 200 <= self.response_status < 300


def _truncate(raw: bytes) -> str:
    text = raw[: domain.MAX_RESPONSE_BODY_LOGGED_BYTES].decode("utf-8", "replace")
    while len(text.encode()) > domain.MAX_RESPONSE_BODY_LOGGED_BYTES:
        text = text[:-1]
    return text


class Sender:
    """Holds one HTTP client for the life of the dispatcher (``open``/``close``)."""

    def __init__(self, *, resolver: Resolver, allow_loopback_http: bool,
                 connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S, read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
                 total_timeout_s: float = DEFAULT_TOTAL_TIMEOUT_S, verify: ssl.SSLContext | bool = True):
        self._resolver = resolver
        # The server's certificate is checked against the target's name (the TLS server name),
        # with the system's roots unless told otherwise (tests: their own CA).
        self._verify = verify
        self._allow_loopback_http = allow_loopback_http
        self._timeout = httpx.Timeout(connect=connect_timeout_s, read=read_timeout_s, write=read_timeout_s,
                                      pool=connect_timeout_s)
        self._total_timeout_s = total_timeout_s
        self._client: httpx.AsyncClient | None = None

    async def open(self) -> None:
        # No environment proxies (trust_env): a proxy would connect to a name we did not check.
        self._client = httpx.AsyncClient(timeout=self._timeout, follow_redirects=False, trust_env=False, verify=self._verify,
                                         limits=httpx.Limits(max_connections=100, max_keepalive_connections=20))

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def send(self, *, url: str, allow_private: bool, headers: dict[str, str], body: bytes,
                   started_at: datetime) -> AttemptResult:
        started = time.perf_counter()

        def elapsed_ms() -> int:
            return int((time.perf_counter() - started) * 1000)

        try:
            target = domain.parse_target(url, allow_loopback_http=self._allow_loopback_http)
            addresses = await resolve_checked(target, resolver=self._resolver, allow_private=allow_private,
                                              allow_loopback_http=self._allow_loopback_http)
        except DomainError as exc:
            kind = "target_not_resolved" if exc.reason == "TARGET_NOT_RESOLVED" else "target_refused"
            return AttemptResult(started_at=started_at, latency_ms=elapsed_ms(), error_kind=kind)
        if self._client is None:
            raise RuntimeError("the sender is not open")
        request_headers = {**headers, "Host": target.host_header, "User-Agent": USER_AGENT,
                           "Content-Type": "application/json"}
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        try:
            async with asyncio.timeout(self._total_timeout_s):
                async with self._client.stream("POST", target.url_for(addresses[0]), content=body,
                                               headers=request_headers, extensions=extensions) as response:
                    received = bytearray()
                    async for chunk in response.aiter_raw():
                        received += chunk
                        if len(received) >= MAX_RESPONSE_BYTES:
                            break
                    return AttemptResult(started_at=started_at, latency_ms=elapsed_ms(),
                                         response_status=response.status_code, response_body=_truncate(bytes(received)))
        except (TimeoutError, httpx.TimeoutException):
            return AttemptResult(started_at=started_at, latency_ms=elapsed_ms(), error_kind="timeout")
        except httpx.ConnectError as exc:
            kind = "tls" if "SSL" in str(exc) or "CERTIFICATE" in str(exc).upper() else "connect"
            return AttemptResult(started_at=started_at, latency_ms=elapsed_ms(), error_kind=kind)
        except httpx.HTTPError:
            return AttemptResult(started_at=started_at, latency_ms=elapsed_ms(), error_kind="error")


@contextlib.asynccontextmanager
async def opened(sender: Sender):  # noqa: ANN201 - an async context manager
    await sender.open()
    try:
        yield sender
    finally:
        await sender.close()
