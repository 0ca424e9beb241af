"""A minimal OC1 verifier written from docs/code-format.md alone, as a device maker would.

It imports nothing of ``onecard_codes``: strict Base45, the two layouts, Ed25519 (pure Python:
RFC 8032 arithmetic with the rules of §4.4) and the eleven checks of §6 are all here, each
citing its section. It is slow (a signature check takes milliseconds) and keeps no bounds,
which a vector run does not need.

``Reading`` is how a verifier reads the doc. Its defaults are the doc's rules; every other
setting is a plausible misreading (an inclusive end, 32-bit sums, a lax Ed25519, another order
of checks ...), so tests can show that the vectors tell each misreading apart.

Every check is evaluated whenever its inputs exist, then the first failure in ``Reading.order``
is the answer. With the doc's order that is exactly "stop at the first failure"; other orders
model a verifier that checks in another order; and the set of failures is what the vectors'
``fails_checks`` lists.
"""
from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, NamedTuple

# ---- Ed25519 arithmetic (RFC 8032 §5.1) -----------------------------------------------------------

P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493
D = -121665 * pow(121666, P - 2, P) % P
SQRT_M1 = pow(2, (P - 1) // 4, P)
IDENTITY = (0, 1, 1, 0)
Point = tuple[int, int, int, int]  # extended coordinates (X, Y, Z, T), x = X/Z, y = Y/Z, xy = T/Z


def _add(p1: Point, p2: Point) -> Point:
    x1, y1, z1, t1 = p1
    x2, y2, z2, t2 = p2
    a = (y1 - x1) * (y2 - x2) % P
    b = (y1 + x1) * (y2 + x2) % P
    c = 2 * t1 * t2 * D % P
    d = 2 * z1 * z2 % P
    e, f, g, h = b - a, d - c, d + c, b + a
    return e * f % P, g * h % P, f * g % P, e * h % P


def _neg(point: Point) -> Point:
    x, y, z, t = point
    return -x % P, y, z, -t % P


def _mul(scalar: int, point: Point) -> Point:
    result = IDENTITY
    while scalar:
        if scalar & 1:
            result = _add(result, point)
        point = _add(point, point)
        scalar >>= 1
    return result


def _equal(p1: Point, p2: Point) -> bool:
    return (p1[0] * p2[2] - p2[0] * p1[2]) % P == 0 and (p1[1] * p2[2] - p2[1] * p1[2]) % P == 0


def _x_for(y: int, sign: int) -> int | None:
    x2 = (y * y - 1) * pow(D * y * y + 1, P - 2, P) % P
    if x2 == 0:
        return 0 if sign == 0 else None
    x = pow(x2, (P + 3) // 8, P)
    if (x * x - x2) % P:
        x = x * SQRT_M1 % P
    if (x * x - x2) % P:
        return None
    return P - x if (x & 1) != sign else x


@lru_cache(maxsize=4096)
def decode_point(encoded: bytes, *, lenient: bool = False) -> Point | None:
    """RFC 8032 §5.1.3: fails for y ≥ p, for a y with no x, and for x = 0 with the sign bit set.
    ``lenient`` (a misreading) reduces y mod p and ignores the sign of x = 0."""
    value = int.from_bytes(encoded, "little")
    sign, y = value >> 255, value & ((1 << 255) - 1)
    if y >= P:
        if not lenient:
            return None
        y -= P
    x = _x_for(y, sign)
    if x is None and lenient:
        x = _x_for(y, 0)
        x = 0 if x == 0 else None
    if x is None:
        return None
    return x, y, 1, x * y % P


def encode_point(point: Point) -> bytes:
    z_inv = pow(point[2], P - 2, P)
    x, y = point[0] * z_inv % P, point[1] * z_inv % P
    return (y | ((x & 1) << 255)).to_bytes(32, "little")


_BY = 4 * pow(5, P - 2, P) % P
BASE = (_x_for(_BY, 0), _BY, 1, _x_for(_BY, 0) * _BY % P)
SMALL_ORDER_ENCODINGS = frozenset(encode_point(_mul(i, decode_point(bytes.fromhex(
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a")))) for i in range(8))


@lru_cache(maxsize=4096)
def _small_order(point: Point) -> bool:
    return _equal(_mul(8, point), IDENTITY)


@lru_cache(maxsize=4096)
def _order_l(point: Point) -> bool:
    return _equal(_mul(L, point), IDENTITY) and not _equal(point, IDENTITY)


@lru_cache(maxsize=None)
def _base_times(scalar: int) -> Point:
    return _mul(scalar, BASE)


@dataclass(frozen=True)
class Ed25519Reading:
    """§4.4 and the ways a verifier may read RFC 8032 more loosely."""

    s_reduced_mod_l: bool = False          # rule 1 read as "S mod L"
    any_key: bool = False                   # rule 2 skipped: no small-order or subgroup check on A
    small_order_keys_by_list: bool = False  # rule 2 as "not one of the 8 canonical small-order encodings"
    libsodium_keys: bool = False            # rule 2 without the [L]A check (libsodium's verify alone)
    small_order_r: bool = False             # rule 3 skipped
    lenient_decoding: bool = False          # y reduced mod p; x = 0 of either sign
    compare_points: bool = False            # rule 5 as a point equality, not bytes
    cofactored: bool = False                # rule 5 as [8][S]B = [8]R + [8][k]A


@lru_cache(maxsize=None)
def ed25519_verify(public_key: bytes, message: bytes, signature: bytes, reading: Ed25519Reading) -> bool:
    """§4.4: true iff rules 1-5 hold."""
    if len(public_key) != 32 or len(signature) != 64:
        return False
    r_bytes, s = signature[:32], int.from_bytes(signature[32:], "little")
    if s >= L:  # rule 1
        if not reading.s_reduced_mod_l:
            return False
        s %= L
    a_point = decode_point(public_key, lenient=reading.lenient_decoding)  # rule 2
    if a_point is None:
        return False
    if reading.small_order_keys_by_list:
        if public_key in SMALL_ORDER_ENCODINGS:
            return False
    elif not reading.any_key:
        if _small_order(a_point) or not (reading.libsodium_keys or _order_l(a_point)):
            return False
    r_point = decode_point(r_bytes, lenient=reading.lenient_decoding)  # rule 3
    if r_point is None:
        return False
    if not reading.small_order_r and _small_order(r_point):
        return False
    k = int.from_bytes(hashlib.sha512(r_bytes + public_key + message).digest(), "little") % L  # rule 4
    if reading.cofactored:
        return _equal(_mul(8, _base_times(s)), _mul(8, _add(r_point, _mul(k, a_point))))
    check = _add(_base_times(s), _neg(_mul(k, a_point)))  # rule 5
    return _equal(check, r_point) if reading.compare_points else encode_point(check) == r_bytes


# ---- Base45 (§2) ------------------------------------------------------------------------------------

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ $%*+-./:"


def b45decode(text: str) -> bytes | None:
    """Strict RFC 9285: only the 45 characters, every group in range; None if not."""
    if any(ch not in ALPHABET for ch in text) or len(text) % 3 == 1:
        return None
    out = bytearray()
    for i in range(0, len(text), 3):
        chunk = [ALPHABET.index(ch) for ch in text[i:i + 3]]
        if len(chunk) == 3:
            n = chunk[0] + 45 * chunk[1] + 2025 * chunk[2]
            if n > 0xFFFF:
                return None
            out += n.to_bytes(2, "big")
        else:
            n = chunk[0] + 45 * chunk[1]
            if n > 0xFF:
                return None
            out.append(n)
    return bytes(out)


# ---- how a verifier reads the doc -----------------------------------------------------------------

DOC_ORDER = tuple(range(1, 12))
WRAPPABLE = frozenset({"validity_span", "slot_end", "age", "window", "replay_expiry"})


@dataclass(frozen=True)
class Reading:
    """The doc's rules by default; any other value is a misreading a vector must catch."""

    order: tuple[int, ...] = DOC_ORDER
    wrap32: frozenset[str] = frozenset()       # these time sums (§0) computed in uint32
    ed25519: Ed25519Reading = field(default_factory=Ed25519Reading)
    purposes_zero_allowed: bool = False
    purposes_reserved_bits_allowed: bool = False
    proof_purpose_any_bits: bool = False
    kind_from_length: bool = False             # §3: the kind byte, not the length, decides
    version_unchecked: bool = False
    trailing_bytes_ignored: bool = False
    token_sequence_checked: bool = False       # §3.2: must not be
    min_slot_length_10: bool = False           # §3.2: verifiers require >= 1 only
    first_key_only: bool = False               # §5: try every entry with the key id
    stale_at_max_age: bool = False             # §5: age > max is stale, = is not
    not_before_exclusive: bool = False
    not_after_inclusive: bool = False
    proof_time_within_validity: bool = False   # §6: the proof time meets the window only
    revocation_strict: bool = False            # §7: not_before <= revoked_at
    window_ends_excluded: bool = False         # §6: both ends of the holder window accepted
    token_slot_end_in_window: bool = False     # §6: a slot ending at now + low is expired
    replay_end_exclusive: bool = False         # §8: live while now <= expires_at
    cache_key: str | None = None               # None, "head" (§6), or by "body" / "body_rehash" (misreadings)
    cached_skips: frozenset[int] = frozenset()  # checks a cached credential skips besides 3 and 4


# ---- the layouts (§3) -----------------------------------------------------------------------------

class Code(NamedTuple):
    kind: str
    key_id: bytes
    member_id: bytes
    not_before_s: int
    not_after_s: int
    caps: dict[str, int]
    purposes: int
    signed_part: bytes        # credential body (holder) or token bytes 2..65
    issuer_signature: bytes
    head: bytes               # holder: header + the 134 credential bytes
    holder_public_key: bytes = b""
    time_s: int = 0
    counter: int = 0
    proof_purpose: int = 0
    holder_signature: bytes = b""
    credential_id: bytes = b""  # tokens carry it
    slot_start_s: int = 0
    slot_length_s: int = 0
    sequence: int = 0


U32 = 1 << 32


def _sum(reading: Reading, what: str, *terms: int) -> int:
    """A time sum (§0): int64 by the doc; wrapped to uint32 by a misreading."""
    total = sum(terms)
    return total % U32 if what in reading.wrap32 else total


def _u(data: bytes, at: int, size: int) -> int:
    return int.from_bytes(data[at:at + size], "big")


def decode(text: Any, reading: Reading) -> Code | None:
    """Step 1: §2 text form, §3 layout, §3.4 structural checks. None is MALFORMED."""
    if not isinstance(text, str) or len(text) > 320 or not text.startswith("OC1:"):
        return None
    data = b45decode(text[4:])
    if data is None or len(data) < 2 or (data[0] != 0x01 and not reading.version_unchecked):
        return None
    kind = data[1]
    if reading.kind_from_length:
        kind = {209: 0x01, 130: 0x02}.get(len(data), kind)
    expected_length = {0x01: 209, 0x02: 130}.get(kind)
    if expected_length is None or len(data) < expected_length:
        return None
    if len(data) > expected_length:
        if not reading.trailing_bytes_ignored:
            return None
        data = data[:expected_length]
    if kind == 0x01:
        code = Code(kind="holder", key_id=data[2:6], member_id=data[6:22], holder_public_key=data[22:54],
                    not_before_s=_u(data, 54, 4), not_after_s=_u(data, 58, 4),
                    caps={"per_transaction_fen": _u(data, 62, 4), "per_day_fen": _u(data, 66, 4),
                          "count_per_day": data[70]},
                    purposes=data[71], signed_part=data[2:72], issuer_signature=data[72:136], head=data[:136],
                    time_s=_u(data, 136, 4), counter=_u(data, 140, 4), proof_purpose=data[144],
                    holder_signature=data[145:209])
        max_span_s = 72 * 3600
        if code.proof_purpose not in (1, 2, 4, 8) and not (reading.proof_purpose_any_bits and code.proof_purpose):
            return None
    else:
        code = Code(kind="token", key_id=data[2:6], credential_id=data[6:22], member_id=data[22:38],
                    not_before_s=_u(data, 38, 4), not_after_s=_u(data, 42, 4),
                    caps={"per_transaction_fen": _u(data, 46, 4), "per_day_fen": _u(data, 50, 4),
                          "count_per_day": data[54]},
                    purposes=data[55], slot_start_s=_u(data, 56, 4), slot_length_s=_u(data, 60, 2),
                    sequence=_u(data, 62, 4), signed_part=data[2:66], issuer_signature=data[66:130], head=b"")
        max_span_s = 24 * 3600
        slot_end_s = _sum(reading, "slot_end", code.slot_start_s, code.slot_length_s)
        if (code.slot_length_s < (10 if reading.min_slot_length_10 else 1) or code.slot_start_s < code.not_before_s
                or slot_end_s > code.not_after_s):
            return None
        if reading.token_sequence_checked:
            offset_s = code.slot_start_s - code.not_before_s
            if offset_s % code.slot_length_s or offset_s // code.slot_length_s != code.sequence:
                return None
    if code.not_after_s <= code.not_before_s:
        return None
    if code.not_after_s > _sum(reading, "validity_span", code.not_before_s, max_span_s):
        return None
    if code.purposes == 0 and not reading.purposes_zero_allowed:
        return None
    if code.purposes & 0xF0 and not reading.purposes_reserved_bits_allowed:
        return None
    return code


# ---- the verifier (§5-§8) -------------------------------------------------------------------------

class TrustEntry(NamedTuple):
    tenant_id: bytes
    public_key: bytes


class Cached(NamedTuple):
    issuer: TrustEntry
    credential_hash: bytes


@dataclass
class DocVerifier:
    trust: list[TrustEntry]
    fetched_at_s: int
    max_trust_list_age_s: int
    clock_window_s: tuple[int, int]
    replay_margin_s: int
    revoked_credentials: set[bytes]
    revoked_members: dict[bytes, int]
    reading: Reading = field(default_factory=Reading)
    replay: dict[tuple[bytes, int], int] = field(default_factory=dict)
    cache: dict[bytes, Cached] = field(default_factory=dict)

    def revoke_member(self, member_id: bytes, revoked_at_s: int) -> None:
        self.revoked_members[member_id] = max(revoked_at_s, self.revoked_members.get(member_id, -1))

    def checks(self, text: Any, *, now_s: int, tenant_id: bytes, purpose: int) -> tuple[dict[int, str], Any]:
        """Every check that can be evaluated, as {step: reason} for those that fail (§6)."""
        reading, ed = self.reading, self.reading.ed25519
        failed: dict[int, str] = {}
        age_s = _sum(reading, "age", now_s, -self.fetched_at_s)
        if age_s > self.max_trust_list_age_s or (reading.stale_at_max_age and age_s == self.max_trust_list_age_s):
            failed[2] = "STALE_TRUST_LIST"
        code = decode(text, reading)
        if code is None:
            failed[1] = "MALFORMED"
            return failed, None
        low_s, high_s = self.clock_window_s

        def issuer_message(entry: TrustEntry) -> bytes:
            tag = b"OC1:CRED" if code.kind == "holder" else b"OC1:TOKN"
            return tag + entry.tenant_id + code.signed_part

        cache_key = {"head": code.head, "body": code.signed_part,
                     "body_rehash": code.signed_part}.get(reading.cache_key) if code.head else None
        cached = self.cache.get(cache_key) if cache_key is not None else None
        skipped = {3, 4} | set(reading.cached_skips) if cached else set()
        candidates = [entry for entry in self.trust if hashlib.sha256(entry.public_key).digest()[:4] == code.key_id]
        if reading.first_key_only:
            candidates = candidates[:1]
        if cached:
            issuer, credential_hash = cached.issuer, cached.credential_hash
            if reading.cache_key == "body_rehash":
                credential_hash = hashlib.sha256(code.head[2:]).digest()
        else:
            if not candidates:
                failed[3] = "UNKNOWN_KEY"
            issuer = next((entry for entry in candidates
                           if ed25519_verify(entry.public_key, issuer_message(entry), code.issuer_signature, ed)), None)
            if issuer is None:
                failed[4] = "BAD_SIGNATURE"
            credential_hash = hashlib.sha256(code.head[2:]).digest()
            if issuer is not None and cache_key is not None:
                self.cache[cache_key] = Cached(issuer, credential_hash)
        # Step 5: the tenant of the entry that verified; a verifier checking it before the
        # signature can only look at the entries with the key id.
        if issuer is not None:
            if issuer.tenant_id != tenant_id:
                failed[5] = "WRONG_TENANT"
        elif candidates and all(entry.tenant_id != tenant_id for entry in candidates):
            failed[5] = "WRONG_TENANT"
        if code.kind == "holder":
            signer_tenant = issuer.tenant_id if issuer is not None else tenant_id
            credential_id = hashlib.sha256(b"OC1:CRED" + signer_tenant + code.signed_part).digest()[:16]
        else:
            credential_id = code.credential_id
        not_before_ok = now_s > code.not_before_s if reading.not_before_exclusive else now_s >= code.not_before_s
        not_after_ok = now_s <= code.not_after_s if reading.not_after_inclusive else now_s < code.not_after_s
        if not not_before_ok:
            failed[6] = "NOT_YET_VALID"
        elif not not_after_ok:
            failed[6] = "EXPIRED"
        elif reading.proof_time_within_validity and code.kind == "holder" and not (
                code.not_before_s <= code.time_s < code.not_after_s):
            failed[6] = "NOT_YET_VALID" if code.time_s < code.not_before_s else "EXPIRED"
        revoked_at_s = self.revoked_members.get(code.member_id)
        member_revoked = revoked_at_s is not None and (code.not_before_s < revoked_at_s if reading.revocation_strict
                                                       else code.not_before_s <= revoked_at_s)
        if credential_id in self.revoked_credentials or member_revoked:
            failed[7] = "REVOKED"
        if code.kind == "holder":
            proof_message = (b"OC1:PROF" + credential_hash + code.time_s.to_bytes(4, "big")
                             + code.counter.to_bytes(4, "big") + bytes([code.proof_purpose]))
            if not ed25519_verify(code.holder_public_key, proof_message, code.holder_signature, ed):
                failed[8] = "BAD_SIGNATURE"
        if not purpose & code.purposes or (code.kind == "holder" and code.proof_purpose != purpose):
            failed[9] = "WRONG_PURPOSE"
        window_low_s = _sum(reading, "window", now_s, low_s)
        window_high_s = _sum(reading, "window", now_s, high_s)
        if code.kind == "holder":
            too_old = code.time_s <= window_low_s if reading.window_ends_excluded else code.time_s < window_low_s
            too_new = code.time_s >= window_high_s if reading.window_ends_excluded else code.time_s > window_high_s
            end_s = code.time_s
            counter = code.counter
        else:
            end_s = _sum(reading, "slot_end", code.slot_start_s, code.slot_length_s)
            too_old = end_s < window_low_s if reading.token_slot_end_in_window else end_s <= window_low_s
            too_new = code.slot_start_s > window_high_s
            counter = code.sequence
        if too_old:
            failed[10] = "EXPIRED"
        elif too_new:
            failed[10] = "NOT_YET_VALID"
        replay_key = (credential_id, counter)
        expires_at_s = self.replay.get(replay_key)
        live = expires_at_s is not None and (now_s < expires_at_s if reading.replay_end_exclusive
                                             else now_s <= expires_at_s)
        if live:
            failed[11] = "REPLAYED"
        for step in skipped:
            failed.pop(step, None)
        accepted = {
            "code": code, "issuer": issuer, "credential_id": credential_id, "replay_key": replay_key,
            "expires_at_s": _sum(reading, "replay_expiry", end_s, -low_s, self.replay_margin_s),
        }
        return failed, accepted

    def verify(self, text: Any, *, now_s: int, tenant_id: bytes, purpose: int) -> dict[str, Any]:
        """The answer: the first failing check in ``reading.order``, or the verified fields (§6)."""
        failed, accepted = self.checks(text, now_s=now_s, tenant_id=tenant_id, purpose=purpose)
        for step in self.reading.order:
            if step in failed:
                return {"result": "REJECTED", "reason": failed[step]}
        self.replay[accepted["replay_key"]] = accepted["expires_at_s"]  # §8: only accepted codes
        code: Code = accepted["code"]
        return {"result": "VERIFIED", "fields": {
            "kind": code.kind, "tenant_id": str(uuid.UUID(bytes=accepted["issuer"].tenant_id)),
            "member_id": str(uuid.UUID(bytes=code.member_id)),
            "credential_id": str(uuid.UUID(bytes=accepted["credential_id"])), "purpose": PURPOSE_NAMES[purpose],
            "caps": code.caps, "time_s": code.time_s if code.kind == "holder" else code.slot_start_s,
            "counter": code.counter if code.kind == "holder" else code.sequence, "not_after_s": code.not_after_s,
            "key_id": code.key_id.hex(),
        }}


PURPOSES = {"PAY": 0x01, "ACCESS": 0x02, "RIDE": 0x04, "CHECK_IN": 0x08}
PURPOSE_NAMES = {value: name for name, value in PURPOSES.items()}


# ---- running a vector (§12) -----------------------------------------------------------------------

def verifier_for(vector: dict[str, Any], reading: Reading) -> DocVerifier:
    setup = vector["verifier"]
    verifier = DocVerifier(
        trust=[TrustEntry(uuid.UUID(key["tenant_id"]).bytes, bytes.fromhex(key["public_key"]))
               for key in setup["trust_list"]["keys"]],
        fetched_at_s=setup["trust_list"]["fetched_at_s"], max_trust_list_age_s=setup["max_trust_list_age_s"],
        clock_window_s=tuple(setup["clock_window_s"]), replay_margin_s=setup["replay_margin_s"],
        revoked_credentials={uuid.UUID(c).bytes for c in setup["revocations"]["credential_ids"]},
        revoked_members={}, reading=reading)
    for member in setup["revocations"]["members"]:
        verifier.revoke_member(uuid.UUID(member["member_id"]).bytes, member["revoked_at_s"])
    return verifier


def _after_prior_scans(vector: dict[str, Any], reading: Reading) -> DocVerifier | dict[str, Any]:
    """The vector's verifier once its prior scans ran and its later revocations arrived, or the
    answer to the first prior scan it refused."""
    verifier = verifier_for(vector, reading)
    for scan in vector["prior_scans"]:
        prior = verifier.verify(scan["code"], now_s=scan["now_s"], purpose=PURPOSES[scan["purpose"]],
                                tenant_id=uuid.UUID(scan["expected_tenant_id"]).bytes)
        if prior["result"] != "VERIFIED":
            return prior
    later = vector["verifier"]["revocations_after_prior_scans"]
    verifier.revoked_credentials |= {uuid.UUID(c).bytes for c in later["credential_ids"]}
    for member in later["members"]:
        verifier.revoke_member(uuid.UUID(member["member_id"]).bytes, member["revoked_at_s"])
    return verifier


def _scan(vector: dict[str, Any]) -> dict[str, Any]:
    return {"now_s": vector["now_s"], "tenant_id": uuid.UUID(vector["expected_tenant_id"]).bytes,
            "purpose": PURPOSES[vector["purpose"]]}


def run(vector: dict[str, Any], reading: Reading = Reading()) -> dict[str, Any]:
    """The vector's answer under ``reading`` (a refused prior scan answers {"prior_refused": …})."""
    verifier = _after_prior_scans(vector, reading)
    if not isinstance(verifier, DocVerifier):
        return {"prior_refused": verifier}
    return verifier.verify(vector["code"], **_scan(vector))


def failing_checks(vector: dict[str, Any], reading: Reading = Reading()) -> list[int]:
    """The checks the vector's scan fails, every one evaluated (its ``fails_checks``)."""
    verifier = _after_prior_scans(vector, reading)
    assert isinstance(verifier, DocVerifier), verifier
    failed, _ = verifier.checks(vector["code"], **_scan(vector))
    return sorted(failed)


def decoded_fields(text: str) -> dict[str, Any]:
    """The ``decoded`` object of a valid vector, from §3's layout."""
    code = decode(text, Reading())
    assert code is not None
    common = {"key_id": code.key_id.hex(), "member_id": str(uuid.UUID(bytes=code.member_id)),
              "not_before_s": code.not_before_s, "not_after_s": code.not_after_s, "caps": code.caps,
              "purposes": code.purposes, "issuer_signature": code.issuer_signature.hex()}
    if code.kind == "holder":
        return {"kind": "holder", **common, "holder_public_key": code.holder_public_key.hex(),
                "credential_bytes": code.head[2:].hex(), "credential_sha256": hashlib.sha256(code.head[2:]).hexdigest(),
                "time_s": code.time_s, "counter": code.counter, "purpose": code.proof_purpose,
                "holder_signature": code.holder_signature.hex()}
    return {"kind": "token", **common, "credential_id": str(uuid.UUID(bytes=code.credential_id)),
            "slot_start_s": code.slot_start_s, "slot_length_s": code.slot_length_s, "sequence": code.sequence}
