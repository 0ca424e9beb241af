"""The console's one way to the data: the gateway's own public REST API, called in-process.

``RestApi`` sends each request through httpx's ASGI transport into the very app that serves the
console, with the session's bearer token, the browser's address (so the sign-in throttle and the
rate limits see the real caller) and the console request's id (one id in the logs for both).
Everything the API checks applies: the token, its grant, the tenant, the scope. A refusal comes
back as ``ApiProblem`` carrying the problem+json fields, for the page to show.
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
from fastapi import Request

INTERNAL_BASE_URL = "http://gateway.console"
# The console waits no longer for the API than a person would for a page.
API_TIMEOUT_S = 30.0


@dataclass
class ApiProblem(Exception):
    """The REST API refused: its status and problem fields."""

    status: int
    reason: str
    title: str
    detail: str
    scope: str = ""


def segment(value: str) -> str:
    """One path segment, escaped: an id from a form or a URL can never climb out of its place."""
    return quote(value, safe="")


def _problem(response: httpx.Response) -> ApiProblem:
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    return ApiProblem(status=response.status_code, reason=str(body.get("reason") or "ERROR"),
                      title=str(body.get("title") or response.reason_phrase),
                      detail=str(body.get("detail") or ""), scope=str(body.get("scope") or ""))


class RestApi:
    """Calls of one console request, as one caller (``token``: the session's; None to sign in)."""

    def __init__(self, request: Request, *, token: str | None) -> None:
        client = (request.client.host, request.client.port) if request.client else ("127.0.0.1", 0)
        headers = {"X-Request-Id": request.state.request_id} if hasattr(request.state, "request_id") else {}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.AsyncClient(transport=httpx.ASGITransport(app=request.app, client=client),
                                       base_url=INTERNAL_BASE_URL, headers=headers, timeout=API_TIMEOUT_S,
                                       trust_env=False)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def get(self, path: str, *, params: Mapping[str, Any] | None = None) -> Any:
        return await self._json(await self._http.get(path, params=_present(params)))

    async def post(self, path: str, *, json: Any = None, data: Mapping[str, str] | None = None,
                   content: bytes | None = None, headers: Mapping[str, str] | None = None,
                   params: Mapping[str, Any] | None = None) -> Any:
        response = await self._http.post(path, json=json, data=data, content=content, headers=headers,
                                         params=_present(params))
        return await self._json(response)

    @asynccontextmanager
    async def stream(self, path: str, *, params: Mapping[str, Any] | None = None) -> AsyncIterator[httpx.Response]:
        """A GET whose body is read as it comes (a CSV download); a refusal raises ``ApiProblem``."""
        async with self._http.stream("GET", path, params=_present(params)) as response:
            if response.status_code >= 400:
                await response.aread()
                raise _problem(response)
            yield response

    @staticmethod
    async def _json(response: httpx.Response) -> Any:
        if response.status_code >= 400:
            raise _problem(response)
        return response.json() if response.content else None


def _present(params: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The query without its empty values (an empty form field means "not given")."""
    if params is None:
        return None
    return {k: v for k, v in params.items() if v not in (None, "")}


@asynccontextmanager
async def rest_api(request: Request, *, token: str | None) -> AsyncIterator[RestApi]:
    api = RestApi(request, token=token)
    try:
        yield api
    finally:
        await api.aclose()
