"""Issuer private keys at rest: sealed with the master key, bound to the row they belong to.

Each key's 32-byte Ed25519 seed is encrypted with XSalsa20-Poly1305 (``nacl.secret.SecretBox``)
under a key derived from the master key and the row's context (tenant, key id, public key) with
keyed BLAKE2b (``runtime.sealing``). A sealed seed copied into another tenant's row, or read with
another master key, fails authentication instead of signing for the wrong tenant. Plain
computation; no I/O.
"""

from __future__ import annotations

import uuid

import nacl.signing

from runtime import sealing
from runtime.sealing import MASTER_KEY_BYTES, SealOpenError, parse_master_key, seal

__all__ = ["MASTER_KEY_BYTES", "SEED_BYTES", "MasterKeyMismatch", "open_signing_key", "parse_master_key",
           "seal_seed"]

SEED_BYTES = 32
# BLAKE2b personalisation: at most 16 bytes, names what the derived key is for.
_PERSON = b"onecard-issuer1"
_CONTEXT_PREFIX = b"onecard.codegen.issuer-key.v1"


class MasterKeyMismatch(Exception):
    """A sealed key did not open: wrong master key, or the row was tampered with or moved."""


def _context(*, tenant_id: uuid.UUID, key_id: bytes, public_key: bytes) -> bytes:
    return b"|".join([_CONTEXT_PREFIX, tenant_id.bytes, key_id, public_key])


def seal_seed(*, master_key: bytes, tenant_id: uuid.UUID, key_id: bytes, public_key: bytes, seed: bytes) -> bytes:
    if len(seed) != SEED_BYTES:
        raise ValueError("an Ed25519 seed is 32 bytes")
    return seal(master_key=master_key, person=_PERSON,
                context=_context(tenant_id=tenant_id, key_id=key_id, public_key=public_key), plaintext=seed)


def open_signing_key(
    *, master_key: bytes, tenant_id: uuid.UUID, key_id: bytes, public_key: bytes, sealed: bytes
) -> nacl.signing.SigningKey:
    """The signing key, or MasterKeyMismatch: it does not open with this master key and row, or its
    seed does not make the stored public key."""
    try:
        return sealing.open_signing_key(master_key=master_key, person=_PERSON, sealed=sealed, public_key=public_key,
                                        context=_context(tenant_id=tenant_id, key_id=key_id, public_key=public_key))
    except SealOpenError as error:
        raise MasterKeyMismatch(f"the issuer key: {error}") from None
