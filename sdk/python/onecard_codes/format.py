"""The OC1 binary layouts and their text form: strict, bounded, no signatures checked here.

Everything a device maker needs is in ``docs/code-format.md``; this module is its executable form.
Decoding refuses anything that is not exactly one of the two layouts, so a verifier never
touches a signature of a code it cannot parse.
"""
from __future__ import annotations

import hashlib
import struct
from typing import NamedTuple

from onecard_codes.errors import MalformedCode
from onecard_codes.result import ALL_PURPOSES, CodeKind, OfflineCaps, Purpose

TEXT_PREFIX = "OC1:"
FORMAT_VERSION = 1
KIND_HOLDER = 1
KIND_TOKEN = 2

KEY_ID_BYTES = 4
ID_BYTES = 16
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
MAX_U32 = 0xFFFFFFFF
MAX_U16 = 0xFFFF
MAX_U8 = 0xFF

# A stolen phone's credential dies within three days; a token batch within one.
MAX_CREDENTIAL_VALIDITY_S = 72 * 3600
MAX_TOKEN_BATCH_S = 24 * 3600

# Domain tags keep the three signed messages apart: a signature over one can never verify as
# another, even if the bytes after the tag happened to coincide.
CREDENTIAL_TAG = b"OC1:CRED"
PROOF_TAG = b"OC1:PROF"
TOKEN_TAG = b"OC1:TOKN"

# Credential body: key id, member id, holder public key, not-before, not-after, caps, purposes.
CREDENTIAL_BODY = struct.Struct(">4s16s32sIIIIBB")
CREDENTIAL_BYTES = CREDENTIAL_BODY.size + SIGNATURE_BYTES
# Proof: time, counter, purpose, then the holder signature.
PROOF_FIELDS = struct.Struct(">IIB")
PROOF_BYTES = PROOF_FIELDS.size + SIGNATURE_BYTES
HEADER = struct.Struct(">BB")
HOLDER_CODE_BYTES = HEADER.size + CREDENTIAL_BYTES + PROOF_BYTES
# Token: header, key id, credential id, member id, not-before, not-after, caps, purposes,
# slot start, slot length, sequence, then the issuer signature.
TOKEN_FIELDS = struct.Struct(">BB4s16s16sIIIIBBIHI")
TOKEN_CODE_BYTES = TOKEN_FIELDS.size + SIGNATURE_BYTES

# ---- Base45 (RFC 9285), strict -------------------------------------------------------------

BASE45_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ $%*+-./:"


def _b45_chars_for(byte_count: int) -> int:
    return 3 * (byte_count // 2) + 2 * (byte_count % 2)


# The holder code's header and credential take an even number of bytes, so their text is a fixed
# prefix of the code's text: the verifier finds a cached credential by that text without decoding.
HOLDER_HEAD_BYTES = HEADER.size + CREDENTIAL_BYTES
HOLDER_HEAD_CHARS = _b45_chars_for(HOLDER_HEAD_BYTES)
HOLDER_TEXT_CHARS = len(TEXT_PREFIX) + _b45_chars_for(HOLDER_CODE_BYTES)
TOKEN_TEXT_CHARS = len(TEXT_PREFIX) + _b45_chars_for(TOKEN_CODE_BYTES)
MAX_TEXT_CHARS = 320
assert HOLDER_HEAD_BYTES % 2 == 0
assert HOLDER_TEXT_CHARS <= MAX_TEXT_CHARS and TOKEN_TEXT_CHARS <= MAX_TEXT_CHARS


def b45encode(data: bytes) -> str:
    alphabet = BASE45_ALPHABET
    out = []
    for i in range(0, len(data) - 1, 2):
        n = (data[i] << 8) | data[i + 1]
        n, c = divmod(n, 45)
        e, d = divmod(n, 45)
        out.append(alphabet[c] + alphabet[d] + alphabet[e])
    if len(data) % 2:
        e, c = divmod(data[-1], 45)
        out.append(alphabet[c] + alphabet[e])
    return "".join(out)


# Strict decoding without a Python loop per group: the characters become digit values with one
# translate, each digit position of the groups becomes a big integer with one 32-bit lane per
# group, and one multiply-add computes every group at once. A per-group loop or a 65536-entry
# table costs several times more on the verifier's hot path.
_INVALID_DIGIT = 0xFF
_DIGITS = bytes(BASE45_ALPHABET.index(chr(b)) if chr(b) in BASE45_ALPHABET else _INVALID_DIGIT
                for b in range(256))
_LANE_BYTES = 4


def _lanes(digits: bytes, count: int) -> int:
    widened = bytearray(_LANE_BYTES * count)
    widened[_LANE_BYTES - 1::_LANE_BYTES] = digits
    return int.from_bytes(widened, "big")


def b45decode(text: str) -> bytes:
    """Decode strict Base45: only the 45 upper-case characters, every group in range.

    Raises ``MalformedCode``; Base45 is a bijection on valid strings, so each byte string has
    exactly one text form.
    """
    try:
        digits = text.encode("ascii").translate(_DIGITS)
    except (UnicodeEncodeError, AttributeError):
        raise MalformedCode("not Base45: not ASCII text") from None
    if _INVALID_DIGIT in digits:
        raise MalformedCode("not Base45: a character outside the alphabet")
    groups, remainder = divmod(len(digits), 3)
    if remainder == 1:
        raise MalformedCode("Base45 text length leaves one character over")
    data = b""
    if groups:
        full = digits[:3 * groups]
        values = (_lanes(full[0::3], groups) + 45 * _lanes(full[1::3], groups)
                  + 2025 * _lanes(full[2::3], groups)).to_bytes(_LANE_BYTES * groups, "big")
        # A group's value is below 45**3 < 2**17: its lane's top byte is always zero and the next
        # must be zero too, or the group is out of range (above 65535).
        if values[1::_LANE_BYTES].count(0) != groups:
            raise MalformedCode("not Base45: a group out of range")
        out = bytearray(2 * groups)
        out[0::2] = values[2::_LANE_BYTES]
        out[1::2] = values[3::_LANE_BYTES]
        data = bytes(out)
    if remainder:
        last = digits[-2] + 45 * digits[-1]
        if last > 0xFF:
            raise MalformedCode("not Base45: the final pair out of range")
        data += bytes((last,))
    return data


# ---- the two layouts -----------------------------------------------------------------------

_PURPOSE_BY_BYTE: dict[int, Purpose] = {int(p): p for p in (Purpose.PAY, Purpose.ACCESS, Purpose.RIDE,
                                                            Purpose.CHECK_IN)}


def purpose_from_byte(value: int) -> Purpose:
    """The single purpose a proof names; anything but exactly one known bit is malformed."""
    try:
        return _PURPOSE_BY_BYTE[value]
    except KeyError:
        raise MalformedCode(f"purpose byte {value:#04x} is not exactly one known purpose") from None


# Looked up rather than built: constructing an IntFlag costs a microsecond on the cold path.
_PURPOSES_BY_BYTE: dict[int, Purpose] = {value: Purpose(value) for value in range(1, int(ALL_PURPOSES) + 1)}


def purposes_from_byte(value: int) -> Purpose:
    try:
        return _PURPOSES_BY_BYTE[value]
    except KeyError:
        raise MalformedCode(f"allowed purposes {value:#04x} empty or with unknown bits") from None


class Credential(NamedTuple):
    """A holder credential as carried in a code: issuer-signed, tenant implied by the key."""

    key_id: bytes
    member_id: bytes
    holder_public_key: bytes
    not_before_s: int
    not_after_s: int
    caps: OfflineCaps
    purposes: Purpose
    issuer_signature: bytes
    raw: bytes  # the credential's 134 bytes exactly as signed and carried

    def signed_message(self, *, tenant_id: bytes) -> bytes:
        return credential_signed_message(tenant_id=tenant_id, body=self.raw[:CREDENTIAL_BODY.size])

    def credential_id(self, *, tenant_id: bytes) -> bytes:
        return credential_id_for(tenant_id=tenant_id, body=self.raw[:CREDENTIAL_BODY.size])

    def hash(self) -> bytes:
        return hashlib.sha256(self.raw).digest()


class HolderCode(NamedTuple):
    credential: Credential
    time_s: int
    counter: int
    purpose: Purpose
    holder_signature: bytes

    kind = CodeKind.HOLDER


class RotatingToken(NamedTuple):
    key_id: bytes
    credential_id: bytes
    member_id: bytes
    not_before_s: int
    not_after_s: int
    caps: OfflineCaps
    purposes: Purpose
    slot_start_s: int
    slot_length_s: int
    sequence: int
    issuer_signature: bytes
    raw: bytes

    kind = CodeKind.TOKEN

    @property
    def slot_end_s(self) -> int:
        return self.slot_start_s + self.slot_length_s

    def signed_message(self, *, tenant_id: bytes) -> bytes:
        return token_signed_message(tenant_id=tenant_id, fields=self.raw[:TOKEN_FIELDS.size])


def credential_signed_message(*, tenant_id: bytes, body: bytes) -> bytes:
    """What the issuer signs: tag, the tenant (implied by the key, not carried), the body."""
    return CREDENTIAL_TAG + tenant_id + body


def credential_id_for(*, tenant_id: bytes, body: bytes) -> bytes:
    """A holder credential's id: the first 16 bytes of SHA-256 of its signed message.

    Derived rather than carried because 16 more bytes would push a holder code past 320 characters.
    """
    return hashlib.sha256(credential_signed_message(tenant_id=tenant_id, body=body)).digest()[:ID_BYTES]


def proof_signed_message(*, credential_hash: bytes, time_s: int, counter: int, purpose: int) -> bytes:
    """What the holder signs: tag, SHA-256 of the credential's 134 bytes, time, counter, purpose."""
    return PROOF_TAG + credential_hash + PROOF_FIELDS.pack(time_s, counter, purpose)


def token_signed_message(*, tenant_id: bytes, fields: bytes) -> bytes:
    return TOKEN_TAG + tenant_id + fields[HEADER.size:]


def _check_window(not_before_s: int, not_after_s: int, max_s: int, what: str) -> None:
    if not_after_s <= not_before_s:
        raise MalformedCode(f"{what}: not-after is not after not-before")
    if not_after_s - not_before_s > max_s:
        raise MalformedCode(f"{what}: validity longer than {max_s} s")


def parse_credential(data: bytes) -> Credential:
    """The 134 credential bytes, with every field range checked. Raises ``MalformedCode``."""
    if len(data) != CREDENTIAL_BYTES:
        raise MalformedCode(f"a credential is {CREDENTIAL_BYTES} bytes, got {len(data)}")
    (key_id, member_id, holder_public_key, not_before_s, not_after_s, per_transaction_fen, per_day_fen,
     count_per_day, purposes) = CREDENTIAL_BODY.unpack_from(data)
    _check_window(not_before_s, not_after_s, MAX_CREDENTIAL_VALIDITY_S, "credential")
    return Credential(
        key_id=key_id, member_id=member_id, holder_public_key=holder_public_key, not_before_s=not_before_s,
        not_after_s=not_after_s, caps=OfflineCaps(per_transaction_fen, per_day_fen, count_per_day),
        purposes=purposes_from_byte(purposes), issuer_signature=data[CREDENTIAL_BODY.size:], raw=bytes(data),
    )


def parse_proof(data: bytes) -> tuple[int, int, Purpose, bytes]:
    if len(data) != PROOF_BYTES:
        raise MalformedCode(f"a proof is {PROOF_BYTES} bytes, got {len(data)}")
    time_s, counter, purpose = PROOF_FIELDS.unpack_from(data)
    return time_s, counter, purpose_from_byte(purpose), data[PROOF_FIELDS.size:]


def decode_binary(data: bytes) -> HolderCode | RotatingToken:
    """Parse the binary form of either kind. Raises ``MalformedCode``."""
    if len(data) < HEADER.size:
        raise MalformedCode("shorter than the two header bytes")
    version, kind = HEADER.unpack_from(data)
    if version != FORMAT_VERSION:
        raise MalformedCode(f"format version {version} is not {FORMAT_VERSION}")
    if kind == KIND_HOLDER:
        if len(data) != HOLDER_CODE_BYTES:
            raise MalformedCode(f"a holder code is {HOLDER_CODE_BYTES} bytes, got {len(data)}")
        credential = parse_credential(data[HEADER.size:HOLDER_HEAD_BYTES])
        time_s, counter, purpose, signature = parse_proof(data[HOLDER_HEAD_BYTES:])
        return HolderCode(credential=credential, time_s=time_s, counter=counter, purpose=purpose,
                          holder_signature=signature)
    if kind == KIND_TOKEN:
        if len(data) != TOKEN_CODE_BYTES:
            raise MalformedCode(f"a rotating token is {TOKEN_CODE_BYTES} bytes, got {len(data)}")
        (_, _, key_id, credential_id, member_id, not_before_s, not_after_s, per_transaction_fen, per_day_fen,
         count_per_day, purposes, slot_start_s, slot_length_s, sequence) = TOKEN_FIELDS.unpack_from(data)
        _check_window(not_before_s, not_after_s, MAX_TOKEN_BATCH_S, "token batch")
        if slot_length_s == 0:
            raise MalformedCode("token slot length is zero")
        if slot_start_s < not_before_s or slot_start_s + slot_length_s > not_after_s:
            raise MalformedCode("token slot outside its batch's validity")
        return RotatingToken(
            key_id=key_id, credential_id=credential_id, member_id=member_id, not_before_s=not_before_s,
            not_after_s=not_after_s, caps=OfflineCaps(per_transaction_fen, per_day_fen, count_per_day),
            purposes=purposes_from_byte(purposes), slot_start_s=slot_start_s, slot_length_s=slot_length_s,
            sequence=sequence, issuer_signature=data[TOKEN_FIELDS.size:], raw=bytes(data),
        )
    raise MalformedCode(f"unknown code kind {kind}")


def text_to_binary(text: str | bytes) -> bytes:
    """Strip ``OC1:`` and decode Base45. Raises ``MalformedCode`` (also for ``OC2:`` and later)."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        try:
            text = bytes(text).decode("ascii")
        except UnicodeDecodeError:
            raise MalformedCode("not ASCII") from None
    if not isinstance(text, str):
        raise MalformedCode(f"a code is text, got {type(text).__name__}")
    if len(text) > MAX_TEXT_CHARS:
        raise MalformedCode(f"longer than {MAX_TEXT_CHARS} characters")
    if not text.startswith(TEXT_PREFIX):
        raise MalformedCode(f"does not start with {TEXT_PREFIX!r}")
    return b45decode(text[len(TEXT_PREFIX):])


def decode_code(text: str | bytes) -> HolderCode | RotatingToken:
    """Parse a code's text form without checking any signature. Raises ``MalformedCode``.

    For inspection and tools; to accept a code, use ``Verifier.verify``.
    """
    return decode_binary(text_to_binary(text))


def binary_to_text(data: bytes) -> str:
    return TEXT_PREFIX + b45encode(data)
