"""Access tokens: what a valid one carries, and each way a token is refused."""
from __future__ import annotations

import time

import jwt
import pytest

from gateway.auth import (
    MEMBERS_READ,
    MEMBERS_WRITE,
    TOKEN_AUDIENCE,
    TOKEN_ISSUER,
    InvalidToken,
    issue_access_token,
    verify_access_token,
)

SECRET = "unit-test-secret-that-is-long-enough-000"


def test_a_token_names_its_client_tenant_and_scopes() -> None:
    token = issue_access_token(secret=SECRET, client_id="c1", tenant_id="t1", scopes=[MEMBERS_WRITE, MEMBERS_READ],
                               grant_version=7, ttl_s=60)
    principal = verify_access_token(token=token, secret=SECRET)
    assert principal.client_id == "c1"
    assert principal.tenant_id == "t1"
    assert principal.scopes == {MEMBERS_READ, MEMBERS_WRITE}
    assert principal.grant_version == 7


def test_an_expired_token_is_refused_as_expired() -> None:
    token = issue_access_token(secret=SECRET, client_id="c1", tenant_id="t1", scopes=[MEMBERS_READ], grant_version=1,
                               ttl_s=60, now_s=time.time() - 120)
    with pytest.raises(InvalidToken) as refused:
        verify_access_token(token=token, secret=SECRET)
    assert refused.value.reason == "TOKEN_EXPIRED"


def test_a_token_signed_with_another_secret_is_refused() -> None:
    token = issue_access_token(secret="another-secret-that-is-long-enough-0000", client_id="c1", tenant_id="t1",
                               scopes=[MEMBERS_READ], grant_version=1, ttl_s=60)
    with pytest.raises(InvalidToken) as refused:
        verify_access_token(token=token, secret=SECRET)
    assert refused.value.reason == "INVALID_TOKEN"


def test_an_unsigned_token_is_refused() -> None:
    claims = {"iss": TOKEN_ISSUER, "aud": TOKEN_AUDIENCE, "sub": "c1", "tid": "t1", "scope": MEMBERS_READ,
              "gv": 1, "iat": int(time.time()), "exp": int(time.time()) + 60}
    token = jwt.encode(claims, key=None, algorithm="none")
    with pytest.raises(InvalidToken):
        verify_access_token(token=token, secret=SECRET)


@pytest.mark.parametrize("missing", ["tid", "sub", "exp", "aud", "iss", "scope", "gv"])
def test_a_token_missing_a_claim_is_refused(missing: str) -> None:
    now = int(time.time())
    claims = {"iss": TOKEN_ISSUER, "aud": TOKEN_AUDIENCE, "sub": "c1", "tid": "t1", "scope": MEMBERS_READ,
              "gv": 1, "iat": now, "exp": now + 60}
    del claims[missing]
    with pytest.raises(InvalidToken):
        verify_access_token(token=jwt.encode(claims, SECRET, algorithm="HS256"), secret=SECRET)


def test_garbage_is_refused() -> None:
    for token in ["", "abc", "a.b.c", "x" * 10_000]:
        with pytest.raises(InvalidToken):
            verify_access_token(token=token, secret=SECRET)


def test_unknown_scopes_in_a_token_confer_nothing() -> None:
    token = issue_access_token(secret=SECRET, client_id="c1", tenant_id="t1", scopes=["root:everything", MEMBERS_READ],
                               grant_version=1, ttl_s=60)
    assert verify_access_token(token=token, secret=SECRET).scopes == {MEMBERS_READ}


def test_a_grant_version_that_is_not_a_whole_number_is_refused() -> None:
    now = int(time.time())
    for version in ["1", 1.5, True, None]:
        claims = {"iss": TOKEN_ISSUER, "aud": TOKEN_AUDIENCE, "sub": "c1", "tid": "t1", "scope": MEMBERS_READ,
                  "gv": version, "iat": now, "exp": now + 60}
        with pytest.raises(InvalidToken):
            verify_access_token(token=jwt.encode(claims, SECRET, algorithm="HS256"), secret=SECRET)
