"""Building codes: issuer credentials and token batches (codegen), holder codes (phones, simulators).

Every argument is checked before anything is signed; a bad one raises ``IssueError`` naming it.
"""
from __future__ import annotations

import hashlib
import uuid
from typing import NamedTuple

import nacl.signing

from onecard_codes.errors import IssueError, MalformedCode
from onecard_codes.format import (
    CREDENTIAL_BODY,
    FORMAT_VERSION,
    HEADER,
    KIND_HOLDER,
    KIND_TOKEN,
    MAX_CREDENTIAL_VALIDITY_S,
    MAX_TOKEN_BATCH_S,
    MAX_U8,
    MAX_U16,
    MAX_U32,
    PROOF_FIELDS,
    PUBLIC_KEY_BYTES,
    TOKEN_FIELDS,
    binary_to_text,
    credential_id_for,
    credential_signed_message,
    parse_credential,
    proof_signed_message,
    token_signed_message,
)
from onecard_codes.keys import IssuerKey, TrustedKey, is_valid_public_key
from onecard_codes.result import ALL_PURPOSES, OfflineCaps, Purpose

DEFAULT_SLOT_LENGTH_S = 60
# Shorter slots would make a 24 h batch unreasonably large for an app to hold.
MIN_SLOT_LENGTH_S = 10
MAX_TOKENS_PER_BATCH = MAX_TOKEN_BATCH_S // MIN_SLOT_LENGTH_S


class IssuedCredential(NamedTuple):
    """A signed holder credential. ``credential_bytes`` go to the phone (134 bytes)."""

    credential_id: uuid.UUID
    credential_bytes: bytes
    tenant_id: uuid.UUID
    member_id: uuid.UUID
    key_id: bytes
    holder_public_key: bytes
    not_before_s: int
    not_after_s: int
    caps: OfflineCaps
    purposes: Purpose


class Token(NamedTuple):
    """One rotating token: show ``text`` from ``slot_start_s`` until ``slot_end_s``."""

    sequence: int
    slot_start_s: int
    slot_end_s: int
    text: str


class TokenBatch(NamedTuple):
    credential_id: uuid.UUID
    tenant_id: uuid.UUID
    member_id: uuid.UUID
    key_id: bytes
    not_before_s: int
    not_after_s: int
    tokens: tuple[Token, ...]

    def token_at(self, *, now_s: int) -> Token | None:
        """The token to show at ``now_s``, or None outside the batch."""
        if not self.tokens or not self.not_before_s <= now_s < self.not_after_s:
            return None
        slot_length_s = self.tokens[0].slot_end_s - self.tokens[0].slot_start_s
        return self.tokens[min((now_s - self.not_before_s) // slot_length_s, len(self.tokens) - 1)]


def _check_int(value: int, *, name: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise IssueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _check_uuid(value: uuid.UUID, *, name: str) -> uuid.UUID:
    if not isinstance(value, uuid.UUID):
        raise IssueError(f"{name} must be a uuid.UUID, got {type(value).__name__}")
    return value


def _check_caps(caps: OfflineCaps) -> OfflineCaps:
    if not isinstance(caps, OfflineCaps):
        raise IssueError(f"caps must be OfflineCaps, got {type(caps).__name__}")
    _check_int(caps.per_transaction_fen, name="caps.per_transaction_fen", low=0, high=MAX_U32)
    _check_int(caps.per_day_fen, name="caps.per_day_fen", low=0, high=MAX_U32)
    _check_int(caps.count_per_day, name="caps.count_per_day", low=0, high=MAX_U8)
    return caps


def _check_purposes(purposes: Purpose) -> Purpose:
    if not isinstance(purposes, Purpose) or not purposes or purposes & ~ALL_PURPOSES:
        raise IssueError(f"purposes must be a non-empty combination of Purpose flags, got {purposes!r}")
    return purposes


def _check_validity(*, not_before_s: int, not_after_s: int, max_s: int, what: str) -> None:
    _check_int(not_before_s, name="not_before_s", low=0, high=MAX_U32)
    _check_int(not_after_s, name="not_after_s", low=0, high=MAX_U32)
    if not_after_s <= not_before_s:
        raise IssueError(f"{what}: not_after_s ({not_after_s}) must be after not_before_s ({not_before_s})")
    if not_after_s - not_before_s > max_s:
        raise IssueError(f"{what}: not_after_s is {not_after_s - not_before_s} s after not_before_s; "
                         f"at most {max_s} s")


def issue_credential(*, issuer_key: IssuerKey, member_id: uuid.UUID, holder_public_key: bytes,
                     not_before_s: int, not_after_s: int, caps: OfflineCaps, purposes: Purpose) -> IssuedCredential:
    """Sign a holder credential binding ``member_id`` to the phone's ``holder_public_key``.

    The tenant is ``issuer_key.tenant_id``: it is covered by the signature but not carried (the
    verifier takes it from its trust list). The credential id is derived from the signed content
    (first 16 bytes of SHA-256 of the signed message), so issuing the same fields twice gives the
    same credential. Validity is at most 72 h.
    """
    if not isinstance(issuer_key, IssuerKey):
        raise IssueError(f"issuer_key must be an IssuerKey, got {type(issuer_key).__name__}")
    _check_uuid(member_id, name="member_id")
    if not isinstance(holder_public_key, bytes) or len(holder_public_key) != PUBLIC_KEY_BYTES:
        raise IssueError(f"holder_public_key must be {PUBLIC_KEY_BYTES} bytes")
    if not is_valid_public_key(holder_public_key):
        raise IssueError("holder_public_key is not a valid Ed25519 public key (a canonical point of prime order); "
                         "no verifier would accept a code made with it")
    _check_validity(not_before_s=not_before_s, not_after_s=not_after_s, max_s=MAX_CREDENTIAL_VALIDITY_S,
                    what="credential")
    _check_caps(caps)
    _check_purposes(purposes)
    body = CREDENTIAL_BODY.pack(issuer_key.key_id, member_id.bytes, holder_public_key, not_before_s, not_after_s,
                                caps.per_transaction_fen, caps.per_day_fen, caps.count_per_day, int(purposes))
    tenant_bytes = issuer_key.tenant_id.bytes
    signature = issuer_key.sign(credential_signed_message(tenant_id=tenant_bytes, body=body))
    return IssuedCredential(
        credential_id=uuid.UUID(bytes=credential_id_for(tenant_id=tenant_bytes, body=body)),
        credential_bytes=body + signature, tenant_id=issuer_key.tenant_id, member_id=member_id,
        key_id=issuer_key.key_id, holder_public_key=holder_public_key, not_before_s=not_before_s,
        not_after_s=not_after_s, caps=caps, purposes=purposes,
    )


def issue_token_batch(*, issuer_key: IssuerKey, member_id: uuid.UUID, not_before_s: int, not_after_s: int,
                      caps: OfflineCaps, purposes: Purpose, slot_length_s: int = DEFAULT_SLOT_LENGTH_S,
                      credential_id: uuid.UUID | None = None) -> TokenBatch:
    """Sign rotating tokens covering [not_before_s, not_after_s), one per slot (at most 24 h).

    Slots start at ``not_before_s`` and last ``slot_length_s`` each; the last is cut at
    ``not_after_s``. All tokens share ``credential_id`` (the batch id, random if not given), which
    is what revocation by credential names. 24 h of 60 s slots is 1440 tokens.
    """
    if not isinstance(issuer_key, IssuerKey):
        raise IssueError(f"issuer_key must be an IssuerKey, got {type(issuer_key).__name__}")
    _check_uuid(member_id, name="member_id")
    credential_id = uuid.uuid4() if credential_id is None else _check_uuid(credential_id, name="credential_id")
    _check_validity(not_before_s=not_before_s, not_after_s=not_after_s, max_s=MAX_TOKEN_BATCH_S, what="token batch")
    _check_int(slot_length_s, name="slot_length_s", low=MIN_SLOT_LENGTH_S, high=MAX_U16)
    _check_caps(caps)
    _check_purposes(purposes)
    tenant_bytes = issuer_key.tenant_id.bytes
    key_id = issuer_key.key_id
    sign = issuer_key.signing_key.sign
    tokens = []
    for sequence, slot_start_s in enumerate(range(not_before_s, not_after_s, slot_length_s)):
        length_s = min(slot_length_s, not_after_s - slot_start_s)
        fields = TOKEN_FIELDS.pack(FORMAT_VERSION, KIND_TOKEN, key_id, credential_id.bytes, member_id.bytes,
                                   not_before_s, not_after_s, caps.per_transaction_fen, caps.per_day_fen,
                                   caps.count_per_day, int(purposes), slot_start_s, length_s, sequence)
        signature = sign(token_signed_message(tenant_id=tenant_bytes, fields=fields)).signature
        tokens.append(Token(sequence=sequence, slot_start_s=slot_start_s, slot_end_s=slot_start_s + length_s,
                            text=binary_to_text(fields + signature)))
    assert len(tokens) <= MAX_TOKENS_PER_BATCH
    return TokenBatch(credential_id=credential_id, tenant_id=issuer_key.tenant_id, member_id=member_id, key_id=key_id,
                      not_before_s=not_before_s, not_after_s=not_after_s, tokens=tuple(tokens))


def generate_holder_key() -> nacl.signing.SigningKey:
    """A fresh Ed25519 holder key for a phone; send ``bytes(key.verify_key)`` to codegen."""
    return nacl.signing.SigningKey.generate()


def holder_public_key(holder_signing_key: nacl.signing.SigningKey) -> bytes:
    return bytes(holder_signing_key.verify_key)


def make_holder_code(*, credential_bytes: bytes, holder_signing_key: nacl.signing.SigningKey, now_s: int,
                     counter: int, purpose: Purpose) -> str:
    """A holder code ``OC1:...`` (318 characters) proving possession of the credential's holder key.

    ``counter`` must increase with every code the phone shows for this credential (persist it);
    ``purpose`` is exactly one purpose the credential allows. Offline: no network needed.
    """
    try:
        credential = parse_credential(credential_bytes)
    except MalformedCode as exc:
        raise IssueError(f"credential_bytes: {exc}") from None
    if not isinstance(holder_signing_key, nacl.signing.SigningKey):
        raise IssueError("holder_signing_key must be a nacl.signing.SigningKey")
    if bytes(holder_signing_key.verify_key) != credential.holder_public_key:
        raise IssueError("holder_signing_key is not the key this credential was issued to")
    _check_int(now_s, name="now_s", low=0, high=MAX_U32)
    _check_int(counter, name="counter", low=0, high=MAX_U32)
    if not isinstance(purpose, Purpose) or purpose not in (Purpose.PAY, Purpose.ACCESS, Purpose.RIDE,
                                                           Purpose.CHECK_IN):
        raise IssueError(f"purpose must be exactly one Purpose, got {purpose!r}")
    if not purpose & credential.purposes:
        raise IssueError(f"the credential does not allow {purpose.name}")
    credential_hash = hashlib.sha256(credential.raw).digest()
    message = proof_signed_message(credential_hash=credential_hash, time_s=now_s, counter=counter,
                                   purpose=int(purpose))
    signature = holder_signing_key.sign(message).signature
    proof = PROOF_FIELDS.pack(now_s, counter, int(purpose)) + signature
    return binary_to_text(HEADER.pack(FORMAT_VERSION, KIND_HOLDER) + credential.raw + proof)


__all__ = [
    "DEFAULT_SLOT_LENGTH_S", "IssuedCredential", "IssuerKey", "Token", "TokenBatch", "TrustedKey",
    "generate_holder_key", "holder_public_key", "issue_credential", "issue_token_batch", "make_holder_code",
]
