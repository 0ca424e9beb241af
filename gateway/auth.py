"""Access tokens and scopes: who is calling, for which tenant, allowed to do what.

A partner's API client trades its id and secret for a short-lived access token at
``POST /v1/oauth/token`` (OAuth2 client credentials). The token is a JWT signed with HS256 under
the gateway's ``token_secret`` and bound to one tenant, one client, the scopes that client holds in
that tenant and the version of the tenant's grant to it (``gv``). ``authorize`` is the one
dependency every protected route uses: it checks the token, the per-client rate, that the grant it
was issued under still stands (gateway.grants: a revoked or changed grant ends its tokens within
60 s), that the path's tenant is the token's tenant, and the scope.

A partner with ``members:code-page`` may also open the member code page (gateway.routes.codepage)
for one member: the page trades a one-time link for a *member token*, a token of the same kind
that also names the member (``mid``). A member token passes only routes that declare
``MEMBER_TOKEN_ROUTE`` and only for its own member (any other member is 404 MEMBER_NOT_FOUND, as
if there were none); everywhere else, the partner gRPC API included, it is 403
MEMBER_TOKEN_NOT_ALLOWED. It lives while the partner's grant stands and still holds
``members:code-page``, and at most MEMBER_TOKEN_TTL_S.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Annotated

import jwt
import structlog
from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer, SecurityScopes

from gateway.problems import ProblemError
from gateway.ratelimit import retry_after_s
from gateway.state import GatewayState, gateway_state

# The scopes, in one place. A client holds a set of them (ApiClient.scopes in identity); each
# tenant that grants the client access grants a subset; a token carries what both allow.
MEMBERS_READ = "members:read"
MEMBERS_WRITE = "members:write"
CLIENTS_ADMIN = "clients:admin"
PLATFORM_ADMIN = "platform:admin"
CODES_ISSUE = "codes:issue"
DEVICES_SYNC = "devices:sync"
CODES_ADMIN = "codes:admin"
WALLETS_READ = "wallets:read"
WALLETS_TOPUP = "wallets:topup"
LEDGER_ADMIN = "ledger:admin"
STATEMENTS_READ = "statements:read"
POLICY_ADMIN = "policy:admin"
PAYMENTS_CREATE = "payments:create"
DEVICES_ADMIN = "devices:admin"
DATA_READ = "data:read"
WEBHOOKS_MANAGE = "webhooks:manage"
MEMBERS_BIND = "members:bind"
MEMBERS_SELF_SERVICE = "members:self-service"
MEMBERS_CODE_PAGE = "members:code-page"
SCOPES: dict[str, str] = {
    MEMBERS_READ: "Read the tenant, its members, the directory change feed, the card blacklist and import progress.",
    MEMBERS_WRITE: "Create and change members: status, cards, face enrolment; start bulk imports.",
    CLIENTS_ADMIN: "List the API clients this tenant granted; create clients and grant or revoke them, "
    "never with a scope the caller does not hold itself.",
    PLATFORM_ADMIN: "Create tenants (the platform operator).",
    CODES_ISSUE: "Issue offline e-code credentials and rotating-token batches for the tenant's members "
    "(bank apps, member app backends).",
    DEVICES_SYNC: "Fetch the tenant's trust list (issuer keys) and revocation list, as changes since a version, "
    "and the signed policy bundle and its keys (devices, device hubs).",
    CODES_ADMIN: "Administer the tenant's e-codes: read and change its code settings (offline caps, defaults), "
    "rotate its issuer key, revoke a credential or all of a member's (the school's operators).",
    WALLETS_READ: "Read members' purses and their history, the calling client's own clearing account and its daily "
    "reconciliation file, and whether "
    "a payment was booked (\"did this pay?\" by idempotency key). A merchant's accounts also need statements:read "
    "(or ledger:admin); the tenant's other accounts ledger:admin; another partner's clearing account is never shown.",
    WALLETS_TOPUP: "Top up a member's cash purse from the calling client's own clearing account, within what it "
    "prefunded and the credit limit the tenant set on it; reverse its own top-ups; set members' low-balance "
    "thresholds (banks).",
    LEDGER_ADMIN: "Administer the tenant's ledger: open accounts, refunds, freezing accounts, subsidy programs, "
    "grant batches and clawbacks, the trial balance, partners' credit limits, fundings and reconciliation files, "
    "refunds to the bank (the school's finance office).",
    STATEMENTS_READ: "Download a merchant's or a device's daily statement (CSV) and its totals.",
    POLICY_ADMIN: "Administer the tenant's spending rules: create, validate, list, read and publish rule-set "
    "versions; dry-run a payment against a version or the published rules (the school's operators).",
    PAYMENTS_CREATE: "Make an app-initiated payment for a member at a merchant under the published rules "
    "(app backends, bank apps).",
    DEVICES_ADMIN: "Administer the tenant's devices: register them and make enrolment tokens, update and "
    "decommission them; list, acknowledge and clear alarms; set and read the access rules and list the access "
    "records; create and follow firmware and config rollouts (the school's operators).",
    DATA_READ: "Read the tenant's data API: the real-time dining index (people served per canteen against "
    "capacity) for dashboards and partners.",
    WEBHOOKS_MANAGE: "Register and manage the calling client's webhook endpoints in the tenant (event types limited "
    "to what its other scopes read), rotate their secrets, read the delivery log and redeliver; allowing private "
    "targets also needs clients:admin.",
    MEMBERS_BIND: "Bind the calling client's own external user ids (a mini-program's openid) to members, unbind "
    "them, and look a member up by one; another client's bindings are never seen (mini-program backends).",
    MEMBERS_SELF_SERVICE: "Act for a member bound to the calling client, named by its external user id: freeze, "
    "report a card lost, set or change the member's PIN, and unfreeze a self-service freeze with the member's PIN "
    "(mini-program backends).",
    MEMBERS_CODE_PAGE: "Make one-time links to the member code page (/m/) for a member of the tenant; the page then "
    "acts for that member alone: its e-code, balances, recent transfers and reporting its card lost (bank apps, "
    "mini-program backends).",
}

TOKEN_ALGORITHM = "HS256"
TOKEN_ISSUER = "onecard-gateway"
TOKEN_AUDIENCE = "onecard-api"
TOKEN_TYPE = "at+jwt"
# A real token is a few hundred bytes; anything much longer is not worth decoding.
MAX_TOKEN_CHARS = 4096
REALM = "onecard"
# A member token (the code page's) lives this long at most; the page shows offline codes beyond it.
MEMBER_TOKEN_TTL_S = 900
# What a route that a member token may call declares: ``openapi_extra=MEMBER_TOKEN_ROUTE``. The
# OpenAPI document shows it, and ``authorize`` reads it from the matched route.
MEMBER_TOKEN_EXTENSION = "x-onecard-member-token"
MEMBER_TOKEN_ROUTE = {MEMBER_TOKEN_EXTENSION: True}


@dataclass(frozen=True)
class Principal:
    """The authenticated caller: an API client acting in one tenant with some scopes."""

    client_id: str
    tenant_id: str
    scopes: frozenset[str]
    # The version of the tenant's grant to the client when the token was issued.
    grant_version: int
    # A member token (the code page's): the one member it acts for. None for a partner's token.
    member_id: str | None = None


class InvalidToken(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def known_scopes(scopes: Iterable[str]) -> frozenset[str]:
    """The scopes the gateway knows; others (from a newer identity, say) confer nothing here."""
    return frozenset(s for s in scopes if s in SCOPES)


def issue_access_token(
    *,
    secret: str,
    client_id: str,
    tenant_id: str,
    scopes: Iterable[str],
    grant_version: int,
    ttl_s: int,
    now_s: float | None = None,
) -> str:
    issued_at = int(time.time() if now_s is None else now_s)
    claims = {
        "iss": TOKEN_ISSUER,
        "aud": TOKEN_AUDIENCE,
        "sub": client_id,
        "tid": tenant_id,
        "scope": " ".join(sorted(scopes)),
        "gv": grant_version,
        "iat": issued_at,
        "exp": issued_at + ttl_s,
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(claims, secret, algorithm=TOKEN_ALGORITHM, headers={"typ": TOKEN_TYPE})


def issue_member_token(*, secret: str, client_id: str, tenant_id: str, member_id: str, grant_version: int,
                       ttl_s: int = MEMBER_TOKEN_TTL_S, now_s: float | None = None) -> str:
    """A member token: the partner's client, one tenant, one member, only ``members:code-page``."""
    issued_at = int(time.time() if now_s is None else now_s)
    claims = {
        "iss": TOKEN_ISSUER, "aud": TOKEN_AUDIENCE, "sub": client_id, "tid": tenant_id, "mid": member_id,
        "scope": MEMBERS_CODE_PAGE, "gv": grant_version, "iat": issued_at, "exp": issued_at + ttl_s,
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(claims, secret, algorithm=TOKEN_ALGORITHM, headers={"typ": TOKEN_TYPE})


def verify_access_token(*, token: str, secret: str) -> Principal:
    """The principal a token names, or ``InvalidToken`` saying why not."""
    if len(token) > MAX_TOKEN_CHARS:
        raise InvalidToken("INVALID_TOKEN", "the access token is malformed")
    try:
        claims = jwt.decode(
            token,
            secret,
            # Pinned: never let the token's own header choose the algorithm ("none", RS/HS confusion).
            algorithms=[TOKEN_ALGORITHM],
            audience=TOKEN_AUDIENCE,
            issuer=TOKEN_ISSUER,
            options={"require": ["exp", "iat", "sub", "aud", "iss", "gv"]},
        )
    except jwt.ExpiredSignatureError:
        raise InvalidToken("TOKEN_EXPIRED", "the access token has expired; fetch a new one") from None
    except jwt.InvalidTokenError:
        raise InvalidToken("INVALID_TOKEN", "the access token is malformed or its signature is wrong") from None
    client_id, tenant_id, scope = claims.get("sub"), claims.get("tid"), claims.get("scope")
    if not (isinstance(client_id, str) and client_id and isinstance(tenant_id, str) and tenant_id):
        raise InvalidToken("INVALID_TOKEN", "the access token is malformed or its signature is wrong")
    grant_version = claims.get("gv")
    if not isinstance(scope, str) or not isinstance(grant_version, int) or isinstance(grant_version, bool):
        raise InvalidToken("INVALID_TOKEN", "the access token is malformed or its signature is wrong")
    member_id = claims.get("mid")
    if member_id is not None and not (isinstance(member_id, str) and member_id):
        raise InvalidToken("INVALID_TOKEN", "the access token is malformed or its signature is wrong")
    return Principal(client_id=client_id, tenant_id=tenant_id, scopes=known_scopes(scope.split()),
                     grant_version=grant_version, member_id=member_id)


bearer_scheme = HTTPBearer(
    scheme_name="bearer",
    bearerFormat="JWT",
    description="An access token from POST /v1/oauth/token (OAuth2 client credentials). Scopes:\n\n"
    + "\n".join(f"- `{name}`: {text}" for name, text in SCOPES.items()),
    auto_error=False,
)


def _unauthenticated(*, reason: str, detail: str, error: str | None) -> ProblemError:
    challenge = f'Bearer realm="{REALM}"'
    if error:
        challenge += f', error="{error}"'
    return ProblemError(status=401, reason=reason, detail=detail, headers={"WWW-Authenticate": challenge})


def authenticate(state: GatewayState, *, token: str | None) -> Principal:
    """Who the access token names, or 401 (MISSING_TOKEN, INVALID_TOKEN, TOKEN_EXPIRED)."""
    if token is None:
        raise _unauthenticated(reason="MISSING_TOKEN", detail="send an access token as 'Authorization: Bearer …'",
                               error=None)
    try:
        principal = verify_access_token(token=token, secret=state.settings.token_secret.get_secret_value())
    except InvalidToken as exc:
        raise _unauthenticated(reason=exc.reason, detail=exc.detail, error="invalid_token") from None
    structlog.contextvars.bind_contextvars(client_id=principal.client_id, tenant_id=principal.tenant_id)
    return principal


async def admit(state: GatewayState, principal: Principal, *, tenant_id: str | None,
                scopes: Iterable[str], member_route: bool = False, member_id: str | None = None) -> Principal:
    """The rest of the gate, after ``authenticate``: rate, grant, tenant, scope, in that order. The
    principal it answers holds no more than the client holds in the tenant now.

    ``tenant_id`` is the tenant the call names (None for a call that names none, e.g. creating a
    tenant). Both faces call it: ``authorize`` for REST, gateway.partner_grpc for gRPC.

    A member token passes only where ``member_route`` (a route declaring MEMBER_TOKEN_ROUTE), for
    the path's ``member_id`` only when it is the token's, and needs ``members:code-page`` in place
    of the route's scopes."""
    wait_s = state.client_limiter.try_acquire(principal.client_id)
    if wait_s > 0:
        raise ProblemError(
            status=429,
            reason="RATE_LIMITED",
            detail=f"more than {state.client_limiter.rate_per_s:g} requests a second; slow down",
            headers={"Retry-After": str(retry_after_s(wait_s))},
        )

    grant = await state.grants.current(tenant_id=principal.tenant_id, client_id=principal.client_id)
    if grant is None or grant.version != principal.grant_version:
        raise _unauthenticated(reason="TOKEN_REVOKED", detail="the grant this token was issued under was revoked or "
                               "changed; fetch a new token", error="invalid_token")
    # Never more than the client holds in the tenant now (a grant's scopes change its version; the
    # client's own scopes do not).
    principal = replace(principal, scopes=principal.scopes & grant.scopes)

    if tenant_id is not None and tenant_id != principal.tenant_id:
        raise ProblemError(status=404, reason="TENANT_NOT_FOUND", detail="no such tenant")

    if principal.member_id is not None:
        if not member_route:
            raise ProblemError(status=403, reason="MEMBER_TOKEN_NOT_ALLOWED",
                               detail="a member token from the code page may call only the member's own routes")
        if member_id is not None and member_id != principal.member_id:
            raise ProblemError(status=404, reason="MEMBER_NOT_FOUND", detail="no such member")
        scopes = [MEMBERS_CODE_PAGE]

    missing = [scope for scope in scopes if scope not in principal.scopes]
    if missing:
        raise insufficient_scope(missing)
    return principal


async def authorize(
    request: Request,
    security_scopes: SecurityScopes,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> Principal:
    """The one gate of every protected route: token, rate, grant, tenant, scope, in that order
    (``authenticate`` then ``admit``, which the partner gRPC API calls too).

    A path naming another tenant answers 404 exactly as an unknown tenant would, so a token
    cannot be used to learn which tenants exist; the scope is checked after the tenant for the
    same reason. A token whose grant was revoked or changed since it was issued is 401
    TOKEN_REVOKED (within the grant re-check, at most 60 s; at once when identity's events come).
    """
    state = gateway_state(request)
    principal = authenticate(state, token=credentials.credentials if credentials is not None else None)
    request.state.client_id = principal.client_id
    route = request.scope.get("route")
    member_route = bool((getattr(route, "openapi_extra", None) or {}).get(MEMBER_TOKEN_EXTENSION))
    return await admit(state, principal, tenant_id=request.path_params.get("tenant_id"),
                       scopes=security_scopes.scopes, member_route=member_route,
                       member_id=request.path_params.get("member_id"))


def insufficient_scope(missing: list[str], *, detail: str | None = None) -> ProblemError:
    """403 INSUFFICIENT_SCOPE naming the scopes the call needs (RFC 6750 §3.1)."""
    return ProblemError(
        status=403,
        reason="INSUFFICIENT_SCOPE",
        detail=detail or f"this call needs the scope {' '.join(missing)}, which the token does not hold",
        headers={"WWW-Authenticate": f'Bearer realm="{REALM}", error="insufficient_scope", '
                                     f'scope="{" ".join(missing)}"'},
        extra={"scope": " ".join(missing)},
    )


# What a protected route declares, e.g. ``_principal: ReadMembers``: one scope, one gate.
ReadMembers = Annotated[Principal, Security(authorize, scopes=[MEMBERS_READ])]
WriteMembers = Annotated[Principal, Security(authorize, scopes=[MEMBERS_WRITE])]
AdminClients = Annotated[Principal, Security(authorize, scopes=[CLIENTS_ADMIN])]
AdminPlatform = Annotated[Principal, Security(authorize, scopes=[PLATFORM_ADMIN])]
IssueCodes = Annotated[Principal, Security(authorize, scopes=[CODES_ISSUE])]
SyncDevices = Annotated[Principal, Security(authorize, scopes=[DEVICES_SYNC])]
AdminCodes = Annotated[Principal, Security(authorize, scopes=[CODES_ADMIN])]
ReadWallets = Annotated[Principal, Security(authorize, scopes=[WALLETS_READ])]
TopUpWallets = Annotated[Principal, Security(authorize, scopes=[WALLETS_TOPUP])]
AdminLedger = Annotated[Principal, Security(authorize, scopes=[LEDGER_ADMIN])]
ReadStatements = Annotated[Principal, Security(authorize, scopes=[STATEMENTS_READ])]
AdminPolicy = Annotated[Principal, Security(authorize, scopes=[POLICY_ADMIN])]
CreatePayments = Annotated[Principal, Security(authorize, scopes=[PAYMENTS_CREATE])]
AdminDevices = Annotated[Principal, Security(authorize, scopes=[DEVICES_ADMIN])]
ReadData = Annotated[Principal, Security(authorize, scopes=[DATA_READ])]
ManageWebhooks = Annotated[Principal, Security(authorize, scopes=[WEBHOOKS_MANAGE])]
BindMembers = Annotated[Principal, Security(authorize, scopes=[MEMBERS_BIND])]
SelfService = Annotated[Principal, Security(authorize, scopes=[MEMBERS_SELF_SERVICE])]
CodePageLinks = Annotated[Principal, Security(authorize, scopes=[MEMBERS_CODE_PAGE])]
