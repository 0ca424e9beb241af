"""Keys: issuer signing keys, key ids, the trust list a verifier holds, and revocations."""
from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import nacl.bindings
import nacl.signing

from onecard_codes.format import ID_BYTES, KEY_ID_BYTES, PUBLIC_KEY_BYTES

SEED_BYTES = 32
# Bounds on what a verifier accepts from a trust or revocation list, so a corrupt download cannot
# exhaust a device's memory.
MAX_TRUSTED_KEYS = 10_000
MAX_REVOKED_CREDENTIALS = 1_000_000
MAX_REVOKED_MEMBERS = 1_000_000


def key_id_for(public_key: bytes) -> bytes:
    """The key id carried in codes: the first 4 bytes of SHA-256 of the 32-byte public key.

    Ids may collide; a verifier tries every trusted key with the id.
    """
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise ValueError(f"an Ed25519 public key is {PUBLIC_KEY_BYTES} bytes, got {len(public_key)}")
    return hashlib.sha256(public_key).digest()[:KEY_ID_BYTES]


def is_valid_public_key(public_key: bytes) -> bool:
    """Whether ``public_key`` is an Ed25519 key a verifier may verify with (format doc §4.4).

    It must be the canonical encoding of a point of prime order L: not one of the small-order
    points (whose "signatures" anyone can make), not a non-canonical encoding (y ≥ p, or x = 0
    with the sign bit set), and with no small-order component. libsodium's verify already refuses
    the first two but accepts a key with a small-order component, which a cofactored verifier
    would judge differently; refusing such keys leaves every verifier the same answer.
    """
    try:
        public_key = bytes(public_key)
    except TypeError:
        return False
    return len(public_key) == PUBLIC_KEY_BYTES and nacl.bindings.crypto_core_ed25519_is_valid_point(public_key)


def _as_uuid(value: uuid.UUID | str | bytes, what: str) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, bytes) and len(value) == ID_BYTES:
        return uuid.UUID(bytes=value)
    if isinstance(value, str):
        return uuid.UUID(value)
    raise ValueError(f"{what} must be a UUID, got {value!r}")


@dataclass(frozen=True)
class TrustedKey:
    """An issuer public key a verifier accepts, and the tenant it signs for.

    Any 32 bytes are accepted as an entry (so a list is taken as published), but an entry whose
    key is not ``is_valid_public_key`` (``usable`` False) verifies no signature: a code naming its
    key id is refused as a bad signature, never accepted.
    """

    tenant_id: uuid.UUID
    public_key: bytes
    usable: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tenant_id", _as_uuid(self.tenant_id, "tenant_id"))
        key_id_for(self.public_key)
        object.__setattr__(self, "usable", is_valid_public_key(self.public_key))

    @property
    def key_id(self) -> bytes:
        return key_id_for(self.public_key)

    def to_json(self) -> dict[str, str]:
        return {"tenant_id": str(self.tenant_id), "public_key": self.public_key.hex(), "key_id": self.key_id.hex()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TrustedKey:
        key = cls(tenant_id=uuid.UUID(data["tenant_id"]), public_key=bytes.fromhex(data["public_key"]))
        if "key_id" in data and bytes.fromhex(data["key_id"]) != key.key_id:
            raise ValueError(f"key_id {data['key_id']} does not match its public key")
        return key


@dataclass(frozen=True)
class TrustList:
    """The issuer keys a verifier accepts, as fetched at ``fetched_at_s`` (unix seconds).

    Several keys may share a key id (and several tenants may share one list); ``candidates``
    answers all of them.
    """

    keys: tuple[TrustedKey, ...]
    fetched_at_s: int
    version: int = 0
    _by_key_id: dict[bytes, tuple[TrustedKey, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        keys = tuple(self.keys)
        if len(keys) > MAX_TRUSTED_KEYS:
            raise ValueError(f"a trust list holds at most {MAX_TRUSTED_KEYS} keys, got {len(keys)}")
        by_key_id: dict[bytes, tuple[TrustedKey, ...]] = {}
        for key in keys:
            if key not in by_key_id.get(key.key_id, ()):
                by_key_id[key.key_id] = (*by_key_id.get(key.key_id, ()), key)
        object.__setattr__(self, "keys", keys)
        object.__setattr__(self, "_by_key_id", by_key_id)

    def candidates(self, key_id: bytes) -> tuple[TrustedKey, ...]:
        return self._by_key_id.get(key_id, ())

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "fetched_at_s": self.fetched_at_s,
                "keys": [key.to_json() for key in self.keys]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TrustList:
        return cls(keys=tuple(TrustedKey.from_json(k) for k in data["keys"]), fetched_at_s=int(data["fetched_at_s"]),
                   version=int(data.get("version", 0)))


class Revocations:
    """Revoked credential ids, and revoked members with the time of revocation.

    A member revoked at ``revoked_at_s`` loses every credential and token batch whose not-before
    is at or before that time; credentials issued later (after an unfreeze) are not affected.
    Mutable: a device applies revocation deltas as they arrive, and the verifier reads it on
    every scan.
    """

    def __init__(self, *, credential_ids: Iterable[uuid.UUID] = (),
                 members: Mapping[uuid.UUID, int] | None = None) -> None:
        self._credentials: set[bytes] = set()
        self._members: dict[bytes, int] = {}
        for credential_id in credential_ids:
            self.revoke_credential(credential_id=credential_id)
        for member_id, revoked_at_s in (members or {}).items():
            self.revoke_member(member_id=member_id, revoked_at_s=revoked_at_s)

    def revoke_credential(self, *, credential_id: uuid.UUID) -> None:
        if len(self._credentials) >= MAX_REVOKED_CREDENTIALS:
            raise ValueError(f"more than {MAX_REVOKED_CREDENTIALS} revoked credentials")
        self._credentials.add(_as_uuid(credential_id, "credential_id").bytes)

    def revoke_member(self, *, member_id: uuid.UUID, revoked_at_s: int) -> None:
        """Revoke the member's credentials with not-before ≤ ``revoked_at_s``; a later call
        with a later time extends it, an earlier time never shortens it."""
        if len(self._members) >= MAX_REVOKED_MEMBERS:
            raise ValueError(f"more than {MAX_REVOKED_MEMBERS} revoked members")
        key = _as_uuid(member_id, "member_id").bytes
        self._members[key] = max(int(revoked_at_s), self._members.get(key, -1))

    def is_revoked(self, *, credential_id: bytes, member_id: bytes, not_before_s: int) -> bool:
        if credential_id in self._credentials:
            return True
        revoked_at_s = self._members.get(member_id)
        return revoked_at_s is not None and not_before_s <= revoked_at_s

    def to_json(self) -> dict[str, Any]:
        return {
            "credential_ids": sorted(str(uuid.UUID(bytes=c)) for c in self._credentials),
            "members": [{"member_id": str(uuid.UUID(bytes=m)), "revoked_at_s": t}
                        for m, t in sorted(self._members.items())],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Revocations:
        return cls(credential_ids=[uuid.UUID(c) for c in data.get("credential_ids", ())],
                   members={uuid.UUID(m["member_id"]): int(m["revoked_at_s"]) for m in data.get("members", ())})


@dataclass(frozen=True)
class IssuerKey:
    """A tenant's Ed25519 issuer key (private: keep it in codegen, encrypted at rest)."""

    tenant_id: uuid.UUID
    signing_key: nacl.signing.SigningKey = field(repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tenant_id", _as_uuid(self.tenant_id, "tenant_id"))

    @classmethod
    def generate(cls, *, tenant_id: uuid.UUID) -> IssuerKey:
        return cls(tenant_id=tenant_id, signing_key=nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, *, tenant_id: uuid.UUID, seed: bytes) -> IssuerKey:
        """From the 32-byte seed (what codegen stores, encrypted)."""
        if len(seed) != SEED_BYTES:
            raise ValueError(f"an Ed25519 seed is {SEED_BYTES} bytes, got {len(seed)}")
        return cls(tenant_id=tenant_id, signing_key=nacl.signing.SigningKey(seed))

    @property
    def seed(self) -> bytes:
        return bytes(self.signing_key)

    @property
    def public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    @property
    def key_id(self) -> bytes:
        return key_id_for(self.public_key)

    def trusted(self) -> TrustedKey:
        """The entry verifiers put in their trust list for this key."""
        return TrustedKey(tenant_id=self.tenant_id, public_key=self.public_key)

    def sign(self, message: bytes) -> bytes:
        return self.signing_key.sign(message).signature
