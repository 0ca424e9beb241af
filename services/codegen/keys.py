"""Issuer private keys at rest: sealed with the master key, bound to the row they belong to.

Each key's 32-byte Ed25519 seed is encrypted with XSalsa20-Poly1305 (``nacl.secret.SecretBox``)
under a key derived from the master key and the row's context (tenant, key id, public key) with
keyed BLAKE2b. A sealed seed copied into another tenant's row, or read with another master key,
fails authentication instead of signing for the wrong tenant. Plain computation; no I/O.
"""

from __future__ import annotations

import base64
import binascii
import uuid

import nacl.exceptions
import nacl.hash
import nacl.secret
import nacl.signing
from nacl.encoding import RawEncoder

MASTER_KEY_BYTES = 32
SEED_BYTES = 32
# BLAKE2b personalisation: at most 16 bytes, names what the derived key is for.
_PERSON = b"onecard-issuer1"
_CONTEXT_PREFIX = b"onecard.codegen.issuer-key.v1"


class MasterKeyMismatch(Exception):
    """A sealed key did not open: wrong master key, or the row was tampered with or moved."""


def parse_master_key(text: str) -> bytes:
    """32 bytes from 64 hex digits or base64 (standard or URL-safe, padding optional)."""
    text = text.strip()
    if len(text) == 2 * MASTER_KEY_BYTES:
        try:
            return bytes.fromhex(text)
        except ValueError:
            pass
    padded = text + "=" * (-len(text) % 4)
    for decode in (base64.b64decode, base64.urlsafe_b64decode):
        try:
            raw = decode(padded.encode())
        except (binascii.Error, ValueError):
            continue
        if len(raw) == MASTER_KEY_BYTES:
            return raw
    raise ValueError(f"must be {MASTER_KEY_BYTES} bytes as 64 hex digits or base64")


def _context(*, tenant_id: uuid.UUID, key_id: bytes, public_key: bytes) -> bytes:
    return b"|".join([_CONTEXT_PREFIX, tenant_id.bytes, key_id, public_key])


def _box(*, master_key: bytes, context: bytes) -> nacl.secret.SecretBox:
    derived = nacl.hash.blake2b(context, key=master_key, digest_size=nacl.secret.SecretBox.KEY_SIZE,
                                person=_PERSON, encoder=RawEncoder)
    return nacl.secret.SecretBox(derived)


def seal_seed(*, master_key: bytes, tenant_id: uuid.UUID, key_id: bytes, public_key: bytes, seed: bytes) -> bytes:
    if len(seed) != SEED_BYTES:
        raise ValueError("an Ed25519 seed is 32 bytes")
    box = _box(master_key=master_key, context=_context(tenant_id=tenant_id, key_id=key_id, public_key=public_key))
    return bytes(box.encrypt(seed))


def open_signing_key(
    *, master_key: bytes, tenant_id: uuid.UUID, key_id: bytes, public_key: bytes, sealed: bytes
) -> nacl.signing.SigningKey:
    """The signing key, or MasterKeyMismatch. Also checks the seed makes the stored public key."""
    box = _box(master_key=master_key, context=_context(tenant_id=tenant_id, key_id=key_id, public_key=public_key))
    try:
        seed = box.decrypt(sealed)
    except nacl.exceptions.CryptoError:
        raise MasterKeyMismatch("the issuer key does not open with this master key") from None
    signing_key = nacl.signing.SigningKey(seed)
    if bytes(signing_key.verify_key) != public_key:
        raise MasterKeyMismatch("the issuer key's seed does not match its public key")
    return signing_key
