"""``POST /v1/oauth/token``: OAuth2 client credentials (RFC 6749 §4.4) for one tenant.

The client proves itself with its id and secret (form fields, or HTTP Basic as RFC 6749 §2.3.1
prefers); identity checks them and the tenant's grant and answers the scopes the client holds
there. Errors carry the OAuth2 ``error`` code beside the problem fields, so that OAuth2 client
libraries understand them too.
"""
from __future__ import annotations

import base64
import binascii
from typing import Annotated
from urllib.parse import unquote_plus

import grpc
from fastapi import APIRouter, Form, Request, Response

from gateway.auth import issue_access_token, known_scopes
from gateway.models import TokenResponse
from gateway.problems import PROBLEM_CONTENT, ProblemError
from gateway.ratelimit import Attempt, retry_after_s
from gateway.state import gateway_state
from onecard.identity.v1 import identity_pb2 as pb

router = APIRouter(tags=["oauth"])

GRANT_TYPE = "client_credentials"
MAX_FIELD_CHARS = 256
# Every way identity can say "these credentials do not open this tenant". They all become the
# same invalid_client answer, so a caller cannot tell an unknown client from a wrong secret.
_REFUSED_CODES = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
}


def _oauth_error(*, status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> ProblemError:
    return ProblemError(
        status=status,
        reason=error.upper(),
        detail=detail,
        headers={"Cache-Control": "no-store", **(headers or {})},
        extra={"error": error, "error_description": detail},
    )


def _invalid_client(*, basic_used: bool) -> ProblemError:
    # RFC 6749 §5.2: a client that authenticated with Basic gets a Basic challenge back.
    headers = {"WWW-Authenticate": 'Basic realm="onecard"'} if basic_used else None
    return _oauth_error(status=401, error="invalid_client", detail="client authentication failed", headers=headers)


def _too_many(wait_s: float) -> ProblemError:
    return ProblemError(status=429, reason="RATE_LIMITED", detail="too many token requests; slow down",
                        headers={"Retry-After": str(retry_after_s(wait_s)), "Cache-Control": "no-store"})


def _basic_credentials(request: Request) -> tuple[str, str] | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise _invalid_client(basic_used=True) from None
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        raise _invalid_client(basic_used=True)
    # RFC 6749 §2.3.1: both parts are form-urlencoded before base64.
    return unquote_plus(client_id), unquote_plus(secret)


@router.post(
    "/v1/oauth/token",
    response_model=TokenResponse,
    summary="Get an access token (OAuth2 client credentials)",
    responses={
        400: {"description": "invalid_request, unsupported_grant_type or invalid_scope", "content": PROBLEM_CONTENT},
        401: {"description": "invalid_client", "content": PROBLEM_CONTENT},
        422: {"description": "The form does not fit the schema", "content": PROBLEM_CONTENT},
        429: {"description": "Too many token requests", "content": PROBLEM_CONTENT},
    },
)
async def issue_token(
    request: Request,
    response: Response,
    grant_type: Annotated[str | None, Form(description="Always client_credentials.")] = None,
    tenant_id: Annotated[str | None, Form(description="The tenant the token acts in.")] = None,
    client_id: Annotated[str | None, Form(description="Unless sent with HTTP Basic.")] = None,
    client_secret: Annotated[str | None, Form(description="Unless sent with HTTP Basic.")] = None,
    scope: Annotated[
        str | None, Form(description="Optional space-separated subset of the client's scopes in the tenant.")
    ] = None,
) -> TokenResponse:
    state = gateway_state(request)
    basic = _basic_credentials(request)
    if basic is not None and (client_id or client_secret):
        # RFC 6749 §2.3: one authentication method per request.
        raise _oauth_error(status=400, error="invalid_request",
                           detail="send the client credentials either with HTTP Basic or in the form, not both")
    if basic is not None:
        client_id, client_secret = basic
    if grant_type is None or not tenant_id or not client_id or not client_secret:
        raise _oauth_error(status=400, error="invalid_request",
                           detail="grant_type, tenant_id, client_id and client_secret are required")
    if grant_type != GRANT_TYPE:
        raise _oauth_error(status=400, error="unsupported_grant_type", detail=f"only {GRANT_TYPE} is supported")
    if any(len(v) > MAX_FIELD_CHARS for v in (tenant_id, client_id, client_secret, scope or "")):
        raise _oauth_error(status=400, error="invalid_request", detail=f"a field is longer than {MAX_FIELD_CHARS}")

    # Every request per caller address; then failed sign-ins per (client id, address), so wrong
    # secrets sent from elsewhere never refuse the partner's own servers. Both before identity
    # spends a password hash on a guess.
    caller = request.client.host if request.client else "unknown"
    address_wait_s = state.token_limiter.try_acquire(caller)
    if address_wait_s > 0:
        raise _too_many(address_wait_s)
    attempt = state.sign_ins.attempt(client_id=client_id, address=caller)
    if not isinstance(attempt, Attempt):
        raise _too_many(attempt)

    try:
        answer = await state.identity.AuthenticateClient(
            pb.AuthenticateClientRequest(client_id=client_id, client_secret=client_secret, tenant_id=tenant_id),
            timeout=state.timeout_s,
        )
    except grpc.aio.AioRpcError as exc:
        if exc.code() in _REFUSED_CODES:
            attempt.failed()
            raise _invalid_client(basic_used=basic is not None) from None
        attempt.abandoned()
        raise
    except BaseException:
        attempt.abandoned()
        raise
    granted = known_scopes(answer.scopes)
    if not granted:
        attempt.failed()
        raise _invalid_client(basic_used=basic is not None)
    attempt.succeeded()
    if scope is not None and scope.strip():
        requested = frozenset(scope.split())
        if not requested <= granted:
            raise _oauth_error(status=400, error="invalid_scope",
                               detail="the requested scope exceeds what the tenant granted this client")
        granted = requested

    ttl_s = state.settings.token_ttl_s
    token = issue_access_token(
        secret=state.settings.token_secret.get_secret_value(),
        client_id=answer.client_id or client_id,
        tenant_id=answer.tenant_id or tenant_id,
        scopes=granted,
        grant_version=answer.grant_version,
        ttl_s=ttl_s,
    )
    request.state.client_id = answer.client_id or client_id
    # RFC 6749 §5.1: token responses must not be cached.
    response.headers["Cache-Control"] = "no-store"
    response.headers["Pragma"] = "no-cache"
    return TokenResponse(access_token=token, expires_in=ttl_s, scope=" ".join(sorted(granted)))
