"""The console's session: a cookie the browser keeps and cannot read, holding the access token.

Choices and why:

- **Stateless, encrypted cookie.** The session is the access token, its tenant, client and scopes,
  and a CSRF token, sealed with XSalsa20-Poly1305 (PyNaCl's SecretBox) under a key derived from
  the gateway's ``token_secret``. Any replica of the gateway opens it; nobody else can read the
  token in it or forge one. It expires with the token (``exp``), never later.
- **HttpOnly, SameSite=Strict, Secure over https, Path=/console.** Scripts cannot read it, other
  sites cannot send it, and the REST API never sees it (it answers bearer tokens only).
- **CSRF: a synchronizer token.** Every form and every htmx POST carries the session's CSRF token
  (a form field or the ``X-CSRF-Token`` header), compared in constant time. Signing in has its
  own short-lived cookie with a CSRF token, so a foreign page cannot sign a browser in either.
- **Sign-out** forgets the cookie. The token inside stays valid until it expires (at most the
  token TTL); there is no server-side list to revoke it from.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

import nacl.exceptions
import nacl.secret
from fastapi import Request, Response

SESSION_COOKIE = "onecard_console"
SIGN_IN_COOKIE = "onecard_console_sign_in"
COOKIE_PATH = "/console"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
# How long a sign-in form stays good.
SIGN_IN_TTL_S = 15 * 60
# A sealed session is a token of a few hundred bytes and a little more; browsers keep 4 KiB.
MAX_COOKIE_CHARS = 4000
_KEY_PERSON = b"oc-console-sess"


@dataclass(frozen=True)
class ConsoleSession:
    """What the cookie holds: the access token and what it was issued for."""

    access_token: str
    tenant_id: str
    client_id: str
    scopes: frozenset[str]
    csrf_token: str
    expires_at_s: int

    def holds(self, scope: str) -> bool:
        return scope in self.scopes


class SessionBox:
    """Seals and opens the console's cookies under a key derived from the gateway's token secret."""

    def __init__(self, *, token_secret: str) -> None:
        # A key of its own (domain-separated from the token's HMAC key), the same on every replica.
        key = hashlib.blake2b(token_secret.encode(), digest_size=nacl.secret.SecretBox.KEY_SIZE,
                              person=_KEY_PERSON).digest()
        self._box = nacl.secret.SecretBox(key)

    def seal(self, payload: dict[str, object]) -> str:
        sealed = self._box.encrypt(json.dumps(payload, separators=(",", ":")).encode())
        return base64.urlsafe_b64encode(bytes(sealed)).decode().rstrip("=")

    def open(self, value: str | None) -> dict[str, object] | None:
        """The payload, or None when the value is absent, malformed, forged or expired."""
        if not value or len(value) > MAX_COOKIE_CHARS:
            return None
        try:
            sealed = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
            payload = json.loads(self._box.decrypt(sealed))
        except (ValueError, nacl.exceptions.CryptoError):
            return None
        if not isinstance(payload, dict):
            return None
        expires_at_s = payload.get("exp")
        if not isinstance(expires_at_s, int) or expires_at_s <= int(time.time()):
            return None
        return payload


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def same_token(expected: str, offered: str | None) -> bool:
    return bool(offered) and hmac.compare_digest(expected.encode(), (offered or "").encode())


def session_from(box: SessionBox, request: Request) -> ConsoleSession | None:
    payload = box.open(request.cookies.get(SESSION_COOKIE))
    if payload is None:
        return None
    try:
        return ConsoleSession(access_token=str(payload["t"]), tenant_id=str(payload["tid"]),
                              client_id=str(payload["cid"]), scopes=frozenset(str(s) for s in payload["sc"]),
                              csrf_token=str(payload["c"]), expires_at_s=int(payload["exp"]))
    except (KeyError, TypeError, ValueError):
        return None


def _is_https(request: Request) -> bool:
    return request.url.scheme == "https"


def set_session(response: Response, box: SessionBox, request: Request, session: ConsoleSession) -> None:
    value = box.seal({"t": session.access_token, "tid": session.tenant_id, "cid": session.client_id,
                      "sc": sorted(session.scopes), "c": session.csrf_token, "exp": session.expires_at_s})
    response.set_cookie(SESSION_COOKIE, value, max_age=max(0, session.expires_at_s - int(time.time())),
                        path=COOKIE_PATH, secure=_is_https(request), httponly=True, samesite="strict")


def clear_session(response: Response, request: Request) -> None:
    response.delete_cookie(SESSION_COOKIE, path=COOKIE_PATH, secure=_is_https(request), httponly=True,
                           samesite="strict")


def sign_in_csrf(box: SessionBox, request: Request) -> str | None:
    """The CSRF token of the sign-in form this browser was given, if it is still good."""
    payload = box.open(request.cookies.get(SIGN_IN_COOKIE))
    token = payload.get("c") if payload else None
    return token if isinstance(token, str) else None


def set_sign_in_csrf(response: Response, box: SessionBox, request: Request, token: str) -> None:
    value = box.seal({"c": token, "exp": int(time.time()) + SIGN_IN_TTL_S})
    response.set_cookie(SIGN_IN_COOKIE, value, max_age=SIGN_IN_TTL_S, path=COOKIE_PATH, secure=_is_https(request),
                        httponly=True, samesite="strict")


def clear_sign_in_csrf(response: Response, request: Request) -> None:
    response.delete_cookie(SIGN_IN_COOKIE, path=COOKIE_PATH, secure=_is_https(request), httponly=True,
                           samesite="strict")
