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
from typing import Any, NamedTuple

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
from onecard_codes.keys import IssuerKey, Revocations, TrustedKey, TrustList, key_id_for
from onecard_codes.result import CodeKind, OfflineCaps, Purpose, Rejected, Verified
from onecard_codes.verify import DEFAULT_CLOCK_WINDOW_S, DEFAULT_REPLAY_MARGIN_S, ReplayCache, Verifier

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
    """Replay one vector: build the verifier from its inputs, run its prior scans (each must be
    accepted), apply the revocations that arrive after them, then verify its code."""
    setup = vector["verifier"]
    verifier = Verifier(
        trust_list=TrustList.from_json(setup["trust_list"]), revocations=Revocations.from_json(setup["revocations"]),
        replay_cache=ReplayCache(), clock_window_s=tuple(setup["clock_window_s"]),
        max_trust_list_age_s=setup["max_trust_list_age_s"], replay_margin_s=setup["replay_margin_s"],
    )
    for scan in vector["prior_scans"]:
        prior = verifier.verify(scan["code"], now_s=scan["now_s"], purpose=Purpose[scan["purpose"]],
                                expected_tenant_id=uuid.UUID(scan["expected_tenant_id"]))
        if not prior.ok:
            raise AssertionError(f"{vector['name']}: prior scan refused: {prior}")
    later = setup["revocations_after_prior_scans"]
    for credential_id in later["credential_ids"]:
        verifier.revocations.revoke_credential(credential_id=uuid.UUID(credential_id))
    for member in later["members"]:
        verifier.revocations.revoke_member(member_id=uuid.UUID(member["member_id"]),
                                           revoked_at_s=member["revoked_at_s"])
    return verifier.verify(vector["code"], now_s=vector["now_s"], purpose=Purpose[vector["purpose"]],
                           expected_tenant_id=uuid.UUID(vector["expected_tenant_id"]))


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
    """Fixed keys and the codes the vectors are made of, ordinary and raw."""

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

    def body(self, *, not_before_s: int = NOT_BEFORE_S, not_after_s: int = NOT_BEFORE_S + 72 * 3600,
             purposes: int = int(Purpose.PAY | Purpose.ACCESS), key_id: bytes | None = None,
             holder_public_key: bytes | None = None) -> bytes:
        holder_public_key = holder_public_key if holder_public_key is not None else bytes(self.holder.verify_key)
        return CREDENTIAL_BODY.pack(key_id if key_id is not None else self.issuer_a.key_id, MEMBER.bytes,
                                    holder_public_key, not_before_s, not_after_s, CAPS.per_transaction_fen,
                                    CAPS.per_day_fen, CAPS.count_per_day, purposes)

    def raw_code(self, *, body: bytes | None = None, time_s: int = NOW_S - 5, counter: int = 7,
                 purpose_byte: int = int(Purpose.PAY), issuer: IssuerKey | None = None,
                 holder: nacl.signing.SigningKey | None = None, **signers: Any) -> str:
        """A holder code of tenant A's issuer (unless ``issuer``) with the given body and signers."""
        issuer = issuer or self.issuer_a
        return raw_holder_code(credential_body=body if body is not None else self.body(), issuer=issuer,
                               tenant_id=issuer.tenant_id, holder=holder or self.holder, time_s=time_s,
                               counter=counter, purpose_byte=purpose_byte, **signers)

    def raw_token(self, *, issuer: IssuerKey | None = None, **fields: Any) -> str:
        """A token of tenant A's batch ``TOKEN_BATCH_ID`` with the given fields changed."""
        issuer = issuer or self.issuer_a
        values: dict[str, Any] = dict(
            key_id=issuer.key_id, tenant_id=issuer.tenant_id, sign=signer(issuer), credential_id=TOKEN_BATCH_ID,
            member_id=MEMBER, not_before_s=NOT_BEFORE_S, not_after_s=NOT_BEFORE_S + 24 * 3600, caps=CAPS,
            purposes_byte=int(Purpose.PAY | Purpose.RIDE), slot_start_s=NOW_S, slot_length_s=60, sequence=60)
        values.update(fields)
        return raw_token(**values)

    def token_at(self, now_s: int) -> str:
        token = self.batch.token_at(now_s=now_s)
        assert token is not None
        return token.text


def _flip_bit(code_text: str, *, byte_index: int, bit: int) -> str:
    data = bytearray(text_to_binary(code_text))
    data[byte_index] ^= 1 << bit
    return binary_to_text(bytes(data))


def _set_byte(code_text: str, *, byte_index: int, value: int) -> str:
    data = bytearray(text_to_binary(code_text))
    data[byte_index] = value
    return binary_to_text(bytes(data))


def _s_plus_l_in_issuer_signature(code_text: str) -> str:
    data = bytearray(text_to_binary(code_text))
    s_at = HEADER.size + CREDENTIAL_BODY.size + 32
    s_value = int.from_bytes(data[s_at:s_at + 32], "little") + ED25519_L
    data[s_at:s_at + 32] = s_value.to_bytes(32, "little")
    return binary_to_text(bytes(data))


def _resized(code_text: str, *, by: int) -> str:
    data = text_to_binary(code_text)
    return binary_to_text(data + bytes(by) if by > 0 else data[:by])


# The checks of format doc §6 by number, and the reasons each may answer.
CHECK_REASONS: dict[int, tuple[str, ...]] = {
    1: ("MALFORMED",), 2: ("STALE_TRUST_LIST",), 3: ("UNKNOWN_KEY",), 4: ("BAD_SIGNATURE",), 5: ("WRONG_TENANT",),
    6: ("NOT_YET_VALID", "EXPIRED"), 7: ("REVOKED",), 8: ("BAD_SIGNATURE",), 9: ("WRONG_PURPOSE",),
    10: ("EXPIRED", "NOT_YET_VALID"), 11: ("REPLAYED",),
}
U32_MAX = 0xFFFFFFFF
TOKEN_BATCH_2 = uuid.UUID("7b7b7b7b-2222-4222-8222-000000000002")


class Scan(NamedTuple):
    """A prior scan at the same verifier; tenant and purpose default to the vector's."""

    code: str
    now_s: int
    tenant: uuid.UUID | None = None
    purpose: Purpose | None = None


def build_vectors() -> dict[str, Any]:
    b = _Builder()
    trust_a = TrustList(keys=(b.issuer_a.trusted(),), fetched_at_s=NOW_S - 600, version=3)
    trust_ab = TrustList(keys=(b.issuer_a.trusted(), b.issuer_b.trusted()), fetched_at_s=NOW_S - 600, version=3)
    stale_a = TrustList(keys=(b.issuer_a.trusted(),), fetched_at_s=NOW_S - MAX_TRUST_LIST_AGE_S - 1, version=3)
    no_revocations = Revocations()

    def trust_at(fetched_at_s: int, *keys: TrustedKey) -> TrustList:
        return TrustList(keys=keys or (b.issuer_a.trusted(),), fetched_at_s=fetched_at_s, version=3)

    def vector(name: str, description: str, code: str, *, expected_reason: str | None = None,
               fails: tuple[int, ...] = (), now_s: int = NOW_S, trust: TrustList = trust_a,
               revocations: Revocations = no_revocations, revoked_later: Revocations = no_revocations,
               purpose: Purpose = Purpose.PAY, tenant: uuid.UUID = TENANT_A, prior_scans: tuple[Scan, ...] = (),
               max_trust_list_age_s: int = MAX_TRUST_LIST_AGE_S, replay_margin_s: int = DEFAULT_REPLAY_MARGIN_S,
               ) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "name": name, "description": description, "code": code,
            "verifier": {"trust_list": trust.to_json(), "max_trust_list_age_s": max_trust_list_age_s,
                         "clock_window_s": list(DEFAULT_CLOCK_WINDOW_S), "replay_margin_s": replay_margin_s,
                         "revocations": revocations.to_json(),
                         "revocations_after_prior_scans": revoked_later.to_json()},
            "now_s": now_s, "expected_tenant_id": str(tenant), "purpose": purpose.name,
            "prior_scans": [{"code": scan.code, "now_s": scan.now_s, "expected_tenant_id": str(scan.tenant or tenant),
                             "purpose": (scan.purpose or purpose).name} for scan in prior_scans],
        }
        try:
            entry["binary_hex"] = text_to_binary(code).hex()
        except ValueError:
            entry["binary_hex"] = None
        entry["expected"] = {"result": "REJECTED", "reason": expected_reason}
        result = run_vector(entry)
        if expected_reason is None:
            if not result.ok or fails:
                raise AssertionError(f"{name}: valid vector refused or said to fail checks: {result}")
            entry["decoded"] = decoded_to_json(code)
            entry["expected"] = {"result": "VERIFIED", "fields": verified_to_json(result)}
            return entry
        if result.ok or result.reason.value != expected_reason:
            raise AssertionError(f"{name}: expected {expected_reason}, got {result}")
        if not fails or list(fails) != sorted(set(fails)) or expected_reason not in CHECK_REASONS[fails[0]]:
            raise AssertionError(f"{name}: checks {fails} do not answer {expected_reason} first")
        entry["fails_checks"] = list(fails)
        return entry

    valid = b.code()
    token_now = b.token_at(NOW_S)
    credential_offset = HEADER.size
    cred_id = b.credential.credential_id
    other_credential = b.issue(not_before_s=NOT_BEFORE_S, not_after_s=NOT_BEFORE_S + 72 * 3600, issuer=b.issuer_b)
    other_expired_credential = b.issue(not_before_s=NOW_S - 72 * 3600, not_after_s=NOW_S - 60, issuer=b.issuer_b)
    expired_credential = b.issue(not_before_s=NOW_S - 72 * 3600, not_after_s=NOW_S - 60)
    future_credential = b.issue(not_before_s=NOW_S + 600, not_after_s=NOW_S + 3600)
    forged_proof = b.raw_code(holder=b.other_holder)
    malformed_purpose = b.raw_code(time_s=NOW_S, counter=1, purpose_byte=0x03)
    uint32_end_body = b.body(not_before_s=U32_MAX - 72 * 3600, not_after_s=U32_MAX)
    ends_now = dict(not_before_s=NOW_S - 3600, not_after_s=NOW_S, slot_start_s=NOW_S - 60, sequence=59)
    b_token = dict(issuer=b.issuer_b, credential_id=TOKEN_BATCH_2)

    vectors = [
        # ---- valid codes --------------------------------------------------------------------------
        vector("holder_valid_pay", "A holder code for PAY, shown 5 s before the scan.", valid),
        vector("holder_valid_access", "The same credential allows ACCESS; a fresh code for a gate.",
               b.code(counter=8, purpose=Purpose.ACCESS), purpose=Purpose.ACCESS),
        vector("holder_valid_window_edge_past", "Proof time exactly 90 s before now: still inside the window.",
               b.code(time_s=NOW_S - 90)),
        vector("holder_valid_window_edge_future", "Proof time exactly 30 s after now: still inside the window.",
               b.code(time_s=NOW_S + 30)),
        vector("holder_valid_lower_counter_after_higher",
               "Counter 5 after counter 9 was accepted: only exact repeats are replays.",
               b.code(counter=5), prior_scans=(Scan(b.code(counter=9), NOW_S),)),
        vector("holder_valid_member_revoked_before_issue",
               "The member was revoked before this credential's not-before (e.g. frozen, then unfrozen "
               "and issued anew): not revoked.", valid,
               revocations=Revocations(members={MEMBER: NOT_BEFORE_S - 1})),
        vector("holder_valid_two_tenants_trusted", "A device trusting two tenants' keys.", valid, trust=trust_ab),
        vector("holder_valid_key_id_shared_by_two_entries",
               "The trust list holds tenant A's key twice, first for tenant B: the first entry with the key id "
               "does not verify (its tenant is in the signed message), the second does. Try every entry.",
               valid, trust=trust_at(NOW_S - 600, TrustedKey(tenant_id=TENANT_B, public_key=b.issuer_a.public_key),
                                     b.issuer_a.trusted())),
        vector("holder_valid_all_four_purposes", "A credential allowing all four purposes (0x0f), a CHECK_IN code.",
               b.raw_code(body=b.body(purposes=0x0F), purpose_byte=int(Purpose.CHECK_IN)), purpose=Purpose.CHECK_IN),
        vector("token_valid", "The rotating token for the current 60 s slot.", token_now),
        vector("token_valid_previous_slot", "The previous slot's token, 30 s after it ended: inside the window.",
               b.token_at(NOW_S - 60), now_s=NOW_S + 30),
        vector("token_valid_ride", "Tokens of this batch also allow RIDE.", token_now, purpose=Purpose.RIDE),
        # ---- validity edges: not_before_s <= now_s < not_after_s ------------------------------------
        vector("holder_valid_now_is_not_before", "now = the credential's not-before: valid (inclusive start).",
               b.raw_code(body=b.body(not_before_s=NOW_S, not_after_s=NOW_S + 3600), time_s=NOW_S)),
        vector("holder_valid_proof_time_before_not_before",
               "now = not-before and the proof is 60 s older than that: the proof time is held only to the clock "
               "window, never to the credential's validity.",
               b.raw_code(body=b.body(not_before_s=NOW_S, not_after_s=NOW_S + 3600), time_s=NOW_S - 60)),
        vector("holder_valid_last_second_before_not_after", "now = not-after - 1: valid.",
               b.raw_code(body=b.body(not_before_s=NOW_S - 3600, not_after_s=NOW_S + 1))),
        vector("expired_now_is_not_after", "now = the credential's not-after: expired (exclusive end).",
               b.raw_code(body=b.body(not_before_s=NOW_S - 3600, not_after_s=NOW_S)),
               expected_reason="EXPIRED", fails=(6,)),
        vector("not_yet_valid_now_is_one_second_before_not_before", "now = not-before - 1.",
               b.raw_code(body=b.body(not_before_s=NOW_S + 1, not_after_s=NOW_S + 3600), time_s=NOW_S),
               expected_reason="NOT_YET_VALID", fails=(6,)),
        vector("token_valid_now_is_not_before", "now = the batch's not-before, its first slot.",
               b.raw_token(credential_id=TOKEN_BATCH_2, not_before_s=NOW_S, not_after_s=NOW_S + 3600,
                           slot_start_s=NOW_S, sequence=0)),
        vector("token_expired_now_is_not_after",
               "now = the batch's not-after; its last slot ended at now, still inside the clock window.",
               b.raw_token(credential_id=TOKEN_BATCH_2, **ends_now), expected_reason="EXPIRED", fails=(6,)),
        # ---- revocation edges: a member revocation covers not_before_s <= revoked_at_s --------------
        vector("revoked_member_at_not_before", "The member was revoked at exactly this credential's not-before.",
               valid, revocations=Revocations(members={MEMBER: NOT_BEFORE_S}), expected_reason="REVOKED", fails=(7,)),
        vector("token_revoked_member_at_not_before", "The member was revoked at exactly the batch's not-before.",
               token_now, revocations=Revocations(members={MEMBER: NOT_BEFORE_S}), expected_reason="REVOKED",
               fails=(7,)),
        vector("token_valid_member_revoked_before_batch", "The member was revoked 1 s before the batch's not-before.",
               token_now, revocations=Revocations(members={MEMBER: NOT_BEFORE_S - 1})),
        # ---- trust list age: stale iff now_s - fetched_at_s > max_trust_list_age_s (signed) ----------
        vector("holder_valid_trust_list_at_max_age", "Trust list fetched exactly 7 days before the scan: not stale.",
               valid, trust=trust_at(NOW_S - MAX_TRUST_LIST_AGE_S)),
        vector("holder_valid_trust_list_fetched_after_now",
               "Trust list fetched an hour after now (the device clock stepped back): its age is negative, not "
               "stale. An unsigned 32-bit age would wrap to a huge number.", valid, trust=trust_at(NOW_S + 3600)),
        # ---- clock window edges for tokens ---------------------------------------------------------
        vector("token_valid_slot_starts_at_window_end", "The slot starts exactly 30 s after now.",
               b.token_at(NOW_S + 60), now_s=NOW_S + 30),
        vector("token_valid_slot_ended_89_s_ago", "The slot ended 89 s before now: it overlaps the window.",
               b.token_at(NOW_S - 150), now_s=NOW_S - 31),
        vector("not_yet_valid_token_slot_starts_31_s_after_now", "The slot starts 31 s after now.",
               b.token_at(NOW_S + 60), now_s=NOW_S + 29, expected_reason="NOT_YET_VALID", fails=(10,)),
        # ---- replay cache: an entry is live while now_s <= its expiry -------------------------------
        vector("replayed_counter_at_last_second_of_its_entry",
               "Counter 7 was accepted with proof time now-150 (entry live until time + 90 + 60 = now); a new "
               "proof reusing counter 7, made 90 s ago, is inside the window and refused.",
               b.code(time_s=NOW_S - 90), prior_scans=(Scan(b.code(time_s=NOW_S - 150), NOW_S - 150),),
               expected_reason="REPLAYED", fails=(11,)),
        vector("holder_valid_counter_reused_after_its_entry_expired",
               "As above one second later: the entry (until time + 150) has expired, the counter is accepted again.",
               b.code(time_s=NOW_S - 89), now_s=NOW_S + 1,
               prior_scans=(Scan(b.code(time_s=NOW_S - 150), NOW_S - 150),)),
        vector("replayed_same_code_at_window_edge_without_margin",
               "Replay margin 0: the code (proof time now-90) was accepted at its time; 90 s later it is still "
               "inside the window and its entry (time + 90 + 0) is still live.",
               b.code(time_s=NOW_S - 90), prior_scans=(Scan(b.code(time_s=NOW_S - 90), NOW_S - 90),),
               replay_margin_s=0, expected_reason="REPLAYED", fails=(11,)),
        # ---- time arithmetic in int64: no uint32 sum may wrap ----------------------------------------
        vector("holder_valid_at_end_of_uint32_time",
               "Credential ending at 2^32-1, proof time 2^32-1, now 15 s earlier: now + 30 exceeds 2^32-1.",
               b.raw_code(body=uint32_end_body, time_s=U32_MAX), now_s=U32_MAX - 15,
               trust=trust_at(U32_MAX - 615)),
        vector("replayed_at_end_of_uint32_time",
               "Accepted 1 s ago with proof time 2^32-112: its entry lasts until time + 150, past 2^32-1.",
               b.raw_code(body=uint32_end_body, time_s=U32_MAX - 111), now_s=U32_MAX - 100,
               prior_scans=(Scan(b.raw_code(body=uint32_end_body, time_s=U32_MAX - 111), U32_MAX - 101),),
               trust=trust_at(U32_MAX - 700), expected_reason="REPLAYED", fails=(11,)),
        vector("token_valid_at_end_of_uint32_time",
               "The last slot of a batch ending at 2^32-1, scanned 40 s into it: now + 30 exceeds 2^32-1.",
               b.raw_token(not_before_s=U32_MAX - 24 * 3600, not_after_s=U32_MAX, slot_start_s=U32_MAX - 60,
                           sequence=1439), now_s=U32_MAX - 20, trust=trust_at(U32_MAX - 620)),
        vector("malformed_token_slot_end_beyond_uint32",
               "slot_start 0xffffff00 + slot_length 0x200 is past not_after 0xffffffff (a 32-bit sum wraps to 0x100).",
               b.raw_token(not_before_s=0xFFFF0000, not_after_s=U32_MAX, slot_start_s=0xFFFFFF00,
                           slot_length_s=0x200), expected_reason="MALFORMED", fails=(1,)),
        vector("not_yet_valid_credential_at_end_of_uint32_time",
               "A well-formed credential from 0xffff0000 to 0xffffffff (18 h): not_before + 72 h exceeds 2^32-1.",
               b.raw_code(body=b.body(not_before_s=0xFFFF0000, not_after_s=U32_MAX), time_s=NOW_S),
               expected_reason="NOT_YET_VALID", fails=(6,)),
        vector("holder_valid_near_time_zero",
               "A credential from time 0, proof time 0, now 30: now - 90 is below zero.",
               b.raw_code(body=b.body(not_before_s=0, not_after_s=3600), time_s=0), now_s=30, trust=trust_at(0)),
        vector("token_valid_near_time_zero", "The first slot of a batch from time 0, now 30: now - 90 is below zero.",
               b.raw_token(not_before_s=0, not_after_s=3600, slot_start_s=0, sequence=0), now_s=30, trust=trust_at(0)),
        # ---- tokens: sequence and slot alignment are not checked -------------------------------------
        vector("token_valid_unaligned_slot_any_sequence",
               "A 45 s slot starting 17 s before now (not a multiple of anything from not-before) with sequence "
               "0xffffffff: both are the issuer's business; the verifier checks neither.",
               b.raw_token(slot_start_s=NOW_S - 17, slot_length_s=45, sequence=U32_MAX)),
        vector("token_valid_one_second_slot", "slot_length 1 (issuers use >= 10, verifiers require >= 1).",
               b.raw_token(slot_start_s=NOW_S, slot_length_s=1, sequence=5)),
        vector("token_valid_slot_ends_at_batch_end", "slot_start + slot_length = not_after exactly.",
               b.raw_token(credential_id=TOKEN_BATCH_2, not_before_s=NOW_S - 3600, not_after_s=NOW_S + 30,
                           slot_start_s=NOW_S - 30, sequence=59)),
        # ---- MALFORMED -----------------------------------------------------------------------------
        vector("malformed_prefix", "Unknown text prefix (a future format).", "OC2:" + valid[4:],
               expected_reason="MALFORMED", fails=(1,)),
        vector("malformed_lowercase_prefix", "The prefix is upper case only.", "oc1:" + valid[4:],
               expected_reason="MALFORMED", fails=(1,)),
        vector("malformed_lowercase", "Base45 is upper case only.", valid[:4] + valid[4:].lower(),
               expected_reason="MALFORMED", fails=(1,)),
        vector("malformed_truncated", "The last character is missing.", valid[:-1], expected_reason="MALFORMED",
               fails=(1,)),
        vector("malformed_base45_group", "A Base45 group above 65535 ('GGW' = 65536).",
               valid[:4] + "GGW" + valid[7:], expected_reason="MALFORMED", fails=(1,)),
        vector("malformed_empty", "Nothing after the prefix.", "OC1:", expected_reason="MALFORMED", fails=(1,)),
        vector("malformed_text_321_characters",
               "A valid holder code with two zero bytes appended: 321 characters, over the 320 limit.",
               _resized(valid, by=2), expected_reason="MALFORMED", fails=(1,)),
        vector("malformed_holder_one_byte_long", "A valid holder code plus one byte (210 bytes, 319 characters).",
               _resized(valid, by=1), expected_reason="MALFORMED", fails=(1,)),
        vector("malformed_holder_one_byte_short", "A valid holder code less its last byte (208 bytes).",
               _resized(valid, by=-1), expected_reason="MALFORMED", fails=(1,)),
        vector("malformed_token_one_byte_long", "A valid token plus one byte (131 bytes).",
               _resized(token_now, by=1), expected_reason="MALFORMED", fails=(1,)),
        vector("malformed_token_one_byte_short", "A valid token less its last byte (129 bytes).",
               _resized(token_now, by=-1), expected_reason="MALFORMED", fails=(1,)),
        vector("malformed_version", "Version byte 2 inside an OC1 text.",
               _flip_bit(valid, byte_index=0, bit=1), expected_reason="MALFORMED", fails=(1,)),
        vector("malformed_kind", "Kind byte 3 (unknown).", _flip_bit(valid, byte_index=1, bit=1),
               expected_reason="MALFORMED", fails=(1,)),
        vector("malformed_token_version",
               "A valid token with version byte 2 (the header is not signed: the decoder must check it).",
               _set_byte(token_now, byte_index=0, value=2), expected_reason="MALFORMED", fails=(1,)),
        vector("malformed_token_with_holder_kind",
               "A valid token's 130 bytes with kind byte 0x01: the kind decides the layout, not the length.",
               _set_byte(token_now, byte_index=1, value=1), expected_reason="MALFORMED", fails=(1,)),
        vector("malformed_holder_with_token_kind", "A valid holder code's 209 bytes with kind byte 0x02.",
               _set_byte(valid, byte_index=1, value=2), expected_reason="MALFORMED", fails=(1,)),
        vector("malformed_validity_over_72h", "An issuer-signed credential valid 72 h + 1 s.",
               b.raw_code(body=b.body(not_after_s=NOT_BEFORE_S + 72 * 3600 + 1)),
               expected_reason="MALFORMED", fails=(1,)),
        vector("malformed_not_after_equals_not_before", "An issuer-signed credential with not-after = not-before.",
               b.raw_code(body=b.body(not_before_s=NOW_S, not_after_s=NOW_S)), expected_reason="MALFORMED",
               fails=(1,)),
        vector("malformed_credential_purposes_zero", "An issuer-signed credential allowing no purpose (0x00).",
               b.raw_code(body=b.body(purposes=0)), expected_reason="MALFORMED", fails=(1,)),
        vector("malformed_credential_purposes_reserved_bit", "An issuer-signed credential with purposes 0x11 "
               "(PAY and reserved bit 4).", b.raw_code(body=b.body(purposes=0x11)), expected_reason="MALFORMED",
               fails=(1,)),
        vector("malformed_purposes_zero_before_signature",
               "Purposes 0x00 and a non-canonical issuer signature: the structure is checked first.",
               b.raw_code(body=b.body(purposes=0), issuer_sign=s_plus_l(signer(b.issuer_a))),
               expected_reason="MALFORMED", fails=(1,)),
        vector("malformed_token_purposes_zero", "An issuer-signed token allowing no purpose.",
               b.raw_token(purposes_byte=0), expected_reason="MALFORMED", fails=(1,)),
        vector("malformed_token_purposes_reserved_bit", "An issuer-signed token with purposes 0x81.",
               b.raw_token(purposes_byte=0x81), expected_reason="MALFORMED", fails=(1,)),
        vector("malformed_proof_purpose", "Proof purpose byte 0x03 names two purposes.", malformed_purpose,
               expected_reason="MALFORMED", fails=(1,)),
        vector("malformed_proof_purpose_zero", "Proof purpose byte 0x00.",
               b.raw_code(purpose_byte=0), expected_reason="MALFORMED", fails=(1,)),
        vector("malformed_proof_purpose_reserved_bit", "Proof purpose byte 0x10 (reserved).",
               b.raw_code(purpose_byte=0x10), expected_reason="MALFORMED", fails=(1,)),
        vector("malformed_token_slot_length_zero", "An issuer-signed token with slot_length 0.",
               b.raw_token(slot_length_s=0), expected_reason="MALFORMED", fails=(1,)),
        vector("malformed_token_slot_starts_before_batch", "slot_start = not_before - 1.",
               b.raw_token(slot_start_s=NOT_BEFORE_S - 1), expected_reason="MALFORMED", fails=(1,)),
        vector("malformed_token_slot_ends_after_batch", "slot_start + slot_length = not_after + 1.",
               b.raw_token(slot_start_s=NOT_BEFORE_S + 24 * 3600 - 59), expected_reason="MALFORMED", fails=(1,)),
        vector("malformed_token_batch_over_24h", "An issuer-signed batch valid 24 h + 1 s.",
               b.raw_token(not_after_s=NOT_BEFORE_S + 24 * 3600 + 1), expected_reason="MALFORMED", fails=(1,)),
        # ---- STALE_TRUST_LIST, UNKNOWN_KEY, WRONG_TENANT ---------------------------------------------
        vector("stale_trust_list", "Trust list fetched 7 days + 1 s before the scan (maximum age 7 days).", valid,
               trust=stale_a, expected_reason="STALE_TRUST_LIST", fails=(2,)),
        vector("unknown_key", "Signed by tenant B's key, which this device does not trust (so no key verifies it).",
               b.code(credential=other_credential), expected_reason="UNKNOWN_KEY", fails=(3, 4)),
        vector("unknown_key_token", "A token signed by tenant B's key, which this device does not trust.",
               b.raw_token(**b_token), expected_reason="UNKNOWN_KEY", fails=(3, 4)),
        vector("wrong_tenant", "Tenant B's valid code at a device of tenant A that trusts both tenants' keys.",
               b.code(credential=other_credential), trust=trust_ab, expected_reason="WRONG_TENANT", fails=(5,)),
        # ---- BAD_SIGNATURE: tampering -------------------------------------------------------------
        vector("bad_issuer_signature", "One bit of the issuer signature flipped (the proof, made over the "
               "original credential, fails too).",
               _flip_bit(valid, byte_index=credential_offset + CREDENTIAL_BODY.size + 10, bit=0),
               expected_reason="BAD_SIGNATURE", fails=(4, 8)),
        vector("bad_signature_member_changed", "The member id changed after signing.",
               _flip_bit(valid, byte_index=credential_offset + 4, bit=7), expected_reason="BAD_SIGNATURE",
               fails=(4, 8)),
        vector("bad_holder_signature_forged", "The proof signed by another phone's key, not the credential's.",
               forged_proof, expected_reason="BAD_SIGNATURE", fails=(8,)),
        vector("bad_holder_signature_counter_changed", "The counter changed after signing.",
               _flip_bit(valid, byte_index=credential_offset + 134 + 7, bit=0), expected_reason="BAD_SIGNATURE",
               fails=(8,)),
        vector("bad_token_signature", "One bit of a token's signature flipped.",
               _flip_bit(token_now, byte_index=TOKEN_FIELDS.size + 3, bit=4), expected_reason="BAD_SIGNATURE",
               fails=(4,)),
        # ---- BAD_SIGNATURE: strict Ed25519 (§4.4); a lax verifier accepts each of these --------------
        vector("bad_issuer_signature_s_plus_l", "The issuer signature's S replaced by S + L (non-canonical S).",
               b.raw_code(issuer_sign=s_plus_l(signer(b.issuer_a))), expected_reason="BAD_SIGNATURE", fails=(4,)),
        vector("bad_issuer_signature_r_identity",
               "Issuer signature with R = the identity (small order) and S = k·a: [S]B = R + [k]A holds.",
               b.raw_code(issuer_sign=small_order_r(seed=ISSUER_A_SEED, r_bytes=IDENTITY_POINT)),
               expected_reason="BAD_SIGNATURE", fails=(4,)),
        vector("bad_issuer_signature_r_identity_non_canonical",
               "As above with R encoded as y = p + 1 (non-canonical; reduces to the identity).",
               b.raw_code(issuer_sign=small_order_r(seed=ISSUER_A_SEED, r_bytes=IDENTITY_NONCANONICAL)),
               expected_reason="BAD_SIGNATURE", fails=(4,)),
        vector("bad_issuer_signature_r_negative_zero",
               "As above with R encoded as y = 1 with the sign bit set (x = 0 cannot be negative).",
               b.raw_code(issuer_sign=small_order_r(seed=ISSUER_A_SEED, r_bytes=IDENTITY_NEGATIVE_ZERO)),
               expected_reason="BAD_SIGNATURE", fails=(4,)),
        vector("bad_issuer_signature_r_mixed_order",
               "R = [r]B + T (T of order 8), S = r + k·a: only a cofactored equation ([8][S]B = [8]R + [8][k]A) "
               "accepts it.", b.raw_code(issuer_sign=mixed_order_r(seed=ISSUER_A_SEED)),
               expected_reason="BAD_SIGNATURE", fails=(4,)),
        vector("bad_issuer_key_identity",
               "Tenant A's trust list holds the identity point as a key; the credential's signature is R = [s]B, "
               "S = s, which satisfies the equation for that key with no private key at all.",
               b.raw_code(body=b.body(key_id=key_id_for(IDENTITY_POINT)),
                          issuer_sign=forged_for_small_order_key(IDENTITY_POINT, order=1)),
               trust=trust_at(NOW_S - 600, TrustedKey(tenant_id=TENANT_A, public_key=IDENTITY_POINT)),
               expected_reason="BAD_SIGNATURE", fails=(4,)),
        vector("bad_issuer_key_identity_non_canonical", "As above with the key encoded as y = p + 1.",
               b.raw_code(body=b.body(key_id=key_id_for(IDENTITY_NONCANONICAL)),
                          issuer_sign=forged_for_small_order_key(IDENTITY_NONCANONICAL, order=1)),
               trust=trust_at(NOW_S - 600, TrustedKey(tenant_id=TENANT_A, public_key=IDENTITY_NONCANONICAL)),
               expected_reason="BAD_SIGNATURE", fails=(4,)),
        vector("bad_issuer_key_order_8",
               "The trusted key is a point of order 8; the forged signature's k is a multiple of 8.",
               b.raw_code(body=b.body(key_id=key_id_for(ORDER_8_POINT)),
                          issuer_sign=forged_for_small_order_key(ORDER_8_POINT, order=8)),
               trust=trust_at(NOW_S - 600, TrustedKey(tenant_id=TENANT_A, public_key=ORDER_8_POINT)),
               expected_reason="BAD_SIGNATURE", fails=(4,)),
        vector("bad_issuer_key_mixed_order",
               "The trusted key is [a]B + T (T of order 8) and the signature R = [r]B, S = r + k·a with 8 | k: "
               "libsodium alone accepts it; the key is not of prime order.",
               b.raw_code(body=b.body(key_id=key_id_for(mixed_order_key(ISSUER_A_SEED))),
                          issuer_sign=signed_by_mixed_order_key(ISSUER_A_SEED)),
               trust=trust_at(NOW_S - 600, TrustedKey(tenant_id=TENANT_A, public_key=mixed_order_key(ISSUER_A_SEED))),
               expected_reason="BAD_SIGNATURE", fails=(4,)),
        vector("bad_holder_signature_s_plus_l", "The proof signature's S replaced by S + L.",
               b.raw_code(holder_sign=s_plus_l(signer(b.holder))), expected_reason="BAD_SIGNATURE", fails=(8,)),
        vector("bad_holder_signature_r_identity", "Proof signature with R = the identity and S = k·a.",
               b.raw_code(holder_sign=small_order_r(seed=HOLDER_SEED, r_bytes=IDENTITY_POINT)),
               expected_reason="BAD_SIGNATURE", fails=(8,)),
        vector("bad_holder_signature_r_mixed_order", "Proof signature with R = [r]B + T (T of order 8).",
               b.raw_code(holder_sign=mixed_order_r(seed=HOLDER_SEED)), expected_reason="BAD_SIGNATURE", fails=(8,)),
        vector("bad_holder_key_identity",
               "An issuer-signed credential whose holder key is the identity point; the proof is forged "
               "(R = [s]B, S = s) with no private key.",
               b.raw_code(body=b.body(holder_public_key=IDENTITY_POINT),
                          holder_sign=forged_for_small_order_key(IDENTITY_POINT, order=1)),
               expected_reason="BAD_SIGNATURE", fails=(8,)),
        vector("bad_holder_key_order_8", "The holder key is a point of order 8; the forged proof's k is a multiple "
               "of 8.", b.raw_code(body=b.body(holder_public_key=ORDER_8_POINT),
                                   holder_sign=forged_for_small_order_key(ORDER_8_POINT, order=8)),
               expected_reason="BAD_SIGNATURE", fails=(8,)),
        vector("bad_holder_key_mixed_order",
               "The holder key is [a]B + T (T of order 8); the proof verifies under libsodium alone (8 | k).",
               b.raw_code(body=b.body(holder_public_key=mixed_order_key(HOLDER_SEED)),
                          holder_sign=signed_by_mixed_order_key(HOLDER_SEED)),
               expected_reason="BAD_SIGNATURE", fails=(8,)),
        vector("bad_token_signature_s_plus_l", "A token signature's S replaced by S + L.",
               b.raw_token(sign=s_plus_l(signer(b.issuer_a))), expected_reason="BAD_SIGNATURE", fails=(4,)),
        vector("bad_token_signature_r_identity", "A token signature with R = the identity and S = k·a.",
               b.raw_token(sign=small_order_r(seed=ISSUER_A_SEED, r_bytes=IDENTITY_POINT)),
               expected_reason="BAD_SIGNATURE", fails=(4,)),
        # ---- EXPIRED, NOT_YET_VALID ----------------------------------------------------------------
        vector("expired_credential", "The credential's not-after passed 60 s ago.",
               b.code(credential=expired_credential, time_s=NOW_S - 70), expected_reason="EXPIRED", fails=(6,)),
        vector("expired_proof_outside_window", "Proof made 91 s before the scan (a screenshot).",
               b.code(time_s=NOW_S - 91), expected_reason="EXPIRED", fails=(10,)),
        vector("expired_token_slot", "A token whose slot ended exactly 90 s before the scan.",
               b.token_at(NOW_S - 150), now_s=NOW_S - 30, expected_reason="EXPIRED", fails=(10,)),
        vector("not_yet_valid_credential", "The credential starts in 10 minutes.",
               b.code(credential=future_credential, time_s=NOW_S), expected_reason="NOT_YET_VALID", fails=(6,)),
        vector("not_yet_valid_future_proof", "Proof time 31 s after now.", b.code(time_s=NOW_S + 31),
               expected_reason="NOT_YET_VALID", fails=(10,)),
        vector("not_yet_valid_token_slot", "The token for a slot starting in 2 minutes.",
               b.token_at(NOW_S + 120), expected_reason="NOT_YET_VALID", fails=(10,)),
        # ---- REVOKED, WRONG_PURPOSE, REPLAYED ------------------------------------------------------
        vector("revoked_credential", "The credential id is on the revocation list.", valid,
               revocations=Revocations(credential_ids=[cred_id]), expected_reason="REVOKED", fails=(7,)),
        vector("revoked_member", "The member was revoked after this credential's not-before.", valid,
               revocations=Revocations(members={MEMBER: NOW_S - 60}), expected_reason="REVOKED", fails=(7,)),
        vector("revoked_token_batch", "The token batch id is on the revocation list.", token_now,
               revocations=Revocations(credential_ids=[TOKEN_BATCH_ID]), expected_reason="REVOKED", fails=(7,)),
        vector("wrong_purpose_holder", "A PAY code scanned at a gate (ACCESS).", valid, purpose=Purpose.ACCESS,
               expected_reason="WRONG_PURPOSE", fails=(9,)),
        vector("wrong_purpose_not_allowed", "A RIDE proof on a credential allowing PAY and ACCESS only.",
               b.raw_code(time_s=NOW_S, counter=3, purpose_byte=int(Purpose.RIDE)), purpose=Purpose.RIDE,
               expected_reason="WRONG_PURPOSE", fails=(9,)),
        vector("wrong_purpose_token", "A token allowing PAY and RIDE, scanned for CHECK_IN.", token_now,
               purpose=Purpose.CHECK_IN, expected_reason="WRONG_PURPOSE", fails=(9,)),
        vector("replayed_holder_counter", "The same code scanned again 10 s later at the same verifier.", valid,
               now_s=NOW_S + 10, prior_scans=(Scan(valid, NOW_S),), expected_reason="REPLAYED", fails=(11,)),
        vector("replayed_holder_counter_other_proof",
               "A new proof reusing an accepted counter (different time, same counter).",
               b.code(time_s=NOW_S, counter=7), prior_scans=(Scan(valid, NOW_S),), expected_reason="REPLAYED",
               fails=(11,)),
        vector("replayed_token_slot", "The same token scanned twice.", token_now, now_s=NOW_S + 5,
               prior_scans=(Scan(token_now, NOW_S),), expected_reason="REPLAYED", fails=(11,)),
        # ---- a cached credential: only steps 3 and 4 (and the credential's decoding) may be skipped ----
        vector("cached_credential_stale_trust_list",
               "Maximum age 1 h: the credential was accepted at now-3001 (list 10 min old); now the list is "
               "1 h + 1 s old.", b.code(counter=8, time_s=NOW_S), prior_scans=(Scan(b.code(time_s=NOW_S - 3001),
                                                                                    NOW_S - 3001),),
               trust=trust_at(NOW_S - 3601), max_trust_list_age_s=3600, expected_reason="STALE_TRUST_LIST",
               fails=(2,)),
        vector("cached_credential_wrong_tenant",
               "Tenant B's credential was accepted at a tenant-B scan; the same verifier now serves tenant A.",
               b.code(credential=other_credential, counter=8), trust=trust_ab,
               prior_scans=(Scan(b.code(credential=other_credential), NOW_S, tenant=TENANT_B),),
               expected_reason="WRONG_TENANT", fails=(5,)),
        vector("cached_credential_expired_at_not_after",
               "Accepted 60 s ago; now = the credential's not-after.",
               b.raw_code(body=b.body(not_before_s=NOW_S - 3600, not_after_s=NOW_S), counter=8, time_s=NOW_S),
               prior_scans=(Scan(b.raw_code(body=b.body(not_before_s=NOW_S - 3600, not_after_s=NOW_S),
                                            time_s=NOW_S - 60), NOW_S - 60),),
               expected_reason="EXPIRED", fails=(6,)),
        vector("cached_credential_revoked_after_first_scan",
               "Accepted, then its credential id was revoked; the next code of the same credential.",
               b.code(counter=8, time_s=NOW_S), prior_scans=(Scan(valid, NOW_S - 5),),
               revoked_later=Revocations(credential_ids=[cred_id]), expected_reason="REVOKED", fails=(7,)),
        vector("cached_credential_member_revoked_after_first_scan",
               "Accepted, then the member was revoked (at now-5, after the credential's not-before).",
               b.code(counter=8, time_s=NOW_S), prior_scans=(Scan(valid, NOW_S - 5),),
               revoked_later=Revocations(members={MEMBER: NOW_S - 5}), expected_reason="REVOKED", fails=(7,)),
        vector("cached_credential_forged_proof", "Accepted; then a proof of the same credential by another key.",
               b.raw_code(holder=b.other_holder, counter=8, time_s=NOW_S), prior_scans=(Scan(valid, NOW_S - 5),),
               expected_reason="BAD_SIGNATURE", fails=(8,)),
        vector("cached_credential_issuer_signature_s_plus_l",
               "Accepted; then the same credential body with its issuer signature's S + L and a proof made over "
               "those bytes. Cache by the whole 134 bytes: a cache by body or credential id accepts it.",
               b.raw_code(issuer_sign=s_plus_l(signer(b.issuer_a)), counter=8, time_s=NOW_S),
               prior_scans=(Scan(valid, NOW_S - 5),), expected_reason="BAD_SIGNATURE", fails=(4,)),
        vector("cached_credential_issuer_signature_s_plus_l_old_proof",
               "Accepted; then a code of the same credential whose issuer signature's S was replaced by S + L "
               "after the proof was made (the proof covers the original 134 bytes).",
               _s_plus_l_in_issuer_signature(b.code(counter=8, time_s=NOW_S)),
               prior_scans=(Scan(valid, NOW_S - 5),), expected_reason="BAD_SIGNATURE", fails=(4, 8)),
        vector("cached_credential_malformed_proof_purpose", "Accepted; then a proof with purpose byte 0x03.",
               b.raw_code(purpose_byte=0x03, counter=8, time_s=NOW_S), prior_scans=(Scan(valid, NOW_S - 5),),
               expected_reason="MALFORMED", fails=(1,)),
        vector("cached_credential_wrong_purpose", "Accepted for PAY; then an ACCESS proof at the PAY device.",
               b.code(counter=8, time_s=NOW_S, purpose=Purpose.ACCESS), prior_scans=(Scan(valid, NOW_S - 5),),
               expected_reason="WRONG_PURPOSE", fails=(9,)),
        vector("cached_credential_proof_outside_window", "Accepted; then a proof of the same credential 91 s old.",
               b.code(counter=8, time_s=NOW_S - 91), prior_scans=(Scan(valid, NOW_S - 5),),
               expected_reason="EXPIRED", fails=(10,)),
        # ---- two failures at once: the expected reason is the earlier check's ------------------------
        vector("order_1_2_malformed_and_stale", "Proof purpose 0x03 and a stale trust list.", malformed_purpose,
               trust=stale_a, expected_reason="MALFORMED", fails=(1, 2)),
        vector("order_2_3_stale_and_unknown_key", "Tenant B's code and a stale trust list of tenant A's key.",
               b.code(credential=other_credential), trust=stale_a, expected_reason="STALE_TRUST_LIST",
               fails=(2, 3, 4)),
        vector("order_4_5_bad_signature_and_wrong_tenant",
               "Tenant B's credential with S + L in its issuer signature, at tenant A's device trusting both.",
               b.raw_code(issuer=b.issuer_b, body=b.body(key_id=b.issuer_b.key_id),
                          issuer_sign=s_plus_l(signer(b.issuer_b))),
               trust=trust_ab, expected_reason="BAD_SIGNATURE", fails=(4, 5)),
        vector("order_5_6_wrong_tenant_and_expired", "Tenant B's expired credential at tenant A's device.",
               b.code(credential=other_expired_credential, time_s=NOW_S - 70), trust=trust_ab,
               expected_reason="WRONG_TENANT", fails=(5, 6)),
        vector("order_6_7_expired_and_revoked", "An expired credential whose id is revoked.",
               b.code(credential=expired_credential, time_s=NOW_S - 70),
               revocations=Revocations(credential_ids=[expired_credential.credential_id]), expected_reason="EXPIRED",
               fails=(6, 7)),
        vector("order_6_7_not_yet_valid_and_revoked",
               "A credential starting in 10 minutes, its member revoked at its not-before.",
               b.code(credential=future_credential, time_s=NOW_S),
               revocations=Revocations(members={MEMBER: NOW_S + 600}), expected_reason="NOT_YET_VALID", fails=(6, 7)),
        vector("order_7_8_revoked_and_forged_proof", "A revoked credential with a proof by another key.",
               forged_proof, revocations=Revocations(credential_ids=[cred_id]), expected_reason="REVOKED",
               fails=(7, 8)),
        vector("order_8_9_forged_proof_and_wrong_purpose", "A proof by another key, for PAY, at an ACCESS gate.",
               forged_proof, purpose=Purpose.ACCESS, expected_reason="BAD_SIGNATURE", fails=(8, 9)),
        vector("order_9_10_wrong_purpose_and_outside_window", "A PAY proof 91 s old at an ACCESS gate.",
               b.code(time_s=NOW_S - 91), purpose=Purpose.ACCESS, expected_reason="WRONG_PURPOSE", fails=(9, 10)),
        vector("order_10_11_outside_window_and_replayed",
               "Accepted at now-86, when its proof (time now-91) was 5 s old; the same code now: 91 s old and "
               "a replay.",
               b.code(time_s=NOW_S - 91), prior_scans=(Scan(b.code(time_s=NOW_S - 91), NOW_S - 86),),
               expected_reason="EXPIRED", fails=(10, 11)),
        vector("order_6_10_not_yet_valid_and_proof_too_old",
               "A credential starting in 10 minutes and a proof 91 s old.",
               b.code(credential=future_credential, time_s=NOW_S - 91), expected_reason="NOT_YET_VALID",
               fails=(6, 10)),
        vector("order_6_10_expired_and_proof_too_new", "A credential expired 60 s ago and a proof 31 s ahead.",
               b.code(credential=expired_credential, time_s=NOW_S + 31), expected_reason="EXPIRED", fails=(6, 10)),
        vector("order_token_1_2_malformed_and_stale", "A token allowing no purpose, and a stale trust list.",
               b.raw_token(purposes_byte=0), trust=stale_a, expected_reason="MALFORMED", fails=(1, 2)),
        vector("order_token_2_3_stale_and_unknown_key", "Tenant B's token and a stale trust list of tenant A's key.",
               b.raw_token(**b_token), trust=stale_a, expected_reason="STALE_TRUST_LIST", fails=(2, 3, 4)),
        vector("order_token_4_5_bad_signature_and_wrong_tenant",
               "Tenant B's token with S + L in its signature, at tenant A's device trusting both.",
               b.raw_token(**b_token, sign=s_plus_l(signer(b.issuer_b))), trust=trust_ab,
               expected_reason="BAD_SIGNATURE", fails=(4, 5)),
        vector("order_token_5_6_wrong_tenant_and_expired",
               "Tenant B's token of a batch that ended at now, at tenant A's device.",
               b.raw_token(**b_token, **ends_now), trust=trust_ab, expected_reason="WRONG_TENANT", fails=(5, 6)),
        vector("order_token_6_7_expired_and_revoked", "A token of a batch that ended at now, the batch revoked.",
               b.raw_token(credential_id=TOKEN_BATCH_2, **ends_now),
               revocations=Revocations(credential_ids=[TOKEN_BATCH_2]), expected_reason="EXPIRED", fails=(6, 7)),
        vector("order_token_7_9_revoked_and_wrong_purpose", "A revoked batch's token scanned for CHECK_IN.",
               token_now, revocations=Revocations(credential_ids=[TOKEN_BATCH_ID]), purpose=Purpose.CHECK_IN,
               expected_reason="REVOKED", fails=(7, 9)),
        vector("order_token_9_10_wrong_purpose_and_outside_window",
               "A token whose slot ended 90 s ago, scanned for CHECK_IN.", b.token_at(NOW_S - 150),
               now_s=NOW_S - 30, purpose=Purpose.CHECK_IN, expected_reason="WRONG_PURPOSE", fails=(9, 10)),
        vector("order_token_10_11_outside_window_and_replayed",
               "Accepted in its slot; scanned again 90 s after the slot ended.", b.token_at(NOW_S - 60),
               now_s=NOW_S + 90, prior_scans=(Scan(b.token_at(NOW_S - 60), NOW_S - 30),), expected_reason="EXPIRED",
               fails=(10, 11)),
    ]
    names = [v["name"] for v in vectors]
    assert len(names) == len(set(names)), "vector names must be unique"
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
