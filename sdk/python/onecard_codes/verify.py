"""The verifier: any string or bytes in, ``Verified`` or ``Rejected`` out, never an exception.

Checks, in this order (the first failure is the answer; the order is part of the format doc):

 1. decode               MALFORMED          prefix, Base45, version, kind, length, field ranges
 2. trust list age       STALE_TRUST_LIST   now - fetched_at > max_trust_list_age_s
 3. key id               UNKNOWN_KEY        no trusted key has the code's key id
 4. issuer signature     BAD_SIGNATURE      no trusted key with that id verifies it (strictly, doc §4.4)
 5. tenant               WRONG_TENANT       the key that verified is another tenant's
 6. validity             NOT_YET_VALID / EXPIRED   now outside [not_before, not_after)
 7. revocation           REVOKED            credential id, or member revoked at or after not_before
 8. holder signature     BAD_SIGNATURE      (holder codes) the proof does not verify
 9. purpose              WRONG_PURPOSE      not allowed by the credential, or the proof names another
10. clock window         EXPIRED / NOT_YET_VALID   proof time (token slot) outside now + window
11. replay               REPLAYED           (credential id, counter or sequence) seen, live while now <= expiry

Decoding the credential and steps 3-4 run once per credential: one that passed them is kept in a
bounded LRU keyed by its whole text (issuer signature included), with its holder key's validity,
so a credential seen before costs one signature check (step 8). Every other step runs on every
scan, cached or not (format doc §6). Signatures are checked strictly (format doc §4.4): libsodium
refuses non-canonical S and small-order R and keys, and keys must also be of prime order
(``keys.is_valid_public_key``). All time arithmetic is Python's, so nothing wraps (doc §0). A
verifier is not thread-safe (its caches and signature buffer are unguarded); use one per scanning
thread.
"""
from __future__ import annotations

import hashlib
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

from nacl._sodium import ffi, lib

from onecard_codes.errors import MalformedCode
from onecard_codes.format import (
    CREDENTIAL_BODY,
    FORMAT_VERSION,
    HEADER,
    KIND_HOLDER,
    HOLDER_HEAD_CHARS,
    HOLDER_TEXT_CHARS,
    MAX_TEXT_CHARS,
    PROOF_FIELDS,
    PROOF_TAG,
    SIGNATURE_BYTES,
    TEXT_PREFIX,
    TOKEN_TEXT_CHARS,
    Credential,
    RotatingToken,
    b45decode,
    credential_id_for,
    decode_binary,
    parse_credential,
    purpose_from_byte,
)
from onecard_codes.keys import Revocations, TrustedKey, TrustList, is_valid_public_key
from onecard_codes.result import CodeKind, OfflineCaps, Purpose, Reason, Rejected, Verified

DEFAULT_CLOCK_WINDOW_S = (-90, 30)
# A device offline for a week still accepts codes; past that it must fetch keys again.
DEFAULT_MAX_TRUST_LIST_AGE_S = 7 * 24 * 3600
DEFAULT_CREDENTIAL_CACHE_ENTRIES = 4096
DEFAULT_REPLAY_CACHE_ENTRIES = 65_536
# Replay entries outlive the clock window by this much, so a verifier clock stepping back a little
# cannot make a used code look new.
DEFAULT_REPLAY_MARGIN_S = 60
_PREFIX_CHARS = len(TEXT_PREFIX)
_PROOF_START_CHARS = _PREFIX_CHARS + HOLDER_HEAD_CHARS
_SM_BYTES = SIGNATURE_BYTES + len(PROOF_TAG) + 32 + PROOF_FIELDS.size


class ReplayCache:
    """Codes already accepted, each remembered until it could no longer pass the clock window.

    Keys are (credential id, counter) for holder codes and (credential id, sequence) for tokens.
    An entry is live up to and including its expiry second (``now_s <= expires_at_s``): with no
    margin, a holder code is still inside the clock window at exactly that second, so an exclusive
    end would accept it twice.
    The rule: an exact key seen before and still live is a replay; any other counter is accepted,
    higher or lower than those seen, so scans that arrive out of order (a slow reader, caches
    merged from several readers) are not refused, while each displayed code is accepted once.
    Bounded: expired entries go first; if ``max_entries`` live entries are held the oldest is
    dropped and counted in ``evicted_live`` (size it above the scans one device sees in a window).
    """

    def __init__(self, *, max_entries: int = DEFAULT_REPLAY_CACHE_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.max_entries = max_entries
        self.evicted_live = 0
        self._expiry_s: OrderedDict[tuple[bytes, int], int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._expiry_s)

    def check_and_record(self, key: tuple[bytes, int], *, expires_at_s: int, now_s: int) -> bool:
        """True (and recorded) if ``key`` is not live in the cache; False for a replay."""
        entries = self._expiry_s
        previous_s = entries.get(key)
        if previous_s is not None:
            if previous_s >= now_s:
                return False
            del entries[key]
        # Insertion order is close to expiry order, so dropping expired entries from the front
        # keeps the cache small at O(1) amortised per insert.
        for oldest in entries:
            if entries[oldest] < now_s:
                entries.popitem(last=False)
                while entries:
                    oldest = next(iter(entries))
                    if entries[oldest] >= now_s:
                        break
                    entries.popitem(last=False)
            break
        if len(entries) >= self.max_entries:
            entries.popitem(last=False)
            self.evicted_live += 1
        entries[key] = expires_at_s
        return True


class _CachedCredential(NamedTuple):
    """A credential whose issuer signature verified, with everything the warm path needs."""

    tenant_id: uuid.UUID
    member_id: uuid.UUID
    credential_id: uuid.UUID
    credential_id_bytes: bytes
    member_id_bytes: bytes
    holder_public_key: bytes
    holder_key_usable: bool  # checked once here, so the warm path pays nothing for it
    not_before_s: int
    not_after_s: int
    caps: OfflineCaps
    purposes: int
    proof_prefix: bytes  # PROOF_TAG + SHA-256(credential): the start of the holder's signed message
    key_id: bytes


def _tenant_uuid(value: object) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise TypeError(f"expected_tenant_id must be a UUID, got {value!r}") from None


def _reject(reason: Reason, detail: str) -> Rejected:
    return Rejected(reason, detail)


class Verifier:
    """Verify OC1 codes offline against a trust list, revocations and a replay cache.

    ``clock_window_s=(low, high)``: a holder proof's time minus now must be within [low, high]
    (default −90 s/+30 s); a token's slot must overlap [now + low, now + high].
    """

    def __init__(self, *, trust_list: TrustList, revocations: Revocations | None = None,
                 replay_cache: ReplayCache | None = None,
                 clock_window_s: tuple[int, int] = DEFAULT_CLOCK_WINDOW_S,
                 max_trust_list_age_s: int = DEFAULT_MAX_TRUST_LIST_AGE_S,
                 credential_cache_entries: int = DEFAULT_CREDENTIAL_CACHE_ENTRIES,
                 replay_margin_s: int = DEFAULT_REPLAY_MARGIN_S) -> None:
        low_s, high_s = clock_window_s
        if not low_s <= 0 <= high_s:
            raise ValueError(f"clock_window_s must contain 0, got {clock_window_s}")
        if credential_cache_entries < 1 or max_trust_list_age_s < 0 or replay_margin_s < 0:
            raise ValueError("cache sizes must be positive and ages non-negative")
        self.trust_list = trust_list
        self.revocations = revocations if revocations is not None else Revocations()
        self.replay_cache = replay_cache if replay_cache is not None else ReplayCache()
        self.clock_window_s = (low_s, high_s)
        self.max_trust_list_age_s = max_trust_list_age_s
        self.credential_cache_entries = credential_cache_entries
        self._replay_keep_s = -low_s + replay_margin_s
        self._credentials: OrderedDict[str, _CachedCredential] = OrderedDict()
        # libsodium's open() writes the message out; one buffer reused by every check saves an
        # allocation per scan (hence one verifier per thread).
        self._opened = ffi.new("unsigned char[]", _SM_BYTES)
        self._opened_len = ffi.new("unsigned long long *")

    def replace_trust_list(self, trust_list: TrustList) -> None:
        """Install a newly fetched trust list; cached credentials are checked again against it."""
        self.trust_list = trust_list
        self._credentials.clear()

    def _signature_ok(self, signature: bytes, message: bytes, public_key: bytes) -> bool:
        signed = signature + message
        return lib.crypto_sign_open(self._opened, self._opened_len, signed, len(signed), public_key) == 0

    def verify(self, code_text: str | bytes, *, now_s: int, expected_tenant_id: uuid.UUID,
               purpose: Purpose) -> Verified | Rejected:
        """Verify one scanned code at ``now_s`` for ``expected_tenant_id`` and ``purpose``.

        Accepted codes are recorded in the replay cache. Never raises for any ``code_text``; a
        tenant id that is not a UUID (or its string form) is the caller's bug and raises TypeError.
        """
        if type(expected_tenant_id) is not uuid.UUID:
            expected_tenant_id = _tenant_uuid(expected_tenant_id)
        try:
            return self._verify(code_text, now_s, expected_tenant_id, purpose)
        except MalformedCode as exc:
            return _reject(Reason.MALFORMED, str(exc))
        except Exception as exc:  # the contract is a typed answer for any input; refuse, never crash
            return _reject(Reason.MALFORMED, f"internal error: {type(exc).__name__}")

    def _verify(self, code_text: str | bytes, now_s: int, expected_tenant_id: uuid.UUID,
                purpose: Purpose) -> Verified | Rejected:
        if type(code_text) is not str:
            if not isinstance(code_text, (bytes, bytearray, memoryview)) or len(code_text) > MAX_TEXT_CHARS:
                return _reject(Reason.MALFORMED, "a code is text of at most 320 characters")
            try:
                code_text = bytes(code_text).decode("ascii")
            except UnicodeDecodeError:
                return _reject(Reason.MALFORMED, "not ASCII")
        if not code_text.startswith(TEXT_PREFIX):
            return _reject(Reason.MALFORMED, f"does not start with {TEXT_PREFIX!r}")
        length = len(code_text)
        if length == HOLDER_TEXT_CHARS:
            return self._verify_holder(code_text, now_s, expected_tenant_id, purpose)
        if length == TOKEN_TEXT_CHARS:
            return self._verify_token(code_text, now_s, expected_tenant_id, purpose)
        return _reject(Reason.MALFORMED, f"{length} characters is the length of neither kind of code")

    def _verify_holder(self, code_text: str, now_s: int, expected_tenant_id: uuid.UUID,
                       purpose: Purpose) -> Verified | Rejected:
        head = code_text[_PREFIX_CHARS:_PROOF_START_CHARS]
        cached = self._credentials.get(head)
        proof = b45decode(code_text[_PROOF_START_CHARS:])
        proof_purpose = proof[PROOF_FIELDS.size - 1]
        if proof_purpose not in _SINGLE_PURPOSES:
            purpose_from_byte(proof_purpose)
        if cached is None:
            # Step 1 for a credential not seen before: the full strict parse (a cached one was).
            head_bytes = b45decode(head)
            if head_bytes[0] != FORMAT_VERSION or head_bytes[1] != KIND_HOLDER:
                decode_binary(head_bytes + proof)
                return _reject(Reason.MALFORMED, "a token's kind in a holder code's length")
            credential = parse_credential(head_bytes[HEADER.size:])
        else:
            self._credentials.move_to_end(head)
        if now_s - self.trust_list.fetched_at_s > self.max_trust_list_age_s:
            return _reject(Reason.STALE_TRUST_LIST, "trust list older than its maximum age")
        if cached is None:
            admitted = self._admit_credential(credential)
            if type(admitted) is Rejected:
                return admitted
            cached = admitted
            self._credentials[head] = cached
            if len(self._credentials) > self.credential_cache_entries:
                self._credentials.popitem(last=False)
        if cached.tenant_id != expected_tenant_id:
            return _reject(Reason.WRONG_TENANT, "signed by another tenant's key")
        if now_s < cached.not_before_s:
            return _reject(Reason.NOT_YET_VALID, "credential not yet valid")
        if now_s >= cached.not_after_s:
            return _reject(Reason.EXPIRED, "credential expired")
        if self.revocations.is_revoked(credential_id=cached.credential_id_bytes, member_id=cached.member_id_bytes,
                                       not_before_s=cached.not_before_s):
            return _reject(Reason.REVOKED, "credential revoked")
        if not cached.holder_key_usable:
            return _reject(Reason.BAD_SIGNATURE, "holder public key is not a valid Ed25519 key")
        signed = proof[PROOF_FIELDS.size:] + cached.proof_prefix + proof[:PROOF_FIELDS.size]
        if lib.crypto_sign_open(self._opened, self._opened_len, signed, _SM_BYTES, cached.holder_public_key) != 0:
            return _reject(Reason.BAD_SIGNATURE, "holder proof signature does not verify")
        if proof_purpose != purpose or not proof_purpose & cached.purposes:
            return _reject(Reason.WRONG_PURPOSE, "code made for another purpose")
        time_s, counter, _ = PROOF_FIELDS.unpack_from(proof)
        low_s, high_s = self.clock_window_s
        offset_s = time_s - now_s
        if offset_s < low_s:
            return _reject(Reason.EXPIRED, "code older than the clock window")
        if offset_s > high_s:
            return _reject(Reason.NOT_YET_VALID, "code from the future beyond the clock window")
        if not self.replay_cache.check_and_record((cached.credential_id_bytes, counter),
                                                  expires_at_s=time_s + self._replay_keep_s, now_s=now_s):
            return _reject(Reason.REPLAYED, "this credential's counter was already used")
        return Verified(CodeKind.HOLDER, cached.tenant_id, cached.member_id, cached.credential_id,
                        _SINGLE_PURPOSES[proof_purpose], cached.caps, time_s, counter, cached.not_after_s,
                        cached.key_id)

    def _find_issuer(self, key_id: bytes, signature: bytes,
                     message_for: Callable[[bytes], bytes]) -> TrustedKey | Rejected:
        candidates = self.trust_list.candidates(key_id)
        if not candidates:
            return _reject(Reason.UNKNOWN_KEY, f"no trusted key with id {key_id.hex()}")
        for key in candidates:
            if key.usable and self._signature_ok(signature, message_for(key.tenant_id.bytes), key.public_key):
                return key
        if not any(key.usable for key in candidates):
            return _reject(Reason.BAD_SIGNATURE, "the trusted key with this id is not a valid Ed25519 key")
        return _reject(Reason.BAD_SIGNATURE, "issuer signature does not verify")

    def _admit_credential(self, credential: Credential) -> _CachedCredential | Rejected:
        body = credential.raw[:CREDENTIAL_BODY.size]
        issuer = self._find_issuer(credential.key_id, credential.issuer_signature,
                                   lambda tenant: credential.signed_message(tenant_id=tenant))
        if type(issuer) is Rejected:
            return issuer
        credential_id = credential_id_for(tenant_id=issuer.tenant_id.bytes, body=body)
        return _CachedCredential(
            tenant_id=issuer.tenant_id, member_id=uuid.UUID(bytes=credential.member_id),
            credential_id=uuid.UUID(bytes=credential_id), credential_id_bytes=credential_id,
            member_id_bytes=credential.member_id, holder_public_key=credential.holder_public_key,
            holder_key_usable=is_valid_public_key(credential.holder_public_key),
            not_before_s=credential.not_before_s, not_after_s=credential.not_after_s, caps=credential.caps,
            purposes=int(credential.purposes), proof_prefix=PROOF_TAG + hashlib.sha256(credential.raw).digest(),
            key_id=credential.key_id,
        )

    def _verify_token(self, code_text: str, now_s: int, expected_tenant_id: uuid.UUID,
                      purpose: Purpose) -> Verified | Rejected:
        token = decode_binary(b45decode(code_text[_PREFIX_CHARS:]))
        if type(token) is not RotatingToken:
            return _reject(Reason.MALFORMED, "a holder code's kind in a token's length")
        if now_s - self.trust_list.fetched_at_s > self.max_trust_list_age_s:
            return _reject(Reason.STALE_TRUST_LIST, "trust list older than its maximum age")
        issuer = self._find_issuer(token.key_id, token.issuer_signature,
                                   lambda tenant: token.signed_message(tenant_id=tenant))
        if type(issuer) is Rejected:
            return issuer
        if issuer.tenant_id != expected_tenant_id:
            return _reject(Reason.WRONG_TENANT, "signed by another tenant's key")
        if now_s < token.not_before_s:
            return _reject(Reason.NOT_YET_VALID, "token batch not yet valid")
        if now_s >= token.not_after_s:
            return _reject(Reason.EXPIRED, "token batch expired")
        if self.revocations.is_revoked(credential_id=token.credential_id, member_id=token.member_id,
                                       not_before_s=token.not_before_s):
            return _reject(Reason.REVOKED, "token batch revoked")
        if not purpose & token.purposes or purpose not in _SINGLE_PURPOSES.values():
            return _reject(Reason.WRONG_PURPOSE, "token not valid for this purpose")
        low_s, high_s = self.clock_window_s
        if token.slot_start_s > now_s + high_s:
            return _reject(Reason.NOT_YET_VALID, "token slot has not started")
        if token.slot_end_s <= now_s + low_s:
            return _reject(Reason.EXPIRED, "token slot is over")
        if not self.replay_cache.check_and_record((token.credential_id, token.sequence),
                                                  expires_at_s=token.slot_end_s + self._replay_keep_s, now_s=now_s):
            return _reject(Reason.REPLAYED, "this token was already used")
        return Verified(CodeKind.TOKEN, issuer.tenant_id, uuid.UUID(bytes=token.member_id),
                        uuid.UUID(bytes=token.credential_id), purpose, token.caps, token.slot_start_s, token.sequence,
                        token.not_after_s, token.key_id)


_SINGLE_PURPOSES: dict[int, Purpose] = {int(p): p for p in (Purpose.PAY, Purpose.ACCESS, Purpose.RIDE,
                                                            Purpose.CHECK_IN)}
