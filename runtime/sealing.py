"""Secrets at rest: small values sealed with a service's master key, bound to the row they live in.

A value is encrypted with XSalsa20-Poly1305 (``nacl.secret.SecretBox``) under a key derived from
the master key and a context (what the row is: its tenant, key id, public key...) with keyed
BLAKE2b, personalised per use. A sealed value copied into another row, or read with another
master key, fails authentication instead of being used for the wrong row. Plain computation; no I/O.

Used by codegen (issuer keys) and policy (bundle signing keys); each names its own
personalisation and context, so a value sealed for one can never open as the other's.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated

import nacl.exceptions
import nacl.hash
import nacl.secret
import nacl.signing
from nacl.encoding import RawEncoder
from pydantic import BeforeValidator, SecretBytes, SecretStr

MASTER_KEY_BYTES = 32
# BLAKE2b personalisation is at most 16 bytes.
MAX_PERSON_BYTES = 16


class SealOpenError(Exception):
    """A sealed value did not open: wrong master key, or the row was tampered with or moved."""


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


def _master_key_setting(value: object) -> SecretBytes:
    text = value.get_secret_value() if isinstance(value, SecretStr) else value
    if not isinstance(text, str):
        raise ValueError("must be a string: 32 bytes as 64 hex digits or base64")
    return SecretBytes(parse_master_key(text))


# A master key as a setting: read as text (hex or base64), checked at start, kept as 32 secret bytes
# (never shown by repr or logs); `settings.<name>.get_secret_value()` is the key.
MasterKey = Annotated[SecretBytes, BeforeValidator(_master_key_setting)]


def _box(*, master_key: bytes, person: bytes, context: bytes) -> nacl.secret.SecretBox:
    if len(person) > MAX_PERSON_BYTES:
        raise ValueError("a BLAKE2b personalisation is at most 16 bytes")
    derived = nacl.hash.blake2b(context, key=master_key, digest_size=nacl.secret.SecretBox.KEY_SIZE,
                                person=person, encoder=RawEncoder)
    return nacl.secret.SecretBox(derived)


def seal(*, master_key: bytes, person: bytes, context: bytes, plaintext: bytes) -> bytes:
    """``plaintext`` sealed under the key derived from ``master_key``, ``person`` and ``context``."""
    return bytes(_box(master_key=master_key, person=person, context=context).encrypt(plaintext))


def unseal(*, master_key: bytes, person: bytes, context: bytes, sealed: bytes) -> bytes:
    """The plaintext ``seal`` sealed with the same three, or SealOpenError."""
    try:
        return _box(master_key=master_key, person=person, context=context).decrypt(sealed)
    except nacl.exceptions.CryptoError:
        raise SealOpenError("the sealed value does not open with this master key and context") from None


def open_signing_key(*, master_key: bytes, person: bytes, context: bytes, sealed: bytes,
                     public_key: bytes) -> nacl.signing.SigningKey:
    """An Ed25519 signing key whose seed was sealed with ``seal``, checked against the public key
    stored beside it; SealOpenError when it does not open or does not match."""
    signing_key = nacl.signing.SigningKey(unseal(master_key=master_key, person=person, context=context,
                                                 sealed=sealed))
    if bytes(signing_key.verify_key) != public_key:
        raise SealOpenError("the sealed seed does not make the stored public key")
    return signing_key
