"""Test vectors for the OC1 format: ``python -m onecard_codes.vectors > docs/code-vectors.json``.

Deterministic: keys come from fixed seeds, times are fixed and Ed25519 signatures are
deterministic, so the output is the same on every run and machine. Each vector carries everything
a verifier needs; ``run_vector`` is how our own tests (and a device maker's port) replay one.
"""
from __future__ import annotations

import hashlib
import json
import sys
import uuid
from collections.abc import Callable
from typing import Any

import nacl.bindings
import nacl.signing

from onecard_codes.format import (
    CREDENTIAL_BODY,
    FORMAT_VERSION,
    HEADER,
    KIND_HOLDER,
    KIND_TOKEN,
    PROOF_FIELDS,
    TOKEN_FIELDS,
    binary_to_text,
    credential_signed_message,
    decode_code,
    proof_signed_message,
    text_to_binary,
    token_signed_message,
)
from onecard_codes.issue import issue_credential, issue_token_batch, make_holder_code
from onecard_codes.keys import IssuerKey, Revocations, TrustList
from onecard_codes.result import CodeKind, OfflineCaps, Purpose, Rejected, Verified
from onecard_codes.verify import DEFAULT_CLOCK_WINDOW_S, ReplayCache, Verifier

TENANT_A = uuid.UUID("0a0a0a0a-0000-4000-8000-00000000000a")
TENANT_B = uuid.UUID("0b0b0b0b-0000-4000-8000-00000000000b")
MEMBER = uuid.UUID("5e5e5e5e-1111-4111-8111-000000000001")
TOKEN_BATCH_ID = uuid.UUID("7b7b7b7b-2222-4222-8222-000000000001")
ISSUER_A_SEED = hashlib.sha256(b"onecard test vector issuer A").digest()
ISSUER_B_SEED = hashlib.sha256(b"onecard test vector issuer B").digest()
HOLDER_SEED = hashlib.sha256(b"onecard test vector holder").digest()
OTHER_HOLDER_SEED = hashlib.sha256(b"onecard test vector other holder").digest()
# 2026-01-01T00:00:00Z; the scans happen an hour later.
NOT_BEFORE_S = 1_767_225_600
NOW_S = NOT_BEFORE_S + 3600
CAPS = OfflineCaps(per_transaction_fen=3000, per_day_fen=20000, count_per_day=20)
MAX_TRUST_LIST_AGE_S = 7 * 24 * 3600

# Encodings a strict verifier refuses as a public key or as a signature's R (format doc §4.4).
ED25519_P = 2**255 - 19
IDENTITY_POINT = bytes([1]) + bytes(31)  # the neutral element: order 1
IDENTITY_NONCANONICAL = (ED25519_P + 1).to_bytes(32, "little")  # y = p + 1, which reduces to 1
IDENTITY_NEGATIVE_ZERO = bytes([1]) + bytes(30) + bytes([0x80])  # y = 1 with the sign bit of x = 0 set
ORDER_8_POINT = bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a")


def verified_to_json(result: Verified) -> dict[str, Any]:
    return {
        "kind": result.kind.value, "tenant_id": str(result.tenant_id), "member_id": str(result.member_id),
        "credential_id": str(result.credential_id), "purpose": result.purpose.name,
        "caps": result.caps._asdict(), "time_s": result.time_s, "counter": result.counter,
        "not_after_s": result.not_after_s, "key_id": result.key_id.hex(),
    }


def decoded_to_json(code_text: str) -> dict[str, Any]:
    """The fields of a well-formed code, as the format doc names them."""
    code = decode_code(code_text)
    if code.kind is CodeKind.HOLDER:
        credential = code.credential
        return {
            "kind": "holder", "key_id": credential.key_id.hex(), "member_id": str(uuid.UUID(bytes=credential.member_id)),
            "holder_public_key": credential.holder_public_key.hex(), "not_before_s": credential.not_before_s,
            "not_after_s": credential.not_after_s, "caps": credential.caps._asdict(),
            "purposes": int(credential.purposes), "issuer_signature": credential.issuer_signature.hex(),
            "credential_bytes": credential.raw.hex(), "credential_sha256": credential.hash().hex(),
            "time_s": code.time_s, "counter": code.counter, "purpose": int(code.purpose),
            "holder_signature": code.holder_signature.hex(),
        }
    return {
        "kind": "token", "key_id": code.key_id.hex(), "credential_id": str(uuid.UUID(bytes=code.credential_id)),
        "member_id": str(uuid.UUID(bytes=code.member_id)), "not_before_s": code.not_before_s,
        "not_after_s": code.not_after_s, "caps": code.caps._asdict(), "purposes": int(code.purposes),
        "slot_start_s": code.slot_start_s, "slot_length_s": code.slot_length_s, "sequence": code.sequence,
        "issuer_signature": code.issuer_signature.hex(),
    }


def run_vector(vector: dict[str, Any]) -> Verified | Rejected:
    """Replay one vector: build the verifier from its inputs, run its prior scans, verify its code."""
    setup = vector["verifier"]
    verifier = Verifier(
        trust_list=TrustList.from_json(setup["trust_list"]), revocations=Revocations.from_json(setup["revocations"]),
        replay_cache=ReplayCache(), clock_window_s=tuple(setup["clock_window_s"]),
        max_trust_list_age_s=setup["max_trust_list_age_s"],
    )
    tenant_id = uuid.UUID(vector["expected_tenant_id"])
    purpose = Purpose[vector["purpose"]]
    for scan in vector.get("prior_scans", ()):
        prior = verifier.verify(scan["code"], now_s=scan["now_s"], expected_tenant_id=tenant_id, purpose=purpose)
        if not prior.ok:
            raise AssertionError(f"{vector['name']}: prior scan refused: {prior}")
    return verifier.verify(vector["code"], now_s=vector["now_s"], expected_tenant_id=tenant_id, purpose=purpose)


def raw_holder_code(*, credential_body: bytes, time_s: int, counter: int, purpose_byte: int,
                    issuer: IssuerKey | None = None, holder: nacl.signing.SigningKey | None = None,
                    tenant_id: uuid.UUID | None = None, issuer_sign: Signer | None = None,
                    holder_sign: Signer | None = None, version: int = FORMAT_VERSION, kind: int = KIND_HOLDER) -> str:
    """A holder code signed as given, with none of ``make_holder_code``'s checks: for vectors and
    tests of codes the issuing API rightly refuses to make (a forged proof, a 73 h credential).

    ``issuer_sign`` and ``holder_sign`` replace the ordinary signatures by ``issuer`` and
    ``holder``; the tenant in the credential message is ``tenant_id``, else the issuer's.
    """
    tenant = tenant_id if tenant_id is not None else issuer.tenant_id
    issuer_sign = issuer_sign or signer(issuer)
    holder_sign = holder_sign or signer(holder)
    credential = credential_body + issuer_sign(credential_signed_message(tenant_id=tenant.bytes, body=credential_body))
    message = proof_signed_message(credential_hash=hashlib.sha256(credential).digest(), time_s=time_s,
                                   counter=counter, purpose=purpose_byte)
    proof = PROOF_FIELDS.pack(time_s, counter, purpose_byte) + holder_sign(message)
    return binary_to_text(HEADER.pack(version, kind) + credential + proof)


def raw_token(*, key_id: bytes, tenant_id: uuid.UUID, sign: Signer, credential_id: uuid.UUID, member_id: uuid.UUID,
              not_before_s: int, not_after_s: int, caps: OfflineCaps, purposes_byte: int, slot_start_s: int,
              slot_length_s: int, sequence: int, version: int = FORMAT_VERSION, kind: int = KIND_TOKEN) -> str:
    """A rotating token signed as given, with none of ``issue_token_batch``'s checks."""
    fields = TOKEN_FIELDS.pack(version, kind, key_id, credential_id.bytes, member_id.bytes, not_before_s, not_after_s,
                               caps.per_transaction_fen, caps.per_day_fen, caps.count_per_day, purposes_byte,
                               slot_start_s, slot_length_s, sequence)
    return binary_to_text(fields + sign(token_signed_message(tenant_id=tenant_id.bytes, fields=fields)))


# ---- signatures a strict verifier refuses (format doc §4.4) -------------------------------------
# Each is a signature a lax verifier accepts: it satisfies the verification equation of some
# reading of RFC 8032, so only the strict rules tell it apart. Built from the signing scalar
# (made deterministic like the keys), never from libsodium's signing, which makes none of them.

ED25519_L = 2**252 + 27742317777372353535851937790883648493
Signer = Callable[[bytes], bytes]


def _secret_scalar(seed: bytes) -> int:
    digest = hashlib.sha512(seed).digest()
    return (int.from_bytes(digest[:32], "little") & ((1 << 254) - 8)) | (1 << 254)


def _challenge(r_bytes: bytes, public_key: bytes, message: bytes) -> int:
    return int.from_bytes(hashlib.sha512(r_bytes + public_key + message).digest(), "little") % ED25519_L


def _nonce(seed: bytes, message: bytes, attempt: int) -> int:
    return int.from_bytes(hashlib.sha512(b"onecard vector nonce" + seed + attempt.to_bytes(4, "big")
                                         + message).digest(), "little") % ED25519_L


def _base_times(scalar: int) -> bytes:
    return nacl.bindings.crypto_scalarmult_ed25519_base_noclamp((scalar % ED25519_L).to_bytes(32, "little"))


def _signature(r_bytes: bytes, s: int) -> bytes:
    return r_bytes + s.to_bytes(32, "little")


def signer(key: nacl.signing.SigningKey | IssuerKey) -> Signer:
    """The ordinary signature."""
    signing_key = key.signing_key if isinstance(key, IssuerKey) else key
    return lambda message: signing_key.sign(message).signature


def s_plus_l(sign: Signer) -> Signer:
    """The same signature with S + L for S: the same value mod L, a non-canonical encoding."""
    def sign_non_canonical(message: bytes) -> bytes:
        signature = sign(message)
        return _signature(signature[:32], int.from_bytes(signature[32:], "little") + ED25519_L)
    return sign_non_canonical


def small_order_r(*, seed: bytes, r_bytes: bytes) -> Signer:
    """R an encoding of the identity and S = k·a: [S]B = R + [k]A holds, by the point R decodes to."""
    scalar = _secret_scalar(seed)
    public_key = bytes(nacl.signing.SigningKey(seed).verify_key)
    return lambda message: _signature(r_bytes, _challenge(r_bytes, public_key, message) * scalar % ED25519_L)


def mixed_order_r(*, seed: bytes) -> Signer:
    """R = [r]B + T (T of order 8) and S = r + k·a: only a cofactored check ([8]…) accepts it."""
    scalar = _secret_scalar(seed)
    public_key = bytes(nacl.signing.SigningKey(seed).verify_key)

    def sign(message: bytes) -> bytes:
        nonce = _nonce(seed, message, 0)
        r_bytes = nacl.bindings.crypto_core_ed25519_add(_base_times(nonce), ORDER_8_POINT)
        return _signature(r_bytes, (nonce + _challenge(r_bytes, public_key, message) * scalar) % ED25519_L)
    return sign


def forged_for_small_order_key(public_key: bytes, *, order: int) -> Signer:
    """A "signature" with no private key: R = [s]B, S = s, for a key A of order ``order`` (1 or 8),
    choosing s until k is a multiple of the order, so [k]A is the identity and [S]B = R + [k]A."""
    def forge(message: bytes) -> bytes:
        for attempt in range(1, 1000):
            s = _nonce(public_key, message, attempt)
            r_bytes = _base_times(s)
            if _challenge(r_bytes, public_key, message) % order == 0:
                return _signature(r_bytes, s)
        raise AssertionError("no forgery found")  # 1 in 8 succeeds; 1000 attempts never all fail
    return forge


def mixed_order_key(seed: bytes) -> bytes:
    """The public key [a]B + T, T of order 8: the same signing scalar, a key with a torsion part."""
    return nacl.bindings.crypto_core_ed25519_add(bytes(nacl.signing.SigningKey(seed).verify_key), ORDER_8_POINT)


def signed_by_mixed_order_key(seed: bytes) -> Signer:
    """Signatures under ``mixed_order_key(seed)`` that libsodium accepts: R = [r]B, S = r + k·a,
    r chosen until 8 divides k, so [S]B − [k](aB + T) = R. A strict verifier refuses the key."""
    scalar = _secret_scalar(seed)
    public_key = mixed_order_key(seed)

    def sign(message: bytes) -> bytes:
        for attempt in range(1000):
            nonce = _nonce(seed, message, attempt)
            r_bytes = _base_times(nonce)
            challenge = _challenge(r_bytes, public_key, message)
            if challenge % 8 == 0:
                return _signature(r_bytes, (nonce + challenge * scalar) % ED25519_L)
        raise AssertionError("no signature found")
    return sign


class _Builder:
    """Fixed keys and a few raw constructions the issuing API rightly refuses to make."""

    def __init__(self) -> None:
        self.issuer_a = IssuerKey.from_seed(tenant_id=TENANT_A, seed=ISSUER_A_SEED)
        self.issuer_b = IssuerKey.from_seed(tenant_id=TENANT_B, seed=ISSUER_B_SEED)
        self.holder = nacl.signing.SigningKey(HOLDER_SEED)
        self.other_holder = nacl.signing.SigningKey(OTHER_HOLDER_SEED)
        self.credential = self.issue(not_before_s=NOT_BEFORE_S, not_after_s=NOT_BEFORE_S + 72 * 3600)
        self.batch = issue_token_batch(
            issuer_key=self.issuer_a, member_id=MEMBER, not_before_s=NOT_BEFORE_S,
            not_after_s=NOT_BEFORE_S + 24 * 3600, caps=CAPS, purposes=Purpose.PAY | Purpose.RIDE,
            slot_length_s=60, credential_id=TOKEN_BATCH_ID,
        )

    def issue(self, *, not_before_s: int, not_after_s: int, issuer: IssuerKey | None = None,
              purposes: Purpose = Purpose.PAY | Purpose.ACCESS):
        return issue_credential(issuer_key=issuer or self.issuer_a, member_id=MEMBER,
                                holder_public_key=bytes(self.holder.verify_key), not_before_s=not_before_s,
                                not_after_s=not_after_s, caps=CAPS, purposes=purposes)

    def code(self, *, credential=None, time_s: int = NOW_S - 5, counter: int = 7,
             purpose: Purpose = Purpose.PAY) -> str:
        credential = credential or self.credential
        return make_holder_code(credential_bytes=credential.credential_bytes, holder_signing_key=self.holder,
                                now_s=time_s, counter=counter, purpose=purpose)

    def raw_code(self, **fields: Any) -> str:
        return raw_holder_code(**fields)

    def body(self, *, not_before_s: int, not_after_s: int, purposes: int) -> bytes:
        return CREDENTIAL_BODY.pack(self.issuer_a.key_id, MEMBER.bytes, bytes(self.holder.verify_key), not_before_s,
                                    not_after_s, CAPS.per_transaction_fen, CAPS.per_day_fen, CAPS.count_per_day,
                                    purposes)

    def token_at(self, now_s: int) -> str:
        token = self.batch.token_at(now_s=now_s)
        assert token is not None
        return token.text


def _flip_bit(code_text: str, *, byte_index: int, bit: int) -> str:
    data = bytearray(text_to_binary(code_text))
    data[byte_index] ^= 1 << bit
    return binary_to_text(bytes(data))


def build_vectors() -> dict[str, Any]:
    b = _Builder()
    trust_a = TrustList(keys=(b.issuer_a.trusted(),), fetched_at_s=NOW_S - 600, version=3)
    trust_ab = TrustList(keys=(b.issuer_a.trusted(), b.issuer_b.trusted()), fetched_at_s=NOW_S - 600, version=3)
    no_revocations = Revocations()
    valid = b.code()
    token_now = b.token_at(NOW_S)
    credential_offset = HEADER.size

    def vector(name: str, description: str, code: str, *, expected_reason: str | None = None,
               now_s: int = NOW_S, trust: TrustList = trust_a, revocations: Revocations = no_revocations,
               purpose: Purpose = Purpose.PAY, tenant: uuid.UUID = TENANT_A,
               prior_scans: tuple[tuple[str, int], ...] = ()) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "name": name, "description": description, "code": code,
            "verifier": {"trust_list": trust.to_json(), "max_trust_list_age_s": MAX_TRUST_LIST_AGE_S,
                         "revocations": revocations.to_json(), "clock_window_s": list(DEFAULT_CLOCK_WINDOW_S)},
            "now_s": now_s, "expected_tenant_id": str(tenant), "purpose": purpose.name,
            "prior_scans": [{"code": c, "now_s": t} for c, t in prior_scans],
        }
        try:
            entry["binary_hex"] = text_to_binary(code).hex()
        except ValueError:
            entry["binary_hex"] = None
        entry["expected"] = {"result": "REJECTED", "reason": expected_reason}
        result = run_vector(entry)
        if expected_reason is None:
            if not result.ok:
                raise AssertionError(f"{name}: valid vector refused: {result}")
            entry["decoded"] = decoded_to_json(code)
            entry["expected"] = {"result": "VERIFIED", "fields": verified_to_json(result)}
        elif result.ok or result.reason.value != expected_reason:
            raise AssertionError(f"{name}: expected {expected_reason}, got {result}")
        return entry

    other_credential = b.issue(not_before_s=NOT_BEFORE_S, not_after_s=NOT_BEFORE_S + 72 * 3600,
                               issuer=b.issuer_b)
    expired_credential = b.issue(not_before_s=NOW_S - 72 * 3600, not_after_s=NOW_S - 60)
    future_credential = b.issue(not_before_s=NOW_S + 600, not_after_s=NOW_S + 3600)
    forged_proof = b.raw_code(credential_body=b.credential.credential_bytes[:CREDENTIAL_BODY.size],
                              issuer=b.issuer_a, holder=b.other_holder, time_s=NOW_S - 5, counter=7,
                              purpose_byte=int(Purpose.PAY))
    cred_id = b.credential.credential_id
    vectors = [
        vector("holder_valid_pay", "A holder code for PAY, shown 5 s before the scan.", valid),
        vector("holder_valid_access", "The same credential allows ACCESS; a fresh code for a gate.",
               b.code(counter=8, purpose=Purpose.ACCESS), purpose=Purpose.ACCESS),
        vector("holder_valid_window_edge_past", "Proof time exactly 90 s before now: still inside the window.",
               b.code(time_s=NOW_S - 90)),
        vector("holder_valid_window_edge_future", "Proof time exactly 30 s after now: still inside the window.",
               b.code(time_s=NOW_S + 30)),
        vector("holder_valid_lower_counter_after_higher",
               "Counter 5 after counter 9 was accepted: only exact repeats are replays.",
               b.code(counter=5), prior_scans=((b.code(counter=9), NOW_S),)),
        vector("holder_valid_member_revoked_before_issue",
               "The member was revoked before this credential's not-before (e.g. frozen, then unfrozen "
               "and issued anew): not revoked.", valid,
               revocations=Revocations(members={MEMBER: NOT_BEFORE_S - 1})),
        vector("holder_valid_two_tenants_trusted", "A device trusting two tenants' keys.", valid, trust=trust_ab),
        vector("token_valid", "The rotating token for the current 60 s slot.", token_now),
        vector("token_valid_previous_slot", "The previous slot's token, 30 s after it ended: inside the window.",
               b.token_at(NOW_S - 60), now_s=NOW_S + 30),
        vector("token_valid_ride", "Tokens of this batch also allow RIDE.", token_now, purpose=Purpose.RIDE),
        # MALFORMED
        vector("malformed_prefix", "Unknown text prefix (a future format).", "OC2:" + valid[4:], expected_reason="MALFORMED"),
        vector("malformed_lowercase", "Base45 is upper case only.", valid[:4] + valid[4:].lower(),
               expected_reason="MALFORMED"),
        vector("malformed_truncated", "The last character is missing.", valid[:-1], expected_reason="MALFORMED"),
        vector("malformed_base45_group", "A Base45 group above 65535 ('GGW' = 65536).",
               valid[:4] + "GGW" + valid[7:], expected_reason="MALFORMED"),
        vector("malformed_version", "Version byte 2 inside an OC1 text.",
               _flip_bit(valid, byte_index=0, bit=1), expected_reason="MALFORMED"),
        vector("malformed_kind", "Kind byte 3 (unknown).", _flip_bit(valid, byte_index=1, bit=1),
               expected_reason="MALFORMED"),
        vector("malformed_validity_over_72h", "An issuer-signed credential valid 72 h + 1 s.",
               b.raw_code(credential_body=b.body(not_before_s=NOT_BEFORE_S, not_after_s=NOT_BEFORE_S + 72 * 3600 + 1,
                                                 purposes=int(Purpose.PAY)),
                          issuer=b.issuer_a, holder=b.holder, time_s=NOW_S, counter=1, purpose_byte=1),
               expected_reason="MALFORMED"),
        vector("malformed_proof_purpose", "Proof purpose byte 0x03 names two purposes.",
               b.raw_code(credential_body=b.credential.credential_bytes[:CREDENTIAL_BODY.size], issuer=b.issuer_a,
                          holder=b.holder, time_s=NOW_S, counter=1, purpose_byte=0x03),
               expected_reason="MALFORMED"),
        vector("malformed_empty", "Nothing after the prefix.", "OC1:", expected_reason="MALFORMED"),
        # STALE_TRUST_LIST
        vector("stale_trust_list", "Trust list fetched 7 days + 1 s before the scan (maximum age 7 days).", valid,
               trust=TrustList(keys=(b.issuer_a.trusted(),), fetched_at_s=NOW_S - MAX_TRUST_LIST_AGE_S - 1),
               expected_reason="STALE_TRUST_LIST"),
        # UNKNOWN_KEY
        vector("unknown_key", "Signed by tenant B's key, which this device does not trust.",
               b.code(credential=other_credential), expected_reason="UNKNOWN_KEY"),
        # BAD_SIGNATURE
        vector("bad_issuer_signature", "One bit of the issuer signature flipped.",
               _flip_bit(valid, byte_index=credential_offset + CREDENTIAL_BODY.size + 10, bit=0),
               expected_reason="BAD_SIGNATURE"),
        vector("bad_signature_member_changed", "The member id changed after signing.",
               _flip_bit(valid, byte_index=credential_offset + 4, bit=7), expected_reason="BAD_SIGNATURE"),
        vector("bad_holder_signature_forged", "The proof signed by another phone's key, not the credential's.",
               forged_proof, expected_reason="BAD_SIGNATURE"),
        vector("bad_holder_signature_counter_changed", "The counter changed after signing.",
               _flip_bit(valid, byte_index=credential_offset + 134 + 7, bit=0), expected_reason="BAD_SIGNATURE"),
        vector("bad_token_signature", "One bit of a token's signature flipped.",
               _flip_bit(token_now, byte_index=TOKEN_FIELDS.size + 3, bit=4), expected_reason="BAD_SIGNATURE"),
        # WRONG_TENANT
        vector("wrong_tenant", "Tenant B's valid code at a device of tenant A that trusts both tenants' keys.",
               b.code(credential=other_credential), trust=trust_ab, expected_reason="WRONG_TENANT"),
        # EXPIRED
        vector("expired_credential", "The credential's not-after passed 60 s ago.",
               b.code(credential=expired_credential, time_s=NOW_S - 70), expected_reason="EXPIRED"),
        vector("expired_proof_outside_window", "Proof made 91 s before the scan (a screenshot).",
               b.code(time_s=NOW_S - 91), expected_reason="EXPIRED"),
        vector("expired_token_slot", "A token whose slot ended 90 s before the scan.",
               b.token_at(NOW_S - 150), now_s=NOW_S - 30, expected_reason="EXPIRED"),
        # NOT_YET_VALID
        vector("not_yet_valid_credential", "The credential starts in 10 minutes.",
               b.code(credential=future_credential, time_s=NOW_S), expected_reason="NOT_YET_VALID"),
        vector("not_yet_valid_future_proof", "Proof time 31 s after now.", b.code(time_s=NOW_S + 31),
               expected_reason="NOT_YET_VALID"),
        vector("not_yet_valid_token_slot", "The token for a slot starting in 2 minutes.",
               b.token_at(NOW_S + 120), expected_reason="NOT_YET_VALID"),
        # REVOKED
        vector("revoked_credential", "The credential id is on the revocation list.", valid,
               revocations=Revocations(credential_ids=[cred_id]), expected_reason="REVOKED"),
        vector("revoked_member", "The member was revoked after this credential's not-before.", valid,
               revocations=Revocations(members={MEMBER: NOW_S - 60}), expected_reason="REVOKED"),
        vector("revoked_token_batch", "The token batch id is on the revocation list.", token_now,
               revocations=Revocations(credential_ids=[TOKEN_BATCH_ID]), expected_reason="REVOKED"),
        # WRONG_PURPOSE
        vector("wrong_purpose_holder", "A PAY code scanned at a gate (ACCESS).", valid, purpose=Purpose.ACCESS,
               expected_reason="WRONG_PURPOSE"),
        vector("wrong_purpose_not_allowed", "A RIDE proof on a credential allowing PAY and ACCESS only.",
               b.raw_code(credential_body=b.credential.credential_bytes[:CREDENTIAL_BODY.size], issuer=b.issuer_a,
                          holder=b.holder, time_s=NOW_S, counter=3, purpose_byte=int(Purpose.RIDE)),
               purpose=Purpose.RIDE, expected_reason="WRONG_PURPOSE"),
        vector("wrong_purpose_token", "A token allowing PAY and RIDE, scanned for CHECK_IN.", token_now,
               purpose=Purpose.CHECK_IN, expected_reason="WRONG_PURPOSE"),
        # REPLAYED
        vector("replayed_holder_counter", "The same code scanned again 10 s later at the same verifier.", valid,
               now_s=NOW_S + 10, prior_scans=((valid, NOW_S),), expected_reason="REPLAYED"),
        vector("replayed_holder_counter_other_proof",
               "A new proof reusing an accepted counter (different time, same counter).",
               b.code(time_s=NOW_S, counter=7), prior_scans=((valid, NOW_S),), expected_reason="REPLAYED"),
        vector("replayed_token_slot", "The same token scanned twice.", token_now, now_s=NOW_S + 5,
               prior_scans=((token_now, NOW_S),), expected_reason="REPLAYED"),
    ]
    return {
        "format": "OC1",
        "generated_by": "python -m onecard_codes.vectors",
        "note": "Test keys from fixed seeds; never use them outside tests.",
        "keys": {
            "issuer_a": {"tenant_id": str(TENANT_A), "seed": ISSUER_A_SEED.hex(),
                         "public_key": b.issuer_a.public_key.hex(), "key_id": b.issuer_a.key_id.hex()},
            "issuer_b": {"tenant_id": str(TENANT_B), "seed": ISSUER_B_SEED.hex(),
                         "public_key": b.issuer_b.public_key.hex(), "key_id": b.issuer_b.key_id.hex()},
            "holder": {"seed": HOLDER_SEED.hex(), "public_key": bytes(b.holder.verify_key).hex()},
        },
        "vectors": vectors,
    }


def render() -> str:
    return json.dumps(build_vectors(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
