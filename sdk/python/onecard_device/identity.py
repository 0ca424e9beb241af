"""The device's own identity: its Ed25519 key, the ids it enrolled with, and what it signs.

The private key never leaves the device. It is kept in ``identity.json`` in the device's data
folder (mode 0600, written atomically), beside the tenant and device ids it was enrolled under.

Signed messages (docs/devicehub.md; ids are canonical lowercase UUID strings, UTF-8):

- the hub's challenge: ``b"onecard-device-challenge-v1\\x00" + tenant_id + b"\\x00" + device_id + b"\\x00" + nonce``
- an offline record: ``b"onecard-device-record-v1\\x00" + tenant_id + b"\\x00" + device_id + b"\\x00" + body``,
  body = the OfflineRecord with ``signature`` cleared, ``SerializeToString(deterministic=True)``.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import nacl.exceptions
import nacl.signing

from onecard.devicehub.v1 import devicehub_pb2 as pb

CHALLENGE_CONTEXT = b"onecard-device-challenge-v1\x00"
RECORD_CONTEXT = b"onecard-device-record-v1\x00"
IDENTITY_FILE = "identity.json"
SEED_BYTES = 32


class IdentityError(Exception):
    """No usable identity: not enrolled yet, or the stored file is damaged."""


def canonical_id(value: str) -> str:
    """The canonical lowercase form of a UUID string (what is signed)."""
    return str(uuid.UUID(str(value)))


def challenge_message(*, tenant_id: str, device_id: str, nonce: bytes) -> bytes:
    return (CHALLENGE_CONTEXT + canonical_id(tenant_id).encode() + b"\x00" + canonical_id(device_id).encode()
            + b"\x00" + bytes(nonce))


def record_body(record: pb.OfflineRecord) -> bytes:
    """The record's signed body: itself with the signature cleared, serialised deterministically."""
    unsigned = pb.OfflineRecord()
    unsigned.CopyFrom(record)
    unsigned.ClearField("signature")
    return unsigned.SerializeToString(deterministic=True)


def record_message(*, tenant_id: str, device_id: str, record: pb.OfflineRecord) -> bytes:
    return (RECORD_CONTEXT + canonical_id(tenant_id).encode() + b"\x00" + canonical_id(device_id).encode()
            + b"\x00" + record_body(record))


def verify_record(*, public_key: bytes, tenant_id: str, device_id: str, record: pb.OfflineRecord) -> bool:
    """True when ``record.signature`` is the device key's signature over the record."""
    try:
        nacl.signing.VerifyKey(bytes(public_key)).verify(
            record_message(tenant_id=tenant_id, device_id=device_id, record=record), bytes(record.signature))
        return True
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError):
        return False


def key_fingerprint(public_key: bytes) -> str:
    """Hex of the first 8 bytes of SHA-256 of the public key (what the hub shows)."""
    return hashlib.sha256(public_key).digest()[:8].hex()


@dataclass
class DeviceIdentity:
    """The device key, and once enrolled, the tenant and device it belongs to."""

    signing_key: nacl.signing.SigningKey = field(repr=False)
    tenant_id: str = ""
    device_id: str = ""

    @classmethod
    def generate(cls) -> DeviceIdentity:
        return cls(signing_key=nacl.signing.SigningKey.generate())

    @property
    def public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    @property
    def fingerprint(self) -> str:
        return key_fingerprint(self.public_key)

    @property
    def enrolled(self) -> bool:
        return bool(self.tenant_id and self.device_id)

    def _require_enrolled(self) -> None:
        if not self.enrolled:
            raise IdentityError("the device is not enrolled")

    def sign_challenge(self, nonce: bytes) -> bytes:
        self._require_enrolled()
        return self.signing_key.sign(
            challenge_message(tenant_id=self.tenant_id, device_id=self.device_id, nonce=nonce)).signature

    def sign_record(self, record: pb.OfflineRecord) -> pb.OfflineRecord:
        """Set ``record.signature`` (in place) and answer the record."""
        self._require_enrolled()
        record.signature = self.signing_key.sign(
            record_message(tenant_id=self.tenant_id, device_id=self.device_id, record=record)).signature
        return record

    def to_json(self) -> dict[str, str]:
        return {"format": "1", "tenant_id": self.tenant_id, "device_id": self.device_id,
                "seed": bytes(self.signing_key).hex()}

    @classmethod
    def from_json(cls, data: dict[str, str]) -> DeviceIdentity:
        try:
            seed = bytes.fromhex(data["seed"])
            if len(seed) != SEED_BYTES:
                raise ValueError("bad seed length")
            identity = cls(signing_key=nacl.signing.SigningKey(seed), tenant_id=data.get("tenant_id", ""),
                           device_id=data.get("device_id", ""))
            if identity.tenant_id:
                identity.tenant_id = canonical_id(identity.tenant_id)
            if identity.device_id:
                identity.device_id = canonical_id(identity.device_id)
            return identity
        except (KeyError, ValueError, TypeError) as exc:
            raise IdentityError(f"the stored device identity is damaged: {type(exc).__name__}") from None

    def save(self, data_dir: Path) -> Path:
        """Write ``identity.json`` atomically, readable by the owner only."""
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        path = data_dir / IDENTITY_FILE
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(self.to_json(), out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, data_dir: Path) -> DeviceIdentity | None:
        path = Path(data_dir) / IDENTITY_FILE
        if not path.exists():
            return None
        try:
            return cls.from_json(json.loads(path.read_text()))
        except ValueError:
            raise IdentityError("the stored device identity is not JSON") from None
