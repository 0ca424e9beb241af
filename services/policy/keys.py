"""Bundle signing keys at rest: the Ed25519 seed sealed with ONECARD_POLICY_MASTER_KEY, bound to
its row (tenant, key id, public key) by ``runtime.sealing``, under policy's own personalisation so
a codegen issuer key can never open as a policy key or the other way round. Plain computation."""

from __future__ import annotations

import hashlib
import uuid

import nacl.signing

from runtime import sealing
from runtime.sealing import SealOpenError, seal

SEED_BYTES = 32
_PERSON = b"onecard-policy1"
_CONTEXT_PREFIX = b"onecard.policy.bundle-key.v1"
# Key ids are the first 8 bytes of the public key's SHA-256, as 16 hex digits.
KEY_ID_BYTES = 8


class MasterKeyMismatch(Exception):
    """A sealed bundle key did not open: wrong master key, or the row was tampered with or moved."""


def key_id_for(public_key: bytes) -> str:
    return hashlib.sha256(public_key).digest()[:KEY_ID_BYTES].hex()


def _context(*, tenant_id: uuid.UUID, key_id: str, public_key: bytes) -> bytes:
    return b"|".join([_CONTEXT_PREFIX, tenant_id.bytes, key_id.encode(), public_key])


def seal_seed(*, master_key: bytes, tenant_id: uuid.UUID, key_id: str, public_key: bytes, seed: bytes) -> bytes:
    if len(seed) != SEED_BYTES:
        raise ValueError("an Ed25519 seed is 32 bytes")
    return seal(master_key=master_key, person=_PERSON,
                context=_context(tenant_id=tenant_id, key_id=key_id, public_key=public_key), plaintext=seed)


def open_signing_key(*, master_key: bytes, tenant_id: uuid.UUID, key_id: str, public_key: bytes,
                     sealed: bytes) -> nacl.signing.SigningKey:
    """The signing key, or MasterKeyMismatch: it does not open with this master key and row, or its
    seed does not make the stored public key."""
    try:
        return sealing.open_signing_key(master_key=master_key, person=_PERSON, sealed=sealed, public_key=public_key,
                                        context=_context(tenant_id=tenant_id, key_id=key_id, public_key=public_key))
    except SealOpenError as error:
        raise MasterKeyMismatch(f"the bundle key: {error}") from None
