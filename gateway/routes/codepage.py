"""The member code page (``/m/``) and its one-time links.

A partner with ``members:code-page`` asks for a link for one member and hands it to the member's
phone (its app opens it in a web view). The link's secret is in the URL's fragment, so it never
reaches a server log or a Referer. The page's script trades it, once, at
``POST /v1/code-page/sessions`` for a *member token* (gateway.auth): that token calls the same
routes everyone else calls, and only for its own member.

The secret is an HMAC of the partner, the tenant and the request's Idempotency-Key under the
gateway's token secret, so a repeated request answers the same link without anyone storing the
secret; identity keeps its SHA-256 only and marks it used on the first exchange.

The page itself is static (gateway/member_page): it needs no server to show codes once it has its
credential, which is the point.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import datetime
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Path as PathParam, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from gateway.auth import MEMBERS_CODE_PAGE, CodePageLinks, issue_member_token, MEMBER_TOKEN_TTL_S
from gateway.models import MAX_ID_CHARS, MemberId, TenantId, timestamp
from gateway.problems import ProblemError, problem_responses
from gateway.ratelimit import retry_after_s
from gateway.routes.ledger import IdempotencyKeyHeader, _key
from gateway.state import State
from onecard.identity.v1 import identity_pb2 as pb
from runtime.idempotency import client_scope

router = APIRouter(responses=problem_responses(400, 401, 403, 404, 409, 422, 429, 503, 504))

# How long a link may wait to be opened: long enough for the app to open its web view.
LINK_TTL_S = 300
# The link's secret: 32 bytes of HMAC-SHA256, base64url without padding.
LINK_SECRET_CHARS = 43
_LINK_CONTEXT = b"onecard code-page link\x00"
PAGE_DIR = Path(__file__).resolve().parents[1] / "member_page"
PAGE_PATH = "/m/"
# The page's files, by name, and what they are; nothing else under /m/ is served.
_MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".webmanifest": "application/manifest+json",
                ".svg": "image/svg+xml", ".png": "image/png", ".txt": "text/plain; charset=utf-8"}
# The page runs only its own script, talks only to this origin and is never framed by another site.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; manifest-src 'self'; worker-src 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    # The service worker keeps the copy that works offline; the browser asks us each time online.
    "Cache-Control": "no-cache",
}


# Read once: the page's files are part of the release, like the code.
PAGE_FILES = {p.name: p for p in PAGE_DIR.iterdir() if p.is_file() and p.suffix in _MEDIA_TYPES}


class LinkOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "url": "https://card.example.edu/m/#0e404957-71bd-4f81-bd6d-d546165557dd.k3VxQ0c1bWtOb2pZc1pPd0ZQd3l2Z0lYb3Z1dHl0aW5Oc2M",
        "expires_at": "2025-09-01T08:05:00Z", "created": True}]})

    url: str = Field(description="Open it in the member's browser or web view, once, before expires_at. The "
                     "fragment is '<tenant_id>.<secret>': never log it.")
    expires_at: datetime
    created: bool = Field(description="False when the Idempotency-Key had made this link before (the same link).")


class SessionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant_id: str = Field(min_length=1, max_length=MAX_ID_CHARS, description="The link fragment's part before '.'.")
    link_secret: str = Field(min_length=LINK_SECRET_CHARS, max_length=LINK_SECRET_CHARS,
                             pattern=r"^[A-Za-z0-9_-]+$", description="The link fragment's part after '.'.")


class SessionOut(BaseModel):
    access_token: str = Field(description="A member token: the member's own routes only.")
    token_type: str = "Bearer"
    expires_in: int
    tenant_id: str
    member_id: str


def link_secret(*, token_secret: str, tenant_id: str, client_id: str, idempotency_key: str) -> str:
    message = _LINK_CONTEXT + "\x00".join((tenant_id, client_id, idempotency_key)).encode()
    digest = hmac.new(token_secret.encode(), message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def secret_hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


@router.post("/v1/tenants/{tenant_id}/members/{member_id}/code-page-links", response_model=LinkOut,
             status_code=201, tags=["code page"], summary="A one-time link to the member code page for a member",
             responses={200: {"description": "The Idempotency-Key had made this link before (created false)",
                              "model": LinkOut}})
async def create_code_page_link(
    tenant_id: TenantId,
    member_id: MemberId,
    request: Request,
    response: Response,
    state: State,
    principal: CodePageLinks,
    idempotency_key: IdempotencyKeyHeader = None,
) -> LinkOut:
    """The link works once, for LINK_TTL_S (5 minutes). 404 MEMBER_NOT_FOUND, 409 MEMBER_LEFT."""
    key = _key(idempotency_key)
    secret = link_secret(token_secret=state.settings.token_secret.get_secret_value(), tenant_id=tenant_id,
                         client_id=principal.client_id, idempotency_key=key)
    answer = await state.identity.CreateCodePageLink(
        pb.CreateCodePageLinkRequest(tenant_id=tenant_id, member_id=member_id, client_id=principal.client_id,
                                     secret_hash=secret_hash(secret), ttl_s=LINK_TTL_S, idempotency_key=key,
                                     key_scope=client_scope(principal.client_id)),
        timeout=state.timeout_s,
    )
    response.status_code = 201 if answer.created else 200
    response.headers["Cache-Control"] = "no-store"
    base = state.settings.code_page_url or str(request.base_url).rstrip("/") + PAGE_PATH
    return LinkOut(url=f"{base}#{tenant_id}.{secret}", expires_at=timestamp(answer.expires_at), created=answer.created)


@router.post("/v1/code-page/sessions", response_model=SessionOut, status_code=201, tags=["code page"],
             summary="The code page trades its one-time link for a member token (once)")
async def create_code_page_session(body: SessionIn, request: Request, response: Response,
                                   state: State) -> SessionOut:
    """No token: the link's secret is the credential. A second exchange of a link is 409 LINK_USED,
    a late one 409 LINK_EXPIRED, an unknown one 404 LINK_NOT_FOUND; a link whose partner has since
    lost ``members:code-page`` in the tenant is 403 LINK_REVOKED."""
    caller = request.client.host if request.client else "unknown"
    wait_s = state.token_limiter.try_acquire(caller)
    if wait_s > 0:
        raise ProblemError(status=429, reason="RATE_LIMITED", detail="too many session requests; slow down",
                           headers={"Retry-After": str(retry_after_s(wait_s))})
    answer = await state.identity.RedeemCodePageLink(
        pb.RedeemCodePageLinkRequest(tenant_id=body.tenant_id, secret_hash=secret_hash(body.link_secret)),
        timeout=state.timeout_s)
    grant = await state.grants.current(tenant_id=answer.tenant_id, client_id=answer.client_id)
    if grant is None or MEMBERS_CODE_PAGE not in grant.scopes:
        raise ProblemError(status=403, reason="LINK_REVOKED",
                           detail="the app that made this link may no longer open the code page")
    token = issue_member_token(secret=state.settings.token_secret.get_secret_value(), client_id=answer.client_id,
                               tenant_id=answer.tenant_id, member_id=answer.member_id, grant_version=grant.version)
    response.headers["Cache-Control"] = "no-store"
    return SessionOut(access_token=token, expires_in=MEMBER_TOKEN_TTL_S, tenant_id=answer.tenant_id,
                      member_id=answer.member_id)


PageAsset = Annotated[str, PathParam(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]


def _page_file(name: str) -> Response:
    path = PAGE_FILES.get(name)
    if path is None:
        raise ProblemError(status=404, reason="NOT_FOUND", detail="no such file")
    return Response(content=path.read_bytes(), media_type=_MEDIA_TYPES[path.suffix], headers=PAGE_HEADERS)


@router.get(PAGE_PATH, include_in_schema=False)
async def member_page() -> Response:
    return _page_file("index.html")


@router.get(PAGE_PATH + "{asset}", include_in_schema=False)
async def member_page_asset(asset: PageAsset) -> Response:
    return _page_file(asset)
