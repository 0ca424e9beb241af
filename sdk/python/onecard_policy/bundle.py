"""A signed bundle of one published rule-set version, for devices that decide offline.

Layout (all integers big-endian)::

    magic        4 bytes  b"OCP1"
    key_id_len   1 byte   1..64
    key_id       key_id_len bytes, printable ASCII
    payload_len  4 bytes  1..MAX_PAYLOAD_BYTES
    payload      canonical JSON {"format": 1, "tenant_id": ..., "version": ..., "rule_set": {...}}
    signature    64 bytes Ed25519 over every byte before it

The signature covers the key id and the lengths too, so changing any byte is refused, and a
bundle with bytes after the signature is malformed. Specified in ``docs/policy.md``.
"""
from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

import nacl.exceptions
import nacl.signing

from onecard_policy.rules import RuleSet, RuleSetError, canonical_json, parse_rule_set

MAGIC = b"OCP1"
BUNDLE_FORMAT = 1
SIGNATURE_BYTES = 64
MAX_KEY_ID_BYTES = 64
MAX_PAYLOAD_BYTES = 64 * 1024 * 1024


class BundleError(Exception):
    """A bundle refused; ``reason`` is BAD_SIGNATURE, UNKNOWN_KEY, WRONG_TENANT or MALFORMED."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


def _check_key_id(key_id: str) -> bytes:
    raw = key_id.encode("ascii", errors="replace") if isinstance(key_id, str) else b""
    if not 1 <= len(raw) <= MAX_KEY_ID_BYTES or not all(0x21 <= b <= 0x7E for b in raw):
        raise ValueError(f"key_id must be 1..{MAX_KEY_ID_BYTES} printable ASCII characters")
    return raw


def make_bundle(doc: Mapping[str, Any], *, tenant_id: str, version: int,
                signing_key: nacl.signing.SigningKey, key_id: str) -> bytes:
    """Sign a rule-set document (validated first: an invalid rule set is never bundled)."""
    parse_rule_set(doc)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError("version must be a positive integer")
    if not isinstance(tenant_id, str) or not tenant_id:
        raise ValueError("tenant_id must be a non-empty string")
    kid = _check_key_id(key_id)
    payload = canonical_json({"format": BUNDLE_FORMAT, "tenant_id": tenant_id, "version": version,
                              "rule_set": doc})
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ValueError("the rule set is too large for a bundle")
    head = MAGIC + bytes([len(kid)]) + kid + struct.pack(">I", len(payload)) + payload
    return head + signing_key.sign(head).signature


def open_bundle(data: bytes, *, trusted_keys: Mapping[str, nacl.signing.VerifyKey],
                tenant_id: str) -> tuple[RuleSet, int]:
    """Verify and parse a bundle: its rule set and version, or a ``BundleError``."""
    data = bytes(data)
    if len(data) < len(MAGIC) + 1 or data[:4] != MAGIC:
        raise BundleError("MALFORMED", "not a onecard policy bundle (OCP1)")
    kid_len = data[4]
    payload_at = 5 + kid_len + 4
    if not 1 <= kid_len <= MAX_KEY_ID_BYTES or len(data) < payload_at:
        raise BundleError("MALFORMED", "bad key id length")
    kid = data[5:5 + kid_len]
    if not all(0x21 <= b <= 0x7E for b in kid):
        raise BundleError("MALFORMED", "the key id is not printable ASCII")
    (payload_len,) = struct.unpack(">I", data[5 + kid_len:payload_at])
    if not 1 <= payload_len <= MAX_PAYLOAD_BYTES or len(data) != payload_at + payload_len + SIGNATURE_BYTES:
        raise BundleError("MALFORMED", "the lengths do not match the bundle's size")
    key = trusted_keys.get(kid.decode("ascii"))
    if key is None:
        raise BundleError("UNKNOWN_KEY", f"key {kid.decode('ascii')!r} is not trusted")
    signed_end = payload_at + payload_len
    try:
        key.verify(data[:signed_end], data[signed_end:])
    except nacl.exceptions.BadSignatureError:
        raise BundleError("BAD_SIGNATURE", "the signature does not verify") from None
    # Signed by a trusted key: what follows is the publisher's document, still checked in full.
    try:
        envelope = json.loads(data[payload_at:signed_end].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise BundleError("MALFORMED", "the payload is not JSON") from None
    if (not isinstance(envelope, dict) or envelope.get("format") != BUNDLE_FORMAT
            or set(envelope) != {"format", "tenant_id", "version", "rule_set"}):
        raise BundleError("MALFORMED", f"the payload is not a format {BUNDLE_FORMAT} bundle")
    if envelope["tenant_id"] != tenant_id:
        raise BundleError("WRONG_TENANT", "the bundle is another tenant's")
    version = envelope["version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BundleError("MALFORMED", "bad version")
    try:
        return parse_rule_set(envelope["rule_set"]), version
    except RuleSetError as exc:
        raise BundleError("MALFORMED", f"the rule set is invalid: {exc}") from None
