"""onecard offline codes (OC1): build and verify holder codes and rotating tokens with no network.

Issuing (codegen): ``IssuerKey``, ``issue_credential``, ``issue_token_batch``.
Phones and simulators: ``generate_holder_key``, ``make_holder_code``.
Devices: ``Verifier`` with a ``TrustList``, ``Revocations`` and a ``ReplayCache``; ``verify``
answers ``Verified`` or ``Rejected`` (with a ``Reason``) and never raises.
Rendering (extra ``qr``): ``onecard_codes.qr``.

The format is specified in ``docs/code-format.md``.
"""
from __future__ import annotations

from onecard_codes.errors import CodeError, IssueError, MalformedCode
from onecard_codes.format import (
    HOLDER_TEXT_CHARS,
    MAX_CREDENTIAL_VALIDITY_S,
    MAX_TEXT_CHARS,
    MAX_TOKEN_BATCH_S,
    TEXT_PREFIX,
    TOKEN_TEXT_CHARS,
    Credential,
    HolderCode,
    RotatingToken,
    decode_code,
)
from onecard_codes.issue import (
    DEFAULT_SLOT_LENGTH_S,
    IssuedCredential,
    Token,
    TokenBatch,
    generate_holder_key,
    holder_public_key,
    issue_credential,
    issue_token_batch,
    make_holder_code,
)
from onecard_codes.keys import IssuerKey, Revocations, TrustedKey, TrustList, is_valid_public_key, key_id_for
from onecard_codes.result import ALL_PURPOSES, CodeKind, OfflineCaps, Purpose, Reason, Rejected, Verified, VerifyResult
from onecard_codes.verify import DEFAULT_CLOCK_WINDOW_S, DEFAULT_MAX_TRUST_LIST_AGE_S, ReplayCache, Verifier

__all__ = [
    "ALL_PURPOSES", "DEFAULT_CLOCK_WINDOW_S", "DEFAULT_MAX_TRUST_LIST_AGE_S", "DEFAULT_SLOT_LENGTH_S", "HOLDER_TEXT_CHARS", "MAX_CREDENTIAL_VALIDITY_S", "MAX_TEXT_CHARS",
    "MAX_TOKEN_BATCH_S", "TEXT_PREFIX", "TOKEN_TEXT_CHARS",
    "CodeError", "CodeKind", "Credential", "HolderCode", "IssueError", "IssuedCredential", "IssuerKey",
    "MalformedCode", "OfflineCaps", "Purpose", "Reason", "Rejected", "ReplayCache", "Revocations", "RotatingToken", "Token",
    "TokenBatch", "TrustList", "TrustedKey", "Verified", "Verifier", "VerifyResult",
    "decode_code", "generate_holder_key", "holder_public_key", "issue_credential", "issue_token_batch",
    "is_valid_public_key", "key_id_for", "make_holder_code",
]
